"""Packed micro-batches: balanced by tokens, within budget, and per-token statistics equal to those
of each rollout on its own (a plain float64 forward) and to the padded path's, with gradients.

The engines here wrap plain Hugging Face models (no DeepSpeed): what is under test is the packing,
the position ids, the LM head's statistics and the unpacking; tests/integration/test_train.py runs
the same path under ZeRO-3 on two ranks.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from scope_ds.engines import attention
from scope_ds.engines.batching import (
    balance_by_tokens,
    collate,
    collate_packed,
    pack_by_tokens,
    plan_micro_batches,
    share_units,
)
from scope_ds.engines.models import InferenceEngine, StatsHead, _Engine
from scope_ds.records import Rollout

VOCAB = 1000


def _model(seed: int, attn: str = "sdpa", tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


def _engine(model, cls=_Engine):
    """An engine around a plain model: the engine's own forward is the model's."""
    e = cls.__new__(cls)
    e.path, e.chunk, e.model, e.engine = "test", 5, model, model
    e.stats_head = StatsHead(model)
    if cls is InferenceEngine:
        e._head_weight, e.group = None, None
    return e


def _rollouts(seed: int, count: int = 11, n: int = 1) -> list[Rollout]:
    """Random rollouts, each n in a row with one prompt (a prompt's group)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        if i % n == 0:
            prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 9))]
        resp = [rng.randrange(1, VOCAB) for _ in range(0 if i == 3 else rng.randint(1, 30))]
        out.append(Rollout(prompt_ids=prompt, response_ids=resp, behaviour_logprobs=[-1.0] * len(resp)))
    return out


def _reference(model, teacher, rollouts, temperature):
    """float64, one rollout at a time, no padding: (logp, entropy, KL(model || teacher)) per token."""
    m, t = model.double(), teacher.double()
    out = []
    with torch.no_grad():
        for r in rollouts:
            ids = torch.tensor([r.prompt_ids + r.response_ids])
            start = len(r.prompt_ids) - 1
            z = m(input_ids=ids).logits[0, start:-1] / temperature
            q = t(input_ids=ids).logits[0, start:-1] / temperature
            logp, logq = torch.log_softmax(z, -1), torch.log_softmax(q, -1)
            tok = ids[0, start + 1 :]
            p = logp.exp()
            out.append(
                {
                    "logp": logp.gather(1, tok[:, None])[:, 0],
                    "entropy": -(p * logp).sum(-1),
                    "kl": (p * (logp - logq)).sum(-1),
                }
            )
    m.float(), t.float()
    return out


def _per_rollout(values_BT: torch.Tensor, mb: list[int], rollouts) -> dict[int, torch.Tensor]:
    return {i: values_BT[row, : rollouts[i].response_length] for row, i in enumerate(mb)}


