"""The docs do not rot: every path they cite exists, every docs page the code cites exists, no docs
page is an orphan, and every benchmark block has the form tools/benchlib.py regenerates."""

from __future__ import annotations

import datetime
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CODE_DIRS = ("scope_ds", "tools", "slurm", "tests")

# A repository path as the docs write it, from the repository root: a docs page, a tool, a recipe,
# a module, a SLURM file, a DeepSpeed config, a test (globs allowed). Not preceded by a path
# character, so that ~/.cache/scope_ds/... or a URL's .../docs/x.md is not read as one.
_START = r"(?<![\w./~-])"
REPO_PATH = re.compile(
    _START + r"(?:docs/[\w./-]*[\w-]\.md|tools/[\w./-]*[\w-]\.(?:py|sh)|recipes/[\w./-]*[\w-]\.yaml"
    r"|scope_ds/[\w./-]*[\w-]\.py|slurm/[\w./-]*[\w-]|ds_configs/[\w./-]*[\w-]\.(?:json|md)"
    r"|tests/[\w./*-]*[\w*-]\.py)(?![\w-])"
)
DOCS_PAGE = re.compile(_START + r"docs/[\w./-]*[\w-]\.md(?![\w-])")
# [text](target) and ![alt](target), with an optional "title"
MD_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# a path whose file name is a stand-in (recipes/X.yaml, docs/PAGE.md), not a file
PLACEHOLDERS = {"X", "N", "PAGE", "FILE", "NAME", "DIR", "PATH", "RECIPE", "STUDY"}
BLOCK_MARKER = re.compile(r"^<!-- bench:(?P<name>[^ ]+) (?P<kind>start|end) -->$")
BLOCK_HEADER = re.compile(r"^`(?P<command>[^`]+)` · (?P<date>\d{4}-\d{2}-\d{2}) · (?P<machine>\S.*)$")


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _placeholder(path: str) -> bool:
    return Path(path).name.split(".")[0] in PLACEHOLDERS


def _exists(path: str) -> bool:
    return any(REPO.glob(path)) if "*" in path else (REPO / path).exists()


def _outside_fences(text: str) -> str:
    """The text with fenced code blocks blanked (line numbers kept): headings there are not headings."""
    return re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.M | re.S)


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a page: lower case, punctuation dropped, spaces to hyphens, -1, -2
    for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", _outside_fences(page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(page: Path) -> list[tuple[int, str, Path, str]]:
    """(line, as written, the file it points at, its #fragment) of each relative markdown link."""
    text = page.read_text()
    out = []
    for m in MD_LINK.finditer(text):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        out.append((_line(text, m.start()), target, (page.parent / path).resolve() if path else page, fragment))
    return out


def _cited_pages(page: Path) -> set[Path]:
    """The docs pages a page cites: markdown links to them and docs/X.md written out anywhere."""
    text = page.read_text()
    cited = {(REPO / m.group(0)).resolve() for m in DOCS_PAGE.finditer(text)}
    cited |= {target for _, _, target, _ in _links(page) if target.suffix == ".md"}
    return cited - {page.resolve()}


# --------------------------------------------------------------------------- (a) docs -> repo


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_in_the_docs_reaches_a_file_and_its_heading(page):
    broken = []
    for line, written, target, fragment in _links(page):
        if not target.exists():
            broken.append(f"{_rel(page)}:{line}: [{written}] -> no such file")
        elif fragment and target.suffix == ".md" and fragment not in _anchors(target):
            broken.append(f"{_rel(page)}:{line}: [{written}] -> no heading #{fragment} in {target.name}")
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_repository_path_the_docs_name_exists(page):
    """docs/..., tools/..., recipes/..., scope_ds/..., slurm/..., ds_configs/..., tests/... as
    written in the text, in code spans and in fenced commands, from the repository root."""
    text = page.read_text()
    missing = [
        f"{_rel(page)}:{_line(text, m.start())}: {m.group(0)}"
        for m in REPO_PATH.finditer(text)
        if not _placeholder(m.group(0)) and not _exists(m.group(0))
    ]
    assert missing == []


# --------------------------------------------------------------------------- (b) code -> docs


def _code_files() -> list[Path]:
    files = [p for d in CODE_DIRS for p in (REPO / d).rglob("*") if p.suffix in (".py", ".sh")]
    return sorted(p for p in files if "__pycache__" not in p.parts)


def test_every_docs_page_the_code_cites_exists():
    """Docstrings, comments and messages of scope_ds/, tools/, slurm/ and tests/ that send the
    reader to a docs page send them to one that exists."""
    missing = []
    for path in _code_files():
        text = path.read_text()
        for m in DOCS_PAGE.finditer(text):
            if not _placeholder(m.group(0)) and not (REPO / m.group(0)).exists():
                missing.append(f"{_rel(path)}:{_line(text, m.start())}: {m.group(0)}")
    assert missing == []


