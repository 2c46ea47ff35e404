"""Avg@k / Pass@k of one or more models on the math benchmarks (and the toy task).

    python -m scope_ds.evaluate --model DIR_OR_URL [--model ...] \\
        --benchmarks aime24,aime25,amc23,math500,minerva,olympiadbench --n 32 \\
        [--temperature 0.6 --top-p 0.95 --top-k 20 --max-new-tokens 12288] [--max-prompt-tokens N] \\
        [--out DIR] [--backend embedded|sglang]

A model folder gets its own rollout server(s) for the run (the embedded CPU server, or SGLang with
``--backend sglang``), stopped by pid at the end; a URL attaches to a running server. Writes to
OUT: results.json, results.md (the paper's Table 1 layout), pass_at_k_<benchmark>.png (every model
overlaid) and samples_<model>_<benchmark>.jsonl (every sample, verified). See docs/evaluation.md.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from scope_ds.config import ConfigError
from scope_ds.data.benchmarks import Benchmark, BenchmarkError, load_benchmark, parse_benchmarks
from scope_ds.data.encoding import drop_long_prompts
from scope_ds.evaluation import report
from scope_ds.evaluation.estimators import summarize
from scope_ds.evaluation.sampling import EvalSample, eval_sampling_params, sample_and_verify
from scope_ds.options import load_options
from scope_ds.records import PromptRecord
from scope_ds.rollout.client import RolloutServerError, SyncRolloutClient
from scope_ds.rollout.launcher import RolloutServers, ServerLaunchError

PROG = "python -m scope_ds.evaluate"


class EvalError(RuntimeError):
    """A bad argument or model; main prints it without a traceback."""


@dataclass(frozen=True)
class ModelTarget:
    label: str  # the row name in the table and the plots
    source: str  # model folder or server URL
    is_url: bool


@dataclass
class EvalOptions:
    """The command's options: ``--flag VALUE``, ``key=value`` or a ``--config`` YAML file
    (scope_ds.options.load_options)."""

    # [LABEL=]DIR_OR_URL: a model folder (a server is started for it) or a rollout server URL; repeat to compare
    model: list[str]
    # comma-separated: aime24, aime25, amc23, math500, minerva, olympiadbench, toy, or NAME=FILE
    benchmarks: str
    # NAME=SOURCE: load a named benchmark from a local file or another hub dataset REPO[@CONFIG][:SPLIT]
    source: list[str] = field(default_factory=list)
    question_field: str | None = None  # question field of local/hub rows (default: question, problem, ...)
    answer_field: str | None = None  # answer field of local/hub rows (default: answer, final_answer, ...)
    n: int = 32  # samples per prompt (Avg@n, Pass@k for k = 1, 2, 4, ..., n)
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20  # -1: the whole vocabulary
    max_new_tokens: int = 12288  # capped by the server at the context length
    limit: int | None = None  # first N prompts of each benchmark only (smoke runs)
    # skip prompts longer than N tokens as sent (chat template included), counted in the results; default: no limit
    max_prompt_tokens: int | None = None
    toy_prompts: int = 128  # prompts of the toy benchmark (held-out split)
    toy_variant: Literal["chain", "any-order"] = "chain"  # the toy task (data.toy_variant)
    chat_template: bool = True  # wrap prompts in the tokenizer's chat template when it has one
    tokenizer: str | None = None  # tokenizer folder for URL models (default: the server's tokenizer_path)
    out: str = "eval_out"  # output folder (created)
    backend: Literal["embedded", "sglang"] = "embedded"
    num_servers: int = 1  # servers per model folder (data parallel)
    gpus_per_server: int = 1  # SGLang tensor-parallel size
    server_arg: list[str] = field(default_factory=list)  # extra server flag
    server_timeout: float = 900.0  # seconds to wait for servers to be healthy
    api_key: str = ""  # API key of attached servers (URL models); launched ones get their own
    seed: int = 0  # server sampling seed, bootstrap seed, toy split seed
    # a sampling_seed per sample: results independent of batching (sglang: deterministic inference)
    seeded: bool = False
    bootstrap_resamples: int = 1000
    progress: bool = True  # a progress bar per model and benchmark

    def check(self) -> None:
        for name in ("n", "top_k", "max_new_tokens", "num_servers", "gpus_per_server", "toy_prompts"):
            value = getattr(self, name)
            if value < 1 and not (name == "top_k" and value == -1):
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.bootstrap_resamples < 1:
            raise ConfigError(f"--bootstrap-resamples must be >= 1, got {self.bootstrap_resamples}")
        for name in ("limit", "max_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def parse_args(argv: Sequence[str] | None = None) -> EvalOptions:
    return load_options(EvalOptions, None if argv is None else list(argv), PROG, __doc__.split("\n")[0])


def model_targets(specs: Sequence[str]) -> list[ModelTarget]:
    """Targets from ``[LABEL=]DIR_OR_URL``; a folder must exist and hold config.json."""
    targets: list[ModelTarget] = []
    for spec in specs:
        label, eq, source = spec.partition("=")
        if not eq or not re.fullmatch(r"[\w.+-]+", label):
            label, source = "", spec
        is_url = source.startswith(("http://", "https://"))
        if not is_url:
            folder = Path(source).expanduser()
            if not folder.is_dir():
                raise EvalError(f"model folder {source!r} does not exist")
            if not (folder / "config.json").is_file():
                raise EvalError(f"model folder {source!r} has no config.json (not a Hugging Face model folder)")
        label = label or (source.split("//", 1)[1].rstrip("/") if is_url else Path(source).resolve().name)
        taken = {t.label for t in targets}
        unique, i = label, 2
        while unique in taken:
            unique, i = f"{label}#{i}", i + 1
        targets.append(ModelTarget(unique, source, is_url))
    return targets


def load_tokenizer(target: ModelTarget, tokenizer_dir: str | None, servers: RolloutServers) -> Any:
    """The model folder's tokenizer; for a URL, --tokenizer or the server's tokenizer_path."""
    from transformers import AutoTokenizer

    path = tokenizer_dir if target.is_url else target.source
    if path is None:
        import httpx

        try:
            key = {"Authorization": f"Bearer {servers.api_key}"} if servers.api_key else None
            info = httpx.get(f"{servers.urls[0]}/model_info", headers=key, timeout=30.0, trust_env=False)
            path = info.json().get("tokenizer_path")
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            raise EvalError(f"server {target.source}: no /model_info answer ({exc}); pass --tokenizer DIR") from exc
        if not path or not Path(path).is_dir():
            raise EvalError(f"server {target.source} reports no local tokenizer ({path!r}); pass --tokenizer DIR")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise EvalError(f"cannot load the tokenizer of {target.label!r} from {path!r}: {exc}") from exc


@contextmanager
def serving(target: ModelTarget, args: EvalOptions, log_dir: Path) -> Iterator[RolloutServers]:
    """The servers of a model (with the API key they want): attached, or started now (with a key
    of their own) and stopped (by pid) on exit."""
    if target.is_url:
        yield RolloutServers.attach([target.source], timeout_s=min(args.server_timeout, 60.0), api_key=args.api_key)
        return
    deterministic = args.seeded and args.backend == "sglang"
    servers = RolloutServers.start(
        args.backend,
        target.source,
        count=args.num_servers,
        gpus_per_server=args.gpus_per_server,
        log_dir=log_dir,
        random_seed=args.seed,
        wait_s=args.server_timeout,
        # SGLang honours a request's sampling_seed only in its deterministic mode.
        extra_args=[*args.server_arg, *(["--enable-deterministic-inference"] if deterministic else [])],
    )
    try:
        yield servers
    finally:
        servers.stop()


def _safe(name: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", name)


def write_samples(path: Path, model: str, benchmark: str, groups: list[list[EvalSample]]) -> None:
    with open(path, "w") as f:
        for group in groups:
            for s in group:
                f.write(json.dumps({"model": model, "benchmark": benchmark, **s.to_json()}) + "\n")


def bench_summary(
    bench: Benchmark, groups: list[list[EvalSample]], args: EvalOptions, skipped: int = 0
) -> dict[str, Any]:
    """The estimators' figures for one benchmark, plus response lengths, the prompts skipped for
    --max-prompt-tokens (not in the figures) and where it came from."""
    samples = [s for g in groups for s in g]
    correct = [[s.correct for s in g] for g in groups]
    return {
        **summarize(correct, resamples=args.bootstrap_resamples, seed=args.seed),
        "skipped_long_prompts": skipped,
        "response_length_mean": sum(s.response_length for s in samples) / len(samples),
        "truncated_share": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "source": bench.source,
    }


Fits = dict[str, tuple[list[PromptRecord], int]]  # benchmark name -> (its prompts that fit, how many did not)


def fitting_prompts(benchmarks: Sequence[Benchmark], tokenizer: Any, args: EvalOptions, label: str) -> Fits:
    """Each benchmark's prompts within --max-prompt-tokens under this model's tokenizer (all without
    the flag), and the count of those skipped, printed. EvalError if a benchmark has none left."""
    fits: Fits = {}
    for bench in benchmarks:
        if args.max_prompt_tokens is None:
            fits[bench.name] = (bench.records, 0)
            continue
        records, skipped = drop_long_prompts(bench.records, tokenizer, args.max_prompt_tokens, args.chat_template)
        if not records:
            raise EvalError(
                f"benchmark {bench.name!r}: all {skipped} prompts are longer than --max-prompt-tokens "
                f"{args.max_prompt_tokens} for model {label!r}"
            )
        if skipped:
            print(
                f"{label} / {bench.name}: skipped {skipped} of {len(bench.records)} prompts longer than "
                f"{args.max_prompt_tokens} tokens",
                flush=True,
            )
        fits[bench.name] = (records, skipped)
    return fits


def evaluate_model(
    target: ModelTarget,
    benchmarks: Sequence[Benchmark],
    args: EvalOptions,
    out: Path,
    tokenizer: Any = None,
    fits: Fits | None = None,
) -> dict[str, Any]:
    """One model on every benchmark: its results.json entry; samples files written on the way.

    ``tokenizer`` None: loaded once the server is up (a URL model's comes from its server); ``fits``
    None: :func:`fitting_prompts` with that tokenizer."""
    from tqdm import tqdm

    summaries: dict[str, Any] = {}
    seed = args.seed if args.seeded else None
    with serving(target, args, out / "logs") as servers:
        tokenizer = tokenizer or load_tokenizer(target, args.tokenizer, servers)
        fits = fits or fitting_prompts(benchmarks, tokenizer, args, target.label)
        params = eval_sampling_params(tokenizer, args.temperature, args.top_p, args.top_k, args.max_new_tokens)
        total = sum(len(records) for records, _ in fits.values()) * args.n
        bar = tqdm(total=total, unit="sample", desc=target.label, disable=not args.progress, dynamic_ncols=True)
        with SyncRolloutClient(servers.urls, timeout_s=3600.0, api_key=servers.api_key) as client, bar:
            for bench in benchmarks:
                bar.set_postfix_str(bench.name)
                records, skipped = fits[bench.name]
                groups = sample_and_verify(
                    client, tokenizer, records, bench.verifier, args.n, params,
                    chat_template=args.chat_template, progress=bar, seed=seed,
                )  # fmt: skip
                path = out / f"samples_{_safe(target.label)}_{_safe(bench.name)}.jsonl"
                write_samples(path, target.label, bench.name, groups)
                summaries[bench.name] = bench_summary(bench, groups, args, skipped)
    average = report.average(summaries)
    return {"label": target.label, "source": target.source, "benchmarks": summaries, "average": average}


def write_outputs(results: dict[str, Any], names: Sequence[str], n: int, out: Path) -> None:
    report.write_json(results, out / "results.json")
    (out / "results.md").write_text(report.markdown_table(results, names, n))
    for name in [*names, "average"]:
        report.plot_pass_at_k(results, name, out / f"pass_at_k_{_safe(name)}.png")


def run(args: EvalOptions) -> dict[str, Any]:
    """Check every input, then evaluate model after model; outputs are rewritten after each model."""
    targets = model_targets(args.model)
    sources = {}
    for item in args.source:
        name, eq, source = item.partition("=")
        if not eq:
            raise EvalError(f"--source expects NAME=SOURCE, got {item!r}")
        sources[name.strip()] = source.strip()
    specs = parse_benchmarks(args.benchmarks, sources, args.question_field, args.answer_field)
    benchmarks = [load_benchmark(s, args.toy_prompts, args.seed, args.limit, args.toy_variant) for s in specs]
    # Folders' tokenizers (and prompts that fit) now, so that a broken one stops the command before
    # any server starts.
    tokenizers = {t.label: load_tokenizer(t, None, []) for t in targets if not t.is_url}
    fits = {label: fitting_prompts(benchmarks, tok, args, label) for label, tok in tokenizers.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = (
        "n", "temperature", "top_p", "top_k", "max_new_tokens", "max_prompt_tokens", "seed", "seeded",
    )  # fmt: skip
    settings = {k: getattr(args, k) for k in keys}
    settings["no_chat_template"] = not args.chat_template  # results.json keeps the flag's name
    settings.update(benchmarks={b.name: b.source for b in benchmarks}, bootstrap_resamples=args.bootstrap_resamples)
    results: dict[str, Any] = {"settings": settings, "models": []}
    names = [b.name for b in benchmarks]
    for target in targets:
        t0 = time.perf_counter()
        label = target.label
        results["models"].append(evaluate_model(target, benchmarks, args, out, tokenizers.get(label), fits.get(label)))
        results["models"][-1]["seconds"] = round(time.perf_counter() - t0, 1)
        write_outputs(results, names, args.n, out)
    print(report.markdown_table(results, names, args.n))
    print(f"results in {out}/ (results.json, results.md, pass_at_k_*.png, samples_*.jsonl)")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (EvalError, BenchmarkError, ServerLaunchError, RolloutServerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
