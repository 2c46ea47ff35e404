"""SCOPE, OPD, GRPO and KD against plain float64 references written here, on fresh random inputs."""

import dataclasses
import math

import pytest
import torch

from scope_ds.algorithms import Path, RolloutStats, TokenBatch, algorithm_options, build_algorithm
from scope_ds.algorithms.losses import importance_ratio, mismatch_stats, truncated_share
from scope_ds.algorithms.weights import group_advantages, ppl_weights

# ---------------------------------------------------------------- random global batches


def make_batch(seed, n_groups=3, n=4, t_max=6, vocab=7, zero_len=False):
    """A random global batch: logits as the 'policy' (so gradients are exact), ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    b = n_groups * n
    lengths = torch.randint(1, t_max + 1, (b,), generator=g)
    if zero_len:
        lengths[1] = 0
    mask = torch.arange(t_max)[None, :] < lengths[:, None]
    logits = torch.randn(b, t_max, vocab, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, vocab, (b, t_max), generator=g)
    old_logits = logits + 0.3 * torch.randn(b, t_max, vocab, generator=g, dtype=torch.float64)
    old_logp = torch.log_softmax(old_logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    teacher = torch.log_softmax(torch.randn(b, t_max, vocab, generator=g, dtype=torch.float64), -1)
    teacher_logp = teacher.gather(-1, tokens[..., None]).squeeze(-1)
    correct = torch.rand(b, generator=g) < 0.5
    correct[:n] = True  # group 0 all correct
    correct[n : 2 * n] = False  # group 1 all wrong
    group = torch.arange(n_groups).repeat_interleave(n) * 10 + 5  # arbitrary ids
    # NaN/inf at padding must never matter
    old_logp = torch.where(mask, old_logp, torch.nan)
    teacher_logp = torch.where(mask, teacher_logp, -torch.inf)
    return dict(
        lengths=lengths,
        mask=mask,
        logits=logits,
        tokens=tokens,
        old_logp=old_logp,
        teacher_logp=teacher_logp,
        teacher=teacher,
        correct=correct,
        group=group,
    )


def seq_sum(t, mask):
    return torch.where(mask, t, torch.zeros_like(t)).sum(-1)


def stats_of(d):
    return RolloutStats(
        group_B=d["group"],
        correct_B=d["correct"],
        lengths_B=d["lengths"],
        student_seq_logp_B=seq_sum(d["old_logp"], d["mask"]),
        teacher_seq_logp_B=torch.where(d["correct"], torch.nan, seq_sum(d["teacher_logp"], d["mask"])),
    )


def policy_logp(logits, tokens):
    return torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)


def run_loss(algo, d, rows, normalizer, plan, logits, **extra):
    b = TokenBatch(
        logp_BT=policy_logp(logits[rows], d["tokens"][rows]),
        old_logp_BT=d["old_logp"][rows],
        mask_BT=d["mask"][rows],
        path_B=plan.path_B[rows],
        weight_B=plan.weight_B[rows],
        advantage_B=None if plan.advantage_B is None else plan.advantage_B[rows],
        teacher_logp_BT=d["teacher_logp"][rows],
        **{k: v[rows] for k, v in extra.items()},
    )
    return algo.loss(b, normalizer)


# ---------------------------------------------------------------- float64 references


def ref_scope_weights(d, tau=1.0, normalization="sum", student="ppl", teacher="ppl"):
    """Eq. 4 / 5 literally: PPL^(+-1/tau) / sum over the subset, one group at a time."""
    s_lp, t_lp = seq_sum(d["old_logp"], d["mask"]), seq_sum(d["teacher_logp"], d["mask"])
    w = [0.0] * len(d["lengths"])
    for gid in d["group"].unique().tolist():
        for is_correct in (True, False):
            idx = [
                i
                for i in range(len(w))
                if d["group"][i] == gid and bool(d["correct"][i]) == is_correct and d["lengths"][i] > 0
            ]
            mode = student if is_correct else teacher
            vals = {}
            for i in idx:
                ppl = math.exp(-float(s_lp[i] if is_correct else t_lp[i]) / int(d["lengths"][i]))
                expo = (1 / tau) if is_correct else (-1 / tau)
                if mode == "reversed":
                    expo = -expo
                vals[i] = 1.0 if mode == "uniform" else ppl**expo
            total = sum(vals.values())
            for i in idx:
                w[i] = vals[i] / total * (len(idx) if normalization == "mean" else 1)
    return torch.tensor(w, dtype=torch.float64)


def ref_scope_loss(d, w, logits, aggregation="seq-sum", factor=None):
    """Eq. 6 token by token; ``factor[i][t]`` (a float) multiplies token t of rollout i when given."""
    lp = policy_logp(logits, d["tokens"])
    total = torch.zeros((), dtype=torch.float64)
    for i in range(len(w)):
        for t in range(int(d["lengths"][i])):
            rho = torch.exp(lp[i, t] - d["old_logp"][i, t])
            f = 1.0 if factor is None else factor[i][t]
            if d["correct"][i]:
                total = total - w[i] * f * rho
            else:
                total = total + w[i] * f * rho * (lp[i, t].detach() - d["teacher_logp"][i, t])
    if aggregation == "seq-sum":
        return total / d["group"].unique().numel()
    return total / int(d["lengths"][w != 0].sum())


# ---------------------------------------------------------------- weights


def test_worked_example_of_scope_md():
    one = torch.zeros(3, dtype=torch.long)
    lengths = torch.tensor([10, 20, 5])
    s = -torch.log(torch.tensor([1.2, 2.6, 3.8], dtype=torch.float64)) * lengths
    t = -torch.log(torch.tensor([4.5, 2.9, 1.7], dtype=torch.float64)) * lengths
    yes = torch.ones(3, dtype=torch.bool)
    w_s = ppl_weights(s, lengths, yes, one, sign=-1.0)
    w_t = ppl_weights(t, lengths, yes, one, sign=+1.0)
    # SCOPE.md prints 0.510 for the last teacher weight; exactly it is 0.5092 (0.5882 / 1.1553)
    torch.testing.assert_close(w_s, torch.tensor([0.158, 0.342, 0.500], dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(w_t, torch.tensor([0.192, 0.298, 0.510], dtype=torch.float64), atol=1e-3, rtol=0)
    assert math.isclose(float(w_t[2]), (1 / 1.7) / (1 / 4.5 + 1 / 2.9 + 1 / 1.7), rel_tol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(tau=0.5),
        dict(tau=2.0, normalization="mean"),
        dict(student_weight="reversed", teacher_weight="uniform"),
        dict(student_weight="uniform", teacher_weight="reversed", normalization="mean"),
    ],
)
def test_scope_plan_matches_reference(seed, opts):
    d = make_batch(seed, n_groups=4, zero_len=seed == 1)
    plan = build_algorithm("scope", opts).plan(stats_of(d))
    ref = ref_scope_weights(
        d,
        opts.get("tau", 1.0),
        opts.get("normalization", "sum"),
        opts.get("student_weight", "ppl"),
        opts.get("teacher_weight", "ppl"),
    )
    torch.testing.assert_close(plan.weight_B, ref)
    assert not plan.weight_B.requires_grad and torch.isfinite(plan.weight_B).all()
    expect_path = torch.where(d["correct"], int(Path.MLE), int(Path.OPD))
    expect_path[d["lengths"] == 0] = int(Path.SKIP)
    assert torch.equal(plan.path_B, expect_path)


def test_edge_cases_all_correct_all_wrong_singleton_and_zero_length():
    d = make_batch(5, n_groups=3, n=4, zero_len=True)
    d["correct"][8:] = torch.tensor([True, False, False, False])  # group 2: a correct subset of one
    plan = build_algorithm("scope").plan(stats_of(d))
    w, p = plan.weight_B, plan.path_B
    assert (p[:4] != Path.OPD).all() and math.isclose(float(w[:4].sum()), 1.0)  # all-correct: MLE only
    assert (p[4:8] == Path.OPD).all() and math.isclose(float(w[4:8].sum()), 1.0)  # all-wrong: OPD only
    assert float(w[8]) == 1.0  # subset of one gets weight 1
    assert float(w[1]) == 0.0 and p[1] == Path.SKIP  # zero-length: no weight, no NaN
    assert math.isclose(float(w[[0, 2, 3]].sum()), 1.0)  # and it does not dilute its subset


def test_grpo_advantages_match_reference():
    g = torch.Generator().manual_seed(11)
    reward = torch.randint(0, 2, (12,), generator=g).double()
    group = torch.arange(3).repeat_interleave(4)
    adv = group_advantages(reward, group)
    for k in range(3):
        r = reward[4 * k : 4 * k + 4].tolist()
        mean = sum(r) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)
        for j in range(4):
            assert math.isclose(float(adv[4 * k + j]), (r[j] - mean) / (std + 1e-6), abs_tol=1e-9)
    torch.testing.assert_close(
        group_advantages(reward, group, std_normalize=False), reward - reward.view(3, 4).mean(1).repeat_interleave(4)
    )


# ---------------------------------------------------------------- losses and gradients


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("aggregation,normalization", [("seq-sum", "sum"), ("token-mean", "mean")])
def test_scope_loss_and_gradient_match_reference(seed, aggregation, normalization):
    d = make_batch(seed)
    algo = build_algorithm("scope", {"aggregation": aggregation, "normalization": normalization})
    stats = stats_of(d)
    plan = algo.plan(stats)
    norm = algo.normalizer(plan, stats)
    z1 = d["logits"].clone().requires_grad_()
    loss, metrics = run_loss(algo, d, slice(None), norm, plan, z1)
    loss.backward()
    z2 = d["logits"].clone().requires_grad_()
    ref = ref_scope_loss(d, ref_scope_weights(d, normalization=normalization), z2, aggregation)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(z1.grad, z2.grad)
    assert math.isclose(metrics["loss/mle"] + metrics["loss/opd"], float(loss.detach()), rel_tol=1e-9, abs_tol=1e-12)


def test_on_policy_gradients_are_nll_and_reverse_kl_policy_gradient():
    """At theta = theta_old: MLE grad = NLL grad; OPD grad = sum_t (log p - log q) grad log p."""
    d = make_batch(4)
    d["old_logp"] = torch.where(d["mask"], policy_logp(d["logits"], d["tokens"]), 0.0)
    algo = build_algorithm("scope")
    plan = algo.plan(stats_of(d))
    z = d["logits"].clone().requires_grad_()
    loss, _ = run_loss(algo, d, slice(None), 1.0, plan, z)
    loss.backward()
    p = torch.softmax(d["logits"], -1)
    onehot = torch.nn.functional.one_hot(d["tokens"], p.shape[-1]).double()
    dlogp_dz = onehot - p  # d log p(a_t) / d z_t
    lp = policy_logp(d["logits"], d["tokens"])
    coef = torch.where(d["correct"][:, None], -torch.ones_like(lp), lp - d["teacher_logp"])  # NLL / k1 advantage
    coef = torch.where(d["mask"], coef * plan.weight_B[:, None], 0.0)
    torch.testing.assert_close(z.grad, coef[..., None] * dlogp_dz)


def test_pi_old_from_the_pass_itself_is_the_on_policy_gradient():
    """old_from_logp_B: rows whose pi_old is the update pass's own log-prob (not recomputed). Their
    old_logp_BT is never read (NaN here); the gradient is the on-policy one of the formula above,
    directly and token by token (token_grad_fn), and other rows keep their recomputed pi_old."""
    d = make_batch(4)
    algo = build_algorithm("scope")
    plan = algo.plan(stats_of(d))
    from_pass = ~d["correct"]
    lp = policy_logp(d["logits"], d["tokens"])
    d_ref = dict(d, old_logp=torch.where(from_pass[:, None] & d["mask"], lp, d["old_logp"]))
    z_ref = d["logits"].clone().requires_grad_()
    ref, _ = run_loss(algo, d_ref, slice(None), 2.0, plan, z_ref)
    ref.backward()
    d_nan = dict(d, old_logp=torch.where(from_pass[:, None], torch.nan, d["old_logp"]))
    z = d["logits"].clone().requires_grad_()
    loss, _ = run_loss(algo, d_nan, slice(None), 2.0, plan, z, old_from_logp_B=from_pass)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(z.grad, z_ref.grad)
    # the incorrect rows alone: on-policy OPD, sum_t w (log p - log q) d log p
    p = torch.softmax(d["logits"], -1)
    dlogp_dz = torch.nn.functional.one_hot(d["tokens"], p.shape[-1]).double() - p
    coef = torch.where(d["mask"] & from_pass[:, None], (lp - d["teacher_logp"]) * plan.weight_B[:, None] / 2.0, 0.0)
    rows = from_pass.nonzero()[:, 0]
    torch.testing.assert_close(z.grad[rows], (coef[..., None] * dlogp_dz)[rows])
    assert algo.reads_student_logp(d["correct"]).tolist() == d["correct"].tolist()
    assert not build_algorithm("scope", {"student_weight": "uniform"}).reads_student_logp(d["correct"]).any()
    assert not build_algorithm("opd").reads_student_logp(d["correct"]).any()


@pytest.mark.parametrize(
    "name,options,scored",
    [
        ("scope", {}, "incorrect"),  # Eq. 3 reads them per token
        ("scope", {"kl": "full"}, "incorrect"),  # Eq. 5's weights read their sums
        ("scope", {"kl": "full", "teacher_weight": "uniform"}, "none"),
        ("opd", {}, "all"),
        ("opd", {"kl": "full"}, "none"),  # uniform weights, and the KL's pass gives the log-probs
        ("grpo", {}, "none"),
    ],
)
def test_the_teacher_scores_before_the_update_only_what_is_read_there(name, options, scored):
    d = make_batch(8)
    algo = build_algorithm(name, options)
    correct = d["correct"].bool()
    want = {"incorrect": ~correct, "all": torch.ones_like(correct), "none": torch.zeros_like(correct)}[scored]
    assert algo.reads_teacher_logp(correct).tolist() == want.tolist()
    assert not bool((algo.reads_teacher_logp(correct) & ~algo.teacher_mask(correct)).any())
    if scored == "none" and algo.needs_teacher:  # and the plan runs without their values
        stats = stats_of(d)
        unscored = torch.full_like(stats.teacher_seq_logp_B, torch.nan)
        plan = algo.plan(dataclasses.replace(stats, teacher_seq_logp_B=unscored))
        assert bool(torch.isfinite(plan.weight_B).all())


def test_full_vocab_kl_path_gradient_is_the_kl_gradient():
    d = make_batch(8)
    d["old_logp"] = torch.where(d["mask"], policy_logp(d["logits"], d["tokens"]), 0.0)
    algo = build_algorithm("opd", {"kl": "full"})
    assert algo.uses_full_kl and bool(algo.teacher_mask(d["correct"]).all())
    stats = stats_of(d)
    plan = algo.plan(stats)
    z = d["logits"].clone().requires_grad_()
    logq = d["teacher"]
    kl = (torch.softmax(z, -1) * (torch.log_softmax(z, -1) - logq)).sum(-1)
    loss, _ = run_loss(algo, d, slice(None), algo.normalizer(plan, stats), plan, z, kl_BT=kl)
    loss.backward()
    z2 = d["logits"].clone().requires_grad_()
    kl2 = (torch.softmax(z2, -1) * (torch.log_softmax(z2, -1) - logq)).sum(-1)
    w = torch.full((12,), 0.25, dtype=torch.float64)  # uniform within groups of 4, sum-normalised
    ref = (w[:, None] * torch.where(d["mask"], kl2, 0.0)).sum() / 3
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(z.grad, z2.grad)


def test_grpo_loss_matches_reference():
    d = make_batch(9)
    ref_logp = torch.where(d["mask"], d["old_logp"] - 0.1, 0.0)
    algo = build_algorithm("grpo", {"kl_coef": 0.05})
    stats = stats_of(d)
    plan = algo.plan(stats)
    z = d["logits"].clone().requires_grad_()
    loss, _ = run_loss(algo, d, slice(None), algo.normalizer(plan, stats), plan, z, ref_logp_BT=ref_logp)
    lp = policy_logp(z, d["tokens"])
    adv = group_advantages(d["correct"].double(), d["group"])
    total, count = 0.0, 0
    for i in range(12):
        for t in range(int(d["lengths"][i])):
            rho = torch.exp(lp[i, t] - d["old_logp"][i, t])
            pg = -torch.minimum(rho * adv[i], rho.clamp(0.8, 1.2) * adv[i])
            x = ref_logp[i, t] - lp[i, t]
            total = total + pg + 0.05 * (torch.exp(x) - x - 1)
            count += 1
    torch.testing.assert_close(loss, total / count)


def test_kd_is_token_mean_nll():
    d = make_batch(10)
    algo = build_algorithm("kd")
    stats = stats_of(d)
    plan = algo.plan(stats)
    loss, _ = run_loss(algo, d, slice(None), algo.normalizer(plan, stats), plan, d["logits"])
    lp = policy_logp(d["logits"], d["tokens"])
    torch.testing.assert_close(loss, -lp[d["mask"]].mean())


def ref_capped_ratio(log_ratio, cap):
    """min(rho, cap) piecewise, which is also its derivative w.r.t. log pi_theta (rho or cap)."""
    return math.exp(log_ratio) if log_ratio <= math.log(cap) else cap


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cap", [1.0, 2.0, 10.0])
def test_capped_ratio_value_and_gradient_match_piecewise_reference(seed, cap):
    g = torch.Generator().manual_seed(100 + seed)
    n = 64
    logp = -5 * torch.rand(n, generator=g, dtype=torch.float64)
    log_ratio = 2 * torch.randn(n, generator=g, dtype=torch.float64)
    log_ratio[:4] = torch.tensor([800.0, -800.0, 50.0, -50.0])  # e^800 overflows float64, e^-800 is 0
    old = logp - log_ratio
    x = logp.clone().requires_grad_()
    rho = importance_ratio(x, old, cap)
    up = torch.randn(n, generator=g, dtype=torch.float64)
    (rho * up).sum().backward()
    rho = rho.detach()
    assert torch.isfinite(rho).all() and torch.isfinite(x.grad).all()
    lrs = [float(logp[k]) - float(old[k]) for k in range(n)]
    for k, lr in enumerate(lrs):
        r = ref_capped_ratio(lr, cap)
        assert math.isclose(float(rho[k]), r, rel_tol=1e-12), (k, lr)
        assert math.isclose(float(x.grad[k]), float(up[k]) * r, rel_tol=1e-12), (k, lr)
    share = truncated_share(logp, old, torch.ones(n, dtype=torch.bool), cap)
    assert math.isclose(float(share), sum(lr > math.log(cap) for lr in lrs) / n)
    # the trainer's log-probs are float32: no overflow there either
    x32 = logp.float().requires_grad_()
    rho32 = importance_ratio(x32, old.float(), cap)
    rho32.sum().backward()
    assert torch.isfinite(rho32).all() and torch.isfinite(x32.grad).all()


def test_truncated_ratio_in_the_loss_matches_reference_value_and_gradient():
    d = make_batch(12)
    cap = 2.0
    algo = build_algorithm("scope", {"is_cap": cap})
    plan = algo.plan(stats_of(d))
    lp0 = policy_logp(d["logits"], d["tokens"])
    g = torch.Generator().manual_seed(120)
    shift = 1.0 + 2 * torch.randn(lp0.shape, generator=g, dtype=torch.float64)  # stale: many rho > cap
    pick = torch.randint(0, 6, lp0.shape, generator=g)
    shift = torch.where(pick == 0, 800.0, torch.where(pick == 1, -800.0, shift))
    d["old_logp"] = torch.where(d["mask"], lp0 - shift, torch.nan)
    z = d["logits"].clone().requires_grad_()
    loss, metrics = run_loss(algo, d, slice(None), 1.0, plan, z)
    loss.backward()
    # reference: value sum_i w_i sum_t c_it min(rho, cap), with c = -1 (MLE) or the detached
    # log-ratio to the teacher (OPD); gradient w_i c_it min(rho, cap) d log p(a_t) / d z_t
    p = torch.softmax(d["logits"], -1)
    onehot = torch.nn.functional.one_hot(d["tokens"], p.shape[-1]).double()
    ref, grad, over, count = 0.0, torch.zeros_like(p), 0, 0
    for i in range(len(d["lengths"])):
        for t in range(int(d["lengths"][i])):
            lr = float(lp0[i, t]) - float(d["old_logp"][i, t])
            c = -1.0 if d["correct"][i] else float(lp0[i, t] - d["teacher_logp"][i, t])
            r = ref_capped_ratio(lr, cap)
            ref += float(plan.weight_B[i]) * c * r
            grad[i, t] = float(plan.weight_B[i]) * c * r * (onehot[i, t] - p[i, t])
            over, count = over + (lr > math.log(cap)), count + 1
    assert math.isclose(float(loss.detach()), ref, rel_tol=1e-9)
    torch.testing.assert_close(z.grad, grad)
    assert math.isclose(metrics["is/truncated_share"], over / count) and over / count > 0.4


def test_mismatch_stats_match_reference():
    g = torch.Generator().manual_seed(21)
    shape = (5, 7)
    mask = torch.rand(shape, generator=g) < 0.7
    mask[:, 0] = True
    old = -4 * torch.rand(shape, generator=g, dtype=torch.float64)
    beh = old + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)
    beh[0, 0], beh[1, 0] = old[0, 0] - 2.0, old[1, 0] + 3.0
    old, beh = torch.where(mask, old, torch.nan), torch.where(mask, beh, -torch.inf)  # padding never counts
    cap = 1.5
    out = mismatch_stats(old, beh, mask, cap)
    abs_sum, k3_sum, capped, n = 0.0, 0.0, 0, 0
    for i in range(shape[0]):
        for t in range(shape[1]):
            if mask[i, t]:
                lr = float(old[i, t]) - float(beh[i, t])
                r = math.exp(lr)  # pi_old / pi_behaviour
                abs_sum, k3_sum, capped, n = abs_sum + abs(lr), k3_sum + (r - 1 - lr), capped + (r > cap), n + 1
    assert set(out) == {"mismatch/abs_log_ratio_sum", "mismatch/k3_sum", "mismatch/capped_tokens", "mismatch/tokens"}
    assert math.isclose(out["mismatch/abs_log_ratio_sum"], abs_sum, rel_tol=1e-12)
    assert math.isclose(out["mismatch/k3_sum"], k3_sum, rel_tol=1e-9)
    assert out["mismatch/capped_tokens"] == capped >= 1 and out["mismatch/tokens"] == n


@pytest.mark.parametrize("aggregation", ["seq-sum", "token-mean"])
def test_recomputed_pi_old_weights_each_token_by_the_truncated_mismatch_ratio(aggregation):
    d = make_batch(16)
    cap = 2.0
    algo = build_algorithm("scope", {"aggregation": aggregation, "mismatch_cap": cap})
    assert algo.old_logprobs == "recompute" and algo.recomputes_old_logprobs
    stats = stats_of(d)
    plan = algo.plan(stats)
    norm = algo.normalizer(plan, stats)
    g = torch.Generator().manual_seed(160)
    log_r = 0.8 * torch.randn(d["mask"].shape, generator=g, dtype=torch.float64)
    pick = torch.randint(0, 6, log_r.shape, generator=g)
    log_r = torch.where(pick == 0, 800.0, torch.where(pick == 1, -800.0, log_r))
    beh = torch.where(d["mask"], d["old_logp"] - log_r, torch.nan)  # log(pi_old / pi_behaviour) = log_r
    z1 = d["logits"].clone().requires_grad_()
    loss, metrics = run_loss(algo, d, slice(None), norm, plan, z1, behaviour_logp_BT=beh)
    loss.backward()
    lrs = [[float(d["old_logp"][i, t]) - float(beh[i, t]) for t in range(int(n))] for i, n in enumerate(d["lengths"])]
    factor = [[ref_capped_ratio(lr, cap) for lr in row] for row in lrs]
    z2 = d["logits"].clone().requires_grad_()
    ref = ref_scope_loss(d, ref_scope_weights(d), z2, aggregation, factor=factor)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(z1.grad, z2.grad)
    assert math.isclose(metrics["loss/mle"] + metrics["loss/opd"], float(loss.detach()), rel_tol=1e-9, abs_tol=1e-12)
    assert metrics["mismatch/capped_tokens"] == sum(lr > math.log(cap) for row in lrs for lr in row) > 0
    assert metrics["mismatch/tokens"] == float(d["mask"].sum()) and "is/truncated_share" in metrics


def test_server_old_logprobs_and_kd_ignore_behaviour_logprobs():
    d = make_batch(17)
    beh = torch.where(d["mask"], d["old_logp"] - 1.0, torch.nan)
    for name, opts in [
        ("scope", {"old_logprobs": "server"}),
        ("grpo", {"old_logprobs": "server", "kl_coef": 0.0}),
        ("kd", {}),
    ]:
        algo = build_algorithm(name, opts)
        assert not algo.recomputes_old_logprobs
        stats = stats_of(d)
        plan = algo.plan(stats)
        norm = algo.normalizer(plan, stats)
        with_b, m_with = run_loss(algo, d, slice(None), norm, plan, d["logits"], behaviour_logp_BT=beh)
        without, m_without = run_loss(algo, d, slice(None), norm, plan, d["logits"])
        assert torch.equal(with_b, without) and m_with == m_without
        assert not any(k.startswith("mismatch/") for k in m_with)
    # recompute without behaviour log-probs given: no correction either; with them it does act
    algo = build_algorithm("scope")
    plan = algo.plan(stats_of(d))
    server, _ = run_loss(build_algorithm("scope", {"old_logprobs": "server"}), d, slice(None), 1.0, plan, d["logits"])
    assert torch.equal(run_loss(algo, d, slice(None), 1.0, plan, d["logits"])[0], server)
    corrected = run_loss(algo, d, slice(None), 1.0, plan, d["logits"], behaviour_logp_BT=beh)[0]
    assert not torch.allclose(corrected, server)


def test_train_temperature_kd_takes_the_nll_at_one_unless_asked():
    for name in ("scope", "opd", "grpo"):
        assert build_algorithm(name).train_temperature(0.6) == 0.6
    assert build_algorithm("kd").train_temperature(0.6) == 1.0
    assert build_algorithm("kd", {"nll_at_rollout_temperature": True}).train_temperature(0.6) == 0.6


@pytest.mark.parametrize(
    "name,opts",
    [("scope", {}), ("scope", {"aggregation": "token-mean"}), ("opd", {}), ("grpo", {"kl_coef": 0.0}), ("kd", {})],
)
@pytest.mark.parametrize("shards", [2, 4])
def test_data_parallel_split_gives_the_same_gradient(name, opts, shards):
    d = make_batch(13, n_groups=4, n=4)
    algo = build_algorithm(name, opts)
    stats = stats_of(d)
    (plan,) = [algo.plan(stats)]
    norm = algo.normalizer(plan, stats)
    z = d["logits"].clone().requires_grad_()
    run_loss(algo, d, slice(None), norm, plan, z)[0].backward()
    whole = z.grad.clone()
    z.grad = None
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(shards))  # shards need not follow groups
    for shard in perm.chunk(shards):
        for micro in shard.chunk(2):  # two micro-batches per rank
            run_loss(algo, d, micro, norm, plan, z)[0].backward()
    torch.testing.assert_close(z.grad, whole)


@pytest.mark.parametrize(
    "name,opts,extra",
    [
        ("scope", {}, "behaviour"),
        ("scope", {}, "from_pass"),
        ("scope", {"aggregation": "seq-mean", "normalization": "mean"}, ""),
        ("scope", {"old_logprobs": "server", "is_cap": 1.5, "aggregation": "token-mean"}, ""),
        ("grpo", {"kl_coef": 0.1}, "ref"),
        ("opd", {"kl": "full"}, "kl"),
        ("kd", {}, ""),
    ],
)
def test_token_by_token_gradient_is_the_micro_batch_losss(name, opts, extra):
    """token_grad_fn (what the fused LM head applies, chunk by chunk over a packed order) against
    autograd of the micro-batch's loss: the same gradient on the logits, every algorithm."""
    d = make_batch(21, n_groups=3, n=4)
    g = torch.Generator().manual_seed(210)
    algo = build_algorithm(name, opts)
    stats = stats_of(d)
    plan = algo.plan(stats)
    norm = algo.normalizer(plan, stats)
    more = {}
    if extra == "behaviour":
        more["behaviour_logp_BT"] = torch.where(
            d["mask"], d["old_logp"] - 0.7 * torch.randn(d["mask"].shape, generator=g, dtype=torch.float64), 0.0
        )
    if extra == "ref":
        more["ref_logp_BT"] = torch.where(d["mask"], d["old_logp"] - 0.2, 0.0)
    if extra == "from_pass":
        more["old_from_logp_B"] = ~d["correct"]

    def kl_of(z):
        return (torch.softmax(z, -1) * (torch.log_softmax(z, -1) - d["teacher"])).sum(-1)

    z = d["logits"].clone().requires_grad_()
    if extra == "kl":
        more["kl_BT"] = kl_of(z)
    loss, _ = run_loss(algo, d, slice(None), norm, plan, z, **more)
    loss.backward()
    m = d["mask"]
    n_tokens = int(m.sum())
    index = torch.zeros(m.shape, dtype=torch.long)
    index[m] = torch.randperm(n_tokens, generator=g)  # a packed order, not the rows' order
    consts = TokenBatch(
        logp_BT=torch.zeros(m.shape, dtype=torch.float64),
        old_logp_BT=d["old_logp"],
        mask_BT=m,
        path_B=plan.path_B,
        weight_B=plan.weight_B,
        advantage_B=plan.advantage_B,
        teacher_logp_BT=d["teacher_logp"],
        **{k: v.detach() for k, v in more.items()},
    )
    grad_fn = algo.token_grad_fn(consts, norm, index, n_tokens)
    logp, kl = policy_logp(d["logits"], d["tokens"]), kl_of(d["logits"])
    flat = {"logp": torch.zeros(n_tokens, dtype=torch.float64), "kl": torch.zeros(n_tokens, dtype=torch.float64)}
    flat["logp"][index[m]], flat["kl"][index[m]] = logp[m], kl[m]
    d_logp, d_kl = torch.zeros(n_tokens, dtype=torch.float64), torch.zeros(n_tokens, dtype=torch.float64)
    for start in range(0, n_tokens, 5):
        rows = slice(start, min(start + 5, n_tokens))
        out = grad_fn(rows, {k: v[rows] for k, v in flat.items() if k == "logp" or extra == "kl"})
        d_logp[rows] = 0.0 if out["logp"] is None else out["logp"]
        if extra == "kl":
            d_kl[rows] = out["kl"]
    up_logp, up_kl = torch.zeros(m.shape, dtype=torch.float64), torch.zeros(m.shape, dtype=torch.float64)
    up_logp[m], up_kl[m] = d_logp[index[m]], d_kl[index[m]]
    z2 = d["logits"].clone().requires_grad_()
    ((up_logp * policy_logp(z2, d["tokens"])).sum() + (up_kl * kl_of(z2)).sum()).backward()
    torch.testing.assert_close(z2.grad, z.grad)


