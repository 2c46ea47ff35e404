"""The student (ZeRO-3, trains) and the teacher / reference (ZeRO-3 partitioned, inference only).

Both run on every rank. Under ZeRO-3 a forward pass is a collective (parameters are gathered from
all ranks), so every rank must run the same number of forward passes: callers pad with dummy
micro-batches (see batching.micro_batches), never skip one.

Per-token statistics come from the LM head in chunks (scope_ds.ops), never as whole logits: for a
packed micro-batch (batching.PackedInputs) the model runs to its last hidden states at the response
positions only (``logits_to_keep``), and its LM head module, asked through ``StatsHead``, returns
the statistics instead of logits. The head stays a module call, so ZeRO-3's own hooks gather its
weight for the forward and the backward and reduce-scatter its gradient, tied embeddings included.

Shape legend: B = rollouts, L = prompt + response positions, T = response positions, V = vocab,
M = response tokens of a packed micro-batch, D = hidden size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from scope_ds.engines import attention, ds, tensor_parallel, tiling
from scope_ds.engines.batching import PackedInputs, TokenInputs, gather_response, unpack_response
from scope_ds.engines.sequence import RowShard, SequenceGroup, pad_row, slice_grad_fn
from scope_ds.ops import TEACHER_STATS, TOKEN_STATS, GradFn, chunked_stats

Inputs = TokenInputs | PackedInputs


@dataclass
class _Request:
    """What the LM head returns instead of logits for one forward pass."""

    stats: dict[str, float]  # statistic -> temperature; empty: the hidden states themselves
    targets_M: torch.Tensor
    teacher_x: torch.Tensor | None = None  # the teacher's hidden states [M, D_t], for 'kl'
    teacher_weight: torch.Tensor | None = None  # the teacher's LM head [V, D_t]
    chunk: int | None = None
    grad_fn: GradFn | None = None  # a loss's gradient, applied in the forward pass (see chunked_stats)


class StatsHead:
    """A model's LM head that, when asked before a forward pass, returns per-token statistics
    [1, M, k] (or its hidden states [1, M, D]) instead of logits [1, M, V]; unasked, it is the plain
    head (generation, the padded path). Installed on the head module itself (its ``forward``), so
    the model's tree, state dict and ZeRO-3 hooks stay as they are."""

    def __init__(self, model: torch.nn.Module) -> None:
        head = model.get_output_embeddings()
        name = type(model).__name__
        if head is None or not isinstance(head, torch.nn.Linear) or head.bias is not None:
            raise ValueError(f"{name}: packed micro-batches need a plain LM head (a Linear without bias)")
        if "logits_to_keep" not in inspect.signature(model.forward).parameters:
            raise ValueError(f"{name} takes no logits_to_keep: set train.packing=false for this model")
        if getattr(model.config, "final_logit_softcapping", None):
            raise ValueError(f"{name} soft-caps its logits after the head: set train.packing=false for this model")
        self.head, self._plain, self.request = head, head.forward, None
        self.rows_over: tensor_parallel.TensorGroup | None = None  # a tensor-parallel teacher's group
        head.forward = self._forward

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        req, self.request = self.request, None
        if req is None:
            return self._plain(x)
        if not req.stats:
            return x
        h_MD = x.reshape(-1, x.shape[-1])
        tokens = req.targets_M if set(TOKEN_STATS) & set(req.stats) else None
        if self.rows_over is not None and req.grad_fn is None and req.teacher_x is None:
            # a tensor-parallel group's ranks hold the same hidden states: each computes the
            # statistics of its share of the tokens, and the group gathers them
            return self.rows_over.split_rows(lambda h, t: self._stats(req, h, t), h_MD, tokens)[None]
        return self._stats(req, h_MD, tokens)[None]

    def _stats(self, req: _Request, h_MD: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        """[M, k] statistics of hidden states ``h_MD`` (the anchor, if any, as a last column)."""
        out = chunked_stats(
            req.stats,
            h_MD,
            tokens,
            weight=self.head.weight,
            teacher_x=req.teacher_x,
            teacher_weight=req.teacher_weight,
            chunk=req.chunk,
            grad_fn=req.grad_fn,
        )
        # the entropy is a metric: detached, it costs nothing in backward; the anchor, when the
        # loss's gradient was applied in this pass, rides along as a last column
        anchor = out.pop("anchor", None)
        cols = [v.detach() if k == "entropy" else v for k, v in out.items()]
        if anchor is not None:
            cols.append(anchor.expand(h_MD.shape[0]))
        return torch.stack(cols, -1)


class _Engine:
    """What student and teacher share: loading, a forward pass, per-token log-probs."""

    sp: SequenceGroup | None = None  # this engine's sequence-parallel group (None: whole rows)
    tensor: tensor_parallel.TensorGroup | None = None  # a tensor-parallel teacher's group (InferenceEngine)
    placement: str = "zero3"  # where an inference engine's weights are (model.teacher_placement)

    def __init__(
        self,
        path: str,
        ds_config: dict[str, Any] | None,
        dtype: str,
        chunk: int = 0,
        packing: bool = True,
        sp: SequenceGroup | None = None,
        tiled_mlp: bool = False,
    ):
        self.path, self.ds_config, self.chunk, self.sp = path, ds_config, chunk or None, sp
        if sp is not None and not packing:
            raise ValueError("parallel.sequence_parallel_size > 1 splits packed rows: set train.packing=true")
        self.model = ds.load_causal_lm(path, ds_config, dtype, sp=sp)
        if tiled_mlp:  # parallel.tiled_mlp: DeepSpeed's TiledMLP around each layer's MLP
            tiling.tile_mlps(self.model, path)
        self.stats_head = StatsHead(self.model) if packing else None
        self.engine: Any = None

    @property
    def ranks_per_batch(self) -> int:
        """The ranks that run this engine's micro-batches together: its sequence- or tensor-parallel
        group's (1: each rank its own)."""
        group = self.tensor or self.sp
        return group.size if group is not None else 1

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def attends_shared_prompts(self) -> bool:
        """Whether this model's attention takes a packed row whose rollouts share their prompt."""
        return self.model.config._attn_implementation == attention.NAME

    @property
    def device(self) -> torch.device:
        """Where this rank's forward passes run (the accelerator DeepSpeed chose: cuda:N, cpu)."""
        return torch.device(self.engine.device)

    def logits(self, inputs: TokenInputs) -> torch.Tensor:
        """[B, L, V] logits of a padded micro-batch (with gradient if the caller allows it)."""
        out = self.engine(input_ids=inputs.input_ids_BL, attention_mask=inputs.attention_mask_BL, use_cache=False)
        return out.logits

    def _packed(self, inputs: PackedInputs, request: _Request, shard: RowShard | None = None) -> torch.Tensor:
        """One forward pass of a packed micro-batch whose LM head answers ``request``: [1, M, ...]
        (with a sequence-parallel group: this rank's ``shard`` of the row, see ``_packed_slice``)."""
        if self.stats_head is None:
            raise RuntimeError(f"{self.path}: built without packing (train.packing=false)")
        if self.sp is not None:
            return self._packed_slice(inputs, request, shard or self._shard(inputs))
        self.stats_head.request = request
        bounds = {}
        if self.attends_shared_prompts:
            bounds["packed_layout"] = attention.layout_of(inputs.position_ids_1N)
        elif inputs.shared_prompts:
            raise ValueError(
                f"{self.path}: its attention ({self.model.config._attn_implementation}) cannot share a prompt's "
                "tokens between rollouts; set train.share_prompts=false"
            )
        try:
            out = self.engine(
                input_ids=inputs.input_ids_1N,
                position_ids=inputs.position_ids_1N,
                logits_to_keep=inputs.score_pos_M,
                use_cache=False,
                **bounds,
            )
        finally:
            self.stats_head.request = None
        return out.logits

    def _shard(self, inputs: PackedInputs) -> RowShard:
        """This rank's slice of a packed row (engines/sequence.py)."""
        return self.sp.shard(inputs.score_pos_M, inputs.input_ids_1N.shape[1])

    def _packed_slice(self, inputs: PackedInputs, request: _Request, shard: RowShard) -> torch.Tensor:
        """``_packed`` on this rank's ``shard`` of the row: [1, C, ...] for the slice's C response
        tokens (one stand-in position, whose values are dropped, if it has none: the LM head runs
        on every rank)."""
        ids, pos = pad_row(inputs.input_ids_1N, inputs.position_ids_1N, shard.padded, pad_id=0)
        real = shard.m_stop > shard.m_start
        keep = inputs.score_pos_M[shard.m_start : shard.m_stop] - shard.start
        targets = request.targets_M[shard.m_start : shard.m_stop]
        if not real:
            keep, targets = keep.new_zeros(1), targets.new_zeros(1)
        grad_fn = slice_grad_fn(request.grad_fn, shard.m_start, real)
        self.stats_head.request = dataclasses.replace(request, targets_M=targets, grad_fn=grad_fn)
        try:
            out = self.engine(
                input_ids=ids[:, shard.start : shard.stop],
                position_ids=pos[:, shard.start : shard.stop],
                logits_to_keep=keep,
                use_cache=False,
                packed_layout=attention.layout_of(pos),
            )
        finally:
            self.stats_head.request = None
        return out.logits

    def hidden(self, inputs: PackedInputs) -> torch.Tensor:
        """[M, D] last hidden states at the response positions of a packed micro-batch (no gradient)."""
        with torch.no_grad():
            h = self._packed(inputs, _Request(stats={}, targets_M=inputs.targets_M))
        return h.reshape(-1, h.shape[-1])

    def response_stats(
        self,
        inputs: Inputs,
        stats: dict[str, float],
        teacher: InferenceEngine | None = None,
        grad_fn: GradFn | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-response-token statistics [B, T] of a micro-batch, ``{stat: temperature}`` ->
        ``{stat: values}`` (0 at padding): 'logp' of the sampled tokens (with gradient where the
        caller allows), 'entropy' (never a gradient), 'kl' = KL(self || ``teacher``) over the full
        vocabulary (gradient to self only), 'teacher_logp' = the teacher's log-probs of the sampled
        tokens from the same pass (no gradient).

        ``grad_fn`` (packed micro-batches only; flat positions m of ``inputs.targets_M``): the
        gradient of a per-token loss applied in the forward pass (``ops.chunked_stats``); the
        statistics then carry no gradient and ``"anchor"`` is the zero scalar to add to the loss."""
        if isinstance(inputs, PackedInputs):
            teacher_x = teacher_w = None
            shard = self._shard(inputs) if self.sp is not None else None
            if set(TEACHER_STATS) & set(stats):
                teacher_x, teacher_w = teacher.hidden(inputs), teacher.head_weight()
                if shard is not None and teacher.sp is None:  # a teacher of whole rows: this slice's tokens
                    teacher_x = _slice_rows(teacher_x, shard)
            request = _Request(stats, inputs.targets_M, teacher_x, teacher_w, self.chunk, grad_fn)
            if shard is not None and grad_fn is None and torch.is_grad_enabled():
                raise ValueError("a sequence-parallel pass takes a loss's gradient only through grad_fn")
            local = self._packed(inputs, request, shard).reshape(-1, len(stats) + (grad_fn is not None))
            # with a sequence-parallel group: every slice's values, in the row's order
            values = local if shard is None else self.sp.gather(local, shard.counts)
            cols = {k: values[:, i] for i, k in enumerate(stats)}
            plain = grad_fn is not None  # the statistics are values then, their gradient applied
            out = {k: unpack_response(v.detach() if plain or k == "entropy" else v, inputs) for k, v in cols.items()}
            if grad_fn is not None:  # d out / d anchor = 1 (0 for a micro-batch without response tokens)
                out["anchor"] = local[:, -1].sum() / max(local.shape[0], 1)
            return out
        if grad_fn is not None:
            raise ValueError("grad_fn needs a packed micro-batch (train.packing=true)")
        logits = self.logits(inputs)
        t_logits = None
        if set(TEACHER_STATS) & set(stats):
            with torch.no_grad():
                t_logits = teacher.logits(inputs)
        tokens = inputs.targets_BL if set(TOKEN_STATS) & set(stats) else None
        values = chunked_stats(stats, logits, tokens, teacher_x=t_logits, chunk=self.chunk)
        return {k: gather_response(v.detach() if k == "entropy" else v, inputs) for k, v in values.items()}

    @torch.no_grad()
    def score(self, inputs: Inputs, temperature: float) -> torch.Tensor:
        """[B, T] response log-probs without gradient."""
        return self.response_stats(inputs, {"logp": temperature})["logp"]

    def full_parameters(self, rank: int, group_size: int = 32) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter gathered whole, as (Hugging Face name, CPU tensor) on rank 0.

        A collective. Rank 0 must iterate to the end; on other ranks the gathering runs at the
        call and an empty iterator comes back, so only rank 0's consumer decides the pace. Weight
        sync and export gather here; the teacher's head in ``head_weight``; both through ``whole``.
        """
        if rank != 0:
            for _ in self._gathered(rank, group_size):
                pass
            return iter(())
        return self._gathered(rank, group_size)

    def _gathered(self, rank: int, group_size: int) -> Iterator[tuple[str, torch.Tensor]]:
        params = list(self.model.named_parameters())
        for start in range(0, len(params), group_size):
            group = params[start : start + group_size]
            with whole([p for _, p in group]):
                if rank == 0:
                    for name, p in group:
                        yield name, p.data.detach().to("cpu", copy=True)


class StudentEngine(_Engine):
    """The trained policy: a DeepSpeed engine with optimizer (ZeRO-3 unless train.zero_stage says otherwise)."""

    def __init__(
        self,
        path: str,
        ds_config: dict[str, Any],
        dtype: str,
        *,
        world_size: int,
        gradient_checkpointing: bool = False,
        chunk: int = 0,
        packing: bool = True,
        sp: SequenceGroup | None = None,
        tiled_mlp: bool = False,
    ):
        super().__init__(path, ds_config, dtype, chunk, packing, sp, tiled_mlp)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, self.scheduler = ds.initialize(self.model, ds_config, model_parameters=params)
        # The trainer owns the accumulation boundary (ds.build_ds_config: a step has as many
        # micro-batches as its packing gives); DeepSpeed averages gradients over ranks, and our
        # losses already carry the global normaliser, so undo the average (a plain sum). Under
        # sequence parallelism the ranks of a group add their slices' parts of their rows'
        # gradient: the same sum. DeepSpeed is not told of the groups (no ``mpu``): its ZeRO-3
        # reduce-scatter would average over every rank all the same, its contiguous path over
        # world / sp, and ZeRO partitions over every rank either way.
        if ds_config.get("managed_gradient_accumulation", True) or ds_config["gradient_accumulation_steps"] != 1:
            raise ValueError("the student's DeepSpeed config must leave gradient accumulation to the trainer")
        self.loss_scale = float(world_size)
        self._stage0_norm: float | None = None
        if self.engine.zero_optimization_stage() == 0:
            # Without ZeRO, DeepSpeed hands the step to the torch optimizer and keeps no gradient
            # norm: take it just before the update, when the ranks' gradients are reduced.
            self.engine.optimizer.register_step_pre_hook(self._record_norm)
        self.engine.train()

    def _record_norm(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self._stage0_norm = (
            float(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads]))) if grads else 0.0
        )

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-batch's loss."""
        self.engine.backward(loss * self.loss_scale)

    def step(self) -> None:
        """The optimizer step on the gradients accumulated since the last one."""
        self.engine.step()

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
        norm = self._stage0_norm if self._stage0_norm is not None else self.engine.get_global_grad_norm()
        lr = self.engine.get_lr()
        return {"grad_norm": float(norm) if norm is not None else 0.0, "lr": float(lr[0]) if lr else 0.0}


