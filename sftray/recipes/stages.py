"""The multi-stage recipe: stage k trains from stage k-1's selected checkpoint; a chain folder that resumes.

Each stage is one ``run_training`` with ``stage_config(cfg, k)`` (the run's config plus the stage's overrides) in
``<chain>/<k>-<name>/``. Its start:

- after a full fine-tuning stage, the selected checkpoint's weights;
- after a LoRA stage, per the starting stage's ``train.lora.between_stages``: ``merge`` folds the selected adapter
  into the weights it was trained on (``<chain>/<k-1>-<name>-merged``) and trains a new adapter (or the whole model,
  when the stage is full fine-tuning, which always starts from merged weights); ``continue`` trains the same
  adapter on, over the same weights.

Every stage's eval also scores each earlier stage's probes (``eval/<stage>/format_compliance``: what a later stage
undid), and forgetting is relative to the original base model, on one held-out text for the whole chain: stage 0's
held-out windows (a later stage may pack its rows differently, e.g. another ``data.max_seq_len``; the keys that
choose the text are checked to be the same in every stage when the config is made).
``chain.json`` records each finished stage; running the chain again in the same folder skips those and resumes the
unfinished stage from its last epoch checkpoint (Ray Train resumes a run by its storage path and name).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from sftray.atomic import write_text_atomic
from sftray.config import Config, ConfigError, stage_config
from sftray.data.prepared import Prepared
from sftray.eval.metrics import EXACT_MATCH, FORGETTING, FORMAT_COMPLIANCE, PRETRAIN_LOSS, stage_metric
from sftray.eval.plan import eval_probes
from sftray.models.loading import resolve_base_model_path
from sftray.recipes.prep import prep
from sftray.train.run import StageStart, TrainOutcome, run_training

log = logging.getLogger("sftray.stages")

CHAIN_FILE = "chain.json"
"""In a chain folder: the finished stages, in order (``read_chain``)."""


def chain_name(cfg: Config) -> str:
    """A new chain's folder name: data, stages and start time."""
    return f"stages-{cfg.data.name}-{'-'.join(s.name for s in cfg.stages)}-{time.strftime('%Y%m%d-%H%M%S')}"


def read_chain(chain_dir: Path) -> list[dict[str, Any]]:
    """The finished stages recorded in ``chain_dir`` (none when it has no ``chain.json``)."""
    path = Path(chain_dir) / CHAIN_FILE
    return json.loads(path.read_text())["stages"] if path.is_file() else []


def is_chain(folder: Path) -> bool:
    """Whether ``folder`` is a multi-stage run's folder (``train.resume_from`` of a chain names one)."""
    return (Path(folder) / CHAIN_FILE).is_file()


def run_stages(
    cfg: Config,
    *,
    chain_dir: Path,
    base_model: str | None = None,
    callbacks: list | None = None,
    on_stage: Any = None,
) -> list[dict[str, Any]]:
    """Trains every stage of ``cfg.stages`` not yet finished in ``chain_dir``; returns every stage's record.

    ``on_stage(record)`` is called as each stage finishes (tracking); ``callbacks`` go to every stage's Train run.
    """
    done = check_chain(cfg, chain_dir=chain_dir)
    chain_dir = Path(chain_dir)
    chain_dir.mkdir(parents=True, exist_ok=True)
    if not is_chain(chain_dir):  # from the start, so train.resume_from can name the folder of any started chain
        write_text_atomic(chain_dir / CHAIN_FILE, json.dumps({"stages": []}))
    base = base_model or resolve_base_model_path(cfg.model, cache_dir=Path(cfg.paths.cache_dir))
    if done:
        log.info("chain %s: %d of %d stage(s) finished; going on", chain_dir, len(done), len(cfg.stages))
    # Every stage's data first (cached), so a stage that cannot run fails before any training.
    prepared_all = [prep(_stage_config(cfg, k)) for k in range(len(cfg.stages))]
    for k in range(len(done), len(cfg.stages)):
        scfg = _stage_config(cfg, k)
        stage = cfg.stages[k]
        prepared = prepared_all[k]
        model, start = _start(cfg, k, scfg=scfg, prepared=prepared_all, done=done, chain_dir=chain_dir, base=base)
        log.info("stage %d/%d %s: %s from %s", k + 1, len(cfg.stages), stage.name, scfg.train.method, model)
        outcome = run_training(
            scfg,
            prepared=prepared,
            base_model=model,
            name=stage_dir_name(k, stage.name),
            storage_path=str(chain_dir),
            callbacks=callbacks,
            start=start,
        )
        record = _record(k, cfg, scfg=scfg, outcome=outcome, model=model, start=start, prepared=prepared_all)
        done.append(record)
        write_text_atomic(chain_dir / CHAIN_FILE, json.dumps({"stages": done}, indent=1, default=str))
        if on_stage is not None:
            on_stage(record)
    return done


