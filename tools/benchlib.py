"""What the benchmarks in tools/ share: child runs, random models, and their tables in the docs.

- ``run_child``: a child process (a script's own ``--child`` mode, TRL, or ``scope_ds/train.py``),
  plain Python for one rank, the DeepSpeed launcher for more; output captured.
- ``random_model`` / ``build_random_model``: a random Hugging Face Llama or Qwen3 from a seed and
  its config's keyword arguments, optionally saved with a tokenizer copied from another folder.
  tests/integration/conftest.py builds its tiny models with the same function.
- ``write_block``: a benchmark's table, its command, date and machine (``command_line()``,
  ``machine_line()``) as a marked block in a docs page, regenerated in place on each run.

The scripts in tools/ import it as ``benchlib`` (their folder is on sys.path when they run).
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
Arch = Literal["llama", "qwen3"]


# --- child runs ---------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port free right now (for a DeepSpeed job's --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_command(
    script: str | Path,
    args: Sequence[str],
    ranks: int = 1,
    *,
    launcher: bool | None = None,
    master_port: int | None = None,
) -> list[str]:
    """``python SCRIPT ARGS``, or with ``launcher`` (default: ``ranks > 1``) ``python -m
    deepspeed.launcher.runner --num_gpus RANKS [--master_port PORT] SCRIPT ARGS``."""
    if launcher is None:
        launcher = ranks > 1
    if not launcher:
        return [sys.executable, str(script), *args]
    port = ["--master_port", str(master_port)] if master_port is not None else []
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), *port, str(script), *args]


def run_child(
    script: str | Path,
    args: Sequence[str],
    ranks: int = 1,
    *,
    launcher: bool | None = None,
    master_port: int | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``child_command(...)`` from the repository root, this environment plus ``env``, and wait;
    stdout and stderr are captured as text. The caller checks the return code."""
    cmd = child_command(script, args, ranks, launcher=launcher, master_port=master_port)
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)


# --- random models ------------------------------------------------------------------------------


def random_model(arch: Arch = "llama", seed: int = 0, *, head_scale: float = 1.0, **config: Any):
    """A float32 ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` of ``Config(**config)``, initialised
    after ``torch.manual_seed(seed)``: the same arguments give the same weights. ``head_scale``
    multiplies the output head (and so, when tied, the embeddings) after initialisation."""
    import torch
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**config))
    if head_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
    return model


def build_random_model(
    folder: str | Path,
    arch: Arch = "llama",
    seed: int = 0,
    *,
    tokenizer_from: str | Path | None = None,
    cached: bool = False,
    head_scale: float = 1.0,
    **config: Any,
) -> Path:
    """``random_model(arch, seed, head_scale=..., **config)`` saved into ``folder`` (safetensors),
    with the tokenizer files of ``tokenizer_from`` copied beside it. With ``cached``, a folder that
    already holds a config.json is returned as it is (its shape is not checked)."""
    folder = Path(folder)
    if cached and (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    random_model(arch, seed, head_scale=head_scale, **config).save_pretrained(str(folder))
    if tokenizer_from is not None:
        for file in Path(tokenizer_from).iterdir():
            if file.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(file, folder / file.name)
    return folder


def token_ids(model_folder: str | Path, keys: Sequence[str] = ("bos_token_id", "eos_token_id", "pad_token_id")):
    """The special token ids of a saved model's config (a random model built to its tokenizer)."""
    from transformers import AutoConfig

    base = AutoConfig.from_pretrained(str(model_folder))
    return {k: getattr(base, k) for k in keys}


# --- tables in the docs -------------------------------------------------------------------------


def llama_pair() -> tuple[str, str]:
    """Random Llama student (hidden 384, 6 layers; 10.7M parameters) and teacher (512, 8; 27.3M) with
    the toy tokenizer, built once into ~/.cache/scope_ds/bench_peer/llama (bench_peer, bench_step)."""
    from scope_ds.toy.models import ensure_toy_models

    toy = ensure_toy_models(None)
    root = Path.home() / ".cache" / "scope_ds" / "bench_peer" / "llama"
    out = []
    for name, width, layers, inner, seed in (("student", 384, 6, 1024, 0), ("teacher", 512, 8, 1536, 1)):
        folder = build_random_model(
            root / name,
            "llama",
            seed,
            tokenizer_from=toy.student,
            cached=True,
            **token_ids(toy.student, ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")),
            hidden_size=width,
            intermediate_size=inner,
            num_hidden_layers=layers,
            num_attention_heads=width // 64,
            num_key_value_heads=width // 64,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )
        out.append(str(folder))
    return out[0], out[1]


def command_line() -> str:
    """This process's command as one would type it from the repository root: ``python tools/X.py ARGS``."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


def machine_line() -> str:
    """A few words on this machine: CPU model, usable cores, memory, GPUs torch can see."""
    cpu = platform.processor() or platform.machine()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M).group(1).strip()
    except (OSError, AttributeError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [cpu, f"{cores} cores"]
    try:
        kb = int(re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M).group(1))
        parts.append(f"{kb / 2**20:.0f} GiB")
    except (OSError, AttributeError):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            parts.append(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    except ImportError:
        pass
    return ", ".join(parts)


def _markers(name: str) -> tuple[str, str]:
    if not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"block name {name!r}: letters, digits, '_', '.', '-' only")
    return f"<!-- bench:{name} start -->", f"<!-- bench:{name} end -->"


def write_block(
    doc_path: str | Path,
    name: str,
    table_markdown: str,
    command: str | None = None,
    machine: str | None = None,
    *,
    date: str | None = None,
) -> None:
    """Replace the block between ``<!-- bench:NAME start -->`` and ``<!-- bench:NAME end -->`` in
    ``doc_path`` by ``\\`COMMAND\\` · DATE · MACHINE``, a blank line and the table (COMMAND: this
    process's, ``command_line()``; DATE: today; MACHINE: this one, ``machine_line()``).
    Everything outside the block stays byte for byte; a page without the block gets it at its end
    (a missing page is created). Writing the same block twice leaves the page as the first time."""
    start, end = _markers(name)
    path = Path(doc_path)
    text = path.read_bytes().decode() if path.exists() else ""  # bytes: read_text would turn \r\n into \n
    block = (
        f"{start}\n`{command or command_line()}` · {date or datetime.date.today().isoformat()}"
        f" · {machine or machine_line()}\n\n"
        f"{table_markdown.strip()}\n{end}"
    )
    markers = rf"^({re.escape(start)}|{re.escape(end)})\r?$"  # \r: a page with Windows line ends
    found = [(m.start(1), m.group(1)) for m in re.finditer(markers, text, re.M)]
    if not found:
        if text and not text.endswith("\n"):
            text += "\n"
        path.write_bytes((f"{text}\n{block}\n" if text else f"{block}\n").encode())
        return
    if [marker for _, marker in found] != [start, end]:
        raise ValueError(f"{path}: the bench:{name} markers are not one start line then one end line")
    (i, _), (j, _) = found
    path.write_bytes((text[:i] + block + text[j + len(end) :]).encode())
