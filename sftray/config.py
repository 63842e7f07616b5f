"""Typed configuration: the dataclass schemas behind conf/, registered in Hydra's ConfigStore, checked on creation.

Library code below the CLI takes these dataclasses (they pickle to Ray workers); only ``sftray.cli`` sees Hydra.
Each field's docstring is its documentation; conf/*.yaml repeat it as trailing comments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text")
TRAIN_ON = ("all_assistant", "last_assistant", "all")
ON_ERROR = ("raise", "drop")
OVERLENGTH = ("drop", "truncate")


def _one_of(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of: {', '.join(valid)}")


def _check_sources(name: str, sources: list, *, chat: bool) -> None:
    valid = tuple(f for f in FORMATS if f != "text") if chat else ("auto", "text")
    for i, src in enumerate(sources):
        _one_of(f"{name}[{i}].format", src.format, valid)


@dataclass(kw_only=True)
class SourceConfig:
    """One input: a local file / glob / folder, a Hugging Face dataset id, or ``builtin:NAME``."""

    path: str = "???"
    """File (.jsonl .json .parquet .txt), glob, folder, hub dataset id, or builtin:demo / builtin:pydoc_topics."""
    format: str = "auto"
    """auto | messages | sharegpt | alpaca | prompt_completion | text; auto detects per source from the first row."""
    split: str = "train"
    """Hub datasets only: the split to load."""
    subset: str | None = None
    """Hub datasets only: the configuration name (``load_dataset(path, subset)``)."""
    text_field: str = "text"
    """Pretraining sources in JSONL/Parquet: the column that holds the text."""


@dataclass(kw_only=True)
class ModelConfig:
    """The base model and its tokenizer."""

    name_or_path: str = "???"
    """Hub id or local folder for from_pretrained; builtin:tiny-llama is built offline on first use (required:
    a group YAML sets it; a default here would silently win over a group's ``???``)."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off unless you trust its author."""
    chat_template: str | None = None
    """Override the tokenizer's chat template: a Jinja string or a path to a .jinja file."""


@dataclass(kw_only=True)
class DataConfig:
    """SFT conversations: sources, splits, rendering, masking and packing."""

    name: str = "demo"
    """Short name used in output folders and reports."""
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig(path="builtin:demo")])
    """Training conversations."""
    val_sources: list[SourceConfig] = field(default_factory=list)
    """Validation conversations; when empty, val_fraction of the training rows is held out instead."""
    val_fraction: float = 0.05
    """Share of training rows held out for validation (hash of source+row: stable across runs)."""
    probes: str | None = None
    """Generation probes: JSONL of {"prompt", "reference"} or builtin:demo-heldout; None: the val rows' last turns."""
    system_prompt: str | None = None
    """System prompt added to conversations that have none (None: leave them as they are)."""
    max_seq_len: int = 512
    """Tokens per training row."""
    packing: bool = True
    """Pack several examples per row (isolated by position_ids); false: one example per padded row."""
    train_on: str = "all_assistant"
    """all_assistant | last_assistant | all (no masking, e.g. for conversation simulators)."""
    on_error: str = "raise"
    """raise: the first malformed row stops prep with file and line; drop: skip it, counted by reason."""
    overlength: str = "drop"
    """Examples longer than max_seq_len: drop (counted) or truncate (cut turns untrained, counted)."""
    pack_group_size: int = 2048
    """Examples packed together per best-fit-decreasing group; larger packs tighter, costs memory."""
    num_actors: int = 1
    """Tokenizer actors (each loads the tokenizer once)."""
    cpus_per_actor: float = 0.5
    """CPUs reserved per tokenizer actor; keep actors x this below the cluster's free CPUs."""

    def __post_init__(self) -> None:
        _one_of("data.train_on", self.train_on, TRAIN_ON)
        _one_of("data.on_error", self.on_error, ON_ERROR)
        _one_of("data.overlength", self.overlength, OVERLENGTH)
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.max_seq_len < 8:
            raise ValueError(f"data.max_seq_len={self.max_seq_len} is too small (minimum 8)")
        if not self.sources:
            raise ValueError("data.sources is empty: give at least one source")
        _check_sources("data.sources", self.sources, chat=True)
        _check_sources("data.val_sources", self.val_sources, chat=True)
        if self.num_actors < 1 or self.cpus_per_actor <= 0:
            raise ValueError("data.num_actors must be >= 1 and data.cpus_per_actor > 0")


