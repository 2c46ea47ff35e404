"""The training pipeline: the parts of a run, and the schedule that moves batches through them.

build.py        the parts of a run from the config (engines, rollout servers, data, logs)
run.py          Run: the typed parts every stage and checkpoint function receives
versions.py     PolicyVersions: the one owner of the student's and the servers' policy versions
loop.py         the training loop: generate -> verify -> score -> update -> sync -> log/save/eval
feed.py         the rollout producer (rank 0) and the scored-batch feed (every rank), in threads
stages.py       the stage functions: generate, verify, score, plan, update, sync
collectives.py  rank 0's results on every rank, sums over ranks, the stop flag
"""

from scope_ds.pipeline.build import build_run
from scope_ds.pipeline.collectives import PipelineError, request_stop
from scope_ds.pipeline.loop import train
from scope_ds.pipeline.run import Run

__all__ = ["PipelineError", "Run", "build_run", "request_stop", "train"]
