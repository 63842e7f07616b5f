"""The Ray Tune adapter: a search space from ``cfg.sweep``, trials that each run the trial body they are given, and
the ranked result.

Ray Train V2 combines with Tune through a function trainable that launches a ``TorchTrainer`` and forwards its
reports to Tune (``Tuner(TorchTrainer)`` is V1 only); that trainable is the recipes' trial body
(``sftray.recipes.trial``). A one-worker trial runs its training loop in the trial process instead
(``sftray.tune.session``), without Ray Train's controller and workers. The objective is
``eval/score`` (``sftray.eval.outcome``): the configured generation metric when the run stays within the forgetting
budget, below every such run otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftray.config import SEED_KEY, SWEEP_POINT, Config, override
from sftray.data.prepared import Prepared
from sftray.eval.metrics import OBJECTIVE_MODE
from sftray.eval.outcome import OBJECTIVE, ROW_METRICS, read_outcome
from sftray.eval.verdict import Verdict
from sftray.layout import sweep_dir, sweeps_dir
from sftray.train.run import check_validation
from sftray.tune.configurations import best_trial, rank_configurations
from sftray.tune.configurations import table as configurations_table
from sftray.tune.session import runs_in_trial

log = logging.getLogger("sftray.sweep")

TRIAL_DRIVER_CPUS = 0.01
"""A trial that launches a TorchTrainer only waits on it; Tune refuses 0, so it holds this sliver, taken out of its
workers' share (``run_training(driver_cpus=...)``) so that the trial needs no more than its workers' CPUs."""
TrialBody = Callable[..., None]
"""What one trial runs: ``body(config, *, base_cfg, prepared_dir, base_model)``, ``config`` the trial's sampled
keys; it reports to Tune and leaves its outcome (``sftray.eval.outcome``) in its trial folder."""


@dataclass(frozen=True, kw_only=True)
class SweepOutcome:
    path: str
    """The Tune experiment folder."""
    trials: list[dict[str, Any]]
    """One row per trial: its overrides, final and best metrics, status, checkpoint."""
    best: dict[str, Any] | None
    """The winning trial's row (None if every trial failed)."""
    best_reason: str = ""
    """Why its configuration ranks first (which rule decided, on the means over seeds)."""
    configurations: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Finished configurations, best first (``sftray.tune.configurations``)."""
    verdict: Verdict | None = None
    """The best configuration against the runner-up; None with fewer than two configurations."""
    verdict_note: str = ""
    """Why there is no verdict."""


def with_every_trial(cfg: Config) -> Config:
    """``cfg`` with the keys ``sweep.every_trial`` sets: the configuration every trial of the sweep starts from. A
    key whose value differs from the schema's default was set by the user (command line or a group file) and wins."""
    for key, value in (cfg.sweep.every_trial or {}).items():
        try:
            default = _schema_default(Config, key)
            current = _value(cfg, key)
            if current != default and current != value:
                log.info("sweep.every_trial.%s=%s is not applied: %s=%s is set", key, value, key, current)
                continue
            cfg = override(cfg, key, value)
        except ValueError as exc:  # an unknown key or a bad value, with the valid keys listed
            raise ValueError(f"sweep.every_trial.{key}: {exc}") from None
    return cfg


