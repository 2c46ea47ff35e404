"""The stages of one training step, each a function of the run's parts and a batch.

generate -> verify (rank 0, over HTTP) -> score (teacher, every rank) -> update (student, every
rank) -> sync (weights to the rollout servers). The loop (loop.py) and the feeds (feed.py) decide
when each runs; nothing here knows about threads.

Shape legend: B = rollouts, T = response positions.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from scope_ds.algorithms import Path, RolloutStats, TokenBatch
from scope_ds.algorithms.base import Plan
from scope_ds.config import Config
from scope_ds.data import encoding
from scope_ds.data.record import PromptRecord
from scope_ds.engines.batching import PackedInputs, collate, collate_packed, plan_micro_batches
from scope_ds.engines.models import Inputs
from scope_ds.metrics import batch_metrics
from scope_ds.pipeline.collectives import PipelineError, on_rank0, sum_over_ranks
from scope_ds.pipeline.run import Run
from scope_ds.sample import Rollout


@dataclass
class Batch:
    """One global batch as it moves through the stages."""

    step: int  # the optimizer step this batch trains
    records: list[PromptRecord]  # the prompts, in group order
    rollouts: list[Rollout] = field(default_factory=list)  # n per prompt, prompt-major
    times: dict[str, float] = field(default_factory=dict)  # stage -> busy seconds
    verify_timeouts: int = 0  # answers the verifier ran out of time on (counted incorrect)
    # While generating: per prompt, its n samples as they stand (None: not started), filled in by
    # the rollout client as answers come in; what a checkpoint keeps of a batch in flight.
    samples: list[list[Rollout | None]] | None = None

    def to_json(self) -> dict:
        """What a checkpoint keeps of a batch generated ahead: prompts and rollouts as generated
        and verified (the teacher's scores are recomputed after a resume); of a batch in flight,
        its samples so far."""
        out: dict[str, Any] = {"step": self.step, "records": [vars(r) for r in self.records]}
        if self.samples is not None:  # in flight: the samples hold the rollouts so far
            out["samples"] = [[None if r is None else r.to_json() for r in group] for group in self.samples]
            out["rollouts"] = []
        else:
            out["rollouts"] = [{**r.to_json(), "teacher_logprobs": None} for r in self.rollouts]
        return out

    @classmethod
    def from_json(cls, obj: dict) -> Batch:
        records = [PromptRecord(**r) for r in obj["records"]]
        batch = cls(step=obj["step"], records=records, rollouts=[Rollout.from_json(r) for r in obj["rollouts"]])
        if obj.get("samples") is not None:
            batch.samples = [[None if r is None else Rollout.from_json(r) for r in g] for g in obj["samples"]]
        return batch


# ---------------------------------------------------------------------------------- rank 0 (HTTP)


def generate(run: Run, batch: Batch) -> None:
    """Sample ``rollout.n`` rollouts per prompt from the rollout servers (rank 0), continuing the
    batch's ``samples`` where a checkpoint saved them in flight."""
    chat = run.cfg.data.chat_template
    n = run.cfg.rollout.n
    if batch.samples is None:
        batch.samples = [[None] * n for _ in batch.records]
    groups = run.rollout.client.generate_many(
        [encoding.encode_prompt(run.tokenizer, r.prompt, chat) for r in batch.records],
        sampling_params(run),
        n=run.cfg.rollout.n,
        prompt_ids=[r.prompt_id for r in batch.records],
        group_ids=[f"{batch.step}:{i}" for i in range(len(batch.records))],
        seeds=sample_seeds(run.cfg, batch.step, len(batch.records)),
        samples=batch.samples,
    )
    batch.rollouts = [r for group in groups for r in group]


def sampling_params(run: Run) -> dict:
    """The run's sampling parameters (rollout section), with the tokenizer's stop token."""
    c = run.cfg.rollout
    return encoding.sampling_params(run.tokenizer, c.temperature, c.top_p, c.top_k, c.max_new_tokens)


def sample_seeds(cfg: Config, step: int, prompts: int) -> list[int] | None:
    """Per-prompt sampling seeds of a step (sample j of prompt i uses seeds[i] + j), or None."""
    if not cfg.rollout.seeded:
        return None
    n = cfg.rollout.n
    base = (cfg.train.seed * 1_000_003 + step) * prompts
    return [((base + i) * n) % 2**62 for i in range(prompts)]


def verify(run: Run, batch: Batch) -> None:
    """Decode each response and route it by the verifier's reward (rank 0), in the verifier's own
    processes with a deadline per answer (``data.verify_timeout_s``: past it, incorrect)."""
    n = len(batch.rollouts) // len(batch.records)  # prompt-major: n rollouts per record
    answers = [batch.records[i // n].answer for i in range(len(batch.rollouts))]
    batch.verify_timeouts = encoding.decode_and_verify_all(
        run.tokenizer, batch.rollouts, answers, run.verifier.verify, run.cfg.data.truncated
    )


# ---------------------------------------------------------------------------------- every rank


def score(run: Run, batch: Batch) -> None:
    """Teacher log-probs of the rollouts the algorithm needs them for before the update
    (``algo.reads_teacher_logp``; with a full-vocabulary KL the update's own teacher pass gives the
    rest), spread over ranks by tokens; every rank ends with every scored rollout's
    ``teacher_logprobs``."""
    correct = torch.tensor([r.correct for r in batch.rollouts])
    need = torch.nonzero(run.algo.reads_teacher_logp(correct)).flatten().tolist()
    if run.teacher is None or not need:
        return
    out: dict[int, list[float]] = {}
    for mb in micro_batches_of(run, batch, need, scoring=True):  # no backward: a larger budget
        inputs = _inputs(run, batch, mb, run.teacher.device)
        out.update(_rows(batch, mb, run.teacher.score(inputs, run.cfg.rollout.temperature)))
    # on the teacher's group: scoring may run beside the update (feed.ScoredFeed)
    for i, logp in _gather_rows(run, out, run.teacher.group).items():
        batch.rollouts[i].teacher_logprobs = logp


def recompute_old_logprobs(run: Run, batch: Batch) -> None:
    """pi_old by the trainer (``algo.old_logprobs=recompute``) where the plan reads its value
    (``algo.reads_student_logp``: SCOPE's correct rollouts): a no-grad forward of the student
    before the update, at the training temperature; every rank ends with those rollouts'
    ``old_logprobs``. Every other rollout takes pi_old from the update's own pass (the same
    weights). The server's log-probs then serve only the train-inference mismatch weight."""
    if not run.algo.recomputes_old_logprobs:
        return
    reads = run.algo.reads_student_logp(torch.tensor([r.correct for r in batch.rollouts]))
    which = [i for i, read in enumerate(reads.tolist()) if read]
    if not which:
        return
    temp = run.algo.train_temperature(run.cfg.rollout.temperature)
    out: dict[int, list[float]] = {}
    for mb in micro_batches_of(run, batch, which):
        inputs = _inputs(run, batch, mb, run.student.device)
        out.update(_rows(batch, mb, run.student.score(inputs, temp)))
    for i, logp in _gather_rows(run, out).items():
        batch.rollouts[i].old_logprobs = logp


def micro_batches_of(run: Run, batch: Batch, which: list[int], scoring: bool = False) -> list[list[int]]:
    """This rank's micro-batches (lists of rollout indices) over the batch's rollouts ``which``, as
    many on every rank: packed into token budgets (``train.max_tokens_per_micro_batch``, or the
    ``score_`` one for inference-only forwards; a prompt's rollouts together, the prompt counted
    once, where ``run.shares_prompts``), or ``train.packing=false``: padded, a fixed number of
    rollouts each. Every rank computes every rank's share alike: no communication."""
    t = run.cfg.train
    lengths = [len(batch.rollouts[i].prompt_ids) + batch.rollouts[i].response_length for i in which]
    key = "score_max_tokens_per_micro_batch" if scoring else "max_tokens_per_micro_batch"
    prompts = [batch.rollouts[i].prompt_ids for i in which] if run.shares_prompts else None
    try:
        if t.packing:
            budget, what = getattr(t, key), f"train.{key}"
            plan = plan_micro_batches(lengths, run.rank, run.world, max_tokens=budget, what=what, prompts=prompts)
        else:
            size = t.score_batch_size if scoring else t.micro_batch_size
            plan = plan_micro_batches(lengths, run.rank, run.world, size=size)
    except ValueError as e:  # alike on every rank
        raise PipelineError(str(e)) from None
    return [[which[j] for j in mb] for mb in plan]


def _rows(batch: Batch, mb: list[int], values_BT: torch.Tensor) -> dict[int, list[float]]:
    """Rollout index -> its row of per-token values (its response length of them)."""
    return {i: values_BT[row, : batch.rollouts[i].response_length].tolist() for row, i in enumerate(mb)}


def _kept_rows(batch: Batch, mb: list[int], keep: list[bool], values_BT: torch.Tensor) -> dict[int, list[float]]:
    """``_rows`` of the micro-batch's rollouts whose ``keep`` is true."""
    rows = [row for row, k in enumerate(keep) if k]
    return _rows(batch, [mb[row] for row in rows], values_BT[rows])


def _gather_rows(run: Run, rows: dict[int, list[float]], group: Any = None) -> dict[int, list[float]]:
    """Every rank's rows on every rank (a collective on ``group``)."""
    if run.world == 1:
        return rows
    parts: list = [None] * run.world
    torch.distributed.all_gather_object(parts, rows, group=group)
    return {k: v for part in parts for k, v in part.items()}


def _inputs(run: Run, batch: Batch, mb: list[int], device: torch.device) -> Inputs:
    """A micro-batch of the batch's rollouts ``mb`` on ``device``, packed or padded as configured
    (an empty ``mb``: a dummy, without response tokens)."""
    rollouts, rows = [batch.rollouts[i] for i in mb] or [None], mb or [-1]
    if not run.cfg.train.packing:
        return collate(rollouts, rows, run.pad_id).to(device)
    return collate_packed(rollouts, rows, run.pad_id, share_prompts=run.shares_prompts).to(device)


def plan(run: Run, batch: Batch) -> tuple[RolloutStats, Plan, float]:
    """The algorithm's plan over the global batch; fills each rollout's path, weight and log-likelihoods."""
    rs = batch.rollouts
    s_logp = torch.tensor([float(sum(_old_logprobs(r))) for r in rs], dtype=torch.float64)
    t_logp = torch.tensor(
        [float(sum(r.teacher_logprobs)) if r.teacher_logprobs is not None else math.nan for r in rs],
        dtype=torch.float64,
    )
    stats = RolloutStats(
        group_B=_groups(rs),
        correct_B=torch.tensor([r.correct for r in rs]),
        lengths_B=torch.tensor([_trained_length(run.cfg, r) for r in rs]),
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


def _old_logprobs(r: Rollout) -> list[float]:
    """pi_old's log-probs of a rollout: the trainer's recomputed ones, else the server's."""
    return r.old_logprobs if r.old_logprobs is not None else r.behaviour_logprobs


def _trained_length(cfg: Config, r: Rollout) -> int:
    """The response tokens the algorithm may train on: none of a cut-off answer under
    ``data.truncated=skip`` (a zero-length rollout joins no weight subset and no normaliser)."""
    return 0 if cfg.data.truncated == "skip" and r.finish_reason == "length" else r.response_length


def _groups(rollouts: list[Rollout]) -> torch.Tensor:
    """Each rollout's prompt group as an index 0, 1, ... in order of first appearance."""
    ids = {g: i for i, g in enumerate(dict.fromkeys(r.group_id for r in rollouts))}
    return torch.tensor([ids[r.group_id] for r in rollouts])


def _token_batch(run: Run, batch: Batch, mb: list[int], p: Plan, inputs: Inputs) -> TokenBatch:
    """The loss's constants of a micro-batch; its ``logp_BT`` (zeros) and ``kl_BT`` are the caller's to fill."""
    rows = [batch.rollouts[i] for i in mb]
    teacher = _padded([r.teacher_logprobs for r in rows], inputs.old_logp_BT)
    recomputed = run.algo.recomputes_old_logprobs
    old = _padded([r.old_logprobs for r in rows], inputs.old_logp_BT) if recomputed else inputs.old_logp_BT
    from_pass = torch.tensor([r.old_logprobs is None for r in rows] or [False]) if recomputed else None
    idx = torch.tensor(mb, dtype=torch.long) if mb else torch.zeros(1, dtype=torch.long)
    dev = inputs.mask_BT.device  # the plan is on the CPU; the loss runs where the micro-batch is
    path = (p.path_B[idx] if mb else torch.tensor([int(Path.SKIP)])).to(dev)
    weight = (p.weight_B[idx] if mb else torch.zeros(1, dtype=torch.float64)).to(dev)
    adv = None if p.advantage_B is None else (p.advantage_B[idx] if mb else torch.zeros(1, dtype=torch.float64)).to(dev)
    temp = run.algo.train_temperature(run.cfg.rollout.temperature)
    ref = run.reference.score(inputs, temp) if run.reference is not None else None
    return TokenBatch(
        logp_BT=torch.zeros_like(inputs.old_logp_BT),
        old_logp_BT=old,
        mask_BT=inputs.mask_BT,
        path_B=path,
        weight_B=weight,
        advantage_B=adv,
        teacher_logp_BT=teacher,
        ref_logp_BT=ref,
        behaviour_logp_BT=inputs.old_logp_BT if recomputed else None,
        old_from_logp_B=None if from_pass is None else from_pass.to(dev),
    )


def _padded(values: list[list[float] | None], like_BT: torch.Tensor) -> torch.Tensor:
    """Per-token lists (None: none) as a right-padded tensor of ``like_BT``'s shape, 0 elsewhere."""
    out = torch.zeros_like(like_BT)
    for row, v in enumerate(values):
        if v is not None:
            out[row, : len(v)] = torch.tensor(v, dtype=out.dtype)
    return out


def update(run: Run, batch: Batch) -> dict[str, float]:
    """One optimizer step of the student on this rank's share of the batch; metrics summed over
    ranks. The student is one policy version further afterwards."""
    t0 = time.perf_counter()
    recompute_old_logprobs(run, batch)
    batch.times["old_logprobs"] = time.perf_counter() - t0
    mbs = micro_batches_of(run, batch, list(range(len(batch.rollouts))))
    stats, p, normalizer = plan(run, batch)
    temp = run.algo.train_temperature(run.cfg.rollout.temperature)
    wanted = {"logp": temp, "entropy": run.cfg.rollout.temperature}
    unscored = set()  # the teacher's log-probs from the KL's pass, at the scoring temperature
    if run.algo.uses_full_kl:
        wanted["kl"] = temp
        mask = run.algo.teacher_mask(stats.correct_B).tolist()
        unscored = {i for i, r in enumerate(batch.rollouts) if mask[i] and r.teacher_logprobs is None}
        if unscored:
            wanted["teacher_logp"] = run.cfg.rollout.temperature
    sums: dict[str, float] = {}
    pass_old: dict[int, list[float]] = {}  # pi_old taken from the update's own pass
    pass_teacher: dict[int, list[float]] = {}
    for mb in mbs:
        inputs = _inputs(run, batch, mb, run.student.device)
        consts = _token_batch(run, batch, mb, p, inputs)
        teacher = run.teacher if "kl" in wanted else None
        grad_fn = None
        if isinstance(inputs, PackedInputs):  # the loss's gradient applied in the LM head's pass
            grad_fn = run.algo.token_grad_fn(consts, normalizer, inputs.resp_index_BT, inputs.targets_M.numel())
        out = run.student.response_stats(inputs, wanted, teacher=teacher, grad_fn=grad_fn)
        loss, parts = run.algo.loss(dataclasses.replace(consts, logp_BT=out["logp"], kl_BT=out.get("kl")), normalizer)
        run.student.backward(loss if grad_fn is None else out["anchor"] + loss.detach())
        if consts.old_from_logp_B is not None:
            keep = [bool(consts.old_from_logp_B[row]) for row in range(len(mb))]
            pass_old.update(_kept_rows(batch, mb, keep, out["logp"].detach()))
        if "teacher_logp" in out:
            pass_teacher.update(_kept_rows(batch, mb, [i in unscored for i in mb], out["teacher_logp"]))
        tokens = float(inputs.mask_BT.sum())
        parts["loss/total"] = float(loss.detach())
        parts.update({"entropy/sum": float(out["entropy"].sum()), "entropy/tokens": tokens})
        parts["is/truncated_tokens"] = parts.pop("is/truncated_share") * tokens
        parts["perf/micro_batches"] = 1.0
        parts["padding/positions"], parts["padding/all"] = _padding(inputs)
        parts["prompts/unshared"] = float(
            sum(len(batch.rollouts[i].prompt_ids) + batch.rollouts[i].response_length for i in mb)
        )
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
    run.student.step()
    run.versions.stepped()
    _record_pass_old(run, batch, pass_old)
    if unscored:  # alike on every rank
        for i, logp in _gather_rows(run, pass_teacher).items():
            r = batch.rollouts[i]
            r.teacher_logprobs, r.teacher_seq_logp = logp, float(sum(logp))
        t_logp = [math.nan if r.teacher_seq_logp is None else r.teacher_seq_logp for r in batch.rollouts]
        stats = dataclasses.replace(stats, teacher_seq_logp_B=torch.tensor(t_logp, dtype=torch.float64))
    sums = sum_over_ranks(sums)
    out = {k: v for k, v in sums.items() if k.startswith("loss/")}
    tokens = max(sums.pop("entropy/tokens", 0.0), 1.0)
    out["entropy/student"] = sums.get("entropy/sum", 0.0) / tokens
    out["is/truncated_share"] = sums.get("is/truncated_tokens", 0.0) / tokens
    out["perf/micro_batches"] = sums["perf/micro_batches"] / run.world  # per rank
    out["perf/padding_share"] = sums["padding/positions"] / max(sums["padding/all"], 1.0)
    # the share of the rollouts' prompt + response tokens that a shared prompt spared the forward
    real = sums["padding/all"] - sums["padding/positions"]
    out["perf/shared_prompt_share"] = max(sums["prompts/unshared"] - real, 0.0) / max(sums["prompts/unshared"], 1.0)
    if "mismatch/tokens" in sums:  # token sums from the loss: per-token means over the batch
        n = max(sums["mismatch/tokens"], 1.0)
        out["mismatch/abs_log_ratio"] = sums["mismatch/abs_log_ratio_sum"] / n
        out["mismatch/k3"] = sums["mismatch/k3_sum"] / n
        out["mismatch/capped_share"] = sums["mismatch/capped_tokens"] / n
    out.update(run.student.step_stats())
    seq_logp = torch.tensor([r.student_seq_logp for r in batch.rollouts], dtype=torch.float64)  # pi_old's, all now
    out.update(batch_metrics(batch.rollouts, dataclasses.replace(stats, student_seq_logp_B=seq_logp), p))
    return out


def _record_pass_old(run: Run, batch: Batch, pass_old: dict[int, list[float]]) -> None:
    """The rollouts' pi_old from the update's own pass into their records (every rank's, on
    every rank), and their sequence log-likelihood with it."""
    if not run.algo.recomputes_old_logprobs or all(r.old_logprobs is not None for r in batch.rollouts):
        return  # alike on every rank: the batch is the global one
    for i, logp in _gather_rows(run, pass_old).items():
        r = batch.rollouts[i]
        r.old_logprobs, r.student_seq_logp = logp, float(sum(logp))


def _padding(inputs: Inputs) -> tuple[float, float]:
    """(padding positions, all positions) of one micro-batch's forward; a dummy's token is padding."""
    dummies = float(sum(1 for r in inputs.rows if r < 0))
    if isinstance(inputs, PackedInputs):
        return dummies, float(inputs.input_ids_1N.numel())
    positions = float(inputs.input_ids_BL.numel())
    return positions - float(inputs.attention_mask_BL.sum()) + dummies, positions


def sync(run: Run, staged: Callable[[], None] | None = None) -> None:
    """Push the student's weights, labelled with its policy version, to the rollout servers
    (every rank takes part in the gather); afterwards every server holds that version. KD's
    rollout servers serve the fixed teacher: they count as synced at once, and the weights go
    only to its evaluation server, if it has one (see Run.pushes_weights). ``staged()`` (rank 0)
    runs once the weights are ready to go, before the servers are paused: the disk sync has
    written its folder by then."""
    if run.pushes_weights:
        params = run.student.full_parameters(run.rank)
        on_rank0(_push, run, params, staged)
    elif staged is not None and run.rank == 0:
        staged()
    run.versions.synced()


def _push(run: Run, params: Iterator[tuple[str, torch.Tensor]], staged: Callable[[], None] | None) -> None:  # rank 0
    try:
        run.rollout.weight_sync.update(params, run.versions.student, staged)
    finally:
        for _ in params:  # rank 0 must finish the gather, also after an error here
            pass
