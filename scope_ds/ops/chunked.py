"""Memory-lean per-token statistics over a large vocabulary.

Shape legend: N = tokens (flattened batch x time), V = vocabulary, D = hidden size, C = chunk of
tokens. A "logit source" is either logits [N, V] or final hidden states [N, D] plus an LM-head
weight [V, D]; in both cases logits are materialised C tokens at a time, never [N, V] whole in
float32. Backward recomputes each chunk's logits instead of saving them, so the autograd graph
holds only the inputs and one float per token; or, given the loss's per-token gradient
(``grad_fn``), the gradient is applied in the forward pass itself and backward recomputes
nothing. The compute dtype is float32 for bf16/fp16/fp32
inputs and float64 for float64 ones, so that gradcheck checks the ops truly in float64.

Four statistics, each per token, all at a given temperature (logits are divided by it):
- ``logp``:         log p(token)                         (the chosen token's log-prob)
- ``entropy``:      -sum_v p_v log p_v
- ``kl``:           sum_v p_v (log p_v - log q_v)         reverse KL(student || teacher)
- ``teacher_logp``: log q(token)                         (the teacher's, from the same pass as ``kl``)
The teacher side is inference-only: it receives no gradient, and ``teacher_logp`` has none.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

STATS = ("logp", "entropy", "kl", "teacher_logp")
TEACHER_STATS = ("kl", "teacher_logp")  # the statistics that read the teacher
TOKEN_STATS = ("logp", "teacher_logp")  # the statistics that read the sampled tokens
GradFn = Callable[[slice, dict[str, torch.Tensor]], dict[str, torch.Tensor | None]]
CHUNK_BYTES = 32 * 2**20  # logits of one chunk: tokens per chunk = CHUNK_BYTES // (V x bytes per element)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for a float64 input, float32 for any other (bf16/fp16 logits are upcast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dot(a_CV: torch.Tensor, b_CV: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product [C] without a [C, V] temporary."""
    return torch.bmm(a_CV[:, None, :], b_CV[:, :, None]).view(-1)


def _softmax_lse(z_CV: torch.Tensor, p_out: torch.Tensor) -> torch.Tensor:
    """The softmax of ``z`` into ``p_out`` (one fused pass), and returns its normaliser
    lse = log sum_v exp z_v [C], read off the most probable word: lse = max z - log max p
    (max p >= 1/V, so its log is exact to rounding; two max reductions cost less than a pass that
    writes)."""
    torch.ops.aten._softmax.out(z_CV, -1, False, out=p_out)
    return z_CV.amax(-1) - p_out.amax(-1).log()


def _slices(n: int, chunk: int):
    return (slice(s, min(s + chunk, n)) for s in range(0, n, chunk))


