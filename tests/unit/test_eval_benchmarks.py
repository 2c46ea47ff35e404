"""Benchmark specs and loaders: names, local JSON / JSONL / parquet files, field detection, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scope_ds.data.benchmarks import (
    HUB_BENCHMARKS,
    PROMPT_SUFFIX,
    BenchmarkError,
    BenchmarkSpec,
    answer_text,
    load_benchmark,
    parse_benchmarks,
)

ROWS = [{"problem": "What is 1+1?", "answer": ["2"]}, {"problem": "Half of 1?", "answer": ["\\frac{1}{2}"]}]


def _write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_parse_known_names_files_and_sources(tmp_path: Path) -> None:
    specs = parse_benchmarks("aime24, math500,toy")
    assert [s.name for s in specs] == ["aime24", "math500", "toy"]
    assert specs[0] == HUB_BENCHMARKS["aime24"] and specs[2].verifier == "toy" and specs[0].verifier == "math"
    local = _write(tmp_path / "mine.jsonl", ROWS)
    spec = parse_benchmarks(f"mine={local}", answer_field="answer")[0]
    assert spec == BenchmarkSpec("mine", str(local), answer_field="answer")
    # --source swaps a known benchmark's origin: a local file, or a hub name with config and split.
    assert parse_benchmarks("amc23", {"amc23": str(local)})[0].source == str(local)
    hub = parse_benchmarks("aime25", {"aime25": "opencompass/AIME2025@AIME2025-I:test"})[0]
    assert (hub.source, hub.config, hub.split) == ("opencompass/AIME2025", "AIME2025-I", "test")


@pytest.mark.parametrize(
    ("text", "sources", "message"),
    [
        ("aime24,aime2099", None, "unknown benchmark 'aime2099'; known: aime24, aime25"),
        ("toy,toy", None, "named twice: toy"),
        (" , ", None, "no benchmark given"),
        ("toy", {"math500": "x.jsonl"}, "not asked for: math500"),
    ],
)
def test_parse_refusals(text: str, sources: dict | None, message: str) -> None:
    with pytest.raises(BenchmarkError, match=message):
        parse_benchmarks(text, sources)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_local_files_load_with_suffix_and_ids(tmp_path: Path, suffix: str) -> None:
    path = _write(tmp_path / f"set{suffix}", ROWS)
    bench = load_benchmark(BenchmarkSpec("set", str(path)))
    assert bench.verifier == "math" and len(bench.records) == 2
    first, second = bench.records
    assert first.prompt == f"What is 1+1?\n\n{PROMPT_SUFFIX}" and first.answer == "2"
    assert first.prompt_id == "set:0" and second.answer == "\\frac{1}{2}"  # a list of one answer unwrapped
    assert len(load_benchmark(BenchmarkSpec("set", str(path)), limit=1).records) == 1


def test_json_wrapped_in_one_key_and_named_fields(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"test": [{"q": "2+3?", "final": 5.0, "answer": "ignored"}]}))
    bench = load_benchmark(BenchmarkSpec("w", str(path), question_field="q", answer_field="final"))
    assert bench.records[0].answer == "5"  # a whole float reads as an integer


def test_toy_benchmark_is_the_held_out_split() -> None:
    bench = load_benchmark(BenchmarkSpec("toy", "toy"), toy_prompts=5, toy_seed=1)
    assert bench.verifier == "toy" and len(bench.records) == 5
    assert all(r.prompt_id.startswith("toy-test:") and r.prompt.startswith("Compute ") for r in bench.records)
    assert PROMPT_SUFFIX not in bench.records[0].prompt  # prompted as the toy models were trained


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"question": "a", "answer": "1"}\n{"question": \n', "bad.jsonl line 2: not valid JSON"),
        ("bad.json", '{"question": "a"', "bad.json: not valid JSON"),
        ("scalar.json", '"just a string"', "expected a JSON list of objects"),
        ("list.jsonl", '["a", "1"]\n', "row 0: expected an object"),
        ("fields.jsonl", '{"text": "a", "answer": "1"}\n', "no question field .*fields: \\['answer', 'text'\\]"),
        ("blank.jsonl", '{"question": "a", "answer": "1"}\n{"question": "b", "answer": " "}\n', "row 1: empty or missing 'answer'"),
        ("empty.jsonl", "\n", "no rows"),
        ("bad.parquet", "not parquet", "not a readable parquet file"),
        ("data.csv", "question,answer\n", "expected a .json, .jsonl, .parquet file"),
    ],
)  # fmt: skip
def test_malformed_files_are_refused_by_name(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(BenchmarkError, match=message) as info:
        load_benchmark(BenchmarkSpec("mine", str(path)))
    assert name in str(info.value)


def test_missing_file_and_named_field_absent(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError, match="does not exist"):
        load_benchmark(parse_benchmarks(f"x={tmp_path / 'nope.jsonl'}")[0])
    path = _write(tmp_path / "set.jsonl", ROWS)
    with pytest.raises(BenchmarkError, match="no answer field 'solution'"):
        load_benchmark(BenchmarkSpec("set", str(path), answer_field="solution"))


def test_answer_text() -> None:
    assert answer_text(["$1$", "$2$"]) == "$1$, $2$"
    assert answer_text(27.0) == "27" and answer_text(0.5) == "0.5" and answer_text(3) == "3"
    assert answer_text(None) is None and answer_text("  ") is None and answer_text([]) is None
