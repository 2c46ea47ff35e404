"""Prompt datasets from Hugging Face `datasets`: local JSON / JSONL / parquet files, or a hub name.

Each row becomes a PromptRecord: the prompt is the template filled in (str.format syntax, so literal
braces are doubled: ``"{prompt}\\n\\nPut your final answer within \\\\boxed{{}}."``), the answer is the
row's answer field. A row without an answer (field absent, null or blank) is skipped and counted by
default, or refused with an error that names the row.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from scope_ds.data.record import PromptRecord

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


class EmptyDatasetError(ValueError):
    """The dataset has no rows, or no row with an answer."""


def _local_files(path: Path) -> tuple[str, list[str]]:
    files = sorted(p for p in path.iterdir() if p.suffix in _FORMATS) if path.is_dir() else [path]
    if not files:
        raise EmptyDatasetError(f"dataset folder {str(path)!r} holds no {'/'.join(sorted(_FORMATS))} file")
    kinds = {p.suffix for p in files} if path.is_dir() else {path.suffix}
    if not kinds <= set(_FORMATS) or len({_FORMATS[k] for k in kinds}) != 1:
        raise ValueError(
            f"dataset {str(path)!r}: expected .json, .jsonl or .parquet files of one kind, got {sorted(kinds)}"
        )
    return _FORMATS[kinds.pop()], [str(p) for p in files]


def _has_no_rows(fmt: str, files: list[str]) -> bool:
    # `datasets` fails on empty files with errors that do not say so (StopIteration, ArrowInvalid).
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return all(pq.read_metadata(f).num_rows == 0 for f in files)
    return all(Path(f).read_text().strip() in ("", "[]") for f in files)


def load_rows(source: str, split: str = "train") -> Any:
    """The `datasets.Dataset` behind `source`: a local file or folder when it exists, else a hub name."""
    import datasets  # imported here: a second of start-up that toy runs do not need

    path = Path(source).expanduser()
    if path.exists():
        fmt, files = _local_files(path)
        if _has_no_rows(fmt, files):
            raise EmptyDatasetError(f"dataset {source!r} is empty")
        rows = datasets.load_dataset(fmt, data_files=files, split="train")
    elif path.suffix in _FORMATS:
        raise FileNotFoundError(f"dataset file {source!r} does not exist")
    else:
        try:
            rows = datasets.load_dataset(source, split=split)
        except Exception as exc:  # the hub's errors do not name what was asked for
            raise ValueError(f"cannot load dataset {source!r} split {split!r} from the hub: {exc}") from exc
    if len(rows) == 0:
        raise EmptyDatasetError(f"dataset {source!r} split {split!r} is empty")
    return rows


def _answer_of(row: dict[str, Any], field: str) -> str | None:
    value = row.get(field)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _prompt_of(row: dict[str, Any], prompt_key: str, template: str, source: str, index: int) -> str:
    if row.get(prompt_key) is None:
        raise ValueError(f"dataset {source!r} row {index} has no prompt field {prompt_key!r}; fields: {sorted(row)}")
    try:
        return template.format(**{**row, "prompt": row[prompt_key]})
    except (KeyError, IndexError) as exc:
        raise ValueError(
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
        raise ValueError(f"missing_answer must be 'skip' or 'error', got {missing_answer!r}")
    rows = load_rows(source, split)
    name = Path(source).stem if Path(source).expanduser().exists() else source
    records: list[PromptRecord] = []
    for index, row in enumerate(rows):
        prompt_id = str(row[id_key]) if id_key else f"{name}:{index}"
        answer = _answer_of(row, answer_key)
        if answer is None:
            if missing_answer == "error":
                raise ValueError(f"dataset {source!r} row {index} (prompt_id {prompt_id}) has no {answer_key!r} field")
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
            f"fields: {rows.column_names}"
        )
    return LoadedPrompts(records, n_rows=len(rows), n_skipped=skipped)
