"""Typed configuration: the dataclass schemas (every default, checked on creation) and ``compose_config``.

The schema is the one home of every default and its documentation (each field's docstring); conf/ group files set
only the values an option changes, with a trailing comment each. ``compose_config`` is the only place Hydra runs:
the CLI, the tests and the bench all get their ``Config`` from it. Library code takes the dataclasses (they pickle
to Ray workers).
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text")
TRAIN_ON = ("all_assistant", "last_assistant", "all")
ON_ERROR = ("raise", "drop")
OVERLENGTH = ("drop", "truncate")
DEDUP = ("none", "exact", "near")
LOG_MODEL = ("best", "none", "all")
LOSS_POINTS_PER_EPOCH = 5
"""``train/loss`` points per epoch in tracking unless ``tracking.log_every_steps`` is set."""
PROBE_FIELDS = ("prompt", "messages", "reference", "format")
"""A probe record's own fields (``sftray.data.probe_file``); ``data.probe_columns`` may also map a chat format's."""


def _one_of(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of: {', '.join(valid)}")


def _in_range(
    name: str,
    value: float | None,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> None:
    """ValueError naming the key, its value and the allowed range (``>= 1``, ``in [0, 1)``) unless ``value`` lies
    in it; None (an optional knob left unset) passes."""
    bounds = [(op, bound) for op, bound in ((">=", ge), (">", gt), ("<=", le), ("<", lt)) if bound is not None]
    if value is None or all(_COMPARE[op](value, bound) for op, bound in bounds):
        return
    if len(bounds) == 2:
        (low_op, low), (high_op, high) = bounds
        allowed = f"in {'[' if low_op == '>=' else '('}{low:g}, {high:g}{']' if high_op == '<=' else ')'}"
    else:
        allowed = f"{bounds[0][0]} {bounds[0][1]:g}"
    raise ValueError(f"{name}={value} must be {allowed}")


_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def _check_sources(name: str, sources: list, *, chat: bool, weighted: bool = False) -> None:
    """Each source's format and mappings; ``weighted``: the list whose sources may set weight / max_rows."""
    valid = tuple(f for f in FORMATS if f != "text") if chat else ("auto", "text")
    for i, src in enumerate(sources):
        _one_of(f"{name}[{i}].format", src.format, valid)
        _in_range(f"{name}[{i}].weight", src.weight, gt=0)
        _in_range(f"{name}[{i}].max_rows", src.max_rows, ge=1)
        for key in ("weight", "max_rows"):
            if not weighted and getattr(src, key) != getattr(SourceConfig, key):
                raise ValueError(
                    f"{name}[{i}].{key}={getattr(src, key)}: {key} applies to data.sources (training conversations)"
                    f" only; remove it here"
                )
        fmt = "text" if src.format == "auto" and not chat else src.format
        fields = SourceConfig.FIELDS.get(fmt, ())
        for key in src.columns:
            if fmt == "auto" and not any(key in f for k, f in SourceConfig.FIELDS.items() if k != "text"):
                known = "; ".join(f"{k}: {', '.join(f)}" for k, f in SourceConfig.FIELDS.items() if k != "text")
                raise ValueError(f"{name}[{i}].columns: {key!r} is not a field of any chat format; valid: {known}")
            if fmt != "auto" and key not in fields:
                raise ValueError(f"{name}[{i}].columns: {key!r} is not a field of {fmt}; valid: {', '.join(fields)}")
        if src.roles and fmt not in ("auto", "messages", "sharegpt"):
            raise ValueError(f"{name}[{i}].roles: only messages and sharegpt records have roles, not {fmt}")


@dataclass(kw_only=True)
class SourceConfig:
    """One input: a local file / glob / folder, a Hugging Face dataset id, or ``builtin:NAME``."""

    path: str = "???"
    """File (.jsonl .json .parquet .txt), glob, folder, hub dataset id, or builtin:demo / builtin:pydoc_topics."""
    format: str = "auto"
    """auto | messages | sharegpt | alpaca | prompt_completion | text; auto: each file's from its first record."""
    split: str = "train"
    """Hub datasets only: the split to load."""
    subset: str | None = None
    """Hub datasets only: the configuration name (``load_dataset(path, subset)``)."""
    text_field: str = "text"
    """Pretraining sources in JSONL/Parquet: the column that holds the text."""
    columns: dict[str, str] = field(default_factory=dict)
    """Your field names, as {format's field: your key}: {prompt: question, completion: answer} reads
    {"question", "answer"} records as prompt_completion. Fields per format are ``FIELDS`` (the turn keys role/content
    of messages and from/value of sharegpt included); format auto detects with the mapped names."""
    roles: dict[str, str] = field(default_factory=dict)
    """messages / sharegpt: your role values, as {your value: system | user | assistant}, e.g. {human: user,
    bot: assistant}; values not listed are read as they are (sharegpt already knows human and gpt)."""

    weight: float = 1.0
    """data.sources only: multiplies this source's tokens in the training split (2.0: its examples are seen twice as
    often; 0.5: a seeded half of its tokens); the report compares each source's achieved token share with its target."""
    max_rows: int | None = None
    """data.sources only: keep at most this many of the source's training conversations (a seeded subset), applied
    before weight; None: all."""

    FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "messages": ("messages", "role", "content"),
        "sharegpt": ("conversations", "from", "value"),
        "alpaca": ("instruction", "input", "output"),
        "prompt_completion": ("prompt", "completion"),
        "text": ("text",),
    }
    """The fields of each format, the keys ``columns`` may map."""


