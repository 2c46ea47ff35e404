"""The maths of SCOPE and its baselines as pure tensor functions (no I/O, no DeepSpeed)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from scope_ds.algorithms.base import Algorithm, Path, Plan, RolloutStats, TokenBatch
from scope_ds.algorithms.grpo import GRPO
from scope_ds.algorithms.kd import KD
from scope_ds.algorithms.scope import OPD, Scope
from scope_ds.choices import literal_values
from scope_ds.config import AlgoOptions, algo_options_class

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (Scope, OPD, GRPO, KD)}


def algorithm_options(name: str) -> dict[str, Any]:
    """The options of algorithm ``name`` with their defaults."""
    return algo_options_class(name).keys()


def algorithm_of(options: AlgoOptions) -> Algorithm:
    """The algorithm of a config's ``algo`` section (its options, checked by the config's loader)."""
    fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    return _lookup(options.name)(**fields)


def build_algorithm(name: str, options: dict[str, Any] | None = None) -> Algorithm:
    """The algorithm ``name`` ('scope' | 'opd' | 'grpo' | 'kd') with ``options`` checked.

    An unknown name or option, or a bad value, raises ValueError naming it and what is allowed.
    """
    cls = _lookup(name)
    options = dict(options or {})
    allowed = algorithm_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for algo {name!r}; allowed: {sorted(allowed)}")
    hints = typing.get_type_hints(cls)
    for key, value in options.items():
        _check_type(f"algo.{key}", value, hints[key])
    return cls(**options)


def _check_type(key: str, value: Any, hint: Any) -> None:
    # bool is an int in Python: accept it only where a bool is asked for; an int is a fine float.
    # Of a Literal only the type is checked here; the algorithm checks the value (Algorithm.__post_init__).
    choices = literal_values(hint)
    accepted = tuple(dict.fromkeys(map(type, choices))) if choices else typing.get_args(hint) or (hint,)
    ok = any(
        (value is None and t is type(None))
        or (t is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (
            t is not float
            and isinstance(t, type)
            and isinstance(value, t)
            and (t is bool or not isinstance(value, bool))
        )
        for t in accepted
    )
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in accepted)
        raise ValueError(f"{key} must be {names}, got {value!r} ({type(value).__name__})")


def _lookup(name: str) -> type[Algorithm]:
    return ALGORITHMS[algo_options_class(name).name]  # the config's registry names the algorithms


__all__ = [
    "ALGORITHMS",
    "GRPO",
    "KD",
    "OPD",
    "Algorithm",
    "Path",
    "Plan",
    "RolloutStats",
    "Scope",
    "TokenBatch",
    "algorithm_of",
    "algorithm_options",
    "build_algorithm",
]
