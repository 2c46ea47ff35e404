"""A checkpoint's own state is versioned JSON: batches round-trip, old formats are refused clearly."""

from __future__ import annotations

import json

import pytest
import torch

from scope_ds.checkpoint import STATE, STATE_FORMAT, CheckpointError, read_state
from scope_ds.records import Batch, PromptRecord, Rollout


def _batch() -> Batch:
    records = [PromptRecord("p0", "1+1=", "2"), PromptRecord("p1", "2+2=", "4")]
    rollouts = [
        Rollout(
            prompt_id=f"p{i // 2}",
            sample_index=i % 2,
            group_id=f"3:{i // 2}",
            prompt_ids=[1, 5, 6],
            response_ids=[7, 8, 2][: i + 1],
            behaviour_logprobs=[-0.25, -1.5, -0.125][: i + 1],
            finish_reason="stop",
            weight_version=2,
            text="x",
            reward=float(i % 2),
            correct=bool(i % 2),
            teacher_logprobs=[-0.5] * (i + 1),
        )
        for i in range(3)
    ]
    return Batch(step=3, records=records, rollouts=rollouts, times={"generate": 1.0})


def _write_state(folder, **state) -> None:
    folder.mkdir(exist_ok=True)
    (folder / STATE).write_text(json.dumps(state))


def test_pending_batches_round_trip_through_json(tmp_path):
    batch = _batch()
    _write_state(
        tmp_path,
        format=STATE_FORMAT,
        step=3,
        policy_version=3,
        world_size=2,
        pending=[json.loads(json.dumps(batch.to_json()))],
        config={},
    )
    state = read_state(str(tmp_path))
    (back,) = state.pending
    assert (state.step, state.policy_version, state.world_size) == (3, 3, 2)
    assert back.step == 3 and back.records == batch.records
    # everything generated and verified comes back; the teacher's scores are recomputed on resume
    want = [{**r.to_json(), "teacher_logprobs": None} for r in batch.rollouts]
    assert [r.to_json() for r in back.rollouts] == want


def test_a_pickled_state_of_the_old_format_is_refused_by_name(tmp_path):
    torch.save({"step": 1, "pending": []}, tmp_path / "scope_state.pt")
    with pytest.raises(CheckpointError, match="format 1.*scope_state.pt.*convert_ckpt"):
        read_state(str(tmp_path))


def test_another_format_version_is_refused(tmp_path):
    _write_state(tmp_path, format=STATE_FORMAT + 1, step=1, policy_version=1, world_size=1, pending=[], config={})
    with pytest.raises(CheckpointError, match=f"format {STATE_FORMAT + 1}"):
        read_state(str(tmp_path))


def test_a_corrupt_state_names_the_file(tmp_path):
    (tmp_path / STATE).write_text("{not json")
    with pytest.raises(CheckpointError, match=STATE):
        read_state(str(tmp_path))


def _in_flight() -> Batch:
    """A batch caught being generated: one sample part-way, one finished, one not started."""
    batch = _batch()
    first, second, _ = batch.rollouts
    first.finish_reason, first.segments = "abort", [[0, 2]]
    second.segments = [[0, 1], [1, 2]]
    return Batch(step=4, records=batch.records, samples=[[first, None], [second, None]])


def test_a_batch_in_flight_round_trips_with_its_samples_so_far(tmp_path):
    batch = _in_flight()
    state = dict(format=STATE_FORMAT, step=3, policy_version=3, world_size=1, config={})
    _write_state(tmp_path, **state, pending=[_batch().to_json()], in_flight=json.loads(json.dumps(batch.to_json())))
    back = read_state(str(tmp_path)).in_flight
    assert back.step == 4 and back.records == batch.records and back.rollouts == []
    assert [[r and r.to_json() for r in g] for g in back.samples] == [
        [r and r.to_json() for r in g] for g in batch.samples
    ]
    assert back.samples[0][0].segments == [[0, 2]] and back.samples[1][0].behaviour_logprobs == [-0.25, -1.5]


def test_a_batch_in_flight_for_another_step_is_refused(tmp_path):
    state = dict(format=STATE_FORMAT, step=3, policy_version=3, world_size=1, config={})
    _write_state(tmp_path, **state, pending=[], in_flight=_in_flight().to_json())  # step 4, but 3 + 0 pending
    with pytest.raises(CheckpointError, match="in flight is for step 5, not 4"):
        read_state(str(tmp_path))


def test_a_state_without_a_batch_in_flight_reads_as_none(tmp_path):
    _write_state(tmp_path, format=STATE_FORMAT, step=1, policy_version=1, world_size=1, pending=[], config={})
    assert read_state(str(tmp_path)).in_flight is None
