"""The per-worker training loop: this rank's rows -> micro-batches -> globally normalised loss -> step -> eval -> report.

Runs inside each Ray Train worker. Every rank executes the same number of optimizer steps, evals and
``ray.train.report`` calls (report is a barrier); metrics are all-reduced before rank 0's dict travels on.
A run resumes at an epoch boundary from ``ray.train.get_checkpoint()`` (after a worker failure) or from the folder
``train.resume_from`` names (a checkpoint of an earlier run); per-epoch seeding makes the resumed epochs draw the
same randomness as uninterrupted ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
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
    PRETRAIN_LOSS,
    TRAIN_INPUT_WAIT,
    TRAIN_LOSS,
    TRAIN_LOSS_POINTS,
    TRAIN_TARGET_TOKENS_PER_S,
    TRAIN_TOKENS_PER_S,
    with_forgetting,
)
from sftray.layout import epoch_dir_name
from sftray.models.loading import load_model
from sftray.models.lora import apply_lora
from sftray.train import checkpoint as ckpt_mod
from sftray.train.job import SETUP_ERRORS, WorkerJob
from sftray.train.step import build_optimizer, build_scheduler, optimizer_step

log = logging.getLogger("sftray.train")


def run_worker(job: WorkerJob) -> list[dict[str, Any]]:
    """One worker's whole run (entered through ``sftray.train.job.train_fn_per_worker``); returns (on rank 0) the
    metric history of the run."""
    import ray
    import ray.train
    import ray.train.torch
    from transformers import AutoTokenizer

    cfg, t = job.cfg, job.cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    bf16 = use_bf16(t.precision, device)
    tokenizer = AutoTokenizer.from_pretrained(job.tokenizer_dir)

    # This run's own latest checkpoint (after a worker-group restart) wins over train.resume_from, which seeds
    # only the first attempt: Train V2 has no resume_from_checkpoint, so the worker loads the folder itself.
    checkpoint = ray.train.get_checkpoint()
    fresh_start = checkpoint is None and not t.resume_from  # fault injection fires on a fresh run's first attempt
    if checkpoint is None and t.resume_from:
        checkpoint = ray.train.Checkpoint.from_directory(t.resume_from)
    error = None
    try:
        with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as ckdir:
            state = ckpt_mod.load_state(Path(ckdir)) if ckdir else None
            model = _build_model(job, tokenizer=tokenizer, checkpoint_dir=Path(ckdir) if ckdir else None)
    except SETUP_ERRORS as exc:  # the same inputs would fail the same way: returned, so Train does not retry it
        log.debug("rank %d could not build its model", rank, exc_info=True)
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    if errors := _setup_errors(error, world=world):
        return {"setup_errors": errors}
    model.to(device)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if t.neftune_alpha > 0:
        from transformers.integrations.neftune import neftune_post_forward_hook

        embeddings = model.get_input_embeddings()
        embeddings.neftune_noise_alpha = t.neftune_alpha
        embeddings.register_forward_hook(neftune_post_forward_hook)
    model = wrap(model, parallelism=t.parallelism, device=device, world_size=world, bf16=bf16)
    model.train()

    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg=t)
    total_steps = job.steps_per_epoch * t.epochs
    scheduler = build_scheduler(optimizer, cfg=t, total_steps=total_steps)
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

    if state is not None:
        ckpt_mod.restore_optimizer(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step, base, history = state["epoch"] + 1, state["step"], state["base"], state["history"]
        restarts = state.get("restarts", 0) + 1
        tables = {"probes_base": state.get("probes_base", [])}
        log.info("rank %d resumed after epoch %d (step %d)", rank, state["epoch"], step)
    else:
        start_epoch, step, history, restarts = 1, 0, [], 0
        base_metrics, base_table, reused = _base_eval(evaluator, job.eval.base_eval_path, rank=rank)
        reference = job.reference_pretrain_loss  # a later stage: forgetting relative to the original base
        base = {
            "pretrain_loss": base_metrics[PRETRAIN_LOSS] if reference is None else reference,
            "metrics": base_metrics,
        }
        tables = {"probes_base": base_table}
        row = {"epoch": 0, "step": 0, BASE_EVAL_REUSED: float(reused), **_with_forgetting(base_metrics, base, cfg)}
        history.append(_report(row, rank=rank, stage=job.stage))

    train_rows = ray.get(job.train_rows)  # zero-copy from the node's object store
    loss_every = cfg.tracking.loss_every_steps(job.steps_per_epoch)
    for epoch in range(start_epoch, t.epochs + 1):
        torch.manual_seed(cfg.seed * 1000 + epoch * 10 + rank)  # dropout/NEFTune noise: same on resume
        sums = torch.zeros(6, dtype=torch.float64, device=device)  # loss, targets, sft loss/targets, pt loss/targets
        tokens, wait, first_batch = 0, 0.0, None
        timing = {"epoch_started_at": time.time()}  # wall clock on this rank: the bench's start-up figures read it
        epoch_started = time.perf_counter()
        batches = micro_batches(
            train_rows, rank=rank, world=world, size=t.micro_batch_size, collate=collate, seed=cfg.seed + epoch
        )
        remaining = job.micro_batches_per_epoch
        # This rank's (loss, targets) sums per train/loss point: reduced once at the epoch's end, not per point.
        point_sums, point_steps = [torch.zeros(2, dtype=torch.float64, device=device)], []
        for i in range(job.steps_per_epoch):
            waited = time.perf_counter()
            group = [next(batches) for _ in range(min(t.grad_accum, remaining))]
            wait += time.perf_counter() - waited
            # Throughput counts from the first micro-batch: the shard's start-up is start-up (input_wait_s shows it).
            first_batch = first_batch or time.perf_counter()
            remaining -= len(group)
            step_sums = optimizer_step(model, optimizer, group, cfg=t, device=device, world=world, bf16=bf16)
            scheduler.step()
            sums += step_sums
            tokens += sum(int((b["token_kind"] > 0).sum()) for b in group)
            step += 1
            point_sums[-1] += step_sums[:2]
            if step % loss_every == 0 or i == job.steps_per_epoch - 1:
                point_steps.append(step)
                point_sums.append(torch.zeros_like(point_sums[0]))
            if step == 1:
                timing["first_step_at"] = time.time()
            if t.fail_at_step is not None and fresh_start and step == t.fail_at_step and rank == world - 1:
                log.warning("fault injection: rank %d exits at step %d", rank, step)
                os._exit(1)
            if rank == 0 and step % t.log_every_steps == 0:
                log.info(
                    "epoch %d step %d/%d loss %.4f lr %.2e",
                    epoch,
                    step,
                    total_steps,
                    float(step_sums[0] / step_sums[1].clamp(min=1)),
                    scheduler.get_last_lr()[0],
                )
            if t.eval_every_steps and step % t.eval_every_steps == 0 and step % job.steps_per_epoch:
                metrics, _ = evaluator.run()
                history.append(
                    _report(
                        {"epoch": epoch, "step": step, **_with_forgetting(metrics, base, cfg)},
                        rank=rank,
                        stage=job.stage,
                    )
                )
        for _ in batches:  # an equal split yields exactly rows_per_rank rows; anything left would be a bug
            raise RuntimeError("the training shard yielded more rows than planned")
        seconds = time.perf_counter() - (first_batch or epoch_started)
        points = torch.stack(point_sums[:-1])
        if dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(points)
            tok = torch.tensor([tokens], dtype=torch.float64, device=device)
            dist.all_reduce(tok)
            tokens = int(tok.item())
        metrics, table = evaluator.run()
        metrics = {
            "epoch": epoch,
            "step": step,
            TRAIN_LOSS: float(sums[0] / sums[1].clamp(min=1)),
            TRAIN_LOSS_POINTS: [
                [s, float(loss / targets.clamp(min=1))] for s, (loss, targets) in zip(point_steps, points)
            ],
            "train/sft_loss": float(sums[2] / sums[3].clamp(min=1)),
            "train/pretrain_loss": float(sums[4] / sums[5].clamp(min=1)) if sums[5] > 0 else float("nan"),
            "train/target_tokens": int(sums[1]),
            TRAIN_TOKENS_PER_S: tokens / max(seconds, 1e-9),
            TRAIN_TARGET_TOKENS_PER_S: float(sums[1]) / max(seconds, 1e-9),
            TRAIN_INPUT_WAIT: wait,
            "train/lr": scheduler.get_last_lr()[0],
            "train/restarts": restarts,  # resumptions from a checkpoint so far (worker failures, resume_from)
            **_with_forgetting(metrics, base, cfg),
        }
        history.append({**metrics})
        tables["probes"] = table
        state_out = {
            "epoch": epoch,
            "step": step,
            "scheduler": scheduler.state_dict(),
            "base": base,
            "restarts": restarts,
            "history": history,
            "probes_base": tables["probes_base"],
            "timing": timing,  # wall-clock marks, not metrics: they mean nothing in a plot
        }
        with tempfile.TemporaryDirectory() as tmp:
            ckpt_mod.save(
                model,
                optimizer,
                directory=Path(tmp),
                tokenizer=tokenizer,
                state=state_out,
                rank=rank,
                tables=tables,
                merged_from=job.base_model if t.method == "lora" and t.export_merged else None,
            )
            _report(metrics, rank=rank, stage=job.stage, checkpoint_dir=Path(tmp), name=epoch_dir_name(epoch))
    return history


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
    torch.manual_seed(cfg.seed)  # LoRA's random A matrices must start equal on every rank
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
    metrics: dict[str, Any],
    *,
    rank: int,
    stage: int | None = None,
    checkpoint_dir: Path | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """``ray.train.report`` on every rank (a barrier); only rank 0 attaches the checkpoint. A stage of a multi-stage
    run reports its index as ``stage``."""
    import ray.train

    if stage is not None:
        metrics = {**metrics, "stage": stage}
    checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir and rank == 0 else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
    if checkpoint_dir is not None:
        # The controller collects reports by polling (every ~2 s): a worker lost before then would take the
        # checkpoint with it. Waiting until it is registered makes it durable before training goes on.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    return metrics
