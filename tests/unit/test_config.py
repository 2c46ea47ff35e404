"""The config tree: recipes, derivation, dotted overrides, and errors that name the key."""

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from scope_ds.algorithms import GRPO, algorithm_of
from scope_ds.config import ConfigError, GRPOOptions, OPDOptions, ScopeOptions, load_config, save_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_toy_scope_run():
    """Config()'s defaults are what `deepspeed scope_ds/train.py` with no arguments runs (recipes/toy.yaml)."""
    assert load_config().to_dict() == load_config(str(REPO / "recipes" / "toy.yaml")).to_dict()
    cfg = load_config()
    assert cfg.model.student == cfg.model.teacher == "toy"
    assert cfg.algo == ScopeOptions() and cfg.pipeline.max_staleness == 0


def test_recipe_derivation_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("rollout:\n  n: 8\n  temperature: 0.6\ntrain:\n  lr: 1e-5\n")
    (tmp_path / "child.yaml").write_text("defaults: base.yaml\nrollout:\n  n: 2\nalgo:\n  name: opd\n")
    cfg = load_config(str(tmp_path / "child.yaml"), ["algo.kl=full", "rollout.servers=[http://h:1, http://h:2]"])
    assert cfg.rollout.n == 2 and cfg.rollout.temperature == 0.6  # child wins, base fills in
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 1e-5 as a string
    assert cfg.algo == OPDOptions(kl="full") and cfg.algo.name == "opd"
    assert cfg.rollout.servers == ["http://h:1", "http://h:2"]


