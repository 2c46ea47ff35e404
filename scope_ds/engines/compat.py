"""Start-up check that student and teacher speak the same tokens.

What the losses depend on is compared, not the tokenizer objects: the token -> id map, the ids of
the special tokens that both tokenizers define (pad / eos / bos: one that only one side defines is
not used across the pair), and the encodings of a few fixed strings. Folders holding the same
tokenizer files may load as different classes (a qwen2 config gives ``Qwen2Tokenizer``, a qwen3 one
the generic fast tokenizer, which leaves ``unk_token`` unset): they pass when those agree.
"""

from __future__ import annotations

import os

# Fixed strings whose encodings must agree: words, digits, LaTeX, spaces, newlines, non-ASCII.
_SAMPLES = (
    "Hello world",
    "What is 12 + 35? Put your final answer within \\boxed{47}.",
    "  two  spaces\nand a newline\n\n",
    "x^2 - 3x = -2, so x \\in \\{1, 2\\}",
    "café naïve 数学 Ω",
)
_SPECIALS = ("pad_token_id", "eos_token_id", "bos_token_id")


class TokenizerMismatchError(ValueError):
    """Student and teacher tokenizers that would give the two models different token ids."""


def _load(path: str, role: str):
    from transformers import AutoConfig, AutoTokenizer

    if (os.path.sep in path or path.startswith(".")) and not os.path.isdir(path):
        raise FileNotFoundError(f"{role} model folder not found: {path}")
    try:
        return AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    except OSError as e:
        raise FileNotFoundError(f"cannot load the {role} model at {path!r}: {e}") from None


def tokenizer_difference(s_tok, t_tok) -> str | None:
    """The first difference that matters to the losses between two loaded tokenizers, in words, or None."""
    s_vocab, t_vocab = s_tok.get_vocab(), t_tok.get_vocab()
    if s_vocab != t_vocab:
        only_s = sorted(set(s_vocab.items()) - set(t_vocab.items()), key=lambda kv: kv[1])[:3]
        only_t = sorted(set(t_vocab.items()) - set(s_vocab.items()), key=lambda kv: kv[1])[:3]
        return (
            f"tokenizers differ: {len(s_vocab)} vs {len(t_vocab)} tokens; first (token, id) only in the "
            f"student's: {only_s}, only in the teacher's: {only_t}"
        )
    for name in _SPECIALS:
        a, b = getattr(s_tok, name, None), getattr(t_tok, name, None)
        if a is not None and b is not None and a != b:
            return f"{name} differs: {a} vs {b}"
    for text in _SAMPLES:
        a = s_tok.encode(text, add_special_tokens=False)
        b = t_tok.encode(text, add_special_tokens=False)
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            return (
                f"tokenizers encode {text!r} differently, first at token {at}: "
                f"{a[at : at + 5]} vs {b[at : at + 5]} (of {len(a)} vs {len(b)} tokens)"
            )
    return None


def check_compatible(student: str, teacher: str, *, full_vocab: bool = False):
    """The student's tokenizer, after checking the teacher's gives the same ids (see the module
    docstring). ``full_vocab`` also requires equal logit widths (config.vocab_size), which a
    full-vocabulary KL compares position by position. TokenizerMismatchError (a ValueError) names the
    tokenizer classes loaded and the first difference."""
    s_tok, s_cfg = _load(student, "student")
    if teacher == student:
        return s_tok
    t_tok, t_cfg = _load(teacher, "teacher")
    diff = tokenizer_difference(s_tok, t_tok)
    if diff is not None:
        raise TokenizerMismatchError(
            f"student ({student}, {type(s_tok).__name__}) and teacher ({teacher}, {type(t_tok).__name__}): {diff}"
        )
    if full_vocab and s_cfg.vocab_size != t_cfg.vocab_size:
        raise TokenizerMismatchError(
            f"algo.kl=full needs equal logit widths: student vocab_size {s_cfg.vocab_size}, teacher {t_cfg.vocab_size}"
        )
    return s_tok
