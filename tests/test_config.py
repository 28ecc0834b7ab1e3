"""Run configuration: defaults, YAML, CLI overrides, errors naming the file/field, descriptions."""

from __future__ import annotations

import pytest

from capdpo.config import (
    BUILTIN_LLM,
    BUILTIN_POLICY,
    ConfigError,
    ReproConfig,
    RunConfig,
    describe,
    load_config,
    load_yaml,
    save_config,
)


def test_defaults_load():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.sample.n == 4 and cfg.sample.temperature == 1.0 and cfg.sample.top_p == 0.95
    assert cfg.train.beta == 0.1 and cfg.train.lora is True
    assert cfg.judge.max_answer_words == 256 and cfg.judge.llm.model == BUILTIN_LLM
    assert cfg.policy.model == BUILTIN_POLICY and cfg.frames.num_frames == 8
    assert cfg.pairs.min_gap == 1.0 and cfg.evaluate.pass_score == 3.0
    assert cfg.data.videos is None


def test_yaml_load(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_dir: runs/x\nsample:\n  n: 6\n  temperature: 0.7\njudge:\n  llm:\n    backend: openai\n    model: gpt-x\n")
    cfg = load_config(path)
    assert cfg.run_dir == "runs/x"
    assert cfg.sample.n == 6 and cfg.sample.temperature == 0.7 and cfg.sample.top_p == 0.95  # untouched default
    assert cfg.judge.llm.backend == "openai" and cfg.judge.llm.model == "gpt-x"
    assert cfg.qa.llm.model == BUILTIN_LLM  # a section's LLM is its own


def test_empty_yaml_is_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == load_config()


def test_overrides(tmp_path):
    cfg = load_config(overrides=["sample.n=8", "train.lora=false", "judge.llm.base_url=http://x/v1"])
    assert cfg.sample.n == 8 and isinstance(cfg.sample.n, int)
    assert cfg.train.lora is False
    assert cfg.judge.llm.base_url == "http://x/v1"
    assert cfg.qa.llm.base_url is None
    path = tmp_path / "run.yaml"
    path.write_text("sample:\n  n: 6\n")
    assert load_config(path, overrides=["sample.n=2"]).sample.n == 2  # overrides win over the file
    assert load_config(overrides=["judge.llm.base_url=null"]).judge.llm.base_url is None
    assert load_config(overrides=["judge.llm.base_url=http://127.0.0.1:8000/v1"]).judge.llm.base_url == "http://127.0.0.1:8000/v1"


@pytest.mark.parametrize("bad", ["sample.n", "=8", "sample.n8"])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(overrides=[bad])


def test_override_value_that_is_not_yaml_gives_config_error():
    with pytest.raises(ConfigError, match=r"sample\.n"):
        load_config(overrides=["sample.n=["])


def test_unknown_field_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"sample\.nn"):
        load_config(overrides=["sample.nn=3"])
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  betta: 0.2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "train.betta" in str(e.value)
    path.write_text("trian:\n  beta: 0.2\n")
    with pytest.raises(ConfigError, match="trian"):
        load_config(path)


def test_wrong_type_names_file_and_field(tmp_path):
    with pytest.raises(ConfigError, match=r"sample\.n"):
        load_config(overrides=["sample.n=many"])
    with pytest.raises(ConfigError, match=r"judge\.llm\.backend"):
        load_config(overrides=["judge.llm.backend=tgi"])
    with pytest.raises(ConfigError, match="is not a section"):
        load_config(overrides=["sample=3", "sample.n=2"])
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lora: maybe\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "train.lora" in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    path = tmp_path / "broken.yaml"
    path.write_text("sample: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_an_unknown_section_from_set_is_blamed_on_the_set(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("sample:\n  n: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["sample.n=5", "nosuch.section.x=3"])
    assert str(e.value) == "--set nosuch.section.x=3: nosuch: Extra inputs are not permitted"
    with pytest.raises(ConfigError, match=r"^--set sample\.n\.x=3: sample\.n: "):  # a field made a section
        load_config(None, ["sample.n.x=3"])