def test_resolved_config_is_written_with_every_key(tmp_path):
    cfg = load_config(None, ["algo.tau=0.5"])
    save_config(cfg, str(tmp_path / "run" / "config.yaml"))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["algo"]["tau"] == 0.5 and saved["algo"]["normalization"] == "sum"
    assert saved["algo"]["old_logprobs"] == "recompute" and saved["algo"]["mismatch_cap"] == 2.0
    assert saved["train"]["steps"] == cfg.train.steps
    # the written file is itself a valid recipe that gives the same config
    again = load_config(str(tmp_path / "run" / "config.yaml"))
    assert again.to_dict() == cfg.to_dict() == saved and again.algo == cfg.algo


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["rollout.nn=1"], "unknown key rollout.nn; allowed: ["),
        (["bogus.key=1"], "unknown section 'bogus'"),
        (["rollout.n=many"], "rollout.n must be int, got 'many'"),
        (["rollout.n=0"], "rollout.n must be > 0"),
        (["rollout.top_p=1.5"], "rollout.top_p must be in (0, 1]"),
        (["rollout.weight_sync=ssh"], "rollout.weight_sync must be one of ['disk', 'distributed']"),
        (["model.dtype=fp16"], "model.dtype must be one of ['float32', 'bfloat16'], got 'fp16'"),
        (["model.dtype=16"], "model.dtype must be str, got 16"),
        (["data.verifier=gsm"], "data.verifier must be one of ['auto', 'toy', 'math']"),
        (["data.truncated=drop"], "data.truncated must be one of ['verify', 'incorrect', 'skip'], got 'drop'"),
        (["data.truncated=1"], "data.truncated must be str, got 1"),
        (["rollout.temperature=0"], "rollout.temperature must be >= 1e-06, got 0.0: below it servers sample greedily"),
        (["rollout.temperature=1e-7"], "rollout.temperature must be >= 1e-06, got 1e-07"),
        (["rollout.temperature=-0.5"], "rollout.temperature must be >= 1e-06"),
        (["algo.kl=exact"], "algo.kl must be one of ['sampled', 'full'], got 'exact'"),
        (["algo.name=ppo"], "unknown algo.name 'ppo'"),
        (["algo.taux=2"], "['algo.taux']"),
        (["algo.tau=-1"], "algo.tau must be > 0"),
        (["algo.name=grpo", "algo.tau=1"], "for algo 'grpo'"),
        (["algo.old_logprobs=trainer"], "algo.old_logprobs must be one of ['recompute', 'server'], got 'trainer'"),
        (["algo.mismatch_cap=0.5"], "algo.mismatch_cap must be >= 1, got 0.5"),
        (["algo.name=kd", "algo.mismatch_cap=3"], "for algo 'kd'"),
        (["data.template=no placeholder"], "data.template must contain {prompt}"),
        (["train.steps=1.5"], "train.steps must be int"),
        (["train.zero_stage=4"], "train.zero_stage must be 0, 1, 2, 3 or null, got 4"),
        (["train.teacher_zero_stage=0"], "train.teacher_zero_stage is gone: use model.teacher_placement"),
        (["model.teacher_tp_size=-1"], "model.teacher_tp_size must be >= 0"),
        (["model.teacher_placement=whole"], "model.teacher_placement"),
        (["model.teacher_tp_size=2", "model.teacher_placement=zero3"], "model.teacher_tp_size=2 splits a tensor-par"),
        (["model.teacher_placement=tensor", "train.packing=false"], "placement=tensor scores packed micro-batches"),
        (
            ["model.teacher_placement=tensor", "pipeline.overlap_teacher=true"],
            "placement=tensor: the teacher's all-reduces are not run beside",
        ),
        (["rollout"], "must look like section.key=value"),
        (["a.b.c=1"], "must be section.key"),
        (["rollout.top_k=0"], "rollout.top_k must be -1 (whole vocabulary) or >= 1, got 0"),
        (["rollout.top_k=-2"], "rollout.top_k must be -1 (whole vocabulary) or >= 1, got -2"),
        (["rollout.request_timeout_s=0"], "rollout.request_timeout_s must be > 0"),
        (["rollout.startup_timeout_s=-5"], "rollout.startup_timeout_s must be > 0"),
        (["logging.out_dir=runs/{name}"], "logging.out_dir 'runs/{name}' has unknown placeholder(s) ['name']"),
        (["logging.out_dir=runs/{run_name}/{}"], "unknown placeholder(s) ['']"),
        (["logging.out_dir=runs/{run_name"], "logging.out_dir 'runs/{run_name' is malformed"),
        (["algo.name=grpo", "rollout.n=1"], "rollout.n=1 is too small for algo 'grpo': it needs rollout.n >= 2"),
        (["checkpoint.resume=/nonexistent/step_3"], "checkpoint.resume: no checkpoint folder at '/nonexistent/step_3'"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


SP2 = ["parallel.sequence_parallel_size=2", "train.share_prompts=false"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["parallel.sequence_parallel_size=0"], "parallel.sequence_parallel_size must be > 0"),
        (["parallel.sequence_parallel_size=2"], "parallel.sequence_parallel_size=2 cannot split a row whose rollouts "
         "share their prompt (each response's first token is scored at the prompt's end, away from its other "
         "tokens): set train.share_prompts=false"),
        ([*SP2, "train.packing=false"], "parallel.sequence_parallel_size=2 splits packed rows along the sequence: set "
         "train.packing=true"),
        ([*SP2, "pipeline.overlap_teacher=true"], "set pipeline.overlap_teacher=false"),
        ([*SP2, "parallel.sequence_parallel_size=4", "data.max_prompt_tokens=1", "rollout.max_new_tokens=1",
          "train.max_tokens_per_micro_batch=3"], "train.max_tokens_per_micro_batch=3 is smaller than "
         "parallel.sequence_parallel_size=4: every rank of a group needs a slice of the row; raise it to at least 4"),
    ],
)  # fmt: skip
def test_sequence_parallel_refusals_name_the_numbers_and_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
    assert load_config(None, SP2).parallel.sequence_parallel_size == 2


