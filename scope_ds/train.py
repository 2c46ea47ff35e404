"""Train a student with SCOPE (or OPD, GRPO, KD).

    deepspeed [--num_gpus N] scope_ds/train.py [--config recipes/X.yaml] [section.key=value ...]

With no --config: the embedded toy run (toy models built on first use, the embedded rollout
server on CPU). Also runs under torchrun, srun and mpirun, or as a plain single process.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

if __package__ in (None, ""):  # run as a script (the deepspeed launcher does this)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scope_ds.openmp import passive_waits  # noqa: E402

# Nothing heavier than the standard library at module level: the verifier's worker process
# (multiprocessing's spawn) runs this script again as __mp_main__, and torch there is seconds of
# start-up for nothing.
passive_waits()  # before torch loads OpenMP (docs/bench_peer.md, "Threads")
DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "toy.yaml")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--config", default=DEFAULT_RECIPE, help="recipe YAML (default: recipes/toy.yaml, the embedded toy run)"
    )
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo.tau=0.5 rollout.n=8")
    return ap.parse_args(argv)


def install_stop_handlers(request_stop) -> None:
    """SIGTERM, SIGUSR1 (SLURM's warnings before a time limit), SIGINT (Ctrl-C) and the exit of the
    deepspeed launcher above the ranks: save the last finished step, then exit 0. A second SIGINT
    quits at once, without saving."""
    from scope_ds.engines.ds_launcher import watch_launcher

    def say(text: str) -> None:  # os.write: a print in a signal handler may re-enter the stream's lock
        if os.environ.get("RANK", "0") == "0":
            os.write(2, f"scope_ds: {text}\n".encode())

    def on_interrupt(signum: int, frame: object) -> None:
        say("interrupted: saving the last finished step, then stopping (Ctrl-C again: quit without saving)")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        request_stop()

    def on_launcher_gone(what: str) -> None:
        say(f"{what}: saving the last finished step, then stopping")
        request_stop()

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, request_stop)
    signal.signal(signal.SIGINT, on_interrupt)
    watch_launcher(on_launcher_gone)


def main(argv: list[str] | None = None) -> int:
    from scope_ds.config import ConfigError, load_config

    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from scope_ds.checkpoint import CheckpointError
    from scope_ds.pipeline import PipelineError, build_run, request_stop, train

    install_stop_handlers(request_stop)

    try:
        run = build_run(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:  # bad input found while setting up: no work lost
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        train(run)
    except (PipelineError, CheckpointError) as e:  # a server down, a bad checkpoint: say so, no stack trace
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        run.close()
    from scope_ds.engines import ds

    ds.end_distributed()  # every rank finished: an orderly end of the process groups
    return 0


if __name__ == "__main__":
    sys.exit(main())
