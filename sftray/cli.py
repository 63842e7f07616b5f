"""Command line: the only module that sees Hydra. ``sftray <command> [key=value ...]``.

Hydra's compose API turns conf/ + overrides into the typed ``Config``; a misspelled key fails here with the
valid keys listed. Everything below receives dataclasses.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
from pathlib import Path

from sftray.config import Config, open_mappings, register_configs, schema_keys, unknown_key_message, unknown_keys
from sftray.eval.metrics import check_select_metric

USAGE = """usage: sftray COMMAND [key=value ...] [flags]

commands:
  prep      run the Ray Data pipeline: Parquet rows + data report      [--force: rebuild even if up to date]
  preview   print the first examples with trained tokens marked          [n=5: how many]
  pretrain  build the builtin tiny-llama base model (cached; minutes)    [--force: rebuild it]
  train     one training run on Ray Train: prep (cached), base model, epochs, evals, checkpoints
  sweep     a Ray Tune sweep over LR x epochs (conf/sweep), every trial tracked in MLflow
  config    print the composed configuration

overrides use Hydra syntax, e.g.  sftray prep data.max_seq_len=512 mix.ratio=0.05 data=files
"""

log = logging.getLogger("sftray")


class ConfigError(ValueError):
    """A configuration that cannot be composed or fails validation."""


def config_dir() -> Path:
    """conf/ beside the package (a source checkout), or $SFTRAY_CONF."""
    env = os.environ.get("SFTRAY_CONF")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "conf"
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in {path}; set SFTRAY_CONF to the folder holding sftray's conf/")
    return path


def compose_config(overrides: list[str], *, conf: Path | None = None, base: Path | None = None) -> Config:
    """conf/ + Hydra overrides -> a validated ``Config`` with absolute paths (relative to ``base`` or cwd)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    register_configs()
    GlobalHydra.instance().clear()
    # Below an open mapping the rest of a dotted key is one key: +sweep.params.train.lora.r=[8,16] adds the entry
    # "train.lora.r" (Hydra would nest train: {lora: {r: ...}}), as +sweep.params={train.lora.r:[8,16]} does.
    mappings = "|".join(re.escape(m) for m in open_mappings())
    overrides = [re.sub(rf"^(\+*)({mappings})\.([^=]+)=(.*)$", r"\1\2={\3:\4}", o, flags=re.S) for o in overrides]
    try:
        with initialize_config_dir(config_dir=str(Path(conf or config_dir()).resolve()), version_base="1.3"):
            composed = compose("config", overrides=overrides)
        # Hydra's +key / ++key adds keys the schema lacks, and to_object would drop them silently.
        if unknown := unknown_keys(OmegaConf.to_container(composed)):
            raise ConfigError(unknown_key_message(unknown[0]))
        cfg = OmegaConf.to_object(composed)
    except Exception as exc:  # Hydra/OmegaConf raise several types; all become one readable message
        raise ConfigError(explain_config_error(exc)) from exc
    if not isinstance(cfg, Config):
        raise ConfigError(f"conf/config.yaml did not compose to a Config (got {type(cfg).__name__})")
    try:  # a metric the run will not produce would otherwise fail only after training, in every trial
        check_select_metric(cfg.eval.select_metric, probes=cfg.eval.num_probes > 0)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return cfg.resolved_paths(base or Path.cwd())