def test_overlap_teacher_with_the_full_kl_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="pipeline.overlap_teacher=true cannot run with algo.kl=full"):
        load_config(None, ["pipeline.overlap_teacher=true", "algo.kl=full"])
    assert load_config(None, ["pipeline.overlap_teacher=true"]).pipeline.overlap_teacher


def test_weight_modes_are_words_yaml_keeps():
    """`off` / `on` would reach the config as booleans; the modes are ppl | uniform | reversed."""
    cfg = load_config(None, ["algo.student_weight=uniform", "algo.teacher_weight=reversed"])
    assert (cfg.algo.student_weight, cfg.algo.teacher_weight) == ("uniform", "reversed")
    with pytest.raises(ConfigError, match="algo.student_weight"):
        load_config(None, ["algo.student_weight=off"])


def test_truncated_choices_and_the_smallest_temperature_load():
    assert load_config().data.truncated == "verify"  # the authors' routing
    for value in ("verify", "incorrect", "skip"):
        assert load_config(None, [f"data.truncated={value}"]).data.truncated == value
    assert load_config(None, ["rollout.temperature=1e-6"]).rollout.temperature == 1e-6  # not greedy yet


def test_the_algo_section_is_its_algorithms_typed_options():
    cfg = load_config(None, ["algo.name=grpo", "algo.eps=0.1"])
    assert cfg.algo == GRPOOptions(eps=0.1)
    algo = algorithm_of(cfg.algo)
    assert isinstance(algo, GRPO) and (algo.name, algo.eps, algo.kl_coef) == ("grpo", 0.1, 1e-4)
    cfg = load_config(None, ["algo.tau=0.5", "algo.is_cap=2"])
    assert algorithm_of(cfg.algo).tau == 0.5 and cfg.algo.is_cap == 2.0 and isinstance(cfg.algo.is_cap, float)
    assert load_config(None, ["algo.is_cap=null"]).algo.is_cap is None
    with pytest.raises(ConfigError, match="algo.is_cap must be float"):
        load_config(None, ["algo.is_cap=big"])
    cfg.algo.tau = -1.0  # set in code: the config's check and the algorithm both refuse it
    with pytest.raises(ConfigError, match="algo.tau must be > 0"):
        cfg.check()
    with pytest.raises(ConfigError, match="algo.tau must be > 0"):
        algorithm_of(cfg.algo)


def test_a_bad_choice_set_in_code_is_caught_by_check():
    cfg = load_config()
    cfg.rollout.backend = "vllm"
    with pytest.raises(ConfigError, match=r"rollout.backend must be one of \['embedded', 'sglang'\]"):
        cfg.check()


