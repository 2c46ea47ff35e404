"""The one place that builds DeepSpeed configs, starts the process group, and loads models.

Every call into DeepSpeed goes through ``scope_ds/engines/``; the DeepSpeed config dict is built
here alone, from our config plus a JSON file in ``ds_configs/``.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import glob
import hashlib
import itertools
import json
import os
import socket
import sys
import types
import warnings
from typing import Any

import torch

# transformers imports torch._dynamo lazily; under zero.Init (which patches tensor constructors)
# that import fails, so it happens here first.
import torch._dynamo  # noqa: F401

from scope_ds.engines import attention

# DeepSpeed still calls collectives that torch renamed; the warning repeats every step.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

# DeepSpeed compiles small ops on first use into torch's extension cache. One cache per Python
# environment: two environments sharing one rebuild in turn and wait on each other's lock.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR",
    os.path.join(
        os.path.expanduser("~/.cache/torch_extensions"), "env-" + hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    ),
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resolve_path(path: str) -> str:
    """An absolute path, trying the working directory first, then the repository root."""
    if os.path.isabs(path) or os.path.exists(path):
        return os.path.abspath(path)
    return os.path.join(REPO_ROOT, path)


class MasterPortInUseError(ValueError):
    """The rendezvous port (MASTER_PORT) is held by another process; the message says how to pick another.

    A ValueError, as the other bad-setting errors the entry points print in one line."""


# The first DeepSpeed release with everything scope_ds calls: ``managed_gradient_accumulation``
# (the trainer owns the accumulation boundary: build_ds_config) came in 0.19.4; an older release
# ignores the key and accumulates its own way, silently. Ulysses' HF attention with variable
# lengths and TiledMLP (0.17.6), AutoTP's ``tp_group`` are older. setup.py says the same.
DEEPSPEED_FLOOR = "0.19.4"


def check_deepspeed(version: str) -> None:
    """Refuse a DeepSpeed ``version`` older than DEEPSPEED_FLOOR, naming it and the needed release."""
    from packaging.version import Version

    if Version(version.split("+")[0]) < Version(DEEPSPEED_FLOOR):
        raise RuntimeError(
            f"DeepSpeed {version} is installed; scope_ds needs {DEEPSPEED_FLOOR} or newer (its "
            f"managed_gradient_accumulation): pip install 'deepspeed>={DEEPSPEED_FLOOR}'"
        )


def init_distributed() -> tuple[int, int]:
    """Join (or create) the process group DeepSpeed uses; returns (rank, world size).

    Works under the deepspeed launcher, torchrun, srun (SLURM_* variables) and mpirun (through
    mpi4py when it is installed, else OMPI_* / PMI_* variables), and as a single process with no
    launcher at all (on a free port then, unless MASTER_PORT is set). A taken port raises
    MasterPortInUseError naming ``--master_port``.
    """
    import deepspeed

    check_deepspeed(deepspeed.__version__)
    _env_from_launcher()
    try:
        deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=False)
    except RuntimeError as e:  # torch's DistNetworkError, with a C++ stack in its message
        if "EADDRINUSE" not in str(e) and "address already in use" not in str(e).lower():
            raise
        addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
        raise MasterPortInUseError(
            f"the rendezvous port {addr}:{port} (MASTER_PORT) is taken by another process (EADDRINUSE); "
            f"pick a free one: deepspeed --master_port PORT scope_ds/train.py ..., or MASTER_PORT=PORT for "
            "torchrun, srun, mpirun or a plain python run"
        ) from None
    rank = torch.distributed.get_rank()
    atexit.register(_unlink_shm_buffers, os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank)
    return rank, torch.distributed.get_world_size()


def threads_per_rank(cores: int, hosts: list[str], host: str, reserved: int = 0) -> int:
    """Intra-op threads for one rank: the cores it may run on, less ``reserved`` (taken by other
    processes on its host), shared by the ranks of its host; at least one."""
    return max(1, (cores - reserved) // max(1, hosts.count(host)))


def default_threads(world: int, server_threads: int = 0) -> int:
    """Sets this rank's intra-op threads and returns them: ``OMP_NUM_THREADS`` where it is set (the
    user's choice, or the launcher's: torchrun sets 1), else this host's cores shared by its ranks
    (``threads_per_rank``), less the ``server_threads`` of the rollout servers that rank 0
    launches on its host. Left alone, every rank would take every core, and two ranks on a
    two-core machine (a third process, the rollout server, beside them) spend their time waiting
    on each other's threads. A collective (the ranks' host names) when ``world`` > 1."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    host = socket.gethostname()
    hosts = rank_hosts(world)
    reserved = server_threads if host == hosts[0] else 0
    n = threads_per_rank(len(os.sched_getaffinity(0)), hosts, host, reserved)
    torch.set_num_threads(n)
    return n


def rank_hosts(world: int) -> list[str]:
    """Every rank's host name, in rank order (a collective when ``world`` > 1)."""
    host = socket.gethostname()
    if world == 1:
        return [host]
    hosts = [""] * world
    torch.distributed.all_gather_object(hosts, host)
    return hosts


