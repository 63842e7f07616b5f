"""Command line: argument parsing only; it composes the config and calls a recipe. ``sftray <command> [k=v ...]``.

``sftray.config.compose_config`` turns conf/ + overrides into the typed ``Config`` (a misspelled key fails with
the valid keys listed); everything below receives dataclasses. Each command imports its recipe inside its
function, so ``sftray --help``, ``sftray config`` and ``sftray preview`` start without Ray and torch.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

from sftray.config import Config, ConfigError
from sftray.config import compose_config as compose_schema
from sftray.eval.metrics import check_select_metric

USAGE = """usage: sftray COMMAND [key=value ...] [flags]

commands:
  prep      run the Ray Data pipeline: Parquet rows + data report      [--force: rebuild even if up to date]
  preview   print the first examples with trained tokens marked          [n=5: how many]
  pretrain  build the builtin tiny-llama base model (cached; minutes)    [steps=600, --force: rebuild it]
  train     one training run on Ray Train: prep (cached), base model, epochs, evals, checkpoints
  sweep     a Ray Tune sweep over LR x epochs (conf/sweep), every trial tracked in MLflow
  config    print the composed configuration

overrides use Hydra syntax, e.g.  sftray prep data.max_seq_len=512 mix.ratio=0.05 data=files
`sftray COMMAND --help` shows a command's options; `sftray config` prints every key and its value.
"""

_COMMON = """
common overrides (Hydra syntax; `sftray config [overrides]` prints every key and its value):
  data=files data.sources=/abs/chats.jsonl     your conversations (or [{path: a.jsonl}, {path: b.parquet}])
  model=hf model.name_or_path=ORG/NAME_OR_DIR  a Hugging Face model (default: the builtin tiny-llama)
  data.max_seq_len=512 mix.ratio=0.05          packed row length; share of pretraining text mixed in
"""

COMMAND_HELP = {
    "prep": """usage: sftray prep [key=value ...] [--force]

Runs the Ray Data pipeline: conversations rendered and masked, pretraining text mixed in, rows packed, written as
Parquet with a data report under paths.output_dir/data/. Prepared data with the same fingerprint is reused.

flags:
  --force    rebuild even if prepared data with the same fingerprint exists
""",
    "preview": """usage: sftray preview [n=5] [key=value ...]

Prints the first examples of data.sources as rendered by the chat template, trained tokens inside {+ +} (no Ray).

options:
  n=5        how many examples
""",
    "pretrain": """usage: sftray pretrain [steps=600] [key=value ...] [--force]

Builds the builtin tiny-llama base model into paths.cache_dir (minutes on a CPU; cached afterwards).

options:
  steps=600  optimizer steps: fewer (e.g. steps=50) for a quick look at a weaker base
flags:
  --force    rebuild the cached base (needed to change steps once one is built)
""",
    "train": """usage: sftray train [key=value ...] [--force]

One training run on Ray Train: prep (cached), base model, every epoch evaluated and checkpointed, the best
checkpoint picked by eval.select_metric within eval.forgetting_budget. Multi-stage: stages=demo_two_stage.

examples:
  sftray train train=full train.epochs=3 train.lr=1e-4
  sftray train train.resume_from=outputs/runs/<run>/epoch_01
flags:
  --force    rebuild the prepared data even if it is up to date
""",
    "sweep": """usage: sftray sweep [key=value ...]

A Ray Tune sweep (conf/sweep) over learning rate, epochs and any sweep.params; every trial tracked in MLflow,
the best one ranked by eval.select_metric within eval.forgetting_budget.

examples:
  sftray sweep sweep.lr.values=[1e-3,5e-3] sweep.epochs=[2]
  sftray sweep +sweep.params.mix.ratio=[0.05,0.2]
  sftray sweep sweep.resume=true                 continue an interrupted sweep
""",
    "config": """usage: sftray config [key=value ...]

Prints the composed configuration (conf/ plus the overrides) as YAML: every key, its value and its group.
""",
}
"""Each command's ``--help``: what it does, its options and flags, then the common overrides."""

log = logging.getLogger("sftray")


def compose_config(overrides: list[str]) -> Config:
    """``sftray.config.compose_config`` plus the checks that need a higher layer than config (the metrics the
    run will produce), so a misspelled ``eval.select_metric`` fails before any data or training."""
    cfg = compose_schema(overrides)
    try:
        check_select_metric(cfg.eval.select_metric, probes=cfg.eval.num_probes > 0)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["help"] and len(args) > 1:
        args = [args[1], "--help"]
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if "--help" in rest or "-h" in rest:
        if command not in COMMAND_HELP:
            print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
            return 2
        print(COMMAND_HELP[command] + _COMMON)
        return 0
    flags = {a for a in rest if a.startswith("--")}
    overrides = [a for a in rest if not a.startswith("--")]
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        match command:
            case "prep":
                _check_flags(flags, {"--force"})
                return _prep(compose_config(overrides), force="--force" in flags)
            case "preview":
                _check_flags(flags, set())
                n = _take_count(overrides, "n", default=5)
                from sftray.preview import preview

                preview(compose_config(overrides), n=n, out=sys.stdout)
                return 0
            case "train":
                _check_flags(flags, {"--force"})
                return _train(compose_config(overrides), force="--force" in flags, overrides=overrides)
            case "sweep":
                _check_flags(flags, set())
                return _sweep(compose_config(overrides), overrides=overrides)
            case "pretrain":
                _check_flags(flags, {"--force"})
                steps = _take_count(overrides, "steps", default=None)
                return _pretrain(compose_config(overrides), force="--force" in flags, steps=steps)
            case "config":
                from omegaconf import OmegaConf

                print(OmegaConf.to_yaml(OmegaConf.structured(compose_config(overrides))))
                return 0
            case _:
                print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
                return 2
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: sftray {command} stopped before it finished", file=sys.stderr)
        return 130


