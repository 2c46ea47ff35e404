"""Choice options: written once as ``Literal[...]`` types, checked against that type by one function.

Imports nothing of scope_ds, so that the config and the pure algorithm code (which must not import
the config) share it.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Any, Literal


def literal_values(hint: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` hint; None for any other hint."""
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def check_choice(key: str, value: Any, allowed: Sequence[Any], error: type[Exception] = ValueError) -> None:
    """Raise ``error`` naming ``key`` and the allowed values when ``value`` is not among them."""
    if value not in allowed:
        raise error(f"{key} must be one of {list(allowed)}, got {value!r}")


def check_literal_fields(obj: Any, prefix: str, error: type[Exception] = ValueError) -> None:
    """Check every ``Literal[...]``-typed field of the dataclass instance ``obj`` (keys ``prefix.field``)."""
    for name, hint in typing.get_type_hints(type(obj)).items():
        allowed = literal_values(hint)
        if allowed is not None:
            check_choice(f"{prefix}.{name}", getattr(obj, name), allowed, error)
