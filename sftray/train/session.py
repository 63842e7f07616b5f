"""The session a training loop talks to: where it reports results and checkpoints, the checkpoint it resumes from,
its rank, world size and device. ``TrainSession`` is Ray Train's (one per worker of a TorchTrainer); a Ray Tune
trial that runs the loop in its own process hands the loop Tune's (``sftray.tune.session``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


class Session(Protocol):
    """What the loop needs from whatever runs it."""

    rank: int
    world_size: int

    def device(self) -> torch.device:
        """The device this rank trains on."""
        ...

    def checkpoint(self) -> Any:
        """This run's own latest reported checkpoint (a ``ray.train.Checkpoint``) after a restart, else None."""
        ...

    def report(self, metrics: dict[str, Any], *, checkpoint_dir: Path | None = None, name: str | None = None) -> None:
        """Reports ``metrics`` (every rank: a barrier where there are several), with the checkpoint rank 0 wrote in
        ``checkpoint_dir`` kept under the folder name ``name``; returns once the checkpoint is durable."""
        ...


class TrainSession:
    """Ray Train's session of the calling worker."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def checkpoint(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], *, checkpoint_dir: Path | None = None, name: str | None = None) -> None:
        import ray.train

        checkpoint = None
        if checkpoint_dir is not None and self.rank == 0:
            checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        if checkpoint_dir is not None:
            # The controller collects reports by polling (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, train/controller.py): a
            # worker lost before then would take the checkpoint with it. Waiting until it is registered makes it durable before training goes on.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
