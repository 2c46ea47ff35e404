"""Prompt loading from local JSONL / JSON / parquet files through Hugging Face `datasets`, the data
section's prompt source, and the order of the prompt stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scope_ds.config import DataConfig
from scope_ds.data.prompts import DataError, EmptyDatasetError, load_prompts
from scope_ds.data.stream import prompt_source, prompt_stream
from scope_ds.records import PromptRecord

ROWS = [
    {"question": "1+1?", "answer": "2", "uid": "a"},
    {"question": "2+2?", "uid": "b"},  # no answer field
    {"question": "3+3?", "answer": None, "uid": "c"},  # null answer
    {"question": "4+4?", "answer": 8, "uid": "d"},  # numbers become strings
]
TEMPLATE = "Q: {prompt}\nA:"


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    pd.DataFrame(rows).to_parquet(path)
    return path


def test_jsonl_rows_without_answer_are_skipped_and_counted(tmp_path: Path) -> None:
    loaded = load_prompts(str(_write_jsonl(tmp_path / "set.jsonl", ROWS)), prompt_key="question", template=TEMPLATE)
    assert (loaded.n_rows, loaded.n_skipped) == (4, 2)
    assert [r.prompt for r in loaded] == ["Q: 1+1?\nA:", "Q: 4+4?\nA:"]
    assert [r.answer for r in loaded] == ["2", "8"]
    assert [r.prompt_id for r in loaded] == ["set:0", "set:3"]
    assert isinstance(loaded, list) and loaded[-1:] == [loaded[1]]  # slices like a list


def test_parquet_loads_with_id_field(tmp_path: Path) -> None:
    rows = [{"question": "x?", "answer": "1", "uid": "p1"}, {"question": "y?", "answer": "", "uid": "p2"}]
    loaded = load_prompts(
        str(_write_parquet(tmp_path / "set.parquet", rows)), prompt_key="question", template=TEMPLATE, id_key="uid"
    )
    assert [(r.prompt_id, r.answer) for r in loaded] == [("p1", "1")]
    assert loaded.n_skipped == 1  # a blank answer counts as missing


def test_json_array_and_custom_answer_field(tmp_path: Path) -> None:
    path = tmp_path / "set.json"
    path.write_text(json.dumps([{"problem": "p", "solution": "\\frac{1}{2}"}]))
    loaded = load_prompts(str(path), prompt_key="problem", answer_key="solution", template="{prompt} ({problem})")
    assert loaded[0].prompt == "p (p)"  # other fields of the row are usable in the template too
    assert loaded[0].answer == "\\frac{1}{2}"


def test_missing_answer_refused_by_switch_names_the_row(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "set.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"row 1 \(prompt_id b\).*'answer'"):
        load_prompts(str(path), prompt_key="question", id_key="uid", missing_answer="error")


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("e.json", "[]\n"), ("e.parquet", None)])
def test_empty_dataset_is_a_clear_error(tmp_path: Path, name: str, content: str | None) -> None:
    path = tmp_path / name
    if content is None:
        _write_parquet(path, [{"question": "q", "answer": "a"}][:0])
    else:
        path.write_text(content)
    with pytest.raises(EmptyDatasetError, match="is empty"):
        load_prompts(str(path))


def test_no_row_with_an_answer_is_an_error(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "set.jsonl", [{"question": "q"}])
    with pytest.raises(EmptyDatasetError, match="none of its 1 rows has an answer in field 'answer'"):
        load_prompts(str(path), prompt_key="question")


def test_missing_prompt_field_names_field_and_row(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "set.jsonl", ROWS[:1])
    with pytest.raises(ValueError, match="row 0 has no prompt field 'problem'"):
        load_prompts(str(path), prompt_key="problem")


def test_template_field_missing_names_field_and_row(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "set.jsonl", ROWS[:1])
    with pytest.raises(ValueError, match="'level'.*row 0"):
        load_prompts(str(path), prompt_key="question", template="{prompt} {level}")


def test_bad_missing_answer_switch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing_answer must be 'skip' or 'error'"):
        load_prompts(str(_write_jsonl(tmp_path / "set.jsonl", ROWS)), missing_answer="drop")


def test_missing_local_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_prompts(str(tmp_path / "nope.jsonl"))


def test_folder_of_jsonl_files(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    _write_jsonl(tmp_path / "b.jsonl", ROWS[3:])
    loaded = load_prompts(str(tmp_path), prompt_key="question", template=TEMPLATE)
    assert [r.answer for r in loaded] == ["2", "8"]


def test_a_malformed_jsonl_line_is_one_error_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "set.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n\n{"question": "r", "answer": 2,}\n')
    with pytest.raises(DataError, match=r"set.jsonl' line 3: not valid JSON") as e:
        load_prompts(str(path), prompt_key="question")
    assert e.value.__cause__ is None and "\n" not in str(e.value)  # one line, no chained tracebacks
    path.write_text('{"question": "q", "answer": "1"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"set.jsonl' line 2: expected a JSON object"):
        load_prompts(str(path), prompt_key="question")


def test_a_malformed_json_array_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "set.json"
    path.write_text('[\n {"problem": "p", "answer": "1"},\n {"problem": "q" "answer": "2"}\n]\n')
    with pytest.raises(DataError, match=r"set.json' line 3: not valid JSON"):
        load_prompts(str(path))


def test_a_corrupt_parquet_file_names_the_file(tmp_path: Path) -> None:
    good = _write_parquet(tmp_path / "set.parquet", [{"problem": "p", "answer": "1"}] * 50)
    data = good.read_bytes()
    (tmp_path / "bad.parquet").write_bytes(data[: len(data) // 2])  # a truncated copy
    with pytest.raises(DataError, match=r"dataset file '.*bad.parquet' is not a readable parquet file"):
        load_prompts(str(tmp_path / "bad.parquet"))


@pytest.mark.parametrize("answer", [["1", "2"], {"value": 1}, True])
def test_answers_that_are_not_text_or_numbers_are_refused_naming_the_row(tmp_path: Path, answer) -> None:
    path = _write_jsonl(tmp_path / "set.jsonl", [{"problem": "p", "answer": "1"}, {"problem": "q", "answer": answer}])
    message = rf"row 1 \(prompt_id set:1\): answer field 'answer' is a {type(answer).__name__}"
    with pytest.raises(DataError, match=message):
        load_prompts(str(path), prompt_key="problem")


def test_numeric_answers_become_their_text(tmp_path: Path) -> None:
    rows = [{"problem": "p", "answer": 8.0}, {"problem": "q", "answer": 0.5}, {"problem": "r", "answer": -3}]
    loaded = load_prompts(str(_write_jsonl(tmp_path / "set.jsonl", rows)), prompt_key="problem")
    assert [r.answer for r in loaded] == ["8", "0.5", "-3"]


def test_a_prompt_that_is_not_a_string_is_refused(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "set.jsonl", [{"problem": ["a"], "answer": "1"}])
    with pytest.raises(DataError, match="row 0: prompt field 'problem' is a list"):
        load_prompts(str(path), prompt_key="problem")


def _take(stream, n: int) -> list[str]:
    return [next(stream).prompt_id for _ in range(n)]


def test_prompt_stream_is_seeded_epoch_shuffled_and_resumable() -> None:
    records = [PromptRecord(prompt_id=str(i), prompt=f"q{i}", answer=str(i)) for i in range(10)]
    run = _take(prompt_stream(records, seed=3), 30)
    assert run == _take(prompt_stream(records, seed=3), 30)  # seeded
    assert run != _take(prompt_stream(records, seed=4), 30)
    epochs = [run[i : i + 10] for i in range(0, 30, 10)]
    assert all(sorted(e, key=int) == [r.prompt_id for r in records] for e in epochs)  # each epoch: every prompt once
    assert len({tuple(e) for e in epochs}) == 3  # reshuffled every epoch
    for start in (0, 7, 10, 23):  # a resume continues the uninterrupted sequence, within and across epochs
        assert _take(prompt_stream(records, seed=3, start=start), 30 - start) == run[start:]


def test_prompt_source_holds_out_the_last_prompts_when_evaluating(tmp_path: Path) -> None:
    rows = [{"problem": f"{i}+{i}?", "answer": str(2 * i)} for i in range(6)] + [{"problem": "no answer"}]
    path = str(_write_jsonl(tmp_path / "set.jsonl", rows))
    train, held, verifier = prompt_source(DataConfig(source=path, template="{prompt}", eval_prompts=2, eval_every=0))
    assert ([r.answer for r in train], held, verifier) == (["0", "2", "4", "6", "8", "10"], [], "math")
    train, held, _ = prompt_source(DataConfig(source=path, template="{prompt}", eval_prompts=2, eval_every=5))
    assert [r.answer for r in train] == ["0", "2", "4", "6"] and [r.answer for r in held] == ["8", "10"]
    train, held, verifier = prompt_source(DataConfig(source="toy", eval_prompts=3, verifier="math"))
    assert (len(train), len(held), verifier) == (4096, 3, "math")
    assert all(r.prompt_id.startswith("toy-train:") for r in train)
    assert all(r.prompt_id.startswith("toy-test:") for r in held)  # the toy task's own held-out split
