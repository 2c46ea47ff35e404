"""model.teacher_placement: the teacher (and GRPO's reference) whole on every rank, split by
DeepSpeed AutoTP, or partitioned by ZeRO-3 scores and trains alike (conftest.py's zero3_cases
place_*, kl_*, sp2_tensor, grpo_tensor, on 2 gloo ranks), and a tensor-parallel run trains,
resumes from another placement's checkpoint and starts without ``LOCAL_SIZE``."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import (
    DEFAULT_RUN_ARGS,
    assert_adam_steps_close,
    check_ok,
    launch_train,
    load_weights,
    read_jsonl,
    run_env,
    small_run_overrides,
)


def assert_same_step(ours: dict, theirs: dict, tol: float = 1e-5) -> None:
    """Two zero3_step.py results: the same teacher log-probs (before, in and after the update),
    the same plan (paths and SCOPE's weights) and the same updated weights, to ``tol``."""
    for key in ("teacher_logp_scored", "teacher_logp", "teacher_logp_after"):
        assert sorted(ours[key]) == sorted(theirs[key]), key
        for i, row in theirs[key].items():
            torch.testing.assert_close(
                torch.tensor(ours[key][i]), torch.tensor(row), rtol=tol, atol=tol, msg=f"{key} {i}"
            )
    assert [p for p, _ in ours["plan"]] == [p for p, _ in theirs["plan"]]
    torch.testing.assert_close(
        torch.tensor([w for _, w in ours["plan"]]), torch.tensor([w for _, w in theirs["plan"]]), rtol=tol, atol=tol
    )
    for name, w in theirs["weights"].items():
        torch.testing.assert_close(ours["weights"][name], w, rtol=tol, atol=tol, msg=name)
    assert ours["metrics"]["loss/total"] == pytest.approx(theirs["metrics"]["loss/total"], rel=tol, abs=tol)


@pytest.mark.parametrize("kind", ["place", "kl"])
def test_every_placement_scores_and_updates_as_zero3(kind, zero3_steps) -> None:
    """``place``: SCOPE on ragged packed rows, the teacher scoring before the update; ``kl``: OPD
    with the full-vocabulary KL, the teacher's pass inside the update (a tensor-parallel group runs
    each rank's micro-batch in turn)."""
    zero3 = zero3_steps[f"{kind}_zero3"]
    assert zero3["teacher_logp"], "the case scores no rollout"
    for placement in ("replicated", "tensor"):
        run = zero3_steps[f"{kind}_{placement}"]
        assert run["teacher_placement"] == placement
        assert_same_step(run, zero3)


def test_a_tensor_parallel_teacher_holds_a_share_of_each_layer(model_pair, zero3_steps) -> None:
    """AutoTP splits every decoder layer's projections over the 2 ranks (attention by heads: half
    each; the MLP in AutoTP's grains of 64 columns, so rank 0 holds 64 of the 96 here); the
    embedding, the norms and the LM head stay whole."""
    teacher = {k: tuple(w.shape) for k, w in load_file(str(model_pair[1] / "model.safetensors")).items()}
    assert zero3_steps["place_replicated"]["inference_shapes"] == teacher
    shapes = zero3_steps["place_tensor"]["inference_shapes"]
    assert sorted(shapes) == sorted(teacher)
    for name, shape in teacher.items():
        rows, cols = (shape * 2)[:2]
        if re.search(r"self_attn\.[qkv]_proj\.weight$", name):
            assert shapes[name] == (rows // 2, cols), name
        elif name.endswith("o_proj.weight"):
            assert shapes[name] == (rows, cols // 2), name
        elif re.search(r"mlp\.(gate|up)_proj\.weight$", name):
            assert shapes[name] == (64, cols), name
        elif name.endswith("down_proj.weight"):
            assert shapes[name] == (rows, 64), name
        else:
            assert shapes[name] == shape, name


def test_a_tensor_parallel_teacher_scores_whole_rows_under_sequence_parallelism(zero3_steps) -> None:
    """sp = 2 with a tensor-parallel teacher (whole rows, its own attention, not the student's
    Ulysses one) against sp = 2 with the default (replicated, split rows); and GRPO's reference
    tensor-parallel against the default."""
    assert zero3_steps["sgd_sp2"]["teacher_placement"] == "replicated"
    assert_same_step(zero3_steps["sp2_tensor"], zero3_steps["sgd_sp2"])
    # the full KL: each rank's slice of the tensor-parallel teacher's hidden states of the whole row
    assert_same_step(zero3_steps["kl_sp2_tensor"], zero3_steps["kl_zero3"])
    ours, theirs = zero3_steps["grpo_tensor"], zero3_steps["grpo_sp1"]
    for name, w in theirs["weights"].items():
        torch.testing.assert_close(ours["weights"][name], w, rtol=1e-5, atol=1e-5, msg=name)
    assert ours["metrics"]["loss/total"] == pytest.approx(theirs["metrics"]["loss/total"], rel=1e-5, abs=1e-6)


def test_a_tensor_parallel_run_trains_and_resumes_another_placements_checkpoint(
    model_pair, default_run, tmp_path
) -> None:
    """``deepspeed --num_gpus 2 scope_ds/train.py model.teacher_placement=tensor`` on conftest.py's
    default run (auto: replicated here): the same rollouts and metrics to float32 rounding; then,
    started as srun or mpirun would (no ``LOCAL_SIZE``), tensor-parallel from the default run's
    step-3 checkpoint, it ends at the default run's weights."""
    student, teacher = model_pair
    split, resumed = tmp_path / "split", tmp_path / "resumed"
    proc = check_ok(launch_train([*small_run_overrides(student, teacher, split), *DEFAULT_RUN_ARGS, TENSOR]))
    assert "teacher: tensor over 2 ranks (model.teacher_placement=tensor)" in proc.stdout
    ours, theirs = (read_jsonl(run / "metrics.jsonl") for run in (split, default_run))
    assert [m["step"] for m in ours] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(ours, theirs, strict=True):
        for key in ("loss/total", "grad_norm", "ppl/teacher_opd", "reward/accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    for step in range(1, 7):
        a, b = (read_jsonl(run / "rollouts" / f"step_{step}.jsonl") for run in (split, default_run))
        assert [r["response_ids"] for r in a] == [r["response_ids"] for r in b], step

    step3 = default_run / "checkpoints" / "step_3"
    args = [*small_run_overrides(student, teacher, resumed), *DEFAULT_RUN_ARGS, TENSOR, f"checkpoint.resume={step3}"]
    assert "LOCAL_SIZE" not in run_env()  # the ranks launcher sets RANK, WORLD_SIZE, LOCAL_RANK and the address only
    check_ok(launch_train(args, launcher="ranks"))
    assert [m["step"] for m in read_jsonl(resumed / "metrics.jsonl")] == [4, 5, 6]
    assert_adam_steps_close(load_weights(default_run / "hf"), load_weights(resumed / "hf"), lr=1e-3, steps=3)


TENSOR = "model.teacher_placement=tensor"
