"""The embedded server's generation engine: continuous batching over a Hugging Face model.

One thread owns the model's forward passes. Requests wait in a queue; at every decode step the
engine admits waiting sequences (prefilled together, left-padded, then merged into the running
batch), samples one token for every running row, retires finished rows and runs one batched
forward with the KV cache. Pause, abort and weight updates act at step boundaries, as in SGLang.

Shapes: B = running rows, T = cached positions (left-padded), V = vocabulary, H/D = heads/dims.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from scope_ds.rollout.server.lean import LeanDecode
from scope_ds.rollout.server.requests import GenItem, GenResult
from scope_ds.rollout.server.sampling import BatchSampling, sample_next

log = logging.getLogger(__name__)


class _Room(DynamicLayer):
    """One layer's KV cache with room to grow: a decode step writes its keys and values into the
    spare positions, where transformers' DynamicLayer concatenates (a copy of the whole cache, per
    layer and step; tools/bench_rollout.py, docs/rollout.md). The room doubles when full.
    ``keys`` / ``values`` are views [B, H, T, D] of the cached positions."""

    def __init__(self, keys_BHTD: torch.Tensor, values_BHTD: torch.Tensor) -> None:
        super().__init__()
        self.is_initialized, self.device = True, keys_BHTD.device
        b, _, t, _ = keys_BHTD.shape
        self._k, self._v = (self._empty(x, b, 2 * t + 16) for x in (keys_BHTD, values_BHTD))
        self._k[:, :, :t], self._v[:, :, :t] = keys_BHTD, values_BHTD
        self._view(b, t)

    @staticmethod
    def _empty(like: torch.Tensor, rows: int, positions: int) -> torch.Tensor:
        _, h, _, d = like.shape
        return like.new_empty(rows, h, positions, d)

    def _view(self, rows: int, t: int) -> None:
        self.keys, self.values = self._k[:rows, :, :t], self._v[:rows, :, :t]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        (rows, _, t, _), n = self.keys.shape, key_states.shape[2]
        if t + n > self._k.shape[2]:
            k, v = self._empty(self._k, rows, 2 * (t + n)), self._empty(self._v, rows, 2 * (t + n))
            k[:, :, :t], v[:, :, :t] = self.keys, self.values
            self._k, self._v = k, v
        self._k[:rows, :, t : t + n], self._v[:rows, :, t : t + n] = key_states, value_states
        self._view(rows, t + n)
        return self.keys, self.values

    def move_rows(self, moves: list[tuple[int, int]], rows: int) -> None:
        """Copy row ``src`` into row ``dst`` for each (dst, src), then keep the first ``rows``."""
        t = self.keys.shape[2]
        for dst, src in moves:
            self._k[dst, :, :t], self._v[dst, :, :t] = self._k[src, :, :t], self._v[src, :, :t]
        self._view(rows, t)


KV = list[_Room]  # per layer


class _Seq:
    """A sequence being generated, owned by the engine thread once queued."""

    def __init__(self, item: GenItem, loop: asyncio.AbstractEventLoop, context_len: int) -> None:
        self.item = item
        self.loop = loop
        self.future: asyncio.Future[GenResult] = loop.create_future()
        self.output_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[list[tuple[float, int]]] = []
        self.input_logprobs: list[float | None] | None = None
        # SGLang caps max_new_tokens so that prompt + output fits the context.
        self.max_new = min(item.spec.max_new_tokens, context_len - len(item.prompt_ids))
        self.abort_msg: str | None = None
        self.stop_str: str | None = None
        self.t0 = time.perf_counter()

    def prefix(self) -> list[int]:
        return self.item.prompt_ids + self.output_ids

    def sampling_key(self) -> tuple[int, int] | None:
        """(seed, position of the next token in prompt + output) of a seeded request, else None."""
        seed = self.item.spec.seed
        return None if seed is None else (seed, len(self.item.prompt_ids) + len(self.output_ids))

    @property
    def wants_input_logprobs(self) -> bool:
        return self.item.return_logprob and self.item.logprob_start_len >= 0 and self.input_logprobs is None


@dataclass
class _Batch:
    """The running rows and their cache; every tensor's first dim follows ``seqs``."""

    seqs: list[_Seq]
    kv: KV
    mask_BT: torch.Tensor  # 1 where a cached position is real, 0 for left padding
    next_pos_B: torch.Tensor  # position id of the next token each row will feed
    logits_BV: torch.Tensor  # logits of each row's next token
    sampling: BatchSampling

    def select(self, rows: list[int]) -> _Batch:
        """The batch of only ``rows`` (ascending indices into this one), in an order of its own
        (``seqs`` says which row is where). The cache is not copied whole for a row that leaves:
        a kept row from the end moves into each place left free (this batch's rooms are reused).
        Only once the left columns no kept row uses (left padding of rows gone) are half the cache
        is it copied without them, so that it does not grow without bound."""
        idx = torch.tensor(rows, dtype=torch.long)
        used = self.mask_BT[idx].any(dim=0)
        first = int(used.float().argmax()) if used.numel() else 0
        if 2 * first > used.numel():
            kv = [_Room(room.keys[idx, :, first:], room.values[idx, :, first:]) for room in self.kv]
            order = rows
        else:
            first, kept = 0, set(rows)
            holes = [i for i in range(len(rows)) if i not in kept]
            moves = list(zip(holes, [i for i in rows if i >= len(rows)], strict=True))
            for room in self.kv:
                room.move_rows(moves, len(rows))
            kv, order = self.kv, list(range(len(rows)))
            for dst, src in moves:
                order[dst] = src
        idx = torch.tensor(order, dtype=torch.long)
        return _Batch(
            [self.seqs[i] for i in order],
            kv,
            self.mask_BT[idx, first:],
            self.next_pos_B[idx],
            self.logits_BV[idx],
            self.sampling.select(idx),
        )

    def merge(self, other: _Batch) -> _Batch:
        """Append ``other``'s rows, left-padding the shorter cache (positions are explicit, so exact)."""
        t = max(self.mask_BT.shape[1], other.mask_BT.shape[1])

        def pad(x: torch.Tensor, dim: int) -> torch.Tensor:
            missing = t - x.shape[dim]
            if missing == 0:
                return x
            shape = list(x.shape)
            shape[dim] = missing
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        kv = [
            _Room(torch.cat([pad(a.keys, 2), pad(b.keys, 2)]), torch.cat([pad(a.values, 2), pad(b.values, 2)]))
            for a, b in zip(self.kv, other.kv, strict=True)
        ]
        s, o = self.sampling, other.sampling
        return _Batch(
            self.seqs + other.seqs,
            kv,
            torch.cat([pad(self.mask_BT, 1), pad(other.mask_BT, 1)]),
            torch.cat([self.next_pos_B, other.next_pos_B]),
            torch.cat([self.logits_BV, other.logits_BV]),
            BatchSampling(*(torch.cat([a, b]) for a, b in zip(vars(s).values(), vars(o).values(), strict=True))),
        )


