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

    def step_stats(self) -> dict[str, float]:
        norm = self.engine.get_global_grad_norm()
        lr = self.engine.get_lr()
        return {"grad_norm": float(norm) if norm is not None else 0.0, "lr": float(lr[0]) if lr else 0.0}


class InferenceEngine(_Engine):
    """The teacher (or GRPO's reference policy): ZeRO-3 partitioned, no optimizer, eval mode."""

    def __init__(self, path: str, ds_config: dict[str, Any], dtype: str, chunk: int = 0):
        import deepspeed

        super().__init__(path, ds_config, dtype, chunk)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.engine, *_ = deepspeed.initialize(model=self.model, config=ds_config)
        self.engine.eval()
