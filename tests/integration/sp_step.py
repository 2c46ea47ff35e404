"""Per-token statistics of packed rows at sequence-parallel size 2 against size 1, on 2 ranks.

    python -m deepspeed.launcher.runner --num_gpus 2 tests/integration/sp_step.py STUDENT TEACHER OUT

Both ranks build the tiny pair twice, as ZeRO-3 inference engines: whole rows (sp = 1) and rows
split over the two ranks (engines/sequence.py, DeepSpeed Ulysses attention). Every case is one
packed micro-batch, run by both; rank 0 saves each case's statistics of both ways into OUT
(torch.save). Read by test_train.py::test_sequence_parallel_statistics_equal_whole_rows.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from scope_ds.engines import ds, sequence  # noqa: E402
from scope_ds.engines.batching import collate_packed  # noqa: E402
from scope_ds.engines.models import InferenceEngine  # noqa: E402
from scope_ds.records import Rollout  # noqa: E402

STATS = {"logp": 0.8, "entropy": 1.0, "kl": 0.8, "teacher_logp": 1.0}
# (prompt length, response length) of each rollout of a case's row
CASES = {
    "ragged": [(5, 17), (3, 2), (9, 30), (4, 11)],  # rollouts straddle the split
    "odd_length": [(4, 8), (6, 7)],  # 25 positions + 1 of padding
    "one_long": [(3, 60)],  # a single answer split in two
    "nothing_on_rank_0": [(40, 3)],  # every response token is scored on rank 1
}


def rows(lengths: list[tuple[int, int]], vocab: int, seed: int) -> list[Rollout]:
    rng = random.Random(seed)
    out = []
    for i, (plen, rlen) in enumerate(lengths):
        out.append(
            Rollout(
                prompt_id=f"p{i}",
                group_id=f"g{i}",
                sample_index=0,
                prompt_ids=[rng.randrange(3, vocab) for _ in range(plen)],
                response_ids=[rng.randrange(3, vocab) for _ in range(rlen)],
                behaviour_logprobs=[-1.0] * rlen,
            )  # fmt: skip
        )
    return out


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local")]
    student_path, teacher_path, out = args[:3]
    rank, world = ds.init_distributed()
    sp = sequence.new_groups(2)
    cfg = ds.build_ds_config("ds_configs/teacher.json", dtype="float32")
    whole = InferenceEngine(student_path, cfg, "float32"), InferenceEngine(teacher_path, cfg, "float32")
    split = InferenceEngine(student_path, cfg, "float32", sp=sp), InferenceEngine(teacher_path, cfg, "float32", sp=sp)
    saved = {}
    for seed, (name, lengths) in enumerate(CASES.items()):
        batch = rows(lengths, whole[0].vocab_size, seed)
        inputs = collate_packed(batch, list(range(len(batch))), pad_id=0)
        with torch.no_grad():
            got = [s.response_stats(inputs, STATS, teacher=t) for s, t in (whole, split)]
        saved[name] = {"whole": got[0], "split": got[1], "mask": inputs.mask_BT, "tokens": inputs.input_ids_1N.shape[1]}
    if rank == 0:
        torch.save(saved, out)
    ds.end_distributed()


if __name__ == "__main__":
    main()