def end_distributed() -> None:
    """An orderly end of a run whose ranks all got here: a barrier, then every process group
    destroyed, so gloo's threads stop before the interpreter tears the groups down (an exit racing
    them can abort with "terminate called without an active exception" after all the work is
    done). Not for error paths, where another rank may never reach the barrier."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _unlink_shm_buffers(addr: str, port: str, rank: int) -> None:
    """Remove this rank's shared-memory allreduce buffer (DeepSpeed's CPU backend), which DeepSpeed
    never does: 66 MB in /dev/shm per rank per run, until memory runs out. Other ranks that still
    map it keep their mapping; the name is gone."""
    for path in glob.glob(f"/dev/shm/deepspeed_*_{addr}_{port}_{rank}"):
        with contextlib.suppress(OSError):
            os.unlink(path)


# Variables that say an MPI launcher started this process (Open MPI, MPICH / Intel MPI, PMIx).
_MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


def _env_from_launcher() -> None:
    env = os.environ
    if "RANK" not in env and not _env_from_mpi():
        for rank_key, size_key, local_key in (
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
            ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
            ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
        ):
            if rank_key in env and size_key in env:
                env["RANK"], env["WORLD_SIZE"] = env[rank_key], env[size_key]
                env["LOCAL_RANK"] = env.get(local_key, "0")
                break
        else:  # no launcher: one process, and no other rank needs to know the port in advance
            env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    env.setdefault("LOCAL_RANK", "0")


def _env_from_mpi() -> bool:
    """Under mpirun with mpi4py installed: RANK, WORLD_SIZE, LOCAL_RANK, and rank 0's address and a
    free port there as MASTER_ADDR / MASTER_PORT (unless set), the same on every rank. False when
    no MPI launcher started us or mpi4py is missing (the caller then reads the launcher's variables).

    MPI is finalised again at once: it only finds the ranks; torch.distributed does the talking.
    """
    env = os.environ
    if not any(key in env for key in _MPI_MARKERS):
        return False
    try:
        from mpi4py import MPI
    except ImportError:
        return False
    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this machine
    master = None
    if world.Get_rank() == 0:
        one_node = node.Get_size() == world.Get_size()
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if one_node else socket.gethostname())
        master = (addr, env.get("MASTER_PORT") or str(_free_port()))
    addr, port = world.bcast(master, root=0)
    env.update(RANK=str(world.Get_rank()), WORLD_SIZE=str(world.Get_size()), LOCAL_RANK=str(node.Get_rank()))
    env.update(MASTER_ADDR=addr, MASTER_PORT=port)
    node.Free()
    MPI.Finalize()
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def build_ds_config(
    json_path: str,
    *,
    dtype: str,
    lr: float | None = None,
    weight_decay: float = 0.0,
    grad_clip: float = 0.0,
    warmup_steps: int = 0,
    zero_stage: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict: the JSON file, completed from our config.

    ``lr`` None builds an inference-only config (no optimizer, no scheduler). A training config
    leaves gradient accumulation to the trainer (``managed_gradient_accumulation: false``): a step
    has as many micro-batches as its packing gives, and the trainer calls ``step()`` once after
    them. The batch-size keys DeepSpeed requires are set to one rollout per micro-batch (DeepSpeed
    derives ``train_batch_size`` from them and the world size); they size nothing (the trainer's
    micro-batches are token budgets). ``zero_stage`` replaces the JSON's
    stage (``with_zero_stage``; errors name ``train.zero_stage``).
    """
    path = resolve_path(json_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DeepSpeed config not found: {json_path} (looked at {path})")
    with open(path) as f:
        cfg = json.load(f)
    cfg = copy.deepcopy(cfg)
    if zero_stage is not None:
        cfg = with_zero_stage(cfg, zero_stage, json_path)
    cfg["train_micro_batch_size_per_gpu"] = 1
    cfg["gradient_accumulation_steps"] = 1
    cfg.pop("train_batch_size", None)
    cfg["bf16"] = {"enabled": dtype == "bfloat16"}
    cfg["fp16"] = {"enabled": False}
    if lr is None:
        cfg.pop("optimizer", None)
        cfg.pop("scheduler", None)
        return cfg
    cfg["managed_gradient_accumulation"] = False
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    opt.setdefault("params", {}).update(lr=lr, weight_decay=weight_decay)
    if opt.get("type", "").lower() in ("adam", "adamw"):
        # torch's AdamW unless the DeepSpeed config says otherwise: DeepSpeed's fused Adam is a
        # compile at start-up (minutes on CPU; on GPUs it needs nvcc and an arch list it can parse)
        opt["params"].setdefault("torch_adam", True)
    cfg["gradient_clipping"] = grad_clip
    if warmup_steps:
        cfg["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": lr,
                "warmup_num_steps": warmup_steps,
                "warmup_type": "linear",
            },
        }
    return cfg


def with_zero_stage(cfg: dict[str, Any], stage: int, source: str, key: str = "train.zero_stage") -> dict[str, Any]:
    """``cfg`` at ZeRO stage ``stage``. Below 3 the ``stage3_*`` keys are dropped (they size the
    parameter gathers there are none of); below 2 so is ``overlap_comm``, which DeepSpeed allows
    with trainer-owned accumulation only when gradients are partitioned. Parameter offload exists
    only at stage 3: a JSON with it is refused below that, naming the file."""
    zero = dict(cfg.get("zero_optimization", {}), stage=stage)
    if stage < 3:
        if zero.get("offload_param", {}).get("device", "none") != "none":
            raise ValueError(f"{source}: offload_param needs ZeRO stage 3, not {key}={stage}")
        zero = {k: v for k, v in zero.items() if not k.startswith("stage3_") and k != "offload_param"}
    if stage < 2:
        zero.pop("overlap_comm", None)
    return {**cfg, "zero_optimization": zero}


# DeepSpeed's engine asks whether the optimizer is its Muon (deepspeed.initialize imports the
# Muon module to see), and importing that module compiles Muon's kernels: torch.compile pulls in
# inductor, two seconds of every rank's start-up on CPU. Unless the config names Muon, the
# question is answered by a stand-in module for the length of the call: no optimizer is its class.
_MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def initialize(model: torch.nn.Module, config: dict[str, Any], **kwargs: Any) -> tuple:
    """``deepspeed.initialize(model=model, config=config, **kwargs)``, without importing DeepSpeed's
    Muon optimizer unless ``config`` names it (or it is imported already)."""
    import deepspeed

    optimizer = str((config.get("optimizer") or {}).get("type", "")).lower()
    if "muon" in optimizer or _MUON_MODULE in sys.modules:
        return deepspeed.initialize(model=model, config=config, **kwargs)
    stand_in = types.ModuleType(_MUON_MODULE, "no Muon in this run (scope_ds.engines.ds.initialize)")
    stand_in.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})  # type: ignore[attr-defined]
    sys.modules[_MUON_MODULE] = stand_in
    try:
        return deepspeed.initialize(model=model, config=config, **kwargs)
    finally:
        if sys.modules.get(_MUON_MODULE) is stand_in:
            del sys.modules[_MUON_MODULE]


