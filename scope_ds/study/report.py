"""A study's outputs, from its run folders: OUT/study.md, OUT/study.json, OUT/curves.png, OUT/pass_at_k.png.

- Figures per arm: mean and spread over seeds of each run's Avg@n and unbiased Pass@k (from the
  run's ``eval/results.json``), per benchmark and averaged over benchmarks.
- Paired differences against the baseline arm: per prompt and seed, arm minus baseline (the runs
  of one seed, the same held-out prompts), with a bootstrap interval over prompts and seeds
  (``stats.paired_difference``).
- Runs that failed or are not done are listed with their logs, and left out of the figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from scope_ds.evaluation.estimators import k_values, pass_at_k_single
from scope_ds.evaluation.report import log2_k_axis, save_figure
from scope_ds.study import stats
from scope_ds.study.runner import evaluated, failure, trained
from scope_ds.study.spec import RunSpec, Study

AVERAGE = "average"


def _run_record(run: RunSpec) -> dict[str, Any]:
    """What one run contributes: status, figures, per-prompt correctness, held-out curve."""
    out: dict[str, Any] = {"arm": run.arm, "seed": run.seed, "folder": str(run.folder)}
    failed = failure(run)
    if evaluated(run):
        out["status"] = "done"
    elif failed:
        out.update(status="failed", stage=failed["stage"], rc=failed["rc"], log=failed["log"])
    else:
        out["status"] = "evaluating" if trained(run) else "not trained"
        logs = sorted(run.folder.glob("train*.log"), key=lambda p: p.stat().st_mtime)
        if logs:
            out["log"] = str(logs[-1])
    metrics = run.folder / "train" / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        out["curve"] = [[r["step"], r["eval/accuracy"]] for r in rows if r.get("eval/accuracy") is not None]
    if out["status"] != "done":
        return out
    model = json.loads((run.folder / "eval" / "results.json").read_text())["models"][0]
    out["benchmarks"] = {name: _figures(s) for name, s in model["benchmarks"].items()}
    out["benchmarks"][AVERAGE] = _figures(model["average"])
    correct: dict[str, dict[str, list[bool]]] = {}
    for path in sorted((run.folder / "eval").glob("samples_*.jsonl")):
        for line in path.read_text().splitlines():
            s = json.loads(line)
            correct.setdefault(s["benchmark"], {}).setdefault(s["prompt_id"], []).append((s["sample"], s["correct"]))
    out["correct"] = {b: {p: [c for _, c in sorted(v)] for p, v in per.items()} for b, per in correct.items()}
    return out


def _figures(summary: dict[str, Any]) -> dict[str, Any]:
    return {"avg": summary["avg"], "pass_at_k": {int(k): v for k, v in summary["pass_at_k"].items()}}


def build(study: Study) -> dict[str, Any]:
    """The study's results (what study.json holds) from its run folders."""
    n = int(study.eval["n"])
    records = [_run_record(r) for r in study.runs()]
    done = [r for r in records if r["status"] == "done"]
    benchmarks = sorted({b for r in done for b in r["benchmarks"] if b != AVERAGE})
    columns = [*benchmarks, AVERAGE] if len(benchmarks) > 1 else benchmarks
    arms: dict[str, Any] = {}
    for arm in (a.name for a in study.arms):
        mine = [r for r in done if r["arm"] == arm]
        figures = {}
        for col in columns if mine else []:
            key = AVERAGE if col == AVERAGE or len(benchmarks) == 1 else col
            per_seed = [r["benchmarks"][key] for r in mine]
            ks = sorted(set.intersection(*(set(f["pass_at_k"]) for f in per_seed)))
            figures[col] = {
                "avg": stats.spread([f["avg"] for f in per_seed]).to_json(),
                "pass_at_k": {k: stats.spread([f["pass_at_k"][k] for f in per_seed]).to_json() for k in ks},
            }
        arms[arm] = {"seeds_done": [r["seed"] for r in mine], "figures": figures}
    paired = {arm: _paired(study, done, arm, benchmarks, n) for arm in arms if arm != study.baseline}
    return {
        "study": str(study.path),
        "recipe": str(study.recipe),
        "steps": study.steps,
        "seeds": study.seeds,
        "baseline": study.baseline,
        "eval": study.eval,
        "benchmarks": benchmarks,
        "columns": columns,
        "arms": arms,
        "paired": paired,
        "runs": [{k: v for k, v in r.items() if k not in ("correct",)} for r in records],
    }


def _paired(study: Study, done: list[dict], arm: str, benchmarks: list[str], n: int) -> dict[str, Any]:
    """Arm minus baseline on the seeds both finished, per prompt, averaged over the benchmarks."""
    by = {(r["arm"], r["seed"]): r for r in done}
    seeds = [s for s in study.seeds if (arm, s) in by and (study.baseline, s) in by]
    if not seeds:
        return {"seeds": []}
    out: dict[str, Any] = {"seeds": seeds}
    per_prompt = {"avg": lambda c: float(np.mean(c)), f"pass@{n}": lambda c: pass_at_k_single(len(c), sum(c), n)}
    for name, fn in per_prompt.items():
        diffs = []
        for b in benchmarks:
            prompts = sorted(
                set.intersection(*(set(by[(a, s)]["correct"][b]) for a in (arm, study.baseline) for s in seeds))
            )
            diffs.append(np.array([[fn(by[(arm, s)]["correct"][b][p]) - fn(by[(study.baseline, s)]["correct"][b][p])
                                    for p in prompts] for s in seeds]))  # fmt: skip
        out[name] = stats.paired_difference(diffs, study.resamples, study.confidence, seed=0).to_json()
    return out


