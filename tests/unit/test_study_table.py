"""A study's table maths against hand-computed cases, and study files refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scope_ds.study import report, stats
from scope_ds.study.spec import StudyError, load_study

REPO = Path(__file__).resolve().parents[2]


def test_spread_is_the_mean_and_the_sample_sd_over_seeds():
    s = stats.spread([0.5, 0.7, 0.6])
    assert s.mean == pytest.approx(0.6) and s.sd == pytest.approx(0.1) and s.n == 3  # sqrt((.01+.01+0)/2)
    assert stats.spread([0.25]).sd == 0.0


def test_a_constant_paired_difference_has_a_point_interval():
    p = stats.paired_difference([np.full((3, 5), 0.25)], resamples=200)
    assert (p.diff, p.lo, p.hi) == (0.25, 0.25, 0.25)


def test_the_interval_over_prompts_matches_the_binomial_by_hand():
    """One seed, four prompts, one of them +1: a resample's mean is Binomial(4, 1/4) / 4, so the
    95% interval is [0, 0.75] (P(X <= 2) = 0.949 < 0.975 <= P(X <= 3) = 0.996; P(X = 0) = 0.316)."""
    p = stats.paired_difference([np.array([[1.0, 0.0, 0.0, 0.0]])], resamples=20000, seed=3)
    assert p.diff == 0.25 and (p.lo, p.hi) == (0.0, 0.75)


def test_the_interval_resamples_seeds_too_and_averages_benchmarks():
    """Two seeds that disagree (+1 and -1 on every prompt): over seeds a resample's mean is +1, 0 or
    -1 with probabilities 1/4, 1/2, 1/4, so the 95% interval is [-1, 1]; a second benchmark with
    difference 0 halves every value of the average."""
    one = np.array([[1.0] * 6, [-1.0] * 6])
    p = stats.paired_difference([one], resamples=4000)
    assert p.diff == 0.0 and (p.lo, p.hi) == (-1.0, 1.0)
    both = stats.paired_difference([one, np.zeros((2, 3))], resamples=4000)
    assert both.diff == 0.0 and (both.lo, both.hi) == (-0.5, 0.5)
    with pytest.raises(ValueError, match="same seeds"):
        stats.paired_difference([one, np.zeros((3, 3))])


def _study(tmp_path: Path, arms: str, extra: str = "", baseline: str = "scope") -> Path:
    path = tmp_path / "study.yaml"
    recipe = REPO / "recipes" / "toy.yaml"
    path.write_text(f"recipe: {recipe}\nseeds: [0, 1]\nbaseline: {baseline}\narms:\n{arms}{extra}")
    return path


def test_an_unknown_arm_option_is_refused_naming_the_arm(tmp_path):
    path = _study(tmp_path, "  scope: []\n  broken: [algo.name=scope, algo.temprature=2]\n")
    with pytest.raises(StudyError, match=r"arm 'broken'.*algo.temprature"):
        load_study(path)
    assert not (tmp_path / "studies").exists() and not list(tmp_path.glob("*/runs"))


def test_other_mistakes_are_refused_by_name(tmp_path):
    with pytest.raises(StudyError, match=r"arm 'kd'.*unknown section 'trian'"):
        load_study(_study(tmp_path, "  scope: []\n  kd: {algo.name: kd, trian.steps: 3}\n"))
    with pytest.raises(StudyError, match="baseline 'opd' is not an arm"):
        load_study(_study(tmp_path, "  scope: []\n", baseline="opd"))
    with pytest.raises(StudyError, match="different numbers of steps"):
        load_study(_study(tmp_path, "  scope: []\n  short: [train.steps=3]\n"))
    with pytest.raises(StudyError, match=r"eval: unknown key\(s\) \['temp'\]"):
        load_study(_study(tmp_path, "  scope: []\n", "eval: {temp: 1.0}\n"))


def test_a_valid_study_lists_its_runs_and_their_overrides(tmp_path):
    study = load_study(_study(tmp_path, "  scope: []\n  opd: {algo.name: opd, rollout.n: 1}\n"), tmp_path / "out")
    runs = study.runs()
    assert [r.label for r in runs] == ["scope-seed0", "scope-seed1", "opd-seed0", "opd-seed1"]
    assert runs[3].overrides == ("algo.name=opd", "rollout.n=1", "train.seed=1", "data.seed=1")
    assert runs[3].folder == tmp_path / "out" / "runs" / "opd" / "seed1"
    assert study.steps == 60  # toy.yaml's


def _fake_run(folder: Path, label: str, correct: dict[str, list[bool]], n: int, bench: str = "toy") -> None:
    """A finished run's eval folder as python -m scope_ds.evaluate writes it: ``correct`` maps
    prompt -> its samples' correctness, or (several benchmarks) benchmark -> such a mapping."""
    per_bench = correct if isinstance(next(iter(correct.values())), dict) else {bench: correct}
    (folder / "train" / "hf").mkdir(parents=True)
    (folder / "train" / "hf" / "config.json").write_text("{}")
    (folder / "eval").mkdir()
    summaries = {
        b: {"avg": float(np.mean([np.mean(c) for c in cs.values()])),
            "pass_at_k": {str(n): float(np.mean([any(c) for c in cs.values()]))}}
        for b, cs in per_bench.items()
    }  # fmt: skip
    average = {
        "avg": float(np.mean([x["avg"] for x in summaries.values()])),
        "pass_at_k": {str(n): float(np.mean([x["pass_at_k"][str(n)] for x in summaries.values()]))},
    }
    model = {"label": label, "benchmarks": summaries, "average": average}
    (folder / "eval" / "results.json").write_text(json.dumps({"models": [model]}))
    for b, cs in per_bench.items():
        lines = [
            json.dumps({"benchmark": b, "prompt_id": p, "sample": j, "correct": c})
            for p, samples in cs.items()
            for j, c in enumerate(samples)
        ]
        (folder / "eval" / f"samples_{label}_{b}.jsonl").write_text("\n".join(lines) + "\n")


