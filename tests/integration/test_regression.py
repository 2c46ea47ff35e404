"""A fixed-seed SCOPE run whose rollouts and losses must not move under a refactor.

The expected figures were produced by the code before the pipeline became a package (issue 12):
2 ranks, max_staleness=0, 2 steps of 2 prompts x 4 rollouts on the tiny model pair. A change that
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
        "responses": "b0cbf0aa4bc38785",
        "weights": [
            0.13170131106564015,
            0.42075567302882144,
            0.14826846413157535,
            0.299274551773963,
            0.8985395951189172,
            0.05444578900794239,
            0.021005203962046654,
            0.02600941191109368,
        ],
        "metrics": {
            "loss/total": 18.555761575698853,
            "loss/opd": 18.555761575698853,
            "grad_norm": 401.0920989398533,
            "reward/accuracy": 0.0,
            "response/tokens": 63.0,
        },
    },
    2: {
        "responses": "9b11d75f52bedccc",
        "weights": [
            0.15247496289856127,
            0.45361002190994,
            0.3006000027707835,
            0.09331501242071534,
            0.46764451679846053,
            0.16649457209257618,
            0.10339439260114262,
            0.2624665185078207,
        ],
        "metrics": {
            "loss/total": 56.69150161743164,
            "loss/opd": 56.69150161743164,
            "grad_norm": 786.72875619772,
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
