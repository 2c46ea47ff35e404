"""The embedded server's lean decode step (rollout/server/lean.py) against transformers' own
forward: every step's logits equal a float64 forward of the whole left-padded sequence so far,
for each architecture it serves, and the engine decodes the same tokens through either path."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from scope_ds.rollout.server.engine import Engine, _kv_of, _Seq
from scope_ds.rollout.server.lean import LeanDecode
from scope_ds.rollout.server.requests import GenItem
from scope_ds.rollout.server.sampling import SamplingSpec

V = 50
SHAPE = dict(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128)


def _models() -> dict[str, torch.nn.Module]:
    """Tiny random models of each architecture, with the features the step must follow."""
    torch.manual_seed(0)
    return {
        # grouped-query attention, biases everywhere, a rope type of its own, untied head
        "llama": LlamaForCausalLM(
            LlamaConfig(
                **SHAPE,
                num_attention_heads=4,
                num_key_value_heads=2,
                attention_bias=True,
                mlp_bias=True,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
            )
        ),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(**SHAPE, num_attention_heads=4, num_key_value_heads=4)),
        "qwen3": Qwen3ForCausalLM(Qwen3Config(**SHAPE, num_attention_heads=6, num_key_value_heads=2, head_dim=16)),
    }


def _perturb(model: torch.nn.Module, g: torch.Generator) -> None:
    """Norm weights away from 1 and biases away from 0 (their initial values), so that a norm or
    a bias applied wrongly, or not at all, shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_each_steps_logits_equal_a_float64_forward_of_the_whole_padded_sequence(kind):
    g = torch.Generator().manual_seed(1)
    model = _models()[kind].eval()
    _perturb(model, g)
    step, why = LeanDecode.of(model)
    assert step is not None, why
    reference = _models()[kind].eval().double()
    reference.load_state_dict(model.state_dict())
    lengths = [3, 9, 6]  # left padding of 6, 0 and 3 positions
    t = max(lengths)
    ids_BT = torch.zeros(3, t, dtype=torch.long)
    mask_BT = torch.zeros(3, t, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids_BT[i, t - n :] = torch.randint(1, V, (n,), generator=g)
        mask_BT[i, t - n :] = 1
    with torch.inference_mode():
        pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=pos_BT, use_cache=True)
        kv, logits_BV, next_pos_B = _kv_of(out.past_key_values), out.logits[:, -1], mask_BT.sum(-1)
        for n in range(20):
            ids_B = torch.multinomial(logits_BV.softmax(-1), 1, generator=g).squeeze(-1)  # not greedy: more paths
            ids_BT = torch.cat([ids_BT, ids_B[:, None]], 1)
            mask_BT = torch.cat([mask_BT, torch.ones(3, 1, dtype=torch.long)], 1)
            logits_BV = step(ids_B, next_pos_B, mask_BT, kv)
            next_pos_B = next_pos_B + 1
            pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
            want = reference(input_ids=ids_BT, attention_mask=mask_BT, position_ids=pos_BT).logits[:, -1]
            torch.testing.assert_close(logits_BV.double(), want, rtol=0, atol=2e-5, msg=f"{kind}, step {n}")


def test_rows_without_padding_may_pass_no_mask():
    g = torch.Generator().manual_seed(2)
    model = _models()["qwen3"].eval()
    step = LeanDecode.of(model)[0]
    ids_BT = torch.randint(1, V, (2, 5), generator=g)
    with torch.inference_mode():
        kv_a = _kv_of(model(input_ids=ids_BT, use_cache=True).past_key_values)
        kv_b = _kv_of(model(input_ids=ids_BT, use_cache=True).past_key_values)
        ids_B, pos_B = torch.tensor([4, 7]), torch.tensor([5, 5])
        with_mask = step(ids_B, pos_B, torch.ones(2, 6, dtype=torch.long), kv_a)
        without = step(ids_B, pos_B, None, kv_b)
    torch.testing.assert_close(with_mask, without, rtol=0, atol=1e-6)


def test_other_architectures_keep_transformers_forward_and_say_why():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    step, why = LeanDecode.of(model)
    assert step is None and "gpt2" in why
    engine = Engine(model, context_len=64, eos_ids=set())
    assert engine.decode_path.startswith("transformers") and "gpt2" in engine.decode_path
    windowed = LlamaForCausalLM(LlamaConfig(**SHAPE, num_attention_heads=4))
    windowed.config.model_type, windowed.config.sliding_window = "mistral", 16
    assert "window" in LeanDecode.of(windowed)[1]


def _generate(model: torch.nn.Module, lean: bool) -> list[tuple[list[int], list[float]]]:
    """Seeded sampling of rows that end at different lengths (rows leave the batch mid-way)."""
    engine = Engine(model, context_len=128, eos_ids=set(), lean_decode=lean, seed=0)
    assert engine.decode_path == "lean" if lean else engine.decode_path.startswith("transformers")
    loop = asyncio.new_event_loop()
    seqs = [
        _Seq(
            GenItem(
                prompt_ids=[(5 * i + j) % (V - 1) + 1 for j in range(2 + 3 * i)],
                spec=SamplingSpec(max_new_tokens=6 + 5 * (i % 3), seed=100 + i),
                rid=str(i),
                parent_rid="p",
            ),
            loop,
            128,
        )
        for i in range(5)
    ]
    with torch.inference_mode():
        batch = engine._prefill(seqs)
        while batch is not None:
            batch = engine._decode(batch)
    loop.close()
    return [(s.output_ids, s.logprobs) for s in seqs]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_the_engine_samples_the_same_tokens_through_either_path(kind):
    model = _models()[kind].eval()
    lean, plain = _generate(model, True), _generate(model, False)
    assert [len(ids) for ids, _ in lean] == [6, 11, 16, 6, 11]
    for (ids_a, lp_a), (ids_b, lp_b) in zip(lean, plain, strict=True):
        assert ids_a == ids_b
        torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_b), rtol=0, atol=1e-5)
