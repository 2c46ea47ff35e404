"""Shared fixtures for integration tests: tiny model folders and embedded rollout servers.

``tiny_llama_dir`` builds a random Hugging Face Llama (hidden 32, 2 layers, vocab 128, context 64)
with a character-level tokenizer into tmp_path in well under a second; any test may reuse it. The
weights come from tools/benchlib.py's build_random_model, the builder of the benchmarks' models.
"""

from __future__ import annotations

import string
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def model_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny student and a different, wider tiny teacher with one tokenizer (built once per module)."""
    root = tmp_path_factory.mktemp("pair")
    return build_tiny_llama(root / "student", seed=0), build_tiny_llama(root / "teacher", seed=1, hidden=48)
