"""Bench sizes: every knob that scales the benchmark's cost, in one preset per size (smoke, small, full)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, kw_only=True)
class ModelSize:
    """The random tiny Llama trained by the throughput and memory benches (``tiny_llama_config`` overrides)."""

    hidden_size: int
    intermediate_size: int
    """~8/3 x hidden (SwiGLU ratio), a multiple of 32."""
    num_hidden_layers: int
    num_attention_heads: int
    """hidden_size / 32: 32-dim heads as in the builtin tiny Llama."""
    num_key_value_heads: int
    """Half the query heads (GQA), as in the builtin tiny Llama."""

    def overrides(self) -> dict[str, int]:
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
        }


@dataclass(frozen=True, kw_only=True)
class BenchSize:
    """One preset; ``repeats`` is the default number of timed repetitions (medians are reported)."""

    name: str
    repeats: int
    """Timed repetitions of each throughput / preprocessing figure (the CLI's --repeats overrides it)."""
    threads: int
    """torch CPU threads of every training configuration (the same for sftray and TRL)."""
    demo_conversations: int
    """Demo conversations tokenized for packing and training (the builtin demo has 2000; more are generated)."""
    synthetic_examples: int
    """Examples of the synthetic long-tailed (lognormal) length distribution for packing."""
    packing_seq_lens: tuple[int, ...]
    """max_seq_len values of the packing-efficiency table."""
    model: ModelSize
    train_seq_len: int
    """max_seq_len of the throughput and memory runs."""
    rows_per_step: int
    """sftray packed rows per optimizer step: the batch token budget is rows_per_step x train_seq_len."""
    train_steps: int
    """Optimizer steps per configuration; the first is warm-up, the others are timed."""
    memory_steps: int
    """Optimizer steps before peak RSS is read (AdamW state exists after the first)."""
    prep_conversations: int
    """Conversations through the preprocessing pipeline and its single-process baseline."""
    ray_train_conversations: int
    """Demo conversations of the Ray Train path runs (``sftray.bench.overhead``): enough steps per epoch that
    the epoch's throughput is not its first step's."""
    sweep_overrides: tuple[str, ...] = ()
    """Overrides of the default sweep the ``sweep`` part times (none: ``make sweep`` as it is); ``{bench_model}``
    stands for the folder of the bench's random model."""


_SMOKE_MODEL = ModelSize(
    hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
)
_SMALL_MODEL = ModelSize(
    hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4
)
_FULL_MODEL = ModelSize(
    hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8
)

# The README figures: about 7 minutes on 2 CPU cores.
_SMALL = BenchSize(
    name="small",
    repeats=3,
    threads=1,
    demo_conversations=2000,
    synthetic_examples=5000,
    packing_seq_lens=(256, 1024),
    model=_SMALL_MODEL,
    train_seq_len=256,
    rows_per_step=4,
    train_steps=6,
    memory_steps=3,
    prep_conversations=20000,  # the summary's prep figures at 20k (prep_summary_size); full: 100k
    ray_train_conversations=600,
)

SIZES: dict[str, BenchSize] = {
    # Checks that every figure is produced (tests): seconds of compute per part, values not meaningful.
    "smoke": replace(
        _SMALL,
        name="smoke",
        repeats=1,
        demo_conversations=300,
        synthetic_examples=1000,
        model=_SMOKE_MODEL,
        train_seq_len=128,
        rows_per_step=2,
        train_steps=3,
        memory_steps=2,
        prep_conversations=400,
        ray_train_conversations=100,
        # Three one-epoch trials (two at once, then one in a reused process) of the bench's random model on 200
        # demo conversations; {bench_model} is the bench model's folder.
        sweep_overrides=(
            "model.name_or_path={bench_model}",
            "data.sources=[{path:'builtin:demo',max_rows:200}]",
            "mix=none",
            "sweep.lr.values=[1e-3,2e-3,5e-3]",
            "sweep.epochs=[1]",
            "sweep.seeds=[0]",
            "eval.num_probes=2",
            "eval.max_new_tokens=4",
        ),
    ),
    "small": _SMALL,
    # Closer to real fine-tuning shapes; tens of minutes on 2 cores.
    "full": replace(
        _SMALL,
        name="full",
        threads=2,
        demo_conversations=10000,
        synthetic_examples=50000,
        packing_seq_lens=(256, 1024, 4096),
        model=_FULL_MODEL,
        train_seq_len=512,  # padded configurations run ~50 rows of 512 per step: attention scores stay < 1 GB
        train_steps=12,
        prep_conversations=100000,
        ray_train_conversations=1200,
    ),
}


def get_size(name: str) -> BenchSize:
    """The preset called ``name``; a ValueError lists the valid ones."""
    if name not in SIZES:
        raise ValueError(f"bench size {name!r} is not valid; choose one of: {', '.join(SIZES)}")
    return SIZES[name]
