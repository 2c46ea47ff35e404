"""End-to-end ``python -m scope_ds.evaluate`` through the embedded rollout server, and its errors.

The main model is a tiny Llama fine-tuned in a few seconds to answer any prompt with "\\boxed{1}" or
"\\boxed{2}" at random, so that its samples are a mix of right and wrong and the estimators have
something to estimate. A second, untrained tiny Llama is served by the test and given by URL, so
one call covers both ways in (a folder the command serves itself, and an attached server).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scope_ds.data.benchmarks import math_prompt
from scope_ds.evaluation.estimators import pass_at_k
from scope_ds.rewards import get_verifier

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
N = 8
BENCH_ROWS = [("abc", "1"), ("de", "2"), ("fgh", "\\frac{2}{2}"), ("ab", "3")]  # short: the tiny context is 64


def _fine_tune_one_or_two(model_dir: Path, steps: int = 60) -> None:
    """Teach the tiny model to answer '\\boxed{1}' or '\\boxed{2}' (half and half) after any math prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 s here; 15 s with two threads on a busy 2-core machine
    try:
        _sft_steps(model, tok, opt, rng, steps)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(model_dir)


def _sft_steps(model, tok, opt, rng: random.Random, steps: int) -> None:
    for _ in range(steps):
        ids, labels = [], []
        for _ in range(16):
            prompt = tok(math_prompt("".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6)))))["input_ids"]
            answer = tok(f"\\boxed{{{rng.choice('12')}}}")["input_ids"] + [tok.eos_token_id]
            ids.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        width = max(map(len, ids))
        lengths = torch.tensor([len(i) for i in ids])
        x_BT = torch.tensor([i + [0] * (width - len(i)) for i in ids])
        y_BT = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
        mask_BT = (torch.arange(width)[None] < lengths[:, None]).long()
        model(input_ids=x_BT, attention_mask=mask_BT, labels=y_BT).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory, tiny_llama_builder, embedded_servers) -> dict:
    root = tmp_path_factory.mktemp("evaluate")
    trained = tiny_llama_builder(root / "boxed12", seed=0)
    _fine_tune_one_or_two(trained)
    untrained = tiny_llama_builder(root / "untrained", seed=1)
    url = embedded_servers(untrained)[0].url
    bench = root / "bench.jsonl"
    bench.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in BENCH_ROWS))
    return {"root": root, "trained": trained, "url": url, "bench": bench}


