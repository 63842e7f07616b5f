"""One training run from the driver: checks, the rows and eval plan for the workers, a TorchTrainer, the best checkpoint.

Used by ``sftray train`` and by each Tune trial of a sweep; a one-worker trial hands in its Tune session and the
loop runs in the trial's own process instead. Never imports tune/ or tracking/.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from sftray.config import Config, TrainConfig
from sftray.core.rows import read_rows
from sftray.data.chat import turn_markers
from sftray.data.prepared import Prepared
from sftray.data.schema import empty_rows
from sftray.eval.metrics import (
    EXACT_MATCH,
    FORGETTING,
    FORMAT_COMPLIANCE,
    TRAIN_LOSS,
    VAL_LOSS,
    select_best,
)
from sftray.eval.plan import plan_eval
from sftray.layout import epoch_dir_name
from sftray.train.checkpoint import STATE_FILE
from sftray.train.controller import apply_train_settings
from sftray.train.job import WorkerJob, check_setup, train_fn_per_worker
from sftray.train.parallelism import resolve_parallelism
from sftray.train.resume import check_resumable, prior_checkpoints
from sftray.train.session import Session

log = logging.getLogger("sftray.train")


@dataclass(frozen=True, kw_only=True)
class TrainOutcome:
    """What a finished run leaves behind."""

    path: str
    """The run folder (checkpoints live below it)."""
    history: list[dict[str, Any]]
    """Metrics per eval: epoch 0 is the base model, then every epoch (and every eval_every_steps)."""
    checkpoints: list[tuple[str, dict[str, Any]]]
    """(checkpoint path, its metrics) for every epoch."""
    best_checkpoint: str
    best_metrics: dict[str, Any]
    best_reason: str
    worse_than_base: bool = False
    """The selected checkpoint is worse than the base model (epoch 0) on ``eval.select_metric``."""


def check_resources(t: TrainConfig, *, available: dict[str, float]) -> None:
    """Fails fast, naming the knob to lower, when the workers cannot all fit (Ray would wait for ever)."""
    need_cpu = t.num_workers * t.cpus_per_worker
    if need_cpu > available.get("CPU", 0.0) + 1e-9:
        raise ValueError(
            f"training needs {need_cpu:g} CPUs ({t.num_workers} workers x {t.cpus_per_worker:g}) but Ray has "
            f"{available.get('CPU', 0.0):g}: lower train.num_workers or train.cpus_per_worker"
        )
    if t.use_gpu and t.num_workers > available.get("GPU", 0.0):
        raise ValueError(
            f"training needs {t.num_workers} GPUs but Ray has {available.get('GPU', 0.0):g}: "
            "lower train.num_workers or set train.use_gpu=false"
        )


@dataclass(frozen=True, kw_only=True)
class StageStart:
    """Where a stage of a multi-stage run starts (``sftray.recipes.stages``)."""

    index: int | None = None
    """The stage's index: every report of its run carries it as ``stage`` (tracking makes a run per stage)."""

    init_adapter: str | None = None
    """LoRA ``continue``: the earlier stage's selected adapter, trained on."""
    reference_pretrain_loss: float | None = None
    """The original base model's held-out pretraining loss: forgetting is relative to it."""
    earlier_probes: dict[str, tuple[list[dict], int]] = field(default_factory=dict)
    """Each earlier stage's name -> (its probes, their generation limit) (``sftray.eval.plan.eval_probes``)."""
    heldout_dir: str | None = None
    """The chain's held-out windows (stage 0's prepared ``pretrain_heldout``): every stage measures forgetting on
    the same rows, whatever its own packing; None: the prepared data's own."""


