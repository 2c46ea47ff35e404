"""Train, evaluate and compare every (arm, seed) of a study file; resumable.

    python -m scope_ds.study recipes/study_toy.yaml [--out DIR] [--launcher local|slurm]
        [--sbatch-arg=--partition=P ...] [--no-train] [--report-only] [--no-progress]

Writes OUT/study.md (the table), OUT/study.json, OUT/curves.png, OUT/pass_at_k.png, and one folder
per run under OUT/runs/ARM/seedS (train/, eval/, train.log, eval.log). Run the same command again
to continue a study that was stopped or killed. See docs/study.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from scope_ds.study import report
from scope_ds.study.runner import LocalRunner, submit_slurm
from scope_ds.study.spec import StudyError, load_study


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scope_ds.study", description=__doc__.split("\n")[0])
    p.add_argument("study", help="study file (YAML; recipes/study_*.yaml)")
    p.add_argument("--out", help="output folder (default: the study file's out, else studies/NAME)")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local")
    p.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch option for every job, repeatable")
    p.add_argument("--no-train", action="store_true", help="evaluate and report the runs already trained only")
    p.add_argument("--report-only", action="store_true", help="write the table from what is done, run nothing")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        study = load_study(args.study, args.out)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = study.runs()
    print(f"study {study.path}: {len(study.arms)} arms x {len(study.seeds)} seeds = {len(runs)} runs of "
          f"{study.steps} steps; output {study.out}", flush=True)  # fmt: skip
    if args.launcher == "slurm" and not args.report_only:
        argv_again = [str(study.path), "--out", str(study.out)]
        try:
            jobs = submit_slurm(study, argv_again, args.sbatch_arg)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"submitted {len(jobs['train'])} training job(s) {sorted(jobs['train'].values())} and the report job "
              f"{jobs['report']} (after them); ids in {study.out / 'slurm_jobs.json'}")  # fmt: skip
        return 0
    t0 = time.perf_counter()
    if not args.report_only:
        LocalRunner(study, progress=not args.no_progress).run(train=not args.no_train)
    results = report.write(study)
    print(report.markdown(results))
    not_done = sum(r["status"] != "done" for r in results["runs"])
    print(f"study outputs in {study.out}/ (study.md, study.json, curves.png, pass_at_k.png); "
          f"{len(runs) - not_done} of {len(runs)} runs done, {time.perf_counter() - t0:.0f} s")  # fmt: skip
    return 1 if not_done else 0


if __name__ == "__main__":
    sys.exit(main())
