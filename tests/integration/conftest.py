"""Shared fixtures for integration tests: tiny model folders, embedded rollout servers, shared runs.

``tiny_llama_dir`` builds a random Hugging Face Llama (hidden 32, 2 layers, vocab 128, context 64)
with a character-level tokenizer into tmp_path in well under a second; any test may reuse it. The
weights come from tools/benchlib.py's build_random_model, the builder of the benchmarks' models.

A run costs its start-up (imports, engines, a rollout server: 15-20 s on CPU), its steps little, so
tests share runs: ``default_run`` (the default SCOPE run on 2 ranks) and ``zero3_steps`` (every
zero3_step.py case, one start-up per rank count) are made once per session and read by many
tests. They are read-only: a test that writes into a run folder works on a copy (``copy_run``).
"""

from __future__ import annotations

import json
import string
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from train_helpers import (
    DEFAULT_RUN_ARGS,
    REPO,
    ZERO3_LENGTHS,
    ZERO3_STEP,
    check_ok,
    launch_ranks,
    launch_train,
    run_env,
    small_run_overrides,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import benchlib  # noqa: E402

TINY_VOCAB = 128
TINY_CONTEXT = 64
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: pad, bos, eos, unk


def build_tiny_tokenizer(path: Path) -> None:
    """A character-level fast tokenizer (specials, then printable ASCII), saved as a HF folder."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    # BPE without merges splits text into single characters, and decodes them back losslessly.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.save_pretrained(str(path))


def build_tiny_llama(
    path: Path,
    seed: int = 0,
    *,
    hidden: int = 32,
    layers: int = 2,
    vocab: int = TINY_VOCAB,
    tokenizer: bool = True,
    context: int = TINY_CONTEXT,
) -> Path:
    """Save a random tiny Llama (float32 safetensors) and, by default, the tiny tokenizer into ``path``."""
    benchlib.build_random_model(
        path,
        "llama",
        seed,
        # Larger logits than the default init, so sampling is not uniform and EOS is not too likely.
        head_scale=20.0,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if tokenizer:
        build_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_builder() -> Callable[..., Path]:
    """The builder itself, for tests that need several different models: ``build(path, seed=...)``."""
    return build_tiny_llama


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    """A fresh tiny Llama folder (weights seed 0) with its tokenizer, in this test's tmp_path."""
    return build_tiny_llama(tmp_path / "tiny_llama")


@pytest.fixture(scope="module")
def tiny_llama_module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny Llama, built once per test module (for module-scoped servers)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def embedded_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., list]]:
    """Factory: ``start(model_dir, count=1, **launch_kwargs)`` -> running ServerProcess list.

    Servers are real ``python -m scope_ds.rollout.server`` processes on free loopback ports; all
    are stopped by pid when the module's tests are done. They require no API key unless the test
    passes ``api_key`` (None: a fresh one, in ``proc.api_key``), so that tests may speak plain HTTP.
    """
    from scope_ds.rollout.launcher import launch_embedded

    started = []

    def start(model_dir: Path, count: int = 1, **kwargs: object) -> list:
        kwargs.setdefault("api_key", "")
        procs = launch_embedded(
            str(model_dir), count=count, log_dir=tmp_path_factory.mktemp("server_logs"), wait_s=120.0, **kwargs
        )
        started.extend(procs)
        return procs

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="session")
def model_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny student and a different, wider tiny teacher with one tokenizer (built once per session,
    read-only)."""
    root = tmp_path_factory.mktemp("pair")
    return build_tiny_llama(root / "student", seed=0), build_tiny_llama(root / "teacher", seed=1, hidden=48)


# ------------------------------------------------------------------------------- shared runs


@pytest.fixture(scope="session")
def default_run(model_pair, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default SCOPE run of the tiny pair on 2 ranks (the ``ranks`` launcher): 6 steps, its
    checkpoints step_3 and step_6, its metrics, rollouts, logs and HF export. Read by
    test_regression (the figures of its steps 1-2), test_checkpoint (the straight run a killed and
    resumed one must equal; convert_ckpt of its checkpoint; resume errors, on a copy) and
    test_faults (a used folder, on a copy)."""
    student, teacher = model_pair
    out = tmp_path_factory.mktemp("default_run") / "run"
    check_ok(launch_train([*small_run_overrides(student, teacher, out), *DEFAULT_RUN_ARGS], ranks=2, launcher="ranks"))
    return out