def build_job(cfg: Config, *, prepared: Prepared, base_model: str, start: StageStart | None = None) -> WorkerJob:
    """The worker job; its training and eval rows go to the object store once, and every worker reads them there.

    Each rank trains on its round-robin share of a new permutation of all rows per epoch (``epoch_rows``), like
    torch's DistributedSampler, rather than on a Ray Data shard: the rows are in memory already, a shard costs a
    split-coordinator actor at start-up and a new streaming execution per epoch (each delays the epoch's first
    step), and a local shuffle buffer reorders only within a window while this reshuffles the whole set.
    ``train.parallelism=auto`` is decided here, so the job's config names what every rank runs.
    """
    import ray
    from transformers import AutoTokenizer

    cfg = resolve_parallelism(cfg, base_model=base_model)
    world = cfg.train.num_workers
    tokenizer = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
    markers = turn_markers(tokenizer)
    start = start or StageStart()
    heldout_dir = Path(start.heldout_dir) if start.heldout_dir else prepared.heldout_dir
    tables = {
        name: _padded_rows(folder, limit=limit, world=world, pad_id=tokenizer.pad_token_id, train=name == "train")
        for name, folder, limit in (
            ("train", prepared.train_dir, None),
            ("val", prepared.val_dir, cfg.eval.max_eval_rows),
            ("heldout", heldout_dir, cfg.eval.max_eval_rows),
        )
    }
    plan = plan_eval(
        cfg,
        prepared=prepared,
        tokenizer=tokenizer,
        base_model=base_model,
        heldout_dir=heldout_dir,
        adapter=start.init_adapter,
        earlier_probes=start.earlier_probes,
    )
    job = WorkerJob(
        cfg=cfg,
        base_model=base_model,
        tokenizer_dir=str(prepared.tokenizer_dir),
        rows_per_rank=tables["train"].num_rows // world,
        train_rows=ray.put(tables["train"]),
        eval_rows={name: ray.put(tables[name]) for name in ("val", "heldout")},
        eval=plan,
        end_of_turn_id=tokenizer.convert_tokens_to_ids(markers["end_of_turn"]),
        user_opener=markers["user_opener"],
        stage=start.index,
        init_adapter=start.init_adapter,
        reference_pretrain_loss=start.reference_pretrain_loss,
    )
    return job


