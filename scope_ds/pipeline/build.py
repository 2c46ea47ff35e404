"""Build a run's parts from the config: models, engines, rollout servers, data, logs.

Rank 0 owns everything that speaks HTTP (rollout servers, client, weight sync) and the prompt
stream; every rank owns its share of the student, teacher and reference engines.
"""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Any

import numpy as np
import torch

from scope_ds.algorithms import algorithm_of
from scope_ds.algorithms.base import Algorithm
from scope_ds.config import Config, ConfigError, save_config
from scope_ds.data.encoding import drop_long_prompts
from scope_ds.data.stream import prompt_source
from scope_ds.engines import ds, placement, sequence, tensor_parallel
from scope_ds.engines.compat import check_compatible
from scope_ds.engines.learner import Learner
from scope_ds.engines.models import InferenceEngine, StudentEngine
from scope_ds.engines.ranks import rank_and_world
from scope_ds.metrics import RunLog
from scope_ds.model_paths import model_paths, served_of, uses_toy
from scope_ds.openmp import server_threads
from scope_ds.pipeline.collectives import default_backend, score_group, share
from scope_ds.pipeline.folders import prepare_folders
from scope_ds.pipeline.run import Lead, RolloutSide, Run, pushes_weights
from scope_ds.pipeline.versions import PolicyVersions
from scope_ds.records import PromptRecord
from scope_ds.rewards.pool import VerifierPool
from scope_ds.rollout.client import SyncRolloutClient
from scope_ds.rollout.launcher import RolloutServers
from scope_ds.rollout.weight_sync import DiskWeightSync, DistributedWeightSync, WeightSync


def build_run(cfg: Config) -> Run:
    """Every part of a run on this rank (a collective: every rank calls it)."""
    rank, world = ds.init_distributed()
    ds.default_threads(world, launched_server_threads(cfg))
    seed_everything(cfg.train.seed + rank)
    algo = algorithm_of(cfg.algo)
    student_path, teacher_path = resolve_models(cfg, rank)
    check_run_folder(cfg, algo, student_path, rank)
    # the servers start (seconds on CPU, minutes for SGLang) while the tokenizer, the prompts and
    # the engines load
    starting = launch_rollout(cfg, algo, student_path, teacher_path) if rank == 0 else None
    rollout = None
    try:
        tokenizer = check_compatible(student_path, teacher_path, full_vocab=algo.uses_full_kl)
        records, eval_records, verifier = prompts(cfg, tokenizer, rank)
        if starting is not None:
            launch_eval_rollout(cfg, algo, student_path, starting, bool(cfg.data.eval_every and eval_records))
        group = score_group()
        engines = build_engines(cfg, algo, world, student_path, teacher_path, teacher_group(cfg, group))
        learner = Learner(cfg, algo, rank, world, *engines, pad_id=pad_id(tokenizer))
        check_share_prompts(learner)
        if starting is not None:
            save_config(cfg, os.path.join(cfg.logging.run_dir, "config.yaml"))
            rollout = connect_rollout(cfg, algo, student_path, starting)
    except BaseException:
        if starting is not None:
            starting.stop()
        raise
    lead = Lead(rollout, VerifierPool(verifier, cfg.data.verify_timeout_s)) if rollout is not None else None
    versions = PolicyVersions(rollout.client.urls if rollout else ())
    log = run_log(cfg, rank)
    return Run(
        cfg, rank, world, algo, tokenizer, student_path, learner, versions, records, eval_records, group, log, lead
    )


def check_run_folder(cfg: Config, algo: Algorithm, student_path: str, rank: int) -> None:
    """Rank 0 prepares the run folder (it alone writes there) or finds why it cannot; every rank
    then stops alike, with a ConfigError, after ending the process groups in order."""
    problem = share(_folder_problem(cfg, algo, student_path) if rank == 0 else None)
    if problem:  # every rank is here (share is a collective)
        ds.end_distributed()
        raise ConfigError(problem)


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's padding id (0 where it has none)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else 0


def check_share_prompts(learner: Learner) -> None:
    """``train.share_prompts=true`` (with packing) needs every engine to attend with engines/attention.py;
    refused at start-up, naming the engines, where one cannot (alike on every rank)."""
    t, unable = learner.cfg.train, learner.unable_to_share_prompts
    if t.packing and t.share_prompts and unable:
        names = ", ".join(f"{e.path} ({e.model.config._attn_implementation})" for e in unable)
        raise ConfigError(
            f"train.share_prompts=true cannot run: the attention of {names} cannot read a row whose rollouts share "
            "their prompt (only engines/attention.py can); set train.share_prompts=false"
        )