def probe_column_fields() -> tuple[str, ...]:
    """The fields ``data.probe_columns`` may map: the probe's own, then every chat format's (turn keys included)."""
    chat = (f for fmt, fields in SourceConfig.FIELDS.items() if fmt != "text" for f in fields)
    return tuple(dict.fromkeys((*PROBE_FIELDS, *chat)))


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
    special_tokens: dict[str, str] = field(default_factory=dict)
    """Special tokens set on the tokenizer before any rendering, e.g. ``{bos_token: "<s>"}`` for a template that
    uses ``bos_token`` when the tokenizer has none (keys: SPECIAL_TOKEN_NAMES). A string not in the vocabulary is
    added as a special token (a new embedding row, like the control tokens a template writes)."""

    def __post_init__(self) -> None:
        for key, value in self.special_tokens.items():
            if key not in SPECIAL_TOKEN_NAMES:
                raise ValueError(
                    f"model.special_tokens.{key}: not a special token name; valid: {', '.join(SPECIAL_TOKEN_NAMES)}"
                )
            if not isinstance(value, str) or not value:
                raise ValueError(f"model.special_tokens.{key}={value!r}: expected the token's non-empty text")


SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
"""The special tokens a tokenizer names (transformers' SPECIAL_TOKENS_ATTRIBUTES) and a chat template may use."""