def _kv_of(cache: Any) -> KV:
    """The cache a forward pass returned, as rooms (the decode steps' own cache: as they are)."""
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) not in (DynamicLayer, _Room) or layer.keys is None for layer in layers):
        raise RuntimeError(
            "the embedded server needs a model whose KV cache is a full-attention DynamicCache (Llama, Qwen2, ...)"
        )
    return [layer if isinstance(layer, _Room) else _Room(layer.keys, layer.values) for layer in layers]


class Engine:
    """Continuous-batching generation on one model; thread-safe entry points for the web layer."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        context_len: int,
        eos_ids: set[int],
        decode: Callable[..., str] | None = None,
        max_running: int = 64,
        batch_wait_s: float = 0.005,
        seed: int | None = None,
        weight_version: str = "default",
        lean_decode: bool = True,
    ) -> None:
        self.model = model
        self.context_len = context_len
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.eos_ids = set(eos_ids)
        self.decode = decode
        self.max_running = max_running
        self.batch_wait_s = batch_wait_s
        self.weight_version = weight_version
        # Held for each forward pass and by weight loaders: updates land between steps.
        self.model_lock = threading.Lock()
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else int(time.time_ns() % (2**63)))
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # Decode steps skip transformers' per-call machinery where the model's layout allows
        # (lean.py); prefill, and any other model, go through the model's own forward.
        self._lean, why = LeanDecode.of(model) if lean_decode else (None, "--transformers-decode")
        self.decode_path = "lean" if self._lean is not None else f"transformers ({why})"
        self._cv = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._paused = False
        self._pause_mode = "abort"
        self._updating = False
        self._closed = False
        self._last_submit = 0  # items the newest request brought (one: more may be on their way)
        self._peak_running = 0  # most rows decoded together so far (shows batching at work)
        self._joins = 0  # admissions into a running batch (continuous batching at work)
        self._sampled = 0  # tokens sampled so far, all requests together
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    # ---- entry points (any thread) ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def submit(self, items: list[GenItem], loop: asyncio.AbstractEventLoop) -> list[_Seq]:
        """Queue the items; each returned sequence's ``future`` resolves to its GenResult."""
        seqs = [_Seq(item, loop, self.context_len) for item in items]
        with self._cv:
            self._waiting.extend(seqs)
            self._last_submit = len(seqs)
            self._cv.notify_all()
        return seqs

    def pause(self, mode: str) -> None:
        """SGLang's pause_generation: "abort" ends every request now; "retract" and "in_place" hold them."""
        with self._cv:
            self._paused = True
            self._pause_mode = mode
            if mode == "abort":
                self._abort_locked(lambda s: True, "Abort by pause_generation")
            self._cv.notify_all()

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    def set_updating(self, updating: bool) -> None:
        """Between begin_ and end_weight_update no step runs (running requests hold in place)."""
        with self._cv:
            self._updating = updating
            self._cv.notify_all()

    def abort(self, rid: str | None, abort_all: bool) -> int:
        with self._cv:
            return self._abort_locked(lambda s: abort_all or rid in (s.item.rid, s.item.parent_rid), "Abort by request")

    def abort_seqs(self, seqs: list[_Seq], message: str) -> None:
        ids = {id(s) for s in seqs}
        with self._cv:
            self._abort_locked(lambda s: id(s) in ids, message)

    def stats(self) -> dict[str, Any]:
        with self._cv:
            return {
                "num_running_reqs": len(self._running),
                "num_waiting_reqs": len(self._waiting),
                "paused": self._paused,
                "pause_mode": self._pause_mode if self._paused else None,
                "updating_weights": self._updating,
                "peak_running_reqs": self._peak_running,
                "joins_into_running_batch": self._joins,
                "generated_tokens": self._sampled,
                "decode_path": self.decode_path,
            }

    def busy(self) -> bool:
        with self._cv:
            return bool(self._running or self._waiting)

    # ---- engine thread ---------------------------------------------------------------------------
    def _abort_locked(self, match: Callable[[_Seq], bool], message: str) -> int:
        hits = 0
        for seq in list(self._waiting):
            if match(seq):
                self._waiting.remove(seq)
                seq.abort_msg = message
                self._finish(seq, {"type": "abort", "message": message})
                hits += 1
        for seq in self._running:
            if match(seq) and seq.abort_msg is None:
                seq.abort_msg = message  # retired by the engine thread at its next step boundary
                hits += 1
        self._cv.notify_all()
        return hits

    def _finish(self, seq: _Seq, reason: dict[str, Any]) -> None:
        result = GenResult(
            output_ids=list(seq.output_ids),
            output_logprobs=list(seq.logprobs),
            finish_reason=reason,
            weight_version=self.weight_version,
            e2e_latency=time.perf_counter() - seq.t0,
            output_top_logprobs=list(seq.top) if seq.item.top_logprobs_num > 0 else None,
            input_logprobs=seq.input_logprobs,
            matched_stop_str=seq.stop_str,
        )

        def resolve() -> None:
            if not seq.future.done():
                seq.future.set_result(result)

        seq.loop.call_soon_threadsafe(resolve)

    def _loop(self) -> None:
        batch: _Batch | None = None
        while True:
            try:
                with torch.inference_mode():
                    batch, new = self._schedule(batch)
                    if self._closed:
                        return
                    if new:
                        fresh = self._retire(self._prefill(new))
                        batch = fresh if batch is None else (batch.merge(fresh) if fresh else batch)
                    batch = self._retire(batch)
                    if batch is not None:
                        batch = self._decode(batch)
                    with self._cv:
                        self._running = batch.seqs if batch else []
            except Exception as exc:  # a failed step must fail its requests, never the server
                log.exception("generation step failed")
                with self._cv:
                    failed, self._running = self._running, []
                for seq in failed + (batch.seqs if batch else []):
                    self._finish(seq, {"type": "abort", "message": f"engine error: {exc}"})
                batch = None

    def _schedule(self, batch: _Batch | None) -> tuple[_Batch | None, list[_Seq]]:
        """Block until a step can run; returns the batch to continue and the sequences to admit."""
        with self._cv:
            while not self._closed:
                batch = self._retire(batch)
                self._running = batch.seqs if batch else []
                held = self._paused or self._updating
                if held and batch is not None and self._paused and self._pause_mode == "retract":
                    # Retract: drop the cache, requeue the rows; their prefix is recomputed on resume.
                    self._waiting.extendleft(reversed(batch.seqs))
                    batch = None
                    self._running = []
                if held or (batch is None and not self._waiting):
                    self._cv.wait()
                    continue
                room = self.max_running - (len(batch.seqs) if batch else 0)
                if batch is None and len(self._waiting) < room and self._last_submit == 1:
                    # Idle engine, one prompt in: give concurrent requests a few ms to arrive and
                    # share one prefill. A request that brings a batch (the trainer's) has batched
                    # its prompts itself, and waiting would only delay them.
                    deadline = time.monotonic() + self.batch_wait_s
                    while len(self._waiting) < room and (left := deadline - time.monotonic()) > 0:
                        self._cv.wait(left)
                new = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                self._running = (batch.seqs if batch else []) + new
                self._peak_running = max(self._peak_running, len(self._running))
                self._joins += int(batch is not None and bool(new))
                return batch, new
            return batch, []

    def _retire(self, batch: _Batch | None) -> _Batch | None:
        """Finish the rows that were aborted; drop them from the batch."""
        if batch is None:
            return None
        keep = [i for i, s in enumerate(batch.seqs) if s.abort_msg is None]
        for s in batch.seqs:
            if s.abort_msg is not None:
                self._finish(s, {"type": "abort", "message": s.abort_msg})
        if len(keep) == len(batch.seqs):
            return batch
        return batch.select(keep) if keep else None

    def _forward(
        self, ids_BT: torch.Tensor, mask_BT: torch.Tensor, pos_BT: torch.Tensor, kv: KV | None, all_logits: bool
    ):
        cache = None
        if kv is not None:  # the rooms themselves: this step's keys and values are written into them
            cache = DynamicCache(ddp_cache_data=[(None, None)] * len(kv))
            cache.layers = list(kv)
        with self.model_lock:
            out = self.model(
                input_ids=ids_BT,
                attention_mask=mask_BT,
                position_ids=pos_BT,
                use_cache=True,
                logits_to_keep=0 if all_logits else 1,
                **{self._cache_kw: cache},
            )
        return out.logits.float(), _kv_of(out["cache"] if "cache" in out else out["past_key_values"])

    def _prefill(self, seqs: list[_Seq]) -> _Batch | None:
        prefixes = [s.prefix() for s in seqs]
        t = max(len(p) for p in prefixes)
        ids_BT = torch.zeros(len(seqs), t, dtype=torch.long)
        mask_BT = torch.zeros(len(seqs), t, dtype=torch.long)
        for i, p in enumerate(prefixes):
            ids_BT[i, t - len(p) :] = torch.tensor(p)
            mask_BT[i, t - len(p) :] = 1
        pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
        all_logits = any(s.wants_input_logprobs for s in seqs)
        logits_BTV, kv = self._forward(ids_BT, mask_BT, pos_BT, None, all_logits)
        if all_logits:
            for i, s in enumerate(seqs):
                if s.wants_input_logprobs:
                    s.input_logprobs = _prompt_logprobs(logits_BTV[i, t - len(prefixes[i]) :], prefixes[i])
        batch = _Batch(
            seqs,
            kv,
            mask_BT,
            mask_BT.sum(-1),
            logits_BTV[:, -1],
            BatchSampling.from_specs([s.item.spec for s in seqs], self.vocab_size),
        )
        done = [i for i, s in enumerate(seqs) if len(s.output_ids) >= s.max_new]
        for i in done:
            self._finish(seqs[i], {"type": "length", "length": seqs[i].max_new})
        keep = [i for i in range(len(seqs)) if i not in set(done)]
        return batch if not done else (batch.select(keep) if keep else None)

    def _stop_reason(self, seq: _Seq, token: int) -> dict[str, Any] | None:
        spec = seq.item.spec
        if (not spec.ignore_eos and token in self.eos_ids) or token in spec.stop_token_ids:
            return {"type": "stop", "matched": token}
        if spec.stop_strs and self.decode is not None:
            text = self.decode(seq.output_ids)
            for stop in spec.stop_strs:
                if stop in text:
                    seq.stop_str = stop
                    return {"type": "stop", "matched": stop}
        if len(seq.output_ids) >= seq.max_new:
            return {"type": "length", "length": seq.max_new}
        return None

    def _decode(self, batch: _Batch) -> _Batch | None:
        """Sample one token per row, retire finished rows, run the next batched forward."""
        tokens_B, logprobs_B, logprobs_BV = sample_next(
            batch.logits_BV, batch.sampling, self.generator, [s.sampling_key() for s in batch.seqs]
        )
        self._sampled += len(batch.seqs)
        keep = []
        for i, (seq, token, logprob) in enumerate(zip(batch.seqs, tokens_B.tolist(), logprobs_B.tolist(), strict=True)):
            seq.output_ids.append(token)
            seq.logprobs.append(logprob)
            if seq.item.top_logprobs_num > 0:
                vals, ids = logprobs_BV[i].topk(min(seq.item.top_logprobs_num, self.vocab_size))
                seq.top.append([(float(v), int(t)) for v, t in zip(vals, ids, strict=True)])
            reason = self._stop_reason(seq, token)
            if reason is None:
                keep.append(i)
            else:
                self._finish(seq, reason)
        if not keep:
            return None
        if len(keep) < len(batch.seqs):
            batch = batch.select(keep)
        ids_B = torch.tensor([s.output_ids[-1] for s in batch.seqs], dtype=torch.long)
        mask_BT = torch.cat([batch.mask_BT, torch.ones(len(batch.seqs), 1, dtype=torch.long)], dim=1)
        if self._lean is not None:
            padded = not bool(mask_BT.all())
            with self.model_lock:
                logits_BV = self._lean(ids_B, batch.next_pos_B, mask_BT if padded else None, batch.kv).float()
            kv = batch.kv
        else:
            logits_BTV, kv = self._forward(ids_B[:, None], mask_BT, batch.next_pos_B[:, None], batch.kv, False)
            logits_BV = logits_BTV[:, -1]
        return _Batch(batch.seqs, kv, mask_BT, batch.next_pos_B + 1, logits_BV, batch.sampling)


def _prompt_logprobs(logits_TV: torch.Tensor, ids: list[int]) -> list[float | None]:
    """log p(ids[t] | ids[:t]) at temperature 1, as SGLang's input_token_logprobs (first is None)."""
    if len(ids) < 2:
        return [None] * len(ids)
    logp_TV = torch.log_softmax(logits_TV[:-1].float(), dim=-1)
    target_T = torch.tensor(ids[1:], dtype=torch.long)
    return [None] + logp_TV.gather(-1, target_T[:, None]).squeeze(-1).tolist()