@dataclass(kw_only=True)
class MixConfig:
    """Plain pretraining text mixed into training rows, and its held-out slice for measuring forgetting."""

    ratio: float = 0.1
    """Share of training tokens (non-pad) that come from the pretraining corpus; 0 disables mixing."""
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig(path="builtin:pydoc_topics")])
    """Pretraining text: .txt files (one document per file) or a text column."""
    window_len: int | None = None
    """Tokens per pretraining window; None: data.max_seq_len."""
    heldout_fraction: float = 0.05
    """Share of pretraining windows held out to measure forgetting (never trained on)."""
    max_heldout_windows: int = 256
    """Cap on held-out windows, so forgetting eval stays cheap."""

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise ValueError(f"mix.ratio={self.ratio} must be in [0, 1)")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"mix.heldout_fraction={self.heldout_fraction} must be in [0, 1)")
        _check_sources("mix.sources", self.sources, chat=False)
        if self.window_len is not None and self.window_len < 8:
            raise ValueError(f"mix.window_len={self.window_len} is too small (minimum 8)")


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA adapters (peft) for ``train.method=lora``."""

    r: int = 16
    """Rank: more capacity, more memory."""
    alpha: int = 32
    """Scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names that get adapters; ["all-linear"] targets every linear layer."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters (e.g. lm_head)."""