def _pm(spread: dict[str, float] | None) -> str:
    if spread is None:
        return "-"
    return f"{100 * spread['mean']:.1f} ± {100 * spread['sd']:.1f}"


def _ci(p: dict[str, float] | None) -> str:
    if p is None:
        return "-"
    return f"{100 * p['diff']:+.1f} [{100 * p['lo']:+.1f}, {100 * p['hi']:+.1f}]"


def markdown(results: dict[str, Any]) -> str:
    """study.md: the figures table, Pass@k over k, the paired differences, the runs not done."""
    ev, n, cols = results["eval"], int(results["eval"]["n"]), results["columns"]
    lines = [
        f"# Study {Path(results['study']).name}",
        "",
        f"Recipe `{results['recipe']}`, {results['steps']} steps per run, seeds {results['seeds']}; evaluation: "
        f"{ev['benchmarks']}, n = {n}, temperature {ev['temperature']}, top-p {ev['top_p']}, top-k {ev['top_k']}, "
        f"max {ev['max_new_tokens']} new tokens, per-sample seeds (seed {ev['seed']}).",
        "",
        f"## Held-out Avg@{n} / Pass@{n} (unbiased), %: mean ± sd over seeds",
        "",
        "| Arm | seeds | " + " | ".join(f"{c} Avg@{n} | {c} Pass@{n}" for c in cols) + " |",
        "| --- | ---: |" + " ---: | ---: |" * len(cols),
    ]
    for arm, a in results["arms"].items():
        cells = []
        for c in cols:
            f = a["figures"].get(c)
            cells += [_pm(f and f["avg"]), _pm(f and f["pass_at_k"].get(n))]
        lines.append(f"| {arm} | {len(a['seeds_done'])}/{len(results['seeds'])} | " + " | ".join(cells) + " |")
    last = cols[-1] if cols else None
    ks = k_values(n)
    lines += ["", f"## Pass@k (unbiased) on {last}, %: mean ± sd over seeds", "",
              "| Arm | " + " | ".join(f"k={k}" for k in ks) + " |", "| --- |" + " ---: |" * len(ks)]  # fmt: skip
    for arm, a in results["arms"].items():
        f = a["figures"].get(last) if last else None
        lines.append(f"| {arm} | " + " | ".join(_pm(f and f["pass_at_k"].get(k)) for k in ks) + " |")
    base = results["baseline"]
    conf = next((p["avg"]["confidence"] for p in results["paired"].values() if "avg" in p), 0.95)
    lines += ["", f"## Against {base}: arm - {base}, points, paired by seed and prompt "
              f"({100 * conf:.0f}% bootstrap interval over prompts and seeds)", "",
              f"| Arm | paired seeds | Avg@{n} | Pass@{n} |", "| --- | ---: | ---: | ---: |"]  # fmt: skip
    for arm, p in results["paired"].items():
        lines.append(f"| {arm} | {len(p['seeds'])} | {_ci(p.get('avg'))} | {_ci(p.get(f'pass@{n}'))} |")
    missing = [r for r in results["runs"] if r["status"] != "done"]
    if missing:
        lines += ["", "## Runs not in the figures", ""]
        for r in missing:
            if r["status"] == "failed":
                why = f"failed in {r['stage']} (exit {r['rc']}), log {r['log']}"
            else:
                why = r["status"] + (f", log {r['log']}" if r.get("log") else "")
            lines.append(f"- {r['arm']} seed {r['seed']}: {why}")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """curves.png (held-out accuracy during training, mean over seeds, min-max band) and
    pass_at_k.png (Pass@k against k, mean ± sd over seeds), every arm overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        for i, arm in enumerate(results["arms"]):
            curves = [dict(map(tuple, r["curve"])) for r in results["runs"] if r["arm"] == arm and r.get("curve")]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not steps:
                continue
            y = np.array([[c[s] for s in steps] for c in curves]) * 100
            ax.plot(steps, y.mean(0), "o-", color=f"C{i % 10}", label=f"{arm} ({len(curves)} seeds)")
            ax.fill_between(steps, y.min(0), y.max(0), color=f"C{i % 10}", alpha=0.15)
        save_figure(fig, ax, out / "curves.png", "step", "held-out accuracy (%)", "held-out accuracy during training")
        written.append(out / "curves.png")
    finally:
        plt.close(fig)
    last = results["columns"][-1] if results["columns"] else None
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        all_ks: set[int] = set()
        for i, (arm, a) in enumerate(results["arms"].items()):
            f = a["figures"].get(last)
            if not f:
                continue
            ks = sorted(int(k) for k in f["pass_at_k"])
            all_ks.update(ks)
            mean = [100 * f["pass_at_k"][k]["mean"] for k in ks]
            sd = [100 * f["pass_at_k"][k]["sd"] for k in ks]
            ax.errorbar(ks, mean, yerr=sd, fmt="o-", color=f"C{i % 10}", capsize=3, label=arm)
        log2_k_axis(ax, all_ks)
        save_figure(fig, ax, out / "pass_at_k.png", "k", "Pass@k (%)", f"Pass@k on {last} (mean ± sd over seeds)")
        written.append(out / "pass_at_k.png")
    finally:
        plt.close(fig)
    return written


def write(study: Study) -> dict[str, Any]:
    """Build the results from the run folders and write every output; returns the results."""
    results = build(study)
    study.out.mkdir(parents=True, exist_ok=True)
    (study.out / "study.json").write_text(json.dumps(results, indent=2) + "\n")
    (study.out / "study.md").write_text(markdown(results))
    plot(results, study.out)
    return results
