import io
import json
import os

import numpy as np
import pytest

from spoold.duplicates import DuplicateFinder
from spoold.records import EngineRequest, LineError
from spoold.validation import LineValidator, ModelResolver, repeated_requests, validate_stream

from .helpers import chat_line, write_jsonl

ALIASES = {"qwen3:4b": "Qwen/Qwen3-4B-Instruct-2507", "llama3.2:1b": "meta-llama/Llama-3.2-1B-Instruct"}


def encode(lines):
    return "".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines).encode()


def run(lines, served="qwen3:4b", max_line_bytes=1000, run_entries=4):
    """Both passes, as the daemon runs them: each line checked, then the repeats confirmed."""
    f, resolver = io.BytesIO(encode(lines)), ModelResolver(ALIASES, served)
    with DuplicateFinder(run_entries=run_entries) as finder:  # tiny runs: the spill path is exercised
        items = list(validate_stream(f, LineValidator(resolver, duplicates=finder), max_line_bytes))
        suspects = finder.suspects()
    f.seek(0)
    by_line = {item.line: index for index, item in enumerate(items)}
    for _, error in repeated_requests(f, suspects, LineValidator(resolver), max_line_bytes):
        items[by_line[error.line]] = error
    return items


def test_every_bad_line_gets_its_line_number_and_reason():
    good = chat_line(1, model="qwen3:4b")
    items = run([
        good,                                                   # 1
        "{not json",                                            # 2
        "[1, 2]",                                               # 3
        {**chat_line(4), "custom_id": None},                    # 4
        {**chat_line(1, model="qwen3:4b")},                     # 5 duplicate of line 1
        {**chat_line(6, model="qwen3:4b"), "method": "GET"},    # 6
        {**chat_line(7, model="qwen3:4b"), "url": "/v1/images"},  # 7
        {**chat_line(8), "body": "text"},                       # 8
        chat_line(9, model="ollama-unknown"),                   # 9
        chat_line(10, model="qwen3:4b", stream=True),           # 10
        chat_line(11, model="llama3.2:1b"),                     # 11 another configured model
    ])
    assert isinstance(items[0], EngineRequest)
    assert items[10].body["model"] == "meta-llama/Llama-3.2-1B-Instruct"
    codes = {i.line: i.code for i in items if isinstance(i, LineError)}
    assert codes == {2: "invalid_json", 3: "not_an_object", 4: "missing_custom_id",
                     5: "duplicate_custom_id", 6: "invalid_method", 7: "unsupported_url",
                     8: "invalid_body", 9: "unknown_model", 10: "stream_not_supported"}


def test_error_messages_never_quote_prompt_text():
    secret = "Jane Doe, 12 Acacia Avenue"
    bad = {**chat_line(1), "method": "PUT"}
    bad["body"]["messages"][0]["content"] = secret
    items = run(['{"custom_id": "x", "body": "' + secret, bad])
    assert all(secret not in i.message for i in items)


def test_aliases_resolve_and_missing_model_gets_the_default():
    items = run([chat_line(1, model="qwen3:4b"), chat_line(2, model=None),
                 chat_line(3, model="Qwen/Qwen3-4B-Instruct-2507")])
    assert [i.body["model"] for i in items] == ["Qwen/Qwen3-4B-Instruct-2507"] * 3


def test_blank_lines_are_skipped_but_line_numbers_stay_true():
    items = run([chat_line(1, model="qwen3:4b"), "", "   ", "{bad"])
    assert len(items) == 2
    assert items[1].line == 4


def test_long_line_is_an_error_and_the_next_line_still_counts():
    long_line = chat_line(1, model="qwen3:4b")
    long_line["body"]["messages"][0]["content"] = "x" * 5000
    items = run([long_line, chat_line(2, model="qwen3:4b")], max_line_bytes=1000)
    assert items[0].code == "line_too_long" and items[0].line == 1
    assert isinstance(items[1], EngineRequest) and items[1].line == 2


def test_invalid_utf8_is_a_clear_error():
    validator = LineValidator(ModelResolver({}, "m"))
    item = validator.check(7, b'{"custom_id": "\xff\xfe"}\n')
    assert item.code == "invalid_json" and item.line == 7


def test_forced_model_replaces_whatever_the_line_names():
    validator = LineValidator(ModelResolver(ALIASES, ""), force_model="qwen3:4b")
    item = validator.check(1, json.dumps(chat_line(1, model="nonsense")).encode())
    assert item.body["model"] == "Qwen/Qwen3-4B-Instruct-2507"