@dataclass(kw_only=True)
class TrainConfig:
    """One training run on Ray Train workers."""

    method: str = "lora"
    """full | lora."""
    parallelism: str = "fsdp"
    """fsdp (FSDP2 fully_shard per decoder layer) | ddp."""
    num_workers: int = 2
    """Ray Train workers (processes); one GPU each when use_gpu."""
    use_gpu: bool = False
    """Train on GPUs (NCCL, bf16 autocast) instead of CPUs (gloo, float32)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker (fractions allowed); also its torch thread count (at least 1)."""
    epochs: int = 2
    """Passes over the training rows; a checkpoint and an eval after each."""
    lr: float = 2e-4
    """Peak learning rate (SFT: 2-10x below pretraining; LoRA tolerates higher)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    warmup_ratio: float = 0.05
    """Share of optimizer steps spent warming the LR up linearly."""
    schedule: str = "cosine"
    """cosine | linear | constant (after warmup)."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global L2 norm); 0 disables."""
    micro_batch_size: int = 4
    """Rows per worker per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; global batch = workers x micro_batch_size x grad_accum rows."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, about a third more compute."""
    neftune_alpha: float = 0.0
    """NEFTune noise on input embeddings while training (typ. 5); 0 disables."""
    eval_every_steps: int = 0
    """Extra evals every N optimizer steps (0: only at epoch ends)."""
    max_failures: int = 1
    """Worker-group restarts from the latest checkpoint before the run fails."""
    export_merged: bool = False
    """LoRA: also save the merged full model in each checkpoint."""
    resume_from: str | None = None
    """Checkpoint folder to resume from (model, optimizer, scheduler, epoch)."""
    log_every_steps: int = 10
    """Progress line every N optimizer steps."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapter settings (method=lora)."""
    fail_at_step: int | None = None
    """Fault injection for testing recovery: the last worker exits at this step, first attempt only."""

    def __post_init__(self) -> None:
        _one_of("train.method", self.method, ("full", "lora"))
        _one_of("train.parallelism", self.parallelism, ("fsdp", "ddp"))
        _one_of("train.schedule", self.schedule, ("cosine", "linear", "constant"))
        if self.num_workers < 1 or self.epochs < 1 or self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ValueError("train.num_workers, epochs, micro_batch_size and grad_accum must be >= 1")
        if self.lr <= 0 or self.cpus_per_worker <= 0:
            raise ValueError("train.lr and train.cpus_per_worker must be > 0")


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation after each epoch, and how the best checkpoint is chosen."""

    num_probes: int = 64
    """Generation probes per eval (greedy)."""
    max_new_tokens: int = 32
    """Generation limit per probe; a response that has not ended by then is not compliant."""
    select_metric: str = "eval/format_compliance"
    """Metric (higher is better) that picks the best checkpoint and ranks sweep trials."""
    forgetting_budget: float = 0.25
    """Max eval/forgetting (relative rise of held-out pretraining loss) a selectable checkpoint may have."""
    max_eval_rows: int = 256
    """Cap on val / held-out rows per eval, so evals stay cheap."""


@dataclass(kw_only=True)
class LrSpace:
    """Learning rates to try: explicit ``values`` (a grid), or a log-uniform range ``low``..``high``."""

    values: list[float] = field(default_factory=list)
    """Explicit learning rates, tried as a grid; leave empty to sample the range instead."""
    low: float | None = None
    """Lower end of the log-uniform range (used when values is empty)."""
    high: float | None = None
    """Upper end of the log-uniform range."""


@dataclass(kw_only=True)
class SweepConfig:
    """A Ray Tune sweep: each trial is one training run with some config keys changed."""

    name: str = "sweep"
    """Sweep folder and MLflow experiment name."""
    lr: LrSpace = field(default_factory=LrSpace)
    """Learning-rate search space (train.lr)."""
    epochs: list[int] = field(default_factory=list)
    """train.epochs values, tried as a grid; empty keeps train.epochs."""
    params: dict[str, list[Any]] = field(default_factory=dict)
    """Any other dotted config key -> values tried as a grid, e.g. {train.lora.r: [8, 16]}."""
    num_samples: int = 1
    """Repeats of the grid (with a range or random search: draws per grid point)."""
    max_concurrent_trials: int | None = None
    """Trials at once; None: as many as the cluster holds without oversubscription."""
    scheduler: str = "none"
    """none | asha (stops weak trials early on eval/score, per epoch)."""
    search: str = "grid"
    """grid (Tune's basic variant generator) | optuna (tune.choice for grids)."""
    resume: bool = False
    """Resume the sweep of this name: finished trials are kept, unfinished ones rerun."""

    def __post_init__(self) -> None:
        _one_of("sweep.scheduler", self.scheduler, ("none", "asha"))
        _one_of("sweep.search", self.search, ("grid", "optuna"))
        if not self.lr.values and (self.lr.low is None or self.lr.high is None):
            raise ValueError("sweep.lr needs values: [...] or both low and high")
        if self.num_samples < 1:
            raise ValueError("sweep.num_samples must be >= 1")


@dataclass(kw_only=True)
class WandbConfig:
    """Weights & Biases, besides MLflow."""

    enabled: bool = False
    """Also log every trial to W&B (offline unless WANDB_API_KEY is set)."""
    project: str = "sftray"
    """W&B project."""


@dataclass(kw_only=True)
class TrackingConfig:
    """Where runs are recorded."""

    uri: str | None = None
    """MLflow tracking URI; None: sqlite:///<paths.output_dir>/mlflow.db (offline, no server)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Optional W&B logging."""


@dataclass(kw_only=True)
class PathsConfig:
    """Where things go. Relative paths are resolved against the launch directory by the CLI."""

    output_dir: str = "outputs"
    """Prepared data, runs and the MLflow store."""
    cache_dir: str = "~/.cache/sftray"
    """Built offline assets (tiny tokenizer/model, builtin data)."""


@dataclass(kw_only=True)
class Config:
    """Root configuration composed from conf/config.yaml."""

    seed: int = 0
    """Seed of every shuffle and split."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=lambda: SweepConfig(lr=LrSpace(values=[1e-3])))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    @property
    def window_len(self) -> int:
        return self.mix.window_len or self.data.max_seq_len

    def resolved_paths(self, base: Path) -> Config:
        """A copy whose paths are absolute (Ray workers and Tune trials run in other directories)."""
        out = Path(self.paths.output_dir).expanduser()
        cache = Path(self.paths.cache_dir).expanduser()
        paths = PathsConfig(
            output_dir=str(out if out.is_absolute() else base / out),
            cache_dir=str(cache if cache.is_absolute() else base / cache),
        )
        return dataclasses.replace(self, paths=paths)


def register_configs() -> None:
    """Registers the schemas so conf/*.yaml are validated against them (unknown keys fail)."""
    from hydra.core.config_store import ConfigStore

    # The root schema types every group below it, so group YAMLs are validated without schemas of their own.
    ConfigStore.instance().store(name="config_schema", node=Config)


def schema_keys(path: str) -> list[str] | None:
    """Valid keys at a dotted config path (``"data"`` -> DataConfig's fields), or None if there is none."""
    node: Any = Config
    for part in [p for p in path.split(".") if p]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return None
        node = _field_type(node, part)
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else None


def _field_type(cls: Any, name: str) -> Any:
    import typing

    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list and args:
        return args[0]
    return hint
