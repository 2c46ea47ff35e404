"""Exports: the dtype convert_ckpt defaults to (the run's), and ordinary file permissions."""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from scope_ds.checkpoint import STATE, CheckpointError
from scope_ds.hf_folder import ordinary_permissions, write_hf_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import convert_ckpt  # noqa: E402


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set a umask for the test, restored after."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("run,expected", [("float32", "fp32"), ("bfloat16", "bf16")])
def test_convert_defaults_to_the_runs_dtype(tmp_path: Path, run: str, expected: str) -> None:
    (tmp_path / STATE).write_text(json.dumps({"format": 2, "config": {"model": {"dtype": run}}}))
    assert convert_ckpt.run_dtype(str(tmp_path)) == expected


def test_an_unreadable_state_asks_for_dtype(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot tell the run's dtype .*pass --dtype bf16 or --dtype fp32"):
        convert_ckpt.run_dtype(str(tmp_path))
    (tmp_path / STATE).write_text(json.dumps({"format": 2, "config": {}}))
    with pytest.raises(CheckpointError, match="KeyError"):
        convert_ckpt.run_dtype(str(tmp_path))


@pytest.mark.parametrize("mask,dirs,files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_a_temporary_folder_gets_ordinary_permissions(tmp_path: Path, umask, mask, dirs, files) -> None:
    umask(mask)
    folder = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700
    (folder / "sub").mkdir(mode=0o700)
    (folder / "sub" / "w.safetensors").write_bytes(b"x")
    (folder / "config.json").write_text("{}")
    (folder / "config.json").chmod(0o600)
    assert _mode(folder) == 0o700
    ordinary_permissions(folder)
    assert (_mode(folder), _mode(folder / "sub")) == (dirs, dirs)
    assert (_mode(folder / "config.json"), _mode(folder / "sub" / "w.safetensors")) == (files, files)


def test_hf_folders_are_written_with_ordinary_permissions(tmp_path: Path, umask) -> None:
    umask(0o022)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "config.json").chmod(0o600)  # as a checkpoint's hf_config copy may be
    out = write_hf_folder([("w", torch.zeros(3))], tmp_path / "out", src)
    assert _mode(out) == 0o755
    assert {p.name: _mode(p) for p in out.iterdir()} == {"config.json": 0o644, "model.safetensors": 0o644}
