"""Builds the embedded default's toy teacher and student (if missing) and prints what they measure.

    python tools/make_toy_models.py [--cache-dir DIR] [--seed N] [--threads 2] [--force]

The folders land in DIR/<version>-seed<N>/{teacher,student} (DIR defaults to $SCOPE_DS_CACHE/toy or
~/.cache/scope_ds/toy). The trainer calls the same ensure_toy_models() on first use.
"""

from __future__ import annotations

import os

# With more runnable threads than cores, OpenMP's default spin-waiting makes each matmul wait for
# preempted siblings (10x slower steps seen on a shared 2-core box). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from scope_ds.toy.cache import build_folder, default_cache_dir  # noqa: E402
from scope_ds.toy.models import ensure_toy_models  # noqa: E402


def _table(report: dict, seconds: float) -> str:
    rows = [f"{'model':<8} {'params':>9} {'SFT steps':>9} {'held-out acc (T=1)':>18} {'train s':>8}"]
    for name in ("teacher", "student"):
        r = report[name]
        rows.append(f"{name:<8} {r['params']:>9,} {r['steps']:>9} {r['test_accuracy']:>18.3f} {r['train_s']:>8.1f}")
    rows.append(
        f"build time {report['build_s']:.1f} s (this call {seconds:.1f} s), torch threads {report['torch_threads']}"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default: {default_cache_dir()}")
    parser.add_argument("--seed", type=int, default=0, help="seeds data, initialisation and sampling")
    parser.add_argument("--variant", choices=("chain", "any-order"), default="chain", help="the toy task variant")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--force", action="store_true", help="rebuild even if a finished build exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.force:
        root = build_folder((args.cache_dir or default_cache_dir()).expanduser(), args.seed, args.variant)
        shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    models = ensure_toy_models(args.cache_dir, seed=args.seed, progress=not args.no_progress, variant=args.variant)
    print(f"teacher: {models.teacher}\nstudent: {models.student}")
    print(_table(models.report, time.perf_counter() - start))
    return models.report


if __name__ == "__main__":
    main()
