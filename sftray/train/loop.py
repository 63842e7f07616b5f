"""The per-worker training loop: this rank's rows -> micro-batches -> globally normalised loss -> step -> eval -> report.

Runs inside each Ray Train worker, or (a one-worker sweep trial) in the Tune trial's own process: it talks only to
the ``Session`` it is given (``sftray.train.session``). Every rank executes the same number of optimizer steps, evals
and reports (report is a barrier); metrics are all-reduced before rank 0's dict travels on. A run resumes at an
epoch boundary from the session's checkpoint (after a failure) or from the folder ``train.resume_from`` names (a
checkpoint of an earlier run); per-epoch seeding makes the resumed epochs draw the same randomness as uninterrupted
ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sftray.config import Config
from sftray.core.parallel import wrap
from sftray.core.precision import use_bf16
from sftray.data.collate import collate_rows, micro_batches
from sftray.eval import base_eval
from sftray.eval.evaluate import Evaluator, eval_share
from sftray.eval.metrics import (
    BASE_EVAL_REUSED,
    EVAL_SECONDS,
    PRETRAIN_LOSS,
    TRAIN_INPUT_WAIT,
    TRAIN_LOSS,
    TRAIN_LOSS_POINTS,
    TRAIN_SECONDS,
    TRAIN_TARGET_TOKENS_PER_S,
    TRAIN_TOKENS_PER_S,
    with_forgetting,
)
from sftray.layout import epoch_dir_name
from sftray.models.loading import load_model
from sftray.models.lora import apply_lora
from sftray.train import checkpoint as ckpt_mod
from sftray.train.job import SETUP_ERRORS, WorkerJob
from sftray.train.session import Session, TrainSession
from sftray.train.step import StepSum, build_optimizer, build_scheduler, mean_loss, optimizer_step

log = logging.getLogger("sftray.train")

_POINT_SLOTS = [StepSum.LOSS, StepSum.TARGETS]
"""The step sums a ``train/loss`` point keeps."""


@dataclass(kw_only=True)
class _Worker:
    """One rank's built run: what every epoch uses."""

    job: WorkerJob
    session: Session
    rank: int
    world: int
    device: torch.device
    bf16: bool
    tokenizer: Any
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    collate: Callable[..., dict[str, torch.Tensor]]
    evaluator: Evaluator
    fresh_start: bool
    """Neither resumed nor retried: fault injection (``train.fail_at_step``) fires only then."""


@dataclass(kw_only=True)
class _Progress:
    """Where the run stands: what an epoch checkpoint saves and a resumed run restores."""

    next_epoch: int
    step: int
    """Optimizer steps taken so far, over all epochs."""
    base: dict[str, Any]
    """The base model's eval (``metrics``) and the pretraining loss forgetting is relative to (``pretrain_loss``)."""
    history: list[dict[str, Any]]
    """Every eval's metrics so far (epoch 0: the base model)."""
    restarts: int
    """Resumptions from a checkpoint so far (worker failures, ``train.resume_from``)."""
    probes_base: list[dict]
    """The base model's probe table (saved with every checkpoint beside the epoch's own)."""


