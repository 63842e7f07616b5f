"""Proof that packing is contamination-free: a packed row's logits equal each example's logits run alone.

How transformers 5 isolates packed examples (read in transformers/masking_utils.py, 5.23):

* ``LlamaModel.forward`` calls ``create_causal_mask(config, inputs_embeds, attention_mask, past_key_values,
  position_ids)``.
* ``_preprocess_mask_arguments`` only looks at ``position_ids`` for packing when ``attention_mask is None`` AND
  ``past_key_values is None``. ``use_cache=False`` is therefore required: with the default ``use_cache=True`` the
  model creates a ``DynamicCache`` before building the mask and packing detection is skipped. Passing any 2-D
  ``attention_mask`` (even all ones) also disables it (see the negative controls below).
* ``find_packed_sequence_indices(position_ids)`` starts a new sequence wherever consecutive positions do not
  differ by exactly 1 (``(diff(position_ids) != 1).cumsum(-1)``), so restarting at 0 at every example boundary
  (and in collate's padded tail) yields per-token sequence ids; it returns None when a row holds one sequence.
* ``create_causal_mask`` then wraps the causal mask function in ``packed_sequence_compatibility_function`` =
  ``and_masks(packed_sequence_mask_function, remap_positions_for_packed_sequence(causal, position_ids))``: a
  query attends to a key only if both carry the same sequence id (block-diagonal causal), and it sets
  ``allow_is_causal_skip = False`` so ``sdpa_mask`` / ``eager_mask`` materialise that mask instead of relying on
  sdpa's ``is_causal``. (Flash-attention instead turns the same position_ids into cu_seqlens in
  modeling_flash_attention_utils.py: ``_is_packed_sequence`` / ``prepare_fa_kwargs_from_position_ids``.)

No extra kwarg is needed for sdpa/eager beyond ``attention_mask=None, use_cache=False`` plus the restarting
``position_ids`` that ``pack_examples`` / ``collate_rows`` produce.
"""

from __future__ import annotations

import pytest
import torch

from sftray.data.collate import collate_rows
from sftray.data.packing import pack_examples, pad_examples

transformers = pytest.importorskip("transformers")

LENGTHS = (5, 11, 17, 9)
VOCAB = 128
ATOL = 1e-5
IMPLS = ("sdpa", "eager")


def _model(impl: str):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=impl,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32).eval()
    assert model.config._attn_implementation == impl
    return model


@pytest.fixture(scope="module", params=IMPLS)
def model(request):
    return _model(request.param)


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    g = torch.Generator().manual_seed(1234)
    out = []
    for n in LENGTHS:
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def _alone(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


def _forward(model, batch: dict, **overrides) -> torch.Tensor:
    kwargs = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "attention_mask": batch.get("attention_mask"),
        "use_cache": False,
    }
    kwargs.update(overrides)
    with torch.no_grad():
        return model(**kwargs).logits


def _segments(rows: list[dict]):
    """(row index, start, example) for every example of every row, recognised by its token ids."""
    for i, row in enumerate(rows):
        start = 0
        for n in row["seq_lens"]:
            yield i, start, row["input_ids"][start : start + n]
            start += n


def _packed(examples: list[dict], max_seq_len: int):
    rows = pack_examples(examples, max_seq_len=max_seq_len)
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    return rows, collate_rows(batch, pad_id=0, packed=True, pad_to=max_seq_len)


# max_seq_len=48: all four examples in one row (42 tokens + a 6-token padded tail);
# max_seq_len=24: two rows [17, 5] and [11, 9] in one batch (per-row block masks, tails of 2 and 4 tokens).
@pytest.mark.parametrize("max_seq_len", [48, 24])
def test_packed_logits_equal_alone(model, examples, max_seq_len: int) -> None:
    rows, batch = _packed(examples, max_seq_len)
    assert "attention_mask" not in batch
    assert len(rows) == (1 if max_seq_len == 48 else 2)
    logits = _forward(model, batch)
    assert logits.shape == (len(rows), max_seq_len, VOCAB)
    seen = 0
    for i, start, ids in _segments(rows):
        ref = _alone(model, ids)
        got = logits[i, start : start + len(ids)]
        assert torch.allclose(got, ref, atol=ATOL), (
            f"{model.config._attn_implementation}: example of length {len(ids)} at row {i}, offset {start}: "
            f"max |diff| = {(got - ref).abs().max().item():.3g}"
        )
        seen += 1
    assert seen == len(LENGTHS)


