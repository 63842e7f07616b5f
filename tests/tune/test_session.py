"""Tune's session for a loop in the trial process (no Ray running): where an epoch's checkpoint is kept, what Tune is
handed for it, and the checkpoint a restarted trial resumes from."""

from __future__ import annotations

from pathlib import Path

import ray.tune

from sftray.tune.session import POINTER_FILE, TuneSession


def test_an_epoch_checkpoint_is_kept_in_the_run_folder_and_tune_resumes_from_it(tmp_path, monkeypatch):
    reported = []

    def report(metrics, *, checkpoint=None):
        # Tune copies the reported folder into the trial's own: keep a copy the way it would.
        kept = None
        if checkpoint is not None:
            kept = tmp_path / "tune" / f"checkpoint_{len(reported):06d}"
            kept.mkdir(parents=True)
            (kept / POINTER_FILE).write_text((Path(checkpoint.path) / POINTER_FILE).read_text())
        reported.append((metrics, kept))

    monkeypatch.setattr(ray.tune, "report", report)
    monkeypatch.setattr(ray.tune, "get_checkpoint", lambda: None)
    session = TuneSession(run_dir=tmp_path / "run", use_gpu=False)
    assert (session.rank, session.world_size, session.device().type) == (0, 1, "cpu")
    assert session.checkpoint() is None  # a fresh trial

    session.report({"epoch": 0})
    written = tmp_path / "written"
    written.mkdir()
    (written / "train_state.pt").write_text("state")
    (written / "model").mkdir()
    session.report({"epoch": 1}, checkpoint_dir=written, name="epoch_01")

    assert [m for m, _ in reported] == [{"epoch": 0}, {"epoch": 1}] and reported[0][1] is None
    kept = tmp_path / "run" / "epoch_01"
    assert (kept / "train_state.pt").read_text() == "state" and (kept / "model").is_dir()
    assert [p.name for p in reported[1][1].iterdir()] == [POINTER_FILE]  # Tune keeps a pointer, not the model

    monkeypatch.setattr(ray.tune, "get_checkpoint", lambda: ray.tune.Checkpoint.from_directory(str(reported[1][1])))
    assert session.checkpoint().path == str(kept)  # a restarted trial resumes from the run folder's epoch
