"""Config composition: every shipped conf/ option, typo and validation messages, documented knobs."""

from __future__ import annotations

import dataclasses
import functools
import re
import shutil
import typing
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import yaml

from sftray.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    PathsConfig,
    SourceConfig,
    StageConfig,
    compose_config,
    override,
    schema_keys,
    stage_config,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
YAMLS = sorted(CONF.rglob("*.yaml"))
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
DATA_KEYS = [f.name for f in dataclasses.fields(DataConfig)]
ROOT_KEYS = ", ".join(f.name for f in dataclasses.fields(Config))

main = entry_points(group="console_scripts")["sftray"].load()  # the `sftray` command, as the shell runs it


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SFTRAY_OUTPUT", "SFTRAY_CACHE", "SFTRAY_DATA", "SFTRAY_CONF"):
        monkeypatch.delenv(var, raising=False)


def compose(overrides: list[str], base: Path, conf: Path = CONF) -> Config:
    return compose_config(overrides, conf=conf, base=base)


def compose_error(overrides: list[str], base: Path, conf: Path = CONF) -> str:
    with pytest.raises(ConfigError) as info:
        compose(overrides, base, conf)
    return str(info.value)


# --- every shipped option ---------------------------------------------------------------------------------------------

CHATS = "/data/chats.jsonl"  # data=files takes its source from SFTRAY_DATA here
PYDOC = [SourceConfig(path="builtin:pydoc_topics", format="text", text_field="text")]
OPTION_OVERRIDES = {("model", "hf"): ["model.name_or_path=org/model"]}  # a required key
DEMO_JSON_STAGE = StageConfig(
    name="json",
    data={"name": "demo-json", "sources": [{"path": "builtin:demo-json"}], "probes": "builtin:demo-json-heldout"},
    train={"lora": {"between_stages": "merge"}},
)
OPTION_VALUES: dict[tuple[str, str], dict[str, Any]] = {
    ("data", "demo"): {
        "data.name": "demo",
        "data.max_seq_len": 256,
        "data.sources": [SourceConfig(path="builtin:demo", format="auto")],
        "data.probes": "builtin:demo-heldout",
        "data.val_sources": [],
        "data.val_fraction": 0.05,
        "data.system_prompt": None,
        "data.prune.drop_highest": 0.0,  # pruning is off unless asked for
        "data.prune.model": None,
    },
    ("data", "files"): {  # as demo but for name, sources, max_seq_len and probes
        "data.name": "files",
        "data.max_seq_len": 1024,
        "data.sources": [SourceConfig(path=CHATS, format="auto")],
        "data.probes": None,
        "data.val_fraction": 0.05,
        "data.packing": True,
        "data.train_on": "all_assistant",
        "data.on_error": "raise",
        "data.overlength": "drop",
    },
    ("eval", "default"): {
        "eval.select_metric": "eval/format_compliance",
        "eval.forgetting_budget": 0.05,
        "eval.num_probes": 64,
    },
    ("mix", "pydoc"): {"mix.ratio": 0.1, "mix.sources": PYDOC, "mix.window_len": None},
    ("mix", "none"): {"mix.ratio": 0.0, "mix.sources": PYDOC},  # the corpus stays: forgetting is still measured
    ("model", "hf"): {"model.name_or_path": "org/model", "model.trust_remote_code": False},
    ("model", "tiny"): {"model.name_or_path": "builtin:tiny-llama", "model.chat_template": None},
    ("sweep", "demo"): {"sweep.name": "demo", "sweep.lr.values": [2e-3, 5e-3], "sweep.epochs": [4]},
    ("sweep", "forgetting"): {
        "sweep.name": "forgetting",
        "sweep.lr.values": [],
        "sweep.params": {"mix.ratio": [0.0, 0.05, 0.2]},
        "sweep.points": [{"train.method": "lora", "train.lr": 5e-3}, {"train.method": "full", "train.lr": 1e-3}],
    },
    ("stages", "demo_two_stage"): {"stages": [StageConfig(name="chat"), DEMO_JSON_STAGE]},
    ("tracking", "mlflow"): {"tracking.uri": None, "tracking.wandb.enabled": False},
    ("train", "full"): {  # as lora but for method and lr
        "train.method": "full",
        "train.lr": 1e-4,
        "train.epochs": 2,
        "train.lora.r": 16,
    },
    ("train", "lora"): {"train.method": "lora", "train.lr": 5e-3, "train.epochs": 2, "train.lora.r": 16},
}
"""A few values each shipped option sets (itself or through its group's defaults), as the docs promise."""