def _evaluate(*args: str, timeout: float = 240.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scope_ds.evaluate", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _samples(out: Path, model: str, bench: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"samples_{model}_{bench}.jsonl").read_text().splitlines()]


def test_evaluate_end_to_end(eval_setup) -> None:
    out = eval_setup["root"] / "out"
    proc = _evaluate(
        "--model", f"boxed12={eval_setup['trained']}", "--model", eval_setup["url"],
        "--benchmarks", f"toy,local={eval_setup['bench']}", "--toy-prompts", "3",
        "--n", str(N), "--max-new-tokens", "16", "--out", str(out), "--no-progress", "--seeded",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    labels = [m["label"] for m in results["models"]]
    assert labels[0] == "boxed12" and len(labels) == 2
    sizes = {"toy": 3, "local": len(BENCH_ROWS)}
    verifiers = {"toy": get_verifier("toy"), "local": get_verifier("math")}
    for model in results["models"]:
        for bench, size in sizes.items():
            samples = _samples(out, model["label"].replace(":", "_"), bench)
            summary = model["benchmarks"][bench]
            assert len(samples) == size * N == summary["samples"]
            assert summary["skipped_long_prompts"] == 0  # no --max-prompt-tokens: no limit
            # The dumped verdicts are the verifier's, and Avg@n is their share.
            assert all(s["correct"] == bool(verifiers[bench](s["text"], s["answer"])) for s in samples)
            assert summary["avg"] == pytest.approx(sum(s["correct"] for s in samples) / len(samples))
            groups: dict[str, list[bool]] = {}
            for s in samples:
                groups.setdefault(s["prompt_id"], []).append(s["correct"])
            assert summary["pass_at_k"]["2"] == pytest.approx(pass_at_k(list(groups.values()), 2))
            # pass@n is exactly the share of prompts with a correct sample.
            assert summary["pass_at_k"][str(N)] == pytest.approx(sum(map(any, groups.values())) / size)
            assert summary["bootstrap_best_of_k"][str(N)] <= summary["pass_at_k"][str(N)]
    trained_local = results["models"][0]["benchmarks"]["local"]
    assert 0.0 < trained_local["avg"] < 1.0  # the estimators above were tested on a real mix
    table = (out / "results.md").read_text()
    assert "| Model | toy | local | Avg |" in table and "| boxed12 |" in table and "skipped" not in table
    assert results["settings"]["max_prompt_tokens"] is None
    for name in ("toy", "local", "average"):
        _assert_png(out / f"pass_at_k_{name}.png")
    assert "results in" in proc.stdout


def _assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def test_evaluate_records_for_training(eval_setup) -> None:
    """The in-training entry point, on the attached server, without the CLI."""
    from transformers import AutoTokenizer

    from scope_ds.data.benchmarks import BenchmarkSpec, load_benchmark
    from scope_ds.evaluation.sampling import eval_sampling_params, evaluate_records, sample_and_verify
    from scope_ds.rollout.client import SyncRolloutClient

    tokenizer = AutoTokenizer.from_pretrained(eval_setup["trained"])
    records = load_benchmark(BenchmarkSpec("local", str(eval_setup["bench"]))).records
    params = eval_sampling_params(tokenizer, max_new_tokens=12)
    with SyncRolloutClient([eval_setup["url"]]) as client:
        metrics = evaluate_records(client, tokenizer, records, "math", 4, params, prefix="eval/local", seed=3)
        # Seeded: every sample draws from its own seed, so a second evaluation repeats it exactly.
        first, again = (sample_and_verify(client, tokenizer, records, "math", 4, params, seed=3) for _ in range(2))
        other = sample_and_verify(client, tokenizer, records, "math", 4, params, seed=4)
    texts = [[s.text for s in g] for g in first]
    assert texts == [[s.text for s in g] for g in again] != [[s.text for s in g] for g in other]
    assert set(metrics) == {
        "eval/local/accuracy", "eval/local/avg@4", "eval/local/pass@1", "eval/local/pass@2", "eval/local/pass@4",
        "eval/local/response_length_mean", "eval/local/truncated_share", "eval/local/weight_version",
    }  # fmt: skip
    assert metrics["eval/local/weight_version"] == 0  # the server's initial weights
    assert metrics["eval/local/accuracy"] == metrics["eval/local/avg@4"] == pytest.approx(metrics["eval/local/pass@1"])
    assert 0 < metrics["eval/local/response_length_mean"] <= 12
    assert evaluate_records(client, tokenizer, [], "math", 4, params) == {}


def test_max_prompt_tokens_skips_long_prompts_and_reports_them(eval_setup) -> None:
    """--max-prompt-tokens N: prompts longer than N tokens as sent are left out, counted and reported."""
    from transformers import AutoTokenizer

    from scope_ds.data.encoding import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(eval_setup["trained"])  # the URL model's: the same tokenizer
    limit = len(encode_prompt(tokenizer, math_prompt("de")))  # keeps the 2-letter questions, skips the 3-letter
    out = eval_setup["root"] / "out_limit"
    proc = _evaluate(
        "--model", f"small={eval_setup['url']}", "--benchmarks", f"local={eval_setup['bench']}",
        "--n", "2", "--max-new-tokens", "4", "--max-prompt-tokens", str(limit), "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = [f"local:{i}" for i, (q, _) in enumerate(BENCH_ROWS) if len(q) <= 2]
    assert len(kept) == 2
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["max_prompt_tokens"] == limit
    summary = results["models"][0]["benchmarks"]["local"]
    assert (summary["prompts"], summary["samples"], summary["skipped_long_prompts"]) == (2, 4, 2)
    assert sorted({s["prompt_id"] for s in _samples(out, "small", "local")}) == kept
    note = f"Prompts skipped as longer than {limit} tokens (not scored): small / local: 2 of 4."
    assert note in (out / "results.md").read_text() and note in proc.stdout
    assert f"small / local: skipped 2 of 4 prompts longer than {limit} tokens" in proc.stdout
    # A benchmark with no prompt short enough is an error that names it.
    proc = _evaluate(
        "--model", eval_setup["url"], "--benchmarks", f"local={eval_setup['bench']}",
        "--max-prompt-tokens", "3", "--out", str(out / "none_fit"), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "'local': all 4 prompts are longer than --max-prompt-tokens 3" in proc.stderr


@pytest.mark.parametrize(
    ("case", "culprit"),
    [("unknown_benchmark", "aime2099"), ("malformed_file", "bad.jsonl"), ("missing_model", "no_such_model")],
)
def test_evaluate_clear_errors(eval_setup, tmp_path: Path, case: str, culprit: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+2", "answer": \n')
    model, benchmarks = str(eval_setup["trained"]), f"local={eval_setup['bench']}"
    if case == "unknown_benchmark":
        benchmarks = "toy,aime2099"
    elif case == "malformed_file":
        benchmarks = f"toy,bad={bad}"
    else:
        model = str(tmp_path / "no_such_model")
    proc = _evaluate("--model", model, "--benchmarks", benchmarks, "--out", str(tmp_path / "out"), timeout=60.0)
    assert proc.returncode != 0
    assert culprit in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out" / "logs").exists()  # refused before any server was started
