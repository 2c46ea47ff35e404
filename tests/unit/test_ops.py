"""scope_ds.ops against plain float64 references, with gradients."""

import pytest
import torch

from scope_ds.ops import chunked_stat, chunked_stats, reverse_kl, token_entropy, token_logprobs


def ref_stats(z, tok, q):
    """Plain float64 reference: log p(tok), entropy, KL(p || q) from whole logits."""
    logp = torch.log_softmax(z.double(), -1)
    p = logp.exp()
    out = {"logp": logp.gather(-1, tok[..., None]).squeeze(-1), "entropy": -(p * logp).sum(-1)}
    if q is not None:
        out["kl"] = (p * (logp - torch.log_softmax(q.double(), -1))).sum(-1)
    return out


@pytest.mark.parametrize("shape,vocab,chunk", [((3, 7), 11, 4), ((2, 5), 50, 3), ((13,), 33, 5), ((2, 3, 4), 9, 7)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_values_and_grads_match_reference_from_logits(shape, vocab, chunk, temperature):
    g = torch.Generator().manual_seed(hash((shape, vocab, chunk)) % 2**31)
    z = torch.randn(*shape, vocab, generator=g) * 3
    q = torch.randn(*shape, vocab, generator=g) * 3
    tok = torch.randint(0, vocab, shape, generator=g)
    up = torch.randn(*shape, generator=g)
    ref = ref_stats(z / temperature, tok, q / temperature)
    for stat in ("logp", "entropy", "kl"):
        zr = z.double().requires_grad_()
        r = ref_stats(zr / temperature, tok, q.double() / temperature)[stat]
        (r * up.double()).sum().backward()
        zc = z.clone().requires_grad_()
        c = chunked_stat(stat, zc, tok, teacher_x=q, temperature=temperature, chunk=chunk)
        assert c.shape == torch.Size(shape) and c.dtype == torch.float32
        torch.testing.assert_close(c.double(), ref[stat], atol=1e-5, rtol=1e-5)
        (c * up).sum().backward()
        torch.testing.assert_close(zc.grad.double(), zr.grad, atol=5e-5, rtol=1e-4)  # float32 inside


@pytest.mark.parametrize("stat", ["logp", "entropy", "kl"])
def test_hidden_states_plus_lm_head_match_reference(stat):
    g = torch.Generator().manual_seed(7)
    n, d, v = 17, 6, 23
    h, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    th, tw = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    tok = torch.randint(0, v, (n,), generator=g)
    up = torch.randn(n, generator=g)
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    r = ref_stats(hr @ wr.t(), tok, th.double() @ tw.double().t())[stat]
    (r * up.double()).sum().backward()
    hc, wc = h.clone().requires_grad_(), w.clone().requires_grad_()
    c = chunked_stat(stat, hc, tok, weight=wc, teacher_x=th, teacher_weight=tw, chunk=4)
    torch.testing.assert_close(c.double(), r.detach(), atol=1e-4, rtol=1e-5)
    (c * up).sum().backward()
    torch.testing.assert_close(hc.grad.double(), hr.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(wc.grad.double(), wr.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("with_weight", [False, True])
def test_several_stats_in_one_pass_at_their_own_temperatures(with_weight):
    """logp and kl (with gradient) at 0.8, entropy (a metric) and the teacher's logp (no gradient)
    at 1.0: values and the gradient of a loss made of two of them, against float64 whole-logits
    references."""
    g = torch.Generator().manual_seed(11)
    n, d, v = 19, 5, 29
    h, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    q = torch.randn(n, v, generator=g) * 2
    tok = torch.randint(0, v, (n,), generator=g)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    zr = hr @ wr.t() if with_weight else (hr @ w.double().t())
    cold, hot = ref_stats(zr / 0.8, tok, q.double() / 0.8), ref_stats(zr.detach(), tok, None)
    ((cold["logp"] * a.double()).sum() + (cold["kl"] * b.double()).sum()).backward()
    hc, wc = h.clone().requires_grad_(), w.clone().requires_grad_()
    x = hc if with_weight else hc @ w.t()
    out = chunked_stats(
        {"logp": 0.8, "entropy": 1.0, "kl": 0.8, "teacher_logp": 1.0},
        x,
        tok,
        weight=wc if with_weight else None,
        teacher_x=q,
        chunk=4,
    )
    teacher = torch.log_softmax(q.double(), -1).gather(-1, tok[:, None]).squeeze(-1)
    assert not out["teacher_logp"].requires_grad
    refs = (("logp", cold["logp"]), ("kl", cold["kl"]), ("entropy", hot["entropy"]), ("teacher_logp", teacher))
    for stat, ref in refs:
        torch.testing.assert_close(out[stat].double(), ref.detach(), atol=1e-4, rtol=1e-5)
    ((out["logp"] * a).sum() + (out["kl"] * b).sum()).backward()
    torch.testing.assert_close(hc.grad.double(), hr.grad, atol=1e-4, rtol=1e-4)
    if with_weight:
        torch.testing.assert_close(wc.grad.double(), wr.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("wanted", [("logp",), ("logp", "kl"), ("entropy",), ("kl", "entropy", "logp")])
def test_a_loss_applied_in_the_forward_pass_matches_autograd_of_the_reference(with_weight, wanted):
    """grad_fn: a non-linear loss of some of the per-token statistics (logp and kl at 0.8, entropy
    at 1.0), its gradient applied chunk by chunk in the forward pass (nothing recomputed in
    backward), against autograd through float64 whole logits. The statistics' values are the
    plain ones; the anchor scales the gradient."""
    g = torch.Generator().manual_seed(13)
    n, d, v = 23, 5, 31
    h, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    q = torch.randn(n, v, generator=g) * 2
    tok = torch.randint(0, v, (n,), generator=g)
    a, b, c = torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g)
    old = torch.randn(n, generator=g) - 3

    def loss_of(values, rows=slice(None)):  # per token: a * exp(logp - old) + b * kl^2 + c * entropy^2
        terms = {
            "logp": lambda x: a[rows].to(x.dtype) * torch.exp(x - old[rows].to(x.dtype)),
            "kl": lambda x: b[rows].to(x.dtype) * x**2,
            "entropy": lambda x: c[rows].to(x.dtype) * x**2,
        }
        return sum(terms[k](values[k]).sum() for k in wanted)

    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    cold = ref_stats((hr @ wr.t()) / 0.8, tok, q.double() / 0.8)
    hot = ref_stats(hr @ wr.t(), tok, None)
    (2.5 * loss_of({"logp": cold["logp"], "kl": cold["kl"], "entropy": hot["entropy"]})).backward()
    calls = []

    def grad_fn(rows, values):
        calls.append(rows)
        mine = {k: values[k].detach().requires_grad_() for k in wanted}
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_of(mine, rows), list(mine.values()))
        return dict(zip(mine, grads, strict=True))

    hc, wc = h.clone().requires_grad_(), w.clone().requires_grad_()
    x = hc if with_weight else hc @ wc.t()
    temps = {"logp": 0.8, "entropy": 1.0, "kl": 0.8, "teacher_logp": 0.8}
    stats = {k: temps[k] for k in dict.fromkeys((*wanted, *temps))}  # in the order of wanted, then the rest
    kw = dict(weight=wc if with_weight else None, teacher_x=q, chunk=4)
    out = chunked_stats(stats, x, tok, grad_fn=grad_fn, **kw)
    assert len(calls) == 6 and calls[-1] == slice(20, 23)  # 23 tokens in chunks of 4
    plain = chunked_stats(stats, x.detach(), tok, **kw)
    for stat in stats:
        torch.testing.assert_close(out[stat], plain[stat], atol=0, rtol=0)
        assert not out[stat].requires_grad
    teacher = torch.log_softmax(q.double() / 0.8, -1).gather(-1, tok[:, None]).squeeze(-1)
    torch.testing.assert_close(out["teacher_logp"].double(), teacher, atol=1e-5, rtol=1e-5)
    (2.5 * out["anchor"] + loss_of(out).detach()).backward()
    torch.testing.assert_close(hc.grad.double(), hr.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(wc.grad.double(), wr.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("stat", ["logp", "entropy", "kl"])
def test_gradcheck_float64(stat):
    """float64 inputs are computed in float64: a true gradcheck, at its default tolerances."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    z = (2 * torch.randn(5, 7, dtype=torch.float64, generator=g)).requires_grad_()
    q = torch.randn(5, 7, dtype=torch.float64, generator=g)
    th, tw = torch.randn(5, 3, dtype=torch.float64, generator=g), torch.randn(7, 3, dtype=torch.float64, generator=g)
    tok = torch.randint(0, 7, (5,), generator=g)

    def from_logits(z_):  # chunks of 2 over 5 tokens: the last one is ragged
        return chunked_stat(stat, z_, tok, teacher_x=q, chunk=2, temperature=0.7)

    def from_hidden(h_, w_):  # the teacher from hidden states plus its own LM head, too
        return chunked_stat(stat, h_, tok, weight=w_, teacher_x=th, teacher_weight=tw, chunk=3, temperature=1.3)

    out = from_logits(z)
    assert out.dtype == torch.float64 and from_hidden(h, w).dtype == torch.float64
    torch.testing.assert_close(out, ref_stats(z / 0.7, tok, q / 0.7)[stat])  # float64 tolerances
    assert torch.autograd.gradcheck(from_logits, (z,))
    assert torch.autograd.gradcheck(from_hidden, (h, w))


def test_bfloat16_inputs_are_computed_in_float32():
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(4, 9, 300, generator=g) * 4).bfloat16()
    tok = torch.randint(0, 300, (4, 9), generator=g)
    out = token_logprobs(z, tok, chunk=5)
    torch.testing.assert_close(out.double(), ref_stats(z.double(), tok, None)["logp"], atol=1e-5, rtol=1e-5)
    assert torch.all(token_entropy(z) >= 0)
    assert torch.allclose(reverse_kl(z, z), torch.zeros(4, 9), atol=1e-5)


def test_bad_input_names_the_argument():
    z = torch.randn(3, 4, 10)
    with pytest.raises(ValueError, match="tokens"):
        token_logprobs(z, torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="teacher_x"):
        chunked_stat("kl", z)
    with pytest.raises(ValueError, match="teacher vocabulary"):
        reverse_kl(z, torch.randn(3, 4, 11))
    with pytest.raises(ValueError, match="stat"):
        chunked_stat("nope", z)
    with pytest.raises(ValueError, match="chunk"):
        token_entropy(z, chunk=0)
    with pytest.raises(ValueError, match="weight"):
        token_logprobs(z, torch.zeros(3, 4, dtype=torch.long), weight=torch.randn(10, 5))
