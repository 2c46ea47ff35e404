"""A fixed-seed SCOPE run whose rollouts and losses must not move under a refactor.

The expected figures were produced by the code before the pipeline became a package (issue 12):
2 ranks, max_staleness=0, 2 steps of 2 prompts x 4 rollouts on the tiny model pair. They were
regenerated once, on purpose, when the embedded server's sampler became one batched inverse-CDF
draw per decode step (issue 16): the same distribution, another stream of samples per seed. The
old figures still held with the old sampler and everything else of that change. Regenerated again
when seeded draws became keyed by (seed, token position), as SGLang's (issue 17); the previous
figures still held with the previous sampler and the rest of that change. A change that
alters the maths (a loss, a weight, the data order, the sampling seeds) fails here; the float32
rounding of the server's batched log-probs (~1e-7) is all the tolerance allows.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from train_helpers import read_jsonl

# Per step: a digest of every rollout's response ids (in log order), the rollouts' SCOPE weights,
# and the update's metrics.
EXPECTED = {
    1: {
        "responses": "6adda9124c88d1dd",
        "weights": [
            0.36141818599824715,
            0.36141818599824715,
            0.02596675153609844,
            0.25119687646740735,
            0.4415194654074964,
            0.1483678839286462,
            0.17412485903743094,
            0.23598779162642644,
        ],
        "metrics": {
            "loss/total": 32.69533348083496,
            "loss/opd": 32.69533348083496,
            "grad_norm": 499.2850121969158,
            "reward/accuracy": 0.0,
            "response/tokens": 56.0,
        },
    },
    2: {
        "responses": "85d3e81b13567d7a",
        "weights": [
            0.4995055501164407,
            0.20373562513050547,
            0.0785434476495355,
            0.2182153771035183,
            0.1062614682228053,
            0.161716865816682,
            0.1722502353913615,
            0.5597714305691511,
        ],
        "metrics": {
            "loss/total": 54.59127616882324,
            "loss/opd": 54.59127616882324,
            "grad_norm": 804.499333205823,
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


def test_fixed_seed_scope_run_is_unchanged(default_run):
    """conftest.py's default run (2 ranks, max_staleness=0, 6 steps at a constant learning rate):
    its first 2 steps are those of the 2-step run the figures were taken from."""
    got = figures(default_run)
    for step, want in EXPECTED.items():
        assert got[step]["responses"] == want["responses"], f"step {step}: other rollouts than before"
        assert got[step]["weights"] == pytest.approx(want["weights"], abs=1e-5)
        assert got[step]["metrics"].keys() == want["metrics"].keys()
        for k, v in want["metrics"].items():
            assert got[step]["metrics"][k] == pytest.approx(v, abs=1e-5, rel=1e-5), f"step {step}: {k}"
