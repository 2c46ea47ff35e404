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
    layout = tuple((a, b, a, 0) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    assert {type(g) for g in attention._plan(layout, torch.device("cpu")).groups} == {tuple, slice}
    torch.manual_seed(1)
    seqs = [torch.randint(0, 50, (n,)) for n in lengths]
    packed = _model(attention.register())
    reference = _model("sdpa")  # eager softmaxes in float32
    reference.load_state_dict(packed.state_dict())
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    assert attention.sequence_bounds(pos) == bounds and attention.layout_of(pos) == layout
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


@pytest.mark.parametrize("shape", [[(4, [3, 6, 1]), (1, [5]), (7, [2, 2])], [(2, [9]), (6, [30, 1, 4, 12])]])
def test_rollouts_sharing_a_packed_prompt_equal_each_rollout_alone(shape):
    """A prompt packed once, its first rollout's response after it and the others' responses alone
    with position ids going on from the prompt's length (batching.collate_packed's share_prompts):
    the responses' outputs and every gradient equal those of each prompt + response run alone."""
    torch.manual_seed(3)
    packed = _model(attention.register())
    reference = _model("sdpa")  # transformers' own SDPA path, one sequence at a time
    reference.load_state_dict(packed.state_dict())
    ids, pos, want_rows, alone = [], [], [], []
    for plen, rlens in shape:
        prompt = torch.randint(0, 50, (plen,)).tolist()
        for j, rlen in enumerate(rlens):
            resp = torch.randint(0, 50, (rlen,)).tolist()
            start = len(ids)
            ids += resp if j else prompt + resp
            pos += list(range(plen, plen + rlen)) if j else list(range(plen + rlen))
            # the packed rows of this response's tokens, and where they sit in prompt + response alone
            want_rows.append((list(range(len(ids) - rlen, len(ids))), list(range(plen, plen + rlen))))
            alone.append(prompt + resp)
            assert start < len(ids)
    ids_t, pos_t = torch.tensor([ids]), torch.tensor([pos])
    layout = attention.layout_of(pos_t)
    assert sum(1 for _, _, _, p in layout if p) == sum(len(r) - 1 for _, r in shape)
    g = torch.Generator().manual_seed(4)
    weights = [torch.randn(len(rows), 50, generator=g, dtype=torch.float64) for rows, _ in want_rows]
    out = packed(input_ids=ids_t, position_ids=pos_t, packed_layout=layout).logits[0]
    loss = sum((out[rows] * w).sum() for (rows, _), w in zip(want_rows, weights, strict=True))
    loss.backward()
    ref_loss = 0.0
    for seq, (rows, own), w in zip(alone, want_rows, weights, strict=True):
        logits = reference(input_ids=torch.tensor([seq])).logits[0]
        torch.testing.assert_close(out[rows], logits[own], rtol=1e-10, atol=1e-10)
        ref_loss = ref_loss + (logits[own] * w).sum()
    ref_loss.backward()
    # transformers' RMSNorm computes in float32 inside a float64 model: a shared prompt's gradient,
    # summed over its responses before the norm's backward here and after it there, rounds apart
    for (name, p), q in zip(packed.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)
    with torch.no_grad():  # the same layout read from the position ids alone
        torch.testing.assert_close(packed(input_ids=ids_t, position_ids=pos_t).logits[0], out.detach())


def test_a_row_continuing_no_prompt_is_refused_naming_the_tokens():
    with pytest.raises(ValueError, match="packed tokens 3:5 start at position 4 but no sequence of at least 4"):
        attention.layout_of(torch.tensor([[0, 1, 2, 4, 5]]))
    assert attention.layout_of(torch.tensor([[0, 1, 2, 3, 2, 3, 0, 1]])) == ((0, 4, 0, 0), (4, 6, 0, 2), (6, 8, 6, 0))
