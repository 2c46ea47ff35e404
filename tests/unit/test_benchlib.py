"""tools/benchlib.py: the docs' bench blocks, the random models, the child command lines."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import benchlib  # noqa: E402

TABLE = "| a | b |\n| --- | ---: |\n| x | 1.0 |"
BEFORE = "# Page\n\nSome text · with ünïcode,\ttabs and  double  spaces.\r\n\n"
AFTER = "\n\nAfter the block.\n<!-- bench:other start -->\n`python tools/o.py` · 2026-01-01 · m\n\n| o |\n<!-- bench:other end -->\ntail without a newline"
TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def _block(
    name: str,
    table: str,
    command: str = "python tools/bench_x.py",
    day: str = "2026-12-07",
    machine: str = "cpu, 2 cores, 8 GiB",
) -> str:
    return f"<!-- bench:{name} start -->\n`{command}` · {day} · {machine}\n\n{table}\n<!-- bench:{name} end -->"


def _write(page: Path, table: str = TABLE, name: str = "x", day: str = "2026-12-07") -> None:
    benchlib.write_block(page, name, table, "python tools/bench_x.py", "cpu, 2 cores, 8 GiB", date=day)


def test_write_block_replaces_the_block_and_keeps_the_text_around_it_byte_for_byte(tmp_path):
    page = tmp_path / "page.md"
    page.write_bytes((BEFORE + _block("x", "| stale |\n| --- |", "python tools/old.py", "2020-01-01") + AFTER).encode())
    _write(page)
    assert page.read_bytes() == (BEFORE + _block("x", TABLE) + AFTER).encode()


def test_write_block_finds_markers_on_windows_line_ends(tmp_path):
    page = tmp_path / "page.md"
    page.write_bytes(b"a\r\n<!-- bench:x start -->\r\nold\r\n<!-- bench:x end -->\r\nb\r\n")
    _write(page)
    assert page.read_bytes() == b"a\r\n" + _block("x", TABLE).encode() + b"\r\nb\r\n"


def test_write_block_appends_the_block_when_the_page_lacks_it(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Page\n\ntext without a final newline")
    _write(page, TABLE + "\n\n")  # surrounding blank lines of the table are not kept
    assert page.read_text() == "# Page\n\ntext without a final newline\n\n" + _block("x", TABLE) + "\n"
    missing = tmp_path / "new.md"
    _write(missing)
    assert missing.read_text() == _block("x", TABLE) + "\n"


def test_write_block_is_idempotent_and_leaves_other_blocks_alone(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(BEFORE + AFTER)
    _write(page)
    first = page.read_bytes()
    _write(page)
    assert page.read_bytes() == first
    _write(page, "| other |\n| --- |")
    _write(page)
    assert page.read_bytes() == first
    assert _block("x", TABLE) in first.decode() and AFTER in first.decode()


def test_write_block_dates_today_by_default(tmp_path):
    import datetime

    page = tmp_path / "page.md"
    benchlib.write_block(page, "x", TABLE, "python tools/bench_x.py", "m")
    assert f"`python tools/bench_x.py` · {datetime.date.today().isoformat()} · m\n" in page.read_text()


@pytest.mark.parametrize(
    "text",
    [
        "<!-- bench:x start -->\nno end\n",
        "<!-- bench:x end -->\n<!-- bench:x start -->\n",
        _block("x", TABLE) + "\n" + _block("x", TABLE) + "\n",
    ],
    ids=["no end", "end first", "twice"],
)
def test_write_block_refuses_markers_it_cannot_pair(tmp_path, text):
    page = tmp_path / "page.md"
    page.write_text(text)
    with pytest.raises(ValueError, match="bench:x"):
        _write(page)
    assert page.read_text() == text


def _weights_hash(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_random_model_is_the_same_per_seed_and_another_for_another_seed(tmp_path):
    first = benchlib.build_random_model(tmp_path / "a", "llama", 0, **TINY)
    again = benchlib.build_random_model(tmp_path / "b", "llama", 0, **TINY)
    other = benchlib.build_random_model(tmp_path / "c", "llama", 1, **TINY)
    assert _weights_hash(first) == _weights_hash(again) != _weights_hash(other)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_random_model_has_the_requested_shape(tmp_path, arch):
    extra = {"head_dim": 8, "num_key_value_heads": 1} if arch == "qwen3" else {"num_key_value_heads": 2}
    folder = benchlib.build_random_model(
        tmp_path / arch, arch, 3, **TINY, **extra, max_position_embeddings=48, tie_word_embeddings=False
    )
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == arch
    for key, value in {**TINY, **extra, "max_position_embeddings": 48, "tie_word_embeddings": False}.items():
        assert config[key] == value, key
    params = dict(benchlib.random_model(arch, 3, **TINY, **extra, tie_word_embeddings=False).named_parameters())
    assert params["model.embed_tokens.weight"].shape == (64, 16)
    assert params["lm_head.weight"].shape == (64, 16)
    assert sum(".mlp.down_proj." in n for n in params) == 1  # one layer
    kv = extra["num_key_value_heads"] * extra.get("head_dim", 16 // 2)
    assert params["model.layers.0.self_attn.k_proj.weight"].shape == (kv, 16)


def test_random_model_head_scale_multiplies_the_head_only():
    plain = benchlib.random_model("llama", 0, **TINY, tie_word_embeddings=False)
    scaled = benchlib.random_model("llama", 0, head_scale=20.0, **TINY, tie_word_embeddings=False)
    for (name, a), (_, b) in zip(plain.named_parameters(), scaled.named_parameters(), strict=True):
        assert (b == (20.0 * a if name == "lm_head.weight" else a)).all(), name


def test_build_random_model_copies_the_tokenizer_and_reuses_a_cached_folder(tmp_path):
    source = tmp_path / "tok"
    source.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        (source / name).write_text(name)
    folder = benchlib.build_random_model(tmp_path / "m", "llama", 0, tokenizer_from=source, **TINY)
    assert {p.name for p in folder.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert (folder / "tokenizer.json").read_text() == "tokenizer.json"
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 64  # the model's, not the source's
    before = _weights_hash(folder)
    assert benchlib.build_random_model(folder, "llama", 1, cached=True, **TINY) == folder
    assert _weights_hash(folder) == before


def test_child_command_is_plain_python_for_one_rank_and_the_deepspeed_launcher_for_more():
    py = sys.executable
    assert benchlib.child_command("s.py", ["a", "b"]) == [py, "s.py", "a", "b"]
    launcher = [py, "-m", "deepspeed.launcher.runner", "--num_gpus"]
    assert benchlib.child_command("s.py", ["a"], 2) == [*launcher, "2", "s.py", "a"]
    assert benchlib.child_command(Path("s.py"), [], 1, launcher=True, master_port=1234) == [
        *launcher,
        "1",
        "--master_port",
        "1234",
        "s.py",
    ]


def test_run_child_runs_from_the_repository_root_with_added_environment(tmp_path):
    script = tmp_path / "child.py"
    script.write_text("import os, sys; print(os.getcwd(), os.environ['BENCHLIB_TEST'], *sys.argv[1:])")
    proc = benchlib.run_child(script, ["x y"], env={"BENCHLIB_TEST": "on"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(benchlib.ROOT), "on", "x", "y"]


def test_command_line_and_machine_line(monkeypatch):
    monkeypatch.setattr(
        sys, "argv", [str(benchlib.ROOT / "tools" / "bench_x.py"), "--configs", "a b;c", "--out", "d.md"]
    )
    assert benchlib.command_line() == "python tools/bench_x.py --configs 'a b;c' --out d.md"
    line = benchlib.machine_line()
    assert " cores" in line and "\n" not in line and "`" not in line


def test_write_block_names_this_command_and_machine_by_default(tmp_path, monkeypatch):
    """A benchmark passes its table alone: the block says the command it was run with and this machine."""
    monkeypatch.setattr(sys, "argv", [str(benchlib.ROOT / "tools" / "bench_x.py"), "--out", "p.md"])
    page = tmp_path / "page.md"
    benchlib.write_block(page, "x", TABLE, date="2026-12-07")
    want = _block("x", TABLE, "python tools/bench_x.py --out p.md", machine=benchlib.machine_line())
    assert want in page.read_text()
