"""Evaluation benchmarks: the six math sets of the paper and the toy task, as PromptRecords.

A math benchmark comes from its usual Hugging Face dataset (online only) or from a local JSON /
JSONL / parquet file with a question and an answer field. Its prompt is the question followed by
SCOPE's suffix, "Put your final answer within \\boxed{}." (the trainer's default template too), and
its answers are checked by the math verifier. The toy benchmark is the toy task's held-out split,
prompted exactly as in training and checked by the toy verifier.

Unlike training data, a benchmark row without a question or an answer is an error, never skipped:
a silently smaller benchmark would change the figures it is compared by.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from scope_ds.records import PromptRecord

PROMPT_SUFFIX = "Put your final answer within \\boxed{}."
# Field names tried in order when a spec does not name one; the usual sets use one of these.
QUESTION_FIELDS = ("question", "problem", "prompt", "Question", "Problem")
ANSWER_FIELDS = ("answer", "final_answer", "Answer", "expected_answer")
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
TOY = "toy"


class BenchmarkError(ValueError):
    """A benchmark that cannot be loaded; the message names the benchmark and the file or row."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where one benchmark comes from and how its rows read."""

    name: str  # the name in reports and sample files
    source: str  # Hugging Face dataset name, local file path, or "toy"
    split: str = "test"  # hub split (local files have one)
    config: str | None = None  # hub configuration name, if the dataset has several
    question_field: str | None = None  # None: the first of QUESTION_FIELDS present in the rows
    answer_field: str | None = None  # None: the first of ANSWER_FIELDS present in the rows

    @property
    def verifier(self) -> str:
        return TOY if self.source == TOY else "math"


# The usual hub copies (fields auto-detected: question/problem, answer/final_answer). Each can be
# replaced by another hub name or a local file: --source NAME=SOURCE.
HUB_BENCHMARKS: dict[str, BenchmarkSpec] = {
    "aime24": BenchmarkSpec("aime24", "HuggingFaceH4/aime_2024", split="train"),
    "aime25": BenchmarkSpec("aime25", "math-ai/aime25"),
    "amc23": BenchmarkSpec("amc23", "math-ai/amc23"),
    "math500": BenchmarkSpec("math500", "HuggingFaceH4/MATH-500"),
    "minerva": BenchmarkSpec("minerva", "math-ai/minervamath"),
    "olympiadbench": BenchmarkSpec("olympiadbench", "math-ai/olympiadbench"),
}
KNOWN_BENCHMARKS = (*HUB_BENCHMARKS, TOY)


@dataclass(frozen=True)
class Benchmark:
    """A loaded benchmark: its records in dataset order and how to verify them."""

    name: str
    records: list[PromptRecord]
    verifier: str  # name for scope_ds.rewards.get_verifier
    source: str  # where the records came from (for the report)


def parse_source(name: str, source: str, question_field: str | None, answer_field: str | None) -> BenchmarkSpec:
    """A spec from ``SOURCE``: a local file, ``toy``, or a hub name as ``REPO[@CONFIG][:SPLIT]``."""
    if source == TOY or Path(source).suffix in LOCAL_SUFFIXES or Path(source).expanduser().exists():
        return BenchmarkSpec(name, source, question_field=question_field, answer_field=answer_field)
    repo, _, split = source.partition(":")
    repo, _, config = repo.partition("@")
    base = HUB_BENCHMARKS.get(name, BenchmarkSpec(name, repo))
    return replace(
        base,
        source=repo,
        split=split or base.split,
        config=config or None,
        question_field=question_field or base.question_field,
        answer_field=answer_field or base.answer_field,
    )


def parse_benchmarks(
    text: str,
    sources: dict[str, str] | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
) -> list[BenchmarkSpec]:
    """Specs for a comma-separated list of known names and ``NAME=SOURCE`` entries.

    ``sources`` maps known names to another source (``--source NAME=SOURCE``). Unknown names,
    duplicates and an empty list raise BenchmarkError listing what is known.
    """
    sources = dict(sources or {})
    specs: list[BenchmarkSpec] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, eq, source = item.partition("=")
        name = name.strip()
        if eq:
            specs.append(parse_source(name, source.strip(), question_field, answer_field))
        elif name in sources:
            specs.append(parse_source(name, sources.pop(name), question_field, answer_field))
        elif name == TOY:
            specs.append(BenchmarkSpec(TOY, TOY))
        elif name in HUB_BENCHMARKS:
            base = HUB_BENCHMARKS[name]
            specs.append(replace(base, question_field=question_field, answer_field=answer_field))
        else:
            raise BenchmarkError(
                f"unknown benchmark {name!r}; known: {', '.join(KNOWN_BENCHMARKS)} (or NAME=FILE for a local "
                f"{'/'.join(LOCAL_SUFFIXES)} file)"
            )
    if sources:
        raise BenchmarkError(f"--source given for benchmarks not asked for: {', '.join(sorted(sources))}")
    if not specs:
        raise BenchmarkError("no benchmark given")
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BenchmarkError(f"benchmark named twice: {', '.join(dupes)}")
    return specs


