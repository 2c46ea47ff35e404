"""Saving what a run trained: a Hugging Face export of the student (more in later issues)."""

from __future__ import annotations

import torch


def export_hf(run, out_dir: str) -> str | None:
    """Gather the ZeRO-3 student and write it as a Hugging Face folder (config and tokenizer of the
    student's source folder, safetensors), atomically. A collective: every rank calls it."""
    from scope_ds.rollout.weight_sync.disk import write_hf_folder

    params = run.student.full_parameters(run.rank)
    path = None
    if run.rank == 0:
        path = str(write_hf_folder(params, out_dir, config_dir=run.student_path))
    else:
        for _ in params:
            pass
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # nobody reads the export before it is whole
    return path