@dataclass(kw_only=True)
class _EpochTally:
    """This rank's running totals over one epoch: summed over the ranks once, at its end, not per step."""

    sums: torch.Tensor
    """float64 sums over the epoch's steps, slots named by ``StepSum``."""
    points: list[torch.Tensor]
    """(loss, targets) sums per ``train/loss`` point; the last one is still open."""
    point_steps: list[int] = field(default_factory=list)
    """The step each closed point ends at."""
    tokens: int = 0
    """Input tokens of the epoch's micro-batches (chat and pretraining; padding excluded)."""
    wait: float = 0.0
    """Seconds spent waiting for micro-batches."""
    first_batch: float | None = None
    """``time.perf_counter()`` when the first micro-batch arrived: throughput counts from there."""

    @classmethod
    def zeros(cls, device: torch.device) -> _EpochTally:
        return cls(
            sums=torch.zeros(len(StepSum), dtype=torch.float64, device=device),
            points=[torch.zeros(len(_POINT_SLOTS), dtype=torch.float64, device=device)],
        )

    def add(
        self, step_sums: torch.Tensor, group: list[dict[str, torch.Tensor]], *, step: int, ends_point: bool
    ) -> None:
        self.sums += step_sums
        self.tokens += sum(int((b["token_kind"] > 0).sum()) for b in group)
        self.points[-1] += step_sums[_POINT_SLOTS]
        if ends_point:
            self.point_steps.append(step)
            self.points.append(torch.zeros_like(self.points[0]))

    def all_reduce(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(sums, closed points, tokens) over every rank."""
        points, tokens = torch.stack(self.points[:-1]), self.tokens
        if dist.is_initialized():
            dist.all_reduce(self.sums)
            dist.all_reduce(points)
            tok = torch.tensor([tokens], dtype=torch.float64, device=device)
            dist.all_reduce(tok)
            tokens = int(tok.item())
        return self.sums, points, tokens


def run_worker(job: WorkerJob, session: Session | None = None) -> list[dict[str, Any]] | dict[str, list[str]]:
    """One worker's whole run (entered through ``sftray.train.job.train_fn_per_worker``, or in a Tune trial's
    process with Tune's session); returns (on rank 0) the metric history of the run, or every rank's setup errors
    (``sftray.train.job.SETUP_ERRORS``). ``session``: None is Ray Train's of this worker."""
    import ray
    import ray.train
    from transformers import AutoTokenizer

    t = job.cfg.train
    session = session or TrainSession()
    rank, world, device = session.rank, session.world_size, session.device()
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    tokenizer = AutoTokenizer.from_pretrained(job.tokenizer_dir)

    # This run's own latest checkpoint (after a restart) wins over train.resume_from, which seeds only the first
    # attempt: Train V2 has no resume_from_checkpoint, so the worker loads the folder itself.
    checkpoint = session.checkpoint()
    fresh_start = checkpoint is None and not t.resume_from
    if checkpoint is None and t.resume_from:
        checkpoint = ray.train.Checkpoint.from_directory(t.resume_from)
    model, state, error = _load(job, checkpoint, tokenizer=tokenizer, rank=rank)
    if errors := _setup_errors(error, world=world):
        return {"setup_errors": errors}
    w = _worker(job, model, session=session, tokenizer=tokenizer, device=device, fresh_start=fresh_start)
    progress = _resumed(w, state) if state is not None else _started(w)
    train_rows = ray.get(job.train_rows)  # zero-copy from the node's object store
    for epoch in range(progress.next_epoch, t.epochs + 1):
        _run_epoch(w, progress, epoch=epoch, train_rows=train_rows)
    return progress.history


def _load(job: WorkerJob, checkpoint: Any, *, tokenizer: Any, rank: int) -> tuple[Any, dict | None, str | None]:
    """(model, the checkpoint's train state or None, None), or (None, None, this rank's setup error)."""
    try:
        with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as ckdir:
            state = ckpt_mod.load_state(Path(ckdir)) if ckdir else None
            model = _build_model(job, tokenizer=tokenizer, checkpoint_dir=Path(ckdir) if ckdir else None)
    except SETUP_ERRORS as exc:  # the same inputs would fail the same way: returned, so Train does not retry it
        log.debug("rank %d could not build its model", rank, exc_info=True)
        return None, None, f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return model, state, None


def _worker(
    job: WorkerJob,
    model: Any,
    *,
    session: Session,
    tokenizer: Any,
    device: torch.device,
    fresh_start: bool,
) -> _Worker:
    """The model on ``device``, wrapped for data parallelism when there is a process group (one process alone has
    nothing to shard or synchronise), with its optimizer, schedule and evaluator."""
    import ray

    cfg, t = job.cfg, job.cfg.train
    rank, world = session.rank, session.world_size
    bf16 = use_bf16(t.precision, device)
    model.to(device)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if t.neftune_alpha > 0:
        from transformers.integrations.neftune import neftune_post_forward_hook

        embeddings = model.get_input_embeddings()
        embeddings.neftune_noise_alpha = t.neftune_alpha
        embeddings.register_forward_hook(neftune_post_forward_hook)
    if dist.is_initialized():
        model = wrap(model, parallelism=t.parallelism, device=device, world_size=world, bf16=bf16)
    model.train()
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg=t)
    scheduler = build_scheduler(optimizer, cfg=t, total_steps=job.steps_per_epoch * t.epochs)
    # Pad each micro-batch to its longest row (not to max_seq_len): fewer wasted positions, same targets.
    collate = partial(collate_rows, pad_id=tokenizer.pad_token_id, packed=cfg.data.packing)
    evaluator = Evaluator(
        model=model,
        tokenizer=tokenizer,
        device=device,
        collate=collate,
        val=eval_share(ray.get(job.eval_rows["val"]), rank=rank, world=world),
        heldout=eval_share(ray.get(job.eval_rows["heldout"]), rank=rank, world=world),
        micro_batch_size=t.micro_batch_size,
        probes=job.eval.probes,
        earlier_probes=job.eval.earlier_probes,
        max_new_tokens=job.eval.max_new_tokens,
        end_of_turn_id=job.end_of_turn_id,
        user_opener=job.user_opener,
    )
    return _Worker(
        job=job,
        session=session,
        rank=rank,
        world=world,
        device=device,
        bf16=bf16,
        tokenizer=tokenizer,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        collate=collate,
        evaluator=evaluator,
        fresh_start=fresh_start,
    )