@dataclass(kw_only=True)
class PruneConfig:
    """Loss-based pruning: every training conversation scored by its mean target loss under a scoring model, the
    highest- and lowest-loss shares dropped (``sftray.data.pruning``). Off while both shares are 0 (no model loads)."""

    drop_highest: float = 0.0
    """Share of the scored training conversations with the highest mean target loss to drop (pruned_high_loss):
    likely noise or mislabels. 0: none."""
    drop_lowest: float = 0.0
    """Share with the lowest mean target loss to drop (pruned_low_loss): what the scoring model knows already. 0: none."""
    model: str | None = None
    """The scoring model (hub id, local folder or builtin:tiny-llama; it must share the run's tokenizer): None, the
    run's base model (model.name_or_path). Its scores are cached by (model files, data fingerprint)."""
    batch_size: int = 32
    """Conversations per scoring forward pass (padded to the longest): more is faster, costs memory."""
    num_scorers: int | None = None
    """Scoring actors, each holding the model; None: one per GPU of the cluster with GPUs, else one per
    cpus_per_scorer CPUs."""
    num_gpus_per_scorer: float | None = None
    """GPUs per scoring actor; None: 1 when the cluster has GPUs, else 0 (scores on CPU)."""
    cpus_per_scorer: float = 1.0
    """CPUs reserved per scoring actor (on CPU also its torch threads)."""

    @property
    def enabled(self) -> bool:
        return self.drop_highest > 0 or self.drop_lowest > 0

    def __post_init__(self) -> None:
        _in_range("data.prune.drop_highest", self.drop_highest, ge=0, lt=1)
        _in_range("data.prune.drop_lowest", self.drop_lowest, ge=0, lt=1)
        if self.drop_highest + self.drop_lowest >= 1:
            raise ValueError(
                f"data.prune.drop_highest={self.drop_highest} + data.prune.drop_lowest={self.drop_lowest} must be < 1:"
                " together they would drop every training conversation"
            )
        _in_range("data.prune.batch_size", self.batch_size, ge=1)
        _in_range("data.prune.num_scorers", self.num_scorers, ge=1)
        _in_range("data.prune.num_gpus_per_scorer", self.num_gpus_per_scorer, ge=0)
        _in_range("data.prune.cpus_per_scorer", self.cpus_per_scorer, gt=0)


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
    probes: str | None = "builtin:demo-heldout"
    """Generation probes: JSONL of {"prompt", "reference"} (or {"messages", "reference"}, or any chat record whose
    last assistant turn is the reference; optional "format": a regular expression a compliant answer matches), or
    builtin:demo-heldout (unseen prompts with checkable answers); None: the last turn of the validation
    conversations. Read before Ray starts: a bad line fails at once with file and line."""
    probe_columns: dict[str, str] = field(default_factory=dict)
    """The probe file's own field names, as {probe field: your key} like a source's ``columns``: {prompt: question,
    reference: answer} (or the source's {prompt: question, completion: answer}) reads GSM8K's {"question",
    "answer"} lines. Fields: ``PROBE_FIELDS`` and those of the chat formats (``SourceConfig.FIELDS``)."""
    system_prompt: str | None = None
    """System prompt added to conversations that have none (None: leave them as they are)."""
    max_seq_len: int = 256
    """Tokens per training row."""
    packing: bool = True
    """Pack several examples per row (isolated by position_ids); false: one example per padded row."""
    train_on: str = "all_assistant"
    """all_assistant | last_assistant | all (no masking, e.g. for conversation simulators)."""
    on_error: str = "raise"
    """raise: the first malformed row stops prep with file and line; drop: skip it, counted by reason."""
    overlength: str = "drop"
    """Examples longer than max_seq_len: drop (counted) or truncate (cut turns untrained, counted)."""
    dedup: str = "none"
    """none | exact | near. exact: whole conversation text with whitespace collapsed and case folded, hashed, the
    first in file order kept; near: MinHash LSH over word shingles (near_threshold). Training rows that duplicate a
    validation row or a probe are dropped as duplicate_of_eval."""
    near_threshold: float = 0.8
    """Jaccard similarity of word shingles above which two conversations are near duplicates (data.dedup=near)."""
    minhash_perm: int = 128
    """MinHash permutations (data.dedup=near); more: a sharper threshold, slower."""
    shingle_words: int = 3
    """Words per shingle (data.dedup=near); fewer: shared phrases count more, so more pairs look alike."""
    min_assistant_tokens: int = 0
    """Conversations with fewer trained (assistant) tokens are dropped (too_few_assistant_tokens); 0: off."""
    max_assistant_tokens: int | None = None
    """Conversations with more trained (assistant) tokens are dropped (too_many_assistant_tokens); None: off."""
    max_turns: int | None = None
    """Conversations with more assistant turns are dropped (too_many_turns); None: off."""
    min_assistant_ratio: float = 0.0
    """Trained tokens / prompt (untrained) tokens below this: dropped (low_assistant_ratio); 0: off."""
    pack_group_size: int = 2048
    """Examples packed together per best-fit-decreasing group; larger packs tighter, costs memory."""
    num_encoders: int | None = None
    """Most encoding tasks at once (each reads and encodes one piece of the sources); None: one per CPU of the
    cluster (one per cpus_per_encoder CPUs when that is above 1)."""
    cpus_per_encoder: float = 1.0
    """CPUs reserved per encoding task (it runs one Python thread)."""
    prune: PruneConfig = field(default_factory=PruneConfig)
    """Loss-based pruning of the training conversations (off by default)."""

    def __post_init__(self) -> None:
        _one_of("data.train_on", self.train_on, TRAIN_ON)
        _one_of("data.on_error", self.on_error, ON_ERROR)
        _one_of("data.overlength", self.overlength, OVERLENGTH)
        _one_of("data.dedup", self.dedup, DEDUP)
        _in_range("data.near_threshold", self.near_threshold, gt=0, lt=1)
        _in_range("data.minhash_perm", self.minhash_perm, ge=16)
        _in_range("data.shingle_words", self.shingle_words, ge=1)
        _in_range("data.min_assistant_tokens", self.min_assistant_tokens, ge=0)
        _in_range("data.max_assistant_tokens", self.max_assistant_tokens, ge=max(1, self.min_assistant_tokens))
        _in_range("data.max_turns", self.max_turns, ge=1)
        _in_range("data.min_assistant_ratio", self.min_assistant_ratio, ge=0)
        _in_range("data.val_fraction", self.val_fraction, ge=0, lt=1)
        _in_range("data.max_seq_len", self.max_seq_len, ge=8)
        _in_range("data.pack_group_size", self.pack_group_size, ge=1)
        _in_range("data.num_encoders", self.num_encoders, ge=1)
        _in_range("data.cpus_per_encoder", self.cpus_per_encoder, gt=0)
        if not self.sources:
            raise ValueError("data.sources is empty: give at least one source")
        _check_sources("data.sources", self.sources, chat=True, weighted=True)
        _check_sources("data.val_sources", self.val_sources, chat=True)
        valid = probe_column_fields()
        for key in self.probe_columns:
            if key not in valid:
                raise ValueError(f"data.probe_columns: {key!r} is not a probe field; valid: {', '.join(valid)}")