def check_chain(cfg: Config, *, chain_dir: Path) -> list[dict[str, Any]]:
    """The finished stages of ``chain_dir``, checked to be ``cfg``'s (a ``ConfigError`` otherwise: resume a chain
    with the overrides that started it)."""
    if not cfg.stages:
        raise ConfigError("no stages: set stages=... (conf/stages) or use the train recipe")
    done = read_chain(Path(chain_dir))
    for record in done:
        _check_same(cfg, record)
    return done


def train_stages(cfg: Config, *, chain_dir: Path) -> list[dict[str, Any]]:
    """The chain as ``sftray train stages=...`` runs it, tracked in MLflow: one run per chain, a child per stage.
    However it ends, its run ends: FINISHED, KILLED (Ctrl-C) or FAILED (a resume sets it RUNNING again)."""
    from sftray.tracking import stage_runs

    check_chain(cfg, chain_dir=chain_dir)  # before the run: a chain that cannot resume keeps its run's status
    run_id = stage_runs.start_chain(cfg, chain_dir=chain_dir)
    status = "FAILED"
    try:
        stages = run_stages(
            cfg, chain_dir=chain_dir, on_stage=lambda r: stage_runs.log_stage(cfg, parent_id=run_id, record=r)
        )
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):  # Train V2 turns Ctrl-C into SystemExit
        status = "KILLED"
        raise
    finally:
        stage_runs.finish_chain(cfg, run_id=run_id, status=status)
    return stages


def stage_dir_name(index: int, name: str) -> str:
    """A stage's run folder inside its chain folder: ``0-chat``, ``1-json``."""
    return f"{index}-{name}"


def summary(stages: list[dict[str, Any]]) -> str:
    """Per stage: its selected checkpoint's format compliance and exact match on its own probes, forgetting relative
    to the original base, and each earlier stage's probes before this stage (its epoch 0) -> after (its selection)."""
    nan = float("nan")
    lines = [
        f"{'stage':<16}{'epoch':>6}{'format':>9}{'exact':>9}{'forget':>9}  earlier stages' probes: before -> after"
    ]
    for r in stages:
        m = r["best_metrics"]
        start = next((h for h in r["history"] if h.get("epoch") == 0), {})
        earlier = "; ".join(
            f"{e['name']} format {start.get(stage_metric(e['name'], FORMAT_COMPLIANCE), nan):.1%} -> "
            f"{m.get(stage_metric(e['name'], FORMAT_COMPLIANCE), nan):.1%}, exact "
            f"{start.get(stage_metric(e['name'], EXACT_MATCH), nan):.1%} -> {m.get(stage_metric(e['name'], EXACT_MATCH), nan):.1%}"
            for e in stages[: r["index"]]
        )
        lines.append(
            f"{r['name']:<16}{m.get('epoch', 0):>6d}{m.get(FORMAT_COMPLIANCE, nan):>9.1%}"
            f"{m.get(EXACT_MATCH, nan):>9.1%}{m.get(FORGETTING, nan):>+9.1%}  {earlier or '-'}"
        )
    for r in stages:
        lines.append(f"{r['name']}: {r['best_checkpoint']}\n  chosen for: {r['reason']}")
    return "\n".join(lines)


# --- pieces -----------------------------------------------------------------------------------------------------


