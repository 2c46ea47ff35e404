#!/usr/bin/env python
"""Chunked vs naive per-token log-prob and full-vocabulary KL: peak extra memory and time.

    python tools/bench_logprobs.py [--vocab 151936] [--seqs 1024,4096,8192] [--out docs/bench_logprobs.md]

Each case runs in its own process (forward + backward from logits, as in a training step), with
an address-space limit so that a naive case too big for this machine reports OOM instead of
being killed. "Peak extra" is the process's peak resident memory during the op (peak reset just
before it) above what it held before, minus the gradient of the logits, which both variants must
return and which is the same size in both.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import resource
import sys
import time

import benchlib

ROOT = str(benchlib.ROOT)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))


def _naive(op, z, tok, q):
    import torch

    logp = torch.log_softmax(z.float(), -1)
    if op == "logp":
        return logp.gather(-1, tok[:, None]).squeeze(-1)
    logq = torch.log_softmax(q.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def _chunked(op, z, tok, q):
    from scope_ds.ops import reverse_kl, token_logprobs

    return token_logprobs(z, tok) if op == "logp" else reverse_kl(z, q)


def child(op: str, impl: str, dtype_name: str, seq: int, vocab: int, repeats: int) -> dict:
    import torch

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    z = torch.randn(seq, vocab, dtype=dtype).requires_grad_()
    q = torch.randn(seq, vocab, dtype=dtype) if op == "kl" else None
    tok = torch.randint(0, vocab, (seq,))
    up = torch.randn(seq)
    fn = _naive if impl == "naive" else _chunked
    grad_bytes = z.numel() * z.element_size()
    times, extra = [], None
    for _ in range(repeats):
        z.grad = None
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
        t0 = time.perf_counter()
        (fn(op, z, tok, q) * up).sum().backward()
        times.append(time.perf_counter() - t0)
        peak = _status_kb("VmHWM")
        if extra is None:
            extra = (peak - before) * 1024 - grad_bytes
    return {"time_s": min(times), "extra_mb": max(extra, 0) / 2**20}


def run_case(args, op, impl, dtype, seq) -> dict:
    case = [op, impl, dtype, str(seq), "--vocab", str(args.vocab), "--repeats", str(args.repeats)]
    proc = benchlib.run_child(__file__, ["--child", *case, "--mem-limit-gb", str(args.mem_limit_gb)])
    if proc.returncode != 0:
        oom = "can't allocate memory" in proc.stderr or "MemoryError" in proc.stderr or proc.returncode < 0
        return {"error": "OOM" if oom else proc.stderr.strip().splitlines()[-1][:80]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--seqs", default="1024,4096,8192")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--ops", default="logp,kl")
    ap.add_argument("--repeats", type=int, default=2, help="runs per case; time is the fastest")
    ap.add_argument("--mem-limit-gb", type=float, default=20.0, help="address-space limit of each case")
    ap.add_argument("--out", help="also write the table into this docs page's bench:logprobs block")
    ap.add_argument("--child", nargs=4, metavar=("OP", "IMPL", "DTYPE", "SEQ"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        op, impl, dtype, seq = args.child
        lim = int(args.mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        sys.path.insert(0, ROOT)
        print(json.dumps(child(op, impl, dtype, int(seq), args.vocab, args.repeats)))
        return
    from tqdm import tqdm

    cases = [(o, d, int(s)) for o in args.ops.split(",") for d in args.dtypes.split(",") for s in args.seqs.split(",")]
    header = (
        "| op | dtype | seq | naive extra MB | chunked extra MB | memory ratio | naive s | chunked s | time ratio |"
    )
    lines = [header, "|" + "---|" * 9]
    for op, dtype, seq in tqdm(cases, desc="cases"):
        n, c = run_case(args, op, "naive", dtype, seq), run_case(args, op, "chunked", dtype, seq)
        if "error" in n or "error" in c:
            nm = n.get("error") or f"{n['extra_mb']:.0f}"
            ns = n.get("error") or f"{n['time_s']:.2f}"
            cm = c.get("error") or f"{c['extra_mb']:.0f}"
            cs = c.get("error") or f"{c['time_s']:.2f}"
            lines.append(f"| {op} | {dtype} | {seq} | {nm} | {cm} | n/a | {ns} | {cs} | n/a |")
            continue
        lines.append(
            f"| {op} | {dtype} | {seq} | {n['extra_mb']:.0f} | {c['extra_mb']:.0f} | "
            f"{c['extra_mb'] / max(n['extra_mb'], 1e-9):.3f} | {n['time_s']:.2f} | {c['time_s']:.2f} | "
            f"{c['time_s'] / n['time_s']:.2f} |"
        )
    table = "\n".join(lines)
    print(f"vocab {args.vocab}, forward + backward from logits, {os.cpu_count()} CPU cores\n{table}")
    if args.out:
        benchlib.write_block(args.out, "logprobs", table)


if __name__ == "__main__":
    main()
