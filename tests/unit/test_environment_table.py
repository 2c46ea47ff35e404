"""docs/environment.md lists every environment variable once: each SCOPE_DS_* variable that
scope_ds/, slurm/ or tools/ reads or sets has a row in its first table, each row of either table
names a variable that the code still uses, and each file that a row says reads or sets a variable
holds that variable's name."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "environment.md"
CODE_DIRS = ("scope_ds", "slurm", "tools")  # not tests/: a test may set a variable nothing reads
OURS = re.compile(r"SCOPE_DS_[A-Z0-9_]+")
CELL_NAME = re.compile(r"`([A-Z][A-Z0-9_]*)`")  # a variable as the first column writes it
CODE_PATH = re.compile(r"(?<![\w./~-])(?:scope_ds|slurm|tools)/[\w./-]*[\w-]\.(?:py|sh)(?![\w-])")
READ_BY, SET_BY = 1, 2  # the columns that name files


def _code() -> dict[Path, str]:
    files = [p for d in CODE_DIRS for p in (REPO / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return {p: p.read_text(errors="ignore") for p in sorted(files)}


def _tables() -> list[list[list[str]]]:
    """The page's tables in order, each a list of rows (header and separator dropped), each row its
    cells; a row with the wrong number of cells fails here."""
    tables, lines = [], PAGE.read_text().splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("|"):
            i += 1
            continue
        block = []
        while i < len(lines) and lines[i].startswith("|"):
            block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
            i += 1
        header, rows = block[0], block[2:]
        for row in rows:
            assert len(row) == len(header), f"docs/environment.md: row {row[0]} has {len(row)} cells, not {len(header)}"
        tables.append(rows)
    return tables


def _uses(text: str, name: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){name}(?![A-Za-z0-9_])", text) is not None


def test_every_scope_ds_variable_in_the_code_has_exactly_one_row():
    in_code = {m.group(0) for text in _code().values() for m in OURS.finditer(text)}
    first = _tables()[0]
    names = [CELL_NAME.findall(row[0]) for row in first]
    assert [row[0] for row, found in zip(first, names, strict=True) if len(found) != 1] == [], "one variable per row"
    counts = Counter(found[0] for found in names)
    assert sorted(n for n, k in counts.items() if k > 1) == [], "a variable with two rows"
    assert sorted(in_code - set(counts)) == [], "used in the code, no row in docs/environment.md"


def test_every_row_names_a_variable_the_code_still_uses():
    code = "\n".join(_code().values())
    rows = [row for table in _tables() for row in table]
    unused = [n for row in rows for n in CELL_NAME.findall(row[0]) if not _uses(code, n)]
    assert unused == [], "a row in docs/environment.md for a variable that scope_ds/, slurm/ and tools/ no longer use"


def test_each_file_a_row_says_reads_or_sets_a_variable_holds_its_name():
    code = _code()
    wrong = []
    for row in (row for table in _tables() for row in table):
        names = CELL_NAME.findall(row[0])
        for col in (READ_BY, SET_BY):
            for path in CODE_PATH.findall(row[col]):
                text = code.get(REPO / path)
                if text is None or not any(_uses(text, n) for n in names):
                    wrong.append(f"{'/'.join(names)}: {path}")
    assert wrong == []
