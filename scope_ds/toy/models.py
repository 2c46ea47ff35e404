"""Pre-trains the embedded default's toy teacher and student (and their tokenizer), and measures them.

The teacher and the student are ordinary Hugging Face Llama folders (config, safetensors weights,
tokenizer, generation config) pre-trained with plain PyTorch SFT on worked toy solutions. Both
stop on accuracy measured on the dev split by sampling at temperature 1, the way the trainer
samples: the teacher once it is reliably right, the student as soon as it is right about
STUDENT_STOP of the time. Stopping the student there, rather than after a fixed number of steps,
keeps it inside the target band (0.2-0.6 on held-out prompts) whatever the seed or the speed of
the machine, and leaves it a model that SCOPE can still improve.

Legend for tensor names: N = examples in the pool, B = batch, T = tokens.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece as spm
import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    PreTrainedTokenizerBase,
)

from scope_ds.toy.cache import BUILD_VERSION, ToyModels, build_folder, cache_base, finished_build
from scope_ds.toy.task import ToyProblem, random_order_steps, toy_problems, toy_prompt, toy_solution
from scope_ds.toy.verify import verify_toy

VOCAB_SIZE = 64  # sentencepiece BPE: digits one by one, a few whole words ("▁Compute", "▁Answer")
MAX_NEW_TOKENS = 64  # longest toy solution is under 50 tokens
MAX_POSITIONS = 128
TEACHER_STOP = 0.92  # dev accuracy at which the teacher has learnt enough (target: >= 0.8 held out)
STUDENT_STOP = 0.35  # dev accuracy at which the student stops (target: 0.2-0.6 held out)


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and SFT schedule of one toy model."""

    hidden_size: int  # model width
    num_layers: int  # transformer blocks
    num_heads: int  # attention heads (as many key/value heads)
    intermediate_size: int  # MLP width
    max_steps: int  # SFT optimizer steps at most; also the length of the cosine schedule
    lr: float  # peak AdamW learning rate, reached after `warmup` steps
    warmup: int  # linear warm-up steps
    batch_size: int  # sequences per step
    eval_every: int  # steps between dev evaluations once dev accuracy is past half of stop_at (twice that before)
    first_eval: int  # no dev evaluation before this step: the model cannot be right yet
    stop_at: float  # stop SFT at the first dev evaluation reaching this accuracy


# 0.86M parameters; reaches TEACHER_STOP after 850-1000 steps (seeds 0-2), else ends near 0.9 at max_steps.
TEACHER = ModelSpec(128, 4, 4, 384, 1000, 2e-3, 50, 32, 50, 400, TEACHER_STOP)
# 0.18M parameters, a fifth of the teacher; crosses STUDENT_STOP after 600-700 steps (seeds 0-2), at up
# to 0.08 per evaluation, so the stop lands inside the band. The long cosine keeps the learning rate
# high whenever that happens: a decayed rate left a slow seed stuck near 0.2.
STUDENT = ModelSpec(80, 2, 4, 256, 2400, 3e-3, 50, 32, 20, 400, STUDENT_STOP)


def _solutions(problems: Sequence[ToyProblem], seed: int) -> list[str]:
    """The SFT solution of each problem: its own order, or (any-order variant) a random valid
    order per problem, fixed by the seed and the expression."""
    return [
        toy_solution(p, random_order_steps(p, random.Random(f"order:{seed}:{p.expression}")) if p.any_order else None)
        for p in problems
    ]


