"""The tools' options: what the evaluation command and the rollout server take, read as the trainer
reads its config.

A tool's options are a typed dataclass whose fields document themselves in comments. The command
line takes a ``--config`` YAML file, ``key=value`` overrides and a ``--flag`` per field (the flags
users already call), values typed and checked by the config's own ``coerce``, and ``--help``
written from the comments.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import typing
from typing import Any

from scope_ds.choices import literal_values
from scope_ds.config import ConfigError, coerce, read_recipe, read_value


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its comment in ``cls``'s source: the comment lines just above it and the one on
    its line (dataclass fields document themselves that way here)."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    docs = {}
    for name, line in _annotated_fields(source):
        text = comments.get(line, "")
        above, i = [], line - 1
        while i >= 1 and lines[i - 1].strip().startswith("#"):
            above.insert(0, comments.get(i, ""))
            i -= 1
        docs[name] = " ".join([*above, text]).strip()
    return docs


def _annotated_fields(source: str) -> list[tuple[str, int]]:
    """(name, line) of each annotated attribute of the first class in ``source``."""
    tree = ast.parse(textwrap.dedent(source))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    return [
        (n.target.id, n.lineno) for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    ]


def options_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser for the options dataclass ``cls``: ``--config FILE``, ``key=value``
    overrides, and a ``--flag`` per field (``--no-flag`` for a bool that is on by default;
    repeatable for a list). Flags not given are absent from the namespace."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="Every option is also a key=value override (YAML-typed) and a key of the --config YAML file; "
        "flags and overrides win over the file (a flag over an override of the same key).",
    )
    p.add_argument("--config", help="a YAML file of options (keys as the field names below)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="options as key=value")
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        hint, flag, doc = hints[f.name], "--" + f.name.replace("_", "-"), docs.get(f.name, "")
        keep = {"dest": f.name, "default": argparse.SUPPRESS}
        if hint is bool:
            if f.default is True:
                p.add_argument("--no-" + flag[2:], action="store_false", help=f"{doc} (on; this turns it off)", **keep)
            else:
                p.add_argument(flag, action="store_true", help=doc, **keep)
        elif typing.get_origin(hint) is list:
            p.add_argument(flag, action="append", help=f"{doc} (repeatable)", **keep)
        else:
            choices = literal_values(hint)
            default = "" if f.default is dataclasses.MISSING else f" (default: {f.default})"
            p.add_argument(flag, choices=choices, help=doc + default, **keep)
    return p


def load_options(cls: type, argv: list[str] | None, prog: str, description: str) -> Any:
    """``cls`` from the command line (see options_parser), checked (its ``check()``, if any); a bad
    value exits with argparse's one-line error naming the option."""
    p = options_parser(cls, prog, description)
    args = vars(p.parse_intermixed_args(sys.argv[1:] if argv is None else argv))
    config = args.pop("config")
    try:
        values = read_recipe(config) if config else {}
        for item in args.pop("overrides"):
            if "=" not in item:
                raise ConfigError(f"{item!r}: an option is key=value or --flag VALUE")
            key, raw = item.split("=", 1)
            values[key.strip()] = raw
        values.update(args)
        return _build_options(cls, values)
    except ConfigError as e:
        p.error(str(e))


def _build_options(cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; allowed: {sorted(f.name for f in dataclasses.fields(cls))}")
    kwargs = {k: coerce(k, read_value(v, hints[k]) if isinstance(v, str) else v, hints[k]) for k, v in values.items()}
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in kwargs
    ]
    if missing:
        raise ConfigError("missing " + ", ".join(f"--{n.replace('_', '-')}" for n in missing))
    out = cls(**kwargs)
    if hasattr(out, "check"):
        out.check()
    return out