def _options() -> list[tuple[str, str]]:
    return [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def test_every_shipped_option_has_values_to_check() -> None:
    assert sorted(OPTION_VALUES) == _options()


@pytest.mark.parametrize(("group", "option"), sorted(OPTION_VALUES), ids=lambda x: str(x))
def test_every_shipped_option_composes_with_its_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group: str, option: str
) -> None:
    """Each option of each group, alone through the real compose_config: its values, the rest at the defaults."""
    monkeypatch.setenv("SFTRAY_DATA", CHATS)
    cfg = compose([f"{group}={option}", *OPTION_OVERRIDES.get((group, option), [])], tmp_path)
    expected = OPTION_VALUES[group, option]
    assert {key: functools.reduce(getattr, key.split("."), cfg) for key in expected} == expected
    defaults = compose([], tmp_path)
    assert [getattr(cfg, g) for g in GROUPS if g != group] == [getattr(defaults, g) for g in GROUPS if g != group]


def test_root_values(tmp_path: Path) -> None:
    cfg = compose([], tmp_path)
    assert type(cfg) is Config and cfg.seed == 0
    assert cfg.paths == PathsConfig(
        output_dir=str(tmp_path / "outputs"), cache_dir=str(Path("~/.cache/sftray").expanduser())
    )
    assert cfg.mix.window_len is None and cfg.window_len == cfg.data.max_seq_len  # null = data.max_seq_len


def test_defaults_without_overrides(tmp_path: Path) -> None:
    assert compose([], tmp_path) == compose(["model=tiny", "data=demo", "mix=pydoc"], tmp_path)


def test_paths_from_env_resolved_against_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFTRAY_OUTPUT", "rel/out")
    monkeypatch.setenv("SFTRAY_CACHE", "/abs/cache")
    cfg = compose([], tmp_path / "base")
    assert cfg.paths == PathsConfig(output_dir=str(tmp_path / "base/rel/out"), cache_dir="/abs/cache")
    cfg = compose(["paths.cache_dir=c", "paths.output_dir=/o"], tmp_path)
    assert cfg.paths == PathsConfig(output_dir="/o", cache_dir=str(tmp_path / "c"))


def test_overrides_apply_and_are_typed(tmp_path: Path) -> None:
    cfg = compose(
        ["data.max_seq_len=128", "mix.ratio=0.05", "data.packing=false", "seed=7", "data.system_prompt=Be brief."],
        tmp_path,
    )
    assert (cfg.data.max_seq_len, cfg.mix.ratio, cfg.data.packing, cfg.seed) == (128, 0.05, False, 7)
    assert cfg.data.system_prompt == "Be brief."


def test_files_sources_by_override(tmp_path: Path) -> None:
    path = tmp_path / "my chats" / "a.jsonl"
    cfg = compose(["data=files", f"data.sources=[{{path:{path},format:sharegpt}}]"], tmp_path)
    assert cfg.data.sources == [SourceConfig(path=str(path), format="sharegpt")]


def test_relative_conf_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CONF.parent)
    assert compose_config([], conf=Path("conf"), base=tmp_path).data.name == "demo"


# --- typos and invalid values ---------------------------------------------------------------------------------------


def test_typo_in_data_lists_valid_keys(tmp_path: Path) -> None:
    msg = compose_error(["data.max_seqlen=3"], tmp_path)
    assert msg == f"unknown config key 'data.max_seqlen'. Valid keys of data: {', '.join(DATA_KEYS)}"
    for key in ("max_seq_len", "packing", "sources", "on_error"):
        assert key in msg


def test_typo_at_root_lists_root_keys(tmp_path: Path) -> None:
    assert compose_error(["sed=1"], tmp_path) == f"unknown config key 'sed'. Valid keys of the root: {ROOT_KEYS}"


@pytest.mark.parametrize(
    ("override", "group", "keys"),
    [
        ("model.nme=x", "model", "name_or_path, trust_remote_code, chat_template, special_tokens"),
        ("paths.out=x", "paths", "output_dir, cache_dir"),
        (
            "mix.rato=0.2",
            "mix",
            "ratio, sources, heldout_sources, window_len, heldout_fraction, max_heldout_windows, max_repeats",
        ),
    ],
)
def test_typo_in_other_groups(tmp_path: Path, override: str, group: str, keys: str) -> None:
    key = override.split("=")[0]
    assert compose_error([override], tmp_path) == f"unknown config key '{key}'. Valid keys of {group}: {keys}"


