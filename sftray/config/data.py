"""The data schemas: sources (and the fields of each format), pruning, the SFT conversations and the mixed-in text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from sftray.config.checks import in_range, one_of

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text")
TRAIN_ON = ("all_assistant", "last_assistant", "all")
ON_ERROR = ("raise", "drop")
OVERLENGTH = ("drop", "truncate")
DEDUP = ("none", "exact", "near")
PROBE_FIELDS = ("prompt", "messages", "reference", "format")
"""A probe record's own fields (``sftray.data.probe_file``); ``data.probe_columns`` may also map a chat format's."""


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


def _check_sources(name: str, sources: list, *, chat: bool, weighted: bool = False) -> None:
    """Each source's format and mappings; ``weighted``: the list whose sources may set weight / max_rows."""
    valid = tuple(f for f in FORMATS if f != "text") if chat else ("auto", "text")
    for i, src in enumerate(sources):
        one_of(f"{name}[{i}].format", src.format, valid)
        in_range(f"{name}[{i}].weight", src.weight, gt=0)
        in_range(f"{name}[{i}].max_rows", src.max_rows, ge=1)
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
        in_range("data.prune.drop_highest", self.drop_highest, ge=0, lt=1)
        in_range("data.prune.drop_lowest", self.drop_lowest, ge=0, lt=1)
        if self.drop_highest + self.drop_lowest >= 1:
            raise ValueError(
                f"data.prune.drop_highest={self.drop_highest} + data.prune.drop_lowest={self.drop_lowest} must be < 1:"
                " together they would drop every training conversation"
            )
        in_range("data.prune.batch_size", self.batch_size, ge=1)
        in_range("data.prune.num_scorers", self.num_scorers, ge=1)
        in_range("data.prune.num_gpus_per_scorer", self.num_gpus_per_scorer, ge=0)
        in_range("data.prune.cpus_per_scorer", self.cpus_per_scorer, gt=0)


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
        one_of("data.train_on", self.train_on, TRAIN_ON)
        one_of("data.on_error", self.on_error, ON_ERROR)
        one_of("data.overlength", self.overlength, OVERLENGTH)
        one_of("data.dedup", self.dedup, DEDUP)
        in_range("data.near_threshold", self.near_threshold, gt=0, lt=1)
        in_range("data.minhash_perm", self.minhash_perm, ge=16)
        in_range("data.shingle_words", self.shingle_words, ge=1)
        in_range("data.min_assistant_tokens", self.min_assistant_tokens, ge=0)
        in_range("data.max_assistant_tokens", self.max_assistant_tokens, ge=max(1, self.min_assistant_tokens))
        in_range("data.max_turns", self.max_turns, ge=1)
        in_range("data.min_assistant_ratio", self.min_assistant_ratio, ge=0)
        in_range("data.val_fraction", self.val_fraction, ge=0, lt=1)
        in_range("data.max_seq_len", self.max_seq_len, ge=8)
        in_range("data.pack_group_size", self.pack_group_size, ge=1)
        in_range("data.num_encoders", self.num_encoders, ge=1)
        in_range("data.cpus_per_encoder", self.cpus_per_encoder, gt=0)
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
        in_range("mix.ratio", self.ratio, ge=0, lt=1)
        in_range("mix.max_repeats", self.max_repeats, ge=1)
        in_range("mix.heldout_fraction", self.heldout_fraction, ge=0, lt=1)
        _check_sources("mix.sources", self.sources, chat=False)
        _check_sources("mix.heldout_sources", self.heldout_sources, chat=False)
        for i, src in enumerate(self.heldout_sources):
            if src.path in {s.path for s in self.sources}:
                raise ValueError(
                    f"mix.heldout_sources[{i}].path={src.path!r} is also in mix.sources: held-out text must never be "
                    "mixed into training; remove it from one of them"
                )
        in_range("mix.window_len", self.window_len, ge=8)
        in_range("mix.max_heldout_windows", self.max_heldout_windows, ge=1)
