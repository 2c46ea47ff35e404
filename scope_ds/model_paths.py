"""Which folders a run's models are: the student, the teacher, and the one the rollout servers serve.

The one home of this decision: the trainer (scope_ds.pipeline.build) loads the engines from it and
the SLURM planner (slurm/layout.py) launches the job's servers from it, so the two cannot disagree.
``"toy"`` names the built-in toy pair of the run's task variant (``data.toy_variant``). No
DeepSpeed and no HTTP here: slurm/layout.py imports it on the batch host.
"""

from __future__ import annotations

from scope_ds.config import AlgoOptions, Config


def uses_toy(cfg: Config) -> bool:
    """Whether the student or the teacher is the built-in toy pair (which model_paths may build)."""
    return "toy" in (cfg.model.student, cfg.model.teacher)


def model_paths(cfg: Config) -> tuple[str, str]:
    """(student, teacher) folders or hub names. ``"toy"`` becomes the toy pair of ``data.toy_variant``
    under ``model.toy_cache``, built on first use (minutes; concurrent callers wait for one build)."""
    m = cfg.model
    if not uses_toy(cfg):
        return m.student, m.teacher
    from scope_ds.toy.cache import find_toy_models

    toy = find_toy_models(m.toy_cache or None, variant=cfg.data.toy_variant)
    if toy is None:  # torch and sentencepiece: only to build the toy
        from scope_ds.toy.models import ensure_toy_models

        toy = ensure_toy_models(m.toy_cache or None, variant=cfg.data.toy_variant)
    student = str(toy.student) if m.student == "toy" else m.student
    teacher = str(toy.teacher) if m.teacher == "toy" else m.teacher
    return student, teacher


def served_of(algo: AlgoOptions, student: str, teacher: str) -> str:
    """Of a resolved pair, the model the rollout servers serve: the teacher for an algorithm that
    trains on the teacher's answers (KD), otherwise the student, which the weight sync keeps current."""
    return teacher if algo.uses_teacher_rollouts else student


def served_model(cfg: Config) -> str:
    """The folder the run's rollout servers load (the toy pair built on first use)."""
    return served_of(cfg.algo, *model_paths(cfg))