def test_negative_control_no_position_restart_contaminates(model, examples) -> None:
    """Same packed row with position_ids = arange(48): no restart, so transformers sees one sequence and builds a
    plain causal mask. The first example is unaffected (nothing precedes it), every later one attends to its
    predecessors and its logits change. This proves the equality above is not vacuous. (With RoPE the attention
    scores depend only on relative positions, so the shift of absolute positions alone would not change logits:
    the difference comes from attention crossing examples.)"""
    rows, batch = _packed(examples, 48)
    logits = _forward(model, batch, position_ids=torch.arange(48)[None])
    segs = list(_segments(rows))
    _, start, ids = segs[0]
    assert start == 0
    assert torch.allclose(logits[0, : len(ids)], _alone(model, ids), atol=ATOL)
    for _, start, ids in segs[1:]:
        diff = (logits[0, start : start + len(ids)] - _alone(model, ids)).abs().max().item()
        assert diff > 1e-3, f"example at offset {start} unaffected by the examples before it (diff {diff:.3g})"


def test_negative_control_all_ones_attention_mask_contaminates(model, examples) -> None:
    """Restarting position_ids but an explicit 2-D attention_mask of ones: transformers skips packing detection
    whenever a 2-D mask is given, so examples attend across boundaries. This is why packed batches must carry no
    attention_mask (collate_rows(packed=True) omits it)."""
    rows, batch = _packed(examples, 48)
    logits = _forward(model, batch, attention_mask=torch.ones(1, 48, dtype=torch.long))
    segs = list(_segments(rows))
    _, start, ids = segs[1]
    diff = (logits[0, start : start + len(ids)] - _alone(model, ids)).abs().max().item()
    assert diff > 1e-3


def test_negative_control_use_cache_contaminates(model, examples) -> None:
    """With use_cache=True the model creates a DynamicCache before building the mask, and packing detection is
    skipped (it requires past_key_values is None): use_cache=False is part of the contract."""
    rows, batch = _packed(examples, 48)
    logits = _forward(model, batch, use_cache=True)
    _, start, ids = list(_segments(rows))[1]
    diff = (logits[0, start : start + len(ids)] - _alone(model, ids)).abs().max().item()
    assert diff > 1e-3


def test_padded_logits_equal_alone(model, examples) -> None:
    """Padding mode: one example per row, right-padded to 48, with collate's attention_mask."""
    rows = pad_examples(examples)
    batch = collate_rows({k: [r[k] for r in rows] for k in rows[0]}, pad_id=0, packed=False, pad_to=48)
    assert batch["attention_mask"].sum().item() == sum(LENGTHS)
    logits = _forward(model, batch)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ref = _alone(model, ex["input_ids"])
        got = logits[i, :n]
        assert torch.allclose(got, ref, atol=ATOL), (
            f"{model.config._attn_implementation}: padded row {i}: max |diff| = {(got - ref).abs().max().item():.3g}"
        )


def test_packed_hf_loss_equals_alone(model, examples) -> None:
    """The loss of a packed batch (transformers' own causal-LM loss) equals the token-weighted mean of the examples'
    losses run alone: no target crosses an example boundary. Every token is labelled (pretraining / train_on=all)."""
    _, batch = _packed(examples, 48)
    extra = {"shift_labels": batch["shift_labels"]} if "shift_labels" in batch else {"labels": batch["labels"]}
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **extra
        ).loss.item()
        total, count = 0.0, 0
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            total += model(input_ids=ids, labels=ids, use_cache=False).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert packed == pytest.approx(total / count, abs=1e-5)
