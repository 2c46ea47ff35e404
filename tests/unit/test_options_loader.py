"""The tools' options loader (options.load_options) on the embedded server's options: flags users
already call, key=value overrides, a YAML file, --help from the fields' comments, clear refusals."""

from __future__ import annotations

import pytest

from scope_ds.options import field_docs, options_parser
from scope_ds.rollout.server.main import ServerOptions, parse_args


def test_flags_overrides_and_a_file_give_the_typed_options(tmp_path):
    opts = parse_args(["--model-path", "m", "--port", "31000", "--transformers-decode", "max_n=8", "api_key=k"])
    assert (opts.model_path, opts.port, opts.transformers_decode, opts.max_n, opts.api_key) == (
        "m",
        31000,
        True,
        8,
        "k",
    )
    assert isinstance(opts.batch_wait_ms, float) and opts.random_seed is None and opts.dtype == "float32"
    (tmp_path / "s.yaml").write_text("model_path: f\nport: 1234\nrandom_seed: 7\n")
    opts = parse_args(["--config", str(tmp_path / "s.yaml"), "port=1235", "--random-seed", "9"])
    assert (opts.model_path, opts.port, opts.random_seed) == ("f", 1235, 9)  # the command line wins over the file


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--port", "1"], "missing --model-path"),
        (["--model-path", "m", "--port", "many"], "port must be int"),
        (["--model-path", "m", "--max-n", "0"], "--max-n must be at least 1"),
        (["--model-path", "m", "colour=red"], "unknown option"),
        (["--model-path", "m", "--dtype", "int8"], "invalid choice: 'int8'"),
    ],
)
def test_bad_options_exit_with_one_line_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_help_is_written_from_the_fields_comments():
    docs = field_docs(ServerOptions)
    assert docs["max_running_requests"] == "sequences decoded together at most"
    assert docs["transformers_decode"].startswith("decode through transformers' forward")  # the comment above
    text = options_parser(ServerOptions, "p", "d").format_help()
    assert "sequences decoded together at most (default: 64)" in text and "key=value" in text


def test_the_evaluation_command_keeps_its_flags():
    from scope_ds.evaluate import parse_args as eval_args

    opts = eval_args(["--model", "a=x", "--model", "y", "--benchmarks", "toy", "--no-chat-template", "--seeded", "n=4"])
    assert (opts.model, opts.benchmarks, opts.chat_template, opts.seeded, opts.n) == (
        ["a=x", "y"],
        "toy",
        False,
        True,
        4,
    )
    assert opts.progress and opts.limit is None and opts.top_k == 20
    with pytest.raises(SystemExit):
        eval_args(["--model", "y", "--benchmarks", "toy", "--limit", "0"])