def test_with_several_benchmarks_the_table_has_their_average(tmp_path):
    study = load_study(
        _study(tmp_path, "  scope: []\n  opd: [algo.name=opd]\n", "eval: {n: 1}\n", "opd"), tmp_path / "o"
    )
    by_hand = {  # (arm, seed) -> benchmark -> prompt -> one sample's correctness
        ("scope", 0): {"a": {"p": [True], "q": [True]}, "b": {"r": [False], "s": [True], "t": [True]}},
        ("scope", 1): {"a": {"p": [True], "q": [False]}, "b": {"r": [False], "s": [False], "t": [True]}},
        ("opd", 0): {"a": {"p": [False], "q": [True]}, "b": {"r": [False], "s": [False], "t": [False]}},
        ("opd", 1): {"a": {"p": [False], "q": [False]}, "b": {"r": [False], "s": [False], "t": [True]}},
    }
    for run in study.runs():
        _fake_run(run.folder, run.label, by_hand[(run.arm, run.seed)], 1)
    results = report.build(study)
    assert results["columns"] == ["a", "b", "average"]
    scope = results["arms"]["scope"]["figures"]
    assert scope["a"]["avg"]["mean"] == pytest.approx(0.75) and scope["b"]["avg"]["mean"] == pytest.approx(0.5)
    # the average column: per seed the mean of the two benchmarks (1 and 2/3; 1/2 and 1/3), then over seeds
    assert scope["average"]["avg"]["mean"] == pytest.approx((5 / 6 + 5 / 12) / 2)
    # paired: per benchmark the mean over seeds and prompts of scope - opd (a: +1 +0 / +1 +0 = 2/4;
    # b: 0 +1 +1 / 0 0 0 = 2/6), then their mean
    assert results["paired"]["scope"]["avg"]["diff"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert "| Arm | seeds | a Avg@1 | a Pass@1 | b Avg@1 | b Pass@1 | average Avg@1 | average Pass@1 |" in (
        report.markdown(results)
    )


def test_the_table_follows_the_runs_results_and_names_a_failed_run(tmp_path):
    path = _study(tmp_path, "  scope: []\n  opd: [algo.name=opd]\n", "eval: {n: 2}\n", baseline="opd")
    study = load_study(path, tmp_path / "out")
    by_hand = {  # (arm, seed) -> per-prompt correctness of 2 samples
        ("scope", 0): {"a": [True, True], "b": [False, True]},
        ("scope", 1): {"a": [True, False], "b": [False, False]},
        ("opd", 0): {"a": [False, False], "b": [False, True]},
    }
    for run in study.runs():
        if (run.arm, run.seed) in by_hand:
            _fake_run(run.folder, run.label, by_hand[(run.arm, run.seed)], 2)
    failed = study.runs()[3]
    failed.folder.mkdir(parents=True)
    (failed.folder / "FAILED").write_text(json.dumps({"stage": "train", "rc": 3, "log": "LOG"}))
    results = report.build(study)
    scope = results["arms"]["scope"]["figures"]["toy"]
    assert scope["avg"]["mean"] == pytest.approx((0.75 + 0.25) / 2) and scope["avg"]["sd"] == pytest.approx(
        0.3536, 1e-3
    )
    assert scope["pass_at_k"][2]["mean"] == pytest.approx((1.0 + 0.5) / 2)
    assert results["arms"]["opd"]["seeds_done"] == [0]
    paired = results["paired"]["scope"]  # seed 0 only: prompt a +1, prompt b 0 (Avg@2: 1 - 0, 0.5 - 0.5)
    assert paired["seeds"] == [0] and paired["avg"]["diff"] == pytest.approx(0.5)
    assert paired["pass@2"]["diff"] == pytest.approx(0.5)
    text = report.markdown(results)
    assert "| scope | 2/2 | 50.0 ± 35.4 | 75.0 ± 35.4 |" in text
    assert "opd seed 1: failed in train (exit 3), log LOG" in text