def explain_config_error(exc: BaseException) -> str:
    """The deepest useful message of a config error, with the valid keys when a key is unknown."""
    chain, e = [], exc
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    message = str(exc).strip()
    if len(chain) > 1 and str(chain[-1]).strip() not in message:
        message = f"{message}\n  cause: {str(chain[-1]).strip()}"
    for err in chain:
        full_key = getattr(err, "full_key", None)
        object_type = getattr(err, "object_type", None)
        parent = re.sub(r"\[\d+\]", "", full_key or "").rpartition(".")[0]
        if (
            full_key
            and "not in" in str(err)
            and dataclasses.is_dataclass(object_type)
            and (schema_keys(parent) != [f.name for f in dataclasses.fields(object_type)])
        ):
            # Inside a list item, full_key is relative to the item: its own type names the valid keys, and
            # Hydra's outer message names the overridden list.
            valid = [f.name for f in dataclasses.fields(object_type)]
            outer = re.search(r"override '([\w.]+)'", str(exc))
            where = outer.group(1) if outer else object_type.__name__
            return f"unknown config key '{full_key}'. Valid keys of {where}: {', '.join(valid)}"
        if full_key and type(err).__name__ == "ValidationError":
            return f"invalid value for config key '{full_key}': {str(err).splitlines()[0]}"
        if full_key and "missing mandatory value" in str(err):
            return (
                f"config value '{full_key}' is required but not set (??? in conf/); pass {full_key.split('[')[0]}=..."
            )
        if full_key and ("not in struct" in str(err) or "Key '" in str(err)) and schema_keys(parent) is not None:
            return unknown_key_message(full_key)
    if isinstance(chain[-1], ValueError) and len(chain) > 1:
        return f"invalid configuration: {chain[-1]}"
    return message


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
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
                n = 5
                for a in [a for a in overrides if re.fullmatch(r"n=\d+", a)]:
                    n = int(a[2:])
                    overrides.remove(a)
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
                return _pretrain(compose_config(overrides), force="--force" in flags)
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
    from sftray.data.pipeline import prepare
    from sftray.data.report import summary

    init_ray()
    prepared = prepare(cfg, force=force)
    print(summary(prepared.report))
    return 0


def _train(cfg: Config, *, force: bool, overrides: list[str]) -> int:
    """prep (cached) -> base model (built on first use for the builtin) -> one Ray Train run -> summary."""
    import time

    from sftray.data.pipeline import prepare
    from sftray.models.loading import resolve_base_model_path
    from sftray.train.run import run_training, summary

    init_ray()
    prepared = prepare(cfg, force=force)
    base = resolve_base_model_path(cfg.model, cache_dir=Path(cfg.paths.cache_dir))
    name = f"train-{cfg.data.name}-{cfg.train.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = Path(cfg.paths.output_dir) / "runs"
    try:
        outcome = run_training(cfg, prepared=prepared, base_model=base, name=name, storage_path=str(storage))
    except (KeyboardInterrupt, SystemExit, Exception) as exc:
        # Train V2 turns Ctrl-C into an aborted controller (SystemExit or an actor error here). However the run
        # ends early, say where it got to and the command that goes on from there.
        from ray.exceptions import RayActorError

        interrupted = isinstance(exc, KeyboardInterrupt | SystemExit | RayActorError)
        if not interrupted:
            log.error("training failed: %s", exc)
        print(_train_resume_hint(storage / name, overrides, interrupted=interrupted), file=sys.stderr)
        return 130 if interrupted else 1
    print(summary(outcome))
    return 0


def _train_resume_hint(run_dir: Path, overrides: list[str], *, interrupted: bool) -> str:
    """Where an unfinished run got to, and the exact command that continues it."""
    import shlex

    from sftray.train.run import last_checkpoint

    what = "interrupted" if interrupted else "failed"
    last = last_checkpoint(run_dir) if run_dir.is_dir() else None
    if last is None:
        return f"training {what} before its first checkpoint was complete ({run_dir}): nothing to resume"
    kept = [o for o in overrides if not o.lstrip("+").startswith("train.resume_from=")]
    return (
        f"training {what}; last complete checkpoint: {last}\n"
        f"resume with:  sftray train {shlex.join([*kept, f'train.resume_from={last}'])}\n"
        f"         or:  make train ARGS={shlex.quote(shlex.join(kept))} resume_from={shlex.quote(str(last))}"
    )