def _resumed(w: _Worker, state: dict[str, Any]) -> _Progress:
    """The optimizer and schedule restored from a checkpoint's train state; training goes on after its epoch."""
    ckpt_mod.restore_optimizer(w.model, w.optimizer, state["optimizer"])
    w.scheduler.load_state_dict(state["scheduler"])
    log.info("rank %d resumed after epoch %d (step %d)", w.rank, state["epoch"], state["step"])
    return _Progress(
        next_epoch=state["epoch"] + 1,
        step=state["step"],
        base=state["base"],
        history=state["history"],
        restarts=state.get("restarts", 0) + 1,
        probes_base=state.get("probes_base", []),
    )


def _started(w: _Worker) -> _Progress:
    """A fresh run: the base model's eval (epoch 0), reported like every later eval."""
    job = w.job
    started = time.perf_counter()
    base_metrics, base_table, reused = _base_eval(w.evaluator, job.eval.base_eval_path, rank=w.rank)
    seconds = time.perf_counter() - started
    reference = job.reference_pretrain_loss  # a later stage: forgetting relative to the original base
    base = {
        "pretrain_loss": base_metrics[PRETRAIN_LOSS] if reference is None else reference,
        "metrics": base_metrics,
    }
    progress = _Progress(next_epoch=1, step=0, base=base, history=[], restarts=0, probes_base=base_table)
    row = {"epoch": 0, "step": 0, BASE_EVAL_REUSED: float(reused), EVAL_SECONDS: seconds}
    row.update(_with_forgetting(base_metrics, base, job.cfg))
    progress.history.append(_report(w, row))
    return progress


def _run_epoch(w: _Worker, progress: _Progress, *, epoch: int, train_rows: Any) -> None:
    """One epoch on every rank: train on this rank's share, sum over the ranks, evaluate, checkpoint and report."""
    tally, seconds, timing = _train_epoch(w, progress, epoch=epoch, train_rows=train_rows)
    sums, points, tokens = tally.all_reduce(w.device)
    eval_started = time.perf_counter()
    eval_metrics, table = w.evaluator.run()
    eval_seconds = time.perf_counter() - eval_started
    target_tokens = float(sums[StepSum.TARGETS])
    metrics = {
        "epoch": epoch,
        "step": progress.step,
        TRAIN_LOSS: mean_loss(sums, StepSum.LOSS, StepSum.TARGETS),
        TRAIN_LOSS_POINTS: [
            [s, float(loss / targets.clamp(min=1))] for s, (loss, targets) in zip(tally.point_steps, points)
        ],
        "train/sft_loss": mean_loss(sums, StepSum.SFT_LOSS, StepSum.SFT_TARGETS),
        "train/pretrain_loss": (
            mean_loss(sums, StepSum.PRETRAIN_LOSS, StepSum.PRETRAIN_TARGETS)
            if sums[StepSum.PRETRAIN_TARGETS] > 0
            else float("nan")
        ),
        "train/target_tokens": int(sums[StepSum.TARGETS]),
        TRAIN_TOKENS_PER_S: tokens / max(seconds, 1e-9),
        TRAIN_TARGET_TOKENS_PER_S: target_tokens / max(seconds, 1e-9),
        TRAIN_SECONDS: seconds,
        EVAL_SECONDS: eval_seconds,
        TRAIN_INPUT_WAIT: tally.wait,
        "train/lr": w.scheduler.get_last_lr()[0],
        "train/restarts": progress.restarts,
        **_with_forgetting(eval_metrics, progress.base, w.job.cfg),
    }
    progress.history.append({**metrics})
    _checkpoint(w, progress, epoch=epoch, metrics=metrics, table=table, timing=timing)


