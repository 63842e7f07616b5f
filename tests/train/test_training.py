"""Training on real Ray Train workers (CPU, gloo): parallelism equivalence, checkpoints, LoRA, failure recovery.

Each epoch is exactly one optimizer step over ALL training rows (micro_batch_size = rows per rank), so the global
batch is the same set of rows whatever the row-to-rank split: 1-worker, 2-worker FSDP2 and 2-worker DDP runs must
then produce the same losses up to float32 reduction order (tolerance below).
"""

from __future__ import annotations

import dataclasses
import json
import math
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftray.cli import compose_config
from sftray.data.collate import collate_rows
from sftray.data.pipeline import prepare
from sftray.eval.evaluate import heldout_loss
from sftray.train.run import run_training

pytestmark = [pytest.mark.ray, pytest.mark.slow]
CONF = Path(__file__).resolve().parents[2] / "conf"
RTOL = 1e-4
"""Relative tolerance between parallel layouts: float32 sums in a different order differ by ~1e-6."""


def _conversations() -> list[dict]:
    out = []
    for i in range(30):
        msgs = [{"role": "user", "content": f"Add {i} and {i + 3}."}, {"role": "assistant", "content": str(2 * i + 3)}]
        if i % 4 == 0:
            msgs += [{"role": "user", "content": "Now double it."}, {"role": "assistant", "content": str(4 * i + 6)}]
        out.append({"messages": msgs})
    return out


@pytest.fixture(scope="module")
def setup(ray_local, cache_dir, tmp_path_factory, random_base):
    root = tmp_path_factory.mktemp("train")
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in _conversations()))
    cfg = compose_config(
        [
            f"paths.cache_dir={cache_dir}",
            f"paths.output_dir={root / 'out'}",
            "data=files",
            f"data.sources=[{{path:'{data}'}}]",
            "data.max_seq_len=64",
            "data.val_fraction=0.2",
            "mix.ratio=0.1",
            "eval.num_probes=4",
            "eval.max_new_tokens=6",
            "train.method=full",
            "train.lr=1e-3",
            "train.warmup_ratio=0",
            "train.schedule=constant",
            "train.epochs=3",
            "train.cpus_per_worker=0.5",
            "train.lora.dropout=0",
            "train.lora.target_modules=[q_proj,v_proj]",
            "eval.forgetting_budget=10",
        ],
        conf=CONF,
        base=root,
    )
    prepared = prepare(cfg)
    return cfg, prepared, str(random_base), root


def _one_step_per_epoch(cfg, prepared, *, workers: int, **train):
    rows = prepared.report["splits"]["train"]["rows"]
    per_rank = math.ceil(rows / workers)
    t = dataclasses.replace(cfg.train, num_workers=workers, micro_batch_size=per_rank, **train)
    return dataclasses.replace(cfg, train=t)


def _run(setup, name, **train):
    cfg, prepared, base, root = setup
    run_cfg = _one_step_per_epoch(cfg, prepared, **train)
    return run_training(run_cfg, prepared=prepared, base_model=base, name=name, storage_path=str(root / "runs"))


@pytest.fixture(scope="module")
def fsdp2(setup):
    return _run(setup, "fsdp2", workers=2, parallelism="fsdp")


def _epochs(outcome):
    return [m for m in outcome.history if m["epoch"] > 0]


def _val_loss(model, prepared, cfg) -> float:
    tok = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
    rows = pq.read_table(prepared.val_dir).to_pylist()
    collate = partial(collate_rows, pad_id=tok.pad_token_id, packed=True, pad_to=cfg.data.max_seq_len)
    batches = [collate({k: [r[k] for r in rows[i : i + 4]] for k in rows[0]}) for i in range(0, len(rows), 4)]
    return heldout_loss(model.eval(), batches, device=torch.device("cpu"))


def test_one_worker_fsdp_and_ddp_match_two_worker_fsdp(setup, fsdp2):
    single = _run(setup, "fsdp1", workers=1, parallelism="fsdp")
    ddp = _run(setup, "ddp2", workers=2, parallelism="ddp")
    ref = _epochs(fsdp2)
    assert [m["step"] for m in ref] == [1, 2, 3]
    assert ref[0]["train/loss"] > ref[-1]["train/loss"]  # it learns: the comparison is not between constants
    for other in (single, ddp):
        got = _epochs(other)
        assert [m["step"] for m in got] == [1, 2, 3]
        for a, b in zip(ref, got):
            assert a["train/target_tokens"] == b["train/target_tokens"]
            for key in ("train/loss", "val/loss", "eval/pretrain_loss"):
                assert b[key] == pytest.approx(a[key], rel=RTOL), (key, a["epoch"])


def test_full_checkpoint_reloads_with_from_pretrained_and_reproduces_the_model(setup, fsdp2):
    cfg, prepared, _, _ = setup
    assert len(fsdp2.checkpoints) == 3  # one per epoch
    for path, metrics in fsdp2.checkpoints:
        model = AutoModelForCausalLM.from_pretrained(Path(path) / "model")
        assert _val_loss(model, prepared, cfg) == pytest.approx(metrics["val/loss"], rel=1e-5)
        assert (Path(path) / "probes.json").is_file() and (Path(path) / "probes_base.json").is_file()
    assert fsdp2.best_checkpoint in [p for p, _ in fsdp2.checkpoints]
    assert "eval/format_compliance" in fsdp2.best_reason


def test_lora_trains_only_adapters_and_exports_a_merged_model(setup):
    cfg, prepared, base_path, _ = setup
    outcome = _run(setup, "lora", workers=2, parallelism="fsdp", method="lora", epochs=2, export_merged=True)
    path, metrics = outcome.checkpoints[-1]
    adapter = Path(path) / "model" / "adapter_model.safetensors"
    with safe_open(adapter, "pt") as f:
        keys = list(f.keys())
        assert keys and all("lora_" in k for k in keys), keys
        assert any(f.get_tensor(k).abs().sum() > 0 for k in keys if "lora_B" in k)  # B starts at 0: it trained
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_path)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(Path(path) / "model"))
    assert _val_loss(peft_model, prepared, cfg) == pytest.approx(metrics["val/loss"], rel=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(Path(path) / "merged")  # plain transformers, no peft
    assert _val_loss(merged, prepared, cfg) == pytest.approx(metrics["val/loss"], rel=1e-5)
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    targets = tuple(cfg.train.lora.target_modules)
    changed = {k for k in base_sd if not torch.equal(base_sd[k], merged_sd[k])}
    assert changed and all(k.split(".")[-2] in targets for k in changed), changed


def test_worker_failure_resumes_from_the_last_checkpoint(setup, fsdp2):
    outcome = _run(setup, "failure", workers=2, parallelism="fsdp", fail_at_step=2, max_failures=1)
    epochs = _epochs(outcome)
    assert [m["epoch"] for m in epochs] == [1, 2, 3] and epochs[-1]["step"] == 3  # no epoch repeated or skipped
    assert epochs[0]["train/restarts"] == 0 and epochs[-1]["train/restarts"] == 1  # it did fail and resume
    ref = _epochs(fsdp2)
    assert epochs[-1]["train/loss"] == pytest.approx(ref[-1]["train/loss"], rel=RTOL)
    assert epochs[-1]["val/loss"] == pytest.approx(ref[-1]["val/loss"], rel=RTOL)
