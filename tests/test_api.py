"""The Files API through the real `openai` SDK against the real server (uvicorn on loopback)."""

import json
import socket

import httpx
import openai
import pytest

from spoold.apikeys import ApiKeys, Tenant
from spoold.apiserver import base_url, is_loopback, listen_address, load_keys
from spoold.config import ApiSettings, Config, ConfigError, EngineSettings, LimitsSettings, SpoolSettings, parse_config

from .helpers import ApiServer, chat_line, wait_for

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef00"
#: a tenant of its own for each order of a walk through the pages
WALKERS = {"desc": "dave-key-0123456789abcdef0", "asc": "erin-key-0123456789abcdef0"}
BATCH = "".join(json.dumps(chat_line(i)) + "\n" for i in range(3)).encode()


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    root = tmp_path_factory.mktemp("spool")
    config = Config(spool=SpoolSettings(root=root, host_id="h"),
                    engine=EngineSettings(model="Qwen/Qwen3-4B-Instruct-2507"),
                    api=ApiSettings(max_upload_bytes=64 * 1024))
    keys = ApiKeys({ALICE: Tenant("alice"), BOB: Tenant("bob"), **{key: Tenant(f"walker-{order}")
                                                                  for order, key in WALKERS.items()}})
    server = ApiServer(config, keys)
    server.root = root
    yield server
    server.stop()


def leftovers(root) -> list[str]:
    """Anything in files/ that is not a whole, visible file (a temp or a half-deleted one)."""
    return [p.name for p in (root / "files").iterdir() if p.name.startswith(".")]


def test_a_file_uploads_lists_downloads_and_deletes_through_the_sdk(api):
    alice = api.client(ALICE)
    made = alice.files.create(file=("scores.jsonl", BATCH), purpose="batch")
    assert made.id.startswith("file-") and made.bytes == len(BATCH) and made.filename == "scores.jsonl"
    assert made.purpose == "batch" and made.object == "file"
    assert (api.root / "files" / made.id / "content").read_bytes() == BATCH
    assert alice.files.retrieve(made.id) == made
    assert alice.files.content(made.id).content == BATCH
    assert made.id in [f.id for f in alice.files.list(purpose="batch")]
    deleted = alice.files.delete(made.id)
    assert deleted.deleted and deleted.id == made.id
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(made.id)
    assert not (api.root / "files" / made.id).exists() and leftovers(api.root) == []


def test_the_sdk_pages_through_every_file_once_newest_first(api):
    bob = api.client(BOB)
    made = [bob.files.create(file=(f"part{i}.jsonl", BATCH), purpose="batch").id for i in range(5)]
    first = bob.files.list(limit=2)
    assert len(first.data) == 2 and first.has_more
    walked = [f.id for f in bob.files.list(limit=2)]  # the SDK follows `after` to the end
    assert sorted(walked) == sorted(made) and len(walked) == len(set(walked))
    created = [bob.files.retrieve(i).created_at for i in walked]
    assert created == sorted(created, reverse=True)
    assert [f.id for f in bob.files.list(order="asc")] == walked[::-1]


@pytest.mark.parametrize("order", ["desc", "asc"])
def test_a_walk_through_the_pages_that_deletes_as_it_goes_meets_every_file_once(api, order):
    client = api.client(WALKERS[order])
    made = [client.files.create(file=(f"f{i}.jsonl", BATCH), purpose="batch").id for i in range(7)]
    walked = []
    for stored in client.files.list(limit=2, order=order):  # the SDK asks for each page after the last file seen
        walked.append(stored.id)
        if len(walked) % 2 == 0:  # the last of its page: the cursor of the next page is gone
            client.files.delete(stored.id)
    assert len(walked) == len(set(walked)), "a file met twice: the walk started again from the top"
    assert sorted(walked) == sorted(made)


def test_a_cursor_naming_another_tenants_deleted_file_pages_from_the_top_as_an_unknown_one_does(api):
    alice, bob = api.client(ALICE), api.client(BOB)
    theirs = alice.files.create(file=("gone.jsonl", BATCH), purpose="batch")
    bob.files.create(file=("mine.jsonl", BATCH), purpose="batch")
    assert theirs.id in [f.id for f in alice.files.list()]  # listed here, then deleted: the server knows its place
    alice.files.delete(theirs.id)
    top = [f.id for f in bob.files.list(limit=3).data]
    assert [f.id for f in bob.files.list(limit=3, after=theirs.id).data] == top  # nothing said of alice's file


