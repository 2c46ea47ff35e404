"""Sequence parallelism (parallel.sequence_parallel_size): packed rows split over two ranks with
DeepSpeed's Ulysses attention give the statistics, the step and the run of whole rows (2 gloo
ranks, ZeRO-3)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from train_helpers import (
    DEFAULT_RUN_ARGS,
    REPO,
    assert_adam_steps_close,
    check_ok,
    launch_ranks,
    launch_train,
    load_weights,
    read_jsonl,
    run_env,
    small_run_overrides,
)

SP_STEP = REPO / "tests" / "integration" / "sp_step.py"


def test_sequence_parallel_statistics_equal_whole_rows(model_pair, tmp_path) -> None:
    """sp_step.py's rows (rollouts straddling the split, an odd length padded, one long answer, a
    row whose response tokens all lie on rank 1): student log-probs, entropy, the full KL to the
    teacher and the teacher's log-probs of every response token at sp = 2 equal sp = 1's to 1e-5."""
    student, teacher = model_pair
    out = tmp_path / "sp.pt"
    check_ok(launch_ranks(SP_STEP, [student, teacher, out], 2, run_env(), timeout=600))
    saved = torch.load(out)
    assert set(saved) == {"ragged", "odd_length", "one_long", "nothing_on_rank_0"}
    assert saved["odd_length"]["tokens"] % 2 == 1  # padded to split
    for name, case in saved.items():
        mask = case["mask"]
        assert set(case["whole"]) == set(case["split"]) == {"logp", "entropy", "kl", "teacher_logp"}
        for stat, whole in case["whole"].items():
            split = case["split"][stat]
            assert whole.shape == split.shape == mask.shape, (name, stat)
            assert bool((split[~mask] == 0).all()), (name, stat)  # nothing at padding
            torch.testing.assert_close(split[mask], whole[mask], atol=1e-5, rtol=1e-5, msg=f"{name} {stat}")
            assert float(whole[mask].abs().max()) > 0.1, (name, stat)  # real values, not zeros


# (the whole-row case, the split one) of conftest.py's zero3_cases
SPLIT_STEPS = {
    "scope": ("sgd_two_ranks", "sgd_sp2"),
    "scope_tiled_mlp": ("sgd_two_ranks", "sgd_sp2_tiled"),
    "grpo": ("grpo_sp1", "grpo_sp2"),
    "tied": ("tied_packed", "tied_sp2"),
}


def test_tiled_mlps_give_the_same_step(zero3_steps) -> None:
    """parallel.tiled_mlp=true on whole rows (each rank's own lengths: the ranks agree on the
    shards) gives conftest.py's sgd_two_ranks step: grad_norm, loss and weights to 1e-5."""
    whole, tiled = zero3_steps["sgd_two_ranks"], zero3_steps["sgd_tiled"]
    for key in ("grad_norm", "loss/total"):
        assert tiled["metrics"][key] == pytest.approx(whole["metrics"][key], rel=1e-5), key
    for name, w in whole["weights"].items():
        torch.testing.assert_close(tiled["weights"][name], w, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("case", sorted(SPLIT_STEPS))
def test_sequence_parallel_updates_equal_whole_rows(case, zero3_steps) -> None:
    """One ZeRO-3 step on 2 ranks with every row split over both against the same step with whole
    rows (conftest.py's zero3_cases): SCOPE with plain SGD (sgd_two_ranks is checked against the
    float64 gradient of Eq. 6 in test_train.py), GRPO with its reference policy's KL (SGD), and a
    Qwen3-style student with tied embeddings (one Adam step), and SCOPE with DeepSpeed's TiledMLP
    as well (parallel.tiled_mlp). Every rollout's path and weight
    (Eq. 4 / 5) to 1e-6, grad_norm and the loss to 1e-5 relative, the weights to 1e-5."""
    whole, split = (zero3_steps[name] for name in SPLIT_STEPS[case])
    assert [path for path, _ in split["plan"]] == [path for path, _ in whole["plan"]]
    weights = torch.tensor([w for _, w in whole["plan"]], dtype=torch.float64)
    torch.testing.assert_close(
        torch.tensor([w for _, w in split["plan"]], dtype=torch.float64), weights, atol=1e-6, rtol=0
    )
    for key in ("grad_norm", "loss/total", "entropy/student"):
        assert split["metrics"][key] == pytest.approx(whole["metrics"][key], rel=1e-5), key
    assert split["metrics"]["grad_norm"] > 1  # a real gradient
    # the two ranks ran every micro-batch of the batch together, no prompt shared
    assert split["metrics"]["perf/micro_batches"] > whole["metrics"]["perf/micro_batches"]
    assert split["metrics"]["perf/shared_prompt_share"] == 0
    if case == "tied":
        assert_adam_steps_close(split["weights"], whole["weights"], lr=1e-2, steps=1)
    else:
        for name, w in whole["weights"].items():
            torch.testing.assert_close(split["weights"][name], w, atol=1e-5, rtol=1e-5, msg=name)
    if case.startswith("scope"):
        assert len(set(weights.tolist())) > 4  # SCOPE's weights differ between rollouts


SP2 = ["parallel.sequence_parallel_size=2", "train.share_prompts=false"]
SAME_METRICS = (
    "loss/total",
    "grad_norm",
    "entropy/student",
    "reward/accuracy",
    "ppl/teacher_opd",
    "weight/opd_entropy",
)


def test_a_sequence_parallel_run_trains_resumes_and_converts(model_pair, default_run, tmp_path) -> None:
    """``deepspeed --num_gpus 2 scope_ds/train.py parallel.sequence_parallel_size=2`` on conftest.py's
    default run (6 steps, a checkpoint every 3): the same rollouts and metrics as the run with whole
    rows, to float32 rounding; resumed at sp = 2 from its step-3 checkpoint (into a fresh folder) it
    ends at the straight run's weights; tools/convert_ckpt.py of its last checkpoint gives its export."""
    student, teacher = model_pair
    split, resumed = tmp_path / "split", tmp_path / "resumed"
    check_ok(launch_train([*small_run_overrides(student, teacher, split), *DEFAULT_RUN_ARGS, *SP2]))
    whole_metrics, split_metrics = (read_jsonl(run / "metrics.jsonl") for run in (default_run, split))
    assert [m["step"] for m in split_metrics] == [1, 2, 3, 4, 5, 6]
    for ours, theirs in zip(split_metrics, whole_metrics, strict=True):
        for key in SAME_METRICS:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (ours["step"], key)
    for step in range(1, 7):
        ours, theirs = (read_jsonl(run / "rollouts" / f"step_{step}.jsonl") for run in (split, default_run))
        assert [r["response_ids"] for r in ours] == [r["response_ids"] for r in theirs], step

    step3 = split / "checkpoints" / "step_3"
    check_ok(
        launch_train(
            [*small_run_overrides(student, teacher, resumed), *DEFAULT_RUN_ARGS, *SP2, f"checkpoint.resume={step3}"],
            launcher="ranks",
        )
    )
    assert [m["step"] for m in read_jsonl(resumed / "metrics.jsonl")] == [4, 5, 6]
    assert_adam_steps_close(load_weights(split / "hf"), load_weights(resumed / "hf"), lr=1e-3, steps=3)

    converted = tmp_path / "converted"
    tool = [sys.executable, str(REPO / "tools" / "convert_ckpt.py"), str(split / "checkpoints"), str(converted)]
    proc = subprocess.run([*tool, "--dtype", "fp32"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = load_weights(split / "hf")
    for name, w in load_weights(converted).items():
        torch.testing.assert_close(w, exported[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize(
    "heads,kv,size,match",
    [(4, 4, 3, "4 attention heads do not split"), (6, 4, 3, "4 key-value heads neither split")],
)
def test_heads_that_do_not_split_are_refused(heads, kv, size, match) -> None:
    from transformers import LlamaConfig

    from scope_ds.engines.sequence import check_heads

    config = LlamaConfig(hidden_size=8 * heads, num_attention_heads=heads, num_key_value_heads=kv)
    with pytest.raises(ValueError, match=match):
        check_heads(config, size, "m")
    check_heads(LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2), 4, "m")  # kv replicated


def test_an_attention_ulysses_cannot_wrap_and_a_world_it_cannot_split_are_refused(tmp_path) -> None:
    """eager attention (a whole [N, N] mask) and a world size that sp does not divide: refused
    before any engine is built, naming the numbers and the key."""
    from transformers import LlamaConfig

    from scope_ds.algorithms import algorithm_of
    from scope_ds.config import ConfigError, load_config
    from scope_ds.engines import ds
    from scope_ds.engines.sequence import SequenceGroup
    from scope_ds.pipeline.build import build_engines

    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="m: its attention 'eager' materialises a whole"):
        ds._ulysses_attention("m", config, "eager", False, SequenceGroup(None, 2, 0))
    cfg = load_config(None, ["parallel.sequence_parallel_size=2", "train.share_prompts=false"])
    with pytest.raises(ConfigError, match="parallel.sequence_parallel_size=2 does not divide the world size 3"):
        build_engines(cfg, algorithm_of(cfg.algo), 3, str(tmp_path), str(tmp_path))
