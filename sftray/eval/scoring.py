"""Per-conversation loss scoring for ``data.prune``: the Ray Data actor that holds the scoring model, and its spec.

The prep recipe calls ``loss_scoring`` and hands the result to the pipeline (``sftray.data.pipeline.prepare``),
which runs ``LossScorer`` in a ``map_batches`` actor pool over the encoded training conversations: the data layer
never imports a model. A conversation's score is its mean target loss, computed exactly as training computes the
loss (``sftray.core.forward`` and ``sftray.core.loss``: labels shifted, -100 ignored), one conversation per row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sftray.config import Config, ModelConfig
from sftray.data.pruning import Scoring
from sftray.eval.base_eval import model_identity
from sftray.models.loading import load_tokenizer, resolve_base_model_path


def loss_scoring(cfg: Config, *, tokenizer: Any) -> Scoring:
    """The scorer of ``cfg.data.prune``: its model (``data.prune.model``, else the run's base model, the builtin
    pretrained on first use) resolved to a folder or hub id, checked to share ``tokenizer``'s vocabulary."""
    prune = cfg.data.prune
    cache_dir = Path(cfg.paths.cache_dir)
    name = prune.model or cfg.model.name_or_path
    model = ModelConfig(
        name_or_path=name, trust_remote_code=cfg.model.trust_remote_code, chat_template=cfg.model.chat_template
    )
    path = resolve_base_model_path(model, cache_dir=cache_dir)
    if prune.model is not None and prune.model != cfg.model.name_or_path:
        # The scores are computed on the run's token ids: another vocabulary would score different text.
        try:
            own = load_tokenizer(model, cache_dir=cache_dir)
        except (OSError, ValueError) as exc:
            raise ValueError(f"data.prune.model={prune.model!r}: cannot load its tokenizer: {exc}") from None
        if own.get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"data.prune.model={prune.model!r} has another vocabulary than model.name_or_path="
                f"{cfg.model.name_or_path!r}; the scoring model must share the run's tokenizer"
            )
    return Scoring(
        model=name,
        identity=model_identity(path),
        actor=LossScorer,
        kwargs={
            "model_path": path,
            "tokenizer": tokenizer,
            "trust_remote_code": cfg.model.trust_remote_code,
            "batch_size": prune.batch_size,
        },
    )


class LossScorer:
    """Ray Data actor: Arrow batches of conversations (``key``, ``input_ids``, ``labels``) -> ``key``, ``loss`` (mean
    target loss, nats per token; NaN without targets) and ``n_targets``. Loads the model once, on the actor's GPU
    when Ray gave it one, else on CPU with one torch thread per CPU it reserved."""

    def __init__(self, *, model_path: str, tokenizer: Any, trust_remote_code: bool, batch_size: int) -> None:
        import ray
        import torch

        from sftray.models.loading import load_model

        if torch.cuda.is_available():  # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs (none: empty)
            self.device = torch.device("cuda")
        else:
            self.device = torch.device("cpu")
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
            torch.set_num_threads(max(1, int(cpus)))
        self.model, _ = load_model(model_path, tokenizer=tokenizer, trust_remote_code=trust_remote_code)
        self.model.to(self.device).eval()
        self.pad_id = tokenizer.pad_token_id
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from sftray.core.forward import forward_logits, to_device
        from sftray.core.loss import token_losses
        from sftray.data.chat import IGNORE_INDEX
        from sftray.data.collate import collate_rows

        rows = batch.select(["input_ids", "labels"]).to_pydict()
        # Forward passes in order of length, so each pads to a near neighbour rather than to the batch's longest.
        order = sorted(range(batch.num_rows), key=lambda i: len(rows["input_ids"][i]))
        loss = np.full(batch.num_rows, np.nan)
        n_targets = np.zeros(batch.num_rows, dtype=np.int64)
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                part = order[start : start + self.batch_size]
                ids = [rows["input_ids"][i] for i in part]
                micro = collate_rows(
                    {
                        "input_ids": ids,
                        "labels": [rows["labels"][i] for i in part],
                        "position_ids": [range(len(x)) for x in ids],
                        "seq_lens": [[len(x)] for x in ids],
                        "seq_kinds": [[0] for _ in ids],
                    },
                    pad_id=self.pad_id,
                    packed=False,  # one conversation per row, padded: attention_mask
                )
                micro = to_device(micro, self.device)
                losses = token_losses(forward_logits(self.model, micro), micro["labels"])
                counts = (micro["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)
                n_targets[part] = counts.cpu().numpy()
                with np.errstate(invalid="ignore", divide="ignore"):
                    loss[part] = (losses.sum(dim=1).double().cpu().numpy()) / counts.cpu().numpy()
        return pa.table(
            {
                "key": batch["key"],
                "loss": pa.array(loss, type=pa.float64()),
                "n_targets": pa.array(n_targets, type=pa.int64()),
            }
        )
