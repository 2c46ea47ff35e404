"""Checkpoints that resume exactly, are never half-written, and export to Hugging Face.

A checkpoint is a folder ``<checkpoint.dir>/step_N`` holding:
- ``ds/``: the DeepSpeed ZeRO-3 checkpoint (every rank's partition of weights and optimizer);
- ``scope_state.json``: step, policy version, world size, the batches already generated ahead of
  the update (asynchronous pipeline) as rollout records, the batch caught being generated with
  each sample's tokens, log-probs and versions so far, the resolved config, and the format
  version (``STATE_FORMAT``): plain JSON, never a pickled class, so moving code never breaks a
  resume;
- ``rng_rank{R}.pt``: the random state of every rank;
- ``hf_config/``: the student's config and tokenizer (for tools/convert_ckpt.py);
- ``COMPLETE``: written last.
It is written as ``.tmp-step_N`` and renamed when whole; ``latest`` (a one-line file, replaced
atomically) then names it. A crash during a save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from scope_ds.config import Config
from scope_ds.hf_folder import copy_model_files, write_hf_folder
from scope_ds.records import Batch

COMPLETE = "COMPLETE"
STATE = "scope_state.json"
STATE_FORMAT = 2  # 1: scope_state.pt, pickled classes (before the pipeline package)
LATEST = "latest"
DS_TAG = "ds"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, incomplete, corrupt, or from another world size."""


class Partitioned(Protocol):
    """The student as a checkpoint sees it: its partitions saved and loaded, its weights gathered."""

    def save_checkpoint(self, folder: str, tag: str) -> None: ...
    def load_checkpoint(self, folder: str, tag: str) -> bool: ...
    def full_parameters(self, rank: int) -> Iterator[tuple[str, torch.Tensor]]: ...


class Versioned(Protocol):
    """The owner of the policy version: read at a save, set at a resume."""

    @property
    def student(self) -> int: ...
    def resume_at(self, version: int) -> None: ...


class Checkpointed(Protocol):
    """The parts of a run that a checkpoint saves and restores (pipeline.run.Run has them), so that
    this module sits below the pipeline and never imports it."""

    @property
    def cfg(self) -> Config: ...  # checkpoint.dir, .keep, the run folder; saved whole
    @property
    def rank(self) -> int: ...
    @property
    def world(self) -> int: ...
    @property
    def student(self) -> Partitioned: ...
    @property
    def student_path(self) -> str: ...  # its config and tokenizer files go into hf_config/
    @property
    def versions(self) -> Versioned: ...


@dataclass
class SavedState:
    """What ``scope_state.json`` holds, read back."""

    step: int  # optimizer steps completed
    policy_version: int  # the student's policy version at the save
    world_size: int
    pending: list[Batch]  # batches generated ahead of the update, in step order
    config: dict[str, Any]  # the resolved config of the run that saved it
    in_flight: Batch | None = None  # the batch after them, caught being generated: its samples so far


def checkpoint_root(run: Checkpointed) -> str:
    return run.cfg.checkpoint.dir or os.path.join(run.cfg.logging.run_dir, "checkpoints")


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save(run: Checkpointed, step: int, pending: list[Batch] = (), in_flight: Batch | None = None) -> str:
    """Save after ``step`` completed steps (a collective: every rank calls it); returns the folder.
    ``pending``, ``in_flight``: rank 0's batches generated ahead and the one being generated.

    Each phase ends with every rank agreeing on how it went: a failure on any rank (a full disk, a
    folder not writable) is a CheckpointError on every rank at once, in one line naming the path,
    and the previous checkpoint stays the latest.
    """
    root = checkpoint_root(run)
    tag = f"step_{step}"
    tmp, final = os.path.join(root, f".tmp-{tag}"), os.path.join(root, tag)
    rank0 = run.rank == 0
    try:
        _agreed(run, tag, _fresh_folder if rank0 else None, tmp)
        _agreed(run, tag, _save_partitions, run, tmp)
        _agreed(run, tag, _finish if rank0 else None, run, step, pending, in_flight, tmp, final)
    except CheckpointError:
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _agreed(run: Checkpointed, tag: str, fn: Any, *args: Any) -> None:
    """``fn(*args)`` on this rank (None: nothing to do here), then every rank learns whether any
    rank failed (a collective), and all raise the first failure."""
    error = None
    if fn is not None:
        try:
            fn(*args)
        except Exception as e:
            error = f"rank {run.rank}: {_reason(e)}"
    errors = [error]
    if run.world > 1:
        errors = [None] * run.world
        torch.distributed.all_gather_object(errors, error)
    failed = [e for e in errors if e]
    if failed:
        raise CheckpointError(f"checkpoint {tag} not saved ({failed[0]}); the previous checkpoint is kept")


