"""``sftray.eval.plan``: the probes a run asks come from ``data.probes`` (read once, through
``sftray.data.probe_file``), their generation limit from the references, and the base-eval cache path from the
key (none without ``eval.reuse_base_eval``); no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sftray.config import compose_config
from sftray.data.prepared import Prepared
from sftray.eval.plan import plan_eval
from sftray.layout import base_eval_dir
from sftray.models.tiny import ensure_tiny_tokenizer


@pytest.fixture
def inputs(tmp_path: Path, cache_dir):
    probes = tmp_path / "probes.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?", "reference": f"{2 * i}"} for i in range(5)]
    probes.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepared = Prepared(out_dir=tmp_path / "prepared", report={"fingerprint": "f" * 64})
    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_tokenizer(cache_dir))
    base = [f"paths.cache_dir={cache_dir}", f"paths.output_dir={tmp_path / 'out'}", f"data.probes={probes}"]
    return base, prepared, tokenizer


def _plan(inputs, *overrides: str, **kw):
    base, prepared, tokenizer = inputs
    cfg = compose_config([*base, *overrides])
    plan = plan_eval(
        cfg, prepared=prepared, tokenizer=tokenizer, base_model="hub/model", heldout_dir=prepared.heldout_dir, **kw
    )
    return cfg, plan


def test_the_plan_holds_the_files_probes_their_limit_and_the_cache_path(inputs):
    cfg, plan = _plan(inputs, "eval.num_probes=3", "eval.max_new_tokens=null")
    assert [p["prompt"] for p in plan.probes] == [f"What is {i} + {i}?" for i in range(3)]
    assert all(p["prompt_ids"] for p in plan.probes)
    assert 1 < plan.max_new_tokens <= cfg.eval.max_new_tokens_cap  # sized to the short references
    assert Path(plan.base_eval_path).parent == base_eval_dir(cfg.paths.output_dir)
    assert _plan(inputs, "eval.num_probes=3", "eval.max_new_tokens=null")[1] == plan  # the same inputs, the same plan


def test_the_cache_path_follows_the_key_and_reuse_base_eval(inputs):
    _, plan = _plan(inputs, "eval.num_probes=3")
    _, other_probes = _plan(inputs, "eval.num_probes=2")
    earlier = {"chat": ([{"prompt": "p"}], 8)}
    _, later_stage = _plan(inputs, "eval.num_probes=3", earlier_probes=earlier)
    assert len({plan.base_eval_path, other_probes.base_eval_path, later_stage.base_eval_path}) == 3
    assert later_stage.earlier_probes == earlier
    assert _plan(inputs, "eval.num_probes=3", "eval.reuse_base_eval=false")[1].base_eval_path is None


def test_no_probes_without_num_probes(inputs):
    _, plan = _plan(inputs, "eval.num_probes=0", "eval.max_new_tokens=null")
    assert plan.probes == [] and plan.max_new_tokens == 1
