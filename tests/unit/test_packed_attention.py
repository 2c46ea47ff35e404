"""Packed attention (engines/attention.py) against each sequence run alone, in float64."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from scope_ds.engines import attention


def _model(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).double()


@pytest.mark.parametrize("lengths", [[5, 1, 9, 3], [7, 30, 7, 2, 7, 6]])
def test_a_packed_row_attends_within_each_sequence_only(lengths):
    """Sequences of similar length share one padded SDPA call, ragged ones go alone (_plan): both
    kinds, and the reordering back to the row, against each sequence run alone."""
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert {type(g) for g in attention._plan(tuple(bounds), torch.device("cpu")).groups} == {tuple, slice}
    torch.manual_seed(1)
    seqs = [torch.randint(0, 50, (n,)) for n in lengths]
    packed = _model(attention.register())
    reference = _model("sdpa")  # eager softmaxes in float32
    reference.load_state_dict(packed.state_dict())
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    assert attention.sequence_bounds(pos) == bounds
    out = packed(input_ids=ids, position_ids=pos, cu_seq_lens_q=attention.sequence_bounds(pos)).logits[0]
    out.square().sum().backward()
    want = torch.cat([reference(input_ids=s[None]).logits[0] for s in seqs])
    want.square().sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    for (name, p), q in zip(packed.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=name)
    # without the bounds, from the position ids alone (no [N, N] mask is built for a packed row)
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids, position_ids=pos).logits[0], want, rtol=1e-10, atol=1e-10)


def test_without_bounds_it_is_plain_causal_attention_and_bad_bounds_are_refused():
    torch.manual_seed(2)
    ids = torch.randint(0, 50, (2, 7))
    packed, reference = _model(attention.register()), _model("sdpa")
    reference.load_state_dict(packed.state_dict())
    torch.testing.assert_close(packed(input_ids=ids).logits, reference(input_ids=ids).logits)
    torch.testing.assert_close(packed(input_ids=ids[:1]).logits, reference(input_ids=ids[:1]).logits)
    # the padded layout (train.packing=false) keeps its padding mask
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    got, want = packed(input_ids=ids, attention_mask=mask).logits, reference(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()])
    with pytest.raises(ValueError, match="does not cover the 7 packed tokens"):
        packed(input_ids=ids[:1], cu_seq_lens_q=[0, 3, 6])


def test_models_with_a_sliding_window_keep_their_own_attention():
    from transformers import MistralConfig, Qwen3Config

    assert attention.plain_causal(Qwen3Config())  # sliding_window set, use_sliding_window false
    assert attention.plain_causal(LlamaConfig())
    assert not attention.plain_causal(MistralConfig(sliding_window=16))
    assert not attention.plain_causal(Qwen3Config(use_sliding_window=True, sliding_window=16, max_window_layers=0))
