"""Where the toy pair's builds live, and finding a finished one without building anything.

Light on purpose (no torch, no transformers): the trainer's rank 0 looks its models up here before
its heavy imports, so that the rollout servers start while they run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

BUILD_VERSION = "v2"  # bump when the task or the recipe changes, so old caches are not reused


@dataclass(frozen=True)
class ToyModels:
    """Where a finished build lies; every folder loads with the Auto* classes, offline."""

    root: Path  # the build folder, <cache_dir>/<BUILD_VERSION>-seed<seed>
    teacher: Path  # AutoModelForCausalLM + AutoTokenizer folder
    student: Path  # same tokenizer as the teacher
    report: dict  # what build_toy_models measured (accuracies, steps, seconds)


def default_cache_dir() -> Path:
    """$SCOPE_DS_CACHE/toy, or ~/.cache/scope_ds/toy."""
    root = os.environ.get("SCOPE_DS_CACHE") or Path.home() / ".cache" / "scope_ds"
    return Path(root) / "toy"


def cache_base(cache_dir: str | Path | None) -> Path:
    """``cache_dir`` (``~`` expanded), or default_cache_dir() where None."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def build_folder(base: Path, seed: int = 0, variant: str = "chain") -> Path:
    """Where a build of this version, seed and task variant lives under the cache."""
    return base / (f"{BUILD_VERSION}-seed{seed}" if variant == "chain" else f"{BUILD_VERSION}-{variant}-seed{seed}")


def finished_build(root: Path) -> ToyModels | None:
    """The build in ``root`` if it is whole (its report is written last), else None."""
    report_path = root / "build_report.json"
    if not report_path.is_file():
        return None
    return ToyModels(root, root / "teacher", root / "student", json.loads(report_path.read_text()))


def find_toy_models(cache_dir: str | Path | None = None, seed: int = 0, variant: str = "chain") -> ToyModels | None:
    """The finished build of this seed and variant under ``cache_dir``, or None (nothing is built)."""
    return finished_build(build_folder(cache_base(cache_dir), seed, variant))