def _value(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


def _schema_default(cls: Any, dotted: str) -> Any:
    """The schema's default of a dotted key (None where the path is not a chain of dataclass fields)."""
    head, _, rest = dotted.partition(".")
    found = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    if head not in found:
        return None
    f = found[head]
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if not rest:
        return value
    return _schema_default(type(value), rest) if dataclasses.is_dataclass(value) else None


def search_space(cfg: Config) -> dict[str, Any]:
    """The Tune param space: dotted config keys -> Tune domains (``sweep.point``: an index into ``sweep.points``)."""
    from ray import tune

    s = cfg.sweep
    grid = s.search == "grid"

    def choice(values: list) -> Any:
        return tune.grid_search(list(values)) if grid else tune.choice(list(values))

    space: dict[str, Any] = {}
    if s.lr.values:
        space["train.lr"] = choice(s.lr.values)
    elif s.lr.low is not None:
        space["train.lr"] = tune.loguniform(s.lr.low, s.lr.high)
    if s.epochs:
        space["train.epochs"] = choice(s.epochs)
    for key, values in s.params.items():
        if not values:
            raise ValueError(f"sweep.params.{key} is an empty list")
        override(cfg, key, values[0])  # an unknown key raises here, with the valid keys listed
        space[key] = choice(values)
    for i, point in enumerate(s.points):
        for key, value in point.items():
            if key in space:
                raise ValueError(
                    f"sweep.points[{i}] sets {key}, which the sweep also varies on its own axis"
                    f"{' (sweep.lr: set sweep.lr.values=[] to take the LR from the points)' if key == 'train.lr' else ''}"
                )
            override(cfg, key, value)  # an unknown key or a bad value raises here
    if s.points:
        space[SWEEP_POINT] = choice(range(len(s.points)))
    if SEED_KEY in space or any(SEED_KEY in point for point in s.points):
        raise ValueError(f"{SEED_KEY} is swept by sweep.seeds, not by sweep.params or sweep.points")
    if len(s.seeds) == 1:
        space[SEED_KEY] = s.seeds[0]  # a constant: still every trial's param
    elif grid:
        space[SEED_KEY] = tune.grid_search(list(s.seeds))  # each configuration once per seed
    else:
        raise ValueError(
            f"sweep.seeds={s.seeds} needs sweep.search=grid: Optuna draws configurations, not replicates of them "
            "(sweep.seeds=[0] runs each draw once)"
        )
    return space


def trial_resources(cfg: Config, *, cluster: dict[str, float]) -> tuple[dict[str, float], int]:
    """Resources of one trial's own process and how many trials fit at once without oversubscription.

    A trial that trains in its own process (``runs_in_trial``) holds exactly its one worker's CPUs (and GPU); one
    that launches a TorchTrainer holds ``TRIAL_DRIVER_CPUS``, which its workers give up (a stage chain's do not),
    so two 1-CPU trials fit on 2 CPUs either way.
    """
    t = cfg.train
    if runs_in_trial(cfg):
        resources = {"CPU": float(t.cpus_per_worker), **({"GPU": 1.0} if t.use_gpu else {})}
        per_trial = t.cpus_per_worker
    else:
        resources = {"CPU": TRIAL_DRIVER_CPUS}
        per_trial = t.num_workers * t.cpus_per_worker + (TRIAL_DRIVER_CPUS if cfg.stages else 0.0)
    fits = math.floor(cluster.get("CPU", 0.0) / per_trial + 1e-9)
    if t.use_gpu:
        fits = min(fits, math.floor(cluster.get("GPU", 0.0) / t.num_workers))
    if fits < 1:
        raise ValueError(
            f"one trial needs {per_trial:g} CPUs ({t.num_workers} workers x {t.cpus_per_worker:g}) but the cluster "
            f"has {cluster.get('CPU', 0.0):g}: lower train.num_workers or train.cpus_per_worker"
        )
    wanted = cfg.sweep.max_concurrent_trials or fits
    return resources, min(wanted, fits)


def _drop_tune_resume_hint() -> None:
    """On Ctrl-C Tune logs "Resume experiment with: Tuner.restore(...)", an API sftray's users never call; the CLI
    prints the sftray command that resumes the sweep instead. Other warnings of that logger pass."""
    tune_log = logging.getLogger("ray.tune.tune")
    if not any(getattr(f, "sftray_resume_hint", False) for f in tune_log.filters):

        def keep(record: logging.LogRecord) -> bool:
            return "Tuner.restore(" not in record.getMessage()

        keep.sftray_resume_hint = True  # type: ignore[attr-defined]
        tune_log.addFilter(keep)


def run_sweep(
    cfg: Config, *, trial: TrialBody, prepared: Prepared, base_model: str, callbacks: list | None = None
) -> SweepOutcome:
    """Runs (or resumes) the sweep, each trial running ``trial``; a trial that crashes is marked failed and the
    others go on."""
    import ray
    from ray import tune

    check_validation(prepared.report)  # once here, not once per failing trial
    storage = str(sweeps_dir(cfg.paths.output_dir))
    resources, concurrent = trial_resources(cfg, cluster=ray.cluster_resources())
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial, body=trial, base_cfg=cfg, prepared_dir=str(prepared.out_dir), base_model=base_model
        ),
        resources,
    )
    path = sweep_dir(cfg.paths.output_dir, cfg.sweep.name)
    _drop_tune_resume_hint()
    if cfg.sweep.resume:
        if not tune.Tuner.can_restore(str(path)):
            raise ValueError(f"sweep.resume=true but there is no sweep to resume at {path}")
        log.info("resuming sweep %s", path)
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True, param_space=search_space(cfg))
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg),
            tune_config=tune.TuneConfig(
                metric=OBJECTIVE,
                mode=OBJECTIVE_MODE,
                num_samples=cfg.sweep.num_samples,
                max_concurrent_trials=concurrent,
                scheduler=_scheduler(cfg),
                search_alg=_search_alg(cfg),
                # A later trial runs in a finished trial's process, its imports paid (sftray.tune.session).
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=cfg.sweep.name,
                storage_path=storage,
                callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=_trial_restarts(cfg)),
            ),
        )
    grid = tuner.fit()
    rows = [_trial_row(r, cfg) for r in grid]
    configs, reason, verdict, note = rank_configurations(rows, cfg)
    if not configs:
        return SweepOutcome(path=str(path), trials=rows, best=None, verdict_note=note)
    return SweepOutcome(
        path=str(path),
        trials=rows,
        best=best_trial(configs[0], cfg),
        best_reason=reason,
        configurations=configs,
        verdict=verdict,
        verdict_note=note,
    )


