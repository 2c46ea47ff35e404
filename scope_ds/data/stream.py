"""Where a run's prompts come from (the config's data section) and the order it trains on them."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

from scope_ds.records import PromptRecord

if TYPE_CHECKING:
    from scope_ds.config import DataConfig


def prompt_source(data: DataConfig) -> tuple[list[PromptRecord], list[PromptRecord], str]:
    """(training prompts, held-out prompts, verifier name) from the data section.

    The held-out prompts are the last ``eval_prompts`` of the source when it evaluates
    (``eval_every``) and has more than that; they are never trained on. The toy source draws its
    held-out prompts from the toy test split instead."""
    if data.source == "toy":
        from scope_ds.toy.task import toy_records

        train = toy_records("train", 4096, seed=data.seed, variant=data.toy_variant)
        held = toy_records("test", data.eval_prompts, seed=data.seed + 1, variant=data.toy_variant)
        return train, held, "toy" if data.verifier == "auto" else data.verifier
    from scope_ds.data.prompts import load_prompts

    loaded = load_prompts(
        data.source,
        split=data.split,
        prompt_key=data.prompt_key,
        answer_key=data.answer_key,
        template=data.template,
        missing_answer=data.missing_answer,
    )
    if data.missing_answer == "skip" and loaded.n_skipped:
        print(f"data: skipped {loaded.n_skipped} of {loaded.n_rows} rows of {data.source} without {data.answer_key!r}")
    records = list(loaded)
    held = records[-data.eval_prompts :] if data.eval_every and len(records) > data.eval_prompts else []
    if held:
        records = records[: -len(held)]
    return records, held, "math" if data.verifier == "auto" else data.verifier


def prompt_stream(records: list[PromptRecord], seed: int, start: int = 0) -> Iterator[PromptRecord]:
    """An endless, seeded, epoch-shuffled stream of prompts; ``start`` skips already-consumed ones.

    Epoch e is a permutation drawn from (seed, e) alone, so a resumed run that passes the number of
    prompts consumed so far as ``start`` continues the very sequence of the uninterrupted run."""
    epoch, pos = divmod(start, len(records))
    while True:
        order = list(range(len(records)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for i in order[pos:]:
            yield records[i]
        epoch, pos = epoch + 1, 0