def train_tokenizer(seed: int = 0, n_problems: int = 5000, variant: str = "chain") -> PreTrainedTokenizerBase:
    """A sentencepiece BPE model trained on toy prompts and solutions, as a Hugging Face tokenizer."""
    problems = toy_problems("train", n_problems, seed, variant=variant)
    lines = [toy_prompt(p) + sol for p, sol in zip(problems, _solutions(problems, seed), strict=True)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        split_digits=True,  # numbers digit by digit: the steps of arithmetic the model must learn
        character_coverage=1.0,
        normalization_rule_name="identity",  # keep "\boxed{...}" byte for byte
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece="<pad>",
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        num_threads=1,  # one thread: the same pieces on every machine
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(model.getvalue())
        # transformers converts the sentencepiece model into a `tokenizers` one; the saved folder then
        # holds tokenizer.json and loads without sentencepiece or network.
        return LlamaTokenizer.from_pretrained(
            tmp, pad_token="<pad>", add_bos_token=True, add_eos_token=False, model_max_length=MAX_POSITIONS
        )


def new_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    return model


def sft_tensors(
    tokenizer: PreTrainedTokenizerBase, problems: Sequence[ToyProblem], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels; labels are -100 on the prompt and padding (loss on solutions only)."""
    prompts = tokenizer([toy_prompt(p) for p in problems])["input_ids"]
    fulls = tokenizer([toy_prompt(p) + sol for p, sol in zip(problems, _solutions(problems, seed), strict=True)])
    fulls = fulls["input_ids"]
    length = max(len(f) for f in fulls) + 1
    ids_NT = torch.full((len(problems), length), tokenizer.pad_token_id, dtype=torch.long)
    labels_NT = torch.full_like(ids_NT, -100)
    for i, (prompt, full) in enumerate(zip(prompts, fulls, strict=True)):
        # Generation continues the prompt's own tokens, so training must see exactly those.
        if full[: len(prompt)] != prompt:
            raise ValueError(f"toy prompt tokens are not a prefix of prompt + solution: {toy_prompt(problems[i])!r}")
        seq = full + [tokenizer.eos_token_id]
        ids_NT[i, : len(seq)] = torch.tensor(seq)
        labels_NT[i, len(prompt) : len(seq)] = torch.tensor(seq[len(prompt) :])
    return ids_NT, labels_NT


@contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def sampled_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[ToyProblem],
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
) -> float:
    """Share of `problems` whose sampled solution verifies: one sample each, plain temperature sampling
    (no top-k or top-p), temperature 0 meaning greedy. The global torch RNG is left as it was."""
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    if temperature == 0:
        sampling = {"do_sample": False}
    correct = 0.0
    with _eval_mode(model), torch.random.fork_rng():
        torch.manual_seed(seed)
        for start in range(0, len(problems), batch_size):
            batch = problems[start : start + batch_size]
            enc = tokenizer([toy_prompt(p) for p in batch], return_tensors="pt", padding=True, padding_side="left")
            out_BT = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, **sampling)
            texts = tokenizer.batch_decode(out_BT[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += sum(verify_toy(text, str(p.answer)) for p, text in zip(batch, texts, strict=True))
    return correct / len(problems)


def toy_accuracy(
    model_dir: str | Path,
    n_prompts: int,
    temperature: float = 1.0,
    seed: int = 0,
    split: str = "test",
    variant: str = "chain",
) -> float:
    """Accuracy of the model folder on `n_prompts` problems of `split`, one HF-generate sample each.

    `seed` picks the problems and seeds the sampling, so the figure is reproducible."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return sampled_accuracy(model, tokenizer, toy_problems(split, n_prompts, seed, variant=variant), temperature, seed)


def _lr_factor(step: int, spec: ModelSpec) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak at max_steps."""
    if step < spec.warmup:
        return (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.max_steps - spec.warmup)
    return 0.1 + 0.45 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())


def sft(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    spec: ModelSpec,
    data: tuple[torch.Tensor, torch.Tensor],
    dev: Sequence[ToyProblem],
    seed: int,
    bar: tqdm | None = None,
) -> dict:
    """Trains `model` on (ids, labels) until dev accuracy reaches spec.stop_at or max_steps; returns a summary."""
    ids_NT, labels_NT = data
    batches = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, spec))
    history: list[tuple[int, float]] = []
    model.train()
    for step in range(1, spec.max_steps + 1):
        rows = torch.randint(len(ids_NT), (spec.batch_size,), generator=batches)
        mask_BT = ids_NT[rows] != tokenizer.pad_token_id
        width = int(mask_BT.sum(1).max())  # drop the columns that are padding in the whole batch
        loss = model(
            input_ids=ids_NT[rows, :width], attention_mask=mask_BT[:, :width].long(), labels=labels_NT[rows, :width]
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", dev=f"{history[-1][1]:.2f}" if history else "-", refresh=False)
        # Far from the stop, evaluate half as often: each evaluation samples the whole dev set.
        every = spec.eval_every if history and history[-1][1] >= spec.stop_at / 2 else 2 * spec.eval_every
        if step >= spec.first_eval and step % every == 0:
            history.append((step, sampled_accuracy(model, tokenizer, dev, 1.0, seed=seed + step)))
            if history[-1][1] >= spec.stop_at:
                break
    return {"steps": step, "final_loss": loss.item(), "dev_history": history}


N_TRAIN = 30_000  # distinct training problems; SFT draws batches from them with replacement
N_DEV = 200  # dev problems behind the stopping decisions
N_TEST = 500  # held-out problems behind the accuracies in the build report


def _train_one(
    name: str,
    spec: ModelSpec,
    tokenizer: PreTrainedTokenizerBase,
    data: tuple[torch.Tensor, torch.Tensor],
    dev: Sequence[ToyProblem],
    out: Path,
    seed: int,
    progress: bool,
) -> dict:
    start = time.perf_counter()
    model = new_model(spec, tokenizer, seed)
    with tqdm(total=spec.max_steps, desc=f"toy {name} SFT", disable=not progress, dynamic_ncols=True) as bar:
        summary = sft(model, tokenizer, spec, data, dev, seed, bar)
        bar.total = bar.n  # an early stop is a finished run, not an interrupted one
        bar.refresh()
    model.save_pretrained(out / name)
    tokenizer.save_pretrained(out / name)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        **summary,
        "spec": asdict(spec),
        "train_s": round(time.perf_counter() - start, 1),
    }


def build_toy_models(out: str | Path, seed: int = 0, progress: bool = True, variant: str = "chain") -> dict:
    """Trains tokenizer, teacher and student into `out`/{teacher,student}; returns the build report.

    The report's test_accuracy figures are measured on the saved folders (N_TEST held-out problems,
    temperature 1), so they are what any later loader of those folders gets.
    """
    start = time.perf_counter()
    out = Path(out)
    tokenizer = train_tokenizer(seed, variant=variant)
    data = sft_tensors(tokenizer, toy_problems("train", N_TRAIN, seed, variant=variant), seed)
    dev = toy_problems("dev", N_DEV, seed, variant=variant)
    report: dict = {
        "version": BUILD_VERSION,
        "variant": variant,
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
    }
    for name, spec in (("teacher", TEACHER), ("student", STUDENT)):
        report[name] = _train_one(name, spec, tokenizer, data, dev, out, seed, progress)
    for name in ("teacher", "student"):
        report[name]["test_accuracy"] = toy_accuracy(out / name, N_TEST, 1.0, seed, variant=variant)
    report["build_s"] = round(time.perf_counter() - start, 1)
    (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def ensure_toy_models(
    cache_dir: str | Path | None = None, seed: int = 0, progress: bool = True, variant: str = "chain"
) -> ToyModels:
    """The toy teacher and student under `cache_dir` (default: default_cache_dir()), built if missing.

    A build is written to a temporary folder and renamed into place when complete, so a folder that
    exists is whole; an exclusive lock on `cache_dir`/.lock makes concurrent callers (several ranks,
    several runs) wait for one build instead of racing.
    """
    import fcntl  # POSIX only, like the rest of the trainer

    base = cache_base(cache_dir)
    root = build_folder(base, seed, variant)
    if found := finished_build(root):
        return found
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if found := finished_build(root):  # built by whoever held the lock before us
            return found
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=base))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            build_toy_models(tmp, seed, progress, variant)
            if root.exists():  # a folder without a report: left by hand or an old crash; not ours to trust
                shutil.rmtree(root)
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not (found := finished_build(root)):
        raise RuntimeError(f"toy model build finished but {root} holds no build_report.json")
    return found