def test_bad_recipes(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="malformed recipe"):
        load_config(str(tmp_path / "bad.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(tmp_path / "list.yaml"))
    (tmp_path / "loop.yaml").write_text("defaults: loop.yaml\n")
    with pytest.raises(ConfigError, match="defaults form a cycle"):
        load_config(str(tmp_path / "loop.yaml"))
    (tmp_path / "template.yaml").write_text("data:\n  template: {prompt}\n")
    with pytest.raises(ConfigError, match=r"data.template must be str, got \{'prompt': None\} \(dict\) \(quote it"):
        load_config(str(tmp_path / "template.yaml"))
    (tmp_path / "section.yaml").write_text("rollout: 3\n")
    with pytest.raises(ConfigError, match="rollout must be a mapping"):
        load_config(str(tmp_path / "section.yaml"))


def test_shipped_recipes_load():
    import glob
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    recipes = glob.glob(os.path.join(root, "recipes", "*.yaml"))
    studies = [p for p in recipes if os.path.basename(p).startswith("study_")]  # python -m scope_ds.study's
    assert recipes and studies
    for path in recipes:
        if path not in studies:
            load_config(path)
    from scope_ds.study import load_study

    for path in studies:  # every arm of every seed builds its config
        assert load_study(path, out="/nonexistent").runs()


def test_group_size_and_placeholders_that_are_fine():
    assert load_config(None, ["rollout.n=1"]).rollout.n == 1  # SCOPE trains on a group of one
    assert load_config(None, ["algo.name=grpo", "rollout.n=2"]).rollout.n == 2
    assert load_config(None, ["rollout.top_k=1"]).rollout.top_k == 1
    cfg = load_config(None, ["logging.out_dir=runs/{{lit}}/{run_name}", "logging.run_name=r"])
    assert cfg.logging.run_dir == "runs/{lit}/r"


def test_resume_folder_is_checked_in_the_config(tmp_path):
    (tmp_path / "step_2").mkdir()
    assert load_config(None, [f"checkpoint.resume={tmp_path / 'step_2'}"]).checkpoint.resume.endswith("step_2")
    assert load_config(None, ["checkpoint.resume=auto"]).checkpoint.resume == "auto"


@pytest.mark.parametrize("spelling", ["c.yaml", "./c.yaml", "../sub/c.yaml"])
def test_a_defaults_cycle_is_refused_however_it_is_spelled(tmp_path, spelling):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.yaml").write_text("defaults: d.yaml\n")
    (sub / "d.yaml").write_text(f"defaults: {spelling}\nrollout:\n  n: 2\n")
    with pytest.raises(ConfigError, match="defaults form a cycle"):
        load_config(str(sub / "c.yaml"))


def test_a_list_of_defaults_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("rollout:\n  n: 2\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"defaults in .*b.yaml must be one recipe path .*got \['a.yaml'\]"):
        load_config(str(tmp_path / "b.yaml"))


@pytest.mark.parametrize(
    "override,expected",
    [
        ("data.template={prompt}", "{prompt}"),
        ("data.template=Q: {prompt} A:", "Q: {prompt} A:"),
        ("data.template=[{prompt}]", "[{prompt}]"),
        ("logging.run_name=[a, b]", "[a, b]"),
        ("logging.run_name=007", "007"),  # text as written, where YAML would read a number
        ("rollout.api_key=123", "123"),
    ],
)
def test_a_str_key_takes_the_raw_text_where_yaml_reads_a_mapping_or_list(override, expected):
    section, key = override.split("=", 1)[0].split(".")
    assert getattr(getattr(load_config(None, [override]), section), key) == expected


# ------------------------------------------------------- documented commands do not rot

_ROOT = Path(__file__).resolve().parents[2]
_SCRIPTS = ("scope_ds/train.py", "slurm/train.sh")
_PLACEHOLDER = re.compile(r"\.\.\.|\bX\b|X\.yaml|RECIPE|PATH|\[key=value|\|")


def _documented_commands() -> list[tuple[str, str]]:
    """(where, command) of every train command in README.md and docs/*.md: fenced lines (with their
    backslash continuations) and inline code spans."""
    found = []
    for md in [_ROOT / "README.md", *sorted((_ROOT / "docs").glob("*.md"))]:
        text = md.read_text()
        fenced = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
        lines = [ln for block in fenced for ln in block.replace("\\\n", " ").splitlines()]
        lines += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        for line in lines:
            if any(s in line for s in _SCRIPTS) and not _PLACEHOLDER.search(line):
                found.append((md.name, line.strip()))
    return found


def _recipe_and_overrides(command: str) -> tuple[str | None, list[str]]:
    words = shlex.split(command)
    start = next(i for i, w in enumerate(words) if any(w.endswith(s) for s in _SCRIPTS))
    recipe, overrides, rest = None, [], words[start + 1 :]
    if words[start].endswith("slurm/train.sh") and rest and not rest[0].startswith("-") and "=" not in rest[0]:
        recipe, rest = rest[0], rest[1:]
    it = iter(rest)
    for w in it:
        if w == "--config":
            recipe = next(it)
        elif "=" in w and not w.startswith("-"):
            overrides.append(w)
    return (str(_ROOT / recipe) if recipe else None), overrides


def test_the_documented_train_commands_load():
    commands = _documented_commands()
    assert len(commands) >= 5, commands  # the parser still finds them
    assert any("algo.tau=0.5" in c for _, c in commands)
    for where, command in commands:
        recipe, overrides = _recipe_and_overrides(command)
        try:
            load_config(recipe, overrides)
        except ConfigError as e:
            raise AssertionError(f"{where}: {command!r}: {e}") from None


def test_the_documented_single_overrides_load():
    """Inline `section.key=value` spans in the docs, one at a time."""
    spans = set()
    for md in [_ROOT / "README.md", *sorted((_ROOT / "docs").glob("*.md"))]:
        spans |= set(re.findall(r"`((?:[a-z_]+\.[a-z_]+=[^\s`]+ ?)+)`", md.read_text()))
    spans = {s for s in spans if not _PLACEHOLDER.search(s)}
    assert "algo.tau=0.5" in spans
    for span in sorted(spans):
        try:
            load_config(None, span.split())
        except ConfigError as e:
            raise AssertionError(f"`{span}`: {e}") from None


def test_docs_and_recipes_cite_nothing_outside_the_project():
    """Users get the checkout only: no `shared/...` notes, no SCOPE.md / SGLANG_API.md."""
    files = [_ROOT / "README.md", *(_ROOT / "docs").glob("*.md"), *(_ROOT / "recipes").glob("*.yaml")]
    files += list((_ROOT / "scope_ds").rglob("*.py"))
    outside = re.compile(r"(?<![/\w])shared/|SCOPE\.md|SGLANG_API\.md")
    hits = [f"{p.name}:{i}" for p in files for i, ln in enumerate(p.read_text().splitlines(), 1) if outside.search(ln)]
    assert hits == []


@pytest.mark.parametrize("key", ["max_tokens_per_micro_batch", "score_max_tokens_per_micro_batch"])
def test_a_token_budget_that_cannot_hold_the_longest_rollout_is_refused_naming_both_numbers(key):
    base = ["data.max_prompt_tokens=100", "rollout.max_new_tokens=200"]
    load_config(None, [*base, f"train.{key}=300"])  # exactly the longest: fits
    with pytest.raises(ConfigError, match=rf"train.{key}=299 cannot hold the longest rollout: .* = 300 tokens"):
        load_config(None, [*base, f"train.{key}=299"])
    load_config(None, [*base, f"train.{key}=299", "train.packing=false"])  # padded: no budget


def test_zero_stage_replaces_the_jsons_and_drops_what_only_stage_3_reads():
    from scope_ds.engines.ds import build_ds_config, resolve_path, with_zero_stage

    common = dict(dtype="float32", lr=1e-3)
    three = build_ds_config("ds_configs/zero3.json", **common)
    assert three["zero_optimization"]["stage"] == 3 and "stage3_prefetch_bucket_size" in three["zero_optimization"]
    assert build_ds_config("ds_configs/zero3.json", zero_stage=3, **common) == three
    two = build_ds_config("ds_configs/zero3.json", zero_stage=2, **common)["zero_optimization"]
    assert two["stage"] == 2 and two["overlap_comm"] and not any(k.startswith("stage3_") for k in two)
    zero = build_ds_config("ds_configs/zero3.json", zero_stage=0, **common)["zero_optimization"]
    assert zero["stage"] == 0 and "overlap_comm" not in zero and zero["reduce_bucket_size"] == 5e7
    with pytest.raises(
        ValueError, match="zero3_offload.json: offload_param needs ZeRO stage 3, not train.zero_stage=2"
    ):
        build_ds_config("ds_configs/zero3_offload.json", zero_stage=2, **common)
    offload = json.loads(Path(resolve_path("ds_configs/zero3_offload.json")).read_text())
    with pytest.raises(ValueError, match="offload_param needs ZeRO stage 3, not train.zero_stage=0"):
        with_zero_stage(offload, 0, "zero3_offload.json")