def _folder_problem(cfg: Config, algo: Algorithm, student_path: str) -> str | None:
    syncs_to_disk = cfg.rollout.weight_sync == "disk" and pushes_weights(algo, bool(cfg.data.eval_every))
    try:
        prepare_folders(cfg, student_path, syncs_to_disk)
    except ConfigError as e:
        return str(e)
    return None


def prompts(cfg: Config, tokenizer: Any, rank: int) -> tuple[list[PromptRecord], list[PromptRecord], str]:
    """(training prompts, held-out prompts, verifier name), without the prompts longer than
    ``data.max_prompt_tokens`` (counted and said on rank 0)."""
    d = cfg.data
    records, eval_records, verifier = prompt_source(d)
    records, skipped = drop_long_prompts(records, tokenizer, d.max_prompt_tokens, d.chat_template)
    eval_records, eval_skipped = drop_long_prompts(eval_records, tokenizer, d.max_prompt_tokens, d.chat_template)
    if (skipped or eval_skipped) and rank == 0:
        print(
            f"data: skipped {skipped} training and {eval_skipped} held-out prompts longer than data.max_prompt_tokens={d.max_prompt_tokens}"
        )
    if not records:
        raise ConfigError(
            f"data.source {d.source!r} has no usable prompts (data.max_prompt_tokens={d.max_prompt_tokens})"
        )
    return records, eval_records, verifier


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_models(cfg: Config, rank: int) -> tuple[str, str]:
    """Student and teacher folders (scope_ds.model_paths); the toy pair is built on first use (rank
    0; the others wait in the broadcast)."""
    if not uses_toy(cfg):
        return model_paths(cfg)
    return share(model_paths(cfg) if rank == 0 else None)


def build_engines(
    cfg: Config, algo: Algorithm, world: int, student_path: str, teacher_path: str, group: Any = None
) -> tuple[StudentEngine, InferenceEngine | None, InferenceEngine | None]:
    """(student, teacher or None, reference or None) on this rank.

    The teacher engine exists only for algorithms that score with it (``algo.needs_teacher``);
    the reference (the initial student) only for GRPO with a KL term. ``group``: the process
    group the teacher gathers its parameters on (see ``teacher_group``); None: the default group.
    With ``parallel.sequence_parallel_size`` > 1 every engine splits its packed rows over a
    sequence-parallel group of its own (engines/sequence.py; a collective, in the same order on
    every rank): the teacher's all-to-alls are not the student's; a tensor-parallel teacher
    (``place_teacher``) scores whole rows over its own group instead.
    """
    chunk, packing = cfg.train.logprob_chunk, cfg.train.packing
    sp = cfg.parallel.sequence_parallel_size
    infers = algo.needs_teacher + algo.needs_reference
    check_sequence_world(sp, world)  # before any collective: a world it cannot split is refused alike
    hosts = ds.rank_hosts(world)
    placed = place_teacher(cfg, hosts, student_path, teacher_path if algo.needs_teacher else student_path, infers)
    whole_rows = placed.kind == "tensor"  # a tensor-parallel teacher scores whole rows: no group of its own
    groups = sequence_groups(sp, world, 1 + (0 if whole_rows else infers))
    student = StudentEngine(
        student_path,
        student_ds_config(cfg),
        cfg.model.dtype,
        world_size=world,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        chunk=chunk,
        packing=packing,
        sp=groups.pop(0),
        tiled_mlp=cfg.parallel.tiled_mlp,
    )
    return (student, *inference_engines(cfg, algo, placed, hosts, groups, student_path, teacher_path, group))


def inference_engines(
    cfg: Config,
    algo: Algorithm,
    placed: placement.Placement,
    hosts: list[str],
    groups: list[sequence.SequenceGroup | None],
    student_path: str,
    teacher_path: str,
    group: Any,
) -> tuple[InferenceEngine | None, InferenceEngine | None]:
    """(teacher or None, reference or None) at ``placed``, each taking its sequence-parallel group
    from ``groups`` unless tensor-parallel (whole rows); see build_engines."""
    whole_rows = placed.kind == "tensor"
    infer_ds = None
    if placed.kind == "zero3":
        infer_ds = ds.build_ds_config(cfg.train.teacher_ds_config, dtype=cfg.model.dtype)
    tp_group = tensor_groups(placed.tp, hosts) if whole_rows else None
    infer = dict(dtype=cfg.model.dtype, chunk=cfg.train.logprob_chunk, packing=cfg.train.packing)
    infer.update(tiled_mlp=cfg.parallel.tiled_mlp, placement=placed.kind, tensor_group=tp_group)
    teacher = reference = None
    if algo.needs_teacher:
        sp_group = None if whole_rows else groups.pop(0)
        teacher = InferenceEngine(teacher_path, infer_ds, group=group, sp=sp_group, **infer)
    if algo.needs_reference:
        sp_group = None if whole_rows else groups.pop(0)
        reference = InferenceEngine(student_path, infer_ds, sp=sp_group, **infer)
    return teacher, reference


