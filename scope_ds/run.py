"""Build a run's parts from the config: models, engines, rollout servers, data, logs.

Rank 0 owns everything that speaks HTTP (rollout servers, client, weight sync) and the prompt
stream; every rank owns its share of the student, teacher and reference engines.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from scope_ds.algorithms import build_algorithm
from scope_ds.config import Config, ConfigError, save_config
from scope_ds.data.record import PromptRecord
from scope_ds.engines import ds
from scope_ds.engines.compat import check_compatible
from scope_ds.engines.engines import InferenceEngine, StudentEngine
from scope_ds.metrics import RunLog
from scope_ds.rewards import get_verifier


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_models(cfg: Config, rank: int) -> tuple[str, str]:
    """Student and teacher folders; the toy pair is built on first use (rank 0; others wait)."""
    if "toy" not in (cfg.model.student, cfg.model.teacher):
        return cfg.model.student, cfg.model.teacher
    from scope_ds.data.toy_models import ensure_toy_models

    toy = None
    if rank == 0:
        toy = ensure_toy_models(cfg.model.toy_cache or None)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        box = [toy]
        torch.distributed.broadcast_object_list(box, src=0)
        toy = box[0]
    student = str(toy.student) if cfg.model.student == "toy" else cfg.model.student
    teacher = str(toy.teacher) if cfg.model.teacher == "toy" else cfg.model.teacher
    return student, teacher


def prompt_source(cfg: Config, tokenizer) -> tuple[list[PromptRecord], list[PromptRecord], str]:
    """(training prompts, held-out prompts, verifier name) from the data section."""
    d = cfg.data
    if d.source == "toy":
        from scope_ds.data.toy import toy_records

        train = toy_records("train", 4096, seed=d.seed)
        held = toy_records("test", d.eval_prompts, seed=d.seed + 1)
        return train, held, "toy" if d.verifier == "auto" else d.verifier
    from scope_ds.data.prompts import load_prompts

    train = load_prompts(
        d.source,
        split=d.split,
        prompt_key=d.prompt_key,
        answer_key=d.answer_key,
        template=d.template,
        missing_answer=d.missing_answer,
    )
    if d.missing_answer == "skip" and train.n_skipped:
        print(f"data: skipped {train.n_skipped} of {train.n_rows} rows of {d.source} without {d.answer_key!r}")
    records = list(train)
    held = records[-d.eval_prompts :] if d.eval_every and len(records) > d.eval_prompts else []
    if held:  # held out: never trained on
        records = records[: -len(held)]
    return records, held, "math" if d.verifier == "auto" else d.verifier


def prompt_stream(records: list[PromptRecord], seed: int, start: int = 0) -> Iterator[PromptRecord]:
    """An endless, seeded, epoch-shuffled stream of prompts; ``start`` skips already-consumed ones."""
    epoch, pos = divmod(start, len(records))
    while True:
        order = list(range(len(records)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for i in order[pos:]:
            yield records[i]
        epoch, pos = epoch + 1, 0


def build_engines(cfg: Config, algo, world: int, student_path: str, teacher_path: str, score_group: Any = None):
    """(student, teacher or None, reference or None, gradient-accumulation steps) on this rank.

    The teacher engine exists only for algorithms that score with it (SCOPE, OPD); the reference
    (the initial student) only for GRPO with a KL term. ``score_group``: the process group the
    teacher gathers its parameters on (see ``teacher_group``); None: the default group.
    """
    c = cfg
    global_rollouts = c.train.prompts_per_step * c.rollout.n
    grad_accum = ds.steps_per_batch(global_rollouts, world, c.train.micro_batch_size)
    common = dict(micro_batch_size=c.train.micro_batch_size, world_size=world, dtype=c.model.dtype)
    student_ds = ds.build_ds_config(
        c.train.ds_config,
        grad_accum=grad_accum,
        lr=c.train.lr,
        weight_decay=c.train.weight_decay,
        grad_clip=c.train.grad_clip,
        warmup_steps=c.train.warmup_steps,
        **common,
    )
    student = StudentEngine(
        student_path,
        student_ds,
        c.model.dtype,
        world_size=world,
        gradient_checkpointing=c.model.gradient_checkpointing,
        chunk=c.train.logprob_chunk,
    )
    infer_ds = ds.build_ds_config(c.train.teacher_ds_config, grad_accum=1, **common)
    chunk = c.train.logprob_chunk
    teacher = None
    if algo.name in ("scope", "opd"):
        teacher = InferenceEngine(teacher_path, infer_ds, c.model.dtype, chunk, group=score_group)
    reference = InferenceEngine(student_path, infer_ds, c.model.dtype, chunk) if algo.needs_reference else None
    return student, teacher, reference, grad_accum


def score_group() -> Any:
    """A second, gloo (CPU) process group over every rank (a collective: every rank calls it, once).

    The scoring thread (pipeline.Scorer) shares batches and scores on it while the trainer
    thread's collectives use the default group, so the two never interleave on one communicator.
    """
    return torch.distributed.new_group(list(range(torch.distributed.get_world_size())), backend="gloo")


def teacher_group(cfg: Config, algo, group: Any) -> Any:
    """The group the teacher gathers its parameters on: ``group`` (see ``score_group``) if it is
    to score beside the update (``pipeline.overlap_teacher``); otherwise None, the default group.

    Never with a full-vocabulary KL (the update runs the teacher too), nor where the default
    backend is not gloo: NCCL does not allow two communicators' collectives at once from two
    threads of one device (they may deadlock unless every rank issues them in the same order).
    """
    if not cfg.pipeline.overlap_teacher or algo.uses_full_kl or torch.distributed.get_backend() != "gloo":
        return None
    return group


class Run:
    """Everything a training run holds. Built once; the pipeline only reads it (and the version)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rank, self.world = ds.init_distributed()
        seed_everything(cfg.train.seed + self.rank)
        self.run_dir = cfg.logging.run_dir
        self.algo = build_algorithm(cfg.algo["name"], {k: v for k, v in cfg.algo.items() if k != "name"})
        student_path, teacher_path = resolve_models(cfg, self.rank)
        self.student_path, self.teacher_path = student_path, teacher_path
        self.tokenizer = check_compatible(student_path, teacher_path, full_vocab=self.algo.uses_full_kl)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.records, self.eval_records, verifier = prompt_source(cfg, self.tokenizer)
        if not self.records:
            raise ConfigError(f"data.source {cfg.data.source!r} has no usable prompts")
        self.verifier = get_verifier(verifier)
        self.policy_version = 0
        self.score_group = score_group()
        self.student, self.teacher, self.reference, self.grad_accum = build_engines(
            cfg, self.algo, self.world, student_path, teacher_path, teacher_group(cfg, self.algo, self.score_group)
        )
        self.client = self.servers = self.weight_sync = None
        if self.rank == 0:
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
            self._start_rollout(student_path, teacher_path)
        self.log = RunLog(
            self.run_dir,
            rank=self.rank,
            total_steps=cfg.train.steps,
            tensorboard=cfg.logging.tensorboard,
            progress=cfg.logging.progress,
            rollouts=cfg.logging.rollouts,
            wandb_project="scope_ds" if cfg.logging.wandb else None,
        )

    def _start_rollout(self, student_path: str, teacher_path: str) -> None:
        from scope_ds.rollout.client import SyncRolloutClient
        from scope_ds.rollout.launcher import RolloutServers

        c = self.cfg.rollout
        # KD trains on the teacher's answers: its servers serve the teacher and never change.
        served = teacher_path if self.algo.uses_teacher_rollouts else student_path
        if c.servers:
            self.servers = RolloutServers.attach(c.servers, timeout_s=c.startup_timeout_s)
        else:
            self.servers = RolloutServers.start(
                c.backend,
                served,
                count=c.num_servers,
                gpus_per_server=c.gpus_per_server,
                log_dir=os.path.join(self.run_dir, "logs"),
                random_seed=self.cfg.train.seed,
                wait_s=c.startup_timeout_s,
                # SGLang honours sampling_seed only in its deterministic mode
                extra_args=["--enable-deterministic-inference"] if c.backend == "sglang" and c.seeded else [],
            )
        self.client = SyncRolloutClient(self.servers.urls, timeout_s=c.request_timeout_s, max_retries=c.retries)
        if not self.algo.uses_teacher_rollouts:
            self.weight_sync = self._weight_sync(student_path)

    def _weight_sync(self, student_path: str) -> Any:
        c = self.cfg.rollout
        if c.weight_sync == "disk":
            from scope_ds.rollout.weight_sync import DiskWeightSync

            root = c.sync_dir or os.path.join(self.run_dir, "weights")
            return DiskWeightSync(self.client, root, config_dir=student_path)
        from scope_ds.rollout.weight_sync import DistributedWeightSync

        return DistributedWeightSync(self.client, bucket_bytes=c.bucket_mb << 20)

    # ---- helpers the stages use --------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a prompt, through the chat template when the tokenizer has one and it is on."""
        tok = self.tokenizer
        if self.cfg.data.chat_template and getattr(tok, "chat_template", None):
            return list(
                tok.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        return tok(prompt, add_special_tokens=True)["input_ids"]

    def sampling_params(self, **override: Any) -> dict[str, Any]:
        c = self.cfg.rollout
        params = {"temperature": c.temperature, "top_p": c.top_p, "top_k": c.top_k, "max_new_tokens": c.max_new_tokens}
        if self.tokenizer.eos_token_id is not None:
            params["stop_token_ids"] = [self.tokenizer.eos_token_id]
        return {**params, **override}

    def close(self) -> None:
        self.log.close()
        if self.weight_sync is not None and hasattr(self.weight_sync, "close"):
            self.weight_sync.close()
        if self.client is not None:
            self.client.close()
        if self.servers is not None:
            self.servers.stop()