def table(outcome: SweepOutcome, cfg: Config) -> str:
    """The trial table people read at the end of a sweep: LR, epochs, any other swept key, then the metrics."""
    extra = sorted({k for r in outcome.trials for k in r["overrides"]} - {"train.lr", "train.epochs"})
    widths = {
        k: max(len(k.rsplit(".", 1)[-1]), *(len(str(r["overrides"].get(k, "-"))) for r in outcome.trials)) + 2
        for k in extra
    }
    head = f"{'trial':<14}{'lr':>10}{'epochs':>7}" + "".join(f"{k.rsplit('.', 1)[-1]:>{widths[k]}}" for k in extra)
    head += f"{'val loss':>10}{'format':>8}{'exact':>8}{'forget':>8}  status"
    lines = [head]
    for r in sorted(outcome.trials, key=lambda r: r["trial_id"]):
        mark = " *" if outcome.best and r["trial_id"] == outcome.best["trial_id"] else ""
        o = r["overrides"]
        lines.append(
            f"{r['trial_id']:<14}{_f(o.get('train.lr'), '.2e'):>10}{o.get('train.epochs', '-'):>7}"
            + "".join(f"{str(o.get(k, '-')):>{widths[k]}}" for k in extra)
            + f"{_f(r.get('val_loss'), '.4f'):>10}"
            f"{_f(r.get('format_compliance'), '.0%'):>8}{_f(r.get('exact_match'), '.0%'):>8}"
            f"{_f(r.get('forgetting'), '+.1%'):>8}  {r['status']}{mark}"
        )
    if outcome.configurations:
        lines.append(configurations_table(outcome.configurations, cfg))
    if outcome.best:
        b = outcome.best
        lines += [
            outcome.verdict.line() if outcome.verdict else f"verdict: {outcome.verdict_note}",
            f"best trial: {b['trial_id']} ({', '.join(f'{k}={v}' for k, v in b['overrides'].items())})",
            f"  its configuration ranked first: {outcome.best_reason}",
            f"  checkpoint: {b['checkpoint']}",
            f"  why this epoch: {b['reason']}",
        ]
    else:
        lines.append("no trial finished")
    return "\n".join(lines)


def _trial_restarts(cfg: Config) -> int:
    """Tune's restarts of a failed trial: ``train.max_failures`` where the trial trains in its own process (Tune
    restarts it from its last checkpoint); none where a TorchTrainer's own FailureConfig restarts the workers."""
    return cfg.train.max_failures if runs_in_trial(cfg) else 0


def _trial(config: dict[str, Any], *, body: TrialBody, **params: Any) -> None:
    """Every sweep's Tune trainable: the trial body it is given. Tune names trials and their folders after this
    function (``_trial_<id>``) and checks that name when a sweep resumes, so it stays the same whatever the body."""
    body(config, **params)


def _trial_row(result: Any, cfg: Config) -> dict[str, Any]:
    trial_dir = Path(result.path)
    trial_id = (result.metrics or {}).get("trial_id") or trial_dir.name
    overrides = cfg.sweep.trial_overrides(dict(result.config or {}))
    row: dict[str, Any] = {"trial_id": trial_id, "overrides": overrides, "path": str(trial_dir)}
    row["pid"] = (result.metrics or {}).get("pid")  # the trial's process: reused ones run several trials
    outcome = read_outcome(trial_dir)
    if result.error is not None or outcome is None:
        row.update(status="failed" if result.error is not None else "stopped", error=str(result.error or "")[:300])
        last = result.metrics or {}
        row.update({column: last.get(metric) for column, metric in ROW_METRICS.items()})
        row.update(score=None, checkpoint=None, reason="")
        return row
    m = outcome["best_metrics"]
    row.update(status="finished", checkpoint=outcome["best_checkpoint"], reason=outcome["reason"])
    row.update({column: m.get(metric) for column, metric in ROW_METRICS.items()})
    row.update(score=m.get(OBJECTIVE), best_epoch=m.get("epoch"), outcome=outcome)
    return row


def _scheduler(cfg: Config) -> Any:
    if cfg.sweep.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    max_t = max(cfg.sweep.epochs or [cfg.train.epochs])
    return ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=1, reduction_factor=2)


def _search_alg(cfg: Config) -> Any:
    if cfg.sweep.search == "grid":
        return None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch()


def _f(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)