def _conf_with_line(tmp_path: Path, rel: str, line: str) -> Path:
    """A copy of conf/ with ``line`` appended to the file ``rel``."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    f = conf / rel
    f.write_text(f.read_text().rstrip("\n") + f"\n{line}\n")
    return conf


def test_typo_inside_yaml_group(tmp_path: Path) -> None:
    conf = _conf_with_line(tmp_path, "data/demo.yaml", "max_seqlen: 256  # tokens per training row")
    msg = compose_error([], tmp_path, conf)
    assert msg == f"unknown config key 'data.max_seqlen'. Valid keys of data: {', '.join(DATA_KEYS)}"


def test_typo_inside_yaml_root(tmp_path: Path) -> None:
    conf = _conf_with_line(tmp_path, "config.yaml", "sead: 0  # seeds every shuffle")
    assert compose_error([], tmp_path, conf) == f"unknown config key 'sead'. Valid keys of the root: {ROOT_KEYS}"


SOURCE_KEYS = "path, format, split, subset, text_field"


def test_typo_inside_source_item(tmp_path: Path) -> None:
    msg = compose_error(["data.sources=[{path:/x.jsonl,formt:auto}]"], tmp_path)
    assert "'formt'" in msg and f"Valid keys of data.sources: {SOURCE_KEYS}" in msg


def test_wrong_type_names_key(tmp_path: Path) -> None:
    assert "data.max_seq_len" in compose_error(["data.max_seq_len=abc"], tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.on_error=ignore", "data.on_error='ignore' is not valid; choose one of: raise, drop"),
        ("data.overlength=cut", "data.overlength='cut' is not valid; choose one of: drop, truncate"),
        (
            "data.train_on=everything",
            "data.train_on='everything' is not valid; choose one of: all_assistant, last_assistant, all",
        ),
        ("mix.ratio=1.5", "mix.ratio=1.5 must be in [0, 1)"),
        ("mix.ratio=1", "mix.ratio=1.0 must be in [0, 1)"),
        ("mix.ratio=-0.1", "mix.ratio=-0.1 must be in [0, 1)"),
        ("data.val_fraction=1", "data.val_fraction=1.0 must be in [0, 1)"),
        ("data.max_seq_len=4", "data.max_seq_len=4 must be >= 8"),
        ("mix.window_len=2", "mix.window_len=2 must be >= 8"),
        ("data.sources=[]", "data.sources is empty: give at least one source"),
        ("data.dedup=fuzzy", "data.dedup='fuzzy' is not valid; choose one of: none, exact, near"),
        ("train.precision=fp16", "train.precision='fp16' is not valid; choose one of: auto, fp32, bf16"),
        ("tracking.log_model=last", "tracking.log_model='last' is not valid; choose one of: best, none, all"),
        ("data.sources=[{path:/x.jsonl,weight:0}]", "data.sources[0].weight=0.0 must be > 0"),
        ("data.sources=[{path:/x.jsonl,max_rows:0}]", "data.sources[0].max_rows=0 must be >= 1"),
        (
            "mix.sources=[{path:/x.txt,weight:2}]",
            "mix.sources[0].weight=2.0: weight applies to data.sources (training conversations) only; remove it here",
        ),
        (
            "mix.heldout_sources=[{path:'builtin:pydoc_topics'}]",
            "mix.heldout_sources[0].path='builtin:pydoc_topics' is also in mix.sources: held-out text must never be "
            "mixed into training; remove it from one of them",
        ),
        (
            "data.val_sources=[{path:/v.jsonl,max_rows:10}]",
            "data.val_sources[0].max_rows=10: max_rows applies to data.sources (training conversations) only; "
            "remove it here",
        ),
    ],
)
def test_invalid_values(tmp_path: Path, override: str, message: str) -> None:
    # the ValueError of the dataclass's __post_init__ is the whole message: it names the key and the valid values
    assert compose_error([override], tmp_path) == message


OUT_OF_RANGE = [
    ("seed=-1", "seed=-1 must be >= 0"),
    ("train.seed=-1", "train.seed=-1 must be >= 0"),
    ("sweep.seeds=[0,-2]", "sweep.seeds[1]=-2 must be >= 0"),
    ("data.val_fraction=-0.1", "data.val_fraction=-0.1 must be in [0, 1)"),
    ("data.max_seq_len=7", "data.max_seq_len=7 must be >= 8"),
    ("data.pack_group_size=0", "data.pack_group_size=0 must be >= 1"),
    ("data.num_encoders=0", "data.num_encoders=0 must be >= 1"),
    ("data.cpus_per_encoder=0", "data.cpus_per_encoder=0.0 must be > 0"),
    ("data.near_threshold=0", "data.near_threshold=0.0 must be in (0, 1)"),
    ("data.near_threshold=1", "data.near_threshold=1.0 must be in (0, 1)"),
    ("data.minhash_perm=15", "data.minhash_perm=15 must be >= 16"),
    ("data.shingle_words=0", "data.shingle_words=0 must be >= 1"),
    ("data.min_assistant_tokens=-1", "data.min_assistant_tokens=-1 must be >= 0"),
    ("data.max_assistant_tokens=0", "data.max_assistant_tokens=0 must be >= 1"),
    ("data.min_assistant_tokens=8 data.max_assistant_tokens=7", "data.max_assistant_tokens=7 must be >= 8"),
    ("data.max_turns=0", "data.max_turns=0 must be >= 1"),
    ("data.min_assistant_ratio=-0.5", "data.min_assistant_ratio=-0.5 must be >= 0"),
    ("data.prune.drop_highest=1", "data.prune.drop_highest=1.0 must be in [0, 1)"),
    ("data.prune.drop_lowest=-0.1", "data.prune.drop_lowest=-0.1 must be in [0, 1)"),
    (
        "data.prune.drop_highest=0.6 data.prune.drop_lowest=0.4",
        "data.prune.drop_highest=0.6 + data.prune.drop_lowest=0.4 must be < 1: together they would drop every "
        "training conversation",
    ),
    ("data.prune.batch_size=0", "data.prune.batch_size=0 must be >= 1"),
    ("data.prune.num_scorers=0", "data.prune.num_scorers=0 must be >= 1"),
    ("data.prune.num_gpus_per_scorer=-1", "data.prune.num_gpus_per_scorer=-1.0 must be >= 0"),
    ("data.prune.cpus_per_scorer=0", "data.prune.cpus_per_scorer=0.0 must be > 0"),
    ("mix.ratio=1", "mix.ratio=1.0 must be in [0, 1)"),
    ("mix.window_len=7", "mix.window_len=7 must be >= 8"),
    ("mix.heldout_fraction=1", "mix.heldout_fraction=1.0 must be in [0, 1)"),
    ("mix.max_heldout_windows=0", "mix.max_heldout_windows=0 must be >= 1"),
    ("mix.max_repeats=0", "mix.max_repeats=0 must be >= 1"),
    ("train.lora.r=0", "train.lora.r=0 must be >= 1"),
    ("train.lora.alpha=0", "train.lora.alpha=0 must be > 0"),
    ("train.lora.dropout=1", "train.lora.dropout=1.0 must be in [0, 1)"),
    ("train.lora.dropout=-0.1", "train.lora.dropout=-0.1 must be in [0, 1)"),
    ("train.num_workers=0", "train.num_workers=0 must be >= 1"),
    ("train.cpus_per_worker=0", "train.cpus_per_worker=0.0 must be > 0"),
    ("train.epochs=0", "train.epochs=0 must be >= 1"),
    ("train.lr=0", "train.lr=0.0 must be > 0"),
    ("train.weight_decay=-0.01", "train.weight_decay=-0.01 must be >= 0"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio=1.5 must be in [0, 1]"),
    ("train.max_grad_norm=-1", "train.max_grad_norm=-1.0 must be >= 0"),
    ("train.micro_batch_size=0", "train.micro_batch_size=0 must be >= 1"),
    ("train.grad_accum=0", "train.grad_accum=0 must be >= 1"),
    ("train.neftune_alpha=-5", "train.neftune_alpha=-5.0 must be >= 0"),
    ("train.eval_every_steps=-1", "train.eval_every_steps=-1 must be >= 0"),
    ("train.max_failures=-5", "train.max_failures=-5 must be >= -1"),
    ("train.log_every_steps=0", "train.log_every_steps=0 must be >= 1"),
    ("train.fail_at_step=0", "train.fail_at_step=0 must be >= 1"),
    ("tracking.log_every_steps=0", "tracking.log_every_steps=0 must be >= 1"),
    ("eval.num_probes=-1", "eval.num_probes=-1 must be >= 0"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens=0 must be >= 1"),
    ("eval.max_new_tokens_cap=0", "eval.max_new_tokens_cap=0 must be >= 1"),
    ("eval.forgetting_budget=-1", "eval.forgetting_budget=-1.0 must be >= 0"),
    ("eval.max_eval_rows=0", "eval.max_eval_rows=0 must be >= 1"),
    ("sweep.lr.values=[1e-3,0]", "sweep.lr.values[1]=0.0 must be > 0"),
    ("sweep.lr.values=[] sweep.lr.low=0 sweep.lr.high=1e-3", "sweep.lr.low=0.0 must be > 0"),
    ("sweep.lr.values=[] sweep.lr.low=1e-3 sweep.lr.high=1e-4", "sweep.lr.high=0.0001 must be > 0.001"),
    ("sweep.epochs=[1,0]", "sweep.epochs[1]=0 must be >= 1"),
    ("sweep.num_samples=0", "sweep.num_samples=0 must be >= 1"),
    ("sweep.max_concurrent_trials=0", "sweep.max_concurrent_trials=0 must be >= 1"),
]


@pytest.mark.parametrize(("overrides", "message"), OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_out_of_range_values(tmp_path: Path, overrides: str, message: str) -> None:
    """Each message names the key, the value given and the allowed range."""
    assert compose_error(overrides.split(" "), tmp_path) == message


def _numeric_keys(cls: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every int/float field (optional ones and lists of numbers included) below ``cls``."""
    out = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        kinds = {a for a in typing.get_args(hint) if a is not type(None)} or {hint}
        if typing.get_origin(hint) is list:
            kinds = set(typing.get_args(hint))
        if dataclasses.is_dataclass(hint):
            out += _numeric_keys(hint, f"{prefix}{f.name}.")
        elif kinds and kinds <= {int, float}:
            out.append(f"{prefix}{f.name}")
    return out


