"""The package's layering: modules depend downward only, and each concern has one home.

Every import is read from the source (also the ones inside functions), so a lazy import that runs
up the stack is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "scope_ds"


def imports(folder: Path) -> dict[str, set[str]]:
    """Module path -> every module it imports (absolute names)."""
    out = {}
    for path in sorted(folder.rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[path.relative_to(folder.parent).as_posix()] = names
    return out


def offenders(folder: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for module, names in imports(PKG / folder).items():
        bad = sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))
        if bad:
            found[module] = bad
    return found


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


def test_the_checker_sees_lazy_imports(tmp_path):
    """The check itself: an import inside a function counts."""
    (tmp_path / "m.py").write_text("def f():\n    from scope_ds.pipeline import loop\n")
    assert imports(tmp_path) and "scope_ds.pipeline" in next(iter(imports(tmp_path).values()))
