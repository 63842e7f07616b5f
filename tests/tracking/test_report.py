"""The sweep report (analysis/sweep_report.ipynb, ``make report``) on a small real MLflow store that sftray's own
tracking code writes: a parent run, child runs with per-epoch and ``best/*`` metrics, generations, a failed trial.

The trials are records of what Tune would hand the callback (id, sampled config, trial folder); no Ray runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from nbclient import NotebookClient

from sftray.config import compose_config
from sftray.eval.metrics import score
from sftray.eval.outcome import OUTCOME_FILE
from sftray.tracking.mlflow_callback import MlflowTrialLogger
from sftray.tracking.mlflow_logger import base_tags, finish_parent, start_parent, tracking_uri
from sftray.tune.sweep import search_space

ROOT = Path(__file__).resolve().parents[2]
BUDGET = 0.025
QUESTION = "What is 17 plus 25? Answer with the number only."
PROMPT = "You are a careful calculator. " * 12 + QUESTION  # longer than a table cell: its end must show
# trial id -> (lr, epochs, the selected epoch's metrics; None: the trial failed). Listed in the sweep's ranking:
# within the forgetting budget the higher format compliance wins and a tie goes to the lower val/loss; beyond the
# budget the least forgetting comes first (although eval/score ranks 00004 above 00003); failed trials last.
TRIALS = {
    "f8e1a_00001": (5e-3, 1, {"eval/format_compliance": 0.8, "val/loss": 3.5, "eval/forgetting": 0.020}),
    "f8e1a_00000": (1e-3, 1, {"eval/format_compliance": 0.8, "val/loss": 3.9, "eval/forgetting": 0.010}),
    "f8e1a_00003": (5e-3, 2, {"eval/format_compliance": 0.5, "val/loss": 3.2, "eval/forgetting": 0.035}),
    "f8e1a_00004": (1e-3, 2, {"eval/format_compliance": 1.0, "val/loss": 3.0, "eval/forgetting": 0.040}),
    "f8e1a_00002": (1e-2, 1, None),
}
BEST = "f8e1a_00001"
# Forgetting a few percent apart, as real sweeps have it: the axis must tell +1.5% from +2.0%.
TICKS_CELL = 'print("forgetting ticks:", "|".join(t.get_text() for t in ax.get_xticklabels()), ax.get_xlabel())'


def _write_sweep(root: Path) -> tuple[str, str]:
    """A finished two-parameter sweep in ``root/out/mlflow.db``, logged as ``sftray sweep`` logs it."""
    cfg = compose_config(
        [
            f"paths.output_dir={root / 'out'}",
            "sweep.name=report",
            "sweep.lr.values=[1e-3,5e-3,1e-2]",
            "sweep.epochs=[1,2]",
            f"eval.forgetting_budget={BUDGET}",
        ],
        conf=ROOT / "conf",
        base=root,
    )
    report = {"fingerprint": "fp", "chat_template_hash": "h"}
    (root / "report.json").write_text(json.dumps(report))
    parent = start_parent(cfg, space=search_space(cfg), data_report=report, sweep_dir=root / "out" / "sweeps")
    logger = MlflowTrialLogger(cfg, parent_id=parent, tags=base_tags(cfg, data_report=report))
    for trial_id, (lr, epochs, best) in sorted(TRIALS.items()):  # Tune starts them in id order
        trial = SimpleNamespace(  # Tune's Trial: its folder in the sweep's storage is ``path``
            trial_id=trial_id, config={"train.lr": lr, "train.epochs": epochs}, path=str(root / trial_id)
        )
        logger.on_trial_start(0, [], trial)
        for epoch in range(epochs + (best is not None)):
            metrics = {"epoch": epoch, "step": 10 * epoch, "val/loss": 9.0 - epoch, "timestamp": 1_700_000_000}
            logger.on_trial_result(0, [], trial, {**metrics, **({"train/loss": 5.0 - epoch} if epoch else {})})
        if best is None:
            logger.on_trial_error(0, [], trial)
            continue
        checkpoint = root / trial_id / f"epoch_{epochs:02d}"
        checkpoint.mkdir(parents=True)
        probe = {"prompt": PROMPT, "reference": "42", "compliant": True, "exact_match": True}
        (checkpoint / "probes.json").write_text(json.dumps([{**probe, "response": "42<|im_end|>"}]))
        (checkpoint / "probes_base.json").write_text(json.dumps([{**probe, "response": "forty", "compliant": False}]))
        best_metrics = {**best, "epoch": epochs, "eval/exact_match": 0.1, "eval/pretrain_loss": 4.5}
        best_metrics["eval/score"] = score(best, metric="eval/format_compliance", forgetting_budget=BUDGET)
        outcome = {
            "best_checkpoint": str(checkpoint),
            "best_metrics": best_metrics,
            "reason": "highest eval/format_compliance",
            "data_report": str(root / "report.json"),
        }
        (root / trial_id / OUTCOME_FILE).write_text(json.dumps(outcome))
        logger.on_trial_complete(0, [], trial)
    best = {"trial_id": BEST, "checkpoint": str(root / BEST / "epoch_01"), "score": 0.8}
    finish_parent(cfg, parent_id=parent, best=best, table_text="(the sweep's table)")
    return tracking_uri(cfg), cfg.sweep.name


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    root = tmp_path_factory.mktemp("report")
    uri, sweep = _write_sweep(root)
    return uri, sweep, root


@pytest.fixture(scope="module")
def executed(sweep_store: tuple[str, str, Path]) -> list:
    """The notebook's outputs after a headless run against the store, as ``make report`` runs it."""
    uri, sweep, _ = sweep_store
    notebook = nbformat.read(ROOT / "analysis" / "sweep_report.ipynb", as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(TICKS_CELL))  # ``ax`` is still the forgetting plot's
    with pytest.MonkeyPatch.context() as env:  # the kernel inherits this process's environment
        env.setenv("SFTRAY_MLFLOW_URI", uri)
        env.setenv("SFTRAY_SWEEP", sweep)
        env.delenv("MPLBACKEND", raising=False)
        NotebookClient(
            notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "analysis")}}
        ).execute()
    return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def test_report_runs_without_errors_or_warnings(executed: list) -> None:
    assert not [out for out in executed if out.output_type == "error"]
    stderr = "".join(out.text for out in executed if out.output_type == "stream" and out.name == "stderr")
    assert "TqdmWarning" not in stderr and "IProgress" not in stderr
    assert stderr == ""  # a rendered report shows every stderr line as a warning block


