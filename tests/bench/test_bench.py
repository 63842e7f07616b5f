"""The bench at its smallest size on the shared Ray instance: every part produces every row, with
plausible values (the figures themselves are the bench's job, not the test's). Without Ray: the throughput part's
configurations, their TRL arguments and its summary."""

from __future__ import annotations

import json
import math

import pytest

from sftray.bench import lm_head, memory, overhead, packing, preprocess, sweep, throughput, workload
from sftray.bench.run import PARTS, run_bench
from sftray.bench.sizes import get_size

TRL_CONFIGS = (
    "TRL default (padding)",
    "TRL packing (BFD)",
    "TRL padding_free",
    "TRL padded + group_by_length",
    "TRL BFD, batch 1 x grad accum",
)
TRL_BF16_CONFIGS = ("TRL BFD, batch 1 x grad accum, bf16", "TRL packing (BFD), bf16")


@pytest.mark.ray
@pytest.mark.slow
def test_smoke_bench_writes_every_row(ray_local, cache_dir, tmp_path):
    size = get_size("smoke")
    results = run_bench(size=size, out_dir=tmp_path, cache_dir=cache_dir)

    names = {part: [r["name"] for r in results[part]] for part in PARTS}
    cells = {(r["dataset"], r["max_seq_len"], r["name"]) for r in results["packing"]}
    assert cells == {(d, n, m) for d in ("demo", "synthetic") for n in size.packing_seq_lens for m in packing.METHODS}
    assert names["throughput"] == [
        "sftray packed",
        "sftray padded",
        "sftray packed, bf16 autocast",
        *TRL_CONFIGS,
        *TRL_BF16_CONFIGS,
    ]
    assert all(r["ratio_to_trl_best"] > 0 for r in results["throughput"])
    assert names["lm_head"] == [lm_head.FULL_ROW, lm_head.TARGETS_ROW]
    assert names["preprocess"] == preprocess.row_names()
    summary = results["summary"]
    assert set(preprocess.SUMMARY_KEYS) <= set(summary) and summary["prep_summary_size"] == size.prep_conversations
    assert all(isinstance(summary[k], float) and summary[k] > 0 for k in preprocess.SUMMARY_KEYS), summary
    # Throughput: sftray packed over the best of the five TRL configurations, the one every row's ratio refers to.
    best = summary["trl_best_config"]
    assert best in TRL_CONFIGS and {r["trl_best"] for r in results["throughput"]} == {best}, summary
    ratios = {r["name"]: r["ratio_to_trl_best"] for r in results["throughput"]}
    assert ratios[best] == 1.0 and max(ratios[n] for n in TRL_CONFIGS) == 1.0, ratios
    assert summary["train_in_process_over_best_trl"] == pytest.approx(ratios["sftray packed"]), summary
    # Overhead: every milestone of the `sftray train` process was measured, in order, before the process ended; the
    # Ray Train path, the in-process step code and TRL trained at some rate on every layout. The ray.init row is
    # there (its value is None here: Ray was already up).
    values = {r["name"]: r["value"] for r in results["overhead"]}
    connected, loop, first_step, wall = (
        values[overhead.TRAIN_CONNECTED_ROW],
        values[overhead.TRAIN_LOOP_ROW],
        values[overhead.TRAIN_ROW],
        values[overhead.TRAIN_WALL_ROW],
    )
    assert 0 < connected < loop < first_step < wall, values
    assert 0 < values[overhead.TRAIN_LAUNCH_ROW] < wall, values
    tps_rows = (
        overhead.RAY_TPS_1,
        overhead.IN_PROCESS_TPS_1,
        overhead.TRL_TPS_1,
        overhead.RAY_TPS_2,
        overhead.RAY_TPS_FSDP,
        overhead.IN_PROCESS_TPS_2,
    )
    for row in tps_rows:
        assert values[row] > 0, (row, values)
    assert overhead.RAY_INIT_ROW in values
    assert summary["first_step_s_warm"] == values[overhead.TRAIN_ROW]
    ratio = min(
        values[overhead.RAY_TPS_1] / values[overhead.IN_PROCESS_TPS_1],
        values[overhead.RAY_TPS_2] / values[overhead.IN_PROCESS_TPS_2],
    )
    assert summary["train_ray_over_in_process"] == pytest.approx(ratio), summary
    fsdp = values[overhead.RAY_TPS_FSDP] / values[overhead.IN_PROCESS_TPS_2]
    assert summary["train_ray_fsdp_over_in_process"] == pytest.approx(fsdp), summary
    # TRL's side of train_ray_over_best_trl: its best configuration of the throughput part, on the Ray run's rows.
    trl_row = next(r for r in results["overhead"] if r["name"] == overhead.TRL_TPS_1)
    assert trl_row["note"].startswith(summary["trl_best_config"]), trl_row
    trl_ratio = values[overhead.RAY_TPS_1] / values[overhead.TRL_TPS_1]
    assert summary["train_ray_over_best_trl"] == pytest.approx(trl_ratio), summary
    # The default sweep (shortened): three trials, the later one started after the first ended and reached its
    # first step; some share of the trial slots' time went to training and eval.
    swept = {r["name"]: r["value"] for r in results["sweep"]}
    assert 0 < swept[sweep.LATER_ROW] < swept[sweep.WALL_ROW], swept
    assert 0 < swept[sweep.BUSY_ROW] and 0 < swept[sweep.SHARE_ROW] < 1, swept
    assert summary["sweep_trial_first_step_s"] == swept[sweep.LATER_ROW]
    assert summary["sweep_overhead_share"] == swept[sweep.SHARE_ROW]
    assert all(isinstance(summary[k], float) for k in (*sweep.SUMMARY_KEYS, *overhead.SUMMARY_KEYS)), summary
    # Every part says whether the machine was loaded while it ran.
    parts = results["meta"]["parts"]
    assert all(isinstance(parts[p]["loaded"], bool) and parts[p]["load_average_max"] >= 0 for p in PARTS), parts
    assert results["meta"]["loaded"] == sorted(p for p in PARTS if parts[p]["loaded"])
    assert [r["method"] for r in results["memory"]] == list(memory.METHODS)

    # The JSON holds what run_bench returned; the markdown has a row for every measured figure.
    assert json.loads((tmp_path / "bench.json").read_text()).keys() == {"meta", "summary", *PARTS}
    table = (tmp_path / "bench.md").read_text()
    for part in PARTS:
        for name in names[part]:
            assert f"| {name} |" in table, name
    for key in (
        *preprocess.SUMMARY_KEYS,
        *throughput.SUMMARY_KEYS,
        *overhead.SUMMARY_KEYS,
        *sweep.SUMMARY_KEYS,
        *lm_head.SUMMARY_KEYS,
    ):
        assert f"| {key} |" in table, key


