"""The memory arithmetic behind docs/cluster.md: GPU memory per training rank and per SGLang server.

    python slurm/memory_plan.py RECIPE [key=value ...] [--nodes 2] [--gpus-per-node 8] [--gpu-gib 80]

Reads the recipe (models, rollout size, servers) and prints Markdown: parameters, bytes per
training GPU under ZeRO-3 (model states, gathered working set, activations of one micro-batch),
and the KV-cache room of each rollout server. The architecture numbers are those of each model's
config.json on the Hugging Face hub, written down below (this machine cannot download them); a
model folder with a config.json can be given instead of a hub name. Estimates, not measurements:
the allocator, CUDA context and NCCL buffers need a few GB more on top.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scope_ds.config import load_config  # noqa: E402
from scope_ds.ops import CHUNK_BYTES  # noqa: E402

GIB = 2**30
BF16 = 2  # bytes
# ZeRO-3 model states per parameter (ZeRO paper, Rajbhandari et al. 2020, K = 12 for Adam):
# bf16 weights 2 + bf16 gradients 2 + fp32 master weights 4 + Adam m 4 + Adam v 4 = 16 bytes,
# plus DeepSpeed's fp32 gradient partition for the optimizer step: 4 more. All split over the ranks.
STATE_BYTES = 16 + 4


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


# From each model's config.json (vocab_size, hidden_size, num_hidden_layers, intermediate_size,
# num_attention_heads, num_key_value_heads, head_dim or hidden/heads, tie_word_embeddings).
ARCHS = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": Arch(151936, 1536, 28, 8960, 12, 2, 128, False, True),
    "Skywork/Skywork-OR1-7B": Arch(152064, 3584, 28, 18944, 28, 4, 128, False, True),
    "Qwen/Qwen3-1.7B-Base": Arch(151936, 2048, 28, 6144, 16, 8, 128, True, False),
    "Qwen/Qwen3-8B": Arch(151936, 4096, 36, 12288, 32, 8, 128, False, False),
}


def arch_of(name: str) -> Arch:
    if name in ARCHS:
        return ARCHS[name]
    path = Path(name) / "config.json"
    if not path.is_file():
        raise SystemExit(f"no architecture for {name!r}: add it to ARCHS or give a folder with config.json")
    c = json.loads(path.read_text())
    heads = c["num_attention_heads"]
    return Arch(
        c["vocab_size"],
        c["hidden_size"],
        c["num_hidden_layers"],
        c["intermediate_size"],
        heads,
        c.get("num_key_value_heads", heads),
        c.get("head_dim") or c["hidden_size"] // heads,
        bool(c.get("tie_word_embeddings", False)),
        c.get("model_type") == "qwen2",
    )


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"


# the share of a GPU the training sum may take: the allocator (fragmentation), the CUDA context and
# NCCL buffers need the rest
FITS = 0.8


def training_bytes(cfg: Any, student: Arch, teacher: Arch, ranks: int, sp: int) -> dict[str, float]:
    """The per-GPU memory of a training rank at sequence-parallel size ``sp``, by part."""
    t, longest = cfg.train, cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    # tokens of one micro-batch: the packing budget, or micro_batch_size rollouts padded to the longest
    tokens = t.max_tokens_per_micro_batch if t.packing else longest * t.micro_batch_size
    ps, pt = student.params(), teacher.params()
    # a row split over sp ranks: each holds 1/sp of its positions (and, in attention, all of them for
    # 1/sp of the heads: the same bytes)
    mine = -(-tokens // sp)
    out = {
        "states": ps * STATE_BYTES / ranks,
        "teacher": pt * BF16 / ranks,
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


def plan(recipe: str, nodes: int, gpus_per_node: int, gpu_gib: float, overrides: list[str] | None = None) -> str:
    cfg = load_config(recipe, overrides or [])
    r, t, sp = cfg.rollout, cfg.train, cfg.parallel.sequence_parallel_size
    student, teacher = arch_of(cfg.model.student), arch_of(cfg.model.teacher)
    server_gpus = r.num_servers * r.gpus_per_server
    ranks = nodes * gpus_per_node - server_gpus
    longest = cfg.data.max_prompt_tokens + r.max_new_tokens
    b = training_bytes(cfg, student, teacher, ranks, sp)
    ps, pt, tokens = student.params(), teacher.params(), b["tokens"]
    states, teacher_part, gathered, act, act_off = (
        b[k] for k in ("states", "teacher", "gathered", "activations", "activations_off")
    )
    head_grad, logits, total = b["head_grad"], b["logits"], b["total"]
    how = (
        f"{t.max_tokens_per_micro_batch} tokens per micro-batch (train.max_tokens_per_micro_batch)"
        if t.packing
        else f"{t.micro_batch_size} rollouts x {longest} tokens, padded (train.packing=false)"
    )
    if sp > 1:
        how += f", split over {sp} ranks (parallel.sequence_parallel_size): {b['mine']} per rank"
    if cfg.parallel.tiled_mlp:
        how += ", MLP tiled (parallel.tiled_mlp)"
    need = needed_sp(cfg, student, teacher, ranks, gpus_per_node, gpu_gib)
    fit = (
        f"the smallest parallel.sequence_parallel_size that fits {FITS:.0%} of the GPU: {need}"
        if need
        else f"no parallel.sequence_parallel_size up to {gpus_per_node} fits {FITS:.0%} of the GPU"
    )
    rows = [
        f"### {cfg.logging.run_name}: {nodes} nodes x {gpus_per_node} GPUs of {gpu_gib:.0f} GiB, "
        f"{ranks} training ranks + {r.num_servers} SGLang server(s) x {r.gpus_per_server} GPU",
        "",
        "| per training GPU | GiB | how |",
        "| --- | ---: | --- |",
        f"| student model states | {gib(states)} | {ps / 1e9:.2f} B params x {STATE_BYTES} B / {ranks} ranks |",
        f"| teacher weights | {gib(teacher_part)} | {pt / 1e9:.2f} B params x 2 B (bf16) / {ranks} ranks |",
        f"| gathered working set | {gib(gathered)} | largest gathered matrix (embedding) + prefetch bucket |",
        f"| student activations | {gib(act)} | {how}, gradient checkpointing "
        f"{'on' if cfg.model.gradient_checkpointing else 'off'} ({gib(act_off)} GiB with it off) |",
        f"| logits | {gib(logits)} | "
        + (
            f"chunks of the LM head's output, never whole (scope_ds/ops), and the head's gradient "
            f"made in the same pass ({gib(head_grad)} GiB: vocabulary x hidden x (4 + 2) B)"
            if t.packing
            else f"{tokens} positions x {student.vocab} x 4 B, and their gradient"
        )
        + " |",
        f"| **sum** | **{gib(total)}** | of {gpu_gib:.0f} GiB, before allocator / CUDA / NCCL overhead |",
        "",
        f"Sequence parallelism: {sp} rank(s) per row; {fit} (its longest rollout: {longest} tokens).",
    ]
    served = teacher if cfg.algo.uses_teacher_rollouts else student
    weights = served.params() * BF16 / r.gpus_per_server
    pool = gpu_gib * GIB * float(os.environ.get("SCOPE_DS_SGLANG_MEM", "0.7")) - weights
    kv_tok = served.kv_bytes_per_token() / r.gpus_per_server
    seqs = pool / kv_tok / longest
    rollouts = t.prompts_per_step * r.n
    waves = math.ceil(rollouts / (seqs * r.num_servers))
    rows += [
        "",
        "| per SGLang server GPU | value | how |",
        "| --- | ---: | --- |",
        f"| weights | {gib(weights)} GiB | {served.params() / 1e9:.2f} B params x 2 B / tp {r.gpus_per_server} |",
        f"| KV cache pool | {gib(pool)} GiB | mem-fraction-static {os.environ.get('SCOPE_DS_SGLANG_MEM', '0.7')} "
        f"x {gpu_gib:.0f} GiB - weights |",
        f"| KV per token | {kv_tok / 1024:.0f} KiB | 2 x {served.layers} layers x {served.kv_heads} KV heads x "
        f"{served.head_dim} x 2 B / tp |",
        f"| full-length sequences at once | {seqs:.0f} | pool / (KV per token x {longest} tokens) |",
        f"| rollouts per step | {rollouts} | {t.prompts_per_step} prompts x {r.n} |",
        f"| waves if every rollout ran to the cap | {waves} | rollouts / (sequences x {r.num_servers} servers) |",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="section.key=value, as for scope_ds/train.py")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU (H100/A100 80GB: 80)")
    args = ap.parse_args(argv)
    print(plan(args.recipe, args.nodes, args.gpus_per_node, args.gpu_gib, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