def place_teacher(
    cfg: Config, hosts: list[str], student_path: str, infer_path: str, engines: int
) -> placement.Placement:
    """Where the ``engines`` inference engines' weights go (``model.teacher_placement``; ``auto``:
    from the memory plan, engines/placement.py), alike on every rank (``hosts``: every rank's):
    rank 0's node and device decide, and it says the choice and its numbers at start-up. A
    collective under ``auto``."""
    m, world, rank = cfg.model, len(hosts), rank_and_world()[0]
    node_ranks = hosts.count(hosts[0])
    if not engines:
        return placement.Placement("zero3", reason="no inference engine")
    if m.teacher_placement != "auto":
        tp = m.teacher_tp_size or node_ranks
        chosen = placement.Placement(m.teacher_placement, tp if m.teacher_placement == "tensor" else 1, "as set")
    else:
        student, teacher = placement.arch_of(student_path), placement.arch_of(infer_path)
        weight = 2 if cfg.model.dtype == "bfloat16" else 4
        device = share(placement.device_bytes(node_ranks) if rank == 0 else None)
        chosen = placement.choose_placement(cfg, student, teacher, world, node_ranks, device, weight)
    if rank == 0:
        over = f" over {chosen.tp} ranks" if chosen.kind == "tensor" else ""
        print(f"teacher: {chosen.kind}{over} (model.teacher_placement={m.teacher_placement}): {chosen.reason}")
    return chosen


def tensor_groups(size: int, hosts: list[str]) -> tensor_parallel.TensorGroup:
    """This rank's tensor-parallel teacher group (engines/tensor_parallel.py); a ConfigError naming
    the key where ``size`` does not divide the world or would span two hosts."""
    try:
        return tensor_parallel.new_groups(size, hosts)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def student_ds_config(cfg: Config) -> dict[str, Any]:
    """The student's DeepSpeed config: ``train.ds_config`` with the optimizer's keys of ``train``."""
    t = cfg.train
    return ds.build_ds_config(
        t.ds_config,
        dtype=cfg.model.dtype,
        lr=t.lr,
        weight_decay=t.weight_decay,
        grad_clip=t.grad_clip,
        warmup_steps=t.warmup_steps,
        zero_stage=t.zero_stage,
    )


def sequence_groups(size: int, world: int, engines: int) -> list[sequence.SequenceGroup | None]:
    """This rank's sequence-parallel group of ``size`` for each of ``engines`` engines (None for
    size 1); a ConfigError naming the key where ``size`` does not divide the world."""
    check_sequence_world(size, world)
    return [sequence.new_groups(size) for _ in range(engines)]


def check_sequence_world(size: int, world: int) -> None:
    """A ConfigError naming the key where the sequence-parallel ``size`` does not divide the world."""
    if world % size:
        raise ConfigError(
            f"parallel.sequence_parallel_size={size} does not divide the world size {world}: pick a size that divides "
            "the number of ranks"
        )


def teacher_group(cfg: Config, group: Any) -> Any:
    """The group the teacher gathers its parameters on: ``group`` (see collectives.score_group) if
    it is to score beside the update (``pipeline.overlap_teacher``); otherwise None, the default.

    Only where the default backend is gloo: NCCL does not allow two communicators' collectives at
    once from two threads of one device (they may deadlock unless every rank issues them in the
    same order), so overlap asked for on NCCL is refused, naming the key.
    """
    if not cfg.pipeline.overlap_teacher:
        return None
    if default_backend() != "gloo":
        raise ConfigError(
            f"pipeline.overlap_teacher=true needs the gloo backend, and this run's is {default_backend()}: NCCL "
            "cannot run the teacher's and the student's collectives from two threads at once; set "
            "pipeline.overlap_teacher=false (docs/pipeline.md)"
        )
    return group


@dataclasses.dataclass
class StartingServers:
    """Rank 0's rollout servers, launched or named, not yet known to be healthy."""

    servers: RolloutServers
    eval_servers: RolloutServers | None = None  # KD with in-training evaluation: one of the student

    def stop(self) -> None:
        for servers in (self.servers, self.eval_servers):
            if servers is not None:
                servers.stop()


