"""The folders a run writes, checked before any work: one run per run folder, and room to write.

A fresh run (``checkpoint.resume=none``) into a folder that an earlier run used would mix the two
runs' metrics, rollouts and checkpoints: it is refused unless ``logging.overwrite=true`` (which
deletes the earlier outputs first). Every folder the run writes must be writable and have room
for what it will hold, or the run stops at once naming the folder, instead of losing the steps
trained since the last checkpoint when a save fails later.
"""

from __future__ import annotations

import math
import shutil
import uuid
from pathlib import Path

from scope_ds.config import Config, ConfigError

# What a run writes into its folder (logs of rollout servers included); nothing else is deleted.
RUN_OUTPUTS = ("metrics.jsonl", "rollouts", "checkpoints", "tensorboard", "hf", "weights", "logs", "config.yaml")
# One ZeRO-3 checkpoint: fp32 master weights and two Adam moments (12 bytes per parameter), plus
# the model-precision weights and rounding room.
CHECKPOINT_BYTES_PER_PARAM = 16
RUN_FOLDER_BYTES = 1 << 30  # metrics, rollouts and logs of a long run


def prepare_folders(cfg: Config, student_path: str, syncs_to_disk: bool) -> None:
    """Refuse a used run folder (or clear it with ``logging.overwrite``), then check that every
    folder the run writes is writable with room to spare; ConfigError naming the folder."""
    run_dir = Path(cfg.logging.run_dir)
    checkpoints = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    if cfg.checkpoint.resume == "none" and used(run_dir, checkpoints):
        if not cfg.logging.overwrite:
            raise ConfigError(
                f"logging.out_dir {run_dir} holds an earlier run: resume it with checkpoint.resume=auto, or start "
                f"over with logging.overwrite=true (deletes its outputs) or another logging.run_name"
            )
        clear(run_dir, checkpoints)
    params = parameter_count(student_path)
    need = {
        ("logging.out_dir", run_dir): RUN_FOLDER_BYTES,
        ("checkpoint.dir", checkpoints): CHECKPOINT_BYTES_PER_PARAM * params,
    }
    if syncs_to_disk:  # a new weights folder is written before the previous one is pruned
        sync_dir = Path(cfg.rollout.sync_dir) if cfg.rollout.sync_dir else run_dir / "weights"
        need["rollout.sync_dir", sync_dir] = 2 * 4 * params
    for (key, folder), size in need.items():
        check_writable(key, folder, size)


def used(run_dir: Path, checkpoints: Path) -> bool:
    """Whether an earlier run left metrics, rollouts or checkpoints here."""
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return True
    if any((run_dir / "rollouts").glob("step_*.jsonl")):
        return True
    return checkpoints.is_dir() and any(checkpoints.iterdir())


def clear(run_dir: Path, checkpoints: Path) -> None:
    """Delete an earlier run's outputs (only what a run writes) and its checkpoints."""
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    if checkpoints.is_dir():
        shutil.rmtree(checkpoints)


def check_writable(key: str, folder: Path, need_bytes: int) -> None:
    """``folder`` exists (or is made), takes a file, and has ``need_bytes`` free."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".scope_ds-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{key} {folder}: cannot write there ({os_reason(e)})") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise ConfigError(
            f"{key} {folder}: {free / 2**30:.1f} GiB free, and this run needs about {need_bytes / 2**30:.1f} GiB there"
        )


def os_reason(e: OSError) -> str:
    """'no space left on device', 'permission denied', ...: the OS's reason in one line."""
    return (e.strerror or type(e).__name__).lower()


def parameter_count(model_path: str) -> int:
    """Parameters in a local model folder's safetensors files (headers only); 0 for a hub name."""
    folder = Path(model_path)
    if not folder.is_dir():
        return 0
    from safetensors import safe_open

    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                total += math.prod(st.get_slice(name).get_shape())
    if not total:  # .bin weights: about 2 to 4 bytes a parameter
        total = sum(f.stat().st_size for f in folder.glob("*.bin")) // 2
    return total