class _Chunks:
    """One pass over the chunks of a logit source: each chunk's statistics (forward) and the
    gradient of its logits (backward, or the fused forward), from the normalisers saved per token.

    Several statistics, each at its own temperature, share a chunk: its logits are computed once
    (the LM-head product, the costly part), their softmax once per temperature. Every [C, V]
    tensor of a chunk lives in a workspace allocated once per pass and reused by every chunk
    (``_ws``), so the pass allocates a handful of buffers, not several per chunk: on CPUs each
    fresh allocation of that size is mapped, faulted in page by page and unmapped again."""

    def __init__(self, stats, temps, chunk, x, weight, tokens, t_x, t_weight):
        self.stats, self.temps, self.chunk = stats, temps, chunk
        self.x, self.weight, self.tokens, self.t_x, self.t_weight = x, weight, tokens, t_x, t_weight
        n, self.dt = x.shape[0], _compute_dtype(x)
        self.vocab = x.shape[-1] if weight is None else weight.shape[0]
        self.outs = [torch.empty(n, dtype=self.dt, device=x.device) for _ in stats]
        self.lses = {t: torch.empty(n, dtype=self.dt, device=x.device) for t in set(temps)}
        self.lse_t = {
            t: torch.empty(n, dtype=self.dt, device=x.device)
            for s, t in zip(stats, temps, strict=True)
            if s in TEACHER_STATS
        }
        self._buffers: dict[str, torch.Tensor] = {}

    def _ws(self, name: str, rows: int) -> torch.Tensor:
        """The pass's [rows, V] workspace ``name`` (allocated at the first chunk)."""
        buf = self._buffers.get(name)
        if buf is None:
            size = (min(self.chunk, self.x.shape[0]), self.vocab)
            buf = self._buffers[name] = torch.empty(size, dtype=self.dt, device=self.x.device)
        return buf[:rows]

    def _logits(self, x, weight, sl: slice, name: str) -> torch.Tensor:
        """Untempered logits [C, V] in the compute dtype of rows ``sl``: ``x[sl]`` itself (a view,
        never written), or ``x[sl] @ weight.T`` into workspace ``name``."""
        if weight is None:
            return x[sl] if x.dtype == self.dt else self._ws(name, sl.stop - sl.start).copy_(x[sl])
        out = self._ws(name, sl.stop - sl.start)
        if x.dtype == weight.dtype == self.dt:
            return torch.mm(x[sl], weight.t(), out=out)
        return out.copy_(x[sl] @ weight.t())  # bf16 / fp16 product, upcast

    def _tempered(self, raw: torch.Tensor, t: float, name: str) -> torch.Tensor:
        return raw if t == 1.0 else torch.div(raw, t, out=self._ws(f"{name}@{t}", raw.shape[0]))

    def slices(self):
        """(rows, the student's untempered logits [C, V], the teacher's or None, the tokens or None)."""
        for sl in _slices(self.x.shape[0], self.chunk):
            raw = self._logits(self.x, self.weight, sl, "z")
            raw_q = None if self.t_x is None else self._logits(self.t_x, self.t_weight, sl, "q")
            yield sl, raw, raw_q, None if self.tokens is None else self.tokens[sl]

    def _dkl(self, sl, z, q, t) -> torch.Tensor:
        """log p - log q [C, V] = (z - q) - (lse_z - lse_q), into a workspace."""
        d = torch.sub(z, q, out=self._ws(f"dkl@{t}", z.shape[0]))
        return d.sub_((self.lses[t][sl] - self.lse_t[t][sl])[:, None])

    def values(self, sl, raw, raw_q, tok) -> dict[float, tuple]:
        """The chunk's statistics into ``outs`` (and its normalisers into ``lses`` / ``lse_t``);
        returns, per temperature, (tempered logits, softmax, log p - log q or None) for a gradient
        in the same pass."""
        at = {}
        for t in self.lses:
            z = self._tempered(raw, t, "z")
            p = self._ws(f"p@{t}", z.shape[0])
            lse = self.lses[t][sl] = _softmax_lse(z, p)
            mine = [(i, s) for i, (s, ts) in enumerate(zip(self.stats, self.temps, strict=True)) if ts == t]
            q = None
            if t in self.lse_t:  # the teacher's normaliser, its softmax in the KL's workspace (a scratch here)
                q = self._tempered(raw_q, t, "q")
                self.lse_t[t][sl] = _softmax_lse(q, self._ws(f"dkl@{t}", q.shape[0]))
            d_kl = None
            for i, s in mine:
                if s == "logp":
                    self.outs[i][sl] = z.gather(-1, tok[:, None]).squeeze(-1) - lse
                elif s == "teacher_logp":
                    self.outs[i][sl] = q.gather(-1, tok[:, None]).squeeze(-1) - self.lse_t[t][sl]
                elif s == "entropy":  # -sum p log p, log p = z - lse
                    logp = torch.sub(z, lse[:, None], out=self._ws(f"logp@{t}", z.shape[0]))
                    self.outs[i][sl] = -_dot(p, logp)
                else:
                    d_kl = self._dkl(sl, z, q, t)
                    self.outs[i][sl] = _dot(p, d_kl)
            at[t] = (z, p, d_kl)
        return at

    def logit_grad(self, sl, raw, raw_q, tok, scales: dict[int, torch.Tensor], direct=None, at=None) -> torch.Tensor:
        """sum_i scales[i] x d stat_i / d raw logits [C, V] (into ``direct`` if given, x's own
        gradient rows); ``at``: the chunk's (z, p, log p - log q) per temperature from ``values``
        in the same pass, else recomputed from the saved normalisers. Consumes ``at``'s buffers."""
        rows = raw.shape[0]
        g_CV = direct
        if at is None:  # each temperature's softmax (and log p - log q) once per chunk, for all its terms
            at = {}
            for i in scales:
                t = self.temps[i]
                if t not in at:
                    z = self._tempered(raw, t, "z")
                    at[t] = (z, torch.ops.aten._softmax.out(z, -1, False, out=self._ws(f"p@{t}", rows)), None)
                if self.stats[i] == "kl":
                    at[t] = (*at[t][:2], self._dkl(sl, at[t][0], self._tempered(raw_q, t, "q"), t))
        for n, (i, scale) in enumerate(scales.items()):
            stat, t = self.stats[i], self.temps[i]
            z, p, d_kl = at[t]
            s_C1 = (scale.to(self.dt) / t)[:, None]
            if stat == "logp":  # d log p_k / d z_j = 1[j=k] - p_j
                if g_CV is None:  # the first term: p itself becomes the gradient when no other needs it
                    g_CV = p.mul_(-s_C1) if len(scales) == 1 else torch.mul(p, -s_C1, out=self._ws("g", rows))
                elif n == 0:
                    torch.mul(p, -s_C1, out=g_CV)
                else:
                    g_CV.addcmul_(p, -s_C1)
                g_CV.scatter_add_(-1, tok[:, None], s_C1)
                continue
            if stat == "entropy":  # dH/dz_j = -p_j (log p_j + H)
                term = torch.sub(z, (self.lses[t][sl] - self.outs[i][sl])[:, None], out=self._ws(f"logp@{t}", rows))
                term.mul_(p).mul_(-s_C1)
            else:  # d KL / d z_j = p_j (log p_j - log q_j - KL)
                term = d_kl.sub_(self.outs[i][sl][:, None]).mul_(p).mul_(s_C1)
            if g_CV is None:
                g_CV = term  # in its own workspace, which no later term writes
            elif n == 0:
                g_CV.copy_(term)
            else:
                g_CV.add_(term)
        return g_CV

    def grads(self, need_x: bool, need_w: bool, every_row: bool = False):
        """(d x, d weight) buffers for the chunks' gradients (None where not needed); x's left
        uninitialised where ``every_row`` of it will be written."""
        grad_x = (torch.empty_like(self.x) if every_row else torch.zeros_like(self.x)) if need_x else None
        grad_w = torch.zeros_like(self.weight, dtype=self.dt) if need_w and self.weight is not None else None
        return grad_x, grad_w

    def apply(self, sl, g_CV, grad_x, grad_w) -> None:
        """Chain the chunk's logit gradient to x (and to the LM-head weight)."""
        if self.weight is None:
            if grad_x is not None and g_CV.data_ptr() != grad_x[sl].data_ptr():
                grad_x[sl] = g_CV
            return
        if grad_x is not None:
            if g_CV.dtype == self.weight.dtype == grad_x.dtype:
                torch.mm(g_CV, self.weight, out=grad_x[sl])
            else:
                grad_x[sl] = g_CV.to(self.weight.dtype) @ self.weight
        if grad_w is not None:
            grad_w.addmm_(g_CV.t(), self.x[sl].to(self.dt))

    def direct_into(self, grad_x, sl):
        """Where a lone logp / kl gradient may be written straight: x's own gradient rows, when x
        is the logits in the compute dtype."""
        ok = grad_x is not None and self.weight is None and self.x.dtype == self.dt
        return grad_x[sl] if ok else None


