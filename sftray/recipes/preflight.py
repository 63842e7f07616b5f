"""Pre-flight: everything checkable from the config and the files, checked before Ray starts.

A mistake found here costs seconds and one line; found in Ray it cost minutes (a LoRA target that matches no
module: a worker group started, failed, was restarted by ``train.max_failures`` and failed again). Checked: the
data, validation and mix sources resolve to readable files; the probe file exists; there is a validation split;
the base model's config is readable; and its LoRA targets name modules of the model, matched by peft itself on a
weightless (meta-device) skeleton built from the model's config, the builtin's from ``tiny_llama_config`` (no
pretraining). A multi-stage run checks every stage's config, a sweep every trial's keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftray.config import Config, LoraConfig, ModelConfig, override, stage_config
from sftray.data.probe_file import probe_file
from sftray.data.sources import resolve_source
from sftray.eval.probes import check_probe_file


def check_inputs(cfg: Config, *, train: bool, sweep: bool = False) -> None:
    """Raises a one-line ``ValueError`` / ``FileNotFoundError`` naming the key for the first input that cannot work.
    ``train``: the command trains (sftray train / sweep), so the model and its LoRA targets are checked too;
    ``sweep``: also each value of ``sweep.params`` and each ``sweep.points`` entry that sets data, mix, model or
    train keys (one trial's config each)."""
    skeletons: dict[tuple[str, bool], Any] = {}
    _check_one(cfg, train=train, skeletons=skeletons)
    if not sweep:
        return
    variants = [
        (f"sweep.params.{key}={value!r}: ", {key: value})
        for key, values in cfg.sweep.params.items()
        for value in values
    ] + [(f"sweep.points[{i}]: ", point) for i, point in enumerate(cfg.sweep.points)]
    for where, keys in variants:
        if any(k.split(".", 1)[0] in _TRIAL_INPUTS for k in keys):
            trial = cfg
            for key, value in keys.items():
                trial = override(trial, key, value)
            _check_with_prefix(where, _check_one, trial, train=train, skeletons=skeletons)


_TRIAL_INPUTS = ("data", "mix", "model", "train", "stages")
"""Config groups whose keys a sweep trial may set that this module checks."""


def _check_one(cfg: Config, *, train: bool, skeletons: dict[tuple[str, bool], Any]) -> None:
    configs = (
        [("", cfg)]
        if not cfg.stages
        else [(f"stages[{k}] ({s.name}): ", stage_config(cfg, k)) for k, s in enumerate(cfg.stages)]
    )
    for where, c in configs:
        _check_with_prefix(where, check_data, c)
    if not train:
        return
    check_model_path(cfg.model)
    if cfg.train.resume_from and not Path(cfg.train.resume_from).is_dir():
        raise FileNotFoundError(f"train.resume_from={cfg.train.resume_from}: no such folder")
    for k, (where, c) in enumerate(configs):
        if c.train.method != "lora" or (k > 0 and _continues_adapter(cfg, k)):
            continue  # a stage that trains the earlier stage's adapter on uses that adapter's targets
        key = (cfg.model.name_or_path, cfg.model.trust_remote_code)
        if key not in skeletons:
            skeletons[key] = model_skeleton(cfg.model)
        _check_with_prefix(where, check_lora_targets, c.train.lora, model=skeletons[key], name=cfg.model.name_or_path)


def check_data(cfg: Config) -> None:
    """Sources resolve (files exist, formats detect), the probe file exists, and a validation split will exist."""
    cache_dir = Path(cfg.paths.cache_dir)
    if cfg.data.val_fraction == 0 and not cfg.data.val_sources:
        raise ValueError(
            "data.val_fraction=0 and no data.val_sources: there would be no validation conversations, and "
            "checkpoints are chosen by eval; set data.val_fraction (e.g. 0.05) or give data.val_sources"
        )
    for key, sources, text in (
        ("data.sources", cfg.data.sources, False),
        ("data.val_sources", cfg.data.val_sources, False),
        ("mix.sources", cfg.mix.sources, True),
        ("mix.heldout_sources", cfg.mix.heldout_sources, True),
    ):
        for i, src in enumerate(sources):
            resolve_source(src, cache_dir=cache_dir, what=f"{key}[{i}]", text=text)
    probe_file(cfg.data, cache_dir=cache_dir)  # exists and is readable, whether eval or only dedup reads it
    check_probe_file(cfg)  # every line parses (columns mapped), and eval.answer_pattern finds reference answers


def check_model_path(model: ModelConfig) -> None:
    """The base model's config is readable: a local folder with config.json, or a hub id the hub answers."""
    from sftray.models.loading import BUILTIN_TINY

    name = model.name_or_path
    if name == BUILTIN_TINY:
        return
    _model_config(model)


def model_skeleton(model: ModelConfig) -> Any:
    """The base model's modules without weights (meta device): built from its config in a second or so."""
    import torch
    from transformers import AutoModelForCausalLM

    from sftray.models.loading import BUILTIN_TINY
    from sftray.models.tiny import tiny_llama_config

    if model.name_or_path == BUILTIN_TINY:
        config = tiny_llama_config(vocab_size=4096)  # module names do not depend on the vocabulary
    else:
        config = _model_config(model)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code)


