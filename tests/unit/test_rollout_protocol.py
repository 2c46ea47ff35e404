"""Client side of SGLang's /generate protocol: request building and answer parsing, no server."""

from __future__ import annotations

import json

import pytest

from scope_ds.records import Rollout
from scope_ds.rollout import protocol
from scope_ds.rollout.protocol import ProtocolError


def answer(prompt_len: int, ids: list[int], lps: list[float], *, reason: str = "length", version: str = "3") -> dict:
    return {
        "text": "x" * len(ids),
        "output_ids": ids,
        "meta_info": {
            "id": f"rid{ids[0] if ids else 0}",
            "prompt_tokens": prompt_len,
            "completion_tokens": len(ids),
            "finish_reason": {"type": reason, "length": len(ids)}
            if reason == "length"
            else {"type": reason, "matched": 2},
            "weight_version": version,
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, ids, strict=True)],
        },
    }


def test_single_prompt_uses_the_flat_form_and_copies_params():
    params = {"temperature": 0.6, "n": 4, "max_new_tokens": 16}
    body = protocol.build_generate_request([[1, 2, 3]], params)
    assert body["input_ids"] == [1, 2, 3]
    assert body["sampling_params"] == params and body["sampling_params"] is not params
    assert body["return_logprob"] is True and body["logprob_start_len"] == -1 and body["stream"] is False
    assert "rid" not in body
    json.dumps(body)  # JSON-ready


def test_batch_uses_the_nested_form_with_rid():
    body = protocol.build_generate_request([[1, 2], [3]], {}, return_logprob=False, rid="r1")
    assert body["input_ids"] == [[1, 2], [3]] and body["rid"] == "r1" and body["return_logprob"] is False


@pytest.mark.parametrize(
    ("prompts", "params", "match"),
    [
        ([], {}, "no prompts"),
        ([[1], []], {}, "prompt 1 is empty"),
        ([[1]], {"seed": 1}, "seed"),
        ([[1]], {"n": 0}, "n must be"),
    ],
)
def test_requests_every_server_refuses_are_refused_before_sending(prompts, params, match):
    with pytest.raises(ProtocolError, match=match):
        protocol.build_generate_request(prompts, params)


def test_answers_are_grouped_prompt_major():
    prompts = [[1, 5, 6], [1, 7]]
    body = [
        answer(3, [10, 11], [-0.1, -0.2]),
        answer(3, [12], [-0.3], reason="stop"),
        answer(2, [13, 14, 15], [-0.4, -0.5, -0.6]),
        answer(2, [16], [-0.7], reason="abort"),
    ]
    groups = protocol.parse_generate_response(body, prompts, 2, server="http://s:1")
    assert [[r.response_ids for r in g] for g in groups] == [[[10, 11], [12]], [[13, 14, 15], [16]]]
    assert [[r.sample_index for r in g] for g in groups] == [[0, 1], [0, 1]]
    assert [r.finish_reason for g in groups for r in g] == ["length", "stop", "length", "abort"]
    first = groups[0][0]
    assert first.prompt_ids == [1, 5, 6] and first.behaviour_logprobs == [-0.1, -0.2]
    assert first.weight_version == 3 and first.server == "http://s:1" and first.request_id == "rid10"
    assert first.text == "xx"


def test_single_object_answer_parses_as_one_group():
    groups = protocol.parse_generate_response(answer(2, [4], [-1.0]), [[1, 2]], 1)
    assert len(groups) == 1 and groups[0][0].response_ids == [4]


def test_without_logprobs_the_logprob_fields_may_be_absent():
    out = answer(2, [4, 5], [-1.0, -2.0])
    del out["meta_info"]["output_token_logprobs"]
    rollout = protocol.parse_generate_response(out, [[1, 2]], 1, return_logprob=False)[0][0]
    assert rollout.behaviour_logprobs == [] and rollout.response_ids == [4, 5]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b.pop(), "expected 2 answers"),
        (lambda b: b[0]["meta_info"]["output_token_logprobs"].pop(), "output_token_logprobs"),
        (lambda b: b[0]["meta_info"]["output_token_logprobs"][0].__setitem__(1, 99), "names token 99"),
        (lambda b: b[1].pop("meta_info"), "without meta_info"),
    ],
)
def test_inconsistent_answers_are_protocol_errors(mutate, match):
    body = [answer(2, [4, 5], [-1.0, -2.0]), answer(2, [6], [-0.5])]
    mutate(body)
    with pytest.raises(ProtocolError, match=match):
        protocol.parse_generate_response(body, [[1, 2]], 2)


def test_weight_version_parsing():
    assert protocol.parse_weight_version("7") == 7
    assert protocol.parse_weight_version(7) == 7
    assert protocol.parse_weight_version("default") == 0  # SGLang's value before any update
    assert protocol.parse_weight_version(None) == 0


def test_error_messages_of_both_error_shapes():
    assert protocol.error_message({"error": {"message": "bad key"}}) == "bad key"
    assert protocol.error_message({"error": "schema failure"}) == "schema failure"
    assert protocol.error_message({"success": False, "message": "no group"}) == "no group"
    assert protocol.error_message("plain text") == "plain text"


def test_logprob_temperature_follows_sglang():
    assert protocol.logprob_temperature(0.6) == 0.6
    assert protocol.logprob_temperature(1.0) == 1.0
    assert protocol.logprob_temperature(0.0) == 1.0  # greedy reports raw log-probs
    assert protocol.logprob_temperature(1e-7) == 1.0


def test_rollout_json_round_trip():
    r = Rollout(prompt_id="p", sample_index=2, prompt_ids=[1], response_ids=[3, 4], behaviour_logprobs=[-1.0, -2.0])
    r.reward, r.correct, r.path, r.weight = 1.0, True, "mle", 0.5
    out = r.to_json()
    assert out["response_length"] == 2 and out["teacher_seq_logp"] is None
    assert Rollout.from_json(json.loads(json.dumps(out))) == r