def launch_rollout(cfg: Config, algo: Algorithm, student_path: str, teacher_path: str) -> StartingServers:
    """Launch the rollout servers (rank 0), without waiting for them; the servers of
    ``rollout.servers`` are only named here.

    KD trains on the teacher's answers: its servers serve the teacher and never change. With an
    in-training evaluation build_run then launches one server of the student (``eval_servers``),
    which the weight sync keeps up to date, so that evaluation measures the student.
    """
    c = cfg.rollout
    if c.servers:
        return StartingServers(RolloutServers(c.servers, api_key=c.api_key))
    served = served_of(algo, student_path, teacher_path)
    return StartingServers(launch_servers(cfg, served, c.num_servers, "logs"))


def launch_eval_rollout(
    cfg: Config, algo: Algorithm, student_path: str, starting: StartingServers, evaluates: bool
) -> None:
    """KD with an in-training evaluation (``evaluates``) and launched servers: one more server,
    of the student, into ``starting.eval_servers`` (see launch_rollout)."""
    if algo.uses_teacher_rollouts and evaluates and not cfg.rollout.servers:
        starting.eval_servers = launch_servers(cfg, student_path, 1, os.path.join("logs", "eval"))


def connect_rollout(cfg: Config, algo: Algorithm, student_path: str, starting: StartingServers) -> RolloutSide:
    """Once the servers are healthy: the client and the weight sync of the policy's servers."""
    timeout_s = cfg.rollout.startup_timeout_s
    servers, eval_servers = starting.servers, starting.eval_servers
    servers.wait_healthy(timeout_s)
    client = rollout_client(cfg, servers)
    if not algo.uses_teacher_rollouts:
        return RolloutSide(servers, client, weight_sync(cfg, client, student_path))
    if eval_servers is None:
        return RolloutSide(servers, client)
    eval_servers.wait_healthy(timeout_s)
    eval_client = rollout_client(cfg, eval_servers)
    sync = weight_sync(cfg, eval_client, student_path)
    return RolloutSide(servers, client, sync, eval_servers=eval_servers, eval_client=eval_client)


def launched_server_threads(cfg: Config) -> int:
    """The intra-op threads of the embedded rollout servers that rank 0 launches on its host (0:
    none): the trainer's ranks there leave them these cores (ds.default_threads). KD's evaluation
    server is not counted: it generates only while the trainer evaluates, never beside an update;
    nor are the servers of the synchronous schedule (``pipeline.max_staleness=0``), which generate
    only while the ranks wait for their batch."""
    c = cfg.rollout
    if c.servers or c.backend != "embedded" or not cfg.pipeline.max_staleness:
        return 0
    return c.num_servers * server_threads(len(os.sched_getaffinity(0)))


def launch_servers(cfg: Config, model_path: str, count: int, log_dir: str) -> RolloutServers:
    c = cfg.rollout
    return RolloutServers.start(
        c.backend,
        model_path,
        count=count,
        gpus_per_server=c.gpus_per_server,
        log_dir=os.path.join(cfg.logging.run_dir, log_dir),
        random_seed=cfg.train.seed,
        wait_s=None,  # connect_rollout waits
        api_key=c.api_key or None,  # None: a fresh key for this run
        # SGLang honours sampling_seed only in its deterministic mode
        extra_args=["--enable-deterministic-inference"] if c.backend == "sglang" and c.seeded else [],
    )


def rollout_client(cfg: Config, servers: RolloutServers) -> SyncRolloutClient:
    """A client of ``servers`` that sends their API key on every request."""
    c = cfg.rollout
    return SyncRolloutClient(
        servers.urls,
        timeout_s=c.request_timeout_s,
        max_retries=c.retries,
        api_key=servers.api_key,
        partial_rollouts=c.partial_rollouts,
    )


def weight_sync(cfg: Config, client: SyncRolloutClient, student_path: str) -> WeightSync:
    """The method ``rollout.weight_sync`` names, chosen here once."""
    c = cfg.rollout
    if c.weight_sync == "disk":
        root = c.sync_dir or os.path.join(cfg.logging.run_dir, "weights")
        return DiskWeightSync(client, root, config_dir=student_path)
    return DistributedWeightSync(client, bucket_bytes=c.bucket_mb << 20)


def run_log(cfg: Config, rank: int) -> RunLog:
    lg = cfg.logging
    return RunLog(
        lg.run_dir,
        rank=rank,
        total_steps=cfg.train.steps,
        tensorboard=lg.tensorboard,
        progress=lg.progress,
        rollouts=lg.rollouts,
        wandb_project="scope_ds" if lg.wandb else None,
    )