def _sweep(cfg: Config, *, overrides: list[str]) -> int:
    """prep (cached) -> base model -> Tune trials, each a Ray Train run, tracked in MLflow -> ranked table."""
    from sftray.data.pipeline import prepare
    from sftray.models.loading import resolve_base_model_path
    from sftray.tracking import mlflow_logger, trial_callbacks
    from sftray.tune.sweep import run_sweep, search_space, table

    init_ray()
    prepared = prepare(cfg)
    base = resolve_base_model_path(cfg.model, cache_dir=Path(cfg.paths.cache_dir))
    sweep_dir = Path(cfg.paths.output_dir) / "sweeps" / cfg.sweep.name
    parent = mlflow_logger.start_parent(cfg, space=search_space(cfg), data_report=prepared.report, sweep_dir=sweep_dir)
    callbacks = trial_callbacks(cfg, parent_id=parent, data_report=prepared.report)
    try:
        outcome = run_sweep(cfg, prepared=prepared, base_model=base, callbacks=callbacks)
    except (KeyboardInterrupt, SystemExit):
        print(_sweep_resume_hint(cfg, overrides, unfinished=None), file=sys.stderr)
        return 130
    text = table(outcome)
    unfinished = [r for r in outcome.trials if r["status"] == "stopped"]
    if unfinished:  # Tune ends the loop on Ctrl-C and returns the trials as they were
        print(text)
        print(_sweep_resume_hint(cfg, overrides, unfinished=len(unfinished)), file=sys.stderr)
        return 130
    mlflow_logger.finish_parent(cfg, parent_id=parent, best=outcome.best, table_text=text)
    uri = mlflow_logger.tracking_uri(cfg)
    print(text)
    print(f"\nbrowse: make mlflow-ui MLFLOW_URI={uri}   (experiment '{cfg.sweep.name}')")
    print(
        f"report: make report SWEEP={cfg.sweep.name} MLFLOW_URI={uri}   "
        f"(HTML of analysis/sweep_report.ipynb in {cfg.paths.output_dir})"
    )
    return 0 if outcome.best else 1


def _sweep_resume_hint(cfg: Config, overrides: list[str], *, unfinished: int | None) -> str:
    """Where an interrupted sweep got to, and the exact command that continues it."""
    import shlex

    from sftray.train.run import last_checkpoint
    from sftray.tune.sweep import trial_runs_dir

    last = last_checkpoint(trial_runs_dir(cfg))
    kept = [o for o in overrides if not o.lstrip("+").startswith("sweep.resume=")]
    count = f" with {unfinished} unfinished trial(s)" if unfinished else ""
    where = f"last complete trial checkpoint: {last}" if last else "no trial checkpoint was complete yet"
    return (
        f"sweep '{cfg.sweep.name}' interrupted{count}; {where}\n"
        f"resume with:  sftray sweep {shlex.join([*kept, 'sweep.resume=true'])}\n"
        f"         or:  make sweep ARGS={shlex.quote(shlex.join([*kept, 'sweep.resume=true']))}\n"
        "(finished trials are kept; unfinished ones continue from their last checkpoint)"
    )


def _pretrain(cfg: Config, *, force: bool) -> int:
    """Builds (or reuses) the builtin base model in paths.cache_dir and prints where it is and how well it learned."""
    import json
    import shutil

    from sftray.models.pretrain import REPORT_NAME, TINY_MODEL_DIRNAME, ensure_tiny_model

    cache_dir = Path(cfg.paths.cache_dir)
    if force:
        shutil.rmtree(cache_dir / TINY_MODEL_DIRNAME, ignore_errors=True)
    path = ensure_tiny_model(cache_dir)
    report = json.loads((path / REPORT_NAME).read_text())
    print(f"tiny-llama base model: {path}")
    print(
        f"  {report['steps']} steps, {report['tokens_seen']:,} tokens, {report['seconds']:.0f} s\n"
        f"  train loss {report['train_loss']:.3f}   held-out loss {report['heldout_loss']:.3f}   "
        f"unigram baseline {report['unigram_loss']:.3f}  (nats/token)"
    )
    return 0


def _check_flags(flags: set[str], valid: set[str]) -> None:
    unknown = flags - valid
    if unknown:
        raise ConfigError(f"unknown flag(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(valid)) or 'none'}")


if __name__ == "__main__":
    sys.exit(main())