@dataclass(kw_only=True)
class MixConfig:
    """Plain pretraining text mixed into training rows, and its held-out slice for measuring forgetting."""

    ratio: float = 0.1
    """Share of training tokens (non-pad) that come from the pretraining corpus; 0 disables mixing."""
    sources: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig(path="builtin:pydoc_topics", format="text")]
    )
    """Pretraining text: .txt files (one document per file) or a text column."""
    heldout_sources: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig(path="builtin:pydoc_topics_heldout", format="text")]
    )
    """Text the BASE MODEL never trained on: forgetting is measured on its windows (up to max_heldout_windows), and
    none of it is mixed in. Empty: hold out heldout_fraction of mix.sources' windows instead, which is clean only if
    the base never saw mix.sources. The default is the pydoc prose the builtin base was kept from."""
    window_len: int | None = None
    """Tokens per pretraining window; None: data.max_seq_len."""
    heldout_fraction: float = 0.05
    """With no heldout_sources: share of mix.sources' windows held out to measure forgetting (never trained on)."""
    max_heldout_windows: int = 256
    """Cap on held-out windows, so forgetting eval stays cheap."""
    max_repeats: int = 1
    """Passes over the pretraining corpus the mix may take: a corpus smaller than ratio asks for is reused, whole
    passes in a new seeded order each, up to this many (the report counts them); 1: each window at most once."""

    def __post_init__(self) -> None:
        _in_range("mix.ratio", self.ratio, ge=0, lt=1)
        _in_range("mix.max_repeats", self.max_repeats, ge=1)
        _in_range("mix.heldout_fraction", self.heldout_fraction, ge=0, lt=1)
        _check_sources("mix.sources", self.sources, chat=False)
        _check_sources("mix.heldout_sources", self.heldout_sources, chat=False)
        for i, src in enumerate(self.heldout_sources):
            if src.path in {s.path for s in self.sources}:
                raise ValueError(
                    f"mix.heldout_sources[{i}].path={src.path!r} is also in mix.sources: held-out text must never be "
                    "mixed into training; remove it from one of them"
                )
        _in_range("mix.window_len", self.window_len, ge=8)
        _in_range("mix.max_heldout_windows", self.max_heldout_windows, ge=1)


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA adapters (peft) for ``train.method=lora``."""

    r: int = 16
    """Rank: more capacity, more memory."""
    alpha: int = 32
    """Scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names that get adapters; ["all-linear"] targets every linear layer."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters (e.g. lm_head)."""
    between_stages: str = "merge"
    """How a LoRA stage of a multi-stage run starts from the previous stage's selected checkpoint: merge (that
    adapter merged into the weights, a new adapter on top) | continue (the same adapter trained on; this stage's
    r, alpha and targets are then the adapter's own). Read from the stage that starts."""

    def __post_init__(self) -> None:
        _one_of("train.lora.between_stages", self.between_stages, ("merge", "continue"))
        _in_range("train.lora.r", self.r, ge=1)
        _in_range("train.lora.alpha", self.alpha, gt=0)
        _in_range("train.lora.dropout", self.dropout, ge=0, lt=1)


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
    """Train on GPUs (NCCL) instead of CPUs (gloo)."""
    precision: str = "auto"
    """auto | fp32 | bf16. Compute dtype of the forward and backward (weights and optimizer stay float32). auto:
    bf16 on GPUs that support it, float32 elsewhere; bf16 also runs on CPU (make bench measures both)."""
    cpus_per_worker: float = 0.8
    """CPUs reserved per worker (fractions allowed); also its torch thread count (at least 1)."""
    epochs: int = 2
    """Passes over the training rows; a checkpoint and an eval after each."""
    lr: float = 5e-3
    """Peak learning rate (SFT: 2-10x below pretraining). LoRA adapters take ~10x the full fine-tuning LR; 5e-3 is
    the demo's measured best of 1e-3..5e-3 (conf/train/full.yaml: 1e-4)."""
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
    """Worker-group restarts from the latest checkpoint before the run fails (-1: unlimited, as in Ray)."""
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
        _one_of("train.precision", self.precision, ("auto", "fp32", "bf16"))
        for name in ("num_workers", "epochs", "micro_batch_size", "grad_accum", "log_every_steps", "fail_at_step"):
            _in_range(f"train.{name}", getattr(self, name), ge=1)
        for name in ("weight_decay", "max_grad_norm", "neftune_alpha", "eval_every_steps"):
            _in_range(f"train.{name}", getattr(self, name), ge=0)
        _in_range("train.lr", self.lr, gt=0)
        _in_range("train.cpus_per_worker", self.cpus_per_worker, gt=0)
        _in_range("train.warmup_ratio", self.warmup_ratio, ge=0, le=1)
        _in_range("train.max_failures", self.max_failures, ge=-1)


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation after each epoch, and how the best checkpoint is chosen."""

    num_probes: int = 64
    """Generation probes per eval (greedy)."""
    max_new_tokens: int | None = None
    """Generation limit per probe; a response that has not ended by then is not compliant. None sizes it to the
    data: the 95th percentile of the reference answers' token lengths (end-of-turn included) x 1.25 + 8, at most
    max_new_tokens_cap."""
    max_new_tokens_cap: int = 512
    """Upper bound of the data-sized generation limit (generation time grows with it)."""
    select_metric: str = "eval/format_compliance"
    """Metric that picks the best checkpoint and ranks sweep trials, in its own direction (a loss: lower is better;
    a rate: higher); checked against the metrics the run produces (``sftray.eval.metrics``)."""
    forgetting_budget: float = 0.05
    """Max eval/forgetting (relative rise of held-out pretraining loss) a selectable checkpoint may have. 5%: the
    demo's LoRA runs that learn the format stay at +3-4% (README "Forgetting study"); a checkpoint past it is
    ranked below every one within it."""
    max_eval_rows: int = 256
    """Cap on val / held-out rows per eval, so evals stay cheap."""
    answer_pattern: str | None = None
    """A regular expression with one group that extracts the final answer; eval/exact_match then compares the
    group's text in the response and in the reference (the last match in each, whitespace and case aside) instead
    of the whole texts. GSM8K: ``'#### *(\\S+)'`` (worked solutions end in ``#### 72``). None: whole texts."""
    reuse_base_eval: bool = True
    """Reuse the base model's eval (the epoch-0 row) from an earlier run or trial with the same model, data and eval
    inputs (``sftray.eval.base_eval``); false computes it again."""

    def __post_init__(self) -> None:
        _in_range("eval.num_probes", self.num_probes, ge=0)
        _in_range("eval.max_new_tokens", self.max_new_tokens, ge=1)
        _in_range("eval.max_new_tokens_cap", self.max_new_tokens_cap, ge=1)
        _in_range("eval.forgetting_budget", self.forgetting_budget, ge=0)
        _in_range("eval.max_eval_rows", self.max_eval_rows, ge=1)
        if self.answer_pattern is not None:
            try:
                groups = re.compile(self.answer_pattern).groups
            except re.error as exc:
                raise ValueError(
                    f"eval.answer_pattern={self.answer_pattern!r} is not a regular expression ({exc})"
                ) from None
            if groups != 1:
                raise ValueError(
                    f"eval.answer_pattern={self.answer_pattern!r} has {groups} groups; it needs exactly one, around "
                    "the answer (other parentheses as (?:...)), e.g. '#### *(\\S+)'"
                )


@dataclass(kw_only=True)
class LrSpace:
    """Learning rates to try: explicit ``values`` (a grid), or a log-uniform range ``low``..``high``."""

    values: list[float] = field(default_factory=list)
    """Explicit learning rates, tried as a grid; leave empty to sample the range instead (empty and no range: the
    LR is not swept, train.lr or a sweep.points entry sets it)."""
    low: float | None = None
    """Lower end of the log-uniform range (used when values is empty)."""
    high: float | None = None
    """Upper end of the log-uniform range."""


@dataclass(kw_only=True)
class SweepConfig:
    """A Ray Tune sweep: each trial is one training run with some config keys changed."""

    name: str = "demo"
    """Sweep folder and MLflow experiment name (the default sweep: LoRA LR x epochs on the demo)."""
    lr: LrSpace = field(default_factory=lambda: LrSpace(values=[2e-3, 5e-3]))
    """Learning-rate search space (train.lr)."""
    epochs: list[int] = field(default_factory=lambda: [4])
    """train.epochs values, tried as a grid; empty keeps train.epochs. Every epoch of a trial is evaluated and the
    best one selected, so a 4-epoch trial also tries 1, 2 and 3 epochs (under a schedule that decays over 4): on the
    demo, 4 epochs at lr 5e-3 is what learns the format within the forgetting budget (README "Sweeps")."""
    params: dict[str, list[Any]] = field(default_factory=dict)
    """Any other dotted config key -> values tried as a grid, e.g. {train.lora.r: [8, 16]}."""
    points: list[dict[str, Any]] = field(default_factory=list)
    """One more grid axis whose points each set several keys together, e.g. each method at its own LR:
    [{train.method: lora, train.lr: 5e-3}, {train.method: full, train.lr: 1e-3}]; a trial's config names its
    point as sweep.point (index) beside the keys it set."""
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
        if not self.lr.values and (self.lr.low is None) != (self.lr.high is None):
            raise ValueError("sweep.lr needs values: [...], both low and high, or neither (LR not swept)")
        for i, lr in enumerate(self.lr.values):
            _in_range(f"sweep.lr.values[{i}]", lr, gt=0)
        _in_range("sweep.lr.low", self.lr.low, gt=0)
        if self.lr.low is not None:
            _in_range("sweep.lr.high", self.lr.high, gt=self.lr.low)
        for i, epochs in enumerate(self.epochs):
            _in_range(f"sweep.epochs[{i}]", epochs, ge=1)
        for i, point in enumerate(self.points):
            if not point:
                raise ValueError(f"sweep.points[{i}] sets no key")
        _in_range("sweep.num_samples", self.num_samples, ge=1)
        _in_range("sweep.max_concurrent_trials", self.max_concurrent_trials, ge=1)

    def trial_overrides(self, config: dict[str, Any]) -> dict[str, Any]:
        """A Tune trial's config as the config keys it sets: its ``sweep.point`` expanded into that point's keys."""
        flat = {k: v for k, v in config.items() if k != SWEEP_POINT}
        if config.get(SWEEP_POINT) is not None:
            flat.update(self.points[config[SWEEP_POINT]])
        return flat


SWEEP_POINT = "sweep.point"
"""The Tune config key of a trial's ``sweep.points`` index (not a config key: ``trial_overrides`` expands it)."""


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
    log_model: str = "best"
    """Model folders each run (single, stage, trial) logs as MLflow artifacts: ``best``: the selected checkpoint's
    ``model/`` (the LoRA adapter, or full weights; with its tokenizer) and ``merged/`` when exported; ``all``: also
    every epoch's under ``checkpoints/epoch_NN/``; ``none``: no weights (large models), the local path in the
    ``best_checkpoint`` tag only."""
    log_every_steps: int | None = None
    """A ``train/loss`` point every N optimizer steps (the loss over those steps); None: about
    ``LOSS_POINTS_PER_EPOCH`` per epoch."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Optional W&B logging."""

    def __post_init__(self) -> None:
        _one_of("tracking.log_model", self.log_model, LOG_MODEL)
        _in_range("tracking.log_every_steps", self.log_every_steps, ge=1)

    def loss_every_steps(self, steps_per_epoch: int) -> int:
        """The optimizer steps between two ``train/loss`` points of a run with ``steps_per_epoch``."""
        return self.log_every_steps or max(1, math.ceil(steps_per_epoch / LOSS_POINTS_PER_EPOCH))


@dataclass(kw_only=True)
class PathsConfig:
    """Where things go. Relative paths are resolved against the launch directory by the CLI."""

    output_dir: str = field(default_factory=lambda: os.environ.get("SFTRAY_OUTPUT", "outputs"))
    """Prepared data, runs and the MLflow store ($SFTRAY_OUTPUT; relative: the launch directory)."""
    cache_dir: str = field(default_factory=lambda: os.environ.get("SFTRAY_CACHE", "~/.cache/sftray"))
    """Built offline assets: tiny tokenizer/model, builtin data ($SFTRAY_CACHE)."""


STAGE_GROUPS = ("data", "mix", "train", "eval")
"""The config groups a stage of a multi-stage run may override."""


@dataclass(kw_only=True)
class StageConfig:
    """One stage of a multi-stage run: a name and its overrides of data, mix, train and eval (nested mappings of
    their keys, e.g. ``train: {lr: 1e-3, lora: {r: 8}}``); everything else is the run's own config."""

    name: str = "???"
    """Stage name: its run folder, its MLflow child run and its probe metrics (eval/<name>/format_compliance)."""
    data: dict[str, Any] = field(default_factory=dict)
    """Overrides of data (its sources, probes, ...)."""
    mix: dict[str, Any] = field(default_factory=dict)
    """Overrides of mix."""
    train: dict[str, Any] = field(default_factory=dict)
    """Overrides of train (lr, epochs, method, lora.between_stages, ...)."""
    eval: dict[str, Any] = field(default_factory=dict)
    """Overrides of eval."""


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
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    stages: list[StageConfig] = field(default_factory=list)
    """Multi-stage SFT (``conf/stages``): stage k trains from stage k-1's selected checkpoint with this config plus
    its own overrides; empty: one training run."""

    def __post_init__(self) -> None:
        _in_range("seed", self.seed, ge=0)
        names = [stage.name for stage in self.stages]
        for i, name in enumerate(names):
            if not re.fullmatch(r"[A-Za-z0-9_-]+", str(name)) or names.index(name) != i:
                raise ValueError(f"stages[{i}].name={name!r}: stage names must be unique words ([A-Za-z0-9_-])")
        # an unknown key or a bad value fails here, naming the stage
        _check_one_heldout_text(self, [stage_config(self, i) for i in range(len(self.stages))])

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


def override(cfg: Any, dotted: str, value: Any) -> Any:
    """A copy of ``cfg`` with the dotted key set (``train.lora.r``, ``stages.1.train.lr``: list items by index,
    keys inside open mappings nested); unknown keys list the valid ones."""
    head, _, rest = dotted.partition(".")
    if isinstance(cfg, list):
        if not head.isdigit() or int(head) >= len(cfg):
            raise ValueError(f"config key part '{head}' of '{dotted}' is not an index below {len(cfg)}")
        items = list(cfg)
        items[int(head)] = override(items[int(head)], rest, value) if rest else value
        return items
    if isinstance(cfg, dict):
        inner = cfg.get(head, {})
        return {**cfg, head: override(inner if isinstance(inner, dict) else {}, rest, value) if rest else value}
    fields = {f.name for f in dataclasses.fields(cfg)}
    if head not in fields:
        raise ValueError(f"unknown config key '{dotted}'; valid keys here: {', '.join(sorted(fields))}")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    child = getattr(cfg, head)
    if not (dataclasses.is_dataclass(child) or isinstance(child, list | dict)):
        raise ValueError(f"config key '{head}' has no sub-keys (asked for '{dotted}')")
    return dataclasses.replace(cfg, **{head: override(child, rest, value)})


def stage_config(cfg: Config, index: int) -> Config:
    """The config stage ``index`` trains with: ``cfg`` with that stage's overrides merged in (typed and checked
    like the groups themselves), and no stages of its own."""
    from omegaconf import OmegaConf

    stage = cfg.stages[index]
    out = dataclasses.replace(cfg, stages=[])
    for group in STAGE_GROUPS:
        overrides = getattr(stage, group)
        if not overrides:
            continue
        where = f"stages[{index}] ({stage.name}).{group}"
        if unknown := unknown_keys(overrides, group):
            raise ValueError(f"{where}: {unknown_key_message(unknown[0])}")
        error = None
        try:
            merged = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(getattr(cfg, group)), overrides))
        except Exception as exc:  # OmegaConf's type errors and the groups' own range checks
            error = f"{where}: {explain_config_error(exc)}"
        if error:  # raised outside the handler: the stage's message, not OmegaConf's, is the deepest one
            raise ValueError(error)
        out = dataclasses.replace(out, **{group: merged})
    return out


