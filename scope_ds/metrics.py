"""What a run leaves behind: metrics.jsonl, TensorBoard events, rollouts/step_N.jsonl, a progress bar.

Only rank 0 writes. Every method is cheap to call on other ranks (it does nothing there).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from scope_ds.algorithms import Path, RolloutStats
from scope_ds.algorithms.base import Plan
from scope_ds.records import Rollout

# Figures shown on the progress bar (when present in a step's metrics).
BAR_KEYS = (
    ("acc", "reward/accuracy"),
    ("loss", "loss/total"),
    ("eval", "eval/accuracy"),
    ("tok/s", "perf/tokens_per_s"),
)


class RunLog:
    def __init__(
        self,
        run_dir: str,
        *,
        rank: int,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
        rollouts: bool = True,
        wandb_project: str | None = None,
    ):
        self.run_dir, self.rank, self.active = run_dir, rank, rank == 0
        self.write_rollouts = rollouts
        self._tb = self._bar = self._wandb = None
        if not self.active:
            return
        os.makedirs(os.path.join(run_dir, "rollouts"), exist_ok=True)
        self._metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, dir=run_dir, resume="allow")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One line of metrics.jsonl (plus TensorBoard, W&B, the bar) for ``step``."""
        if not self.active:
            return
        clean = {k: (float(v) if v is not None and math.isfinite(float(v)) else None) for k, v in metrics.items()}
        self._metrics.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            self._tb_step(step, clean)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        if self._bar is not None:
            shown = {short: f"{clean[k]:.3g}" for short, k in BAR_KEYS if clean.get(k) is not None}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1) if "loss/total" in clean else self._bar.refresh()

    def _tb_step(self, step: int, clean: dict[str, float | None]) -> None:
        """A step's scalars as ONE TensorBoard event (a summary holds many values): without
        TensorFlow, tensorboard's file layer opens, appends to and closes the event file once per
        event, and one event per scalar (add_scalar) cost a toy step 5% of rank 0's time."""
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard.summary import scalar

        values = [v for k, x in clean.items() if x is not None for v in scalar(k, x).value]
        self._tb._get_file_writer().add_summary(Summary(value=values), step)
        self._tb.flush()

    def rollouts(self, step: int, rollouts: Sequence[Rollout]) -> None:
        """OUT/rollouts/step_N.jsonl: every per-rollout field, one rollout a line."""
        if not (self.active and self.write_rollouts):
            return
        path = os.path.join(self.run_dir, "rollouts", f"step_{step}.jsonl")
        with open(path + ".tmp", "w") as f:
            for r in rollouts:
                f.write(json.dumps(r.to_json()) + "\n")
        os.replace(path + ".tmp", path)

    def resume_at(self, step: int) -> None:
        """Drop what a crashed run logged after ``step`` (the checkpoint it resumes from)."""
        if not self.active:
            return
        path = self._metrics.name
        self._metrics.close()
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
        self._metrics = open(path, "a")
        rollouts = os.path.join(self.run_dir, "rollouts")
        for name in os.listdir(rollouts):
            if name.startswith("step_") and name.endswith(".jsonl") and int(name[5:-6]) > step:
                os.remove(os.path.join(rollouts, name))
        if self._bar is not None:
            self._bar.n = max(step, 0)  # -1: nothing was finished
            self._bar.refresh()

    def message(self, text: str) -> None:
        if self.active:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self) -> None:
        if not self.active:
            return
        self._metrics.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------- a batch's figures


def batch_metrics(rollouts: Sequence[Rollout], stats: RolloutStats, p: Plan) -> dict[str, float]:
    """Reward, routing, weights, perplexities and truncation of a batch, per path."""
    n = len(rollouts)
    lengths = torch.tensor([float(r.response_length) for r in rollouts], dtype=torch.float64)
    truncated = torch.tensor([r.finish_reason == "length" for r in rollouts])
    out = {
        "reward/mean": float(stats.reward_B.mean()),
        "reward/accuracy": float(stats.correct_B.double().mean()),
        "response/length_mean": float(lengths.mean()),
        "response/tokens": float(lengths.sum()),
        "rollouts": n,
        "response/truncated_share": float(truncated.double().mean()),
    }
    for path in torch.unique(p.path_B).tolist():
        if path == Path.SKIP:
            continue
        name = Path(path).name.lower()
        sel = p.path_B == path
        out[f"path/{name}_share"] = float(sel.double().mean())
        out[f"truncated/{name}_share"] = float(truncated[sel].double().mean())
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