def test_every_numeric_knob_has_a_range_check() -> None:
    checked = {re.sub(r"\[\d+\]$", "", message.split("=")[0]) for _, message in OUT_OF_RANGE}
    numeric = set(_numeric_keys(Config))
    assert {"train.lora.r", "train.max_failures", "sweep.epochs", "sweep.lr.low", "seed"} <= numeric
    assert numeric <= checked, f"numeric knobs without a range check: {sorted(numeric - checked)}"


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.max_failures=-1", "train.lora.dropout=0", "train.warmup_ratio=1", "train.max_grad_norm=0"],
        ["eval.num_probes=0", "eval.select_metric=val/loss", "eval.forgetting_budget=0", "mix.ratio=0", "seed=0"],
        ["train.fail_at_step=1", "train.eval_every_steps=0", "data.val_fraction=0", "mix.heldout_fraction=0"],
        ["sweep.lr.values=[]", "sweep.lr.low=1e-5", "sweep.lr.high=1e-3", "sweep.max_concurrent_trials=1"],
        ["data.dedup=near", "data.near_threshold=0.99", "data.minhash_perm=16", "data.shingle_words=1"],
        [
            "data.min_assistant_tokens=5",
            "data.max_assistant_tokens=5",
            "data.max_turns=1",
            "data.min_assistant_ratio=0",
        ],
        ["data.sources=[{path:/x.jsonl,weight:0.01,max_rows:1},{path:/y.jsonl,weight:3}]", "data.dedup=exact"],
        [
            "data.prune.drop_highest=0.6",
            "data.prune.drop_lowest=0.39",
            "data.prune.batch_size=1",
            "data.prune.num_scorers=1",
            "data.prune.num_gpus_per_scorer=0",
            "data.prune.cpus_per_scorer=0.25",
        ],
    ],
)
def test_range_edges_are_accepted(tmp_path: Path, overrides: list[str]) -> None:
    compose(overrides, tmp_path)


