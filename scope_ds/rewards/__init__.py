"""Verifiers: each maps (response text, reference answer) to a reward of 0.0 or 1.0."""

from __future__ import annotations

from collections.abc import Callable

Verifier = Callable[[str, str], float]


def _toy() -> Verifier:
    from scope_ds.toy.verify import verify_toy

    return verify_toy


def _math() -> Verifier:
    # Imported on demand: math-verify pulls in sympy and its LaTeX parser, seconds of start-up.
    from scope_ds.rewards.math import verify_math

    return verify_math


_REGISTRY: dict[str, Callable[[], Verifier]] = {"toy": _toy, "math": _math}
VERIFIERS = tuple(sorted(_REGISTRY))


def get_verifier(name: str) -> Verifier:
    """The verifier registered as `name`; ValueError listing the known names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown verifier {name!r}; known verifiers: {', '.join(VERIFIERS)}")
    return _REGISTRY[name]()
