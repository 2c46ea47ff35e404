"""A fixed-seed SCOPE run whose rollouts and losses must not move under a refactor.

The expected figures were produced by the code before the pipeline became a package (issue 12):
2 ranks, max_staleness=0, 2 steps of 2 prompts x 4 rollouts on the tiny model pair. They were
regenerated once, on purpose, when the embedded server's sampler became one batched inverse-CDF
draw per decode step (issue 16): the same distribution, another stream of samples per seed. The
old figures still held with the old sampler and everything else of that change. A change that
alters the maths (a loss, a weight, the data order, the sampling seeds) fails here; the float32
rounding of the server's batched log-probs (~1e-7) is all the tolerance allows.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from train_helpers import check_ok, launch_train, read_jsonl, small_run_overrides

# Per step: a digest of every rollout's response ids (in log order), the rollouts' SCOPE weights,
# and the update's metrics.
EXPECTED = {
    1: {
        "responses": "6fa845edfe8d29fd",
        "weights": [
            0.03599343326481581,
            0.4334221072962469,
            0.09716235214269042,
            0.4334221072962469,
            0.14167240740322962,
            0.6066044032992088,
            0.03738894858719481,
            0.21433424071036666,
        ],
        "metrics": {
            "loss/total": 39.389817237854004,
            "loss/opd": 39.389817237854004,
            "grad_norm": 695.3885352382092,
            "reward/accuracy": 0.0,
            "response/tokens": 74.0,
        },
    },
    2: {
        "responses": "6a8efe7437063205",
        "weights": [
            0.10031259205357912,
            0.6362115176327372,
            0.06739910175926617,
            0.19607678855441746,
            0.4793345332532587,
            0.19148255551646876,
            0.19563578691880038,
            0.13354712431147217,
        ],
        "metrics": {
            "loss/total": 47.92110633850098,
            "loss/opd": 47.92110633850098,
            "grad_norm": 779.640264425122,
            "reward/accuracy": 0.0,
            "response/tokens": 96.0,
        },
    },
}
# The tiny random student answers nothing right, so every rollout takes the OPD path.
METRICS = ("loss/total", "loss/mle", "loss/opd", "grad_norm", "reward/accuracy", "response/tokens")


def figures(out) -> dict[int, dict]:
    """What EXPECTED records, read from a finished run folder."""
    logged = {m["step"]: m for m in read_jsonl(out / "metrics.jsonl")}
    got = {}
    for step in (1, 2):
        rows = read_jsonl(out / "rollouts" / f"step_{step}.jsonl")
        ids = json.dumps([r["response_ids"] for r in rows]).encode()
        got[step] = {
            "responses": hashlib.sha256(ids).hexdigest()[:16],
            "weights": [r["weight"] for r in rows],
            "metrics": {k: logged[step][k] for k in METRICS if k in logged[step]},
        }
    return got


def test_fixed_seed_scope_run_is_unchanged(model_pair, tmp_path):
    student, teacher = model_pair
    out = tmp_path / "run"
    check_ok(
        launch_train(
            [*small_run_overrides(student, teacher, out), "pipeline.max_staleness=0"], ranks=2, launcher="ranks"
        )
    )
    got = figures(out)
    for step, want in EXPECTED.items():
        assert got[step]["responses"] == want["responses"], f"step {step}: other rollouts than before"
        assert got[step]["weights"] == pytest.approx(want["weights"], abs=1e-5)
        assert got[step]["metrics"].keys() == want["metrics"].keys()
        for k, v in want["metrics"].items():
            assert got[step]["metrics"][k] == pytest.approx(v, abs=1e-5, rel=1e-5), f"step {step}: {k}"
