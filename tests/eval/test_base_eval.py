"""``sftray.eval.base_eval``: the key changes with every input of the base model's eval and with nothing else;
the cache round-trips; the lock serialises two processes."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest

from sftray.config import compose_config
from sftray.eval import base_eval

PROBES = [{"prompt": "What is 2 plus 3?", "reference": "5"}]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"0" * 64)
    return folder


def _key(model_dir: Path, *overrides: str, fingerprint: str = "data-1", probes=PROBES, limit: int = 16) -> str:
    cfg = compose_config(list(overrides))
    return base_eval.base_eval_key(
        cfg, base_model=str(model_dir), data_fingerprint=fingerprint, probes=probes, max_new_tokens=limit
    )


def test_every_input_changes_the_key_and_selection_knobs_do_not(model_dir):
    key = _key(model_dir)
    assert _key(model_dir) == key  # stable
    changed = {
        "data": _key(model_dir, fingerprint="data-2"),
        "probes": _key(model_dir, probes=[{"prompt": "What is 2 plus 4?", "reference": "6"}]),
        "limit": _key(model_dir, limit=17),
        "eval rows": _key(model_dir, "eval.max_eval_rows=128"),
        "num probes": _key(model_dir, "eval.num_probes=8"),
        "method": _key(model_dir, "train=full"),
        "micro batch": _key(model_dir, "train.micro_batch_size=3"),
    }
    (model_dir / "model.safetensors").write_bytes(b"1" * 65)  # new weights
    changed["weights"] = _key(model_dir)
    assert all(k != key for k in changed.values()), changed
    assert len(set(changed.values())) == len(changed)
    (model_dir / "model.safetensors").write_bytes(b"0" * 64)
    unchanged = _key(model_dir, "eval.forgetting_budget=0.05", "eval.select_metric=val/loss", "train.lr=1e-5")
    assert unchanged == _key(model_dir)


def test_cache_round_trip(tmp_path):
    path = base_eval.cache_path(tmp_path, "abc")
    assert base_eval.load(path) is None
    base_eval.save(path, {"val/loss": 1.5}, [{"prompt": "p", "compliant": True}])
    assert base_eval.load(path) == ({"val/loss": 1.5}, [{"prompt": "p", "compliant": True}])
    assert path == tmp_path / "base_eval" / "abc.json"


def _hold(path: str, seconds: float, started) -> None:
    with base_eval.locked(Path(path)):
        started.set()
        time.sleep(seconds)


def test_the_lock_makes_a_second_process_wait(tmp_path):
    path = tmp_path / "base_eval" / "k.json"
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(path), 1.5, started))
    holder.start()
    assert started.wait(60)
    waited = time.perf_counter()
    with base_eval.locked(path):
        waited = time.perf_counter() - waited
    holder.join(30)
    assert waited > 0.5  # it waited for the holder to finish, not an instant grab
