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
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scope_ds.config import load_config  # noqa: E402
from scope_ds.engines.placement import (  # noqa: E402
    BF16,
    FITS,
    GIB,
    STATE_BYTES,
    Arch,
    Placement,
    arch_of,
    choose_placement,
    needed_sp,
    teacher_share,
    training_bytes,
)


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def _arch(name: str) -> Arch:
    try:
        return arch_of(name)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def _placed(p: Placement, ranks: int) -> str:
    if p.kind == "replicated":
        return "whole on every rank (model.teacher_placement=replicated)"
    if p.kind == "tensor":
        return f"its layers split over {p.tp} ranks, the LM head whole (model.teacher_placement=tensor)"
    return f"/ {ranks} ranks (model.teacher_placement=zero3)"


def plan(recipe: str, nodes: int, gpus_per_node: int, gpu_gib: float, overrides: list[str] | None = None) -> str:
    cfg = load_config(recipe, overrides or [])
    r, t, sp = cfg.rollout, cfg.train, cfg.parallel.sequence_parallel_size
    student, teacher = _arch(cfg.model.student), _arch(cfg.model.teacher)
    server_gpus = r.num_servers * r.gpus_per_server
    ranks = nodes * gpus_per_node - server_gpus
    longest = cfg.data.max_prompt_tokens + r.max_new_tokens
    placed = choose_placement(cfg, student, teacher, ranks, gpus_per_node, gpu_gib * GIB, BF16)
    if cfg.model.teacher_placement != "auto":  # the recipe's own
        tp = cfg.model.teacher_tp_size or gpus_per_node
        placed = Placement(cfg.model.teacher_placement, tp, "as the recipe says")
    teacher_bytes = teacher_share(placed.kind, teacher, ranks, placed.tp, BF16)
    b = training_bytes(cfg, student, teacher, ranks, sp, teacher_bytes)
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
        f"| teacher weights | {gib(teacher_part)} | {pt / 1e9:.2f} B params x 2 B (bf16), {_placed(placed, ranks)} |",
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
        "",
        f"Teacher placement (model.teacher_placement={cfg.model.teacher_placement}): {placed.kind}"
        + (f" over {placed.tp} ranks" if placed.kind == "tensor" else "")
        + f": {placed.reason}.",
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