def init_ray() -> None:
    """Joins $RAY_ADDRESS if set, else starts a local Ray (dashboard on: Train V2 needs it)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)


def _prep(cfg: Config, *, force: bool) -> int:
    from sftray.data.report import summary
    from sftray.recipes.preflight import check_inputs
    from sftray.recipes.prep import prep

    check_inputs(cfg, train=False)
    init_ray()
    print(summary(prep(cfg, force=force).report))
    return 0


def _train(cfg: Config, *, force: bool, overrides: list[str]) -> int:
    """The train recipe, its summary, and on Ctrl-C or failure the command that resumes it."""
    from ray.exceptions import RayActorError

    from sftray.layout import runs_dir
    from sftray.recipes.preflight import check_inputs
    from sftray.recipes.train import run_name, train
    from sftray.train.run import summary

    check_inputs(cfg, train=True)
    if cfg.stages:
        return _train_stages(cfg, overrides=overrides)
    init_ray()
    name = run_name(cfg)
    try:
        outcome = train(cfg, force=force, name=name)
    except (KeyboardInterrupt, SystemExit, Exception) as exc:
        # Train V2 turns Ctrl-C into an aborted controller (SystemExit or an actor error here). However the run
        # ends early, say where it got to and the command that goes on from there.
        interrupted = isinstance(exc, KeyboardInterrupt | SystemExit | RayActorError)
        if not interrupted:
            log.error("training failed: %s", exc)
        print(
            _train_resume_hint(runs_dir(cfg.paths.output_dir) / name, overrides, interrupted=interrupted),
            file=sys.stderr,
        )
        return 130 if interrupted else 1
    print(summary(outcome))
    return 0


def _train_stages(cfg: Config, *, overrides: list[str]) -> int:
    """The multi-stage recipe and its per-stage summary; on Ctrl-C or failure the command that resumes the chain
    (``train.resume_from=<chain folder>``: finished stages are kept, the unfinished one goes on)."""
    from ray.exceptions import RayActorError

    from sftray.layout import runs_dir
    from sftray.recipes.stages import chain_name, check_chain, is_chain, summary, train_stages

    resume = cfg.train.resume_from
    if resume and not is_chain(Path(resume)):
        raise ConfigError(f"train.resume_from={resume} is not a multi-stage run's folder (no chain.json in it)")
    chain_dir = Path(resume) if resume else runs_dir(cfg.paths.output_dir) / chain_name(cfg)
    check_chain(cfg, chain_dir=chain_dir)  # a chain that cannot resume fails before Ray starts
    init_ray()
    try:
        stages = train_stages(cfg, chain_dir=chain_dir)
    except ConfigError:  # resuming would fail the same way: the error alone, no resume command
        raise
    except (KeyboardInterrupt, SystemExit, Exception) as exc:
        interrupted = isinstance(exc, KeyboardInterrupt | SystemExit | RayActorError)
        if not interrupted:
            log.error("training failed: %s", exc)
        status = f"multi-stage training {'interrupted' if interrupted else 'failed'} ({chain_dir})"
        print(_resume_hint(status, "train", overrides, resume_from=str(chain_dir)), file=sys.stderr)
        return 130 if interrupted else 1
    print(summary(stages))
    return 0


def _sweep(cfg: Config, *, overrides: list[str]) -> int:
    """The sweep recipe and its ranked table; on Ctrl-C the command that resumes it."""
    from sftray.recipes.preflight import check_inputs
    from sftray.recipes.sweep import sweep, unfinished
    from sftray.tracking.mlflow_logger import tracking_uri
    from sftray.tune.sweep import table

    check_inputs(cfg, train=True, sweep=True)
    init_ray()
    try:
        outcome = sweep(cfg)
    except (KeyboardInterrupt, SystemExit):
        print(_sweep_resume_hint(cfg, overrides, unfinished=None), file=sys.stderr)
        return 130
    print(table(outcome, cfg))
    if stopped := unfinished(outcome):  # Tune ends the loop on Ctrl-C and returns the trials as they were
        print(_sweep_resume_hint(cfg, overrides, unfinished=len(stopped)), file=sys.stderr)
        return 130
    uri = tracking_uri(cfg)
    print(f"\nbrowse: make mlflow-ui MLFLOW_URI={uri}   (experiment '{cfg.sweep.name}')")
    print(
        f"report: make report SWEEP={cfg.sweep.name} MLFLOW_URI={uri}   "
        f"(HTML of analysis/sweep_report.ipynb in {cfg.paths.output_dir})"
    )
    return 0 if outcome.best else 1


def _train_resume_hint(run_dir: Path, overrides: list[str], *, interrupted: bool) -> str:
    """Where an unfinished run got to, and the exact command that continues it."""
    from sftray.train.resume import last_checkpoint

    what = "interrupted" if interrupted else "failed"
    last = last_checkpoint(run_dir) if run_dir.is_dir() else None
    if last is None:
        return f"training {what} before its first checkpoint was complete ({run_dir}): nothing to resume"
    return _resume_hint(f"training {what}; last complete checkpoint: {last}", "train", overrides, resume_from=str(last))


def _sweep_resume_hint(cfg: Config, overrides: list[str], *, unfinished: int | None) -> str:
    """Where an interrupted sweep got to, and the exact command that continues it."""
    from sftray.layout import trial_runs_dir
    from sftray.train.resume import last_checkpoint

    last = last_checkpoint(trial_runs_dir(cfg.paths.output_dir, cfg.sweep.name))
    count = f" with {unfinished} unfinished trial(s)" if unfinished else ""
    where = f"last complete trial checkpoint: {last}" if last else "no trial checkpoint was complete yet"
    return _resume_hint(
        f"sweep '{cfg.sweep.name}' interrupted{count}; {where}",
        "sweep",
        overrides,
        note="(finished trials are kept; unfinished ones continue from their last checkpoint)",
    )


def _resume_hint(status: str, command: str, overrides: list[str], *, resume_from: str = "", note: str = "") -> str:
    """``status``, then the exact command that continues an unfinished ``sftray train`` (from ``resume_from``: a
    checkpoint or a chain folder) or ``sftray sweep`` (``sweep.resume=true``), as ``sftray`` and as ``make``; the
    user's own overrides kept, an earlier resume key replaced."""
    import shlex

    key, value = ("train.resume_from", resume_from) if command == "train" else ("sweep.resume", "true")
    kept = [o for o in overrides if not o.lstrip("+").startswith(f"{key}=")]
    argv = [*kept, f"{key}={value}"]
    make_args = shlex.quote(shlex.join(argv))
    if command == "train":  # the Makefile's train target takes the checkpoint as its own resume_from variable
        make_args = f"{shlex.quote(shlex.join(kept))} resume_from={shlex.quote(value)}"
    lines = [
        status,
        f"resume with:  sftray {command} {shlex.join(argv)}",
        f"         or:  make {command} ARGS={make_args}",
    ]
    return "\n".join(lines + ([note] if note else []))