class InferenceEngine(_Engine):
    """The teacher (or GRPO's reference policy): no optimizer, eval mode, placed as
    ``model.teacher_placement`` says (engines/placement.py): ``zero3`` a DeepSpeed engine partitioned
    over every rank, its layers gathered in every pass; ``replicated`` the plain module, whole on
    every rank (no hooks, no gathers); ``tensor`` split by AutoTP over ``tensor``'s ranks
    (engines/tensor_parallel.py), whole rows only (``sp`` None).

    ``group``: a process group over the same ranks as the world, in the same order, on which a
    zero3 engine's parameter gathers run instead of the default group, and the scored rows are
    merged. With its own group the teacher can score in one thread while the student trains in
    another: the two engines' collectives never interleave on one communicator.
    """

    def __init__(
        self,
        path: str,
        ds_config: dict[str, Any] | None,
        dtype: str,
        chunk: int = 0,
        group: Any = None,
        packing: bool = True,
        sp: SequenceGroup | None = None,
        tiled_mlp: bool = False,
        placement: str = "zero3",
        tensor_group: tensor_parallel.TensorGroup | None = None,
    ):
        if (placement == "tensor") != (tensor_group is not None) or (placement == "tensor" and sp is not None):
            raise ValueError(f"{path}: placement {placement!r} takes a tensor group exactly when tensor, and no sp")
        if (placement == "zero3") != (ds_config is not None):
            raise ValueError(f"{path}: a DeepSpeed config is for the zero3 placement alone, not {placement!r}")
        super().__init__(path, ds_config, dtype, chunk, packing, sp, tiled_mlp)
        self.placement, self.tensor = placement, tensor_group
        self._head_weight: torch.Tensor | None = None
        for p in self.model.parameters():
            p.requires_grad_(False)
        if placement == "zero3":
            self.engine, *_ = ds.initialize(self.model, ds_config)
        elif placement == "tensor":
            tensor_parallel.check_heads(self.model.config, tensor_group.size, path)
            self.engine = tensor_parallel.split(self.model, tensor_group, self.model.dtype, current_device_name())
            if self.stats_head is not None:
                self.stats_head.rows_over = tensor_group
        else:
            self.engine = self.model.to(current_device_name())
        self.engine.eval()
        self.group = group
        if group is not None and placement == "zero3":
            _gather_on(self.model, group)
            self._warm_up()

    @property
    def device(self) -> torch.device:
        if self.placement == "zero3":
            return super().device
        return torch.device(current_device_name())

    def head_weight(self) -> torch.Tensor:
        """The LM head's weight [V, D], whole: gathered once and kept (it never changes); the
        module's own where no placement partitions it."""
        w = self.stats_head.head.weight
        if self.placement != "zero3":
            return w.detach()
        if self._head_weight is None:  # a collective, on the first call (every rank's same micro-batch)
            with whole([w]):
                self._head_weight = w.data.detach().clone()
        return self._head_weight

    def _packed(self, inputs: PackedInputs, request: _Request, shard: RowShard | None = None) -> torch.Tensor:
        self._check_trace()
        if self.tensor is None:
            return super()._packed(inputs, request, shard)
        # a tensor-parallel pass is the group's: each rank's micro-batch in turn, this rank's kept
        runs, own = self.tensor.inputs_in_turn(inputs)
        out = None
        for j, other in enumerate(runs):
            other = other.to(self.device)
            got = super()._packed(other, dataclasses.replace(request, targets_M=other.targets_M))
            out = got if j == own else out
        return out

    def _check_trace(self) -> None:
        if self.group is not None and not self._trace_complete():
            raise RuntimeError(
                f"{self.path}: ZeRO-3 changed this model's module order between forward passes, so the "
                "teacher cannot score beside the update; set pipeline.overlap_teacher=false"
            )

    def logits(self, inputs: TokenInputs) -> torch.Tensor:
        self._check_trace()
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


def _slice_rows(values_MD: torch.Tensor, shard: RowShard) -> torch.Tensor:
    """A shard's rows of per-response-token values of the whole row (one stand-in row of zeros for a
    shard without response tokens, as ``_Engine._packed_slice`` runs one stand-in position)."""
    if shard.m_stop > shard.m_start:
        return values_MD[shard.m_start : shard.m_stop]
    return values_MD.new_zeros((1, *values_MD.shape[1:]))


def current_device() -> Any:
    """This thread's accelerator device (DeepSpeed's choice: a CUDA index, or the CPU)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device()


def current_device_name() -> str:
    """This thread's accelerator device as a torch device string ("cuda:N", "cpu")."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()


def bind_device(device: Any) -> None:
    """Make ``device`` this thread's accelerator device: a new thread starts on device 0 on GPUs."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().set_device(device)


@contextlib.contextmanager
def whole(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Within the block, ZeRO-3 partitioned ``params`` are whole on every rank (DeepSpeed's
    GatheredParameters, read-only; a collective); parameters ZeRO-3 does not hold are left as they
    are. The one place the engines gather ZeRO-3 parameters."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


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
