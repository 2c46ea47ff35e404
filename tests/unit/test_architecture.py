"""The package's floors: modules depend downward only, and each concern has one home.

Every import is read from the source (also the ones inside functions and under TYPE_CHECKING), so
a lazy or a type-only import that runs up the stack is caught as well as a top-level one.
``python tests/unit/test_architecture.py`` prints the floors and the arrows between them.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "scope_ds"

# Each top-level module or package of scope_ds on its floor: a unit may import units of lower
# floors only (and itself). Leaves first; the drivers last.
FLOORS: dict[str, int] = {
    "choices": 0,  # Literal choices and their checks
    "records": 0,  # PromptRecord, Rollout, Batch: the plain records that cross floors
    "openmp": 0,
    "hf_folder": 0,
    "config": 1,  # the typed configuration: a leaf but for choices
    "toy": 1,  # the toy task, its verifier and models: records only
    "algorithms": 2,  # pure tensor maths
    "options": 2,  # the tools' options, read with the config's loader
    "ops": 2,
    "rewards": 2,
    "data": 3,
    "metrics": 3,
    "engines": 4,  # DeepSpeed, and the learner
    "rollout": 4,  # HTTP: client, embedded server, launcher, weight sync
    "model_paths": 4,
    "evaluation": 5,
    "checkpoint": 5,  # below the pipeline: takes the parts it saves through a protocol
    "pipeline": 6,
    "evaluate": 6,
    "study": 7,
    "train": 7,
}


def imports(folder: Path) -> dict[str, set[str]]:
    """Module path -> every module it imports (absolute names; ``from scope_ds import x`` counts as
    ``scope_ds.x``)."""
    out = {}
    for path in sorted(folder.rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                if node.module == "scope_ds":
                    names.update(f"scope_ds.{a.name}" for a in node.names)
        out[path.relative_to(folder.parent).as_posix()] = names
    return out


def unit_of(module_path: str) -> str:
    """``scope_ds/engines/learner.py`` -> ``engines``; ``scope_ds/config.py`` -> ``config``."""
    part = module_path.split("/")[1]
    return part[:-3] if part.endswith(".py") else part


def arrows() -> dict[str, set[str]]:
    """Unit -> the other units of scope_ds it imports."""
    out: dict[str, set[str]] = defaultdict(set)
    for module, names in imports(PKG).items():
        unit = unit_of(module)
        for name in names:
            parts = name.split(".")
            if parts[0] == "scope_ds" and len(parts) > 1 and parts[1] != unit:
                out[unit].add(parts[1])
    return out


def offenders(folder: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for module, names in imports(PKG / folder).items():
        bad = sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))
        if bad:
            found[module] = bad
    return found


def test_every_unit_has_a_floor():
    units = {unit_of(m) for m in imports(PKG)} - {"__init__"}
    assert units - set(FLOORS) == set(), "a new module: give it a floor in FLOORS"


def test_no_import_runs_up_or_across_a_floor():
    upward = {
        f"{unit} ({FLOORS[unit]}) -> {target} ({FLOORS[target]})"
        for unit, targets in arrows().items()
        if unit in FLOORS
        for target in targets
        if target in FLOORS and FLOORS[target] >= FLOORS[unit]
    }
    assert upward == set()


def test_config_is_a_leaf_and_records_import_nothing_of_the_package():
    found = arrows()
    assert found.get("config", set()) <= {"choices"}
    assert found.get("records", set()) == set()


@pytest.mark.parametrize(
    "folder,forbidden",
    [
        ("algorithms", ("scope_ds.engines", "scope_ds.rollout", "scope_ds.pipeline", "deepspeed")),
        ("ops", ("scope_ds.engines", "scope_ds.rollout", "scope_ds.pipeline", "deepspeed")),
        ("rollout", ("scope_ds.pipeline", "scope_ds.engines", "deepspeed")),
        ("engines", ("scope_ds.pipeline", "scope_ds.rollout")),
    ],
)
def test_modules_depend_downward_only(folder, forbidden):
    assert offenders(folder, forbidden) == {}


def test_every_deepspeed_call_is_in_engines():
    outside = {
        m: sorted(n for n in names if n.split(".")[0] == "deepspeed")
        for m, names in imports(PKG).items()
        if not m.startswith("scope_ds/engines/")
    }
    assert {m: n for m, n in outside.items() if n} == {}


def longest_functions(folder: str, count: int = 3) -> list[tuple[int, str]]:
    """The ``count`` longest functions under ``scope_ds/<folder>``: (lines, "path:line name")."""
    rows = []
    for path in sorted((PKG / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                where = f"{path.relative_to(PKG.parent).as_posix()}:{node.lineno} {node.name}"
                rows.append((node.end_lineno - node.lineno + 1, where))
    return sorted(rows, reverse=True)[:count]


def test_the_pipeline_reads_as_its_schedule():
    """No function of the pipeline over 40 lines: the arithmetic is the learner's (engines/)."""
    assert [row for row in longest_functions("pipeline", 100) if row[0] > 40] == []


def test_the_checker_sees_lazy_type_only_and_package_imports(tmp_path):
    """The check itself: an import inside a function, under TYPE_CHECKING, or of a module through
    its package counts; and an upward arrow is found."""
    (tmp_path / "m.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from scope_ds.config import Config\n"
        "def f():\n    from scope_ds.pipeline import loop\nfrom scope_ds import checkpoint\n"
    )
    names = next(iter(imports(tmp_path).values()))
    assert {"scope_ds.config", "scope_ds.pipeline", "scope_ds.checkpoint"} <= names


def table() -> str:
    """The floors and the arrows between units, as a Markdown table."""
    found = arrows()
    rows = ["| floor | unit | imports |", "| ---: | --- | --- |"]
    for unit, floor in sorted(FLOORS.items(), key=lambda kv: (kv[1], kv[0])):
        rows.append(f"| {floor} | {unit} | {', '.join(sorted(found.get(unit, ()))) or '-'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(table() + "\n")
    for folder in ("pipeline", "engines"):
        sys.stdout.write(f"longest in {folder}/: {longest_functions(folder)}\n")
