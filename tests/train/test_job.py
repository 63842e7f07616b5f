"""``sftray.train.job``: Train's controller can unpickle the entry point and the job without the loop's imports."""

from __future__ import annotations

import subprocess
import sys

import cloudpickle

from sftray.config import Config
from sftray.train.job import WorkerJob, train_fn_per_worker


def test_the_controller_unpickles_the_entry_point_and_job_without_torch_or_transformers(tmp_path):
    # What Ray Train ships to its controller: the entry point and its config (pickled as Ray pickles them).
    job = WorkerJob(cfg=Config(), base_model="m", tokenizer_dir="t", rows_per_rank=3, probes=[{"prompt": "p"}])
    payload = tmp_path / "payload.pkl"
    payload.write_bytes(cloudpickle.dumps((train_fn_per_worker, {"job": job})))
    code = (
        "import pickle, sys\n"
        f"fn, config = pickle.loads(open({str(payload)!r}, 'rb').read())\n"
        "assert config['job'].rows_per_rank == 3 and callable(fn)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'pandas', 'sftray.train.loop') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
