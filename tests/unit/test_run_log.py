"""What RunLog writes: metrics.jsonl lines and TensorBoard scalars, read back with tensorboard's reader."""

from __future__ import annotations

import json
import math

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from scope_ds.metrics import RunLog


def test_every_finite_scalar_reaches_tensorboard_and_metrics_jsonl(tmp_path):
    log = RunLog(str(tmp_path), rank=0, total_steps=2, progress=False)
    steps = {
        1: {"loss/total": 0.5, "time/step": 2.0, "eval/accuracy": None},
        2: {"loss/total": 0.25, "x/nan": math.nan},
    }
    for step, metrics in steps.items():
        log.log(step, metrics)
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss/total"]) for r in lines] == [(1, 0.5), (2, 0.25)] and lines[1]["x/nan"] is None
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss/total", "time/step"]
    assert [(e.step, e.value) for e in events.Scalars("loss/total")] == [(1, 0.5), (2, 0.25)]
    assert [(e.step, e.value) for e in events.Scalars("time/step")] == [(1, 2.0)]