class _ChunkedStats(torch.autograd.Function):
    """The statistics, with a backward that recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, stats, temps, chunk, x, weight, tokens, t_x, t_weight):
        run = _Chunks(stats, temps, chunk, x, weight, tokens, t_x, t_weight)
        for sl, raw, raw_q, tok in run.slices():
            run.values(sl, raw, raw_q, tok)
        ctx.save_for_backward(x, weight, tokens, t_x, t_weight, *run.outs)
        ctx.stats, ctx.temps, ctx.chunk, ctx.lses, ctx.lse_t = stats, temps, chunk, run.lses, run.lse_t
        ctx.set_materialize_grads(False)  # a statistic nobody differentiates gets None: skipped
        ctx.mark_non_differentiable(*[o for s, o in zip(stats, run.outs, strict=True) if s == "teacher_logp"])
        return tuple(run.outs)

    @staticmethod
    def backward(ctx, *grads):
        x, weight, tokens, t_x, t_weight, *outs = ctx.saved_tensors
        run = _Chunks(ctx.stats, ctx.temps, ctx.chunk, x, weight, tokens, t_x, t_weight)
        run.outs, run.lses, run.lse_t = outs, ctx.lses, ctx.lse_t
        wanted = [i for i, g in enumerate(grads) if g is not None and ctx.stats[i] != "teacher_logp"]
        grad_x, grad_w = run.grads(ctx.needs_input_grad[3], ctx.needs_input_grad[4], every_row=bool(wanted))
        if wanted:
            for sl, raw, raw_q, tok in run.slices():
                g_CV = run.logit_grad(
                    sl, raw, raw_q, tok, {i: grads[i][sl] for i in wanted}, run.direct_into(grad_x, sl)
                )
                run.apply(sl, g_CV, grad_x, grad_w)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return None, None, None, grad_x, grad_w, None, None, None


class _FusedStats(torch.autograd.Function):
    """The statistics, and the gradient of a loss of them applied in the same pass: ``grad_fn``
    gives each chunk's d loss / d statistic from its values, so the chunk's logits serve both and
    backward recomputes nothing. Outputs (anchor, *statistics): the statistics carry no gradient;
    the anchor is a zero whose gradient g scales the precomputed ones (add it to the loss)."""

    @staticmethod
    def forward(ctx, stats, temps, chunk, grad_fn, x, weight, tokens, t_x, t_weight):
        run = _Chunks(stats, temps, chunk, x, weight, tokens, t_x, t_weight)
        grad_x, grad_w = run.grads(ctx.needs_input_grad[4], ctx.needs_input_grad[5])
        for sl, raw, raw_q, tok in run.slices():
            at = run.values(sl, raw, raw_q, tok)
            upstream = grad_fn(sl, {s: o[sl] for s, o in zip(stats, run.outs, strict=True)})
            scales = {
                i: upstream[s] for i, s in enumerate(stats) if upstream.get(s) is not None and s != "teacher_logp"
            }
            if scales:
                g_CV = run.logit_grad(sl, raw, raw_q, tok, scales, run.direct_into(grad_x, sl), at)
                run.apply(sl, g_CV, grad_x, grad_w)
        ctx.grad_x, ctx.grad_w = grad_x, None if grad_w is None else grad_w.to(weight.dtype)
        ctx.mark_non_differentiable(*run.outs)
        return (torch.zeros((), dtype=run.dt, device=x.device), *run.outs)

    @staticmethod
    def backward(ctx, g_anchor, *_):
        # in place: the buffers are this pass's own, handed over once
        grad_x = None if ctx.grad_x is None else ctx.grad_x.mul_(g_anchor.to(ctx.grad_x.dtype))
        grad_w = None if ctx.grad_w is None else ctx.grad_w.mul_(g_anchor.to(ctx.grad_w.dtype))
        ctx.grad_x = ctx.grad_w = None
        return None, None, None, None, grad_x, grad_w, None, None, None


def _flatten(name: str, t: torch.Tensor | None, lead: tuple[int, ...] | None) -> torch.Tensor | None:
    if t is None:
        return None
    if lead is not None and tuple(t.shape[: len(lead)]) != lead:
        raise ValueError(f"{name} has leading shape {tuple(t.shape[: len(lead)])}, expected {lead}")
    return t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t


def chunked_stat(
    stat: str,
    x: torch.Tensor,
    tokens: torch.Tensor | None = None,
    *,
    weight: torch.Tensor | None = None,
    teacher_x: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk: int | None = None,
) -> torch.Tensor:
    """Per-token ``stat`` ('logp' | 'entropy' | 'kl' | 'teacher_logp'), shaped like ``x`` minus its last dim; float32,
    or float64 when ``x`` is float64 (then computed in float64 throughout).

    ``x`` is logits [..., V] (``weight`` None) or hidden states [..., D] with ``weight`` [V, D].
    ``tokens`` [...] is needed for 'logp' and 'teacher_logp'; ``teacher_x`` (+ ``teacher_weight``) for
    'kl' and 'teacher_logp'.
    Gradients flow to ``x`` and ``weight``; the teacher is treated as a constant. ``chunk`` is the
    number of tokens whose logits exist at once (default: as many as fit in CHUNK_BYTES).
    """
    out = chunked_stats(
        {stat: temperature},
        x,
        tokens,
        weight=weight,
        teacher_x=teacher_x,
        teacher_weight=teacher_weight,
        chunk=chunk,
    )
    return out[stat]


def chunked_stats(
    stats: dict[str, float],
    x: torch.Tensor,
    tokens: torch.Tensor | None = None,
    *,
    weight: torch.Tensor | None = None,
    teacher_x: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    chunk: int | None = None,
    grad_fn: GradFn | None = None,
) -> dict[str, torch.Tensor]:
    """Several of :func:`chunked_stat`'s statistics in one pass, ``{stat: temperature}`` ->
    ``{stat: values}``: each chunk's logits are computed once (the LM-head product, the costly
    part), their log-softmax once per temperature. Each output has its own gradient; one that
    takes no part in the loss (say the entropy, a metric) costs nothing in backward.

    With ``grad_fn`` the gradient of a loss of the statistics is applied in the same pass (no
    logits recomputed in backward): ``grad_fn(rows, {stat: values [C]})`` returns d loss / d stat
    [C] of those rows (None or absent: no gradient), which must depend on those rows' values only
    (a loss that is a sum of per-token terms). The statistics then carry no gradient; the output
    also holds ``"anchor"``, a zero scalar: backward of ``anchor`` (added to the loss's value)
    applies the precomputed gradients to ``x`` and ``weight``."""
    if not stats or any(s not in STATS for s in stats):
        raise ValueError(f"stats must be some of {STATS}, got {list(stats)}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1 or None, got {chunk}")
    for s, t in stats.items():
        if not t > 0:
            raise ValueError(f"temperature must be > 0, got {t} for {s!r}")
    lead = tuple(x.shape[:-1])
    for s in TOKEN_STATS:
        if s in stats and (tokens is None or tuple(tokens.shape) != lead):
            raise ValueError(
                f"tokens must have shape {lead} for {s!r}, got {None if tokens is None else tuple(tokens.shape)}"
            )
    for s in TEACHER_STATS:
        if s in stats and teacher_x is None:
            raise ValueError(f"teacher_x is required for {s!r}")
    if weight is not None and weight.shape[-1] != x.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected [V, {x.shape[-1]}]")
    x_N = _flatten("x", x, lead)
    t_N = _flatten("teacher_x", teacher_x, lead)
    tok_N = None if tokens is None else tokens.reshape(-1).long()
    if t_N is not None:
        t_N = t_N.detach()
        vocab_s = x.shape[-1] if weight is None else weight.shape[0]
        vocab_t = teacher_x.shape[-1] if teacher_weight is None else teacher_weight.shape[0]
        if vocab_s != vocab_t:
            raise ValueError(f"teacher vocabulary {vocab_t} differs from the student's {vocab_s}")
    t_w = None if teacher_weight is None else teacher_weight.detach()
    vocab = x.shape[-1] if weight is None else weight.shape[0]
    chunk = chunk or max(1, CHUNK_BYTES // (_compute_dtype(x).itemsize * vocab))
    names = tuple(stats)
    temps = tuple(float(stats[s]) for s in names)
    if grad_fn is None:
        outs = _ChunkedStats.apply(names, temps, chunk, x_N, weight, tok_N, t_N, t_w)
        return {s: o.reshape(lead) for s, o in zip(names, outs, strict=True)}
    anchor, *outs = _FusedStats.apply(names, temps, chunk, grad_fn, x_N, weight, tok_N, t_N, t_w)
    return {"anchor": anchor, **{s: o.reshape(lead) for s, o in zip(names, outs, strict=True)}}


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, **kw) -> torch.Tensor:
    """log p(tokens) from logits [..., V]; see :func:`chunked_stat`."""
    return chunked_stat("logp", logits, tokens, **kw)


def token_entropy(logits: torch.Tensor, **kw) -> torch.Tensor:
    """Entropy of each position's distribution from logits [..., V]."""
    return chunked_stat("entropy", logits, **kw)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, **kw) -> torch.Tensor:
    """Full-vocabulary KL(student || teacher) per position; gradient only to the student."""
    return chunked_stat("kl", student_logits, teacher_x=teacher_logits, **kw)