def test_hostile_lines_are_errors_not_crashes():
    validator = LineValidator(ModelResolver({}, "m"))
    assert validator.check(1, b"[" * 100000 + b"]" * 100000).code == "invalid_json"
    assert validator.check(2, b"\x00\x00\n").code == "invalid_json"
    assert validator.check(4, b'{"custom_id": ' + b"9" * 5000 + b"}").code == "invalid_json"
    bom_crlf = b'\xef\xbb\xbf{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}\r\n'
    assert isinstance(validator.check(3, bom_crlf), EngineRequest)


def test_a_repeated_custom_id_names_the_line_it_repeats_and_counts_even_on_a_bad_line():
    items = run([
        {**chat_line(1, model="qwen3:4b"), "method": "GET"},    # 1 bad, but takes custom_id c-1
        chat_line(1, model="qwen3:4b"),                         # 2 repeats line 1
        chat_line(3, model="qwen3:4b"),                         # 3
        {**chat_line(3, model="qwen3:4b"), "url": "/v1/x"},     # 4 repeats line 3 and is bad: keeps its own error
        chat_line(3, model="qwen3:4b"),                         # 5 repeats line 3
    ] + [chat_line(i, model="qwen3:4b") for i in range(6, 40)])
    codes = {i.line: i.code for i in items if isinstance(i, LineError)}
    assert codes == {1: "invalid_method", 2: "duplicate_custom_id", 4: "unsupported_url", 5: "duplicate_custom_id"}
    assert "on line 1" in items[1].message and "on line 3" in items[4].message
    assert all(isinstance(i, EngineRequest) for i in items[5:])


def test_a_hash_collision_is_never_reported_as_a_duplicate():
    data = encode([chat_line(i, model="qwen3:4b") for i in range(1, 6)])
    validator = LineValidator(ModelResolver(ALIASES, ""))
    # Every line a suspect, as if all five ids had the same 64-bit hash.
    assert list(repeated_requests(io.BytesIO(data), np.arange(1, 6), validator, 1000)) == []


def test_the_model_peek_reads_no_more_than_its_cap(tmp_path):
    from spoold.validation import PEEK_BYTES, first_model

    path = tmp_path / "x.jsonl"
    other = json.dumps({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": "b", "messages": []}})
    path.write_bytes(b" " * (PEEK_BYTES + 1) + b"\n" + other.encode() + b"\n")
    resolver = ModelResolver({"b": "model-b"}, "model-a")
    assert first_model(path, resolver) is None  # the second line lies past the peek
    path.write_bytes(other.encode() + b"\n")
    assert first_model(path, resolver) == "model-b"


def test_a_line_that_asks_for_more_output_than_the_limit_is_an_error():
    validator = LineValidator(ModelResolver({}, "m"), max_output_tokens=1 << 20)
    big = dict(chat_line(0, model=None), body={"messages": [], "n": 128, "max_tokens": 32768})
    item = validator.check(1, json.dumps(big).encode())
    assert isinstance(item, LineError) and item.code == "too_many_output_tokens"
    assert "4194304 tokens" in item.message and "max_output_tokens_per_line" in item.message
    wide = dict(chat_line(0, model=None), body={"messages": [], "max_tokens": 8192, "logprobs": True,
                                                  "top_logprobs": 20})
    assert isinstance(validator.check(2, json.dumps(wide).encode()), EngineRequest)


def test_check_file_gives_each_line_its_verdict_then_the_repeats(tmp_path):
    from spoold.validation import Repeat, check_file

    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(0), "not json", chat_line(1), chat_line(0)])
    resolver = ModelResolver({}, "fake-model")
    with open(path, "rb") as f:
        items = list(check_file(f, lambda finder: LineValidator(resolver, duplicates=finder), 1 << 20))
    assert [type(i).__name__ for i in items] == ["EngineRequest", "LineError", "EngineRequest", "EngineRequest",
                                                 "Repeat"]
    (repeat,) = [i for i in items if isinstance(i, Repeat)]
    assert repeat.request.line == 4 and repeat.error.code == "duplicate_custom_id" and "line 1" in repeat.error.message


def test_open_regular_never_follows_a_symlink_nor_opens_a_fifo(tmp_path):
    import errno

    from spoold.validation import open_regular

    (tmp_path / "real").write_bytes(b"{}\n")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    os.mkfifo(tmp_path / "fifo")  # opening it for reading must not wait for a writer
    with open_regular(tmp_path / "real") as f:
        assert f.read() == b"{}\n"
    for name, code in (("link", errno.ELOOP), ("fifo", errno.EINVAL)):
        with pytest.raises(OSError) as e:
            open_regular(tmp_path / name)
        assert e.value.errno == code


