"""Tune's session for a training loop that runs in the trial's own process (one-worker trials): reports go to
``ray.tune.report``, each epoch's checkpoint is kept in the run folder and Tune records where, and a restarted trial
resumes from the last one Tune recorded.

A one-worker trial needs no Ray Train: no controller, no worker group, no process group; the loop runs here, and
Tune's ``reuse_actors`` keeps this process (and its imports) for the next trial. Trials with several workers keep
a TorchTrainer (``sftray.train.run``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftray.atomic import atomic_dir
from sftray.config import Config

if TYPE_CHECKING:
    import torch

POINTER_FILE = "sftray_checkpoint.json"
"""The one file of the checkpoint Tune keeps: the run folder's epoch checkpoint it stands for. Tune would otherwise
copy the whole model into the trial folder beside the run folder's copy."""


def runs_in_trial(cfg: Config) -> bool:
    """Whether a trial of this configuration runs its training loop in the trial process (one worker, one run)
    rather than launching a TorchTrainer (several workers, or a stage chain)."""
    return cfg.train.num_workers == 1 and not cfg.stages


class TuneSession:
    """The loop's session inside a Tune trial: rank 0 of 1, on the trial's GPU when ``use_gpu`` (Tune gives the
    trial process its GPU) else the CPU; checkpoints kept below ``run_dir``."""

    rank = 0
    world_size = 1

    def __init__(self, *, run_dir: Path, use_gpu: bool) -> None:
        self.run_dir = Path(run_dir)
        self.use_gpu = use_gpu

    def device(self) -> torch.device:
        import torch

        if not self.use_gpu:
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise ValueError("train.use_gpu=true but the trial process sees no GPU")
        torch.cuda.set_device(0)  # Ray makes the trial's own GPU the only visible one
        return torch.device("cuda", 0)

    def checkpoint(self) -> Any:
        import ray.tune

        pointer = ray.tune.get_checkpoint()
        if pointer is None:
            return None
        with pointer.as_directory() as folder:
            path = json.loads((Path(folder) / POINTER_FILE).read_text())["path"]
        return ray.tune.Checkpoint.from_directory(path)

    def report(self, metrics: dict[str, Any], *, checkpoint_dir: Path | None = None, name: str | None = None) -> None:
        import ray.tune

        if checkpoint_dir is None:
            ray.tune.report(metrics)
            return
        assert name is not None, "a checkpoint is kept under its name"
        kept = self.run_dir / name
        with atomic_dir(kept, replace=True) as tmp:  # a restarted trial may write an epoch again
            shutil.copytree(checkpoint_dir, tmp, dirs_exist_ok=True)
        with tempfile.TemporaryDirectory() as pointer:
            (Path(pointer) / POINTER_FILE).write_text(json.dumps({"path": str(kept)}))
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(pointer))