def test_throughput_configurations():
    """Five float32 TRL candidates for the best; the bf16 rows are measured but never candidates: sftray's bf16 row
    is compared with TRL's in bf16."""
    assert throughput.TRL_CONFIGS == TRL_CONFIGS
    assert throughput.TRL_BF16_CONFIGS == TRL_BF16_CONFIGS
    assert throughput.CONFIGS == (
        "sftray packed",
        "sftray padded",
        "sftray packed, bf16 autocast",
        *TRL_CONFIGS,
        *TRL_BF16_CONFIGS,
    )
    assert throughput.SUMMARY_KEYS == (
        "train_in_process_over_best_trl",
        "trl_best_config",
        "train_bf16_over_best_trl_bf16",
    )


def test_throughput_summary_compares_float32_with_float32_and_bf16_with_bf16():
    medians = dict.fromkeys(throughput.CONFIGS, 100.0)
    medians |= {
        "sftray packed": 150.0,
        "sftray packed, bf16 autocast": 900.0,
        "TRL BFD, batch 1 x grad accum": 120.0,
        "TRL packing (BFD), bf16": 450.0,  # faster than every float32 TRL row: still not the float32 best
    }
    summary = throughput.summarize(medians)
    assert summary == {
        "train_in_process_over_best_trl": 1.25,
        "trl_best_config": "TRL BFD, batch 1 x grad accum",
        "train_bf16_over_best_trl_bf16": 2.0,
    }


def test_throughput_trl_arguments(tmp_path):
    """Every TRL configuration's SFTConfig builds and trains the chosen epoch in exactly ``steps`` optimizer steps:
    group_by_length through transformers 5's sampler option, BFD one row per micro-batch accumulated to sftray
    packed's rows per step."""
    from trl.data_utils import pack_dataset

    from sftray.data.packing import pack_examples

    steps, max_seq_len = 3, 256
    examples = throughput.choose_examples(
        workload.synthetic_examples(n=300, vocab_size=4096), max_seq_len=max_seq_len, rows_per_step=2, steps=steps
    )
    sftray_rows = len(pack_examples(examples, max_seq_len=max_seq_len))
    trl_rows = len(pack_dataset(workload.trl_dataset(examples), max_seq_len, strategy="bfd"))
    rows = {name: len(examples) for name in TRL_CONFIGS} | {
        "TRL packing (BFD)": trl_rows,
        "TRL BFD, batch 1 x grad accum": trl_rows,
    }
    rows |= {"TRL BFD, batch 1 x grad accum, bf16": trl_rows, "TRL packing (BFD), bf16": trl_rows}
    for name in (*TRL_CONFIGS, *TRL_BF16_CONFIGS):
        batch, accum = throughput.trl_layout(name, examples, steps=steps, max_seq_len=max_seq_len)
        args = throughput.trl_args(
            name, batch=batch, grad_accum=accum, steps=steps, max_seq_len=max_seq_len, out_dir=tmp_path
        )
        assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (batch, accum), name
        assert math.ceil(math.ceil(rows[name] / batch) / accum) == steps == args.max_steps, (name, batch, accum)
        grouped = name == "TRL padded + group_by_length"
        assert args.train_sampling_strategy == ("group_by_length" if grouped else "random"), name
        assert args.bf16 == (name in TRL_BF16_CONFIGS) and not args.gradient_checkpointing, name
    bfd_one_row = throughput.trl_layout("TRL BFD, batch 1 x grad accum", examples, steps=steps, max_seq_len=max_seq_len)
    assert bfd_one_row == (1, math.ceil(sftray_rows / steps))


def test_sweep_figures_count_later_trials_from_tunes_start_and_idle_slots_as_overhead():
    """Trials 1 and 2 start together (each pays its process's imports); trial 3 starts after trial 1 ended, so only
    its delay is a later trial's. The share divides by the wall time of both slots."""
    trials = [
        {"start": 100.0, "first_step": 110.0, "ended": 130.0, "busy": 20.0},
        {"start": 100.5, "first_step": 108.0, "ended": 128.0, "busy": 20.0},
        {"start": 131.0, "first_step": 133.5, "ended": 150.0, "busy": 15.0},
    ]
    rows, summary = sweep.rows_and_summary(trials, wall=52.0, slots=2)
    assert summary == {"sweep_trial_first_step_s": 2.5, "sweep_overhead_share": pytest.approx(1 - 55.0 / 104.0)}
    assert {r["name"]: r["value"] for r in rows}[sweep.FIRST_ROW] == 10.0
    with pytest.raises(RuntimeError, match="at least 2 trials"):
        sweep.rows_and_summary(trials[:1], wall=10.0, slots=1)