def test_an_api_batchs_lines_must_all_ask_for_its_endpoint():
    validator = LineValidator(ModelResolver(ALIASES, "qwen3:4b"), endpoint="/v1/chat/completions")
    line = chat_line(1, model="qwen3:4b")
    assert isinstance(validator.check(1, json.dumps(line).encode()), EngineRequest)
    error = validator.check(2, json.dumps({**line, "url": "/v1/completions"}).encode())
    assert isinstance(error, LineError) and error.code == "url_mismatch" and "/v1/chat/completions" in error.message
    # A drop names no endpoint: its lines may mix them.
    assert isinstance(LineValidator(ModelResolver(ALIASES, "qwen3:4b")).check(
        2, json.dumps({**line, "url": "/v1/completions", "body": {"model": "qwen3:4b", "prompt": "x"}}).encode()),
        EngineRequest)


def media_line(i, part, url="/v1/chat/completions"):
    return {"custom_id": f"m{i}", "method": "POST", "url": url,
            "body": {"model": "qwen3:4b", "max_tokens": 8,
                     "messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, part]}]}}


def test_a_line_cannot_make_the_engine_fetch_a_url_but_inline_media_and_allowed_hosts_pass():
    """SSRF: vLLM would fetch a line's image_url from the GPU box (cloud metadata, internal services)."""
    resolver = ModelResolver(ALIASES, "qwen3:4b")
    png = "data:image/png;base64,iVBORw0KGgo="
    lines = {
        1: media_line(1, {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data/"}}),
        2: media_line(2, {"type": "image_url", "image_url": {"url": png}}),
        3: media_line(3, {"type": "video_url", "video_url": {"url": "HTTPS://Intranet.example/x.mp4"}}),
        4: media_line(4, {"type": "image_url", "image_url": {"url": "https://images.example.com/a.png"}}),
        5: media_line(5, {"type": "image_url", "image_url": {"url": "file:///etc/shadow"}}),
        # the Responses API names the URL as a string; the key hidden behind a JSON escape still counts
        6: {"custom_id": "m6", "method": "POST", "url": "/v1/responses",
            "body": {"model": "qwen3:4b", "input": [{"role": "user", "content": [
                {"type": "input_image", "image_url": "http://10.0.0.5:8080/admin"}]}]}},
        7: None,
        # score documents may be content parts too
        8: {"custom_id": "m8", "method": "POST", "url": "/v1/score",
            "body": {"model": "qwen3:4b", "text_1": "q", "text_2": {"content": [
                {"type": "image_url", "image_url": {"url": "http://localhost:9464/metrics"}}]}}},
    }
    raw = {n: json.dumps(line).encode() for n, line in lines.items() if line}
    raw[7] = (b'{"custom_id": "m7", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "qwen3:4b",'
              b' "messages": [{"role": "user", "content": [{"type": "image_url", "image\\u005furl": '
              b'{"url": "http://169.254.169.254/"}}]}]}}')
    refusing = LineValidator(resolver)
    verdicts = {n: refusing.check(n, line) for n, line in raw.items()}
    refused = {n: v for n, v in verdicts.items() if isinstance(v, LineError)}
    assert sorted(refused) == [1, 3, 4, 5, 6, 7, 8]
    assert {v.code for v in refused.values()} == {"media_url_refused"}
    assert refused[1].message.startswith("`body.messages[0].content[1].image_url.url` asks the engine to fetch "
                                         "from 169.254.169.254")
    assert "data: URL" in refused[1].message and "[limits] allowed_media_domains" in refused[1].message
    assert "intranet.example" in refused[3].message
    assert refused[5].message.startswith("`body.messages[0].content[1].image_url.url` is not a data: URL")
    assert refused[6].message.startswith("`body.input[0].content[0].image_url` asks the engine to fetch from 10.0.0.5")
    assert "body.text_2.content[0].image_url.url" in refused[8].message
    assert isinstance(verdicts[2], EngineRequest)
    allowing = LineValidator(resolver, allowed_media=["images.example.com"])
    assert isinstance(allowing.check(4, raw[4]), EngineRequest)
    assert isinstance(allowing.check(1, raw[1]), LineError)


def test_allowed_media_domains_is_a_list_of_hosts_in_the_config():
    from spoold.config import ConfigError, parse_config

    assert parse_config({}).limits.allowed_media_domains == ()
    config = parse_config({"limits": {"allowed_media_domains": ["images.example.com"]}})
    assert config.limits.allowed_media_domains == ("images.example.com",)
    with pytest.raises(ConfigError, match=r"\[limits\] allowed_media_domains: expected a list of strings"):
        parse_config({"limits": {"allowed_media_domains": "images.example.com"}})


def chat_body(**body):
    return dict(chat_line(0, model=None), body={"messages": [], **body})


def test_numbers_written_as_text_or_decimals_count_as_vllm_reads_them():
    # vLLM's request models read "128" and 128.0 as 128 (pydantic's lax mode): a line must not slip
    # past the limit by writing its numbers that way.
    validator = LineValidator(ModelResolver({}, "m"), max_output_tokens=1 << 20)
    for body in ({"n": "128", "max_tokens": "32768"}, {"n": 128.0, "max_tokens": 32768.0},
                 {"n": " 128 ", "max_completion_tokens": "32_768"},
                 {"max_tokens": 50000.0, "logprobs": True, "top_logprobs": 20.0}):
        item = validator.check(1, json.dumps(chat_body(**body)).encode())
        assert isinstance(item, LineError) and item.code == "too_many_output_tokens", body
    # A number vLLM refuses counts as 1: the line reaches vLLM, which answers it with its own 400.
    assert isinstance(validator.check(2, json.dumps(chat_body(n=7.5, max_tokens="many")).encode()), EngineRequest)


def test_the_output_limit_is_the_field_vllm_reads_for_the_lines_endpoint():
    validator = LineValidator(ModelResolver({}, "m"), max_output_tokens=1 << 20)
    # chat: `max_completion_tokens` when it is not null, else `max_tokens`
    item = validator.check(1, json.dumps(chat_body(n=128, max_completion_tokens=None, max_tokens=32768)).encode())
    assert isinstance(item, LineError) and item.code == "too_many_output_tokens"
    assert isinstance(validator.check(2, json.dumps(chat_body(n=128, max_completion_tokens=8,
                                                              max_tokens=32768)).encode()), EngineRequest)
    # completions: `max_tokens` only (vLLM ignores `max_completion_tokens` there)
    completion = {"custom_id": "c", "method": "POST", "url": "/v1/completions",
                  "body": {"prompt": "x", "n": 128, "max_completion_tokens": 8, "max_tokens": 32768}}
    item = validator.check(3, json.dumps(completion).encode())
    assert isinstance(item, LineError) and item.code == "too_many_output_tokens"
    assert "`n` x `max_tokens`" in item.message
    # the Responses API: `max_output_tokens`
    response = {"custom_id": "r", "method": "POST", "url": "/v1/responses",
                "body": {"input": "x", "max_output_tokens": 1 << 20, "top_logprobs": 1}}
    assert validator.check(4, json.dumps(response).encode()).code == "too_many_output_tokens"


def test_a_line_that_sets_no_output_limit_may_fill_the_models_context():
    contexts = {"m": 8192}
    validator = LineValidator(ModelResolver({}, "m"), max_output_tokens=1 << 20, context_tokens=contexts.get)
    item = validator.check(1, json.dumps(chat_body(n=200)).encode())  # 200 x 8,192 = 1,638,400
    assert isinstance(item, LineError) and item.code == "too_many_output_tokens"
    assert "1638400 tokens" in item.message
    assert "context of 8192 tokens: set `max_completion_tokens`" in item.message
    assert isinstance(validator.check(2, json.dumps(chat_body(n=100)).encode()), EngineRequest)
    # completions default to 16 tokens when `max_tokens` is left out, and fill the context when it is null
    completion = {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "n": 200}}
    assert isinstance(validator.check(3, json.dumps(completion).encode()), EngineRequest)
    completion["body"]["max_tokens"] = None
    assert validator.check(4, json.dumps(completion).encode()).code == "too_many_output_tokens"
    # an embedding makes no tokens, whatever else its body says
    embedding = {"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x", "n": 10 ** 9}}
    assert isinstance(validator.check(5, json.dumps(embedding).encode()), EngineRequest)
    # a model whose context is not known yet (the daemon checks again once it is loaded)
    contexts["m"] = 0
    assert isinstance(validator.check(6, json.dumps(chat_body(n=200)).encode()), EngineRequest)