def math_prompt(question: str) -> str:
    """The question, a blank line, the suffix: the text the trainer's default data.template gives."""
    return f"{question.strip()}\n\n{PROMPT_SUFFIX}"


def read_local_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a local JSON (a list of objects), JSONL (an object per line) or parquet file."""
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise BenchmarkError(f"benchmark file {str(path)!r} {state}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow's errors are many; all mean "not a readable parquet file"
            raise BenchmarkError(f"benchmark file {str(path)!r} is not a readable parquet file: {exc}") from exc
    elif path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                rows.append(_json(line, f"{path} line {number}"))
    elif path.suffix == ".json":
        rows = _json(path.read_text(encoding="utf-8"), str(path))
        if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
            rows = next(iter(rows.values()))  # {"test": [...]} or {"data": [...]}
        if not isinstance(rows, list):
            raise BenchmarkError(f"benchmark file {str(path)!r}: expected a JSON list of objects")
    else:
        raise BenchmarkError(f"benchmark file {str(path)!r}: expected a {', '.join(LOCAL_SUFFIXES)} file")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BenchmarkError(f"benchmark file {str(path)!r} row {index}: expected an object, got {row!r:.80}")
    return rows


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"benchmark file {where}: not valid JSON ({exc})") from exc


def read_hub_rows(spec: BenchmarkSpec) -> list[dict[str, Any]]:
    """The rows of a Hugging Face dataset split; needs the network (or a populated HF cache)."""
    import datasets  # a second of import that local files do not need

    try:
        rows = datasets.load_dataset(spec.source, spec.config, split=spec.split)
    except Exception as exc:  # offline, unknown name, unknown split: the hub's messages do not name the benchmark
        raise BenchmarkError(
            f"benchmark {spec.name!r}: cannot load {spec.source!r} (split {spec.split!r}) from the Hugging Face "
            f"hub: {type(exc).__name__}: {str(exc)[:300]}. Offline, give a local copy: --source {spec.name}=FILE.jsonl"
        ) from exc
    return [dict(row) for row in rows]


def answer_text(value: Any) -> str | None:
    """A reference answer as a string: lists of one item unwrapped, whole floats without '.0'."""
    if isinstance(value, (list, tuple)):
        items = [t for t in (answer_text(v) for v in value) if t]
        return ", ".join(items) if items else None
    if value is None:
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _field(rows: list[dict[str, Any]], wanted: str | None, candidates: tuple[str, ...], what: str, where: str) -> str:
    present = set(rows[0])
    if wanted is not None:
        if wanted not in present:
            raise BenchmarkError(f"{where}: no {what} field {wanted!r}; fields: {sorted(present)}")
        return wanted
    for name in candidates:
        if name in present:
            return name
    raise BenchmarkError(
        f"{where}: no {what} field (tried {', '.join(candidates)}); fields: {sorted(present)}. "
        f"Name it with --{what}-field"
    )


def records_from_rows(rows: list[dict[str, Any]], spec: BenchmarkSpec, where: str) -> list[PromptRecord]:
    """One record per row, prompt = question + suffix; BenchmarkError naming the row if one is incomplete."""
    if not rows:
        raise BenchmarkError(f"{where}: no rows")
    q_field = _field(rows, spec.question_field, QUESTION_FIELDS, "question", where)
    a_field = _field(rows, spec.answer_field, ANSWER_FIELDS, "answer", where)
    records = []
    for index, row in enumerate(rows):
        question = row.get(q_field)
        answer = answer_text(row.get(a_field))
        if not isinstance(question, str) or not question.strip() or answer is None:
            missing = a_field if answer is None else q_field
            raise BenchmarkError(f"{where} row {index}: empty or missing {missing!r}")
        prompt = math_prompt(question)
        records.append(PromptRecord(prompt_id=f"{spec.name}:{index}", prompt=prompt, answer=answer))
    return records


def load_benchmark(
    spec: BenchmarkSpec,
    toy_prompts: int = 128,
    toy_seed: int = 0,
    limit: int | None = None,
    toy_variant: str = "chain",
) -> Benchmark:
    """Load one benchmark; ``limit`` keeps its first prompts (smoke runs), ``toy_*`` pick the toy
    split's size, seed and task variant."""
    if spec.source == TOY:
        from scope_ds.toy.task import toy_records

        records = toy_records("test", toy_prompts, seed=toy_seed, variant=toy_variant)
        variant = "" if toy_variant == "chain" else f", variant {toy_variant}"
        where = f"toy test split ({toy_prompts} prompts, seed {toy_seed}{variant})"
    elif Path(spec.source).suffix in LOCAL_SUFFIXES or Path(spec.source).expanduser().exists():
        path = Path(spec.source).expanduser()
        where = f"benchmark {spec.name!r} file {str(path)!r}"
        records = records_from_rows(read_local_rows(path), spec, where)
    else:
        where = f"{spec.source} split {spec.split}"
        records = records_from_rows(read_hub_rows(spec), spec, f"benchmark {spec.name!r} ({where})")
    if limit is not None:
        records = records[:limit]
    return Benchmark(name=spec.name, records=records, verifier=spec.verifier, source=where)