@pytest.mark.parametrize("name,opts", [("scope", {}), ("grpo", {"kl_coef": 0.1}), ("kd", {})])
def test_gradcheck_where_the_loss_value_is_its_own_objective(name, opts):
    """gradcheck needs value and gradient of one function: true for MLE (-rho), GRPO and KD. The
    OPD surrogate's gradient (detached log-ratio) is checked against its formula above instead."""
    d = make_batch(14, n_groups=2, n=3, t_max=4, vocab=5)
    d["correct"][:] = True
    algo = build_algorithm(name, opts)
    plan = algo.plan(stats_of(d))
    ref = torch.where(d["mask"], d["old_logp"] - 0.2, 0.0)

    def f(z):
        extra = {"ref_logp_BT": ref} if name == "grpo" else {}
        return run_loss(algo, d, slice(None), 2.0, plan, z, **extra)[0]

    assert torch.autograd.gradcheck(f, (d["logits"].clone().requires_grad_(),))


# ---------------------------------------------------------------- registry and bad input


def test_registry_names_and_errors():
    assert set(algorithm_options("scope")) >= {"tau", "normalization", "student_weight", "teacher_weight", "kl"}
    with pytest.raises(ValueError, match="unknown algo.name 'ppo'"):
        build_algorithm("ppo")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['taux'\]"):
        build_algorithm("scope", {"taux": 1})
    with pytest.raises(ValueError, match="algo.tau"):
        build_algorithm("scope", {"tau": 0})
    with pytest.raises(ValueError, match="algo.student_weight"):
        build_algorithm("scope", {"student_weight": "upside-down"})
    with pytest.raises(ValueError, match="algo.eps"):
        build_algorithm("grpo", {"eps": "0.2"})
    with pytest.raises(ValueError, match=r"algo.aggregation must be one of \['seq-sum', 'token-mean', 'seq-mean'\]"):
        build_algorithm("kd", {"aggregation": "sum"})


