"""A study file: which runs a study makes, checked whole before anything runs.

    recipe: toy_hard.yaml              # base recipe, relative to this file
    overrides: [train.steps=60]        # every arm
    arms:                              # name -> overrides (a list of section.key=value, or a mapping)
      scope: []
      opd: [algo.name=opd]
      scope-sturev: {algo.student_weight: reversed}
    seeds: [0, 1, 2]                   # each arm trains once per seed (train.seed and data.seed)
    baseline: opd                      # paired differences against this arm
    eval: {benchmarks: toy, n: 8, temperature: 1.0, top_p: 1.0, top_k: -1, max_new_tokens: 64}
    ranks: 1                           # training processes per run
    out: studies/toy                   # output folder (the command's --out wins)

Every (arm, seed) config is built with ``scope_ds.config.load_config`` now, so that an unknown or
invalid option is refused naming its arm, and the evaluation settings are parsed by
``python -m scope_ds.evaluate``'s own parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scope_ds.config import ConfigError, load_config

SEED_KEYS = ("train.seed", "data.seed")  # what a study seed sets
# Evaluation settings a study may give (the evaluator's flags, without the dashes) and their defaults:
# those of the toy task, whose answers are short and whose evaluation samples at the training temperature.
EVAL_DEFAULTS: dict[str, Any] = {
    "benchmarks": "toy",
    "n": 8,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "max_new_tokens": 64,
    "toy_prompts": 128,
    "toy_variant": None,  # None: the recipe's data.toy_variant
    "seed": 0,
    "bootstrap_resamples": 1000,
    "backend": "embedded",
    "extra": [],  # more flags, passed as they are (e.g. [--num-servers, "2"])
}
NAME = re.compile(r"[A-Za-z0-9][\w.+-]*")


class StudyError(ValueError):
    """A study file that cannot run; the message names the culprit."""


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class RunSpec:
    """One (arm, seed): its training overrides (on top of the recipe) and its folder."""

    arm: str
    seed: int
    overrides: tuple[str, ...]
    folder: Path

    @property
    def label(self) -> str:
        return f"{self.arm}-seed{self.seed}"


@dataclass
class Study:
    path: Path  # the study file
    recipe: Path
    arms: list[Arm]
    seeds: list[int]
    baseline: str
    out: Path
    overrides: tuple[str, ...] = ()
    eval: dict[str, Any] = field(default_factory=lambda: dict(EVAL_DEFAULTS))
    ranks: int = 1
    confidence: float = 0.95
    resamples: int = 2000  # bootstrap resamples of the paired differences
    steps: int = 0  # train.steps of the runs (the same for every arm: same compute), set by load

    def runs(self) -> list[RunSpec]:
        """Every (arm, seed), arm-major, in the file's order."""
        return [
            RunSpec(arm.name, seed, (*self.overrides, *arm.overrides, *(f"{k}={seed}" for k in SEED_KEYS)),
                    self.out / "runs" / arm.name / f"seed{seed}")
            for arm in self.arms
            for seed in self.seeds
        ]  # fmt: skip

    def train_overrides(self, run: RunSpec) -> list[str]:
        """What the trainer is given for ``run``: its overrides, its folder, an export at the end and
        checkpoints often enough that a killed study loses little."""
        every = max(1, self.steps // 5)
        return [
            *run.overrides,
            f"logging.out_dir={run.folder / 'train'}",
            "logging.progress=false",
            "checkpoint.export_hf=true",
            f"checkpoint.every={every}",
            "checkpoint.keep=1",
        ]

    def eval_argv(self, run: RunSpec) -> list[str]:
        """``python -m scope_ds.evaluate`` arguments for the exported student of ``run``."""
        e = self.eval
        argv = [
            "--model", f"{run.label}={run.folder / 'train' / 'hf'}",
            "--benchmarks", str(e["benchmarks"]),
            "--out", str(run.folder / "eval"),
            "--seeded", "--no-progress",
        ]  # fmt: skip
        for key in ("n", "temperature", "top_p", "top_k", "max_new_tokens", "toy_prompts", "toy_variant", "seed"):
            argv += [f"--{key.replace('_', '-')}", str(e[key])]
        argv += ["--bootstrap-resamples", str(e["bootstrap_resamples"]), "--backend", str(e["backend"])]
        return [*argv, *map(str, e["extra"])]


def _overrides(value: Any, where: str) -> tuple[str, ...]:
    """A list of ``section.key=value`` strings, or a mapping ``{section.key: value}``."""
    if value is None:
        return ()
    if isinstance(value, dict):
        return tuple(f"{k}={_yaml_scalar(v)}" for k, v in value.items())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise StudyError(f"{where}: overrides must be a list of section.key=value or a mapping, got {value!r}")


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def load_study(path: str | Path, out: str | Path | None = None) -> Study:
    """Read and check a study file; ``out`` replaces its ``out``. Every run's config is built now."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise StudyError(f"malformed study file {path}: {e}") from None
    if not isinstance(data, dict):
        raise StudyError(f"{path}: the top level must be a mapping")
    allowed = {"recipe", "overrides", "arms", "seeds", "baseline", "eval", "ranks", "out", "bootstrap"}
    if unknown := sorted(set(data) - allowed):
        raise StudyError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    for key in ("recipe", "arms", "seeds"):
        if key not in data:
            raise StudyError(f"{path}: {key} is missing")
    recipe = Path(data["recipe"])
    if not recipe.is_absolute():
        recipe = (path.parent / recipe).resolve()
    if not recipe.is_file():
        raise StudyError(f"{path}: recipe not found: {recipe}")
    if not isinstance(data["arms"], dict) or not data["arms"]:
        raise StudyError(f"{path}: arms must be a non-empty mapping of name -> overrides")
    arms = []
    for name, value in data["arms"].items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise StudyError(f"{path}: arm name {name!r} must be letters, digits and . _ + - (a folder name)")
        arms.append(Arm(name, _overrides(value, f"arm {name!r}")))
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise StudyError(f"{path}: seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"{path}: seeds repeat: {seeds}")
    baseline = data.get("baseline", arms[0].name)
    if baseline not in {a.name for a in arms}:
        raise StudyError(f"{path}: baseline {baseline!r} is not an arm ({[a.name for a in arms]})")
    ev = data.get("eval") or {}
    if not isinstance(ev, dict) or (unknown := sorted(set(ev) - set(EVAL_DEFAULTS))):
        raise StudyError(f"{path}: eval: unknown key(s) {unknown if isinstance(ev, dict) else ev!r}; "
                         f"allowed: {sorted(EVAL_DEFAULTS)}")  # fmt: skip
    boot = data.get("bootstrap") or {}
    if not isinstance(boot, dict) or (unknown := sorted(set(boot) - {"resamples", "confidence"})):
        raise StudyError(f"{path}: bootstrap takes resamples and confidence only")
    ranks = data.get("ranks", 1)
    if not isinstance(ranks, int) or ranks < 1:
        raise StudyError(f"{path}: ranks must be an integer >= 1, got {ranks!r}")
    study = Study(
        path=path,
        recipe=recipe,
        arms=arms,
        seeds=seeds,
        baseline=baseline,
        out=Path(out if out is not None else data.get("out") or Path("studies") / path.stem).resolve(),  # from here
        overrides=_overrides(data.get("overrides"), "overrides"),
        eval={**EVAL_DEFAULTS, **ev},
        ranks=ranks,
        confidence=float(boot.get("confidence", 0.95)),
        resamples=int(boot.get("resamples", 2000)),
    )
    if not 0 < study.confidence < 1 or study.resamples < 1:
        raise StudyError(f"{path}: bootstrap confidence must be in (0, 1) and resamples >= 1")
    _check_runs(study)
    _check_eval(study)
    return study


def _check_runs(study: Study) -> None:
    """Build every run's config: an option no arm may take is refused now, naming the arm."""
    configs = {}
    for run in study.runs():
        try:
            configs[run.arm] = load_config(str(study.recipe), study.train_overrides(run))
        except ConfigError as e:
            raise StudyError(f"{study.path}: arm {run.arm!r}: {e}") from None
    steps = {arm: c.train.steps for arm, c in configs.items()}
    if len(set(steps.values())) > 1:
        raise StudyError(f"{study.path}: the arms train different numbers of steps ({steps}): not the same compute")
    study.steps = next(iter(steps.values()))
    variants = {c.data.toy_variant for c in configs.values()}
    if study.eval["toy_variant"] is None:
        if len(variants) > 1:
            raise StudyError(f"{study.path}: the arms train on different toy variants {sorted(variants)}: "
                             "say which one to evaluate on (eval: toy_variant)")  # fmt: skip
        study.eval["toy_variant"] = variants.pop()


def _check_eval(study: Study) -> None:
    from scope_ds.evaluate import parse_args

    run = study.runs()[0]
    argv = study.eval_argv(run)
    try:
        parse_args(argv)
    except SystemExit:
        raise StudyError(
            f"{study.path}: eval: python -m scope_ds.evaluate refuses {argv[2:]} (its message above)"
        ) from None