def _start(
    cfg: Config, k: int, *, scfg: Config, prepared: list[Prepared], done: list[dict], chain_dir: Path, base: str
) -> tuple[str, StageStart]:
    """The model stage ``k`` trains from and what else it starts with (``prepared``: every stage's data)."""
    if k == 0:
        return base, StageStart(index=0)
    prev = done[-1]
    earlier = {}
    for j in range(k):
        ecfg = stage_config(cfg, j)
        earlier[cfg.stages[j].name] = eval_probes(ecfg, prepared=prepared[j])
    reference = next(h for h in done[0]["history"] if h["epoch"] == 0)[PRETRAIN_LOSS]
    adapter = None
    if prev["method"] == "full":
        model = str(Path(prev["best_checkpoint"]) / "model")
    elif scfg.train.method == "lora" and scfg.train.lora.between_stages == "continue":
        model, adapter = prev["model"], str(Path(prev["best_checkpoint"]) / "model")
    else:
        model = _merged(prev, chain_dir=chain_dir, tokenizer_dir=str(prepared[k].tokenizer_dir))
    return model, StageStart(
        index=k,
        init_adapter=adapter,
        reference_pretrain_loss=reference,
        earlier_probes=earlier,
        heldout_dir=str(prepared[0].heldout_dir),
    )


def _merged(prev: dict[str, Any], *, chain_dir: Path, tokenizer_dir: str) -> str:
    """The previous LoRA stage's selected adapter merged into the weights it trained on (built once, in a Ray task:
    on a cluster it runs where there is room, not in the driver)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    out = chain_dir / f"{stage_dir_name(prev['index'], prev['name'])}-merged"
    if (out / "config.json").is_file():
        return str(out)

    @ray.remote(num_cpus=1)
    def merge() -> None:
        from transformers import AutoTokenizer

        from sftray.atomic import atomic_dir
        from sftray.train.checkpoint import export_merged

        with atomic_dir(out, replace=True) as tmp:
            export_merged(
                base_path=prev["model"],
                adapter_dir=Path(prev["best_checkpoint"]) / "model",
                out_dir=tmp,
                tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir),
            )

    # Outside any placement group: inside a Tune trial a task would otherwise be held to the trial's own bundle.
    ray.get(merge.options(scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None)).remote())
    return str(out)


def _record(
    k: int, cfg: Config, *, scfg: Config, outcome: TrainOutcome, model: str, start: StageStart, prepared: list[Prepared]
) -> dict[str, Any]:
    """Stage ``k``'s entry in ``chain.json`` (``prepared``: every stage's data)."""
    return {
        "index": k,
        "name": cfg.stages[k].name,
        "method": scfg.train.method,
        "config_hash": _config_hash(cfg, k),
        "model": model,  # the weights this stage trained on (LoRA: below its adapter)
        "init_adapter": start.init_adapter,
        "run_path": outcome.path,
        "best_checkpoint": outcome.best_checkpoint,
        "best_metrics": outcome.best_metrics,
        "reason": outcome.best_reason,
        "worse_than_base": outcome.worse_than_base,
        "history": outcome.history,
        "data": str(prepared[k].out_dir),
        "heldout_digest": _heldout_digest(prepared[0]),  # the chain's forgetting text: stage 0's held-out windows
    }


def _stage_config(cfg: Config, k: int) -> Config:
    """Stage ``k``'s config; ``train.resume_from`` names the chain, not a checkpoint of the stage."""
    scfg = stage_config(cfg, k)
    return dataclasses.replace(scfg, train=dataclasses.replace(scfg.train, resume_from=None))


def _config_hash(cfg: Config, k: int) -> str:
    scfg = _stage_config(cfg, k)
    return hashlib.sha256(json.dumps(dataclasses.asdict(scfg), sort_keys=True, default=str).encode()).hexdigest()


def _check_same(cfg: Config, record: dict[str, Any]) -> None:
    k = record["index"]
    if k >= len(cfg.stages) or cfg.stages[k].name != record["name"] or _config_hash(cfg, k) != record["config_hash"]:
        raise ConfigError(
            f"the chain folder's stage {k} ({record['name']}) was trained with another configuration than "
            f"stages[{k}] now: resume a chain with the overrides that started it, or start a new chain"
        )


def _heldout_digest(prepared: Prepared) -> str:
    """A hash of the held-out pretraining tokens: the forgetting measure's text, which must not change in a chain."""
    rows = sorted(  # in row order, whatever the files' names and order
        json.dumps(ids)
        for f in prepared.heldout_dir.glob("*.parquet")
        for ids in pq.read_table(f, columns=["input_ids"]).column("input_ids").to_pylist()
    )
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()
