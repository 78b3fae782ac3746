from pathlib import Path

import pytest

from spoold.config import Config, ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def test_missing_file_means_defaults():
    config = load_config("/nonexistent/spoold.toml")
    assert config == Config()
    assert config.engine.inflight_limit == 8 * config.engine.max_num_seqs


def test_explicit_missing_file_is_an_error():
    with pytest.raises(ConfigError, match="no such config file"):
        load_config("/nonexistent/spoold.toml", must_exist=True)


def test_only_engine_model_is_enough(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[engine]\nmodel = "Qwen/Qwen3-4B-Instruct-2507"\n')
    config = load_config(path)
    assert config.engine.model == "Qwen/Qwen3-4B-Instruct-2507"
    assert config.spool.root == Path("/var/spool/spoold")


def test_example_config_parses_and_maps_ollama_names():
    config = load_config(REPO / "etc/spoold/spoold.toml", must_exist=True)
    assert config.spool.group == "spoold-submit"  # as installed: submitters read their results, see progress
    for name in ("qwen3:4b", "gemma3:4b", "llama3.2:3b", "llama3.2:1b"):
        assert "/" in config.models.aliases[name]


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"\[spool\] setle_seconds.*did you mean 'settle_seconds'"):
        parse_config({"spool": {"setle_seconds": 3}})


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match=r"unknown setting \[engin\].*did you mean 'engine'"):
        parse_config({"engin": {}})


@pytest.mark.parametrize("section,key,value,expected", [
    ("spool", "settle_seconds", "soon", "a number"),
    ("engine", "max_num_seqs", -1, "a whole number"),
    ("engine", "enforce_eager", "yes", "true or false"),
    ("limits", "max_line_bytes", 1.5, "a whole number"),
])
def test_bad_values_name_the_key(section, key, value, expected):
    with pytest.raises(ConfigError, match=rf"\[{section}\] {key}: expected {expected}"):
        parse_config({section: {key: value}})


def test_models_accept_strings_and_tables():
    config = parse_config({"models": {"a": "org/a", "b": {"model": "/models/b", "max_model_len": 4096},
                                      "max_wait_seconds": 60}})
    assert config.models.aliases == {"a": "org/a", "b": "/models/b"}
    assert config.models.max_wait_seconds == 60.0
    with pytest.raises(ConfigError, match=r"\[models\] 'c'"):
        parse_config({"models": {"c": 3}})


def test_toml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[spool\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(path)


def test_reload_applies_only_what_needs_no_model_reload():
    from spoold.config import reload_settings

    old = parse_config({"engine": {"model": "a"}, "spool": {"settle_seconds": 5}})
    new = parse_config({"engine": {"model": "b", "max_inflight": 64}, "spool": {"settle_seconds": 1},
                        "heartbeat": {"seconds": 2}})
    merged, needs_restart = reload_settings(old, new)
    assert merged.spool.settle_seconds == 1 and merged.heartbeat.seconds == 2
    assert merged.engine.max_inflight == 64
    assert merged.engine.model == "a"
    assert needs_restart == ["[engine] model"]


def test_a_model_table_has_served_names_and_its_own_engine_settings():
    from spoold.config import ConfigError, engine_settings_for, parse_config

    config = parse_config({"engine": {"model": "small", "max_model_len": 4096, "args": {"seed": 1}},
                           "models": {"small": "org/small",
                                      "qwen": {"model": "Qwen/Qwen3-4B", "served_names": ["qwen3:4b"],
                                               "max_model_len": 8192, "gpu_memory_utilization": 0.8,
                                               "chat_template": "/t.jinja", "args": {"quantization": "fp8"}}}})
    assert config.models.aliases == {"small": "org/small", "qwen": "Qwen/Qwen3-4B", "qwen3:4b": "Qwen/Qwen3-4B"}
    qwen = engine_settings_for(config, "Qwen/Qwen3-4B")
    assert (qwen.model, qwen.max_model_len, qwen.gpu_memory_utilization) == ("Qwen/Qwen3-4B", 8192, 0.8)
    assert qwen.args == {"seed": 1, "quantization": "fp8", "chat_template": "/t.jinja"}
    small = engine_settings_for(config, "org/small")
    assert (small.max_model_len, small.args) == (4096, {"seed": 1})
    try:
        parse_config({"models": {"qwen": {"model": "Q", "max_model_lenn": 1}}})
    except ConfigError as e:
        assert "[models.qwen] max_model_lenn" in str(e) and "max_model_len" in str(e)
    else:
        raise AssertionError("a misspelt per-model key was accepted")


def test_a_claim_timeout_of_fewer_than_three_heartbeats_is_refused():
    with pytest.raises(ConfigError, match="claim_timeout = 10 is under 3 heartbeats"):
        parse_config({"spool": {"claim_timeout": 10}, "heartbeat": {"seconds": 5}})
    assert parse_config({"spool": {"claim_timeout": 15}, "heartbeat": {"seconds": 5}}).spool.claim_timeout == 15


def test_max_attempts_defaults_to_3_and_must_allow_one_try():
    assert parse_config({}).engine.max_attempts == 3
    with pytest.raises(ConfigError, match=r"\[engine\] max_attempts = 0: a line needs at least 1 try"):
        parse_config({"engine": {"max_attempts": 0}})
    assert parse_config({"engine": {"max_attempts": 1}}).engine.max_attempts == 1