@pytest.fixture(scope="session")
def tied_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A Qwen3-style student and teacher whose LM head is the input embedding (tie_word_embeddings,
    as in Qwen3-1.7B), vocab 96, with peaked distributions as a trained model's."""
    root = tmp_path_factory.mktemp("tied_pair")
    paths = []
    for name, seed in (("student", 0), ("teacher", 1)):
        benchlib.build_random_model(
            root / name,
            "qwen3",
            seed,
            head_scale=20.0,  # the tied head is the embedding: both scaled, peaked as a trained model's
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
        paths.append(root / name)
    return paths[0], paths[1]


# zero3_step.py's layouts: packed token budgets (two micro-batches on a rank, each prompt's
# rollouts sharing one copy of it: train.share_prompts), and the padded layout with whole logits
PACKED, PADDED = "train.max_tokens_per_micro_batch=40", "train.packing=false"
# and ZeRO stages 0 and 2 (train.zero_stage over the JSON's 3): whole weights on every rank; with
# stage 0 the teacher whole as the default's (auto: replicated here), with stage 2 partitioned
STAGE0 = [PACKED, "train.zero_stage=0", "model.teacher_placement=replicated"]
STAGE2 = [PACKED, "train.zero_stage=2", "model.teacher_placement=zero3"]
FULL_KL = ["algo.name=opd", "algo.kl=full", "train.max_tokens_per_micro_batch=60"]
SP2 = ["parallel.sequence_parallel_size=2", "train.share_prompts=false"]
GRPO = ["algo.name=grpo", "algo.kl_coef=0.1"]  # a reference policy, its own sequence-parallel pass
PLACES = ("zero3", "replicated", "tensor")  # model.teacher_placement, each set explicitly
TENSOR = "model.teacher_placement=tensor"


def zero3_cases(root: Path, pair: tuple[Path, Path], tied: tuple[Path, Path]) -> dict[str, tuple[int, list]]:
    """Every zero3_step.py case the tests read: name -> (ranks, [STUDENT, TEACHER, *options])."""
    sgd = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    sgd["optimizer"] = {"type": "SGD", "params": {}}
    sgd["zero_allow_untested_optimizer"] = True  # torch's SGD under ZeRO-3: DeepSpeed asks for the flag
    (root / "sgd.json").write_text(json.dumps(sgd))
    # plain SGD: no clipping, no weight decay (test_zero3_step_is_the_same_on_one_and_two_ranks)
    plain = [f"train.ds_config={root / 'sgd.json'}", "train.grad_clip=0", "train.weight_decay=0", "train.lr=1e-3"]
    plain += ZERO3_LENGTHS
    return {
        "sgd_one_rank": (1, [*pair, "concurrent=0", PACKED, *plain]),
        "sgd_two_ranks": (2, [*pair, "concurrent=0", PACKED, *plain]),
        "sgd_scored_beside": (2, [*pair, "concurrent=1", PACKED, *plain]),
        "sgd_padded": (2, [*pair, "concurrent=0", PADDED, *plain]),
        "sgd_stage0": (2, [*pair, "concurrent=0", *STAGE0, *plain]),
        "sgd_stage2": (2, [*pair, "concurrent=0", *STAGE2, *plain]),
        # OPD with algo.kl=full (test_full_kl_takes_the_teachers_log_probs_from_the_update_pass)
        "opd_full_kl": (2, [*pair, *FULL_KL, *ZERO3_LENGTHS]),
        # tied embeddings, packed and padded (test_tied_embeddings_train_the_same_packed_and_padded)
        "tied_packed": (2, [*tied, "train.max_tokens_per_micro_batch=60", "train.lr=1e-2", *ZERO3_LENGTHS]),
        "tied_padded": (2, [*tied, PADDED, "train.lr=1e-2", *ZERO3_LENGTHS]),
        # sequence parallelism: each row split over both ranks (test_sequence_parallel_updates_equal_whole_rows)
        "sgd_sp2": (2, [*pair, "concurrent=0", PACKED, *plain, *SP2]),
        "sgd_tiled": (2, [*pair, "concurrent=0", PACKED, *plain, "parallel.tiled_mlp=true"]),
        "sgd_sp2_tiled": (2, [*pair, "concurrent=0", PACKED, *plain, *SP2, "parallel.tiled_mlp=true"]),
        "grpo_sp1": (2, [*pair, "concurrent=0", PACKED, *plain, *GRPO, "train.share_prompts=false"]),
        "grpo_sp2": (2, [*pair, "concurrent=0", PACKED, *plain, *GRPO, *SP2]),
        "tied_sp2": (2, [*tied, "train.max_tokens_per_micro_batch=60", "train.lr=1e-2", *ZERO3_LENGTHS, *SP2]),
        # the teacher's placements (test_teacher_placement.py): ragged packed rows, full KL, sp = 2
        **{f"place_{p}": (2, [*pair, "concurrent=0", PACKED, *plain, f"model.teacher_placement={p}"]) for p in PLACES},
        **{f"kl_{p}": (2, [*pair, *FULL_KL, *ZERO3_LENGTHS, f"model.teacher_placement={p}"]) for p in PLACES},
        "sp2_tensor": (2, [*pair, "concurrent=0", PACKED, *plain, *SP2, TENSOR]),
        "kl_sp2_tensor": (2, [*pair, *FULL_KL, *ZERO3_LENGTHS, *SP2, TENSOR]),
        "grpo_tensor": (2, [*pair, "concurrent=0", PACKED, *plain, *GRPO, "train.share_prompts=false", TENSOR]),
        # one incorrect rollout: rank 1 has no teacher work (test_a_rank_with_nothing_to_score_does_not_hang)
        "one_incorrect": (2, [*pair, "incorrect=1"]),
    }


@pytest.fixture(scope="session")
def zero3_steps(model_pair, tied_pair, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every case of ``zero3_cases``: name -> what zero3_step.py saved (weights, metrics, teacher
    log-probs, spans, ZeRO stages). One launch per rank count runs its cases one after another,
    each on fresh engines (``zero3_step.py --cases``)."""
    root = tmp_path_factory.mktemp("zero3_steps")
    cases = zero3_cases(root, model_pair, tied_pair)
    for ranks in sorted({r for r, _ in cases.values()}):
        todo = [[str(a) for a in (args[0], args[1], root / f"{name}.pt", *args[2:])]
                for name, (r, args) in cases.items() if r == ranks]  # fmt: skip
        (root / f"cases{ranks}.json").write_text(json.dumps(todo))
        # one intra-op thread: the scorer thread's ops must not change how the step's ops split their work
        check_ok(launch_ranks(ZERO3_STEP, ["--cases", root / f"cases{ranks}.json"], ranks, run_env(), timeout=600))
    return {name: torch.load(root / f"{name}.pt") for name in cases}
