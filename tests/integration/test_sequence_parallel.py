"""Sequence parallelism (issue 35, first part): a packed row split over two ranks with DeepSpeed's
Ulysses attention gives the per-token statistics of the whole row (2 gloo ranks, ZeRO-3)."""

from __future__ import annotations

import pytest
import torch
from train_helpers import REPO, check_ok, launch_ranks, run_env

SP_STEP = REPO / "tests" / "integration" / "sp_step.py"


def test_sequence_parallel_statistics_equal_whole_rows(model_pair, tmp_path) -> None:
    """sp_step.py's rows (rollouts straddling the split, an odd length padded, one long answer, a
    row whose response tokens all lie on rank 1): student log-probs, entropy, the full KL to the
    teacher and the teacher's log-probs of every response token at sp = 2 equal sp = 1's to 1e-5."""
    student, teacher = model_pair
    out = tmp_path / "sp.pt"
    check_ok(launch_ranks(SP_STEP, [student, teacher, out], 2, run_env(), timeout=600))
    saved = torch.load(out)
    assert set(saved) == {"ragged", "odd_length", "one_long", "nothing_on_rank_0"}
    assert saved["odd_length"]["tokens"] % 2 == 1  # padded to split
    for name, case in saved.items():
        mask = case["mask"]
        assert set(case["whole"]) == set(case["split"]) == {"logp", "entropy", "kl", "teacher_logp"}
        for stat, whole in case["whole"].items():
            split = case["split"][stat]
            assert whole.shape == split.shape == mask.shape, (name, stat)
            assert bool((split[~mask] == 0).all()), (name, stat)  # nothing at padding
            torch.testing.assert_close(split[mask], whole[mask], atol=1e-5, rtol=1e-5, msg=f"{name} {stat}")
            assert float(whole[mask].abs().max()) > 0.1, (name, stat)  # real values, not zeros


@pytest.mark.parametrize(
    "heads,kv,size,match",
    [(4, 4, 3, "4 attention heads do not split"), (6, 4, 3, "4 key-value heads neither split")],
)
def test_heads_that_do_not_split_are_refused(heads, kv, size, match) -> None:
    from transformers import LlamaConfig

    from scope_ds.engines.sequence import check_heads

    config = LlamaConfig(hidden_size=8 * heads, num_attention_heads=heads, num_key_value_heads=kv)
    with pytest.raises(ValueError, match=match):
        check_heads(config, size, "m")
    check_heads(LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2), 4, "m")  # kv replicated
