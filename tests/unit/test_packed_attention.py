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


def test_a_packed_row_attends_within_each_sequence_only():
    lengths = [5, 1, 9, 3]
    torch.manual_seed(1)
    seqs = [torch.randint(0, 50, (n,)) for n in lengths]
    packed = _model(attention.register())
    reference = _model("sdpa")  # eager softmaxes in float32
    reference.load_state_dict(packed.state_dict())
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    assert attention.sequence_bounds(pos) == [0, 5, 6, 15, 18]
    out = packed(input_ids=ids, position_ids=pos, cu_seq_lens_q=attention.sequence_bounds(pos)).logits[0]
    out.square().sum().backward()
    want = torch.cat([reference(input_ids=s[None]).logits[0] for s in seqs])
    want.square().sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    for (name, p), q in zip(packed.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=name)


def test_without_bounds_it_is_plain_causal_attention_and_bad_bounds_are_refused():
    torch.manual_seed(2)
    ids = torch.randint(0, 50, (2, 7))
    packed, reference = _model(attention.register()), _model("sdpa")
    reference.load_state_dict(packed.state_dict())
    torch.testing.assert_close(packed(input_ids=ids).logits, reference(input_ids=ids).logits)
    with pytest.raises(ValueError, match="does not cover the 7 packed tokens"):
        packed(input_ids=ids[:1], cu_seq_lens_q=[0, 3, 6])


def test_models_with_a_sliding_window_keep_their_own_attention():
    from transformers import MistralConfig, Qwen3Config

    assert attention.plain_causal(Qwen3Config())  # sliding_window set, use_sliding_window false
    assert attention.plain_causal(LlamaConfig())
    assert not attention.plain_causal(MistralConfig(sliding_window=16))
    assert not attention.plain_causal(Qwen3Config(use_sliding_window=True, sliding_window=16, max_window_layers=0))