@pytest.mark.parametrize(
    "attn,share", [("sdpa", False), ("eager", False), (attention.register(), False), (attention.register(), True)]
)
@pytest.mark.parametrize("budget", [40, 97, 10_000])
def test_packed_stats_equal_each_rollout_alone_and_the_padded_path(attn, share, budget):
    student, teacher = _model(0, attn), _model(1, attn)
    rollouts = _rollouts(budget, count=13, n=3 if share else 1)
    ref = _reference(student, teacher, rollouts, 0.7)
    s, t = _engine(student), _engine(teacher, InferenceEngine)
    lengths = [len(r.prompt_ids) + r.response_length for r in rollouts]
    prompts = [r.prompt_ids for r in rollouts] if share else None
    mbs = plan_micro_batches(lengths, 0, 1, max_tokens=budget, what="train.max_tokens_per_micro_batch", prompts=prompts)
    assert sorted(i for mb in mbs for i in mb) == list(range(len(rollouts)))
    packed = [collate_packed([rollouts[i] for i in mb], mb, 0, share_prompts=share) for mb in mbs]
    assert all(inputs.input_ids_1N.numel() <= budget for inputs in packed)
    wanted = {"logp": 0.7, "entropy": 0.7, "kl": 0.7}
    for mb, inputs in zip(mbs, packed, strict=True):
        prompts_in_mb = {tuple(rollouts[i].prompt_ids) for i in mb}
        assert inputs.shared_prompts == (share and len(prompts_in_mb) < len(mb))
        if share:  # each prompt once in the row
            tokens = sum(map(len, prompts_in_mb)) + sum(rollouts[i].response_length for i in mb)
            assert inputs.input_ids_1N.numel() == tokens
        got = s.response_stats(inputs, wanted, teacher=t)
        padded = s.response_stats(collate([rollouts[i] for i in mb], mb, 0), wanted, teacher=t)
        for stat in wanted:
            ours, theirs = _per_rollout(got[stat], mb, rollouts), _per_rollout(padded[stat], mb, rollouts)
            for i in mb:
                torch.testing.assert_close(ours[i].double(), ref[i][stat], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(ours[i], theirs[i], atol=1e-5, rtol=1e-5)
        # padding positions hold 0 (the losses read them only through the mask)
        assert not got["logp"][~collate_packed([rollouts[i] for i in mb], mb, 0).mask_BT].any()


@pytest.mark.parametrize("tie", [False, True])
def test_packed_gradients_equal_the_padded_paths(tie):
    """d/d(parameters) of sum(c * logp) + sum(c' * KL): the LM head's gradient comes through the
    chunked statistics (tied to the input embedding or not), the rest through the decoder."""
    rollouts = _rollouts(5, count=7, n=3)
    mb = list(range(len(rollouts)))
    grads = {}
    shared = functools.partial(collate_packed, share_prompts=True)
    for layout, make in (
        ("packed", collate_packed),
        ("fused", collate_packed),
        ("shared", shared),
        ("padded", collate),
    ):
        attn = attention.register() if layout == "shared" else "sdpa"  # only ours takes a shared prompt
        student, teacher = _model(0, attn, tie=tie), _model(1, attn)
        s, t = _engine(student), _engine(teacher, InferenceEngine)
        inputs = make(rollouts, mb, 0)
        m = inputs.mask_BT
        g = torch.Generator().manual_seed(2)
        c1, c2 = torch.randn(m.shape, generator=g), torch.randn(m.shape, generator=g)
        grad_fn = None
        assert getattr(inputs, "shared_prompts", False) == (layout == "shared")
        if layout == "fused":  # the same loss's gradient, applied token by token in the LM head's pass
            flat1, flat2 = torch.zeros(inputs.targets_M.numel()), torch.zeros(inputs.targets_M.numel())
            flat1[inputs.resp_index_BT[m]], flat2[inputs.resp_index_BT[m]] = c1[m], c2[m]

            def grad_fn(rows, values, flat1=flat1, flat2=flat2):
                return {"logp": flat1[rows], "kl": flat2[rows]}

        out = s.response_stats(inputs, {"logp": 0.9, "kl": 0.9, "entropy": 1.0}, teacher=t, grad_fn=grad_fn)
        loss = (out["logp"] * c1)[m].sum() + (out["kl"] * c2)[m].sum()
        assert not out["entropy"].requires_grad  # a metric
        if grad_fn is not None:
            assert not loss.requires_grad and float(out["anchor"]) == 0.0
            loss = out["anchor"] + loss
        loss.backward()
        grads[layout] = {n: p.grad.clone() for n, p in student.named_parameters()}
    for layout in ("packed", "fused", "shared"):
        assert grads[layout].keys() == grads["padded"].keys()
        for name, g in grads[layout].items():
            torch.testing.assert_close(g, grads["padded"][name], atol=1e-5, rtol=1e-4, msg=f"{layout}: {name}")


def test_a_rollout_longer_than_the_budget_is_refused_naming_both_numbers():
    with pytest.raises(ValueError, match=r"a rollout of 50 tokens .* does not fit train.max_tokens_per_micro_batch=40"):
        plan_micro_batches([10, 50, 20], 0, 1, max_tokens=40, what="train.max_tokens_per_micro_batch")


def test_an_empty_micro_batch_still_scores_one_masked_position():
    inputs = collate_packed([None], [-1], 0)
    assert inputs.score_pos_M.tolist() == [0] and not inputs.mask_BT.any()
    s = _engine(_model(0))
    assert s.response_stats(inputs, {"logp": 1.0})["logp"].abs().sum() == 0


@pytest.mark.parametrize("world", [2, 3, 8])
def test_ranks_get_tokens_within_one_sequence_and_as_many_micro_batches(world):
    rng = random.Random(world)
    for _ in range(20):
        lengths = [int(rng.paretovariate(1.2) * 30) + 1 for _ in range(rng.randint(world, 200))]
        shares = balance_by_tokens(lengths, world)
        assert sorted(i for s in shares for i in s) == list(range(len(lengths)))
        loads = [sum(lengths[i] for i in s) for s in shares]
        assert max(loads) - min(loads) <= max(lengths)
        budget = max(lengths) + rng.randint(0, 300)
        plans = [plan_micro_batches(lengths, r, world, max_tokens=budget, what="b") for r in range(world)]
        assert len({len(p) for p in plans}) == 1
        assert [sorted(i for mb in p for i in mb) for p in plans] == shares


def test_a_prompts_rollouts_stay_together_counted_with_their_prompt_once():
    """share_units: each prompt's rollouts in order, one unit while the prompt plus their responses
    fit the budget, split where they would not; the plan packs units whole."""
    prompts = [[1, 2, 3]] * 4 + [[4, 5]] * 2 + [[1, 2, 3]]
    lengths = [3 + 5, 3 + 4, 3 + 6, 3 + 2, 2 + 9, 2 + 1, 3 + 1]  # prompt + response
    units, sizes = share_units(lengths, prompts, 20)
    assert units == [[0, 1, 2, 3], [6], [4, 5]] and sizes == [3 + 5 + 4 + 6 + 2, 3 + 1, 2 + 9 + 1]
    mbs = plan_micro_batches(lengths, 0, 1, max_tokens=20, what="b", prompts=prompts)
    assert mbs == [[0, 1, 2, 3], [6, 4, 5]]  # a unit's rollouts adjacent, as collate_packed shares them
    two = [plan_micro_batches(lengths, r, 2, max_tokens=20, what="b", prompts=prompts) for r in range(2)]
    assert two == [[[0, 1, 2, 3]], [[6, 4, 5]]]
    with pytest.raises(ValueError, match="a rollout of 25 tokens"):
        plan_micro_batches([25], 0, 1, max_tokens=20, what="b", prompts=[[1, 2]])


def test_first_fit_packs_tightly():
    lengths = [7, 3, 5, 5, 2, 8]
    bins = pack_by_tokens(range(6), lengths, 10, "b")
    assert sorted(sum(lengths[i] for i in b) for b in bins) == [10, 10, 10]


def test_prompts_are_shared_only_where_every_engine_attends_with_ours():
    from scope_ds.algorithms import algorithm_of
    from scope_ds.config import ConfigError, load_config
    from scope_ds.engines.learner import Learner
    from scope_ds.pipeline.build import check_share_prompts

    def learner(teacher_attn: str, *overrides: str) -> Learner:
        cfg = load_config(None, list(overrides))
        student, teacher = _engine(_model(0, attention.register())), _engine(_model(1, teacher_attn), InferenceEngine)
        return Learner(cfg, algorithm_of(cfg.algo), 0, 1, student, teacher, None)

    shared = learner(attention.register())
    assert shared.shares_prompts
    check_share_prompts(shared)
    unable = learner("sdpa")  # transformers' own SDPA: a shared row would be misread
    assert not unable.shares_prompts and unable.unable_to_share_prompts == [unable.teacher]
    # refused at start-up, naming the engine, instead of quietly turned off
    with pytest.raises(ConfigError, match=r"train.share_prompts=true cannot run: the attention of .* \(sdpa\)"):
        check_share_prompts(unable)
    for overrides in (["train.share_prompts=false"], ["train.packing=false"]):
        assert not learner(attention.register(), *overrides).shares_prompts
        check_share_prompts(learner("sdpa", *overrides))  # nothing to refuse
    # a shared row given to an engine whose attention cannot read it is refused, naming the setting
    rollouts = _rollouts(7, count=4, n=2)
    inputs = collate_packed(rollouts, list(range(4)), 0, share_prompts=True)
    with pytest.raises(ValueError, match="cannot share a prompt's tokens between rollouts; set train.share_prompts"):
        _engine(_model(1, "sdpa"), InferenceEngine).score(inputs, 1.0)
