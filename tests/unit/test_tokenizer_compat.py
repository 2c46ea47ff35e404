"""Student / teacher tokenizer check: same files loaded as different classes pass; real differences are
refused naming the classes and the first difference. Real tokenizer folders, built here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scope_ds.engines.compat import TokenizerMismatchError, check_compatible

EOT = "<|endoftext|>"


def _config(path: Path, model_type: str = "llama") -> None:
    from transformers import AutoConfig

    AutoConfig.for_model(
        model_type, vocab_size=300, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1
    ).save_pretrained(str(path))


def _byte_level_folder(path: Path, swap: bool = False) -> Path:
    """A Qwen-style byte-level BPE (Qwen2's pre-tokenizer), saved by the generic fast tokenizer, with
    ``<|endoftext|>`` as eos and pad and no unk token. ``swap`` exchanges the ids of two tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if swap:
        alphabet[10], alphabet[11] = alphabet[11], alphabet[10]
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate([*alphabet, EOT])}, merges=[]))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    path.mkdir(parents=True)
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOT, pad_token=EOT).save_pretrained(str(path))
    _config(path)
    return path


def _char_folder(path: Path) -> Path:
    from tests.integration.conftest import build_tiny_tokenizer

    path.mkdir(parents=True)
    build_tiny_tokenizer(path)
    _config(path)
    return path


def _copy_as(src: Path, dst: Path, tokenizer_class: str) -> Path:
    """The same tokenizer files, with tokenizer_config.json naming another class."""
    shutil.copytree(src, dst)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = tokenizer_class
    cfg_path.write_text(json.dumps(cfg))
    assert (src / "tokenizer.json").read_bytes() == (dst / "tokenizer.json").read_bytes()
    return dst


def test_the_same_files_loaded_as_different_classes_pass(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    generic = _byte_level_folder(tmp_path / "generic")
    qwen2 = _copy_as(generic, tmp_path / "qwen2", "Qwen2Tokenizer")
    a, b = AutoTokenizer.from_pretrained(str(generic)), AutoTokenizer.from_pretrained(str(qwen2))
    assert type(a) is not type(b) and (a.unk_token_id, b.unk_token_id) == (None, 256)  # the case in the issue
    tok = check_compatible(str(generic), str(qwen2))
    assert tok.eos_token_id == 256
    check_compatible(str(qwen2), str(generic), full_vocab=True)


def test_encodings_that_differ_are_refused_naming_the_classes(tmp_path: Path) -> None:
    # LlamaTokenizer rebuilds the pre-tokenizer (metaspace): the same files encode spaces differently.
    generic = _char_folder(tmp_path / "generic")
    llama = _copy_as(generic, tmp_path / "llama", "LlamaTokenizerFast")
    with pytest.raises(TokenizerMismatchError) as e:
        check_compatible(str(generic), str(llama))
    message = str(e.value)
    assert "TokenizersBackend" in message and "LlamaTokenizer" in message
    assert "encode 'Hello world' differently, first at token 5" in message


def test_a_different_vocabulary_is_refused_naming_the_first_tokens(tmp_path: Path) -> None:
    a = _byte_level_folder(tmp_path / "a")
    b = _byte_level_folder(tmp_path / "b", swap=True)
    with pytest.raises(TokenizerMismatchError, match=r"tokenizers differ: 257 vs 257 tokens; first \(token, id\)"):
        check_compatible(str(a), str(b))


def test_special_ids_both_define_must_agree(tmp_path: Path) -> None:
    a = _char_folder(tmp_path / "a")
    b = _copy_as(a, tmp_path / "b", "PreTrainedTokenizerFast")
    cfg = json.loads((b / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<pad>"
    (b / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerMismatchError, match="eos_token_id differs: 2 vs 0"):
        check_compatible(str(a), str(b))