@pytest.mark.parametrize("name", ["scope", "opd", "grpo"])
def test_ratio_options_are_options_of_every_algorithm_that_uses_the_ratio(name):
    opts = algorithm_options(name)
    assert (opts["is_cap"], opts["old_logprobs"], opts["mismatch_cap"]) == (None, "recompute", 2.0)
    assert build_algorithm(name, {"is_cap": 1.5}).is_cap == 1.5
    algo = build_algorithm(name, {"old_logprobs": "server", "mismatch_cap": 3})
    assert (algo.old_logprobs, algo.mismatch_cap) == ("server", 3)
    with pytest.raises(ValueError, match="algo.is_cap must be >= 1 or null, got 0.5"):
        build_algorithm(name, {"is_cap": 0.5})
    with pytest.raises(ValueError, match="algo.mismatch_cap must be >= 1, got 0.5"):
        build_algorithm(name, {"mismatch_cap": 0.5})
    with pytest.raises(ValueError, match="algo.mismatch_cap must be float, got None"):
        build_algorithm(name, {"mismatch_cap": None})
    with pytest.raises(ValueError, match=r"algo.old_logprobs must be one of \['recompute', 'server'\], got 'trainer'"):
        build_algorithm(name, {"old_logprobs": "trainer"})


@pytest.mark.parametrize("option", ["is_cap", "old_logprobs", "mismatch_cap"])
def test_kd_has_no_ratio_options_its_loss_ignores_the_ratio(option):
    assert algorithm_options("kd") == {
        "aggregation": "token-mean",
        "only_correct": False,
        "nll_at_rollout_temperature": False,
    }
    with pytest.raises(ValueError, match=rf"unknown option\(s\) \['{option}'\]"):
        build_algorithm("kd", {option: 2.0})


