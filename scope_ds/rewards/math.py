"""Math verifier on top of math-verify: the response's \\boxed{} answer against the reference answer.

math-verify bounds its parsing and comparison time with SIGALRM, which only the main thread may set;
elsewhere (a server's worker threads) it would raise, so there we run it without its timeout and rely
on the broad except below. Any failure counts as a wrong answer: a reward must never crash a run.
"""

from __future__ import annotations

import logging
import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

TIMEOUT_S = 5  # per parse and per comparison, main thread only

# The answer field of a dataset may be bare ("0.5", "\\frac{1}{2}") or already boxed or in $...$.
_GOLD_CONFIG = [LatexExtractionConfig(), ExprExtractionConfig()]
# A response must box its answer: a bare last number in the text is not taken as the answer.
_PRED_CONFIG = [LatexExtractionConfig(boxed_match_priority=0)]


def _timeout() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _parse_gold(answer: str, timeout: int | None) -> list:
    # A bare answer ("1+x^2") is wrapped in $...$: left bare, the expression extractor takes its last
    # number ("2") for the answer.
    text = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"
    gold = parse(text, extraction_config=_GOLD_CONFIG, parsing_timeout=timeout)
    return gold or parse(answer, extraction_config=_GOLD_CONFIG, parsing_timeout=timeout)


def verify_math(response: str, answer: str) -> float:
    """1.0 when the response's last \\boxed{} answer is mathematically equal to `answer`, else 0.0.

    Only the last box counts (earlier ones are drafts); math-verify would otherwise read several
    boxes as a set of answers. No \\boxed{} in the response, an unparsable answer, a timeout or any exception all give 0.0.
    """
    last_box = response.rfind("\\boxed")
    if last_box < 0:
        return 0.0
    timeout = _timeout()
    try:
        gold = _parse_gold(answer, timeout)
        predicted = parse(response[last_box:], extraction_config=_PRED_CONFIG, parsing_timeout=timeout)
        if not gold or not predicted:
            return 0.0
        return float(verify(gold, predicted, timeout_seconds=timeout))
    except Exception as exc:  # noqa: BLE001 - timeouts and sympy errors alike mean "not verified"
        logging.getLogger(__name__).debug("math verification failed: %r", exc)
        return 0.0
