"""The stages of one training step, each a function of the run's parts and a batch.

generate -> verify (rank 0, over HTTP) -> share (to every rank) -> score (teacher, all ranks)
-> update (student, all ranks) -> sync (weights to the rollout servers).

Shape legend: B = rollouts, T = response positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from scope_ds.algorithms import Path, RolloutStats, TokenBatch
from scope_ds.data.record import PromptRecord
from scope_ds.engines.batching import collate, gather_response, micro_batches, rank_share
from scope_ds.ops import reverse_kl
from scope_ds.sample import Rollout


@dataclass
class Batch:
    """One global batch as it moves through the stages."""

    step: int  # the optimizer step this batch trains
    records: list[PromptRecord]  # the prompts, in group order
    rollouts: list[Rollout] = field(default_factory=list)  # n per prompt, prompt-major
    teacher_logp: dict[int, list[float]] = field(default_factory=dict)  # rollout index -> per-token teacher log-probs
    times: dict[str, float] = field(default_factory=dict)  # stage -> busy seconds


class PipelineError(RuntimeError):
    """A stage failed on rank 0 (a server down, a refused update): every rank stops with it."""


@dataclass
class Failure:
    """What rank 0 shares instead of a batch when generation failed, so every rank stops."""

    message: str


# ---------------------------------------------------------------------------------- rank 0 (HTTP)


def generate(run, batch: Batch) -> None:
    """Sample ``rollout.n`` rollouts per prompt from the rollout servers (rank 0)."""
    prompts = [run.encode_prompt(r.prompt) for r in batch.records]
    groups = run.client.generate_many(
        prompts,
        run.sampling_params(),
        n=run.cfg.rollout.n,
        prompt_ids=[r.prompt_id for r in batch.records],
        group_ids=[f"{batch.step}:{i}" for i in range(len(batch.records))],
        seeds=sample_seeds(run.cfg, batch.step, len(prompts)),
    )
    batch.rollouts = [r for group in groups for r in group]


def sample_seeds(cfg, step: int, prompts: int) -> list[int] | None:
    """Per-prompt sampling seeds of a step (sample j of prompt i uses seeds[i] + j), or None."""
    if not cfg.rollout.seeded:
        return None
    n = cfg.rollout.n
    base = (cfg.train.seed * 1_000_003 + step) * prompts
    return [((base + i) * n) % 2**62 for i in range(prompts)]


def verify(run, batch: Batch) -> None:
    """Decode each response and route it by the verifier's reward (rank 0)."""
    n = len(batch.rollouts) // len(batch.records)  # prompt-major: n rollouts per record
    for i, r in enumerate(batch.rollouts):
        r.text = run.tokenizer.decode(r.response_ids, skip_special_tokens=True)
        r.reward = float(run.verifier(r.text, batch.records[i // n].answer))
        r.correct = r.reward >= 1.0


def share(run, obj, group=None):
    """Rank 0's object on every rank (one broadcast of Python objects, on ``group``)."""
    if run.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def on_rank0(run, fn, *args, group=None):
    """``fn(*args)`` on rank 0, its result on every rank. If it raises, every rank raises (rank 0's
    error as cause) instead of waiting forever in the next collective."""
    result, error = None, None
    if run.rank == 0:
        try:
            result = fn(*args)
        except Exception as e:
            error, result = e, Failure(f"{type(e).__name__}: {e}")
    got = share(run, result, group)
    if isinstance(got, Failure):
        raise PipelineError(got.message) from error
    return got


# ---------------------------------------------------------------------------------- all ranks


def _groups(rollouts: Sequence[Rollout]) -> torch.Tensor:
    ids = {g: i for i, g in enumerate(dict.fromkeys(r.group_id for r in rollouts))}
    return torch.tensor([ids[r.group_id] for r in rollouts])


def score(run, batch: Batch) -> None:
    """Teacher log-probs of the rollouts the algorithm needs them for, spread evenly over ranks."""
    correct = torch.tensor([r.correct for r in batch.rollouts])
    need = torch.nonzero(run.algo.teacher_mask(correct)).flatten().tolist()
    if run.teacher is None or not need:
        return
    mine = [need[i] for i in rank_share(len(need), run.rank, run.world)]
    size = run.cfg.train.score_batch_size  # no backward: larger batches than training fit
    count = math.ceil(math.ceil(len(need) / run.world) / size)
    out: dict[int, list[float]] = {}
    for mb in micro_batches(mine, size, count):
        inputs = collate([batch.rollouts[i] for i in mb] or [None], mb or [-1], run.pad_id).to(run.teacher.device)
        logp = run.teacher.score(inputs, run.cfg.rollout.temperature)
        for row, i in enumerate(mb):
            out[i] = logp[row, : batch.rollouts[i].response_length].tolist()
    if run.world > 1:  # on the teacher's group: scoring may run beside the update (pipeline.Scorer)
        parts = [None] * run.world
        dist.all_gather_object(parts, out, group=run.teacher.group)
        out = {k: v for part in parts for k, v in part.items()}
    batch.teacher_logp = out


def plan(run, batch: Batch):
    """The algorithm's plan over the global batch; fills each rollout's path, weight and log-likelihoods."""
    rs = batch.rollouts
    lengths = torch.tensor([r.response_length for r in rs])
    s_logp = torch.tensor([float(sum(r.behaviour_logprobs)) for r in rs], dtype=torch.float64)
    t_logp = torch.tensor(
        [float(sum(batch.teacher_logp[i])) if i in batch.teacher_logp else math.nan for i in range(len(rs))],
        dtype=torch.float64,
    )
    stats = RolloutStats(
        group_B=_groups(rs),
        correct_B=torch.tensor([r.correct for r in rs]),
        lengths_B=lengths,
        reward_B=torch.tensor([r.reward for r in rs], dtype=torch.float64),
        student_seq_logp_B=s_logp,
        teacher_seq_logp_B=t_logp,
    )
    p = run.algo.plan(stats)
    for i, r in enumerate(rs):
        r.path = Path(int(p.path_B[i])).name.lower()
        r.weight = float(p.weight_B[i])
        r.student_seq_logp = float(s_logp[i])
        r.teacher_seq_logp = None if math.isnan(t_logp[i]) else float(t_logp[i])
    return stats, p, run.algo.normalizer(p, stats)


def _token_batch(run, batch: Batch, mb: list[int], p, inputs, logits) -> TokenBatch:
    temp = run.cfg.rollout.temperature
    logp = run.student.response_logprobs(logits, inputs, temp)
    teacher = torch.zeros_like(inputs.old_logp_BT)
    for row, i in enumerate(mb):
        if i in batch.teacher_logp:
            t = batch.teacher_logp[i]
            teacher[row, : len(t)] = torch.tensor(t)
    idx = torch.tensor(mb, dtype=torch.long) if mb else torch.zeros(1, dtype=torch.long)
    dev = logp.device  # the plan is on the CPU; the loss runs where the logits are
    path = (p.path_B[idx] if mb else torch.tensor([int(Path.SKIP)])).to(dev)
    weight = (p.weight_B[idx] if mb else torch.zeros(1, dtype=torch.float64)).to(dev)
    adv = None if p.advantage_B is None else (p.advantage_B[idx] if mb else torch.zeros(1, dtype=torch.float64)).to(dev)
    ref = run.reference.score(inputs, temp) if run.reference is not None else None
    kl = None
    if run.algo.uses_full_kl:
        with torch.no_grad():
            t_logits = run.teacher.logits(inputs)
        kl = gather_response(reverse_kl(logits, t_logits, temperature=temp, chunk=run.student.chunk), inputs)
    return TokenBatch(
        logp_BT=logp,
        old_logp_BT=inputs.old_logp_BT,
        mask_BT=inputs.mask_BT,
        path_B=path,
        weight_B=weight,
        advantage_B=adv,
        teacher_logp_BT=teacher,
        ref_logp_BT=ref,
        kl_BT=kl,
    )


def update(run, batch: Batch) -> dict[str, float]:
    """One optimizer step of the student on this rank's share of the batch; metrics summed over ranks."""
    stats, p, normalizer = plan(run, batch)
    mine = rank_share(len(batch.rollouts), run.rank, run.world)
    sums: dict[str, float] = {}
    for mb in micro_batches(mine, run.cfg.train.micro_batch_size, run.grad_accum):
        inputs = collate([batch.rollouts[i] for i in mb] or [None], mb or [-1], run.pad_id).to(run.student.device)
        logits = run.student.logits(inputs)
        tb = _token_batch(run, batch, mb, p, inputs, logits)
        loss, parts = run.algo.loss(tb, normalizer)
        run.student.backward(loss)
        ent = run.student.response_entropy(logits, inputs, run.cfg.rollout.temperature)
        parts = {
            **parts,
            "loss/total": float(loss.detach()),
            "entropy/sum": float(ent.sum()),
            "entropy/tokens": float(inputs.mask_BT.sum()),
            "is/truncated_tokens": parts["is/truncated_share"] * float(inputs.mask_BT.sum()),
        }
        parts.pop("is/truncated_share")
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
    sums = _sum_over_ranks(run, sums)
    out = {k: v for k, v in sums.items() if k.startswith("loss/")}
    tokens = max(sums.pop("entropy/tokens", 0.0), 1.0)
    out["entropy/student"] = sums.get("entropy/sum", 0.0) / tokens
    out["is/truncated_share"] = sums.get("is/truncated_tokens", 0.0) / tokens
    out.update(run.student.step_stats())
    out.update(batch_metrics(batch.rollouts, stats, p))
    return out


def _sum_over_ranks(run, sums: dict[str, float]) -> dict[str, float]:
    if run.world == 1:
        return sums
    keys = [None] * run.world
    dist.all_gather_object(keys, sorted(sums))
    names = sorted({k for part in keys for k in part})
    vec = torch.tensor([sums.get(k, 0.0) for k in names], dtype=torch.float64)
    dist.all_reduce(vec)
    return dict(zip(names, vec.tolist(), strict=True))


def sync(run) -> None:
    """Push the student's weights to the rollout servers; every rank takes part in the gather."""
    params = run.student.full_parameters(run.rank)

    def push() -> int:
        try:  # KD's servers serve the fixed teacher: nothing to push, the version still counts steps
            return run.weight_sync.update(params) if run.weight_sync is not None else run.policy_version + 1
        finally:
            for _ in params:  # rank 0 must finish the gather, also after an error here
                pass

    run.policy_version = on_rank0(run, push)


# ---------------------------------------------------------------------------------- metrics


def batch_metrics(rollouts: Sequence[Rollout], stats: RolloutStats, p) -> dict[str, float]:
    """Reward, routing, weights and perplexities of a batch, per path."""
    n = len(rollouts)
    lengths = stats.lengths_B.double()
    out = {
        "reward/mean": float(stats.reward_B.mean()),
        "reward/accuracy": float(stats.correct_B.double().mean()),
        "response/length_mean": float(lengths.mean()),
        "response/tokens": float(lengths.sum()),
        "rollouts": n,
    }
    for path in torch.unique(p.path_B).tolist():
        if path == Path.SKIP:
            continue
        name = Path(path).name.lower()
        sel = p.path_B == path
        out[f"path/{name}_share"] = float(sel.double().mean())
        w = p.weight_B[sel]
        out[f"weight/{name}_mean"] = float(w.mean())
        out[f"weight/{name}_entropy"] = _weight_entropy(p.weight_B, sel, stats.group_B)
        ln = lengths[sel].clamp_min(1)
        out[f"ppl/student_{name}"] = float(torch.exp(-stats.student_seq_logp_B[sel] / ln).mean())
        t = stats.teacher_seq_logp_B[sel] if stats.teacher_seq_logp_B is not None else None
        if t is not None and bool(torch.isfinite(t).all()):
            out[f"ppl/teacher_{name}"] = float(torch.exp(-t / ln).mean())
    return out


def _weight_entropy(weight_B: torch.Tensor, sel_B: torch.Tensor, group_B: torch.Tensor) -> float:
    """Mean over groups of the entropy of the (renormalised) weights of one path's subset."""
    ents = []
    for g in torch.unique(group_B[sel_B]).tolist():
        w = weight_B[sel_B & (group_B == g)]
        if w.sum() > 0:
            q = w / w.sum()
            ents.append(float(-(q * torch.log(q.clamp_min(1e-300))).sum()))
    return sum(ents) / len(ents) if ents else 0.0