def test_which_algorithms_need_the_teacher_engine():
    assert [build_algorithm(n).needs_teacher for n in ("scope", "opd", "grpo", "kd")] == [True, True, False, False]
    assert build_algorithm("opd", {"kl": "full"}).needs_teacher


def test_bad_input_names_the_argument():
    d = make_batch(15)
    algo = build_algorithm("scope")
    with pytest.raises(ValueError, match="lengths_B"):
        RolloutStats(group_B=d["group"], correct_B=d["correct"], lengths_B=d["lengths"][:-1])
    with pytest.raises(ValueError, match="lengths_B has negative"):
        RolloutStats(group_B=d["group"], correct_B=d["correct"], lengths_B=d["lengths"] - 10)
    with pytest.raises(ValueError, match="empty batch"):
        RolloutStats(group_B=torch.zeros(0), correct_B=torch.zeros(0), lengths_B=torch.zeros(0))
    bad = stats_of(d)
    bad.teacher_seq_logp_B[~d["correct"]] = torch.nan
    with pytest.raises(ValueError, match="seq_logp_B contains NaN"):
        algo.plan(bad)
    plan = algo.plan(stats_of(d))
    d["old_logp"][0, 0] = torch.inf
    with pytest.raises(ValueError, match="old_logp_BT contains NaN or inf"):
        run_loss(algo, d, slice(None), 1.0, plan, d["logits"])
    with pytest.raises(ValueError, match="teacher_logp_BT has shape"):
        lp = torch.zeros_like(d["old_logp"])
        algo.loss(
            TokenBatch(
                logp_BT=lp,
                old_logp_BT=lp,
                mask_BT=d["mask"],
                path_B=plan.path_B,
                weight_B=plan.weight_B,
                teacher_logp_BT=lp[:, :2],
            ),
            1.0,
        )
    with pytest.raises(ValueError, match="normalizer"):
        from scope_ds.algorithms.losses import aggregate

        aggregate(d["old_logp"], d["mask"], plan.weight_B, "seq-sum", 0.0)
