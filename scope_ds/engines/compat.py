"""Start-up check that student and teacher speak the same tokens."""

from __future__ import annotations

import os


def _load(path: str, role: str):
    from transformers import AutoConfig, AutoTokenizer

    if (os.path.sep in path or path.startswith(".")) and not os.path.isdir(path):
        raise FileNotFoundError(f"{role} model folder not found: {path}")
    try:
        return AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    except OSError as e:
        raise FileNotFoundError(f"cannot load the {role} model at {path!r}: {e}") from None


def check_compatible(student: str, teacher: str, *, full_vocab: bool = False):
    """The student's tokenizer, after checking the teacher's maps every token and special token to
    the same id. ``full_vocab`` also requires equal logit widths (config.vocab_size), which a
    full-vocabulary KL compares position by position. Raises ValueError naming the difference."""
    s_tok, s_cfg = _load(student, "student")
    if teacher == student:
        return s_tok
    t_tok, t_cfg = _load(teacher, "teacher")
    s_vocab, t_vocab = s_tok.get_vocab(), t_tok.get_vocab()
    if s_vocab != t_vocab:
        diff = sorted(set(s_vocab.items()) ^ set(t_vocab.items()))[:5]
        raise ValueError(
            f"student ({student}) and teacher ({teacher}) tokenizers differ: {len(s_vocab)} vs {len(t_vocab)} "
            f"tokens; first differences: {diff}"
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        a, b = getattr(s_tok, name, None), getattr(t_tok, name, None)
        if a != b:
            raise ValueError(f"student and teacher disagree on {name}: {a} vs {b}")
    if full_vocab and s_cfg.vocab_size != t_cfg.vocab_size:
        raise ValueError(
            f"algo.kl=full needs equal logit widths: student vocab_size {s_cfg.vocab_size}, teacher {t_cfg.vocab_size}"
        )
    return s_tok
