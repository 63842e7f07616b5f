"""The training schemas: the base model, LoRA adapters, one training run and its per-epoch eval."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sftray.config.checks import in_range, one_of


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
        one_of("train.lora.between_stages", self.between_stages, ("merge", "continue"))
        in_range("train.lora.r", self.r, ge=1)
        in_range("train.lora.alpha", self.alpha, gt=0)
        in_range("train.lora.dropout", self.dropout, ge=0, lt=1)


@dataclass(kw_only=True)
class TrainConfig:
    """One training run on Ray Train workers."""

    method: str = "lora"
    """full | lora."""
    parallelism: str = "auto"
    """auto | ddp | fsdp (FSDP2 fully_shard per decoder layer). auto: ddp when a full replica of the model with its
    gradients and AdamW state fits a worker's memory with room to spare, fsdp otherwise; decided on the driver and
    logged (``sftray.train.parallelism``)."""
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
    """Peak learning rate (SFT: 2-10x below pretraining). LoRA adapters take ~10x the full fine-tuning LR, so the
    default suits the default method=lora; conf/train/full.yaml sets full fine-tuning's own."""
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
    seed: int | None = None
    """Seed of the training randomness: LoRA's initial adapters, each epoch's row order, dropout and NEFTune noise
    (None: the root seed). The data (split, packing, held-out windows, probes) follows the root seed only, so runs
    that differ here are replicates on the same data (sweep.seeds)."""

    def training_seed(self, root: int) -> int:
        """The seed training draws from: ``seed``, else the config's root seed ``root``."""
        return root if self.seed is None else self.seed

    def __post_init__(self) -> None:
        one_of("train.method", self.method, ("full", "lora"))
        one_of("train.parallelism", self.parallelism, ("auto", "ddp", "fsdp"))
        one_of("train.schedule", self.schedule, ("cosine", "linear", "constant"))
        one_of("train.precision", self.precision, ("auto", "fp32", "bf16"))
        in_range("train.seed", self.seed, ge=0)
        for name in ("num_workers", "epochs", "micro_batch_size", "grad_accum", "log_every_steps", "fail_at_step"):
            in_range(f"train.{name}", getattr(self, name), ge=1)
        for name in ("weight_decay", "max_grad_norm", "neftune_alpha", "eval_every_steps"):
            in_range(f"train.{name}", getattr(self, name), ge=0)
        in_range("train.lr", self.lr, gt=0)
        in_range("train.cpus_per_worker", self.cpus_per_worker, gt=0)
        in_range("train.warmup_ratio", self.warmup_ratio, ge=0, le=1)
        in_range("train.max_failures", self.max_failures, ge=-1)


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
    """Max eval/forgetting (relative rise of held-out pretraining loss) a selectable checkpoint may have; a
    checkpoint past it is ranked below every one within it. Kept small: an SFT run that learns its task should barely
    raise the base model's loss on text it already knew."""
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
        in_range("eval.num_probes", self.num_probes, ge=0)
        in_range("eval.max_new_tokens", self.max_new_tokens, ge=1)
        in_range("eval.max_new_tokens_cap", self.max_new_tokens_cap, ge=1)
        in_range("eval.forgetting_budget", self.forgetting_budget, ge=0)
        in_range("eval.max_eval_rows", self.max_eval_rows, ge=1)
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
