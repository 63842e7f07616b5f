"""Multi-stage SFT end to end (``sftray.recipes.stages``): the shipped two-stage config through the CLI with the
tests' small data, merge and continue between LoRA stages, resume after a failed stage, and a sweep of a stage key
with a child run per stage in MLflow."""

from __future__ import annotations

import json
import logging
import shlex
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sftray.config import compose_config
from sftray.eval.metrics import EXACT_MATCH, FORGETTING, FORMAT_COMPLIANCE, PRETRAIN_LOSS, stage_metric
from sftray.recipes.stages import read_chain, run_stages
from sftray.train.checkpoint import load_state

main = entry_points(group="console_scripts")["sftray"].load()  # the `sftray` command, as the shell runs it

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
FORMAT = r'\{"result": "[^"]*"\}'
RTOL = 1e-3
"""Stage k+1's epoch 0 is stage k's selected model: merged LoRA weights give the same losses to float32 rounding."""


@pytest.fixture(scope="module")
def setup(ray_local, tmp_path_factory, random_base, training_run):
    """The training tests' run as LoRA on one worker (one step per epoch), and a second stage's files: other
    conversations answered in JSON, and probes that carry that format."""
    root = tmp_path_factory.mktemp("stages")
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"Double {i}."},
                {"role": "assistant", "content": f'{{"result": "{2 * i}"}}'},
            ]
        }
        for i in range(30)
    ]
    (root / "json.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    probes = [
        {"prompt": f"Double {i}.", "reference": f'{{"result": "{2 * i}"}}', "format": FORMAT} for i in (40, 41, 42)
    ]
    (root / "json_probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probes))
    overrides = [
        *training_run(root, root / "out"),
        f"model.name_or_path={random_base}",
        "train.method=lora",
        "train.lr=5e-3",
        "train.epochs=1",
        "train.num_workers=1",
        "train.cpus_per_worker=0.5",
        "train.micro_batch_size=64",
        "train.lora.target_modules=[q_proj,v_proj]",
        "stages=demo_two_stage",  # the shipped chain, its second stage on this test's small files
        "stages.1.data.name=json",
        f"stages.1.data.sources=[{{path:'{root / 'json.jsonl'}'}}]",
        f"stages.1.data.probes={root / 'json_probes.jsonl'}",
        "stages.1.eval.max_new_tokens=null",  # sized to the JSON answers
        "stages.1.data.max_seq_len=96",  # its own packing; forgetting is still measured on stage 1's held-out windows
    ]
    return root, overrides


def _chain_dirs(root: Path) -> set[Path]:
    runs = root / "out" / "runs"
    return set(runs.glob("stages-*")) if runs.is_dir() else set()


def _mlflow_runs(root: Path) -> dict[str, Any]:
    """The ``stages`` experiment's runs in the tests' MLflow store, by run name."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'out' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("stages")
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


@pytest.fixture(scope="module")
def merged_chain(setup, capsys_module):
    """``sftray train stages=...`` whose second stage fails, then the printed resume command (minus the fault).
    Also: the MLflow runs' status after the failure, and the driver's log messages of both commands."""
    root, overrides = setup
    fault = ["stages.1.train.fail_at_step=1", "stages.1.train.max_failures=0"]
    logger, records = logging.getLogger("sftray"), []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        assert main(["train", *overrides, *fault]) == 1
        (chain,) = _chain_dirs(root)
        first = read_chain(chain)
        failed = {name: run.info.status for name, run in _mlflow_runs(root).items()}
        err = capsys_module.readouterr().err
        command = next(line for line in err.splitlines() if line.startswith("resume with:"))
        argv = shlex.split(command.removeprefix("resume with:"))
        assert argv[:2] == ["sftray", "train"] and argv[-1] == f"train.resume_from={chain}"
        assert main([a for a in argv[1:] if a not in fault]) == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return SimpleNamespace(chain=chain, first=first, out=capsys_module.readouterr().out, failed=failed, logs=records)


@pytest.fixture(scope="module")
def capsys_module():
    """Captured stdout/stderr for module-scoped fixtures (pytest's capsys is function-scoped)."""
    import io
    import sys
    from contextlib import redirect_stderr, redirect_stdout

    class Capture:
        def __init__(self) -> None:
            self.out, self.err = io.StringIO(), io.StringIO()

        def readouterr(self):
            result = type("Captured", (), {"out": self.out.getvalue(), "err": self.err.getvalue()})
            self.out, self.err = io.StringIO(), io.StringIO()
            return result

    cap = Capture()

    class Tee:
        def __init__(self, which: str) -> None:
            self.which = which

        def write(self, text: str) -> int:
            getattr(cap, self.which).write(text)
            return len(text)

        def flush(self) -> None:
            pass

    with redirect_stdout(Tee("out")), redirect_stderr(Tee("err")):
        yield cap
    sys.stdout.flush()


def test_a_failed_stage_resumes_without_training_the_finished_stage_again(merged_chain):
    chain, first = merged_chain.chain, merged_chain.first
    assert [r["name"] for r in first] == ["chat"]  # the first stage finished before the second one failed
    stages = read_chain(chain)
    assert [r["name"] for r in stages] == ["chat", "json"]
    assert stages[0] == first[0]  # kept as it was: not trained again
    assert sorted(p.name for p in (chain / "0-chat").glob("epoch_*")) == ["epoch_01"]


def test_merge_starts_the_next_stage_from_the_selected_checkpoint_with_its_adapter_merged(merged_chain):
    chain, out = merged_chain.chain, merged_chain.out
    chat, js = read_chain(chain)
    assert js["model"] == str(chain / "0-chat-merged") and js["init_adapter"] is None
    assert (chain / "0-chat-merged" / "config.json").is_file()
    assert (Path(js["best_checkpoint"]) / "model" / "adapter_config.json").is_file()  # a new adapter on top
    start = next(h for h in js["history"] if h["epoch"] == 0)  # stage 2's epoch 0: stage 1's selected model
    assert start[PRETRAIN_LOSS] == pytest.approx(chat["best_metrics"][PRETRAIN_LOSS], rel=RTOL)
    # forgetting of every stage is relative to the original base (stage 1's epoch 0), not to the stage's start
    base = next(h for h in chat["history"] if h["epoch"] == 0)[PRETRAIN_LOSS]
    for row in js["history"]:
        assert row[FORGETTING] == pytest.approx(row[PRETRAIN_LOSS] / base - 1, rel=1e-6)
        # every eval of stage 2 also asks stage 1's probes
        assert 0 <= row[stage_metric("chat", FORMAT_COMPLIANCE)] <= 1 and stage_metric("chat", EXACT_MATCH) in row
    assert start[stage_metric("chat", FORMAT_COMPLIANCE)] == pytest.approx(
        chat["best_metrics"][FORMAT_COMPLIANCE], abs=1 / 4 + 1e-9
    )  # the same model asked the same 4 probes (greedy; merged weights may flip at most one close call)
    assert "json" in out and "earlier stages' probes" in out and "chat " in out
    # what each stage trains from, as it is: stage 2 the merged weights, not the run's model.name_or_path
    trains = [m for m in merged_chain.logs if m.startswith("training ")]
    assert any(m.startswith(f"training {chat['model']} ") for m in trains), trains
    assert any(m.startswith(f"training {chain / '0-chat-merged'} ") for m in trains), trains


def test_the_chain_is_one_mlflow_run_with_a_child_per_stage(setup, merged_chain):
    from mlflow import MlflowClient

    root, _ = setup
    chain = merged_chain.chain
    # the failed command ended its runs: the chain FAILED (not RUNNING forever), the finished stage FINISHED
    assert merged_chain.failed == {chain.name: "FAILED", "0-chat": "FINISHED"}
    client = MlflowClient(f"sqlite:///{root / 'out' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("stages")
    (parent,) = client.search_runs([experiment.experiment_id], filter_string="tags.`sftray.role` = 'chain'")
    assert parent.info.run_name == chain.name and parent.info.status == "FINISHED"  # the resume reused and ended it
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert sorted(c.info.run_name for c in children) == ["0-chat", "1-json"]
    js = next(c for c in children if c.info.run_name == "1-json")
    assert js.data.params["data.name"] == "json" and js.data.tags["best_checkpoint"].endswith("epoch_01")
    history = client.get_metric_history(js.info.run_id, stage_metric("chat", FORMAT_COMPLIANCE))
    assert sorted(m.step for m in history) == [0, 1]  # the base row and the epoch
    for child in children:  # each stage's selected adapter and its data report, downloadable from the store
        assert {"model", "report.json", "generations"} <= {a.path for a in client.list_artifacts(child.info.run_id)}


def test_continue_trains_the_same_adapter_on(setup):
    root, overrides = setup
    cfg = compose_config(
        [*overrides, "stages.1.train.lora.between_stages=continue", "stages.1.train.lora.r=4"], conf=CONF, base=root
    )
    chat, js = run_stages(cfg, chain_dir=root / "continued")
    assert js["model"] == chat["model"]  # the same weights below the adapter
    assert js["init_adapter"] == str(Path(chat["best_checkpoint"]) / "model")
    assert not (root / "continued" / "0-chat-merged").exists()
    adapter = json.loads((Path(js["best_checkpoint"]) / "model" / "adapter_config.json").read_text())
    assert adapter["r"] == cfg.train.lora.r != 4  # the adapter's own rank: continue trains it, not a new one
    start = next(h for h in js["history"] if h["epoch"] == 0)
    assert start[PRETRAIN_LOSS] == pytest.approx(chat["best_metrics"][PRETRAIN_LOSS], rel=1e-5)
    assert load_state(Path(js["best_checkpoint"]))["step"] == 1  # a new run: steps count from the stage's start


def test_a_stage_key_is_swept_and_each_trial_logs_a_child_run_per_stage(setup):
    from mlflow import MlflowClient

    from sftray.recipes.sweep import sweep

    root, overrides = setup
    out = root / "sweep_out"
    cfg = compose_config(
        [
            *[o for o in overrides if not o.startswith("paths.output_dir=")],
            f"paths.output_dir={out}",
            "sweep.name=staged",
            "sweep.lr.values=[]",
            "sweep.seeds=[0]",
            "sweep.epochs=[]",
            "+sweep.params.stages.1.train.lr=[1e-3,1e-2]",
        ],
        conf=CONF,
        base=root,
    )
    outcome = sweep(cfg)
    assert sorted(r["status"] for r in outcome.trials) == ["finished", "finished"]
    lrs = set()
    for row in outcome.trials:
        stages = row["outcome"]["stages"]
        assert [s["name"] for s in stages] == ["chat", "json"]
        lrs.add(load_state(Path(stages[1]["best_checkpoint"]))["scheduler"]["base_lrs"][0])
        assert row["checkpoint"] == stages[1]["best_checkpoint"]  # a trial is ranked by its last stage
    assert lrs == {1e-3, 1e-2}
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("staged")
    trials = client.search_runs([experiment.experiment_id], filter_string="tags.`sftray.role` = 'trial'")
    assert len(trials) == 2
    for trial in trials:
        children = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'"
        )
        assert sorted(c.info.run_name for c in children) == ["0-chat", "1-json"]
        json_run = next(c for c in children if c.info.run_name == "1-json")
        assert float(json_run.data.params["train.lr"]) == float(trial.data.params["stages.1.train.lr"])
        assert client.get_metric_history(json_run.info.run_id, stage_metric("chat", FORMAT_COMPLIANCE))
