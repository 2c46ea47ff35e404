"""Benchmark of the rollout path on this machine (not a test).

1. Generation throughput of the embedded server on a small random Llama (hidden 256, 4 layers,
   vocab 1024) with 1, 8 and 64 concurrent requests (16-token prompts, 64 new tokens each).
2. Time of one weight sync, disk and distributed (gloo), for a ~100M-parameter random Llama
   pushed from this process to one embedded server (pause, transfer, load, version check, resume).

    python tools/bench_rollout.py [--out-dir DIR] [--concurrency 1 8 64] [--skip-sync]
        [--server-arg=--transformers-decode]   # server flags for the generation part
        [--out docs/rollout.md]   # also into that page's bench:rollout block

Prints a Markdown table (the one in docs/rollout.md comes from this command).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import benchlib

sys.path.insert(0, str(benchlib.ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from scope_ds.rollout.client import RolloutClient, SyncRolloutClient  # noqa: E402
from scope_ds.rollout.launcher import launch_embedded  # noqa: E402
from scope_ds.rollout.weight_sync import DiskWeightSync, DistributedWeightSync  # noqa: E402


def _llama(**shape: int) -> dict:
    """A random Llama's config arguments (benchlib.random_model): no grouped-query attention, untied head."""
    return dict(
        **shape,
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


SMALL = _llama(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, vocab_size=1024)
# 2 x 32000 x 640 (embeddings, head) + 12 x (4 x 640^2 + 3 x 640 x 1728) = 100.5M parameters.
M100 = _llama(hidden_size=640, intermediate_size=1728, num_hidden_layers=12, num_attention_heads=10, vocab_size=32000)


async def _wave(client: RolloutClient, concurrency: int, new_tokens: int, vocab: int) -> tuple[int, float]:
    prompts = [[1] + [(7 * i + 13 * j) % (vocab - 2) + 2 for j in range(15)] for i in range(concurrency)]
    params = {"temperature": 1.0, "max_new_tokens": new_tokens, "ignore_eos": True}
    t0 = time.perf_counter()
    groups = await asyncio.gather(*(client.generate(p, params) for p in prompts))
    return sum(g[0].response_length for g in groups), time.perf_counter() - t0


def bench_throughput(
    work: Path, levels: list[int], new_tokens: int, rounds: int, server_args: list[str]
) -> list[tuple[str, str]]:
    folder = benchlib.build_random_model(work / "small", "llama", 0, **SMALL)
    proc = launch_embedded(str(folder), log_dir=work, wait_s=300, extra_args=server_args)[0]
    rows = []
    try:

        async def run() -> None:
            client = RolloutClient([proc.url], timeout_s=1800, api_key=proc.api_key)
            await _wave(client, 4, 8, SMALL["vocab_size"])  # warm-up
            for c in levels:
                tokens, seconds = 0, 0.0
                for _ in range(rounds):
                    t, s = await _wave(client, c, new_tokens, SMALL["vocab_size"])
                    tokens, seconds = tokens + t, seconds + s
                flags = f" ({' '.join(server_args)})" if server_args else ""
                rows.append((f"generate, {c} concurrent request(s){flags}", f"{tokens / seconds:,.0f} tokens/s"))
                print(f"  {c:>3} concurrent: {tokens} tokens in {seconds:.2f} s", flush=True)
            await client.aclose()

        asyncio.run(run())
    finally:
        proc.stop()
    return rows


def bench_sync(work: Path, repeats: int) -> list[tuple[str, str]]:
    base = benchlib.build_random_model(work / "m100", "llama", 0, **M100)
    trainer_model = benchlib.random_model("llama", 1, **M100).eval()
    params = sum(p.numel() for p in trainer_model.parameters())
    proc = launch_embedded(str(base), log_dir=work, wait_s=600)[0]
    rows = []
    try:
        with SyncRolloutClient([proc.url], timeout_s=1800, api_key=proc.api_key) as client:
            methods = {
                "disk": DiskWeightSync(client, work / "shared", config_dir=base, keep=1),
                "distributed (gloo)": DistributedWeightSync(client, backend="gloo"),
            }
            version = 0  # the server starts at 0; each update names the next version, as the trainer does
            for name, sync in methods.items():
                times = []
                for _ in range(repeats):
                    version += 1
                    t0 = time.perf_counter()
                    sync.update(trainer_model.named_parameters(), version)
                    times.append(time.perf_counter() - t0)
                label = f"weight sync, {name}, {params / 1e6:.0f}M params fp32"
                rows.append(
                    (label, f"{min(times):.2f} s (best of {repeats}; all: {', '.join(f'{t:.2f}' for t in times)})")
                )
                print(f"  {name}: {times}", flush=True)
            methods["distributed (gloo)"].close()  # type: ignore[attr-defined]
    finally:
        proc.stop()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="waves of requests per concurrency level")
    p.add_argument("--sync-repeats", type=int, default=2)
    p.add_argument("--skip-sync", action="store_true")
    p.add_argument("--skip-generate", action="store_true")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="a flag for the generation part's server, e.g. --server-arg=--transformers-decode (repeatable)",
    )
    p.add_argument("--out", help="also write the table into this docs page's bench:rollout block")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.out_dir) as tmp:
        work = Path(tmp)
        rows = []
        if not args.skip_generate:
            rows += bench_throughput(work, args.concurrency, args.new_tokens, args.rounds, args.server_arg)
        if not args.skip_sync:
            rows += bench_sync(work, args.sync_repeats)
    print(f"\nmachine: {benchlib.machine_line()}, torch {torch.__version__}")
    table = "\n".join(
        ["| measurement | result |", "| --- | --- |", *(f"| {label} | {value} |" for label, value in rows)]
    )
    print("\n" + table)
    if args.out:
        benchlib.write_block(args.out, "rollout", table)


if __name__ == "__main__":
    main()