def test_a_key_given_twice_in_yaml_names_the_key_and_its_lines(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("sample:\n  n: 3\n  temperature: 0.7\n  n: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}:4: key 'n' given twice (first on line 2)")
    path.write_text("judge:\n  mode: expected\njudge:\n  retries: 2\n")
    with pytest.raises(ConfigError, match=f"{path}:3: key 'judge' given twice"):
        load_config(path)
    with pytest.raises(ConfigError, match="--set judge.price_per_million=.*key 'm' given twice"):
        load_config(None, ["judge.price_per_million={m: [1, 2], m: [3, 4]}"])
    # a merge's keys may be overridden by the mapping's own: not duplicates
    assert load_yaml("base: &b {n: 3, top_p: 0.9}\nsample:\n  <<: *b\n  n: 5\n")["sample"] == {"n": 5, "top_p": 0.9}


def test_relative_videos_path_is_relative_to_the_config_file(tmp_path, monkeypatch):
    conf_dir = tmp_path / "configs"
    conf_dir.mkdir()
    path = conf_dir / "run.yaml"
    path.write_text("data:\n  videos: ../data/videos.jsonl\n")
    monkeypatch.chdir(tmp_path / "configs")  # the answer must not depend on the working directory
    expected = str((tmp_path / "data" / "videos.jsonl").resolve())
    assert load_config(path).data.videos == expected
    monkeypatch.chdir("/")
    assert load_config(path).data.videos == expected
    path.write_text("data:\n  videos: /abs/videos.jsonl\n")
    assert load_config(path).data.videos == "/abs/videos.jsonl"


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(overrides=["sample.n=8", "train.lora=false", "judge.llm.base_url=http://x/v1"])
    save_config(cfg, tmp_path / "saved" / "config.yaml")
    assert load_config(tmp_path / "saved" / "config.yaml") == cfg


def test_describe_covers_every_leaf_with_a_description():
    rows = describe()
    keys = [k for k, _, _ in rows]
    assert len(keys) == len(set(keys))
    assert {"sample.n", "train.lora", "judge.llm.base_url", "qa.llm.model", "data.videos", "run_dir"} <= set(keys)
    missing = [k for k, _, desc in rows if not desc.strip()]
    assert missing == []
    # every leaf is settable by its dotted key (the keys are real)
    cfg = load_config().model_dump()
    assert cfg["repro"] is None and "repro" in keys, "an optional section is listed, off by default"
    cfg["repro"] = ReproConfig().model_dump()
    for key in keys:
        node = cfg
        for part in key.split("."):
            node = node[part]
    defaults = dict((k, d) for k, d, _ in rows)
    assert defaults["sample.n"] == "4" and defaults["data.videos"] == "None"


# -- cross-field checks: a bad config fails when loaded, naming the field, before any stage runs --

@pytest.mark.parametrize(("overrides", "field", "says"), [
    (["train.freeze_llm=true"], "train.freeze_llm", "nothing to train"),
    (["train.loss=dpo"], "train.loss", "unknown loss"),
    (["train.loss=[[sigmoid, 1.0], [nope, 0.5]]"], "train.loss", "nope"),
    (["judge.mode=expected", "judge.protocol=video_chatgpt"], "judge.mode", "needs protocol caption_reward, samples=1"),
    (["judge.mode=constrained", "judge.samples=3"], "judge.mode", "needs protocol caption_reward, samples=1"),
    (["judge.mode=expected", "judge.llm.backend=openai"], "judge.mode", "needs judge.llm.backend=hf"),
    (["judge.evidence=frames", "judge.protocol=video_chatgpt", "judge.llm.backend=openai"], "judge.evidence", "has no caption"),
    (["judge.evidence=frames"], "judge.evidence", "only the openai backend"),
    (["judge.ensemble=[{model: builtin:smollm2}]"], "judge.ensemble", "repeats a judge"),
    (["judge.max_cost_usd=1", "judge.price_per_million={other: [1, 2]}"], "judge.max_cost_usd", "price_per_million for ['builtin:smollm2']"),
    (["evaluate.suites=[{name: msvd_qa, data: a}, {name: msvd_qa, data: b}]"], "evaluate.suites", "more than once"),
    (["repro={}"], "data.synthetic_videos", "needs synthetic clips"),
    (["data.synthetic_kinds=[motion, size]"], "data.synthetic_kinds", "unknown question kind ['size']"),
    (["data.synthetic_kinds=[]"], "data.synthetic_kinds", "keeps no synthetic question"),
    (["repro={}", "data.synthetic_videos=4", "rounds=2"], "rounds", "rounds must be 1"),
])
def test_cross_field_checks_name_the_field(overrides, field, says):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert f"defaults: {field}: " in str(e.value) and says in str(e.value)


@pytest.mark.parametrize("override", ["sample.n=0", "sample.top_p=0", "sample.top_p=1.5", "sample.temperature=-1",
                                      "sample.batch_size=0", "evaluate.batch_size=0", "frames.num_frames=0", "frames.fps=0",
                                      "data.test_fraction=1.5", "train.epochs=0", "train.lr=0", "train.grad_accum=0",
                                      "pairs.min_gap=-1", "repro.seeds=[]", "repro.pair_sources=[]"])
def test_out_of_range_settings_fail_at_load(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(overrides=[override, "data.synthetic_videos=4"])


def test_valid_combinations_pass():
    cfg = load_config(overrides=["judge.mode=expected", "train.lora=false", "train.freeze_llm=true", "train.freeze_projector=false",
                                 "judge.evidence=frames", "judge.mode=generate", "judge.llm.backend=openai",
                                 "judge.max_cost_usd=1", "judge.price_per_million={builtin:smollm2: [1, 2]}",
                                 "train.loss=[[sigmoid, 1.0], [sft, 0.5]]"])
    assert cfg.judge.evidence == "frames" and cfg.train.freeze_llm


def test_the_loss_names_are_those_of_capdpo_losses():
    from capdpo.config import PREFERENCE_LOSSES
    from capdpo.losses import LOSSES

    assert set(PREFERENCE_LOSSES) == set(LOSSES)


def test_the_synthetic_kinds_are_those_of_the_generator():
    from capdpo.config import SYNTHETIC_KINDS
    from capdpo.media.synthetic import QUESTION_KINDS

    assert SYNTHETIC_KINDS == QUESTION_KINDS
    assert load_config(overrides=["data.synthetic_kinds=[detail, motion]"]).data.synthetic_kinds == ["detail", "motion"]


@pytest.mark.parametrize("field", ["judge.template", "distill.template"])
def test_an_unknown_prompt_template_fails_at_load_naming_the_field(field):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[f"{field}=no_such_template"])
    assert field in str(e.value) and "no_such_template" in str(e.value)
    assert load_config(overrides=[f"{field}=reward_no_caption"])


def test_claim_1s_no_caption_template_must_exist():
    from capdpo.config import ReproConfig

    with pytest.raises(ValueError, match="no_such_template"):
        ReproConfig(no_caption_template="no_such_template")
    assert ReproConfig().no_caption_template is None  # each judge's own template's twin