def check_lora_targets(lora: LoraConfig, *, model: Any, name: str) -> None:
    """Each of ``train.lora.target_modules`` matches a module of ``model`` as peft matches it (a list entry matches
    a module whose name is it or ends in ``.<it>``), and peft wraps the model with them: a target that matches
    nothing fails here, naming it and the model's linear layers (peft itself fails only when none matches)."""
    import copy
    import warnings

    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from sftray.models.lora import apply_lora

    targets = list(lora.target_modules)
    key = f"train.lora.target_modules={targets}"
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    hint = f"its linear layers are named: {', '.join(linear)} (or use [all-linear])"
    if targets != ["all-linear"]:
        modules = [(n, m) for n, m in model.named_modules() if n]
        for target in targets:
            probe = PeftLoraConfig(target_modules=[target])
            matched = [(n, m) for n, m in modules if check_target_module_exists(probe, n)]
            if not matched:
                raise ValueError(f"{key}: {target!r} matches no module of {name}; {hint}")
            for n, m in matched:
                if not isinstance(m, _adaptable()):
                    raise ValueError(
                        f"{key}: {target!r} matches {n} ({type(m).__name__}) of {name}, which LoRA cannot adapt "
                        f"(only Linear, Embedding and Conv layers); {hint}"
                    )
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's advice is the training run's to give, not repeated here
            apply_lora(copy.deepcopy(model), cfg=lora, new_token_ids=[])
    except ValueError as exc:  # peft's own checks (e.g. modules_to_save); its message may hold a module's repr
        message = " ".join(str(exc).split())
        message = message if len(message) <= 300 else message[:300] + " ..."
        raise ValueError(f"{key} on {name}: peft cannot wrap the model: {message}; {hint}") from None


def _adaptable() -> tuple[type, ...]:
    import torch
    from transformers.pytorch_utils import Conv1D

    nn = torch.nn
    return (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)


def _continues_adapter(cfg: Config, k: int) -> bool:
    """Whether stage ``k`` trains stage k-1's LoRA adapter on (``between_stages: continue`` after a LoRA stage)."""
    before, this = stage_config(cfg, k - 1).train, stage_config(cfg, k).train
    return before.method == "lora" and this.method == "lora" and this.lora.between_stages == "continue"


def _model_config(model: ModelConfig) -> Any:
    from transformers import AutoConfig

    name = model.name_or_path
    path = Path(name).expanduser()
    if name.startswith(("/", ".", "~")) or path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"model.name_or_path={name}: no such folder")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model.name_or_path={name}: no config.json in it (not a Hugging Face model folder)"
            )
    try:
        return AutoConfig.from_pretrained(
            str(path) if path.exists() else name, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"model.name_or_path={name}: cannot read the model's config: {first}") from None


def _check_with_prefix(where: str, check: Any, *args: Any, **kwargs: Any) -> None:
    """``check(*args, **kwargs)``, its error message prefixed with ``where`` (a stage's name)."""
    if not where:
        check(*args, **kwargs)
        return
    try:
        check(*args, **kwargs)
    except (ValueError, FileNotFoundError) as exc:
        raise (FileNotFoundError if isinstance(exc, FileNotFoundError) else ValueError)(f"{where}{exc}") from None
