import logging
import os
import re
import subprocess
import sys

import pytest

from spoold.vllmlog import CONFIG_FILE, MAX_KINDS, REDACTED, RequestWordsFilter, config_file_for_vllm

SECRET = "Zanzibar-Quokka-4471"  # stands for a word of someone's prompt


def _record(name, msg, *args, exc_info=None):
    return logging.LogRecord(name, logging.WARNING, "chat_utils.py", 2201, msg, args, exc_info)


def _formatted(record):
    RequestWordsFilter().filter(record)
    return logging.Formatter("%(message)s").format(record)


def test_a_request_path_line_keeps_its_words_and_numbers_but_not_the_requests_words():
    """vLLM 0.32 logs the name of a message's tool call whose arguments are not JSON: the case found."""
    line = _formatted(_record("vllm.renderers.chat_utils", "Tool call %r has arguments that are not valid "
                              "JSON (%d chars); coercing to an empty object.", SECRET, 20))
    assert line == f"Tool call {REDACTED!r} has arguments that are not valid JSON (20 chars); coercing to an empty object."
    mapped = _formatted(_record("vllm.entrypoints.openai.chat_completion.serving", "%(name)s: %(n).1f",
                                {"name": [SECRET], "n": 2.5}))
    assert mapped == f"{REDACTED}: 2.5"
    whole = _formatted(_record("vllm.entrypoints.utils", "Request parameters: %s", {SECRET: 1}))
    assert whole == f"Request parameters: {REDACTED}"  # the keys of a request's table are its words too
    assert _formatted(_record("vllm.tool_parsers.utils", ValueError(SECRET))) == REDACTED


def test_an_exception_keeps_its_type_and_where_it_was_raised_but_not_its_message():
    try:
        raise RuntimeError(f"invalid regex ({SECRET}")
    except RuntimeError as e:
        error = (type(e), e, e.__traceback__)
    line = _formatted(_record("vllm.v1.structured_output", "Failed to compile grammar for request %s",
                              SECRET, exc_info=error))
    assert SECRET not in line
    assert line.startswith(f"Failed to compile grammar for request {REDACTED}\nTraceback (most recent call last):")
    assert "test_vllmlog.py" in line and line.endswith(f"builtins.RuntimeError: {REDACTED}")


@pytest.mark.parametrize("name", ["vllm.v1.engine.core", "vllm.config.model", "vllm.parsers", "spoold.daemon"])
def test_lines_about_the_engine_itself_are_left_as_vllm_wrote_them(name):
    """The model, memory and start-up lines are vLLM's own words, and an administrator needs them."""
    assert _formatted(_record(name, "Resolved architecture: %s", "LlamaForCausalLM")) == \
        "Resolved architecture: LlamaForCausalLM"


def test_a_file_whose_every_line_makes_vllm_warn_writes_one_line_a_minute_of_each_kind_with_a_count():
    """Past journald's rate limit the journal drops lines, the daemon's own among them."""
    now = [0.0]
    keeper = RequestWordsFilter(repeat_seconds=60, clock=lambda: now[0])
    tool_call = lambda: _record("vllm.renderers.chat_utils", "Tool call %r has arguments that are not valid JSON "
                                "(%d chars)", SECRET, 20)
    passed = []
    for i in range(1000):  # 100 lines a second for 10 s
        now[0] = i / 100
        record = tool_call()
        if keeper.filter(record):
            passed.append(record.getMessage())
    assert passed == [f"Tool call {REDACTED!r} has arguments that are not valid JSON (20 chars)"]
    assert keeper.filter(_record("vllm.renderers.chat_utils", "Skipping multimodal part %r", SECRET))  # another kind
    assert all(keeper.filter(_record("vllm.v1.engine.core", "engine step %d", i)) for i in range(100))  # not a request's
    now[0] = 61.0
    record = tool_call()
    assert keeper.filter(record) and record.getMessage() == (
        f"Tool call {REDACTED!r} has arguments that are not valid JSON (20 chars) "
        "(999 more like this in the last 61 s, not logged)")
    now[0] = 62.0
    assert not keeper.filter(tool_call())


def test_messages_vllm_formats_itself_are_each_a_kind_and_the_table_of_kinds_stays_bounded():
    keeper = RequestWordsFilter(repeat_seconds=60, clock=lambda: 0.0)
    assert all(keeper.filter(_record("vllm.tool_parsers.utils", f"Tool call arguments '{i}' do not end"))
               for i in range(5000))
    assert len(keeper._kinds) <= MAX_KINDS


#: vLLM configures its logging from the file as each of its processes does (`configure_logging`, as the
#: engine core does at start), in a process of its own: configuring logging is process-wide.
VLLM_PROCESS = """
import logging, sys
from vllm.config.logging import LoggingConfig
from vllm.logger import configure_logging
configure_logging(LoggingConfig(pylogging_config_file=sys.argv[1]))
logging.getLogger("vllm.renderers.chat_utils").warning(
    "Tool call %r has arguments that are not valid JSON (%d chars)", sys.argv[2], 20)
logging.getLogger("vllm.v1.engine.core").info("Initializing a V1 LLM engine with config: model=%r", "tiny")
"""


def test_vllm_configured_with_the_packaged_file_logs_in_its_own_layout_without_the_requests_words():
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_LOGGING")}
    done = subprocess.run([sys.executable, "-c", VLLM_PROCESS, str(CONFIG_FILE), SECRET],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if "Tool call" in line or "Initializing" in line]
    assert len(lines) == 2, done.stdout
    assert re.match(r"\(MainProcess pid=\d+\) WARNING \d\d-\d\d ", lines[0])  # vLLM's own layout
    assert lines[0].endswith(f"Tool call {REDACTED!r} has arguments that are not valid JSON (20 chars)")
    assert " INFO " in lines[1] and lines[1].endswith("model='tiny'")  # INFO, as vLLM logs by default


def test_the_daemon_gives_vllm_the_file_unless_the_administrator_chose_vllms_logging(monkeypatch):
    from spoold.config import EngineSettings
    from spoold.vllm_adapter import build_vllm_args

    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH", raising=False)
    monkeypatch.delenv("VLLM_CONFIGURE_LOGGING", raising=False)
    assert build_vllm_args(EngineSettings(model="m")).logging_config.pylogging_config_file == str(CONFIG_FILE)
    assert CONFIG_FILE.is_file()
    monkeypatch.setenv("VLLM_LOGGING_CONFIG_PATH", "/etc/vllm-logging.json")
    assert config_file_for_vllm() is None
    assert not hasattr(build_vllm_args(EngineSettings(model="m")), "logging_config")
    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH")
    monkeypatch.setenv("VLLM_CONFIGURE_LOGGING", "0")
    assert config_file_for_vllm() is None