def _heldout_keys(cfg: Config, *, other: Config) -> dict[str, tuple[Any, Any]]:
    """The keys that choose the held-out text forgetting is measured on: key -> (value, as shown in an error);
    ``other``: the stage compared with, to name the key that sets the window length."""
    paths = [s.path for s in cfg.mix.heldout_sources]
    keys: dict[str, tuple[Any, Any]] = {
        "mix.heldout_sources": (cfg.mix.heldout_sources, paths),
        "mix.max_heldout_windows": (cfg.mix.max_heldout_windows, cfg.mix.max_heldout_windows),
        "eval.max_eval_rows": (cfg.eval.max_eval_rows, cfg.eval.max_eval_rows),  # the held-out rows an eval reads
    }
    if not cfg.mix.heldout_sources:  # windows held out of mix.sources by hash, cut at the window length
        keys["mix.sources"] = (cfg.mix.sources, [s.path for s in cfg.mix.sources])
        keys["mix.heldout_fraction"] = (cfg.mix.heldout_fraction, cfg.mix.heldout_fraction)
        # the window length, named by the key that sets it here
        window_key = "mix.window_len" if cfg.mix.window_len != other.mix.window_len else "data.max_seq_len"
        keys[window_key] = (cfg.window_len, cfg.mix.window_len or cfg.data.max_seq_len)
    return keys