def _reason(e: Exception) -> str:
    """'no space left on device: PATH', 'permission denied: PATH', or the error in one line."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror.lower()}: {e.filename}" if e.filename else e.strerror.lower()
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _fresh_folder(tmp: str) -> None:  # rank 0
    shutil.rmtree(tmp, ignore_errors=True)  # a save that died earlier
    os.makedirs(tmp)


def _save_partitions(run: Checkpointed, tmp: str) -> None:  # every rank
    run.student.save_checkpoint(tmp, DS_TAG)
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{run.rank}.pt"))


def _finish(run: Checkpointed, step: int, pending: list[Batch], in_flight: Batch | None, tmp: str, final: str) -> None:
    state = {  # rank 0
        "format": STATE_FORMAT,
        "step": step,
        "policy_version": run.versions.student,
        "world_size": run.world,
        "pending": [b.to_json() for b in pending],
        "in_flight": in_flight and in_flight.to_json(),
        "config": run.cfg.to_dict(),
    }
    with open(os.path.join(tmp, STATE), "w") as f:
        json.dump(state, f)
    os.makedirs(os.path.join(tmp, "hf_config"))
    copy_model_files(Path(run.student_path), Path(tmp) / "hf_config")
    with open(os.path.join(tmp, COMPLETE), "w") as f:
        f.write(f"{step}\n")
    if os.path.exists(final):  # the same step saved again (a resumed run): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    root = os.path.dirname(final)
    _write_latest(root, os.path.basename(final))
    _prune(root, run.cfg.checkpoint.keep)


def _write_latest(root: str, tag: str) -> None:
    tmp = os.path.join(root, f".{LATEST}.tmp")
    with open(tmp, "w") as f:
        f.write(tag + "\n")
    os.replace(tmp, os.path.join(root, LATEST))


def _steps(root: str) -> list[int]:
    out = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith("step_") and name[5:].isdigit() and os.path.isfile(os.path.join(root, name, COMPLETE)):
            out.append(int(name[5:]))
    return sorted(out)


def _prune(root: str, keep: int) -> None:
    for step in _steps(root)[:-keep]:
        shutil.rmtree(os.path.join(root, f"step_{step}"), ignore_errors=True)


def find_checkpoint(spec: str, root: str) -> str | None:
    """The folder to resume from: ``auto`` = the latest complete one under ``root`` (None if there is
    none yet), or a given folder, which must be a complete checkpoint."""
    if spec == "none":
        return None
    if spec != "auto":
        folder = spec
        if not os.path.isdir(folder):
            raise CheckpointError(f"checkpoint.resume: no checkpoint folder at {folder}")
        if not os.path.isfile(os.path.join(folder, COMPLETE)):
            raise CheckpointError(f"checkpoint.resume: {folder} is incomplete (no {COMPLETE} marker): a save died")
        return folder
    latest = os.path.join(root, LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        if os.path.isfile(os.path.join(root, tag, COMPLETE)):
            return os.path.join(root, tag)
    steps = _steps(root)  # `latest` lost or pointing at a pruned folder: take the newest complete one
    return os.path.join(root, f"step_{steps[-1]}") if steps else None


def read_state(folder: str) -> SavedState:
    """The checkpoint's own state; CheckpointError for one this version cannot read."""
    path = os.path.join(folder, STATE)
    if not os.path.isfile(path) and os.path.isfile(os.path.join(folder, "scope_state.pt")):
        raise CheckpointError(
            f"{folder} was written by an older scope_ds (checkpoint format 1, a pickled scope_state.pt); this "
            f"version resumes format {STATE_FORMAT} only: export its weights (python tools/convert_ckpt.py "
            f"{folder} OUT) and start a new run from the exported model"
        )
    try:
        with open(path) as f:
            state = json.load(f)
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError(
                f"{path} has checkpoint format {state.get('format')!r}; this version reads format {STATE_FORMAT}"
            )
        pending = [Batch.from_json(b) for b in state["pending"]]
        # absent: nothing was in flight, or an older version wrote the file
        in_flight = Batch.from_json(state["in_flight"]) if state.get("in_flight") else None
        first_new = state["step"] + len(pending)
        if in_flight is not None and in_flight.step != first_new:
            raise CheckpointError(
                f"{path}: the batch in flight is for step {in_flight.step + 1}, not {first_new + 1} (the step after "
                f"the {len(pending)} batch(es) generated ahead of step {state['step']}): the file was edited or corrupted"
            )
        return SavedState(
            state["step"], state["policy_version"], state["world_size"], pending, state["config"], in_flight
        )
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def load(run: Checkpointed, folder: str) -> SavedState:
    """Restore the student (weights, optimizer, scheduler), RNG and policy version from ``folder``
    (a collective). Returns the saved state (step, pending batches, ...)."""
    state = read_state(folder)
    if state.world_size != run.world:
        raise CheckpointError(
            f"{folder} was written by {state.world_size} ranks and this run has {run.world}: resume with "
            f"{state.world_size} ranks, or export it (python tools/convert_ckpt.py {folder} OUT) and "
            "start a new run from the exported model"
        )
    if not run.student.load_checkpoint(folder, DS_TAG):
        raise CheckpointError(f"DeepSpeed found no checkpoint in {os.path.join(folder, DS_TAG)}")
    rng = os.path.join(folder, f"rng_rank{run.rank}.pt")
    if os.path.isfile(rng):
        set_rng_state(torch.load(rng, weights_only=False))
    run.versions.resume_at(state.policy_version)
    return state


def export_hf(run: Checkpointed, out_dir: str) -> str | None:
    """Gather the ZeRO-3 student and write it as a Hugging Face folder (config and tokenizer of the
    student's source folder, safetensors), atomically. A collective: every rank calls it."""
    params = run.student.full_parameters(run.rank)
    path = str(write_hf_folder(params, out_dir, config_dir=run.student_path)) if run.rank == 0 else None
    _barrier()  # nobody reads the export before it is whole
    return path
