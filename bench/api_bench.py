"""Upload and download through `spoold api` with the `openai` SDK: MB/s, and the API's peak memory.

    .venv/bin/python -m bench.api_bench [--lines 1000000]

A batch file of LINES chat requests (~200 bytes each) is uploaded with
`client.files.create`, downloaded with the SDK's streaming response, and
compared byte for byte. The API runs as its own process (`spoold api`, no
daemon needed for files); its peak resident memory is the kernel's own
high-water mark (VmHWM in /proc/PID/status), read before it exits, so no
sample can miss a peak. An upload is streamed to disk, so the peak should
not grow with the file.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import openai

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.helpers import free_port, wait_for  # noqa: E402

LINE = ('{"custom_id": "c-%d", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", '
        '"max_tokens": 8, "messages": [{"role": "user", "content": "Score candidate %d for the role"}]}}\n')


def peak_rss_mib(pid: int) -> float:
    """The process's resident-memory high-water mark so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(lines: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="spoold-api-bench-") as tmp:
        tmp = Path(tmp)
        source = tmp / "batch.jsonl"
        with open(source, "w") as f:
            for i in range(lines):
                f.write(LINE % (i, i))
        size = source.stat().st_size
        with api_process(tmp) as (proc, client):
            idle = peak_rss_mib(proc.pid)
            started = time.monotonic()
            with open(source, "rb") as f:
                made = client.files.create(file=("batch.jsonl", f), purpose="batch")
            upload_s = time.monotonic() - started
            after_upload = peak_rss_mib(proc.pid)
            digest, started = hashlib.sha256(), time.monotonic()
            with client.files.with_streaming_response.content(made.id) as response:
                for chunk in response.iter_bytes(1 << 20):
                    digest.update(chunk)
            download_s = time.monotonic() - started
            peak = peak_rss_mib(proc.pid)
        same = digest.hexdigest() == hashlib.sha256(source.read_bytes()).hexdigest()
    mb = size / 1e6
    return {"lines": lines, "mb": round(mb, 1), "upload_mb_per_s": round(mb / upload_s, 1),
            "download_mb_per_s": round(mb / download_s, 1), "api_peak_rss_mib": round(peak, 1),
            "api_rss_before_mib": round(idle, 1), "api_peak_after_upload_mib": round(after_upload, 1),
            "identical": same}


@contextlib.contextmanager
def api_process(tmp: Path) -> Iterator[tuple[subprocess.Popen, openai.OpenAI]]:
    """`spoold api` as its own process on a spool under `tmp` (loopback, no keys file: the one tenant
    `local`), and an SDK client for it once it answers; stopped when the block ends."""
    port = free_port()
    config = tmp / "c.toml"
    config.write_text(f'[spool]\nroot = "{tmp / "spool"}"\n[api]\nlisten = "127.0.0.1:{port}"\n'
                      f'keys_file = "{tmp / "none"}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "spoold", "api", "--config", str(config)], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="local", max_retries=0,
                               timeout=600)
        wait_for(lambda: answers(client), 60, "spoold api to listen")
        yield proc, client
    finally:
        proc.terminate()
        proc.wait(30)


def answers(client: openai.OpenAI) -> bool:
    """Whether `spoold api` answers `client` yet (it is still starting while the connection is refused)."""
    try:
        client.models.list()
        return True
    except openai.APIConnectionError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    result = run(parser.parse_args().lines)
    print(json.dumps(result, indent=2))
    (REPO / "bench" / "api_results.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