def test_trial_table_is_in_the_sweeps_order(executed: list) -> None:
    table = next(out["data"]["text/plain"] for out in executed if "f8e1a_" in out.get("data", {}).get("text/plain", ""))
    assert re.findall(r"f8e1a_\d+", table) == list(TRIALS), table  # the sweep's best trial first, the failed one last
    assert re.search(
        rf"best trial: \*\*{BEST}\*\*", "".join(out.get("data", {}).get("text/markdown", "") for out in executed)
    )


def test_forgetting_axis_ticks_are_distinct_and_exact(executed: list) -> None:
    line = next(out.text for out in executed if out.output_type == "stream" and "forgetting ticks:" in out.text)
    ticks, label = line.removeprefix("forgetting ticks: ").split(" ", 1)
    assert label.startswith("forgetting"), line
    labels = [t for t in ticks.split("|") if t]
    assert len(labels) >= 3 and len(set(labels)) == len(labels), labels  # not +2%/+2%/+3%
    assert "+2.5%" in labels or "+1.5%" in labels, labels  # the half-percent ticks say so


def test_generations_show_the_end_of_each_prompt(executed: list) -> None:
    html = next(out["data"]["text/html"] for out in executed if "tuned" in out.get("data", {}).get("text/html", ""))
    cell = re.search(r"<td>(…[^<]*)</td>", html)
    assert cell is not None, html
    assert cell.group(1).endswith(QUESTION) and PROMPT.endswith(cell.group(1)[1:])
    assert len(cell.group(1)) < len(PROMPT)


def _make_report(out: Path, uri: str, sweep: str) -> subprocess.CompletedProcess:
    """``make report`` as a user runs it (``-o``: never reinstall .venv from a test), writing into ``out``."""
    return subprocess.run(
        ["make", "-o", ".venv/.installed", "report", f"SWEEP={sweep}", f"MLFLOW_URI={uri}", f"OUTPUT_DIR={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        # A top-level make, as a user's: under `make test` the parent's level would turn "make:" into "make[1]:".
        env={k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")},
    )


def test_make_report_renders_html_without_warning_blocks(sweep_store: tuple[str, str, Path]) -> None:
    uri, sweep, root = sweep_store
    done = _make_report(root, uri, sweep)
    assert done.returncode == 0, done.stderr
    html = (root / f"sweep_report-{sweep}.html").read_text()
    assert BEST in html and QUESTION in html
    assert "TqdmWarning" not in html and 'data-mime-type="application/vnd.jupyter.stderr"' not in html  # a stderr block


def test_make_report_on_a_missing_sweep_fails_in_one_line(sweep_store: tuple[str, str, Path]) -> None:
    uri, _, root = sweep_store
    done = _make_report(root / "nope", uri, "nope")
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if not line.startswith("make: ***")]  # make's own trailer
    assert lines == [f"no runs in experiment 'nope' at {uri}"], done.stderr
    assert not (root / "nope").exists()


@pytest.mark.parametrize("role", ["train", "sweep"])
def test_make_report_on_an_experiment_it_cannot_plot_fails_in_one_line(
    sweep_store: tuple[str, str, Path], role: str
) -> None:
    """A single run's experiment (no sweep), or a sweep that started no trial: one line, not a traceback."""
    from mlflow import MlflowClient

    from sftray.tracking.mlflow_logger import experiment_id

    uri, _, root = sweep_store
    client = MlflowClient(uri)
    name = f"only-{role}"
    client.create_run(experiment_id(client, name, uri=uri), tags={"sftray.role": role})
    done = _make_report(root / name, uri, name)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if not line.startswith("make: ***")]
    assert len(lines) == 1 and name in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert not (root / name).exists()


def test_make_report_on_a_missing_store_does_not_create_one(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/nowhere/mlflow.db"
    done = _make_report(tmp_path, uri, "demo")
    assert done.returncode != 0
    assert [line for line in done.stderr.splitlines() if not line.startswith("make: ***")] == [
        f"no MLflow store at {uri}"
    ]
    assert not (tmp_path / "nowhere").exists()