def run_training(
    cfg: Config,
    *,
    prepared: Prepared,
    base_model: str,
    name: str,
    storage_path: str,
    callbacks: list | None = None,
    start: StageStart | None = None,
    session: Session | None = None,
    driver_cpus: float = 0.0,
) -> TrainOutcome:
    """Trains with a TorchTrainer and picks the best epoch by the configured metric and forgetting budget
    (``start``: where a later stage of a multi-stage run starts). ``session``: one worker's loop runs in this
    process and talks to it (a Tune trial's) instead; its checkpoints land in the same run folder. ``driver_cpus``:
    CPUs the calling Ray task holds (a Tune trial's), given up by the workers so the run needs no more CPUs in all
    than ``train.num_workers x train.cpus_per_worker``."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    t = cfg.train
    check_resources(t, available=ray.cluster_resources())
    check_validation(prepared.report)
    job = build_job(cfg, prepared=prepared, base_model=base_model, start=start)
    if t.resume_from:
        check_resumable(Path(t.resume_from), cfg=cfg, steps_per_epoch=job.steps_per_epoch)
    log.info(
        "training %s (%s, %s) on %d worker(s): %d rows/rank, %d steps/epoch x %d epochs",
        # what it trains from (a later stage: the earlier stage's weights), not cfg.model.name_or_path
        base_model + (f" + adapter {start.init_adapter}" if start and start.init_adapter else ""),
        t.method,
        job.cfg.train.parallelism,  # auto resolved
        t.num_workers,
        job.rows_per_rank,
        job.steps_per_epoch,
        t.epochs,
    )
    if session is not None:
        from sftray.train.loop import run_worker

        history = run_worker(job, session)
        check_setup(history)
        return _outcome_in_process(history, cfg=cfg, run_dir=Path(storage_path) / name)
    resources = {"CPU": t.cpus_per_worker - driver_cpus / t.num_workers, **({"GPU": 1} if t.use_gpu else {})}
    apply_train_settings()  # before the TorchTrainer: fit() reads them here and hands them to its controller
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),  # keep all: selection is by eval
        ),
    )
    result = trainer.fit()
    check_setup(result.return_value)
    return _outcome(result, cfg=cfg)


def _outcome(result: Any, *, cfg: Config) -> TrainOutcome:
    """The run's checkpoints (a resumed run's earlier ones too) and the one ``eval.select_metric`` chooses within
    ``eval.forgetting_budget``."""
    checkpoints = sorted(((c.path, m) for c, m in (result.best_checkpoints or [])), key=lambda cm: cm[1]["epoch"])
    return _selected(checkpoints, history=result.return_value, cfg=cfg, path=str(result.path), error=result.error)


def _outcome_in_process(history: list[dict[str, Any]], *, cfg: Config, run_dir: Path) -> TrainOutcome:
    """``_outcome`` of a loop that ran in this process: its epoch checkpoints are the run folder's, with the metrics
    its history holds (a restarted run's history includes the epochs before the restart)."""
    checkpoints = [
        (str(run_dir / epoch_dir_name(m["epoch"])), m)
        for m in history
        if m["epoch"] > 0 and TRAIN_LOSS in m and (run_dir / epoch_dir_name(m["epoch"]) / STATE_FILE).is_file()
    ]
    return _selected(checkpoints, history=history, cfg=cfg, path=str(run_dir), error=None)


def _selected(
    checkpoints: list[tuple[str, dict[str, Any]]],
    *,
    history: list[dict[str, Any]] | None,
    cfg: Config,
    path: str,
    error: Any,
) -> TrainOutcome:
    """The outcome of a run with these epoch ``checkpoints``: the one the selection rule chooses."""
    if cfg.train.resume_from:  # the earlier run's epochs are candidates too: selection is over the whole training
        checkpoints = prior_checkpoints(Path(cfg.train.resume_from)) + checkpoints
    if not checkpoints:
        raise RuntimeError(f"training finished without a checkpoint (error: {error})")
    history = history or [m for _, m in checkpoints]
    choice = select_best(
        [m for _, m in checkpoints],
        metric=cfg.eval.select_metric,
        forgetting_budget=cfg.eval.forgetting_budget,
        base=next((m for m in history if m.get("epoch") == 0), None),
    )
    if choice.worse_than_base:
        log.warning("the selected checkpoint is worse than the base model: %s", choice.reason)
    best_path, best_metrics = checkpoints[choice.index]
    return TrainOutcome(
        path=path,
        history=history,
        checkpoints=checkpoints,
        best_checkpoint=best_path,
        best_metrics=best_metrics,
        best_reason=choice.reason,
        worse_than_base=choice.worse_than_base,
    )


def _padded_rows(folder: Path, *, limit: int | None, world: int, pad_id: int, train: bool) -> pa.Table:
    """The first ``limit`` rows of ``folder``, padded to a multiple of ``world``: every rank must read the same
    number of rows (an equal split would otherwise drop the remainder); the padding rows hold one pad token and no
    target."""
    table = read_rows(folder, limit=limit)
    if table.num_rows == 0 and train:
        raise ValueError(f"{folder} holds no training rows")
    fill = (-table.num_rows) % world if table.num_rows else world
    return pa.concat_tables([table, empty_rows(fill, pad_id=pad_id)])


def summary(outcome: TrainOutcome) -> str:
    """Per-eval metrics table (epoch 0 = the base model), then the best checkpoint and why."""
    cols = [
        ("epoch", "epoch", "{:>6d}"),
        ("step", "step", "{:>6d}"),
        (TRAIN_LOSS, "train", "{:>8.4f}"),
        (VAL_LOSS, "val", "{:>8.4f}"),
        (FORMAT_COMPLIANCE, "format", "{:>8.1%}"),
        (EXACT_MATCH, "exact", "{:>8.1%}"),
        (FORGETTING, "forget", "{:>+8.1%}"),
    ]
    widths = [len(fmt.format(0)) for _, _, fmt in cols]
    lines = ["".join(f"{label:>{w + 2}}" for (_, label, _), w in zip(cols, widths))]
    for m in outcome.history:
        cells = []
        for (key, _, fmt), w in zip(cols, widths):
            value = m.get(key)
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            cells.append(("-".rjust(w) if missing else fmt.format(value)).rjust(w + 2))
        lines.append("".join(cells))
    lines.append(f"best checkpoint: {outcome.best_checkpoint}")
    lines.append(f"  chosen for: {outcome.best_reason}")
    if outcome.worse_than_base:
        lines.append(
            "  warning: training made the model worse than the base model (epoch 0) by the selection metric; "
            "the base may serve better (try a lower train.lr or fewer train.epochs)"
        )
    return "\n".join(lines)


def check_validation(report: dict[str, Any]) -> None:
    """Fails before any worker starts when the prepared data has no validation conversations.

    Checkpoints are chosen by eval (val/loss, generation probes), never by training loss, so a run without
    validation data cannot pick one. A small hash-split dataset can hold out none at all.
    """
    conversations = report.get("conversations", {})
    if conversations.get("val", 0) == 0:
        fraction = report.get("config", {}).get("data", {}).get("val_fraction")
        raise ValueError(
            f"no validation conversations in {report.get('out_dir')} ({conversations.get('train', 0)} train, "
            f"data.val_fraction={fraction}): raise data.val_fraction or give data.val_sources"
        )
