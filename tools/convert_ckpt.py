#!/usr/bin/env python
"""A scope_ds (DeepSpeed ZeRO-3) checkpoint to a Hugging Face model folder.

    python tools/convert_ckpt.py CKPT_DIR OUT_DIR [--tag STEP] [--dtype bf16|fp32]

CKPT_DIR is a run's checkpoint folder (its latest complete checkpoint is taken, or step STEP with
--tag) or one checkpoint (``.../step_N``). OUT_DIR must not exist; it is written whole or not at
all, with ordinary permissions (folders 0755, files 0644, less what the umask removes). The
weights are written in the run's dtype (model.dtype in the checkpoint's saved config) unless
--dtype says otherwise. Needs no GPU and not the training run's world size. The output is checked
before it is kept: its logits on a fixed input must match those of the checkpoint's weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from scope_ds.checkpoint import COMPLETE, DS_TAG, STATE, CheckpointError, find_checkpoint  # noqa: E402
from scope_ds.hf_folder import copy_model_files, ordinary_permissions  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_RUN_DTYPES = {"bfloat16": "bf16", "float32": "fp32"}  # model.dtype -> --dtype


def run_dtype(folder: str) -> str:
    """The --dtype of the run that wrote checkpoint ``folder``: its saved config's model.dtype."""
    path = os.path.join(folder, STATE)
    try:
        with open(path) as f:
            dtype = json.load(f)["config"]["model"]["dtype"]
        return _RUN_DTYPES[dtype]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"cannot tell the run's dtype from {path} ({type(e).__name__}: {e}); pass --dtype bf16 or --dtype fp32"
        ) from None


def resolve(ckpt_dir: str, tag: str | None) -> str:
    """The complete checkpoint folder that CKPT_DIR (and --tag) name."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"no checkpoint folder at {ckpt_dir}")
    if os.path.isfile(os.path.join(ckpt_dir, COMPLETE)):
        if tag is not None:
            raise CheckpointError(
                f"{ckpt_dir} is one checkpoint already; --tag picks one under a run's checkpoint folder"
            )
        return ckpt_dir
    if tag is not None:
        name = tag if tag.startswith("step_") else f"step_{tag}"
        folder = os.path.join(ckpt_dir, name)
        if not os.path.isdir(folder):
            have = sorted(n for n in os.listdir(ckpt_dir) if n.startswith("step_"))
            raise CheckpointError(f"no checkpoint {name} in {ckpt_dir}; there are: {have or 'none'}")
        return find_checkpoint(folder, ckpt_dir)
    folder = find_checkpoint("auto", ckpt_dir)
    if folder is None:
        raise CheckpointError(f"no complete checkpoint in {ckpt_dir}")
    return folder


def fp32_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """The full float32 weights, merged from every rank's ZeRO partition."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return get_fp32_state_dict_from_zero_checkpoint(folder, tag=DS_TAG)
    except Exception as e:  # missing or truncated partition files
        raise CheckpointError(
            f"corrupt or incomplete DeepSpeed checkpoint in {folder}: {type(e).__name__}: {e}"
        ) from None


def build_model(folder: str, state: dict[str, torch.Tensor], dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(os.path.join(folder, "hf_config"))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"checkpoint weights do not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    return model.to(dtype).eval()


@torch.no_grad()
def logits_on_fixed_input(model) -> torch.Tensor:
    vocab = model.config.vocab_size
    ids = (torch.arange(32) * 7919 % vocab).view(2, 16)
    return model(input_ids=ids).logits.float()


def convert(ckpt_dir: str, out_dir: str, tag: str | None = None, dtype: str | None = None) -> tuple[float, str]:
    """Write OUT_DIR in ``dtype`` (None = the run's); returns the largest logit difference between
    output and checkpoint, and the dtype written."""
    from transformers import AutoModelForCausalLM

    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir} exists; choose a new folder (nothing was written)")
    folder = resolve(ckpt_dir, tag)
    dtype = dtype or run_dtype(folder)
    torch_dtype = DTYPES[dtype]
    reference = build_model(folder, fp32_state_dict(folder), torch.float32)
    expected = logits_on_fixed_input(reference)
    model = reference.to(torch_dtype)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        # The tokenizer files; what save_pretrained wrote (config.json with --dtype) is kept.
        copy_model_files(Path(folder) / "hf_config", Path(tmp), overwrite=False)
        # Reload what was written and run it in float32: the only difference left from the
        # checkpoint's own logits is the rounding of the weights to --dtype.
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        diff = float((logits_on_fixed_input(reloaded) - expected).abs().max())
        tol = 1e-5 if torch_dtype == torch.float32 else 2e-2 * float(expected.abs().max())
        if diff > tol:
            raise CheckpointError(f"converted model's logits differ from the checkpoint's by {diff:.3g} (> {tol:.3g})")
        ordinary_permissions(Path(tmp))  # mkdtemp made it 0700; copies keep the checkpoint's modes
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return diff, dtype


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--tag", help="step to convert (default: the latest complete checkpoint)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="weights' dtype (default: the run's model.dtype)")
    args = ap.parse_args()
    try:
        diff, dtype = convert(args.ckpt_dir, args.out_dir, args.tag, args.dtype)
    except (CheckpointError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir} ({dtype}); logits match the checkpoint to {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