def test_another_tenants_file_is_not_found_and_a_wrong_or_missing_key_is_refused(api):
    made = api.client(ALICE).files.create(file=("mine.jsonl", BATCH), purpose="batch")
    bob = api.client(BOB)
    for call in (bob.files.retrieve, bob.files.content, bob.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(made.id)
    assert made.id not in [f.id for f in bob.files.list()]
    with pytest.raises(openai.AuthenticationError) as refused:
        api.client("not-a-key-but-long-enough").files.list()
    assert refused.value.body["code"] == "invalid_api_key"
    bare = httpx.get(f"{api.url}/files")
    assert bare.status_code == 401 and bare.json()["error"]["type"] == "invalid_request_error"
    assert api.client(ALICE).files.retrieve(made.id).id == made.id  # still there, still hers


@pytest.mark.parametrize("bad_id", ["../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "file-" + "a" * 300,
                                    "file-ÄÖÜäöüßéèêëàâîïôûçñ12", "file-abc",
                                    "file-" + "A" * 23 + "%00", "file-" + "A" * 23 + "/"])
def test_a_malformed_id_is_a_clear_not_found_and_the_server_stays_up(api, bad_id):
    reply = httpx.get(f"{api.url}/files/{bad_id}", headers={"Authorization": f"Bearer {ALICE}"})
    assert reply.status_code == 404
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert api.client(ALICE).models.list().data  # still serving


def test_an_upload_over_the_limit_is_413_and_leaves_nothing(api):
    alice = api.client(ALICE)
    before = {f.id for f in alice.files.list()}
    with pytest.raises(openai.APIStatusError) as refused:
        alice.files.create(file=("big.jsonl", b"x" * (200 * 1024)), purpose="batch")
    assert refused.value.status_code == 413 and "limit" in refused.value.message
    # Without a Content-Length the limit is found while streaming: still 413, still nothing.
    body = _multipart({"purpose": "batch"}, b"y" * (100 * 1024))
    chunked = httpx.post(f"{api.url}/files", content=iter([body]), headers={
        "Authorization": f"Bearer {ALICE}", "Content-Type": "multipart/form-data; boundary=b0undary"})
    assert chunked.status_code == 413
    assert {f.id for f in alice.files.list()} == before and leftovers(api.root) == []


def test_a_wrong_purpose_or_a_form_without_a_file_is_400_and_leaves_nothing(api):
    alice = api.client(ALICE)
    before = {f.id for f in alice.files.list()}
    with pytest.raises(openai.BadRequestError) as refused:
        alice.files.create(file=("x.jsonl", BATCH), purpose="fine-tune")
    assert refused.value.body["param"] == "purpose"
    no_file = httpx.post(f"{api.url}/files", data={"purpose": "batch"}, files={"other": ("x", b"1")},
                         headers={"Authorization": f"Bearer {ALICE}"})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    cut_short = _multipart({"purpose": "batch"}, b"{}\n").removesuffix(b"\r\n--b0undary--\r\n")
    unfinished = httpx.post(f"{api.url}/files", content=cut_short, headers={
        "Authorization": f"Bearer {ALICE}", "Content-Type": "multipart/form-data; boundary=b0undary"})
    assert unfinished.status_code == 400 and unfinished.json()["error"]["param"] == "file"
    not_a_form = httpx.post(f"{api.url}/files", content=BATCH, headers={"Authorization": f"Bearer {ALICE}"})
    assert not_a_form.status_code == 400
    long_boundary = "b" * 300  # python-multipart refuses it when the parser is made: was a 500
    refused_boundary = httpx.post(f"{api.url}/files", content=_multipart({"purpose": "batch"}, b"{}\n").replace(
        b"b0undary", long_boundary.encode()), headers={"Authorization": f"Bearer {ALICE}",
                                                        "Content-Type": f"multipart/form-data; boundary={long_boundary}"})
    assert refused_boundary.status_code == 400, refused_boundary.text
    assert "boundary" in refused_boundary.json()["error"]["message"].lower()
    assert {f.id for f in alice.files.list()} == before and leftovers(api.root) == []


def test_a_client_that_goes_away_mid_upload_leaves_nothing(api):
    host, port = api.url.removeprefix("http://").removesuffix("/v1").split(":")
    body = _multipart({"purpose": "batch"}, b"z" * 40_000)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ALICE.encode() +
                  b"\r\nContent-Type: multipart/form-data; boundary=b0undary\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body[:len(body) // 2])
        wait_for(lambda: leftovers(api.root), 10, "the upload to begin")
    wait_for(lambda: not leftovers(api.root), 10, "the half upload to be removed")
    assert all(f.filename != "f.jsonl" for f in api.client(ALICE).files.list())


def test_the_configured_models_are_listed(api):
    assert "Qwen/Qwen3-4B-Instruct-2507" in [m.id for m in api.client(BOB).models.list()]


def _multipart(fields: dict[str, str], content: bytes) -> bytes:
    parts = [f'--b0undary\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="f.jsonl"\r\n'
                 b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n--b0undary--\r\n")
    return b"".join(parts)


# -- keys and where to listen ---------------------------------------------------


def test_without_a_keys_file_only_loopback_is_served(tmp_path):
    config = Config(api=ApiSettings(keys_file=str(tmp_path / "none"), listen="0.0.0.0:8090"))
    with pytest.raises(ConfigError, match=r"\[api\] keys_file.*not loopback"):
        load_keys(config, listen_address(config.api.listen))
    assert load_keys(config, listen_address("127.0.0.1:8090")) is None
    assert is_loopback(listen_address("[::1]:8090")) and is_loopback(listen_address("/run/spoold/api.sock"))
    with pytest.raises(ConfigError, match=r"\[api\] listen"):
        listen_address("8090")


def test_the_base_url_clients_use_comes_from_public_url_else_the_listen_address():
    behind_proxy = Config(api=ApiSettings(public_url="https://gpu-box.example.com/", listen="/run/spoold/api.sock"))
    assert base_url(behind_proxy, listen_address(behind_proxy.api.listen)) == "https://gpu-box.example.com/v1"
    assert base_url(Config(), listen_address("127.0.0.1:8090")) == "http://127.0.0.1:8090/v1"
    assert base_url(Config(), listen_address("[::1]:8090")) == "http://[::1]:8090/v1"
    assert base_url(Config(), listen_address("/run/spoold/api.sock")) is None
    for bad in ("gpu-box:8090", "ftp://gpu-box", "https://", "https://gpu box"):
        with pytest.raises(ConfigError, match=r"\[api\] public_url"):
            parse_config({"api": {"public_url": bad}})


def test_a_keys_file_names_each_tenant_and_admins(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# who may use the API\nalice:{ALICE}\n\nops:{BOB}:admin\n")
    keys = load_keys(Config(api=ApiSettings(keys_file=str(path), listen="0.0.0.0:1")), ("0.0.0.0", 1))
    assert keys.tenant(ALICE) == Tenant("alice") and keys.tenant(BOB) == Tenant("ops", admin=True)
    assert keys.tenant(ALICE[:-1]) is None and keys.tenant("") is None and keys.tenant(None) is None


@pytest.mark.parametrize("line, says", [
    ("alice", "expected NAME:KEY"),
    ("alice:short", "at least 16 characters"),
    ("al ice:0123456789abcdef0", "the name must be"),
    ("alice:0123456789abcdef0:root", "expected NAME:KEY or NAME:KEY:admin"),
])
def test_a_bad_keys_line_is_named_and_the_key_never_shown(tmp_path, line, says):
    path = tmp_path / "keys"
    path.write_text(f"ok:{ALICE}\n{line}\n")
    with pytest.raises(ConfigError) as refused:
        load_keys(Config(api=ApiSettings(keys_file=str(path))), ("127.0.0.1", 1))
    assert f"{path} line 2" in str(refused.value) and says in str(refused.value)
    assert ALICE not in str(refused.value) and "0123456789abcdef0" not in str(refused.value)


def test_an_upload_never_exceeds_the_files_limit_of_limits(tmp_path):
    config = Config(spool=SpoolSettings(root=tmp_path, host_id="h"), limits=LimitsSettings(max_file_bytes=100))
    server = ApiServer(config, None)
    try:
        with pytest.raises(openai.APIStatusError) as refused:
            server.client("unused").files.create(file=("a.jsonl", BATCH * 20), purpose="batch")
        assert refused.value.status_code == 413
        assert server.client("unused").files.create(file=("a.jsonl", BATCH[:90]), purpose="batch").bytes == 90
    finally:
        server.stop()


def test_a_full_disk_is_a_retryable_error_that_leaves_nothing(api, monkeypatch):
    import errno

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("spoold.filestore.write_all", full)
    alice = api.client(ALICE)
    before = {f.id for f in alice.files.list()}
    with pytest.raises(openai.InternalServerError) as refused:
        alice.files.create(file=("x.jsonl", BATCH), purpose="batch")
    assert refused.value.status_code == 503 and "No space left on device" in refused.value.message
    assert {f.id for f in alice.files.list()} == before and leftovers(api.root) == []


def test_every_answer_has_a_request_id_and_a_server_error_names_it_in_the_log(api, monkeypatch, caplog):
    alice = api.client(ALICE)
    uploaded = alice.files.with_raw_response.create(file=("x.jsonl", BATCH), purpose="batch")
    first = uploaded.headers["x-request-id"]
    assert first.startswith("req_") and uploaded.parse()._request_id == first  # as the SDK shows OpenAI's
    with pytest.raises(openai.NotFoundError) as missing:
        alice.files.retrieve("file-nope")
    assert missing.value.request_id.startswith("req_") and missing.value.request_id != first

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")
    monkeypatch.setattr("spoold.filestore.FileStore.index", broken)
    with caplog.at_level("ERROR", logger="spoold.api"), pytest.raises(openai.InternalServerError) as failed:
        alice.files.list()
    request_id = failed.value.request_id
    assert failed.value.status_code == 500 and request_id.startswith("req_")
    assert request_id in failed.value.message  # what the user quotes ...
    assert any(request_id in r.getMessage() and r.exc_info for r in caplog.records)  # ... finds the traceback
