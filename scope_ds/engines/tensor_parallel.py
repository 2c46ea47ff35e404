"""A teacher split by tensor parallelism: DeepSpeed AutoTP over a few consecutive ranks of a node.

``model.teacher_placement=tensor``: each group of ``tp`` ranks holds one copy of the teacher, every
decoder layer's projections split over the group by DeepSpeed's AutoTP (``deepspeed.init_inference``
without kernel injection), the LM head whole on every rank (engines/models.StatsHead reads it
whole, as for the other placements; the group's ranks share its statistics' work, each its share
of the tokens: ``TensorGroup.split_rows``). A forward pass is a collective over the group: its
ranks run the same input. The learner gives a group's ranks the same scoring micro-batches; where their
micro-batches differ (the teacher's pass inside the student's update, each rank its own), the
group runs each rank's in turn (``TensorGroup.inputs_in_turn``), the flops of one whole forward
per rank all the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TensorGroup:
    """This rank's tensor-parallel group: ``size`` consecutive ranks, this one ``rank`` among them."""

    group: Any
    size: int
    rank: int

    def inputs_in_turn(self, mine: Any) -> tuple[list[Any], int]:
        """(the group's distinct micro-batches in group order, the index of this rank's): every rank
        of the group passes its own (a collective); micro-batches with the same rows are run once."""
        import torch.distributed as dist

        parts: list[Any] = [None] * self.size
        dist.all_gather_object(parts, mine.to("cpu"), group=self.group)
        by_rows = {_rows_of(p): p for p in reversed(parts)}  # the first of equal micro-batches
        keys = list(dict.fromkeys(_rows_of(p) for p in parts))
        return [by_rows[k] for k in keys], keys.index(_rows_of(mine))

    def split_rows(self, fn: Any, h_MD: torch.Tensor, tokens_M: torch.Tensor | None) -> torch.Tensor:
        """``fn(h, tokens)`` -> [m, k] of every row of ``h_MD`` [M, D], the same on each rank of the
        group (a collective): each rank runs ``fn`` on its share of the M rows, the group gathers."""
        import torch.distributed as dist

        M = h_MD.shape[0]
        per = max(-(-M // self.size), 1)
        lo, hi = min(self.rank * per, M), min((self.rank + 1) * per, M)
        own = slice(lo, hi) if hi > lo else slice(0, min(M, 1))  # a stand-in row, dropped, if none
        part = fn(h_MD[own], tokens_M[own] if tokens_M is not None else None)
        padded = part.new_zeros((per, *part.shape[1:]))
        padded[: hi - lo] = part[: hi - lo]
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat(parts)[:M]


def _rows_of(inputs: Any) -> tuple:
    """What tells two packed micro-batches of one global batch apart: their rollouts and layout."""
    return tuple(inputs.rows), inputs.shared_prompts, int(inputs.input_ids_1N.shape[1])


def new_groups(size: int, hosts: list[str]) -> TensorGroup:
    """This rank's group of ``size`` consecutive ranks (``hosts``: every rank's host name), after
    refusing a size that does not divide the world or a group that would span two hosts. A
    collective: every rank creates every group, in the same order."""
    from scope_ds.engines.sequence import consecutive_group

    check_hosts(size, hosts)
    group, rank = consecutive_group(size)
    return TensorGroup(group, size, rank)


def check_hosts(size: int, hosts: list[str]) -> None:
    """Refuse groups of ``size`` consecutive ranks (``hosts``: each rank's host) that do not divide
    the ranks or that would span two hosts, naming the ranks."""
    world = len(hosts)
    if world % size:
        raise ValueError(f"model.teacher_tp_size={size} does not divide the world size {world}")
    for first in range(0, world, size):
        on = sorted(set(hosts[first : first + size]))
        if len(on) > 1:
            raise ValueError(
                f"model.teacher_tp_size={size}: ranks {first}-{first + size - 1} are on hosts {on}; a "
                "tensor-parallel teacher runs within one node: pick a size that divides the ranks per node"
            )


def check_heads(config: Any, size: int, path: str) -> None:
    """Refuse a model whose heads do not split evenly over ``size`` ranks, naming the numbers (AutoTP
    splits an MLP of any width, in grains of 64 columns)."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    for what, n in (("attention heads", heads), ("key-value heads", kv)):
        if n % size:
            raise ValueError(
                f"{path}: its {n} {what} do not split over model.teacher_tp_size={size}; pick a size that divides "
                "them, or model.teacher_placement=replicated / zero3"
            )


def split(model: torch.nn.Module, tp: TensorGroup, dtype: torch.dtype, device: str) -> Any:
    """``model`` split over ``tp`` by AutoTP (an inference engine that forwards as the model does),
    its LM head kept whole: AutoTP would cut the head's input dimension and all-reduce its logits,
    and the head here returns statistics, not logits (engines/models.StatsHead)."""
    import deepspeed

    _reduce_over_groups()
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_children() if m is head), None)
    if name is None:
        raise ValueError(f"{type(model).__name__}: its LM head is not a child module; AutoTP would split it")
    holder = torch.nn.Module()  # not a Linear: AutoTP's head pass leaves it alone
    holder.head = head
    setattr(model, name, holder)
    try:
        engine = deepspeed.init_inference(
            model,
            tensor_parallel={"tp_size": tp.size, "tp_group": tp.group},
            dtype=dtype,
            replace_with_kernel_inject=False,
        )
    finally:
        setattr(model, name, head)
    head.to(device)
    return engine


def _reduce_over_groups() -> None:
    """AutoTP's all-reduces on torch.distributed, over the teacher's group. On CPU DeepSpeed's
    shared-memory kernel would take them, and it reduces over every rank of the host whatever the
    group, after setting itself up only where ``LOCAL_SIZE`` (set by the deepspeed launcher, not by
    srun or mpirun) equals the world size: without it the kernel writes to buffers that were never
    made. The process group's all-reduce is correct for any group, with any launcher."""
    import torch.distributed as dist
    from deepspeed import comm

    backend = comm.comm.cdb
    if getattr(backend, "_scope_ds_group_reduce", False):
        return

    def inference_all_reduce(tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM, group: Any = None) -> torch.Tensor:
        dist.all_reduce(tensor, op=backend._reduce_op(op), group=group)
        return tensor

    backend.inference_all_reduce = inference_all_reduce
    backend._scope_ds_group_reduce = True
