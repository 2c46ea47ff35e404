"""Which folders a run's models are: the trainer and the SLURM planner must resolve the same ones."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from scope_ds.config import load_config
from scope_ds.toy.cache import build_folder

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "slurm"))

from layout import Allocation, train_layout  # noqa: E402


def built_toy_cache(root: Path) -> None:
    """Both toy variants' folders, marked as whole builds (their build_report.json), so that
    ensure_toy_models finds them and trains nothing here."""
    for variant in ("chain", "any-order"):
        folder = build_folder(root, variant=variant)
        folder.mkdir(parents=True)
        (folder / "build_report.json").write_text(json.dumps({"variant": variant}))


@pytest.mark.parametrize("algo,served", [("scope", "student"), ("kd", "teacher")])
def test_slurm_servers_serve_the_model_the_trainer_resolves(tmp_path, algo, served):
    """toy_hard (data.toy_variant=any-order) under SLURM serves the any-order pair's student, or
    its teacher for KD: the folders the trainer resolves, not the default toy's (issue 34)."""
    from scope_ds.pipeline.build import resolve_models

    cache = tmp_path / "toy"
    built_toy_cache(cache)
    recipe = str(REPO / "recipes" / "toy_hard.yaml")
    over = [f"model.toy_cache={cache}", f"logging.out_dir={tmp_path}", f"algo.name={algo}"]
    expected = build_folder(cache, variant="any-order") / served

    lay = train_layout(recipe, over, Allocation(["n0"], 0, ntasks=2), env={})
    cmd = lay.servers[0].cmd
    assert cmd[cmd.index("--model-path") + 1] == str(expected)
    student, teacher = resolve_models(load_config(recipe, over), rank=0)
    assert {"student": student, "teacher": teacher}[served] == str(expected)


def test_a_built_toy_pair_is_found_without_torch(tmp_path):
    """A finished toy build resolves through scope_ds.toy.cache alone (no torch, no transformers,
    not the builder), so that rank 0 can launch the rollout servers before its heavy imports."""
    import subprocess

    cache = tmp_path / "toy"
    built_toy_cache(cache)
    code = (
        "import sys\n"
        "from scope_ds.config import load_config\n"
        "from scope_ds.model_paths import model_paths\n"
        f"print(model_paths(load_config(None, ['model.toy_cache={cache}'])))\n"
        "print(sorted(m for m in ('torch', 'transformers', 'scope_ds.toy.models') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    paths, imported = proc.stdout.splitlines()
    folder = build_folder(cache)
    assert paths == str((str(folder / "student"), str(folder / "teacher")))
    assert imported == "[]"
