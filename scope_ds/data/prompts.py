"""Prompt datasets: local JSON / JSONL / parquet files (read here), or a Hugging Face hub name.

Each row becomes a PromptRecord: the prompt is the template filled in (str.format syntax, so literal
braces are doubled: ``"{prompt}\\n\\nPut your final answer within \\\\boxed{{}}."``), the answer is the
row's answer field. A row without an answer (field absent, null or blank) is skipped and counted by
default, or refused with an error that names the row.

Answers: a string is taken stripped; an int or a float becomes its text (a whole float without
".0": 8.0 -> "8"); any other value (a list, a mapping, a bool) is refused with the row named, since
its text would never match what a verifier extracts. A prompt field must be a string.

Local files are read by this module, not by `datasets`, so that a malformed line or a corrupt file
is one DataError naming the file and the line, not a stack of tracebacks from inside `datasets`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from scope_ds.records import PromptRecord

_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_log = logging.getLogger(__name__)


class LoadedPrompts(list[PromptRecord]):
    """The usable records of a dataset, in dataset order, with how many rows were left out.

    A list, so that callers slice and shuffle it like one; the counts ride along for logging.
    """

    def __init__(self, records: list[PromptRecord], n_rows: int, n_skipped: int) -> None:
        super().__init__(records)
        self.n_rows = n_rows  # rows in the dataset split
        self.n_skipped = n_skipped  # rows skipped for lacking an answer (0 when missing_answer="error")


class DataError(ValueError):
    """A dataset that cannot be read or has a row that cannot be used; the message names the file and row."""


class EmptyDatasetError(DataError):
    """The dataset has no rows, or no row with an answer."""


def _local_files(path: Path) -> tuple[str, list[str]]:
    files = sorted(p for p in path.iterdir() if p.suffix in _FORMATS) if path.is_dir() else [path]
    if not files:
        raise EmptyDatasetError(f"dataset folder {str(path)!r} holds no {'/'.join(sorted(_FORMATS))} file")
    kinds = {p.suffix for p in files} if path.is_dir() else {path.suffix}
    if not kinds <= set(_FORMATS) or len({_FORMATS[k] for k in kinds}) != 1:
        raise DataError(
            f"dataset {str(path)!r}: expected .json, .jsonl or .parquet files of one kind, got {sorted(kinds)}"
        )
    return _FORMATS[kinds.pop()], [str(p) for p in files]


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object (one row), got {json.dumps(value)[:80]}")
    return value


def _read_json_rows(file: str) -> list[dict[str, Any]]:
    """A JSON array of objects, or JSON lines (one object a line, blank lines allowed)."""
    try:
        text = Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"dataset file {file!r} cannot be read: {exc}") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"dataset file {file!r} line {exc.lineno}: not valid JSON ({exc.msg})") from None
        return [_object(row, f"dataset file {file!r} item {i}") for i, row in enumerate(rows)]
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"dataset file {file!r} line {lineno}"
        try:
            rows.append(_object(json.loads(line), where))
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno}): {line.strip()[:80]}") from None
    return rows


def _read_parquet_rows(file: str) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(file).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"dataset file {file!r} is not a readable parquet file: {exc}") from None


def load_rows(source: str, split: str = "train") -> list[dict[str, Any]]:
    """The rows behind `source`: a local file or folder when it exists (rows of its files in name
    order), else a hub dataset's `split`. DataError naming the file (and line) it cannot read."""
    path = Path(source).expanduser()
    if path.exists():
        fmt, files = _local_files(path)
        read = _read_parquet_rows if fmt == "parquet" else _read_json_rows
        rows = [row for file in files for row in read(file)]
        if not rows:
            raise EmptyDatasetError(f"dataset {source!r} is empty")
        return rows
    if path.suffix in _FORMATS:
        raise FileNotFoundError(f"dataset file {source!r} does not exist")
    import datasets  # imported here: a second of start-up that toy runs do not need

    try:
        rows = [dict(row) for row in datasets.load_dataset(source, split=split)]
    except Exception as exc:  # the hub's errors do not name what was asked for
        raise DataError(f"cannot load dataset {source!r} split {split!r} from the hub: {exc}") from exc
    if not rows:
        raise EmptyDatasetError(f"dataset {source!r} split {split!r} is empty")
    return rows


def _answer_of(row: dict[str, Any], field: str, where: str) -> str | None:
    """The answer as text under the module's rule; None when absent or blank."""
    value = row.get(field)
    if value is None:
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(
            f"{where}: answer field {field!r} is a {type(value).__name__} ({json.dumps(value, default=str)[:80]}); "
            "answers must be strings or numbers: write it as the text the verifier should match"
        )
    text = str(value).strip()
    return text or None


def _prompt_of(row: dict[str, Any], prompt_key: str, template: str, source: str, index: int) -> str:
    if row.get(prompt_key) is None:
        raise DataError(f"dataset {source!r} row {index} has no prompt field {prompt_key!r}; fields: {sorted(row)}")
    if not isinstance(row[prompt_key], str):
        raise DataError(
            f"dataset {source!r} row {index}: prompt field {prompt_key!r} is a {type(row[prompt_key]).__name__}, "
            "not a string"
        )
    try:
        return template.format(**{**row, "prompt": row[prompt_key]})
    except (KeyError, IndexError) as exc:
        raise DataError(
            f"prompt template {template!r} needs field {exc}, missing in dataset {source!r} row {index}; "
            f"fields: {sorted(row)}"
        ) from exc


def load_prompts(
    source: str,
    split: str = "train",
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    template: str = "{prompt}",
    missing_answer: str = "skip",
    id_key: str | None = None,
) -> LoadedPrompts:
    """Records of every row of `source` that has an answer.

    The prompt is `template` formatted with the row's fields, ``{prompt}`` being the row's
    `prompt_key` field. A row without an answer (field absent, null or blank) is skipped and counted
    when `missing_answer` is "skip", and raises ValueError naming the row when it is "error".
    prompt_id is the row's `id_key` field when given, else "<source name>:<row index>", the same run
    after run. Raises EmptyDatasetError when the dataset has no rows or no row has an answer.
    """
    if missing_answer not in ("skip", "error"):
        raise DataError(f"missing_answer must be 'skip' or 'error', got {missing_answer!r}")
    rows = load_rows(source, split)
    name = Path(source).stem if Path(source).expanduser().exists() else source
    records: list[PromptRecord] = []
    for index, row in enumerate(rows):
        prompt_id = str(row[id_key]) if id_key else f"{name}:{index}"
        answer = _answer_of(row, answer_key, f"dataset {source!r} row {index} (prompt_id {prompt_id})")
        if answer is None:
            if missing_answer == "error":
                raise DataError(f"dataset {source!r} row {index} (prompt_id {prompt_id}) has no {answer_key!r} field")
            continue
        records.append(
            PromptRecord(
                prompt_id=prompt_id, prompt=_prompt_of(row, prompt_key, template, source, index), answer=answer
            )
        )
    skipped = len(rows) - len(records)
    if skipped:
        _log.info("dataset %r: skipped %d of %d rows without %r", source, skipped, len(rows), answer_key)
    if not records:
        raise EmptyDatasetError(
            f"dataset {source!r}: none of its {len(rows)} rows has an answer in field {answer_key!r}; "
            f"fields: {sorted({k for row in rows for k in row})}"
        )
    return LoadedPrompts(records, n_rows=len(rows), n_skipped=skipped)
