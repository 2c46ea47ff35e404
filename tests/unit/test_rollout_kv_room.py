"""The embedded server's KV cache layer (rollout/server/engine.py ``_Room``): what transformers'
DynamicLayer would hold after the same appends, without copying the cache at each decode step."""

from __future__ import annotations

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from scope_ds.rollout.server.engine import _kv_of, _Room


def test_appends_equal_concatenation_and_write_in_place_until_the_room_is_full():
    g = torch.Generator().manual_seed(0)
    k0, v0 = torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 5, 4, generator=g)
    room = _Room(k0, v0)
    want_k, want_v = k0, v0
    storage, grew = room.keys.data_ptr(), 0
    for n in [1, 1, 3, 1, 20, 1, 1, 40]:
        k, v = torch.randn(3, 2, n, 4, generator=g), torch.randn(3, 2, n, 4, generator=g)
        capacity = room._k.shape[2]
        got_k, got_v = room.update(k, v)
        want_k, want_v = torch.cat([want_k, k], 2), torch.cat([want_v, v], 2)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
        assert room.get_seq_length() == want_k.shape[2]
        if want_k.shape[2] <= capacity:  # written into the spare positions: the same storage
            assert room.keys.data_ptr() == storage
        else:
            grew += 1
            assert room._k.shape[2] >= 2 * want_k.shape[2] - 1
            storage = room.keys.data_ptr()
    assert grew >= 2  # the sequence above outgrows the room more than once


def test_a_model_decoding_through_rooms_gives_the_plain_caches_logits():
    """Greedy decoding with the cache as rooms equals decoding with transformers' own cache."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    ).eval()
    ids = torch.randint(0, 40, (2, 6))
    with torch.inference_mode():
        plain = model(input_ids=ids, use_cache=True)
        out = model(input_ids=ids, use_cache=True)
        rooms = _kv_of(out.past_key_values)
        assert all(isinstance(r, _Room) for r in rooms)
        for step in range(30):
            nxt = plain.logits[:, -1:].argmax(-1)
            plain = model(input_ids=nxt, past_key_values=plain.past_key_values, use_cache=True)
            cache = DynamicCache(ddp_cache_data=[(None, None)] * len(rooms))
            cache.layers = list(rooms)
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            assert _kv_of(out.past_key_values) == rooms  # the same rooms, written into
            torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=0, msg=f"step {step}")


def test_rows_that_leave_make_room_for_rows_from_the_end_and_the_rest_decode_unchanged():
    """Rows 0 and 2 of 5 finish: row 4 moves into row 0's place, row 3 into row 2's (move_rows,
    as the engine's _Batch.select does), and every kept row's logits stay those of plain decoding."""
    torch.manual_seed(1)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    ).eval()
    ids = torch.randint(0, 40, (5, 4))
    order = list(range(5))
    with torch.inference_mode():
        plain = model(input_ids=ids, use_cache=True)
        rooms = _kv_of(model(input_ids=ids, use_cache=True).past_key_values)
        for step in range(12):
            nxt = plain.logits[:, -1:].argmax(-1)
            plain = model(input_ids=nxt, past_key_values=plain.past_key_values, use_cache=True)
            if step == 3:
                for room in rooms:
                    room.move_rows([(0, 4), (2, 3)], 3)
                order = [4, 1, 3]
            cache = DynamicCache(ddp_cache_data=[(None, None)] * len(rooms))
            cache.layers = list(rooms)
            out = model(input_ids=nxt[order], past_key_values=cache, use_cache=True)
            assert out.logits.shape[0] == len(order)
            torch.testing.assert_close(out.logits, plain.logits[order], rtol=1e-6, atol=1e-6, msg=f"step {step}")