def _check_one_heldout_text(cfg: Config, stages: list[Config]) -> None:
    """A chain measures forgetting against the original base on one held-out text (every stage reads stage 0's
    held-out windows), so the keys that choose that text must be the same in every stage. Other keys, such as
    data.max_seq_len with mix.heldout_sources given, only pack the text and may differ."""
    if not stages:
        return
    for k, scfg in enumerate(stages[1:], start=1):
        first = _heldout_keys(stages[0], other=scfg)
        for key, (value, shown) in _heldout_keys(scfg, other=stages[0]).items():
            if key not in first or value == first[key][0]:
                continue
            raise ValueError(
                f"stages[{k}] ({cfg.stages[k].name}).{key}={shown} differs from stages[0] ({cfg.stages[0].name}): a"
                f" chain measures forgetting against the original base on one held-out text, so {key} must be the"
                " same in every stage: set it for the whole run, not per stage"
                + (
                    " (with mix.heldout_sources empty, the held-out windows are cut from mix.sources at the window "
                    "length: give mix.heldout_sources, or one mix.window_len for every stage)"
                    if key in ("data.max_seq_len", "mix.window_len")
                    else ""
                )
            )


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


def unknown_keys(tree: dict[str, Any], path: str = "") -> list[str]:
    """Dotted keys of a composed config (plain dicts and lists) that the schema lacks, such as ``train.lrr`` added
    with Hydra's ``+``; below an open mapping (a dict field, e.g. ``sweep.params``) the keys are the user's own."""
    valid = schema_keys(path)
    if valid is None:
        return []
    out = []
    for key, value in tree.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in valid:
            out.append(full)
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                out += unknown_keys(item, full)
    return out