# --------------------------------------------------------------------------- (c) no orphan page


def test_every_docs_page_is_reached_from_the_readme_or_another_page():
    cited = set().union(*(_cited_pages(page) for page in PAGES))
    orphans = [_rel(page) for page in PAGES[1:] if page.resolve() not in cited]
    assert orphans == []


# --------------------------------------------------------------------------- (d) benchmark blocks


def _blocks(page: Path) -> list[tuple[str, int, list[str]]]:
    """(name, line of its start marker, the lines inside) of each well-formed bench block of a page;
    a marker out of place fails the calling test."""
    lines = page.read_text().splitlines()
    blocks, open_ = [], None
    for i, line in enumerate(lines, 1):
        m = BLOCK_MARKER.match(line.strip())
        if m is None:
            prose = re.sub(r"`[^`]*`", "", line)  # a marker quoted in a code span is not one
            assert "<!-- bench:" not in prose, f"{_rel(page)}:{i}: a bench marker not alone on its line: {line!r}"
            continue
        assert line == line.strip(), f"{_rel(page)}:{i}: a bench marker must start its line: {line!r}"
        name, kind = m.group("name"), m.group("kind")
        assert re.fullmatch(r"[\w.-]+", name), f"{_rel(page)}:{i}: block name {name!r}: letters, digits, _ . - only"
        if kind == "start":
            assert open_ is None, f"{_rel(page)}:{i}: bench:{name} starts inside bench:{open_[0]} (line {open_[1]})"
            open_ = (name, i)
        else:
            assert open_ is not None, f"{_rel(page)}:{i}: bench:{name} ends without a start"
            assert open_[0] == name, f"{_rel(page)}:{i}: bench:{name} ends bench:{open_[0]} (line {open_[1]})"
            blocks.append((name, open_[1], lines[open_[1] : i - 1]))
            open_ = None
    assert open_ is None, f"{_rel(page)}:{open_[1]}: bench:{open_[0]} has no end marker"
    return blocks


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_each_bench_block_ends_and_opens_with_its_command_date_and_machine(page):
    """`COMMAND` · YYYY-MM-DD · MACHINE first, then a blank line and the table, as
    benchlib.write_block writes it; each block name once in the page."""
    names = []
    for name, start, inside in _blocks(page):
        where = f"{_rel(page)}:{start}: bench:{name}"
        body = [ln for ln in inside if ln.strip()]
        assert body, f"{where} is empty"
        header = BLOCK_HEADER.match(body[0])
        assert header, f"{where}: first line {body[0]!r} is not `command` · YYYY-MM-DD · machine"
        datetime.date.fromisoformat(header.group("date"))  # a real date
        assert header.group("command").startswith("python tools/"), f"{where}: {header.group('command')!r}"
        assert _exists(header.group("command").split()[1]), f"{where}: no {header.group('command').split()[1]}"
        after = inside[inside.index(body[0]) + 1 :]
        assert after[:1] == [""] and after[1:2] and after[1].startswith("|"), f"{where}: a blank line, then the table"
        names.append(name)
    assert len(names) == len(set(names)), f"{_rel(page)}: a bench block twice: {names}"


def test_each_benchmark_writes_one_block_that_the_docs_hold():
    """Every block name a tool's write_block call writes is in exactly one docs page: each
    benchmark has its one current table."""
    written = {
        name: path.name
        for path in sorted((REPO / "tools").glob("*.py"))
        for name in re.findall(r"write_block\([^,]+,\s*[\"']([\w.-]+)[\"']", path.read_text())
    }
    held: dict[str, list[str]] = {}
    for page in PAGES:
        for name, _, _ in _blocks(page):
            held.setdefault(name, []).append(_rel(page))
    assert {name: held.get(name, []) for name in written if len(held.get(name, [])) != 1} == {}


@pytest.mark.skipif(not (REPO / "tools" / "benchlib.py").exists(), reason="no tools/benchlib.py")
def test_benchlib_rewriting_a_block_with_its_own_content_leaves_the_page_as_it_is(tmp_path):
    """The docs' blocks are in the form write_block writes, so a benchmark regenerates them in place."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import benchlib
    finally:
        sys.path.remove(str(REPO / "tools"))
    for page in PAGES:
        for name, _, inside in _blocks(page):
            body = [ln for ln in inside if ln.strip()]
            header = BLOCK_HEADER.match(body[0])
            table = "\n".join(inside[inside.index(body[0]) + 2 :])
            copy = tmp_path / page.name
            copy.write_text(page.read_text())
            benchlib.write_block(
                copy, name, table, header.group("command"), header.group("machine"), date=header.group("date")
            )
            assert copy.read_text() == page.read_text(), f"{_rel(page)}: bench:{name} is not as write_block writes it"