def test_unknown_group_option_lists_available(tmp_path: Path) -> None:
    msg = compose_error(["data=nope"], tmp_path)
    assert "Could not find 'data/nope'" in msg
    assert "Available options in 'data':\n\tdemo\n\tfiles" in msg
    assert "Available options in 'mix':\n\tnone\n\tpydoc" in compose_error(["mix=nope"], tmp_path)


def test_files_without_source_says_what_is_required(tmp_path: Path) -> None:
    assert compose_error(["data=files"], tmp_path) == (
        "config value 'data.sources[0].path' is required but not set (??? in conf/); pass data.sources=..."
    )


def test_hf_model_requires_name(tmp_path: Path) -> None:
    assert "model.name_or_path" in compose_error(["model=hf"], tmp_path)


def test_hf_model_with_name(tmp_path: Path) -> None:
    cfg = compose(["model=hf", "model.name_or_path=org/model"], tmp_path)
    assert cfg.model == ModelConfig(name_or_path="org/model")


# --- the shipped YAML itself ---------------------------------------------------------------------------------------

_KNOB = re.compile(r"^\s*(?:-\s+)?([A-Za-z_]\w*):(.*)$")


def _knob_lines(path: Path) -> list[tuple[int, str, str]]:
    """(line number, key, line) of every line setting a key to a value, outside the defaults list."""
    out, in_defaults = [], False
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not line[0].isspace() and not stripped.startswith("-"):
            in_defaults = stripped.startswith("defaults:")
        if in_defaults:
            continue
        m = _KNOB.match(line)
        if m and m.group(2).split("#")[0].strip():
            out.append((n, m.group(1), line))
    return out


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(CONF)))
def test_every_knob_has_a_comment(path: Path) -> None:
    knobs = _knob_lines(path)  # none when the file sets no value (test_knob_parser_sees_undocumented_lines)
    undocumented = [f"{path.name}:{n}: {line}" for n, _, line in knobs if not re.search(r" # \S", line)]
    assert not undocumented, "\n".join(undocumented)


