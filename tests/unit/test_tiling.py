"""parallel.tiled_mlp (engines/tiling.py): DeepSpeed's TiledMLP around each layer's MLP gives the
plain model's logits and gradients, for a row its shards do not divide."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import benchlib  # noqa: E402


@pytest.mark.parametrize("length", [7, 45, 97])
def test_tiled_mlps_give_the_plain_models_logits_and_gradients(length, tmp_path) -> None:
    from deepspeed.runtime.sequence_parallel import ulysses_sp
    from transformers import AutoModelForCausalLM

    from scope_ds.engines import tiling

    folder = benchlib.build_random_model(
        tmp_path / "m", "qwen3", 0, vocab_size=64, hidden_size=16, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128,
    )  # fmt: skip
    plain, tiled = (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64) for _ in range(2))
    assert tiling.tile_mlps(tiled, "m") == 2
    shards = []
    apply = ulysses_sp.TiledMLP.apply

    def counted(fn, module, x, n, params):
        shards.append((x.shape[-2], n))
        return apply(fn, module, x, n, params)

    ids = torch.randint(0, 64, (1, length), generator=torch.Generator().manual_seed(length))
    weights = torch.randn(1, length, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    outs = []
    for model in (plain, tiled):
        ulysses_sp.TiledMLP.apply = counted if model is tiled else apply
        try:
            logits = model(input_ids=ids).logits
        finally:
            ulysses_sp.TiledMLP.apply = apply
        (logits * weights).sum().backward()
        outs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    want = -(-length // 16)  # ceil(N / hidden)
    assert shards == [(-(-length // want) * want, want)] * 2  # padded to a multiple of the shards, each layer
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-12, rtol=1e-10)
    for name, g in outs[0][1].items():
        assert float(g.abs().max()) > 0, name
        torch.testing.assert_close(outs[1][1][name], g, atol=1e-12, rtol=1e-10, msg=name)


def test_a_model_without_mlps_is_refused() -> None:
    from scope_ds.engines import tiling

    class NoMLP(torch.nn.Module):
        config = type("C", (), {"get_text_config": lambda self: type("T", (), {"hidden_size": 8})()})()

    with pytest.raises(
        ValueError, match="m: no decoder layer has an 'mlp' module to tile; set parallel.tiled_mlp=false"
    ):
        tiling.tile_mlps(NoMLP(), "m")