_ULYSSES_TAGS = itertools.count(1)  # each engine given a Ulysses attention in this process: its own name


def _ulysses_attention(path: str, config: Any, chosen: str | None, own: bool, sp: Any) -> str:
    """The name of a Ulysses attention around engines/attention.py's for this model (sequence.py),
    after refusing a model whose heads or attention it cannot split."""
    from scope_ds.engines import sequence

    sequence.check_heads(config, sp.size, path)
    if not own:
        why = "materialises a whole [N, N] mask" if chosen == "eager" else "is not the packed SDPA attention"
        raise ValueError(
            f"{path}: its attention {chosen!r} {why}; parallel.sequence_parallel_size={sp.size} runs DeepSpeed "
            "Ulysses around engines/attention.py's, for a model with causal attention over all earlier tokens "
            "(sdpa, or none named)"
        )
    return sequence.register_ulysses(config, attention.register(), sp, tag=str(next(_ULYSSES_TAGS)))


def load_causal_lm(path: str, ds_config: dict[str, Any] | None, dtype: str, sp: Any = None) -> torch.nn.Module:
    """An AutoModelForCausalLM from a folder or hub name, partitioned at load time under ZeRO-3
    (``ds_config`` None: loaded whole, for a placement without a DeepSpeed engine).
    ``sp`` (engines/sequence.SequenceGroup): its attention is Ulysses' around the packed one."""
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if (os.path.sep in path or path.startswith(".")) and not os.path.isdir(path):
        raise FileNotFoundError(f"model folder not found: {path}")
    torch_dtype = getattr(torch, dtype)
    config = AutoConfig.from_pretrained(path)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"{path}: model type {config.model_type!r} has no causal-LM class in transformers")
    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # imported here, before zero.Init patches torch
    # With a live HfDeepSpeedConfig (ZeRO-3), from_pretrained partitions the weights as it loads
    # them (zero.Init plus gathered initialisation); it is read only while loading.
    hf_ds = HfDeepSpeedConfig(ds_config) if ds_config is not None else None  # noqa: F841
    # SDPA per packed sequence (engines/attention.py) where transformers would run SDPA over the
    # whole packed row; a model whose config names another attention keeps it.
    chosen = getattr(config, "_attn_implementation_internal", None) or getattr(config, "attn_implementation", None)
    own = chosen in (None, "sdpa") and attention.plain_causal(config)
    attn = {"attn_implementation": attention.register()} if own else {}
    if sp is not None:
        attn = {"attn_implementation": _ulysses_attention(path, config, chosen, own, sp)}
    model = model_cls.from_pretrained(path, dtype=torch_dtype, **attn)
    del hf_ds
    model.config.use_cache = False
    return model
