"""The learner: the arithmetic of one step over a global batch of rollouts, on this rank's engines.

It plans this rank's micro-batches (token budgets, or padded rows), collates them, runs the
teacher's, the reference's and the student's passes, applies the algorithm's loss and its gradient,
and gathers and sums what crosses ranks. A pipeline stage then only says when each pass runs.
Every method is a collective: every rank calls it with the same global batch, and every rank
computes every rank's share alike, without communication, before the passes.

Shape legend: B = rollouts, T = response positions.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch

from scope_ds.algorithms import Path, RolloutStats, TokenBatch
from scope_ds.algorithms.base import Algorithm, Plan
from scope_ds.config import Config
from scope_ds.engines.batching import PackedInputs, collate, collate_packed, plan_micro_batches
from scope_ds.engines.models import InferenceEngine, Inputs, StudentEngine
from scope_ds.engines.ranks import PipelineError, merge_over_ranks, sum_over_ranks
from scope_ds.metrics import batch_metrics
from scope_ds.records import Rollout

Rows = dict[int, list[float]]  # rollout index -> one per-token value per response token


@dataclass
class _Pass:
    """What one update gathers over its micro-batches."""

    wanted: dict[str, float]  # the statistics the student's pass computes -> their temperature
    unscored: set[int]  # rollouts whose teacher log-probs come from the KL's pass
    sums: dict[str, float] = field(default_factory=dict)  # metric sums over this rank's micro-batches
    old: Rows = field(default_factory=dict)  # pi_old taken from the update's own pass
    teacher: Rows = field(default_factory=dict)  # the teacher's log-probs from the KL's pass


@dataclass
class Learner:
    """This rank's engines and what a step's arithmetic reads of the config."""

    cfg: Config
    algo: Algorithm
    rank: int
    world: int
    student: StudentEngine
    teacher: InferenceEngine | None  # only for algorithms that score with it (algo.needs_teacher)
    reference: InferenceEngine | None  # the initial student, for GRPO's KL term
    pad_id: int = 0  # the tokenizer's padding id (padded micro-batches, dummies)

    @property
    def shares_prompts(self) -> bool:
        """Whether packed micro-batches hold a prompt once for its rollouts (``train.share_prompts``):
        only where every engine that reads them attends with engines/attention.py, which alone
        takes such a row (flash-attention's varlen kernels cannot)."""
        t = self.cfg.train
        return t.packing and t.share_prompts and not self.unable_to_share_prompts

    @property
    def unable_to_share_prompts(self) -> list[InferenceEngine | StudentEngine]:
        """The engines whose attention cannot take a row whose rollouts share their prompt."""
        engines = (self.student, self.teacher, self.reference)
        return [e for e in engines if e is not None and not e.attends_shared_prompts]

    @property
    def data_rank_world(self) -> tuple[int, int]:
        """(this rank's data-parallel rank, their number): a sequence-parallel group of sp
        consecutive ranks (``parallel.sequence_parallel_size``) runs the same micro-batches, each
        rank a slice of every row, so the batch is shared by world / sp."""
        size = self.student.ranks_per_batch
        return self.rank // size, self.world // size

    @property
    def scoring_rank_world(self) -> tuple[int, int]:
        """``data_rank_world`` of the teacher's scoring passes: a tensor-parallel teacher's group
        (``model.teacher_tp_size`` ranks) runs the same micro-batches, as a sequence-parallel one."""
        size = self.teacher.ranks_per_batch if self.teacher is not None else 1
        return self.rank // size, self.world // size

    @property
    def _sums_metrics(self) -> bool:
        """Whether this rank adds its micro-batches' metric sums: the first of its sequence-parallel
        group only (the group's ranks hold the same gathered values)."""
        return self.student.sp is None or self.student.sp.rank == 0

    # ------------------------------------------------------------------------------ planning

    def micro_batches(self, rollouts: list[Rollout], which: list[int], scoring: bool = False) -> list[list[int]]:
        """This rank's micro-batches (lists of rollout indices) over the rollouts ``which``, as
        many on every rank (``scoring``: the teacher's, over ``scoring_rank_world``): packed into
        token budgets (``train.max_tokens_per_micro_batch``, or the ``score_`` one for inference-only forwards; a prompt's rollouts together, the prompt counted
        once, where ``shares_prompts``), or ``train.packing=false``: padded, a fixed number of
        rollouts each."""
        t = self.cfg.train
        lengths = [len(rollouts[i].prompt_ids) + rollouts[i].response_length for i in which]
        key = "score_max_tokens_per_micro_batch" if scoring else "max_tokens_per_micro_batch"
        prompts = [rollouts[i].prompt_ids for i in which] if self.shares_prompts else None
        rank, world = self.scoring_rank_world if scoring else self.data_rank_world
        try:
            if t.packing:
                budget, what = getattr(t, key), f"train.{key}"
                plan = plan_micro_batches(lengths, rank, world, max_tokens=budget, what=what, prompts=prompts)
            else:
                size = t.score_batch_size if scoring else t.micro_batch_size
                plan = plan_micro_batches(lengths, rank, world, size=size)
        except ValueError as e:  # alike on every rank
            raise PipelineError(str(e)) from None
        return [[which[j] for j in mb] for mb in plan]

    def inputs(self, rollouts: list[Rollout], mb: list[int], device: torch.device) -> Inputs:
        """A micro-batch of the rollouts ``mb`` on ``device``, packed or padded as configured (an
        empty ``mb``: a dummy, without response tokens)."""
        rows, idx = [rollouts[i] for i in mb] or [None], mb or [-1]
        if not self.cfg.train.packing:
            return collate(rows, idx, self.pad_id).to(device)
        return collate_packed(rows, idx, self.pad_id, share_prompts=self.shares_prompts).to(device)

    def plan(self, rollouts: list[Rollout]) -> tuple[RolloutStats, Plan, float]:
        """The algorithm's plan over the global batch; fills each rollout's path, weight and
        sequence log-likelihoods. Returns the statistics, the plan and the loss's normaliser."""
        s_logp = torch.tensor([float(sum(_old_logprobs(r))) for r in rollouts], dtype=torch.float64)
        t_logp = torch.tensor(
            [float(sum(r.teacher_logprobs)) if r.teacher_logprobs is not None else math.nan for r in rollouts],
            dtype=torch.float64,
        )
        stats = RolloutStats(
            group_B=_groups(rollouts),
            correct_B=torch.tensor([r.correct for r in rollouts]),
            lengths_B=torch.tensor([self._trained_length(r) for r in rollouts]),
            reward_B=torch.tensor([r.reward for r in rollouts], dtype=torch.float64),
            student_seq_logp_B=s_logp,
            teacher_seq_logp_B=t_logp,
        )
        p = self.algo.plan(stats)
        for i, r in enumerate(rollouts):
            r.path = Path(int(p.path_B[i])).name.lower()
            r.weight = float(p.weight_B[i])
            r.student_seq_logp = float(s_logp[i])
            r.teacher_seq_logp = None if math.isnan(t_logp[i]) else float(t_logp[i])
        return stats, p, self.algo.normalizer(p, stats)

    def _trained_length(self, r: Rollout) -> int:
        """The response tokens the algorithm may train on: none of a cut-off answer under
        ``data.truncated=skip`` (a zero-length rollout joins no weight subset and no normaliser)."""
        return 0 if self.cfg.data.truncated == "skip" and r.finish_reason == "length" else r.response_length

    # ------------------------------------------------------------------------------ inference passes

    def score_teacher(self, rollouts: list[Rollout]) -> None:
        """Teacher log-probs of the rollouts the algorithm needs them for before the update
        (``algo.reads_teacher_logp``; with a full-vocabulary KL the update's own teacher pass gives
        the rest), spread over ranks by tokens; every rank ends with every scored rollout's
        ``teacher_logprobs``. Runs on the teacher's process group: it may run beside the update."""
        need = torch.nonzero(self.algo.reads_teacher_logp(_correct(rollouts))).flatten().tolist()
        if self.teacher is None or not need:
            return
        out: Rows = {}
        for mb in self.micro_batches(rollouts, need, scoring=True):  # no backward: a larger budget
            inputs = self.inputs(rollouts, mb, self.teacher.device)
            out.update(_rows(rollouts, mb, self.teacher.score(inputs, self.cfg.rollout.temperature)))
        for i, logp in merge_over_ranks(out, self.teacher.group).items():
            rollouts[i].teacher_logprobs = logp

    def recompute_old_logprobs(self, rollouts: list[Rollout]) -> None:
        """pi_old by the trainer (``algo.old_logprobs=recompute``) where the plan reads its value
        (``algo.reads_student_logp``: SCOPE's correct rollouts): a no-grad forward of the student
        before the update, at the training temperature; every rank ends with those rollouts'
        ``old_logprobs``. Every other rollout takes pi_old from the update's own pass (the same
        weights). The server's log-probs then serve only the train-inference mismatch weight."""
        if not self.algo.recomputes_old_logprobs:
            return
        which = [i for i, read in enumerate(self.algo.reads_student_logp(_correct(rollouts)).tolist()) if read]
        if not which:
            return
        out: Rows = {}
        for mb in self.micro_batches(rollouts, which):
            inputs = self.inputs(rollouts, mb, self.student.device)
            out.update(_rows(rollouts, mb, self.student.score(inputs, self._train_temperature)))
        for i, logp in merge_over_ranks(out).items():
            rollouts[i].old_logprobs = logp

    @property
    def _train_temperature(self) -> float:
        return self.algo.train_temperature(self.cfg.rollout.temperature)

    # ------------------------------------------------------------------------------ the update

    def update(self, rollouts: list[Rollout], times: dict[str, float]) -> dict[str, float]:
        """One optimizer step of the student on this rank's share of the batch (pi_old recomputed
        first where the algorithm reads it, its seconds into ``times["old_logprobs"]``); metrics
        summed over ranks, alike on every rank."""
        t0 = time.perf_counter()
        self.recompute_old_logprobs(rollouts)
        times["old_logprobs"] = time.perf_counter() - t0
        mbs = self.micro_batches(rollouts, list(range(len(rollouts))))
        stats, p, normalizer = self.plan(rollouts)
        acc = self._pass_of(rollouts, stats)
        for mb in mbs:
            self._train(rollouts, mb, p, normalizer, acc)
        self.student.step()
        self._record_pass_old(rollouts, acc.old)
        if acc.unscored:  # alike on every rank
            stats = self._record_pass_teacher(rollouts, acc.teacher, stats)
        return self._metrics(rollouts, sum_over_ranks(acc.sums), stats, p)

    def _pass_of(self, rollouts: list[Rollout], stats: RolloutStats) -> _Pass:
        """What the student's pass computes, at which temperature; with a full-vocabulary KL, the
        teacher's log-probs of the rollouts not scored before the update come from the same pass."""
        temp = self.cfg.rollout.temperature
        acc = _Pass(wanted={"logp": self._train_temperature, "entropy": temp}, unscored=set())
        if self.algo.uses_full_kl:
            acc.wanted["kl"] = self._train_temperature
            mask = self.algo.teacher_mask(stats.correct_B).tolist()
            acc.unscored = {i for i, r in enumerate(rollouts) if mask[i] and r.teacher_logprobs is None}
            if acc.unscored:
                acc.wanted["teacher_logp"] = temp
        return acc

    def _train(self, rollouts: list[Rollout], mb: list[int], p: Plan, normalizer: float, acc: _Pass) -> None:
        """Forward and backward of one micro-batch; its metric sums and pass-taken rows into ``acc``."""
        inputs = self.inputs(rollouts, mb, self.student.device)
        consts = self._token_batch(rollouts, mb, p, inputs)
        teacher = self.teacher if "kl" in acc.wanted else None
        grad_fn = None
        if isinstance(inputs, PackedInputs):  # the loss's gradient applied in the LM head's pass
            grad_fn = self.algo.token_grad_fn(consts, normalizer, inputs.resp_index_BT, inputs.targets_M.numel())
        out = self.student.response_stats(inputs, acc.wanted, teacher=teacher, grad_fn=grad_fn)
        loss, parts = self.algo.loss(dataclasses.replace(consts, logp_BT=out["logp"], kl_BT=out.get("kl")), normalizer)
        self.student.backward(loss if grad_fn is None else out["anchor"] + loss.detach())
        if consts.old_from_logp_B is not None:
            keep = [bool(consts.old_from_logp_B[row]) for row in range(len(mb))]
            acc.old.update(_kept_rows(rollouts, mb, keep, out["logp"].detach()))
        if "teacher_logp" in out:
            acc.teacher.update(_kept_rows(rollouts, mb, [i in acc.unscored for i in mb], out["teacher_logp"]))
        parts["loss/total"] = float(loss.detach())
        if not self._sums_metrics:
            return
        for k, v in _micro_batch_parts(rollouts, mb, inputs, parts, out["entropy"]).items():
            acc.sums[k] = acc.sums.get(k, 0.0) + v

    def _token_batch(self, rollouts: list[Rollout], mb: list[int], p: Plan, inputs: Inputs) -> TokenBatch:
        """The loss's constants of a micro-batch; its ``logp_BT`` (zeros) and ``kl_BT`` are the
        caller's to fill."""
        rows = [rollouts[i] for i in mb]
        teacher = _padded([r.teacher_logprobs for r in rows], inputs.old_logp_BT)
        recomputed = self.algo.recomputes_old_logprobs
        old = _padded([r.old_logprobs for r in rows], inputs.old_logp_BT) if recomputed else inputs.old_logp_BT
        from_pass = torch.tensor([r.old_logprobs is None for r in rows] or [False]) if recomputed else None
        idx = torch.tensor(mb, dtype=torch.long) if mb else torch.zeros(1, dtype=torch.long)
        dev = inputs.mask_BT.device  # the plan is on the CPU; the loss runs where the micro-batch is
        path = (p.path_B[idx] if mb else torch.tensor([int(Path.SKIP)])).to(dev)
        weight = (p.weight_B[idx] if mb else torch.zeros(1, dtype=torch.float64)).to(dev)
        adv = None
        if p.advantage_B is not None:
            adv = (p.advantage_B[idx] if mb else torch.zeros(1, dtype=torch.float64)).to(dev)
        ref = self.reference.score(inputs, self._train_temperature) if self.reference is not None else None
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

    def _record_pass_old(self, rollouts: list[Rollout], pass_old: Rows) -> None:
        """The rollouts' pi_old from the update's own pass into their records (every rank's, on
        every rank), and their sequence log-likelihood with it."""
        if not self.algo.recomputes_old_logprobs or all(r.old_logprobs is not None for r in rollouts):
            return  # alike on every rank: the batch is the global one
        for i, logp in merge_over_ranks(pass_old).items():
            r = rollouts[i]
            r.old_logprobs, r.student_seq_logp = logp, float(sum(logp))

    def _record_pass_teacher(self, rollouts: list[Rollout], rows: Rows, stats: RolloutStats) -> RolloutStats:
        """The teacher's log-probs from the KL's pass into their records; the statistics with them."""
        for i, logp in merge_over_ranks(rows).items():
            r = rollouts[i]
            r.teacher_logprobs, r.teacher_seq_logp = logp, float(sum(logp))
        t_logp = [math.nan if r.teacher_seq_logp is None else r.teacher_seq_logp for r in rollouts]
        return dataclasses.replace(stats, teacher_seq_logp_B=torch.tensor(t_logp, dtype=torch.float64))

    def _metrics(
        self, rollouts: list[Rollout], sums: dict[str, float], stats: RolloutStats, p: Plan
    ) -> dict[str, float]:
        """The step's metrics from the micro-batches' sums over every rank."""
        out = {k: v for k, v in sums.items() if k.startswith("loss/")}
        tokens = max(sums.pop("entropy/tokens", 0.0), 1.0)
        out["entropy/student"] = sums.get("entropy/sum", 0.0) / tokens
        out["is/truncated_share"] = sums.get("is/truncated_tokens", 0.0) / tokens
        out["perf/micro_batches"] = sums["perf/micro_batches"] / self.data_rank_world[1]  # per rank
        out["perf/padding_share"] = sums["padding/positions"] / max(sums["padding/all"], 1.0)
        # the share of the rollouts' prompt + response tokens that a shared prompt spared the forward
        real = sums["padding/all"] - sums["padding/positions"]
        unshared = sums["prompts/unshared"]
        out["perf/shared_prompt_share"] = max(unshared - real, 0.0) / max(unshared, 1.0)
        if "mismatch/tokens" in sums:  # token sums from the loss: per-token means over the batch
            n = max(sums["mismatch/tokens"], 1.0)
            out["mismatch/abs_log_ratio"] = sums["mismatch/abs_log_ratio_sum"] / n
            out["mismatch/k3"] = sums["mismatch/k3_sum"] / n
            out["mismatch/capped_share"] = sums["mismatch/capped_tokens"] / n
        out.update(self.student.step_stats())
        seq_logp = torch.tensor([r.student_seq_logp for r in rollouts], dtype=torch.float64)  # pi_old's, all now
        out.update(batch_metrics(rollouts, dataclasses.replace(stats, student_seq_logp_B=seq_logp), p))
        return out


# ---------------------------------------------------------------------------------- helpers


def _correct(rollouts: list[Rollout]) -> torch.Tensor:
    return torch.tensor([r.correct for r in rollouts])


def _rows(rollouts: list[Rollout], mb: list[int], values_BT: torch.Tensor) -> Rows:
    """Rollout index -> its row of per-token values (its response length of them)."""
    return {i: values_BT[row, : rollouts[i].response_length].tolist() for row, i in enumerate(mb)}


def _kept_rows(rollouts: list[Rollout], mb: list[int], keep: list[bool], values_BT: torch.Tensor) -> Rows:
    """``_rows`` of the micro-batch's rollouts whose ``keep`` is true."""
    rows = [row for row, k in enumerate(keep) if k]
    return _rows(rollouts, [mb[row] for row in rows], values_BT[rows])


def _old_logprobs(r: Rollout) -> list[float]:
    """pi_old's log-probs of a rollout: the trainer's recomputed ones, else the server's."""
    return r.old_logprobs if r.old_logprobs is not None else r.behaviour_logprobs


def _groups(rollouts: list[Rollout]) -> torch.Tensor:
    """Each rollout's prompt group as an index 0, 1, ... in order of first appearance."""
    ids = {g: i for i, g in enumerate(dict.fromkeys(r.group_id for r in rollouts))}
    return torch.tensor([ids[r.group_id] for r in rollouts])


def _padded(values: list[list[float] | None], like_BT: torch.Tensor) -> torch.Tensor:
    """Per-token lists (None: none) as a right-padded tensor of ``like_BT``'s shape, 0 elsewhere."""
    out = torch.zeros_like(like_BT)
    for row, v in enumerate(values):
        if v is not None:
            out[row, : len(v)] = torch.tensor(v, dtype=out.dtype)
    return out


def _micro_batch_parts(
    rollouts: list[Rollout], mb: list[int], inputs: Inputs, parts: dict[str, float], entropy_BT: torch.Tensor
) -> dict[str, float]:
    """One micro-batch's metric sums: the loss's parts and the pass's token counts."""
    tokens = float(inputs.mask_BT.sum())
    parts.update({"entropy/sum": float(entropy_BT.sum()), "entropy/tokens": tokens})
    parts["is/truncated_tokens"] = parts.pop("is/truncated_share") * tokens
    parts["perf/micro_batches"] = 1.0
    parts["padding/positions"], parts["padding/all"] = _padding(inputs)
    parts["prompts/unshared"] = float(sum(len(rollouts[i].prompt_ids) + rollouts[i].response_length for i in mb))
    return parts


def _padding(inputs: Inputs) -> tuple[float, float]:
    """(padding positions, all positions) of one micro-batch's forward; a dummy's token is padding."""
    dummies = float(sum(1 for r in inputs.rows if r < 0))
    if isinstance(inputs, PackedInputs):
        return dummies, float(inputs.input_ids_1N.numel())
    positions = float(inputs.input_ids_BL.numel())
    return positions - float(inputs.attention_mask_BL.sum()) + dummies, positions