def test_knob_parser_sees_undocumented_lines(tmp_path: Path) -> None:
    f = tmp_path / "x.yaml"
    f.write_text("defaults:\n  - a\n  - _self_\nratio: 0.1\nsources:  # doc\n  - path: x  # doc\n    split: y\n")
    assert [(n, k) for n, k, line in _knob_lines(f) if " # " not in line] == [(4, "ratio"), (7, "split")]


def _yaml_keys(node: object, prefix: str, *, top: bool = True) -> list[tuple[str, str]]:
    """(schema path, key) for every key in a parsed YAML node (lists of dicts use the list's own path)."""
    out: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "defaults" and top:
                continue
            out.append((prefix, key))
            out.extend(_yaml_keys(value, f"{prefix}.{key}".lstrip("."), top=False))
    elif isinstance(node, list):
        for item in node:
            out.extend(_yaml_keys(item, prefix, top=False))
    return out


def _is_field(path: str) -> bool:
    parent, _, name = path.rpartition(".")
    return name in (schema_keys(parent) or [])


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(CONF)))
def test_every_yaml_key_is_in_the_schema(path: Path) -> None:
    rel = path.relative_to(CONF)
    group = "" if len(rel.parts) == 1 or path.read_text().startswith("# @package _global_") else rel.parts[0]
    assert schema_keys(group) is not None, f"conf/{rel.parts[0]}/ is not a Config field"
    keys = _yaml_keys(yaml.safe_load(path.read_text()), group)
    # Keys inside an open mapping (a schema field that is a dict, e.g. sweep.params, or a list of dicts, e.g.
    # sweep.points) are data, not schema: dotted config keys that the sweep checks when it builds its space.
    open_fields = {w for w, _ in keys if schema_keys(w) is None and _is_field(w)}
    keys = [(w, k) for w, k in keys if not any(w == f or w.startswith(f + ".") for f in open_fields)]
    unknown = [f"{where or 'root'}.{key}" for where, key in keys if key not in (schema_keys(where) or [])]
    assert not unknown, f"{rel}: keys not in the schema: {unknown}"


def test_schema_keys() -> None:
    assert schema_keys("") == [f.name for f in dataclasses.fields(Config)]
    assert {"seed", "model", "data", "mix", "paths"} <= set(schema_keys(""))
    assert set(GROUPS) <= set(schema_keys(""))
    assert schema_keys("data") == DATA_KEYS
    assert schema_keys("data.sources") == [f.name for f in dataclasses.fields(SourceConfig)]
    assert schema_keys("data.sources")[:5] == ["path", "format", "split", "subset", "text_field"]
    assert schema_keys("mix.sources") == schema_keys("data.sources")
    assert schema_keys("data.max_seq_len") is None
    assert schema_keys("nope") is None


# --- multi-stage ------------------------------------------------------------------------------------------------------


