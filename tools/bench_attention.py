#!/usr/bin/env python
"""Forward + backward of the toy student on one packed micro-batch: transformers' SDPA over the
whole packed row (block-diagonal mask), our per-sequence SDPA (engines/attention.py), and the
same rollouts padded into a batch.

    python tools/bench_attention.py [--rollouts 16] [--length 50] [--repeats 10] [--threads 1]
        [--out docs/PAGE.md]   # also into that page's bench:attention block
"""

from __future__ import annotations

import argparse
import sys
import time

import benchlib

sys.path.insert(0, str(benchlib.ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rollouts", type=int, default=16)
    p.add_argument("--length", type=int, default=50)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="also write the table into this docs page's bench:attention block")
    args = p.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from scope_ds.engines import attention
    from scope_ds.toy.models import ensure_toy_models

    torch.set_num_threads(args.threads)
    student = str(ensure_toy_models(None).student)
    b, n = args.rollouts, args.length
    pos = torch.arange(n).repeat(b)[None]
    ids = torch.randint(4, 60, (b, n))
    cases = {
        "packed, SDPA over the row": ("sdpa", dict(input_ids=ids.reshape(1, -1), position_ids=pos)),
        "packed, per-sequence SDPA": (
            attention.register(),
            dict(input_ids=ids.reshape(1, -1), position_ids=pos, cu_seq_lens_q=attention.sequence_bounds(pos)),
        ),
        "padded batch": ("sdpa", dict(input_ids=ids, attention_mask=torch.ones_like(ids))),
    }
    lines = [f"| layout ({b} x {n} tokens) | ms per forward + backward |", "| --- | ---: |"]
    print("\n".join(lines))
    for name, (attn, inputs) in cases.items():
        model = AutoModelForCausalLM.from_pretrained(student, attn_implementation=attn)
        for i in range(3 + args.repeats):
            if i == 3:
                t0 = time.perf_counter()
            model(**inputs).logits.sum().backward()
        lines.append(f"| {name} | {(time.perf_counter() - t0) / args.repeats * 1e3:.1f} |")
        print(lines[-1], flush=True)
    if args.out:
        benchlib.write_block(args.out, "attention", "\n".join(lines))


if __name__ == "__main__":
    main()