def _train_epoch(
    w: _Worker, progress: _Progress, *, epoch: int, train_rows: Any
) -> tuple[_EpochTally, float, dict[str, float]]:
    """This rank's optimizer steps of one epoch: (its tally, seconds from the first micro-batch, wall-clock marks)."""
    job, cfg, t = w.job, w.job.cfg, w.job.cfg.train
    seed = t.training_seed(cfg.seed)
    torch.manual_seed(seed * 1000 + epoch * 10 + w.rank)  # dropout/NEFTune noise: same on resume
    tally = _EpochTally.zeros(w.device)
    timing = {"epoch_started_at": time.time()}  # wall clock on this rank: the bench's start-up figures read it
    epoch_started = time.perf_counter()
    batches = micro_batches(
        train_rows, rank=w.rank, world=w.world, size=t.micro_batch_size, collate=w.collate, seed=seed + epoch
    )
    remaining = job.micro_batches_per_epoch
    loss_every = cfg.tracking.loss_every_steps(job.steps_per_epoch)
    for i in range(job.steps_per_epoch):
        waited = time.perf_counter()
        group = [next(batches) for _ in range(min(t.grad_accum, remaining))]
        tally.wait += time.perf_counter() - waited
        # Throughput counts from the first micro-batch: the shard's start-up is start-up (input_wait_s shows it).
        tally.first_batch = tally.first_batch or time.perf_counter()
        remaining -= len(group)
        step_sums = optimizer_step(w.model, w.optimizer, group, cfg=t, device=w.device, world=w.world, bf16=w.bf16)
        w.scheduler.step()
        progress.step += 1
        ends_point = progress.step % loss_every == 0 or i == job.steps_per_epoch - 1
        tally.add(step_sums, group, step=progress.step, ends_point=ends_point)
        if progress.step == 1:
            timing["first_step_at"] = time.time()
        _after_step(w, progress, epoch=epoch, step_sums=step_sums)
    for _ in batches:  # an equal split yields exactly rows_per_rank rows; anything left would be a bug
        raise RuntimeError("the training shard yielded more rows than planned")
    return tally, time.perf_counter() - (tally.first_batch or epoch_started), timing


def _after_step(w: _Worker, progress: _Progress, *, epoch: int, step_sums: torch.Tensor) -> None:
    """Fault injection, the progress log line and a mid-epoch eval (``train.eval_every_steps``), when due."""
    job, t, step = w.job, w.job.cfg.train, progress.step
    if t.fail_at_step is not None and w.fresh_start and step == t.fail_at_step and w.rank == w.world - 1:
        log.warning("fault injection: rank %d exits at step %d", w.rank, step)
        os._exit(1)
    if w.rank == 0 and step % t.log_every_steps == 0:
        log.info(
            "epoch %d step %d/%d loss %.4f lr %.2e",
            epoch,
            step,
            job.steps_per_epoch * t.epochs,
            mean_loss(step_sums, StepSum.LOSS, StepSum.TARGETS),
            w.scheduler.get_last_lr()[0],
        )
    if t.eval_every_steps and step % t.eval_every_steps == 0 and step % job.steps_per_epoch:
        metrics, _ = w.evaluator.run()
        row = {"epoch": epoch, "step": step, **_with_forgetting(metrics, progress.base, job.cfg)}
        progress.history.append(_report(w, row))


