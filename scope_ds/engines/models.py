"""The student (ZeRO-3, trains) and the teacher / reference (ZeRO-3 partitioned, inference only).

Both run on every rank. Under ZeRO-3 a forward pass is a collective (parameters are gathered from
all ranks), so every rank must run the same number of forward passes: callers pad with dummy
micro-batches (see batching.micro_batches), never skip one.

Shape legend: B = rollouts, L = prompt + response positions, T = response positions, V = vocab.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from scope_ds.engines import ds
from scope_ds.engines.batching import TokenInputs, gather_response
from scope_ds.ops import token_entropy, token_logprobs


class _Engine:
    """What student and teacher share: loading, a forward pass, per-token log-probs."""

    def __init__(self, path: str, ds_config: dict[str, Any], dtype: str, chunk: int = 0):
        self.path, self.ds_config, self.chunk = path, ds_config, chunk or None
        self.model = ds.load_causal_lm(path, ds_config, dtype)
        self.engine: Any = None

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def device(self) -> torch.device:
        """Where this rank's forward passes run (the accelerator DeepSpeed chose: cuda:N, cpu)."""
        return torch.device(self.engine.device)

    def logits(self, inputs: TokenInputs) -> torch.Tensor:
        """[B, L, V] logits of a micro-batch (with gradient if the caller allows it)."""
        out = self.engine(input_ids=inputs.input_ids_BL, attention_mask=inputs.attention_mask_BL, use_cache=False)
        return out.logits

    def response_logprobs(self, logits_BLV: torch.Tensor, inputs: TokenInputs, temperature: float) -> torch.Tensor:
        """[B, T] log-probs of the response tokens at ``temperature`` (logits divided by it)."""
        logp_BL = token_logprobs(logits_BLV, inputs.targets_BL, temperature=temperature, chunk=self.chunk)
        return gather_response(logp_BL, inputs)

    def response_entropy(self, logits_BLV: torch.Tensor, inputs: TokenInputs, temperature: float) -> torch.Tensor:
        with torch.no_grad():
            return gather_response(
                token_entropy(logits_BLV.detach(), temperature=temperature, chunk=self.chunk), inputs
            )

    @torch.no_grad()
    def score(self, inputs: TokenInputs, temperature: float) -> torch.Tensor:
        """[B, T] response log-probs without gradient."""
        return self.response_logprobs(self.logits(inputs), inputs, temperature)

    def full_parameters(self, rank: int, group_size: int = 32) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter gathered whole, as (Hugging Face name, CPU tensor) on rank 0.

        A collective. Rank 0 must iterate to the end; on other ranks the gathering runs at the
        call and an empty iterator comes back, so only rank 0's consumer decides the pace. This is
        the one place where ZeRO-3 parameters are gathered (weight sync and export).
        """
        if rank != 0:
            for _ in self._gathered(rank, group_size):
                pass
            return iter(())
        return self._gathered(rank, group_size)

    def _gathered(self, rank: int, group_size: int) -> Iterator[tuple[str, torch.Tensor]]:
        import deepspeed

        params = list(self.model.named_parameters())
        for start in range(0, len(params), group_size):
            group = params[start : start + group_size]
            with deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=None):
                if rank == 0:
                    for name, p in group:
                        yield name, p.data.detach().to("cpu", copy=True)


class StudentEngine(_Engine):
    """The trained policy: a DeepSpeed ZeRO-3 engine with optimizer."""

    def __init__(
        self,
        path: str,
        ds_config: dict[str, Any],
        dtype: str,
        *,
        world_size: int,
        gradient_checkpointing: bool = False,
        chunk: int = 0,
    ):
        import deepspeed

        super().__init__(path, ds_config, dtype, chunk)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, model_parameters=params, config=ds_config
        )
        # DeepSpeed divides each micro-batch loss by the accumulation steps and averages gradients
        # over ranks; our losses already carry the global normaliser, so undo both (a plain sum).
        self.loss_scale = float(world_size * ds_config["gradient_accumulation_steps"])
        self.engine.train()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.loss_scale)
        self.engine.step()  # a no-op except at the accumulation boundary

    def save_checkpoint(self, folder: str, tag: str) -> None:
        """Every rank's partition of weights, optimizer and scheduler into ``folder/tag`` (a collective)."""
        self.engine.save_checkpoint(folder, tag=tag, save_latest=False)

    def load_checkpoint(self, folder: str, tag: str) -> bool:
        """Restore weights, optimizer and scheduler from ``folder/tag`` (a collective); False if none is there."""
        path, _ = self.engine.load_checkpoint(
            folder, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        return path is not None

    def step_stats(self) -> dict[str, float]:
        norm = self.engine.get_global_grad_norm()
        lr = self.engine.get_lr()
        return {"grad_norm": float(norm) if norm is not None else 0.0, "lr": float(lr[0]) if lr else 0.0}


class InferenceEngine(_Engine):
    """The teacher (or GRPO's reference policy): ZeRO-3 partitioned, no optimizer, eval mode.

    ``group``: a process group over the same ranks as the world, in the same order, on which this
    engine's parameter gathers run instead of the default group. With its own group the teacher
    can score in one thread while the student trains in another: the two engines' collectives
    never interleave on one communicator.
    """

    def __init__(self, path: str, ds_config: dict[str, Any], dtype: str, chunk: int = 0, group: Any = None):
        import deepspeed

        super().__init__(path, ds_config, dtype, chunk)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.engine, *_ = deepspeed.initialize(model=self.model, config=ds_config)
        self.engine.eval()
        self.group = group
        if group is not None:
            _gather_on(self.model, group)
            self._warm_up()

    def logits(self, inputs: TokenInputs) -> torch.Tensor:
        if self.group is not None and not self._trace_complete():
            raise RuntimeError(
                f"{self.path}: ZeRO-3 changed this model's module order between forward passes, so the "
                "teacher cannot score beside the update; set pipeline.overlap_teacher=false"
            )
        return super().logits(inputs)

    def _coordinator(self) -> Any:
        zero = getattr(self.engine, "optimizer", None)
        return zero.get_param_coordinator() if hasattr(zero, "get_param_coordinator") else None

    def _trace_complete(self) -> bool:
        coordinator = self._coordinator()
        return coordinator is None or coordinator.is_complete_trace()

    @torch.no_grad()
    def _warm_up(self) -> None:
        """Two one-token forward passes, on every rank (a collective).

        During its first passes ZeRO-3 records the module order and checks it across ranks with
        broadcasts on the default group; once the trace is complete a forward pass only gathers
        parameters, on ``self.group``. Warming up here, before any thread starts, keeps the
        default group to the student.
        """
        one = torch.ones(1, 1, dtype=torch.long, device=self.device)
        for _ in range(2):
            self.engine(input_ids=one, attention_mask=one, use_cache=False)
        if not self._trace_complete():
            raise RuntimeError(f"{self.path}: ZeRO-3 did not complete its module trace in two forward passes")


def current_device() -> Any:
    """This thread's accelerator device (DeepSpeed's choice: a CUDA index, or the CPU)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device()


def bind_device(device: Any) -> None:
    """Make ``device`` this thread's accelerator device: a new thread starts on device 0 on GPUs."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().set_device(device)


def _gather_on(model: torch.nn.Module, group: Any) -> None:
    """Move a ZeRO-3 model's parameter gathers to ``group``.

    ZeRO-3 gathers each parameter over ``param.ds_process_group`` (set by zero.Init to the world
    group). A group with the same ranks in the same order holds the same partitions, so only the
    communicator changes.
    """
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    if dist.get_world_size(group) != world or dist.get_rank(group) != rank:
        raise ValueError("the teacher's process group must span every rank, in rank order")
    for p in model.parameters():
        if hasattr(p, "ds_process_group"):
            p.ds_process_group = group