def unknown_key_message(key: str) -> str:
    """The error for a key the schema lacks: ``unknown config key 'train.lrr'. Valid keys of train: method, ...``."""
    parent = re.sub(r"\[\d+\]", "", key).rpartition(".")[0]
    valid = ", ".join(schema_keys(parent) or [])
    return f"unknown config key '{key}'. Valid keys of {parent or 'the root'}: {valid}"


def open_mappings(cls: Any = None, prefix: str = "") -> list[str]:
    """Dotted paths of the dict fields outside lists (``sweep.params``): Hydra's ``+key=value`` may add keys there."""
    cls = cls or Config
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        if typing.get_origin(hints[f.name]) is dict:
            out.append(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            out += open_mappings(hints[f.name], f"{prefix}{f.name}.")
    return out


def source_lists(cls: Any = None, prefix: str = "") -> list[str]:
    """Dotted paths of the ``list[SourceConfig]`` fields (``data.sources``, ``mix.sources``, ...)."""
    cls = cls or Config
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        if hints[f.name] == list[SourceConfig]:
            out.append(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            out += source_lists(hints[f.name], f"{prefix}{f.name}.")
    return out


def _field_type(cls: Any, name: str) -> Any:
    import typing

    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list and args:
        return args[0]
    return hint


# --- composition (Hydra) ---------------------------------------------------------------------------------------


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
    # A stage's overrides are open mappings too: stages.1.train.lr=1e-4 sets the key whether or not the stage file
    # set it (Hydra alone would demand +); stage_config then checks it against the schema.
    groups = "|".join(STAGE_GROUPS)
    overrides = [re.sub(rf"^(?!\+)(stages\.\d+\.(?:{groups})\.)", r"++\1", o) for o in overrides]
    # A source list given one plain path (data.sources=/data/x.jsonl) is the list of that one source.
    lists = "|".join(re.escape(k) for k in source_lists())
    overrides = [
        re.sub(rf"^(\+*(?:{lists}))=(?![\[{{'\"]|null$)(.+)$", lambda m: f"{m[1]}=[{{path:{_quoted(m[2])}}}]", o)
        for o in overrides
    ]
    try:
        overrides = [_given_stages(o, base=base or Path.cwd()) for o in overrides]
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
    return cfg.resolved_paths(base or Path.cwd())


def _quoted(text: str) -> str:
    """``text`` as a single-quoted Hydra override string (a path may hold ':' or ',')."""
    return "'" + text.replace("'", "\\'") + "'"


GIVEN_STAGES = "_given"
"""The conf/stages option that an inline ``stages=[...]`` list or a ``stages=<file>.yaml`` becomes."""


def _given_stages(override: str, *, base: Path) -> str:
    """``stages=[{name: chat}, ...]`` (Hydra's list syntax) or ``stages=path/to/my_stages.yaml`` (a file laid out
    like a conf/stages file, or the list alone; relative to ``base``) as a conf/stages option of its own, so it
    composes exactly as a file in conf/stages does (later ``stages.<index>.*`` overrides included); any other
    override is returned as it is."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    match = re.fullmatch(r"stages=(.*)", override, flags=re.S)
    if not match:
        return override
    value = match.group(1).strip()
    if value.startswith("["):
        node: Any = {"stages": OverridesParser.create().parse_override(override).value()}
    elif value.endswith((".yaml", ".yml")):
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise ConfigError(f"stages={value}: no such file ({path}); give a conf/stages name or a stages .yaml file")
        node = OmegaConf.to_container(OmegaConf.load(path))
        node = {"stages": node} if isinstance(node, list) else node
        if not isinstance(node, dict) or not isinstance(node.get("stages"), list):
            raise ConfigError(f"stages={value}: {path} holds no stages list (stages: [{{name: ...}}, ...])")
    else:
        return override
    ConfigStore.instance().store(group="stages", name=GIVEN_STAGES, node=node, package="_global_")
    return f"stages={GIVEN_STAGES}"


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
