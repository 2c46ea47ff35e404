"""The memory arithmetic of a training rank, and where the teacher's weights go.

One home for the numbers that training, ``slurm/memory_plan.py`` and docs/cluster.md quote: the
bytes a rank holds for the student (ZeRO-3 model states, the gathered working set, one
micro-batch's activations, the LM head's chunks) and for the teacher, from each model's
architecture (its config.json). ``choose_placement`` turns them into ``model.teacher_placement``'s
``auto``: the teacher whole on every rank where it fits beside the student, split by tensor
parallelism over a few ranks of a node where a share of it fits, else partitioned by ZeRO-3.
Estimates, not measurements: the allocator, the CUDA context and NCCL's buffers need some
room on top, hence ``FITS``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scope_ds.ops import CHUNK_BYTES

GIB = 2**30
BF16 = 2  # bytes
# ZeRO-3 model states per parameter (ZeRO paper, Rajbhandari et al. 2020, K = 12 for Adam):
# bf16 weights 2 + bf16 gradients 2 + fp32 master weights 4 + Adam m 4 + Adam v 4 = 16 bytes,
# plus DeepSpeed's fp32 gradient partition for the optimizer step: 4 more. All split over the ranks.
STATE_BYTES = 16 + 4
# the share of a device the training sum may take: the allocator (fragmentation), the CUDA context
# and NCCL buffers need the rest
FITS = 0.8


@dataclass(frozen=True)
class Arch:
    vocab: int
    hidden: int
    layers: int
    intermediate: int  # SwiGLU MLP width
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool  # lm_head shares the embedding matrix
    qkv_bias: bool  # Qwen2 has q/k/v biases; Qwen3 has q/k norms instead

    def params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)  # q, k, v, o
        attn += self.head_dim * (self.heads + 2 * self.kv_heads) if self.qkv_bias else 2 * self.head_dim
        mlp = 3 * self.hidden * self.intermediate
        layer = attn + mlp + 2 * self.hidden  # two RMSNorms
        embed = self.vocab * self.hidden
        return self.layers * layer + embed * (1 if self.tied else 2) + self.hidden

    def head_params(self) -> int:
        """The LM head's (vocab x hidden), which every placement keeps whole on each rank."""
        return self.vocab * self.hidden

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * BF16  # K and V, every layer, bf16

    def layer_activation_bytes(self, tokens: int, tiled: bool = False) -> int:
        """Tensors one decoder layer keeps for backward (bf16; SDPA / flash attention keeps no T x T
        scores): norm inputs and outputs, q k v, attention output, residual, gate, up, act, product.
        ``tiled`` (parallel.tiled_mlp): the MLP's four tensors for one shard of ``hidden`` tokens only."""
        mlp = 4 * self.intermediate * (min(tokens, self.hidden) if tiled else tokens)
        return (tokens * (5 * self.hidden + (2 * self.heads + 2 * self.kv_heads) * self.head_dim) + mlp) * BF16

    def activation_bytes(self, tokens: int, checkpointing: bool, tiled: bool = False) -> int:
        """One micro-batch of ``tokens`` on one rank: every layer's activations, or (with gradient
        checkpointing) each layer's input plus one layer's activations while it is recomputed."""
        if checkpointing:
            return self.layers * tokens * self.hidden * BF16 + self.layer_activation_bytes(tokens, tiled)
        return self.layers * self.layer_activation_bytes(tokens, tiled)

    def splits_over(self, sp: int) -> bool:
        """Whether Ulysses can split this model's heads over ``sp`` ranks (engines/sequence.py)."""
        return self.heads % sp == 0 and (self.kv_heads % sp == 0 or sp % self.kv_heads == 0)

    def splits_tensor(self, tp: int) -> bool:
        """Whether AutoTP can split this model's heads evenly over ``tp`` ranks."""
        return self.heads % tp == 0 and self.kv_heads % tp == 0


# From each model's config.json (vocab_size, hidden_size, num_hidden_layers, intermediate_size,
# num_attention_heads, num_key_value_heads, head_dim or hidden/heads, tie_word_embeddings).
ARCHS = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": Arch(151936, 1536, 28, 8960, 12, 2, 128, False, True),
    "Skywork/Skywork-OR1-7B": Arch(152064, 3584, 28, 18944, 28, 4, 128, False, True),
    "Qwen/Qwen3-1.7B-Base": Arch(151936, 2048, 28, 6144, 16, 8, 128, True, False),
    "Qwen/Qwen3-8B": Arch(151936, 4096, 36, 12288, 32, 8, 128, False, False),
}


def arch_from_dict(c: dict[str, Any]) -> Arch:
    """The architecture of a config.json's mapping (its text model's, for a multimodal one)."""
    c = c.get("text_config") or c
    heads = c["num_attention_heads"]
    return Arch(
        c["vocab_size"],
        c["hidden_size"],
        c["num_hidden_layers"],
        c["intermediate_size"],
        heads,
        c.get("num_key_value_heads") or heads,
        c.get("head_dim") or c["hidden_size"] // heads,
        bool(c.get("tie_word_embeddings", False)),
        c.get("model_type") == "qwen2",
    )


def arch_of(name: str) -> Arch:
    """A model's architecture: a folder's config.json, else the table above (hub names written down
    here, for machines that cannot download them), else transformers' config from the hub."""
    path = Path(name) / "config.json"
    if path.is_file():
        return arch_from_dict(json.loads(path.read_text()))
    if name in ARCHS:
        return ARCHS[name]
    try:
        from transformers import AutoConfig

        return arch_from_dict(AutoConfig.from_pretrained(name).to_dict())
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"no architecture for {name!r}: give a folder with config.json ({e})") from None


