"""The typed configuration tree: YAML recipes plus dotted overrides, validated before any work.

A recipe is a YAML mapping with the sections below (all optional; defaults are the embedded toy
run). ``defaults: other.yaml`` at the top of a recipe derives it from another recipe (relative
path). Overrides are ``section.key=value`` with YAML-typed values (``algo.tau=0.5``,
``rollout.servers=[http://h:30000]``). An unknown key, a wrong type or a bad value raises
ConfigError naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import string
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from scope_ds.choices import check_choice, check_literal_fields, literal_values
from scope_ds.config.algo import (  # noqa: F401 (the options' names are the config's)
    ALGO_OPTIONS,
    Aggregation,
    AlgoOptions,
    DistillOptions,
    GRPOOptions,
    KDOptions,
    KLForm,
    Normalization,
    OldLogprobs,
    OPDOptions,
    ScopeOptions,
    WeightMode,
    algo_options_class,
)
from scope_ds.config.errors import ConfigError

# A leaf: the config package imports nothing of scope_ds but choices.py, so every floor may read it.

GREEDY_EPS = 1e-6  # a sampling temperature below this is greedy (rollout/protocol.py, the servers)
TruncatedPolicy = Literal["verify", "incorrect", "skip"]
# where the teacher's (and GRPO reference's) weights live (engines/placement.py, docs/cluster.md)
TeacherPlacement = Literal["auto", "replicated", "tensor", "zero3"]


def _positive(key: str, value: float, strict: bool = True) -> None:
    if value < 0 or (strict and value == 0):
        raise ConfigError(f"{key} must be {'>' if strict else '>='} 0, got {value!r}")


@dataclass
class ModelConfig:
    student: str = "toy"  # Hugging Face folder or hub name of the student; "toy" = the built-in toy student
    teacher: str = "toy"  # folder or hub name of the teacher; "toy" = the built-in toy teacher
    dtype: Literal["float32", "bfloat16"] = "float32"  # parameter/compute dtype of both engines
    toy_cache: str = ""  # where the toy models are built ("" = $SCOPE_DS_CACHE or ~/.cache/scope_ds)
    gradient_checkpointing: bool = False  # recompute student activations in backward (saves memory)
    # The teacher's (and GRPO reference's) weights: replicated (whole on every rank, a plain module:
    # no gathers) | tensor (split by DeepSpeed AutoTP over model.teacher_tp_size ranks of a node) |
    # zero3 (partitioned over every rank, gathered layer by layer in every pass) | auto (from the
    # memory plan, engines/placement.py; its choice and numbers are logged at start-up)
    teacher_placement: TeacherPlacement = "auto"
    # ranks per tensor-parallel teacher (consecutive ranks of one node); 0: the smallest that fits
    # (auto), or every rank of the node (tensor)
    teacher_tp_size: int = 0

    def check(self) -> None:
        _positive("model.teacher_tp_size", self.teacher_tp_size, strict=False)


@dataclass
class DataConfig:
    source: str = "toy"  # "toy", a local JSON/JSONL/parquet file, or a Hugging Face dataset name
    split: str = "train"  # dataset split to train on
    prompt_key: str = "problem"  # field holding the question
    answer_key: str = "answer"  # field holding the reference answer
    template: str = "{prompt}\n\nPut your final answer within \\boxed{{}}."  # str.format with {prompt}
    chat_template: bool = True  # wrap with the tokenizer's chat template when it has one
    verifier: Literal["auto", "toy", "math"] = "auto"  # auto: toy for the toy source, math otherwise
    missing_answer: Literal["skip", "error"] = "skip"  # skip: skip rows without an answer, count them | error: refuse
    max_prompt_tokens: int = 512  # longer prompts (tokens as sent, chat template included) are skipped, counted
    # A truncated response (finish_reason "length"): verify: the verifier routes it, as any other
    # (the authors' code) | incorrect: it counts as incorrect whatever it holds | skip: not trained on
    truncated: TruncatedPolicy = "verify"
    verify_timeout_s: float = 30.0  # the trainer's verifier may take this long per answer; past it: incorrect, counted
    eval_every: int = 20  # evaluate on held-out prompts every N steps, and before the first (0 = never)
    eval_prompts: int = 128  # number of held-out prompts per evaluation
    eval_n: int = 4  # samples per held-out prompt (Avg@n, Pass@k for k <= n), at rollout.temperature
    seed: int = 0  # order of prompts
    # the toy task (source toy, and the toy models): chain (one solution text per problem) |
    # any-order (sums in any order: correct answers differ in text, so SCOPE's weights can; docs/study.md)
    toy_variant: Literal["chain", "any-order"] = "chain"

    def check(self) -> None:
        _positive("data.max_prompt_tokens", self.max_prompt_tokens)
        _positive("data.eval_every", self.eval_every, strict=False)
        _positive("data.eval_prompts", self.eval_prompts)
        _positive("data.eval_n", self.eval_n)
        _positive("data.verify_timeout_s", self.verify_timeout_s)
        if "{prompt}" not in self.template:
            raise ConfigError(f"data.template must contain {{prompt}}, got {self.template!r}")


@dataclass
class RolloutConfig:
    servers: list[str] = field(default_factory=list)  # attach to these URLs; empty = launch servers
    # Bearer key of the servers (SGLang's --api-key): launched ones get it ("" = a fresh one per run);
    # attached ones (rollout.servers) are sent it ("" = they require none)
    api_key: str = ""
    backend: Literal["embedded", "sglang"] = "embedded"  # what to launch: embedded (CPU, tests) | sglang (GPUs)
    num_servers: int = 1  # servers to launch (one per GPU group with sglang)
    gpus_per_server: int = 1  # tensor-parallel size of each launched sglang server
    n: int = 4  # rollouts per prompt (the group size)
    temperature: float = 1.0  # sampling temperature; log-probs (behaviour and teacher) are taken at it
    top_p: float = 1.0  # nucleus sampling
    top_k: int = -1  # -1 = whole vocabulary
    max_new_tokens: int = 64  # response length cap, tokens
    seeded: bool = True  # seed every prompt's samples (sampling_seed) so that runs and resumes repeat exactly
    # a sample interrupted by a weight update: continued from its tokens so far by the new weights
    # (true), or generated again from its first token (false; the tokens so far are thrown away)
    partial_rollouts: bool = True
    # disk: a safetensors folder + /update_weights_from_disk | distributed: broadcast to the servers
    weight_sync: Literal["disk", "distributed"] = "disk"
    bucket_mb: int = 512  # distributed sync: bytes per broadcast bucket, MB
    sync_dir: str = ""  # disk sync: shared folder for the weights ("" = OUT/weights)
    request_timeout_s: float = 600.0  # one /generate request
    retries: int = 3  # retries of a request on connection errors / 5xx before failing
    startup_timeout_s: float = 300.0  # launched servers must answer /health within this

    def check(self) -> None:
        for key in ("num_servers", "gpus_per_server", "n", "max_new_tokens", "bucket_mb"):
            _positive(f"rollout.{key}", getattr(self, key))
        if self.temperature < GREEDY_EPS:
            raise ConfigError(
                f"rollout.temperature must be >= {GREEDY_EPS:g}, got {self.temperature!r}: below it servers sample "
                "greedily and report log-probs at T = 1 while the trainer divides by the raw value, and "
                "greedy rollouts cannot train these losses"
            )
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ConfigError(f"rollout.top_k must be -1 (whole vocabulary) or >= 1, got {self.top_k}")
        _positive("rollout.retries", self.retries, strict=False)
        _positive("rollout.request_timeout_s", self.request_timeout_s)
        _positive("rollout.startup_timeout_s", self.startup_timeout_s)


@dataclass
class TrainConfig:
    steps: int = 60  # optimizer steps (one per global batch)
    prompts_per_step: int = 16  # prompts per global batch (x rollout.n rollouts)
    # Micro-batches: rollouts packed padding-free into at most this many tokens (prompt + response)
    # per forward/backward on one rank, the batch balanced over ranks by tokens (docs/pipeline.md)
    max_tokens_per_micro_batch: int = 4096
    score_max_tokens_per_micro_batch: int = 16384  # the teacher's (inference-only) forwards: no backward
    packing: bool = True  # false: today's padded micro-batches of micro_batch_size rollouts, full logits
    # packing: a prompt's rollouts in one micro-batch hold the prompt once, each response attending
    # to it (engines/attention.py); only with our packed SDPA attention, off by itself elsewhere
    share_prompts: bool = True
    micro_batch_size: int = 4  # packing=false only: rollouts per forward/backward on one rank
    score_batch_size: int = 16  # packing=false only: rollouts per teacher forward on one rank
    lr: float = 5e-5  # AdamW learning rate, constant after warmup (paper: 5e-5)
    weight_decay: float = 0.01  # AdamW weight decay (paper: 0.01)
    warmup_steps: int = 0  # linear warmup
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    seed: int = 0  # seeds torch, the data order and the rollout server
    ds_config: str = "ds_configs/zero3.json"  # student DeepSpeed JSON (relative to the repo or absolute)
    teacher_ds_config: str = "ds_configs/teacher.json"  # the teacher's DeepSpeed JSON (model.teacher_placement=zero3)
    # The student's ZeRO stage, over the JSON's (0-3; null: the JSON's, 3 in zero3.json). 0-2 keep a
    # whole copy of the weights on every rank: no per-layer gathers, for models that fit one device.
    zero_stage: int | None = None
    logprob_chunk: int = 0  # tokens per chunk of the log-prob ops (0 = as many as fit in 32 MiB of logits)

    def check(self) -> None:
        for key in (
            "steps",
            "prompts_per_step",
            "micro_batch_size",
            "score_batch_size",
            "max_tokens_per_micro_batch",
            "score_max_tokens_per_micro_batch",
        ):
            _positive(f"train.{key}", getattr(self, key))
        _positive("train.lr", self.lr)
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage must be 0, 1, 2, 3 or null, got {self.zero_stage!r}")
        for key in ("weight_decay", "warmup_steps", "grad_clip", "logprob_chunk"):
            _positive(f"train.{key}", getattr(self, key), strict=False)


@dataclass
class PipelineConfig:
    max_staleness: int = 0  # 0 = synchronous; k >= 1: rollouts at most k policy versions old
    queue_size: int = 2  # batches buffered between stages
    overlap_teacher: bool = False  # teacher scores batch s+1 beside the update of s (gloo only; docs/pipeline.md)
    # k >= 1: the weight sync after an update waits while the trainer's next batch is still being
    # generated (the trainer waits for that batch anyway), so the sync does not interrupt its samples;
    # false: sync at once, and the interrupted samples continue on the new weights (partial rollouts)
    sync_between_batches: bool = True
    wait_timeout_s: float = 3600.0  # longest the trainer waits for its next batch before failing with an error

    def check(self) -> None:
        _positive("pipeline.max_staleness", self.max_staleness, strict=False)
        _positive("pipeline.queue_size", self.queue_size)
        _positive("pipeline.wait_timeout_s", self.wait_timeout_s)


@dataclass
class ParallelConfig:
    # Ranks per sequence-parallel group (DeepSpeed Ulysses): each packed row is split along the
    # sequence over sp consecutive ranks, attention all-to-alls heads (docs/cluster.md); the batch
    # is shared by world / sp data-parallel groups, ZeRO-3 still partitions over every rank
    sequence_parallel_size: int = 1
    # DeepSpeed's TiledMLP around every engine's MLPs: shards of the sequence at a time, recomputed
    # in backward (one more MLP forward), for rows whose MLP activations do not fit
    tiled_mlp: bool = False

    def check(self) -> None:
        _positive("parallel.sequence_parallel_size", self.sequence_parallel_size)


@dataclass
class CheckpointConfig:
    dir: str = ""  # where checkpoints go ("" = OUT/checkpoints)
    every: int = 0  # save every N steps (0 = only at the end)
    keep: int = 2  # keep the last K checkpoints
    resume: str = "none"  # none | auto (latest complete checkpoint) | a checkpoint folder
    export_hf: bool = False  # also write a Hugging Face folder at the end

    def check(self) -> None:
        _positive("checkpoint.every", self.every, strict=False)
        _positive("checkpoint.keep", self.keep)
        if self.resume not in ("none", "auto") and not os.path.isdir(self.resume):
            raise ConfigError(
                f"checkpoint.resume: no checkpoint folder at {self.resume!r} (from {os.getcwd()}); "
                "give an existing checkpoint folder (OUT/checkpoints/step_N), auto or none"
            )


@dataclass
class LoggingConfig:
    out_dir: str = "runs/{run_name}"  # run folder; {run_name} is replaced
    run_name: str = "toy-scope"  # name of the run
    tensorboard: bool = True  # write TensorBoard events to OUT/tensorboard
    wandb: bool = False  # also log to Weights & Biases (needs wandb installed and a login)
    progress: bool = True  # show a progress bar on rank 0
    rollouts: bool = True  # write OUT/rollouts/step_N.jsonl
    overwrite: bool = False  # a fresh run into a used run folder: delete its outputs first (else refused)

    def check(self) -> None:
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(self.out_dir) if name is not None}
        except ValueError as e:  # an unmatched brace
            raise ConfigError(
                f"logging.out_dir {self.out_dir!r} is malformed ({e}); write braces as {{{{ }}}}"
            ) from None
        unknown = sorted(fields - {"run_name"})
        if unknown:
            raise ConfigError(
                f"logging.out_dir {self.out_dir!r} has unknown placeholder(s) {unknown}; "
                "only {run_name} is known (write a literal brace as {{ or }})"
            )

    @property
    def run_dir(self) -> str:
        return self.out_dir.format(run_name=self.run_name)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoOptions = field(default_factory=ScopeOptions)  # algo.name's options (ALGO_OPTIONS)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def check(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                # load_config refuses a bad choice already; this catches one set in code
                check_literal_fields(section, f.name, ConfigError)
            if hasattr(section, "check"):
                section.check()
        algo = self.algo
        algo.check()
        if self.rollout.n < algo.min_group_size:
            raise ConfigError(
                f"rollout.n={self.rollout.n} is too small for algo {algo.name!r}: it needs rollout.n >= "
                f"{algo.min_group_size}, since its group-normalised advantage is 0 for a group of one rollout "
                "and the run would train nothing"
            )
        if self.train.packing:
            longest = self.data.max_prompt_tokens + self.rollout.max_new_tokens
            for key in ("max_tokens_per_micro_batch", "score_max_tokens_per_micro_batch"):
                if getattr(self.train, key) < longest:
                    raise ConfigError(
                        f"train.{key}={getattr(self.train, key)} cannot hold the longest rollout: "
                        f"data.max_prompt_tokens ({self.data.max_prompt_tokens}) + rollout.max_new_tokens "
                        f"({self.rollout.max_new_tokens}) = {longest} tokens; raise it to at least {longest}"
                    )
        if self.pipeline.overlap_teacher and algo.uses_full_kl:
            raise ConfigError(
                "pipeline.overlap_teacher=true cannot run with algo.kl=full: the update itself runs the teacher "
                "(its full logits), so there is nothing to score beside it; set pipeline.overlap_teacher=false"
            )

        self._check_sequence_parallel()
        self._check_teacher_placement()

    def _check_teacher_placement(self) -> None:
        m = self.model
        if m.teacher_tp_size > 1 and m.teacher_placement not in ("auto", "tensor"):
            raise ConfigError(
                f"model.teacher_tp_size={m.teacher_tp_size} splits a tensor-parallel teacher, and "
                f"model.teacher_placement={m.teacher_placement} holds none: set model.teacher_placement=tensor (or "
                "auto), or leave model.teacher_tp_size at 0"
            )
        if m.teacher_placement != "tensor":
            return
        if not self.train.packing:
            raise ConfigError("model.teacher_placement=tensor scores packed micro-batches: set train.packing=true")
        if self.pipeline.overlap_teacher:
            raise ConfigError(
                "model.teacher_placement=tensor: the teacher's all-reduces are not run beside the update's; set "
                "pipeline.overlap_teacher=false, or model.teacher_placement=replicated"
            )

    def _check_sequence_parallel(self) -> None:
        sp, t = self.parallel.sequence_parallel_size, self.train
        if sp == 1:
            return
        key = f"parallel.sequence_parallel_size={sp}"
        if not t.packing:
            raise ConfigError(f"{key} splits packed rows along the sequence: set train.packing=true")
        if t.share_prompts:
            raise ConfigError(
                f"{key} cannot split a row whose rollouts share their prompt (each response's first token is "
                "scored at the prompt's end, away from its other tokens): set train.share_prompts=false"
            )
        if self.pipeline.overlap_teacher:
            raise ConfigError(
                f"{key}: the teacher's all-to-alls are not run beside the update's; set pipeline.overlap_teacher=false"
            )
        for budget in ("max_tokens_per_micro_batch", "score_max_tokens_per_micro_batch"):
            if getattr(t, budget) < sp:
                raise ConfigError(
                    f"train.{budget}={getattr(t, budget)} is smaller than {key}: every rank of a group needs "
                    f"a slice of the row; raise it to at least {sp}"
                )

    def to_dict(self) -> dict[str, Any]:
        """Every key, defaults included; ``algo`` with its name and the options its algorithm has."""
        out = dataclasses.asdict(self)
        out["algo"] = {"name": self.algo.name, **{k: getattr(self.algo, k) for k in self.algo.keys()}}
        return out


# ---------------------------------------------------------------------------------- loading


def coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` as type ``hint``, or ConfigError naming ``key`` (an int is a fine float).

    A ``Literal[...]`` hint takes a value of its values' type that is one of them."""
    choices = literal_values(hint)
    if choices is not None:
        value = coerce(key, value, type(choices[0]))
        check_choice(key, value, choices, ConfigError)
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:  # X | None
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(key, value, inner)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-5 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and (type(value) is not hint):
        quote = " (quote it in YAML: braces and ': ' make a mapping)" if hint is str and isinstance(value, dict) else ""
        raise ConfigError(f"{key} must be {hint.__name__}, got {value!r} ({type(value).__name__}){quote}")
    return value


