"""A decode step for Llama-family models without transformers' per-call machinery.

At small widths a decode step is Python, not arithmetic: transformers' forward builds a 4-D mask,
an output dataclass and a cache object, looks up its attention function and goes through several
wrappers per module, every step (docs/rollout.md measures it). This step computes the same thing
from the same modules, in the same order of operations, for one new token per row: the model's own
norms (their ``forward``, without the module call's hooks) and rotary embedding (its rotary
module, so every rope type it knows, and its modeling file's ``apply_rotary_pos_emb``), the
projections as ``F.linear`` of the modules' weights, the keys and values written into the engine's
rooms, SDPA with the padding mask alone (a lone query attends to every cached position). The
weights are read from the modules at every step, so weights loaded in place (update_weights_*)
take effect at once.

Served only where the layers are laid out as below (Llama, Mistral without a window, Qwen2, Qwen3);
any other model keeps transformers' forward (``LeanDecode.of`` returns None and says why).

Shapes: B = rows, H / K = query / key-value heads, D = head dim, T = cached positions, E = width.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def _why_not(model: torch.nn.Module) -> str | None:
    """Why this step cannot serve ``model`` (None: it can)."""
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        return f"model_type {kind!r} is not one of {', '.join(ARCHITECTURES)}"
    if getattr(config, "sliding_window", None) is not None and (
        kind == "mistral" or any(t != "full_attention" for t in getattr(config, "layer_types", None) or ())
    ):
        return "a sliding attention window"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {config.hidden_act!r}"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    if not hasattr(sys.modules[type(model).__module__], "apply_rotary_pos_emb"):
        return f"no apply_rotary_pos_emb in {type(model).__module__}"
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "no model.{embed_tokens, layers, norm, rotary_emb}"
    for layer in base.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if (
            attn is None
            or mlp is None
            or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))
        ):
            return "a layer without self_attn.{q,k,v,o}_proj"
        if not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            return "a layer without mlp.{gate,up,down}_proj"
        if kind == "qwen3" and not (hasattr(attn, "q_norm") and hasattr(attn, "k_norm")):
            return "a Qwen3 layer without q_norm / k_norm"
    return None


class LeanDecode:
    """One decode step of ``model``: the next-token logits of one new token per row."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.base = model.model
        self.head = model.get_output_embeddings()
        config = model.config
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.qk_norm = config.model_type == "qwen3"  # Qwen3 normalises each head's q and k
        # the model's own rotary application, from its modeling file (each family defines one)
        self.rope = sys.modules[type(model).__module__].apply_rotary_pos_emb

    @classmethod
    def of(cls, model: torch.nn.Module) -> tuple[LeanDecode | None, str | None]:
        """(the step, None) where it can serve ``model``, else (None, the reason)."""
        why = _why_not(model)
        return (None, why) if why else (cls(model), None)

    def __call__(self, ids_B: torch.Tensor, pos_B: torch.Tensor, mask_BT: torch.Tensor | None, kv: list[Any]):
        """Logits [B, V] after feeding token ``ids_B`` at position ``pos_B`` to each row; the rows'
        keys and values are appended to ``kv`` (one room per layer, ``update(k, v)`` -> the whole
        cache). ``mask_BT``: 1 at the cached positions a row attends to, this token's included;
        None when every row attends to all of them."""
        b = ids_B.shape[0]
        x_BE = F.embedding(ids_B, self.base.embed_tokens.weight)
        cos, sin = self.base.rotary_emb(x_BE[:, None], pos_B[:, None])  # [B, 1, D], broadcast over heads
        mask = None if mask_BT is None else mask_BT.bool()[:, None, None, :]
        gqa = self.kv_heads != self.heads
        for layer, room in zip(self.base.layers, kv, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            h_BE = layer.input_layernorm.forward(x_BE)  # the modules' forward: no hooks, no wrappers
            q = F.linear(h_BE, attn.q_proj.weight, attn.q_proj.bias).view(b, self.heads, 1, attn.head_dim)
            k = F.linear(h_BE, attn.k_proj.weight, attn.k_proj.bias).view(b, self.kv_heads, 1, attn.head_dim)
            v = F.linear(h_BE, attn.v_proj.weight, attn.v_proj.bias).view(b, self.kv_heads, 1, attn.head_dim)
            if self.qk_norm:
                q, k = attn.q_norm.forward(q), attn.k_norm.forward(k)
            q, k = self.rope(q, k, cos, sin)
            keys, values = room.update(k, v)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=gqa)
            x_BE = x_BE + F.linear(o.reshape(b, -1), attn.o_proj.weight, attn.o_proj.bias)
            h_BE = layer.post_attention_layernorm.forward(x_BE)
            gate = F.linear(h_BE, mlp.gate_proj.weight, mlp.gate_proj.bias)
            up = F.linear(h_BE, mlp.up_proj.weight, mlp.up_proj.bias)
            x_BE = x_BE + F.linear(F.silu(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)
        return F.linear(self.base.norm.forward(x_BE), self.head.weight, self.head.bias)