def training_bytes(cfg: Any, student: Arch, teacher: Arch, ranks: int, sp: int, teacher_bytes: float | None = None):
    """The device memory of a training rank at sequence-parallel size ``sp``, by part. The teacher's
    part is ZeRO-3's share (``teacher_bytes``: another placement's)."""
    t, longest = cfg.train, cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    # tokens of one micro-batch: the packing budget, or micro_batch_size rollouts padded to the longest
    tokens = t.max_tokens_per_micro_batch if t.packing else longest * t.micro_batch_size
    ps, pt = student.params(), teacher.params()
    # a row split over sp ranks: each holds 1/sp of its positions (and, in attention, all of them for
    # 1/sp of the heads: the same bytes)
    mine = -(-tokens // sp)
    out = {
        "states": ps * STATE_BYTES / ranks,
        "teacher": pt * BF16 / ranks if teacher_bytes is None else teacher_bytes,
        "gathered": max(student.vocab * student.hidden, teacher.vocab * teacher.hidden) * BF16 + 5e7 * BF16,
        "activations": student.activation_bytes(mine, cfg.model.gradient_checkpointing, cfg.parallel.tiled_mlp),
        "activations_off": student.activation_bytes(mine, False, cfg.parallel.tiled_mlp),
        "tokens": tokens,
        "mine": mine,
    }
    # packed: the LM head's statistics a chunk at a time (ops.CHUNK_BYTES, a few buffers), from the
    # response positions only, and the head's gradient made in that pass (float32 accumulator plus
    # its bf16 copy, held until backward); padded: whole float32 logits of every position and their gradient
    out["head_grad"] = student.vocab * student.hidden * (4 + BF16)
    out["logits"] = 8 * CHUNK_BYTES + out["head_grad"] if t.packing else tokens * student.vocab * 4 * 2
    out["total"] = sum(out[k] for k in ("states", "teacher", "gathered", "activations", "logits"))
    return out


def needed_sp(cfg: Any, student: Arch, teacher: Arch, ranks: int, gpus_per_node: int, gpu_gib: float) -> int | None:
    """The smallest sequence-parallel size (within a node, dividing the ranks, splitting both models'
    heads) at which a training rank's sum fits ``FITS`` of the GPU; None if none does."""
    for sp in range(1, gpus_per_node + 1):
        usable = ranks % sp == 0 and student.splits_over(sp) and teacher.splits_over(sp)
        if usable and training_bytes(cfg, student, teacher, ranks, sp)["total"] <= FITS * gpu_gib * GIB:
            return sp
    return None


@dataclass(frozen=True)
class Placement:
    """Where the teacher goes, and why (``reason``: the start-up line's numbers)."""

    kind: str  # replicated | tensor | zero3
    tp: int = 1  # ranks per tensor-parallel teacher (tensor only)
    reason: str = ""


def choose_placement(
    cfg: Any, student: Arch, teacher: Arch, ranks: int, node_ranks: int, device_bytes: float, weight_bytes: int
) -> Placement:
    """``model.teacher_placement=auto``: replicated where the whole teacher (``weight_bytes`` a
    parameter) fits beside the student's share in ``FITS`` of ``device_bytes``; else tensor over the
    smallest tp (``model.teacher_tp_size`` if set) of the ``node_ranks`` ranks on a node whose share
    fits (the LM head stays whole on every rank); else zero3. Tensor only for packed micro-batches
    without ``pipeline.overlap_teacher`` (the placements it composes with)."""
    sp = cfg.parallel.sequence_parallel_size
    room = FITS * device_bytes
    student_only = training_bytes(cfg, student, teacher, ranks, sp, teacher_bytes=0.0)["total"]
    whole = teacher.params() * weight_bytes
    said = f"student {student_only / GIB:.2f} GiB a rank, room {room / GIB:.2f} GiB ({FITS:.0%} of {device_bytes / GIB:.2f})"
    if student_only + whole <= room:
        return Placement("replicated", reason=f"the whole teacher ({whole / GIB:.2f} GiB) fits beside the {said}")
    tensor_ok = cfg.train.packing and not cfg.pipeline.overlap_teacher
    sizes = [cfg.model.teacher_tp_size] if cfg.model.teacher_tp_size else range(2, node_ranks + 1)
    for tp in sizes if tensor_ok else ():
        if node_ranks % tp or ranks % tp or not teacher.splits_tensor(tp):
            continue
        share = teacher_share("tensor", teacher, ranks, tp, weight_bytes)
        if student_only + share <= room:
            return Placement(
                "tensor", tp, f"the whole teacher ({whole / GIB:.2f} GiB) does not fit beside the {said}; "
                f"its share over {tp} ranks ({share / GIB:.2f} GiB) does"
            )  # fmt: skip
    share = teacher_share("zero3", teacher, ranks, 1, weight_bytes)
    return Placement(
        "zero3", reason=f"neither the whole teacher ({whole / GIB:.2f} GiB) nor a tensor-parallel share of it fits "
        f"beside the {said}: partitioned over {ranks} ranks, {share / GIB:.2f} GiB each"
    )  # fmt: skip


def teacher_share(kind: str, teacher: Arch, ranks: int, tp: int, weight_bytes: int) -> float:
    """The teacher's weight bytes on one rank under a placement."""
    if kind == "replicated":
        return float(teacher.params() * weight_bytes)
    if kind == "tensor":
        body = teacher.params() - teacher.head_params()
        return (body / tp + teacher.head_params()) * weight_bytes
    return teacher.params() * weight_bytes / ranks


def device_bytes(node_ranks: int) -> float:
    """This rank's device memory: its GPU's, or on CPU the host's memory shared by its ranks."""
    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / max(node_ranks, 1)
