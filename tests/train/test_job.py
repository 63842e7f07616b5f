"""What Ray Train ships to its controller (the entry point, its config, the RunConfig's callbacks) unpickles without
the loop's or the sweep's imports: each would add seconds to every run's and every trial's start-up."""

from __future__ import annotations

import subprocess
import sys

import cloudpickle

from sftray.config import Config
from sftray.eval.plan import EvalPlan
from sftray.train.job import WorkerJob, train_fn_per_worker
from sftray.tune.reports import ReportsToQueue

HEAVY = ("torch", "transformers", "pandas", "sftray.train.loop", "sftray.tune.sweep")


def _modules_imported_by_unpickling(payload: object, tmp_path, check: str) -> list[str]:
    path = tmp_path / "payload.pkl"
    path.write_bytes(cloudpickle.dumps(payload))  # as Ray pickles it
    code = (
        "import pickle, sys\n"
        f"payload = pickle.loads(open({str(path)!r}, 'rb').read())\n"
        f"assert {check}\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return eval(done.stdout.strip())  # noqa: S307 - our own subprocess prints a list literal


def test_the_controller_unpickles_the_entry_point_and_job_without_torch_or_transformers(tmp_path):
    plan = EvalPlan(probes=[{"prompt": "p"}], max_new_tokens=8)
    job = WorkerJob(cfg=Config(), base_model="m", tokenizer_dir="t", rows_per_rank=3, eval=plan)
    check = "payload[1]['job'].rows_per_rank == 3 and callable(payload[0])"
    assert _modules_imported_by_unpickling((train_fn_per_worker, {"job": job}), tmp_path, check) == []


def test_the_sweeps_report_callback_unpickles_without_the_sweeps_imports(tmp_path):
    # ray.train itself imports pandas: only what sftray would add is checked here.
    imported = _modules_imported_by_unpickling(ReportsToQueue(["queue"]), tmp_path, "payload.reports == ['queue']")
    assert not {"torch", "transformers", "sftray.tune.sweep"} & set(imported), imported
