"""model.teacher_placement=auto (engines/placement.py): the memory plan's choice on synthetic plans,
checked against the arithmetic written out here, and the start-up line that says why."""

from __future__ import annotations

import json

import pytest

from scope_ds.config import load_config
from scope_ds.engines.placement import FITS, GIB, Arch, arch_of, choose_placement, training_bytes
from scope_ds.pipeline.build import place_teacher

STUDENT = Arch(1000, 256, 4, 1024, 8, 8, 32, False, False)
SMALL = Arch(1000, 256, 4, 1024, 8, 8, 32, False, False)
LARGE = Arch(1000, 2048, 16, 8192, 16, 8, 128, False, False)


def params(a: Arch) -> int:
    """The parameters of a Llama-style model, written out: q, k, v, o; gate, up, down; two norms a
    layer; embedding and head; the final norm."""
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    layer = a.hidden * (q + 2 * kv) + q * a.hidden + 2 * a.head_dim + 3 * a.hidden * a.intermediate + 2 * a.hidden
    return a.layers * layer + 2 * a.vocab * a.hidden + a.hidden


def test_the_parameter_count_is_the_written_out_one() -> None:
    for arch in (STUDENT, LARGE):
        assert arch.params() == params(arch)


@pytest.mark.parametrize(
    "teacher,room_gib,ranks,node,want,tp",
    [
        (SMALL, 2.0, 8, 8, "replicated", 1),  # a small teacher fits whole beside the student
        (LARGE, 2.0, 8, 8, "tensor", 4),  # a 1.0B teacher (3.8 GiB in float32) fits in 4 shares
        (LARGE, 2.0, 8, 2, "zero3", 1),  # ... and no share of a 2-rank node fits
    ],
)
def test_auto_places_the_teacher_by_the_memory_plan(teacher, room_gib, ranks, node, want, tp) -> None:
    cfg = load_config(None, ["train.max_tokens_per_micro_batch=256", "data.max_prompt_tokens=64"])
    device = room_gib * GIB
    got = choose_placement(cfg, STUDENT, teacher, ranks, node, device, 4)
    assert (got.kind, got.tp) == (want, tp)
    student = training_bytes(cfg, STUDENT, teacher, ranks, 1, teacher_bytes=0.0)["total"]
    whole = params(teacher) * 4
    body = whole - 4 * teacher.vocab * teacher.hidden  # the LM head stays whole on every rank
    share = {"replicated": whole, "tensor": body / tp + (whole - body), "zero3": whole / ranks}[want]
    assert student + share <= FITS * device or want == "zero3"
    if want != "replicated":
        assert student + whole > FITS * device  # replicated did not fit
    if want == "tensor":  # the next smaller size did not fit
        assert student + body / (tp // 2) + (whole - body) > FITS * device
    assert f"{whole / GIB:.2f} GiB" in got.reason and f"{FITS * device / GIB:.2f} GiB" in got.reason


def test_auto_leaves_tensor_parallelism_out_where_it_cannot_run() -> None:
    cfg = load_config(
        None, ["train.max_tokens_per_micro_batch=256", "data.max_prompt_tokens=64", "train.packing=false"]
    )
    assert choose_placement(cfg, STUDENT, LARGE, 8, 8, GIB, 4).kind == "zero3"


def test_the_start_up_line_says_the_choice_and_why(tmp_path, capsys) -> None:
    """place_teacher reads both models' config.json and prints one line on rank 0."""
    folders = []
    for name, a in (("student", STUDENT), ("teacher", SMALL)):
        (tmp_path / name).mkdir()
        c = dict(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers, model_type="llama")
        c.update(intermediate_size=a.intermediate, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads)
        (tmp_path / name / "config.json").write_text(json.dumps(c))
        folders.append(str(tmp_path / name))
    assert arch_of(folders[1]) == SMALL
    cfg = load_config(None, [])
    assert place_teacher(cfg, ["host"], *folders, engines=1).kind == "replicated"
    line = capsys.readouterr().out.strip()
    assert line.startswith("teacher: replicated (model.teacher_placement=auto): the whole teacher (0.02 GiB) fits")
    cfg = load_config(None, ["model.teacher_placement=tensor"])
    assert place_teacher(cfg, ["a", "a", "b", "b"], *folders, engines=1).tp == 2  # the ranks of rank 0's node
    assert "teacher: tensor over 2 ranks (model.teacher_placement=tensor): as set" in capsys.readouterr().out


def test_tensor_parallel_groups_that_cannot_run_are_refused() -> None:
    from transformers import LlamaConfig

    from scope_ds.engines.tensor_parallel import check_heads, check_hosts

    check_hosts(2, ["a", "a", "b", "b"])
    with pytest.raises(ValueError, match=r"model.teacher_tp_size=3 does not divide the world size 4"):
        check_hosts(3, ["a"] * 4)
    with pytest.raises(ValueError, match=r"ranks 4-7 are on hosts \['a', 'b'\]; a tensor-parallel teacher runs"):
        check_hosts(4, ["a"] * 6 + ["b"] * 2)
    config = LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=96)
    check_heads(config, 2, "t")
    with pytest.raises(ValueError, match=r"t: its 6 attention heads do not split over model.teacher_tp_size=4"):
        check_heads(config, 4, "t")
    with pytest.raises(ValueError, match=r"t: its 2 key-value heads do not split over model.teacher_tp_size=3"):
        check_heads(config, 3, "t")
