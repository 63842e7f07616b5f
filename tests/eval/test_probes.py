"""``sftray.eval.probes``: the verdict on one generated response, the generation limit sized to the reference
answers, and the warning when probes cannot comply within it (pure)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from sftray.config import DataConfig
from sftray.eval.probes import extract_answer, generation_limit, judge, probes_from_file, reference_lengths
from sftray.models.tiny import ensure_tiny_tokenizer


def test_long_answers_get_a_limit_they_fit_in(cache_dir):
    tok = AutoTokenizer.from_pretrained(ensure_tiny_tokenizer(cache_dir))
    # Worked solutions of ~190 tokens: a fixed 32-token limit makes every probe non-compliant.
    answers = [" ".join(f"step {i} adds {j} to the total" for j in range(24 + i % 5)) for i in range(40)]
    lengths = reference_lengths([{"reference": a} for a in answers] + [{"reference": None}], tokenizer=tok)
    assert len(lengths) == 40 and min(lengths) > 150
    limit, warning = generation_limit(lengths, configured=None, cap=512)
    assert limit >= max(lengths) and not warning
    limit, warning = generation_limit(lengths, configured=32, cap=512)
    assert limit == 32
    assert "40 of 40 generation probes have reference answers longer than eval.max_new_tokens=32" in warning
    assert "eval/format_compliance is at most 0%" in warning


def test_the_cap_bounds_the_sized_limit_and_says_what_it_costs():
    limit, warning = generation_limit([10] * 19 + [400], configured=None, cap=64)
    assert limit == 21  # 95th percentile (10) x 1.25 + 8: one outlier does not set the limit
    assert "1 of 20 generation probes" in warning and "at most 95%" in warning
    limit, warning = generation_limit([300] * 4, configured=None, cap=64)
    assert limit == 64 and "eval.max_new_tokens_cap=64" in warning
    assert generation_limit([], configured=None, cap=512) == (64, "")


def test_probe_verdicts(cache_dir):
    tok = AutoTokenizer.from_pretrained(ensure_tiny_tokenizer(cache_dir))
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    kw = dict(tokenizer=tok, end_of_turn_id=eot, user_opener="<|im_start|>user")
    ok = judge(enc("42") + [eot] + enc("junk after the end"), reference="42", **kw)
    assert ok["compliant"] and ok["exact_match"] and ok["response"] == "42"
    assert not judge(enc("42 and on and on"), reference="42", **kw)["compliant"]  # never ended
    assert not judge([eot], reference="42", **kw)["compliant"]  # empty answer
    leak = judge(enc("42") + enc("<|im_start|>user\nmore") + [eot], reference="42", **kw)
    assert leak["role_leak"] and not leak["compliant"]
    wrong = judge(enc("41") + [eot], reference="42", **kw)
    assert wrong["compliant"] and not wrong["exact_match"]


def test_a_probe_with_a_format_complies_only_in_that_format(cache_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(ensure_tiny_tokenizer(cache_dir))
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    kw = dict(tokenizer=tok, end_of_turn_id=eot, user_opener="<|im_start|>user", reference='{"result": "42"}')
    pattern = r'\{"result": "[^"]*"\}'
    assert judge(enc('{"result": "41"}') + [eot], pattern=pattern, **kw)["compliant"]
    assert not judge(enc("42") + [eot], pattern=pattern, **kw)["compliant"]  # ended, but not in the format
    assert not judge(enc('{"result": "42"} and more') + [eot], pattern=pattern, **kw)["compliant"]  # whole answer
    assert judge(enc("42") + [eot], **kw)["compliant"]  # no format: any ended answer complies

    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": "6 x 7?", "reference": '{"result": "42"}', "format": pattern}) + "\n")
    (probe,) = probes_from_file(_data(probes, {}), cache_dir=cache_dir, tokenizer=tok, limit=8)
    assert probe["format"] == pattern
    probes.write_text('{"prompt": "a"}\n{"prompt": "b", "format": "([a-z"}\n')
    with pytest.raises(ValueError, match=r"probes.jsonl:2: 'format' is not a regular expression"):
        probes_from_file(_data(probes, {}), cache_dir=cache_dir, tokenizer=tok, limit=8)


GSM8K_REFERENCE = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether she sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
)
GSM8K_PATTERN = r"#### *(\S+)"


def test_answer_pattern_compares_the_final_answers_not_the_worked_solutions(cache_dir):
    tok = AutoTokenizer.from_pretrained(ensure_tiny_tokenizer(cache_dir))
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    kw = dict(tokenizer=tok, end_of_turn_id=eot, user_opener="<|im_start|>user", reference=GSM8K_REFERENCE)
    other_working = enc("48 / 2 = 24 in May, 48 + 24 = 72 in all.\n#### 72") + [eot]
    assert not judge(other_working, **kw)["exact_match"]  # whole response vs whole solution: 0 by construction
    right = judge(other_working, answer_pattern=GSM8K_PATTERN, **kw)
    assert right["exact_match"] and right["answer"] == "72" and right["reference_answer"] == "72"
    wrong = judge(enc("48 + 48 = 96\n#### 96") + [eot], answer_pattern=GSM8K_PATTERN, **kw)
    assert wrong["compliant"] and not wrong["exact_match"] and wrong["answer"] == "96"
    none = judge(enc("It is 72.") + [eot], answer_pattern=GSM8K_PATTERN, **kw)
    assert not none["exact_match"] and none["answer"] is None  # no final answer in the pattern's form
    assert extract_answer("#### 1\nthen #### 2 ", GSM8K_PATTERN) == "2"  # the last match: the final answer
    assert extract_answer("no answer", GSM8K_PATTERN) is None


def test_probe_files_take_the_columns_mapping_of_data_sources(cache_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(ensure_tiny_tokenizer(cache_dir))
    gsm8k = tmp_path / "gsm8k_test.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(3)]
    gsm8k.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for columns in ({"prompt": "question", "reference": "answer"}, {"prompt": "question", "completion": "answer"}):
        probes = probes_from_file(_data(gsm8k, columns), cache_dir=cache_dir, tokenizer=tok, limit=8)
        assert [p["prompt"] for p in probes] == [r["question"] for r in rows], columns
        assert [p["reference"] for p in probes] == [r["answer"] for r in rows], columns
    with pytest.raises(
        ValueError, match=r"gsm8k_test.jsonl:1: a probe needs 'prompt'.* has answer, question.*data.probe_columns"
    ):
        probes_from_file(_data(gsm8k, {}), cache_dir=cache_dir, tokenizer=tok, limit=8)  # unmapped: names the fix


def _data(probes, columns: dict[str, str]) -> DataConfig:
    return DataConfig(probes=str(probes), probe_columns=columns)