def _pretrain(cfg: Config, *, force: bool, steps: int | None) -> int:
    """Builds (or reuses) the builtin base model in paths.cache_dir and prints where it is and how well it learned;
    ``steps``: the build's optimizer steps (None: the full build). A cached base of another size is kept unless
    ``force``: every later run trains from the cached one, so replacing it is the user's explicit choice."""
    import json
    import shutil

    from sftray.models.pretrain import REPORT_NAME, TINY_MODEL_DIRNAME, ensure_tiny_model

    cache_dir = Path(cfg.paths.cache_dir)
    folder = cache_dir / TINY_MODEL_DIRNAME
    if force:
        shutil.rmtree(folder, ignore_errors=True)
    elif steps is not None and (folder / REPORT_NAME).is_file():
        built = json.loads((folder / REPORT_NAME).read_text())["steps"]
        if built != steps:
            raise ConfigError(
                f"the cached base {folder} was built with {built} steps: add --force to rebuild it with steps={steps}"
            )
    path = ensure_tiny_model(cache_dir, **({"steps": steps} if steps is not None else {}))
    report = json.loads((path / REPORT_NAME).read_text())
    print(f"tiny-llama base model: {path}")
    print(
        f"  {report['steps']} steps, {report['tokens_seen']:,} tokens, {report['seconds']:.0f} s\n"
        f"  train loss {report['train_loss']:.3f}   held-out loss {report['heldout_loss']:.3f}   "
        f"unigram baseline {report['unigram_loss']:.3f}  (nats/token)"
    )
    return 0


def _take_count(overrides: list[str], name: str, *, default: int | None) -> int | None:
    """Removes a command's own ``name=N`` option (not a config key) from ``overrides`` and returns N (>= 1)."""
    value = default
    for a in [a for a in overrides if a.startswith(f"{name}=")]:
        if not re.fullmatch(rf"{name}=-?\d+", a) or int(a.split("=")[1]) < 1:
            raise ConfigError(f"{a} must be >= 1")
        value = int(a.split("=")[1])
        overrides.remove(a)
    return value


def _check_flags(flags: set[str], valid: set[str]) -> None:
    unknown = flags - valid
    if unknown:
        raise ConfigError(f"unknown flag(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(valid)) or 'none'}")


if __name__ == "__main__":
    sys.exit(main())