def test_a_stage_is_the_run_config_plus_its_overrides(tmp_path: Path) -> None:
    cfg = compose(["stages=demo_two_stage", "train.lr=2e-3", "stages.1.train.lr=1e-4"], tmp_path)
    first, second = stage_config(cfg, 0), stage_config(cfg, 1)
    assert first.train.lr == 2e-3 and first.data == cfg.data and first.stages == []
    assert second.train.lr == 1e-4 and second.train.epochs == cfg.train.epochs  # the rest is the run's own
    assert second.data.sources == [SourceConfig(path="builtin:demo-json")] and second.data.max_seq_len == 256
    assert second.data.probes == "builtin:demo-json-heldout" and second.mix == cfg.mix
    # a key the stage file does not set is set the same way, nested keys too
    cfg = compose(["stages=demo_two_stage", "stages.0.train.lora.r=4", "stages.1.eval.num_probes=8"], tmp_path)
    assert stage_config(cfg, 0).train.lora.r == 4 and stage_config(cfg, 1).train.lora.r == cfg.train.lora.r
    assert stage_config(cfg, 1).eval.num_probes == 8


def test_a_stage_key_is_swept_like_any_key(tmp_path: Path) -> None:
    cfg = compose(["stages=demo_two_stage"], tmp_path)
    swept = override(cfg, "stages.1.train.lr", 3e-4)
    assert stage_config(swept, 1).train.lr == 3e-4 and stage_config(cfg, 1).train.lr == cfg.train.lr
    assert stage_config(override(cfg, "stages.1.train.lora.r", 4), 1).train.lora.r == 4
    with pytest.raises(ValueError, match="not an index below 2"):
        override(cfg, "stages.2.train.lr", 1e-4)


@pytest.mark.parametrize(
    ("override_", "message"),
    [
        ("stages.1.train.lrr=1", "stages[1] (json).train: unknown config key 'train.lrr'. Valid keys of train: method"),
        ("stages.0.data.max_seq_len=many", "stages[0] (chat).data: invalid value for config key 'max_seq_len'"),
        ("stages.1.train.lora.between_stages=fold", "choose one of: merge, continue"),
        ("stages.1.train.epochs=0", "train.epochs=0"),
        ("stages.1.name=chat", "stage names must be unique"),
    ],
)
def test_a_bad_stage_key_or_value_names_the_stage(tmp_path: Path, override_: str, message: str) -> None:
    assert message in compose_error(["stages=demo_two_stage", override_], tmp_path)


DEMO_STAGES_INLINE = (
    "stages=[{name: chat}, {name: json, data: {name: demo-json, sources: [{path: 'builtin:demo-json'}], "
    "probes: 'builtin:demo-json-heldout'}, train: {lora: {between_stages: merge}}}]"
)


def sftray_config(capsys: pytest.CaptureFixture[str], *overrides: str) -> str:
    """``sftray config OVERRIDES`` as the shell runs it: its printed config (or its error, with code 1)."""
    code = main(["config", *overrides])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_inline_stages_and_a_stages_file_anywhere_compose_like_a_conf_stages_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    shipped = sftray_config(capsys, "stages=demo_two_stage", "stages.1.train.lr=1e-4")
    assert "name: json" in shipped and "lr: 0.0001" in shipped
    assert sftray_config(capsys, DEMO_STAGES_INLINE, "stages.1.train.lr=1e-4") == shipped
    (tmp_path / "mine").mkdir()
    shutil.copy(CONF / "stages" / "demo_two_stage.yaml", tmp_path / "mine" / "two.yaml")  # a copy of the group file
    assert sftray_config(capsys, f"stages={tmp_path / 'mine' / 'two.yaml'}", "stages.1.train.lr=1e-4") == shipped
    stages = yaml.safe_load((CONF / "stages" / "demo_two_stage.yaml").read_text())["stages"]
    (tmp_path / "list.yml").write_text(
        yaml.safe_dump(stages, sort_keys=False)
    )  # the list alone, relative to the launch directory
    assert sftray_config(capsys, "stages=list.yml", "stages.1.train.lr=1e-4") == shipped
    one = compose(["stages=[{name: chat}]"], tmp_path)
    assert one.stages == [StageConfig(name="chat")] and stage_config(one, 0).data == one.data


@pytest.mark.parametrize(
    ("override_", "message"),
    [
        ("stages=nosuch.yaml", "stages=nosuch.yaml: no such file"),
        ("stages=[{name: chat, trian: {lr: 1}}]", "unknown config key 'trian'. Valid keys of StageConfig: name, data"),
        ("stages=[{name: chat}, {name: chat}]", "stage names must be unique"),
    ],
)
def test_a_bad_inline_stages_list_or_file_is_a_one_line_error(tmp_path: Path, override_: str, message: str) -> None:
    assert message in compose_error([override_], tmp_path)


