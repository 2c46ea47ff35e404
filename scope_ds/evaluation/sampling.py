"""Sample n responses per prompt through the rollout servers and verify them.

Shared by ``python -m scope_ds.evaluate`` and the trainer's in-training evaluation: both pass a
:class:`~scope_ds.rollout.client.SyncRolloutClient` and a tokenizer, so nothing here knows about
DeepSpeed, the run or the pipeline. Prompts are tokenised here (the chat template when the
tokenizer has one, through scope_ds.data.encoding like the trainer's) and sent as token ids.
"""

from __future__ import annotations

import concurrent.futures
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from scope_ds.data import encoding
from scope_ds.evaluation.estimators import avg_at_k, k_values, pass_at_k
from scope_ds.records import PromptRecord
from scope_ds.rollout.client import RolloutAbortedError, RolloutServerError, SyncRolloutClient

if TYPE_CHECKING:
    from scope_ds.records import Rollout

Verifier = Callable[[str, str], float]


@dataclass
class EvalSample:
    """One verified response; a line of OUT/samples_*.jsonl."""

    prompt_id: str  # the benchmark's id of the prompt
    sample: int  # index among the prompt's n samples
    answer: str  # reference answer
    text: str  # decoded response (special tokens skipped), what the verifier read
    correct: bool  # verifier reward == 1
    response_length: int  # response tokens, including a matched EOS / stop token
    finish_reason: str  # "stop" or "length" (truncated at max_new_tokens or the context)
    weight_version: int = 0  # the policy version of the server that generated it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def eval_sampling_params(
    tokenizer: Any, temperature: float = 0.6, top_p: float = 0.95, top_k: int = 20, max_new_tokens: int = 12288
) -> dict[str, Any]:
    """SGLang sampling params of the paper's evaluation (docs/algorithms.md), stopping at the tokenizer's EOS."""
    return encoding.sampling_params(tokenizer, temperature, top_p, top_k, max_new_tokens)


def prompt_seed(seed: int, prompt_id: str, n: int) -> int:
    """First sampling_seed of a prompt's n samples (sample j uses it + j).

    A hash of the prompt id rather than its position, so that --limit, a reordered file or another
    benchmark list leaves every prompt's samples as they were; the same seed at every evaluation
    of a training run compares checkpoints on the same random draws (less noise in the curves).
    """
    return zlib.crc32(f"{seed}:{prompt_id}".encode()) % (2**31 - n)  # + j stays a positive int32


def _resolve(verifier: Verifier | str) -> Verifier:
    if isinstance(verifier, str):
        from scope_ds.rewards import get_verifier

        return get_verifier(verifier)
    return verifier


def sample_and_verify(
    client: SyncRolloutClient,
    tokenizer: Any,
    records: Sequence[PromptRecord],
    verifier: Verifier | str,
    n: int,
    params: dict[str, Any],
    *,
    chat_template: bool = True,
    progress: Any = None,
    seed: int | None = None,
) -> list[list[EvalSample]]:
    """``n`` verified samples per record, groups in record order.

    Every prompt's request is in flight at once (the servers batch them); responses are decoded and
    verified in this thread as they arrive, which keeps math-verify's timeouts working (they need
    the main thread) and overlaps verification with generation. ``progress`` (a tqdm bar, or None)
    advances by n per finished prompt. With ``seed``, every sample has its own sampling_seed
    (:func:`prompt_seed`), so results do not depend on batching (SGLang honours it only with
    --enable-deterministic-inference). A failing prompt cancels the rest and raises
    RolloutServerError naming it.
    """
    verify = _resolve(verifier)
    prompts = [encoding.encode_prompt(tokenizer, r.prompt, chat_template) for r in records]
    futures = {}
    for i, (ids, record) in enumerate(zip(prompts, records, strict=True)):
        first = None if seed is None else prompt_seed(seed, record.prompt_id, n)
        call = client.client.generate(ids, params, n=n, prompt_id=record.prompt_id, return_logprob=False, seed=first)
        futures[client.submit(call)] = i
    groups: list[list[EvalSample] | None] = [None] * len(records)
    try:
        for future in concurrent.futures.as_completed(futures):
            index = futures[future]
            record = records[index]
            try:
                rollouts = future.result()
            except RolloutAbortedError:
                raise  # names the prompt already
            except RolloutServerError as exc:
                raise RolloutServerError(
                    exc.url, exc.status, f"prompt {record.prompt_id!r}: {exc.message}", exc.attempts
                ) from exc
            groups[index] = [_verified(tokenizer, verify, record, rollout, j) for j, rollout in enumerate(rollouts)]
            if progress is not None:
                progress.update(n)
    finally:
        for future in futures:
            future.cancel()  # no-op for finished ones; stops the rest after an error
    return groups  # type: ignore[return-value]


def _verified(tokenizer: Any, verify: Verifier, record: PromptRecord, rollout: Rollout, index: int) -> EvalSample:
    encoding.decode_and_verify(tokenizer, rollout, record.answer, verify)
    return EvalSample(
        prompt_id=record.prompt_id,
        sample=index,
        answer=record.answer,
        text=rollout.text,
        correct=rollout.correct,
        response_length=len(rollout.response_ids),
        finish_reason=rollout.finish_reason,
        weight_version=rollout.weight_version,
    )


def metrics_from_samples(
    groups: Sequence[Sequence[EvalSample]], prefix: str = "eval", ks: Sequence[int] | None = None
) -> dict[str, float]:
    """Flat metrics for a metrics.jsonl line: accuracy (= avg@n), avg@n, pass@k (unbiased) for each
    k (default 1, 2, 4, ..., n), mean response length and the share of truncated responses."""
    correct = [[s.correct for s in g] for g in groups]
    n = min(len(g) for g in groups)
    samples = [s for g in groups for s in g]
    avg = avg_at_k(correct)
    out = {f"{prefix}/accuracy": avg, f"{prefix}/avg@{n}": avg}
    for k in ks if ks is not None else k_values(n):
        out[f"{prefix}/pass@{k}"] = pass_at_k(correct, k)
    out[f"{prefix}/response_length_mean"] = sum(s.response_length for s in samples) / len(samples)
    out[f"{prefix}/truncated_share"] = sum(s.finish_reason == "length" for s in samples) / len(samples)
    out[f"{prefix}/weight_version"] = min(s.weight_version for s in samples)  # what was evaluated
    return out


def evaluate_records(
    client: SyncRolloutClient,
    tokenizer: Any,
    records: Sequence[PromptRecord],
    verifier: Verifier | str,
    n: int,
    sampling_params: dict[str, Any],
    *,
    prefix: str = "eval",
    chat_template: bool = True,
    ks: Sequence[int] | None = None,
    seed: int | None = None,
) -> dict[str, float]:
    """Held-out evaluation for the training loop: {"<prefix>/accuracy", "<prefix>/avg@n",
    "<prefix>/pass@k" ..., "<prefix>/response_length_mean", "<prefix>/truncated_share"}.

    Uses whatever weights the client's servers hold now; generates without log-probs. Pure of the
    trainer: the caller passes its client, tokenizer, records (prompts before the chat template),
    verifier (callable or registered name) and sampling params (``max_new_tokens`` included).
    Pass the same ``seed`` at every evaluation to sample each checkpoint with the same per-sample
    seeds (see :func:`sample_and_verify`). Returns {} for no records.
    """
    if not records:
        return {}
    groups = sample_and_verify(
        client, tokenizer, records, verifier, n, sampling_params, chat_template=chat_template, seed=seed
    )
    return metrics_from_samples(groups, prefix=prefix, ks=ks)