def _checkpoint(
    w: _Worker, progress: _Progress, *, epoch: int, metrics: dict[str, Any], table: list[dict], timing: dict
) -> None:
    """Saves the epoch's checkpoint and reports it with the epoch's metrics (every rank: report is a barrier)."""
    t = w.job.cfg.train
    state = {
        "epoch": epoch,
        "step": progress.step,
        "scheduler": w.scheduler.state_dict(),
        "base": progress.base,
        "restarts": progress.restarts,
        "history": progress.history,
        "probes_base": progress.probes_base,
        "timing": timing,  # wall-clock marks, not metrics: they mean nothing in a plot
    }
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_mod.save(
            w.model,
            w.optimizer,
            directory=Path(tmp),
            tokenizer=w.tokenizer,
            state=state,
            rank=w.rank,
            tables={"probes_base": progress.probes_base, ckpt_mod.PROBES_TABLE: table},
            merged_from=w.job.base_model if t.method == "lora" and t.export_merged else None,
        )
        _report(w, metrics, checkpoint_dir=Path(tmp), name=epoch_dir_name(epoch))


# --- pieces -----------------------------------------------------------------------------------------------------


def _base_eval(evaluator: Evaluator, path: str | None, *, rank: int) -> tuple[dict[str, float], list[dict], bool]:
    """The base model's (metrics, probe table, reused): from the cache when an earlier run stored it, else computed
    (and stored). Rank 0 decides under the cache's lock and tells the others, so every rank runs the eval's
    collectives or none does; a concurrent trial with the same key waits for the lock and then reads."""
    if path is None:
        return *evaluator.run(), False
    cache = Path(path)
    with base_eval.locked(cache) if rank == 0 else contextlib.nullcontext():
        cached = [base_eval.load(cache) if rank == 0 else None]
        if dist.is_initialized():
            dist.broadcast_object_list(cached, src=0)
        if cached[0] is not None:
            log.info("base model eval reused from %s", cache)
            return *cached[0], True
        metrics, table = evaluator.run()
        if rank == 0:
            base_eval.save(cache, metrics, table)
    return metrics, table, False


def _with_forgetting(metrics: dict[str, float], base: dict[str, Any], cfg: Config) -> dict[str, float]:
    return with_forgetting(
        metrics,
        base_pretrain_loss=base["pretrain_loss"],
        metric=cfg.eval.select_metric,
        budget=cfg.eval.forgetting_budget,
    )


def _setup_errors(error: str | None, *, world: int) -> list[str]:
    """Every rank's model-building error, as ``rank k: ...`` (none when all ranks built theirs). A collective, so
    all ranks go on, or all return, together: a rank that went on alone would wait for the others for ever."""
    errors = [error]
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error)
    return [f"rank {r}: {e}" for r, e in enumerate(errors) if e]


def _build_model(job: WorkerJob, *, tokenizer: Any, checkpoint_dir: Path | None) -> Any:
    """Base model (or a checkpoint's weights), LoRA applied; identical on every rank (seeded)."""

    cfg = job.cfg
    torch.manual_seed(cfg.train.training_seed(cfg.seed))  # LoRA's random A matrices: equal on every rank
    if cfg.train.method == "full":
        path = str(checkpoint_dir / "model") if checkpoint_dir else job.base_model
        model, _ = load_model(path, tokenizer=tokenizer, trust_remote_code=cfg.model.trust_remote_code)
        return model
    model, new_ids = load_model(job.base_model, tokenizer=tokenizer, trust_remote_code=cfg.model.trust_remote_code)
    adapter = str(checkpoint_dir / "model") if checkpoint_dir is not None else job.init_adapter
    if adapter is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    return apply_lora(model, cfg=cfg.train.lora, new_token_ids=new_ids)


def _report(
    w: _Worker, metrics: dict[str, Any], *, checkpoint_dir: Path | None = None, name: str | None = None
) -> dict[str, Any]:
    """Reports through the session on every rank (a barrier); a stage of a multi-stage run reports its index as
    ``stage``."""
    if w.job.stage is not None:
        metrics = {**metrics, "stage": w.job.stage}
    w.session.report(metrics, checkpoint_dir=checkpoint_dir, name=name)
    return metrics