def test_a_stage_may_pack_its_rows_its_own_way(tmp_path: Path) -> None:
    cfg = compose(["stages=demo_two_stage", "stages.1.data.max_seq_len=128", "stages.0.mix.window_len=32"], tmp_path)
    assert stage_config(cfg, 1).data.max_seq_len == 128 and stage_config(cfg, 0).window_len == 32
    # without heldout_sources, the same windows whichever key sets their length
    same = ["mix.heldout_sources=[]", "stages.0.mix.window_len=64", "stages.1.data.max_seq_len=64"]
    assert stage_config(compose(["stages=demo_two_stage", *same], tmp_path), 1).window_len == 64
    more = ["mix.heldout_sources=[]", "mix.window_len=64", "stages.1.data.max_seq_len=128"]
    assert stage_config(compose(["stages=demo_two_stage", *more], tmp_path), 1).data.max_seq_len == 128


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["stages.1.mix.max_heldout_windows=1"], "stages[1] (json).mix.max_heldout_windows=1 differs from stages[0]"),
        (["stages.1.mix.heldout_sources=[{path: other.txt}]"], "stages[1] (json).mix.heldout_sources="),
        (["stages.1.eval.max_eval_rows=3"], "stages[1] (json).eval.max_eval_rows=3 differs from stages[0]"),
        # without heldout_sources the held-out windows are cut from mix.sources at the window length
        (["mix.heldout_sources=[]", "stages.1.data.max_seq_len=128"], "stages[1] (json).data.max_seq_len=128"),
        (["mix.heldout_sources=[]", "stages.0.mix.window_len=32"], "stages[1] (json).mix.window_len=256"),
        (["mix.heldout_sources=[]", "stages.1.mix.heldout_fraction=0.5"], "stages[1] (json).mix.heldout_fraction=0.5"),
    ],
)
@pytest.mark.usefixtures("ray_untouched")
def test_a_stage_that_would_change_the_forgetting_text_fails_naming_the_key_before_ray_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], overrides: list[str], key: str
) -> None:
    assert key in compose_error(["stages=demo_two_stage", *overrides], tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["train", f"paths.output_dir={tmp_path / 'out'}", "stages=demo_two_stage", *overrides]) == 1
    err = capsys.readouterr().err
    assert key in err and "one held-out text" in err and "resume with" not in err
    assert not (tmp_path / "out").exists()  # no work: no chain folder (ray_untouched: no Ray)


@pytest.mark.usefixtures("ray_untouched")
def test_resuming_a_chain_with_another_config_fails_before_ray_without_a_resume_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    chain = tmp_path / "chain"
    chain.mkdir()
    (chain / "chain.json").write_text(json.dumps({"stages": [{"index": 0, "name": "chat", "config_hash": "other"}]}))
    monkeypatch.chdir(tmp_path)
    overrides = [f"paths.output_dir={tmp_path / 'out'}", "stages=demo_two_stage", f"train.resume_from={chain}"]
    assert main(["train", *overrides]) == 1
    err = capsys.readouterr().err
    assert "stage 0 (chat) was trained with another configuration than stages[0] now" in err
    assert "resume with" not in err  # it would fail the same way
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.answer_pattern='#### *(\\S+'", r"eval.answer_pattern='#### \*\(\\\\S\+' is not a regular expression"),
        ("eval.answer_pattern='#### *\\S+'", r"eval.answer_pattern=.* has 0 groups; it needs exactly one"),
        ("eval.answer_pattern='(#+) *(\\S+)'", r"eval.answer_pattern=.* has 2 groups; it needs exactly one"),
        ("+data.probe_columns={question: q}", r"data.probe_columns: 'question' is not a probe field; valid: prompt,"),
    ],
)
def test_answer_pattern_and_probe_columns_are_checked_when_composed(tmp_path: Path, override: str, message: str):
    assert re.search(message, compose_error([override], tmp_path)), compose_error([override], tmp_path)


def test_a_gsm8k_answer_pattern_and_probe_columns_compose(tmp_path: Path) -> None:
    cfg = compose(
        ["eval.answer_pattern='#### *(\\S+)'", "+data.probe_columns={prompt: question, reference: answer}"], tmp_path
    )
    assert cfg.eval.answer_pattern == "#### *(\\S+)"
    assert cfg.data.probe_columns == {"prompt": "question", "reference": "answer"}