# keys that were replaced: what to write instead
MOVED = {
    "train.teacher_zero_stage": "use model.teacher_placement (replicated for a whole teacher, as stage 0 was; "
    "zero3 for a partitioned one)",
}


def _apply(section: Any, name: str, values: dict[str, Any]) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{name} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(section))
    for key, value in values.items():
        if f"{name}.{key}" in MOVED:
            raise ConfigError(f"{name}.{key} is gone: {MOVED[f'{name}.{key}']}")
        if key not in hints:
            raise ConfigError(f"unknown key {name}.{key}; allowed: {sorted(hints)}")
        setattr(section, key, coerce(f"{name}.{key}", value, hints[key]))


def read_recipe(path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The recipe's mapping, merged over the recipe it names in ``defaults`` (if any)."""
    if not os.path.isfile(path):
        raise ConfigError(f"recipe not found: {path}")
    # Real paths, so that ./c.yaml, ../sub/c.yaml and a symlink are all the same recipe.
    real = os.path.realpath(path)
    if real in seen:
        chain = " -> ".join([*seen[seen.index(real) :], real])
        raise ConfigError(f"recipe {path}: defaults form a cycle: {chain}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"malformed recipe {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"malformed recipe {path}: the top level must be a mapping of sections")
    base = data.pop("defaults", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(
            f"defaults in {path} must be one recipe path (relative to the recipe), got {base!r}; "
            "to derive from several, chain them: each recipe names one defaults"
        )
    merged = read_recipe(os.path.join(os.path.dirname(path), base), (*seen, real))
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def parse_override(item: str) -> tuple[list[str], Any]:
    """``section.key=value`` as ([section, key], value), the value read as the key's type reads it
    (``read_value``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be section.key (e.g. algo.tau=0.5)")
    return parts, read_value(raw, _field_hint(*parts))


def read_value(raw: str, hint: Any) -> Any:
    """A command-line value as its option's type reads it: an option typed ``str`` takes the text as
    written (``data.template=Q: {prompt}``, ``logging.run_name=007``), ``str | None`` too but for
    ``null``; any other is read as YAML (``8``, ``1e-3``, ``null``, ``[a, b]``), and text YAML cannot
    read stays text (refused by ``coerce``, naming the key, where the type wants otherwise)."""
    if hint is str:
        return raw
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and str in typing.get_args(hint):
        return None if raw.strip() in ("null", "~") else raw
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _field_hint(section: str, key: str) -> Any:
    """The type of config field ``section.key``; None for an unknown one (refused later, by name)."""
    section_type = typing.get_type_hints(Config).get(section)
    if not (isinstance(section_type, type) and dataclasses.is_dataclass(section_type)):
        return None
    return typing.get_type_hints(section_type).get(key)


def load_config(recipe: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build and validate the config from a recipe (or the toy defaults) and dotted overrides."""
    data = read_recipe(recipe) if recipe else {}
    for item in overrides:
        (section, key), value = parse_override(item)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"{section} must be a mapping in the recipe, got {data[section]!r}")
        data[section][key] = value
    cfg = Config()
    sections = {f.name for f in dataclasses.fields(cfg)}
    for name, values in data.items():
        if name not in sections:
            raise ConfigError(f"unknown section {name!r}; allowed: {sorted(sections)}")
        if name == "algo":
            _apply_algo(cfg, values)
        else:
            _apply(getattr(cfg, name), name, values)
    cfg.check()
    return cfg


def _apply_algo(cfg: Config, values: Any) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"algo must be a mapping, got {values!r}")
    cls = algo_options_class(values.get("name", "scope"))
    allowed = cls.keys()
    unknown = sorted(set(values) - set(allowed) - {"name"})
    if unknown:
        raise ConfigError(
            f"unknown key(s) {['algo.' + k for k in unknown]} for algo {cls.name!r}; allowed: {sorted(allowed)}"
        )
    hints = typing.get_type_hints(cls)
    cfg.algo = cls(**{k: coerce(f"algo.{k}", v, hints[k]) for k, v in values.items() if k != "name"})


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config (every key, defaults included) as YAML."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
