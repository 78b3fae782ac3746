"""`spoold api` as a real process: the SDK against it, keys reread on SIGHUP, a clean SIGTERM."""

import os
import signal
import subprocess
import sys

import openai
import pytest

from ..helpers import REPO, free_port, wait_for, write_config

FIRST, SECOND = "first-key-0123456789abcdef", "second-key-0123456789abcdef"


def test_the_api_process_serves_the_sdk_rereads_its_keys_on_sighup_and_stops_cleanly(tmp_path):
    keys = tmp_path / "api-keys"
    keys.write_text(f"team:{FIRST}\n")
    port = free_port()
    config = write_config(tmp_path / "spoold.toml", tmp_path / "spool",
                          extra=f'[api]\nlisten = "127.0.0.1:{port}"\nkeys_file = "{keys}"\n')
    log = open(tmp_path / "api.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "spoold", "api", "--config", str(config)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        team = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=FIRST, max_retries=0)
        wait_for(lambda: proc.poll() is not None or _answers(team), 60, "spoold api to listen")
        assert proc.poll() is None, (tmp_path / "api.log").read_text()
        made = team.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")
        second = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=SECOND, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            second.files.list()
        keys.write_text(f"team:{FIRST}\nother:{SECOND}\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: _answers(second), 30, "the new key to be accepted after SIGHUP")
        with pytest.raises(openai.NotFoundError):
            second.files.retrieve(made.id)  # a new tenant sees nothing of the first's
        keys.write_text("team:short\n")  # a broken file keeps the keys that work
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: b"keeping the current keys" in (tmp_path / "api.log").read_bytes(), 30, "the reload")
        assert team.files.retrieve(made.id).id == made.id
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "api.log").read_text()
    assert FIRST not in text and SECOND not in text  # keys are never logged


def _answers(client: openai.OpenAI) -> bool:
    try:
        client.files.list()
        return True
    except (openai.APIConnectionError, openai.AuthenticationError):
        return False
