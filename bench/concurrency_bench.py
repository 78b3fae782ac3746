"""Many batches at once on one daemon and one real engine (vLLM, the tiny model).

    .venv/bin/python -m bench.concurrency_bench [--requests 2000] [--rounds 3] [--big 5000] [--tries 10]
        [--only small_vs_big|head_of_line|fairness|users|tenants] [--engine-arg max_num_seqs=16 ...]
        [--spool-arg max_active_jobs=256 ...] [--model HF_ID_OR_PATH] [--out FILE]

Five measurements, as a user would see them (drop to outbox):
- many small against one big: N one-line drops, then one N-line drop, alternating,
  requests/s of each and the median ratio (small / big), and the CPU per request
  of the daemon's process and of vLLM's engine processes in each;
- head of line: a 10-line drop on an idle daemon, then the same beside a running
  `--big`-line job; p50/p95 of its drop-to-outbox time, their ratio, and where
  the seconds went (drop to claim, validation, the run and its engine phase,
  the move to the outbox);
- fairness: one `--big`-line job and twenty 100-line jobs dropped together; the
  small jobs' share of the requests completed in each second while both have
  work, against the 20/21 that equal per-job shares give (drops are all one
  user's, so one tenant);
- users (as root only): the same, the big drop one user's and the twenty
  another's (uids 1001 and 1002); each user is a tenant, so the second's due
  is half;
- tenants: the same through `spoold api` and the `openai` SDK, the big batch
  one tenant's and the twenty another's: the second tenant's share each
  second, against the half that per-tenant shares give.
Writes bench/concurrency_results.json (`--only`: concurrency_<name>_results.json), or `--out`.

On a GPU box, `--model` names a real model (a Hugging Face id, fetched when
HF_HUB_OFFLINE=0, or a local path) and `--engine-arg` replaces the CPU
settings, e.g. `--engine-arg dtype='"auto"' --engine-arg enforce_eager=false
--engine-arg max_num_seqs=256`; the result records the GPUs, the model and
the settings it ran with (README, "Many batches at once").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .api_bench import answers
from .cpu import cpu_seconds
from .run import ENV, TINY_MODEL, Spoold, machine, model_to_serve, settings
from .workloads import default_rows, write_workload

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.helpers import free_port, wait_for  # noqa: E402

#: the two users whose drops `--only users` compares (they need not exist: a file's owner is a number)
USERS = (1001, 1002)


class Drops:
    """Stage drops as ignored dotfiles, then rename them in; watch the outbox for them."""

    def __init__(self, daemon: Spoold, model: str, tmp: Path) -> None:
        self.daemon, self.model, self.tmp, self.count = daemon, model, tmp, 0

    def stage(self, lines: int, uid: int | None = None) -> tuple[str, Path]:
        """A `lines`-line drop, not in the inbox yet; `uid`: the user who owns it (this bench runs as root
        then), as `spoold submit` run by that user leaves it."""
        self.count += 1
        name = f"d{self.count}"
        rows = [dict(r, custom_id=f"{name}-{i}") for i, r in enumerate(default_rows(lines, self.model))]
        staged = self.daemon.root / "inbox" / f".{name}.jsonl.tmp"
        write_workload(staged, rows)
        if uid is not None:
            os.chown(staged, uid, uid)
        return name, staged

    def publish(self, staged: list[tuple[str, Path]]) -> float:
        started = time.monotonic()
        for name, path in staged:
            os.rename(path, self.daemon.root / "inbox" / f"{name}.jsonl")
        return started

    def finished(self, names: set[str]) -> set[str]:
        done = {entry.split("-", 1)[0] for entry in os.listdir(self.daemon.root / "outbox")}
        return names & done

    def time(self, staged: list[tuple[str, Path]]) -> float:
        """Seconds from publishing `staged` to the last of them in the outbox."""
        started = self.publish(staged)
        return self.wait({name for name, _ in staged}) - started

    def phases(self, name: str, published: float, in_outbox: float) -> dict:
        """Where one drop's seconds went, from the daemon's log (ms timestamps) and its batch.json:
        drop to claim (seen, settled, claimed), claim to validated, validated to completed (of which
        `engine_s` is first dispatch to last durable result), completed to in the outbox."""
        log = self.daemon.log.read_text()
        claimed = re.search(rf"^(\S+ \S+) INFO \S+: claimed '{name}.jsonl' as job (\S+)", log, re.M)
        if claimed is None:
            return {}
        job = claimed.group(2)
        at = {"claimed": _wall(claimed.group(1))}
        for step in ("validated", "completed"):
            found = re.search(rf"^(\S+ \S+) INFO \S+: job {re.escape(job)} {step}", log, re.M)
            at[step] = _wall(found.group(1)) if found else None
        record = json.loads(next((self.daemon.root / "outbox").glob(f"{name}-*/batch.json")).read_text())
        engine_s = (record.get("timings") or {}).get("engine_seconds")
        if None in at.values():
            return {}
        return {"to_claim_s": round(at["claimed"] - published, 3),
                "validate_s": round(at["validated"] - at["claimed"], 3),
                "run_s": round(at["completed"] - at["validated"], 3), "engine_s": engine_s,
                "to_outbox_s": round(in_outbox - at["completed"], 3)}

    def published(self, job_id: str) -> bool:
        """Whether outbox/<job_id>/ is there (an API batch's job keeps its id)."""
        return (self.daemon.root / "outbox" / job_id / "batch.json").exists()

    def wait(self, names: set[str], timeout: float = 1800) -> float:
        return self.wait_until(lambda: self.finished(names) == names, timeout)

    def wait_until(self, done, timeout: float = 1800) -> float:
        """Poll until `done()`; when it was; fails if the daemon exits first."""
        deadline = time.monotonic() + timeout
        while not done():
            if self.daemon.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("spoold exited or took too long:\n" + self.daemon.log.read_text()[-3000:])
            time.sleep(0.02)
        return time.monotonic()


def _wall(stamp: str) -> float:
    """A log line's `2026-12-03 05:21:19,123` as epoch seconds (the log is in local time)."""
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _median_phases(phases: list[dict]) -> dict:
    phases = [p for p in phases if p and p.get("engine_s") is not None]
    return {key: round(statistics.median(p[key] for p in phases), 3) for key in phases[0]} if phases else {}


def small_vs_big(drops: Drops, n: int, rounds: int) -> dict:
    """Requests/s of `n` one-line drops and of one `n`-line drop, alternating; and the CPU each
    request cost the daemon's process (spool, vLLM's front end) and vLLM's engine processes."""
    pairs = []
    for _ in range(rounds):
        smalls = [drops.stage(1) for _ in range(n)]
        small_s, small_cpu = _with_cpu(drops, lambda: drops.time(smalls))
        big_s, big_cpu = _with_cpu(drops, lambda: drops.time([drops.stage(n)]))
        pairs.append({"small_rps": n / small_s, "big_rps": n / big_s, "ratio": big_s / small_s,
                      **{f"small_{k}_cpu_ms_per_request": round(v / n * 1000, 2) for k, v in small_cpu.items()},
                      **{f"big_{k}_cpu_ms_per_request": round(v / n * 1000, 2) for k, v in big_cpu.items()}})
        print(f"  {n} one-line drops {n / small_s:.1f} req/s (CPU ms/request: daemon "
              f"{pairs[-1]['small_daemon_cpu_ms_per_request']}, engine {pairs[-1]['small_engine_cpu_ms_per_request']}), "
              f"one {n}-line drop {n / big_s:.1f} req/s (daemon {pairs[-1]['big_daemon_cpu_ms_per_request']}, "
              f"engine {pairs[-1]['big_engine_cpu_ms_per_request']})", flush=True)
    return {"rounds": pairs, "median_ratio": statistics.median(p["ratio"] for p in pairs)}


def _with_cpu(drops: Drops, timed) -> tuple[float, dict]:
    """`timed()`'s result, and the CPU seconds (user + system) the daemon's process and its
    children (vLLM's engine core and workers) spent meanwhile."""
    before = _daemon_and_engine(drops.daemon.proc.pid)
    result = timed()
    after = _daemon_and_engine(drops.daemon.proc.pid)
    return result, {k: after[k] - before[k] for k in after}


def _daemon_and_engine(pid: int) -> dict[str, float]:
    spent = cpu_seconds(pid)
    return {"daemon": spent["user"] + spent["system"], "engine": spent["children"]}


def head_of_line(drops: Drops, big_lines: int, tries: int) -> dict:
    def ten_line_times(phases: list[dict]) -> list[float]:
        times = []
        for _ in range(tries):
            staged = drops.stage(10)
            published = time.time()
            times.append(drops.time([staged]))
            phases.append(drops.phases(staged[0], published, published + times[-1]))
        return times

    idle_phases: list[dict] = []
    busy_phases: list[dict] = []
    idle = ten_line_times(idle_phases)
    big = [drops.stage(big_lines)]
    drops.publish(big)
    time.sleep(3)  # the big job is claimed, validated and has filled the engine's queue
    busy = ten_line_times(busy_phases)
    still_running = not drops.finished({big[0][0]})
    drops.wait({big[0][0]})
    big_record = json.loads(next((drops.daemon.root / "outbox").glob(f"{big[0][0]}-*/batch.json")).read_text())
    p = lambda xs, q: statistics.quantiles(xs, n=20)[q] if len(xs) > 1 else xs[0]  # noqa: E731
    result = {"idle_p50_s": statistics.median(idle), "idle_p95_s": p(idle, 18),
              "busy_p50_s": statistics.median(busy), "busy_p95_s": p(busy, 18),
              "big_still_running_after": still_running,
              "big_requests_per_second": (big_record.get("timings") or {}).get("requests_per_second"),
              "idle_phases_p50": _median_phases(idle_phases), "busy_phases_p50": _median_phases(busy_phases)}
    result["p50_ratio"] = result["busy_p50_s"] / result["idle_p50_s"]
    result["p95_ratio"] = result["busy_p95_s"] / result["idle_p95_s"]
    return result


def fairness(drops: Drops, big_lines: int, users: tuple[int, int] | None = None) -> dict:
    """One `big_lines` drop and twenty 100-line drops, renamed in together; the twenty's share of the
    answers each second. All one user's (`users` None), they are one tenant and shares are per job: the
    twenty get 20/21. With `users` (two uids: the big drop the first's, the twenty the second's), each
    user is a tenant and the twenty get half."""
    big = drops.stage(big_lines, users and users[0])
    smalls = [drops.stage(100, users and users[1]) for _ in range(20)]
    drops.publish([big, *smalls])
    small_names = {name for name, _ in smalls}
    samples = _small_shares(drops.daemon.root, [f"{big[0]}-*"], [f"{name}-*" for name in small_names],
                            lambda: drops.finished(small_names) == small_names)
    drops.wait({big[0]})
    return _share_report(samples, 0.5 if users else len(smalls) / (len(smalls) + 1))


def tenants(drops: Drops, big_lines: int, tmp: Path) -> dict:
    """The issue's fairness as tenants meet it: through `spoold api` and the `openai` SDK, tenant `big`
    creates one `big_lines` batch, then tenant `small` twenty 100-line batches; the window shares per
    tenant first, so the small tenant's due is half while both have work."""
    api = ApiProcess(drops.daemon, tmp)
    try:
        big = api.create("big", default_rows(big_lines, drops.model))
        smalls = [api.create("small", default_rows(100, drops.model)) for _ in range(20)]
        samples = _small_shares(drops.daemon.root, [big], smalls, lambda: all(map(drops.published, smalls)))
        drops.wait_until(lambda: drops.published(big))
    finally:
        api.close()
    return _share_report(samples, 0.5)


class ApiProcess:
    """`spoold api` on the bench daemon's spool, with one key per tenant, and the SDK's client for each."""

    def __init__(self, daemon: Spoold, tmp: Path) -> None:
        import openai

        keys = {tenant: f"{tenant}-key-{os.urandom(12).hex()}" for tenant in ("big", "small")}
        (tmp / "api-keys").write_text("".join(f"{tenant}:{key}\n" for tenant, key in keys.items()))
        port = free_port()
        config = tmp / "api.toml"
        config.write_text(daemon.config.read_text() +
                          f'[api]\nlisten = "127.0.0.1:{port}"\nkeys_file = "{tmp / "api-keys"}"\n')
        self.proc = subprocess.Popen([sys.executable, "-m", "spoold", "api", "--config", str(config)],
                                     stdout=open(tmp / "api.log", "wb"), stderr=subprocess.STDOUT, env=ENV, cwd=REPO)
        self.clients = {tenant: openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
                        for tenant, key in keys.items()}
        wait_for(lambda: self.proc.poll() is not None or answers(self.clients["big"]), 60, "spoold api to listen")
        if self.proc.poll() is not None:
            raise RuntimeError("spoold api exited:\n" + (tmp / "api.log").read_text()[-3000:])

    def create(self, tenant: str, rows: list[dict]) -> str:
        """Upload `rows` and create a batch of them as `tenant`; its id (also its job directory's name)."""
        client = self.clients[tenant]
        body = "".join(json.dumps(dict(row, custom_id=f"r{i}")) + "\n" for i, row in enumerate(rows)).encode()
        upload = client.files.create(file=("batch.jsonl", body), purpose="batch")
        return client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                     completion_window="24h").id

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def _small_shares(root: Path, big: list[str], small: list[str], done) -> list[float]:
    """The small side's share of the result lines written in each second, until `done()`: job directories
    by glob pattern, in this host's processing/ or in the outbox."""
    samples, last = [], None
    while not done():
        counts = {side: sum(_lines(root, pattern) for pattern in patterns)
                  for side, patterns in (("big", big), ("small", small))}
        if last is not None:
            got = {k: counts[k] - last[k] for k in counts}
            if sum(got.values()):
                samples.append(got["small"] / sum(got.values()))
        last = counts
        time.sleep(1)
    return samples


def _lines(root: Path, pattern: str) -> int:
    """Result lines of the job `pattern` names, where it is now (looked for again if it moves meanwhile)."""
    for _ in range(3):
        for where in (root / "processing" / "bench", root / "outbox"):
            for out in where.glob(f"{pattern}/output.jsonl"):
                try:
                    with open(out, "rb") as f:
                        return sum(1 for _ in f)
                except FileNotFoundError:
                    continue  # published between the look and the open
    return 0


def _share_report(samples: list[float], expected: float) -> dict:
    """Seconds within 10% of the share due, as the issue words it (0.45-0.55 of a half), and within 0.1
    of it (0.40-0.60), the looser reading `seconds_within_10_percent` had in files written before
    `seconds_within_0.1` was added."""
    both = samples[1:-1] or samples  # the first and last seconds hold claims and the end

    def within(margin: float) -> float | None:
        return sum(abs(s - expected) <= margin + 1e-9 for s in both) / len(both) if both else None
    return {"small_share_per_second": [round(s, 3) for s in samples], "expected_small_share": round(expected, 3),
            "median_small_share": statistics.median(both) if both else None,
            "seconds_within_10_percent": within(0.1 * expected), "seconds_within_0.1": within(0.1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--big", type=int, default=5000, help="lines of the running job (head of line, fairness)")
    parser.add_argument("--tries", type=int, default=10)
    parser.add_argument("--only", choices=("small_vs_big", "head_of_line", "fairness", "users", "tenants"),
                        help="run this measurement alone")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=JSON",
                        help="an [engine] setting for the daemon under test, e.g. max_num_seqs=16")
    parser.add_argument("--spool-arg", action="append", default=[], metavar="KEY=JSON",
                        help="a [spool] setting for the daemon under test, e.g. max_active_jobs=256")
    parser.add_argument("--model", help="a Hugging Face id or local path to serve instead of the tiny model the "
                                        "tests build (a real one, on a GPU box)")
    parser.add_argument("--out", type=Path, help="where to write the results (default: bench/concurrency_"
                                                 "results.json, or concurrency_<only>_results.json)")
    args = parser.parse_args()
    if args.only == "users" and os.geteuid() != 0:
        parser.error("--only users gives drops to two users (uids 1001 and 1002): run it as root")
    engine, spool = settings(args.engine_arg), settings(args.spool_arg)
    with tempfile.TemporaryDirectory(prefix="spoold-bench-") as tmp:
        model = model_to_serve(args.model)
        daemon = Spoold(model, Path(tmp), engine_settings=engine, spool_settings=spool)
        drops = Drops(daemon, model, Path(tmp))
        report = {"machine": machine(args.model or TINY_MODEL, engine),
                  "engine_settings": engine, "spool_settings": spool}
        try:
            if args.only in (None, "small_vs_big"):
                print("many small drops against one big one:", flush=True)
                report["small_vs_big"] = small_vs_big(drops, args.requests, args.rounds)
            if args.only in (None, "head_of_line"):
                print("head of line:", flush=True)
                report["head_of_line"] = head_of_line(drops, args.big, args.tries)
                print(json.dumps(report["head_of_line"], indent=1), flush=True)
            if args.only in (None, "fairness"):
                print("fairness:", flush=True)
                report["fairness"] = fairness(drops, args.big)
                print(json.dumps(report["fairness"]), flush=True)
            if args.only in (None, "users") and os.geteuid() == 0:  # only root can give drops to two users
                print("fairness between two users' drops:", flush=True)
                report["users"] = fairness(drops, args.big, users=USERS)
                print(json.dumps(report["users"]), flush=True)
            elif args.only is None:
                print("fairness between two users' drops: left out (it gives drops to uids 1001 and 1002: "
                      "run as root)", flush=True)
            if args.only in (None, "tenants"):
                print("fairness between two tenants of the API:", flush=True)
                report["tenants"] = tenants(drops, args.big, Path(tmp))
                print(json.dumps(report["tenants"]), flush=True)
        finally:
            daemon.close()
    name = "concurrency_results.json" if not args.only else f"concurrency_{args.only}_results.json"
    (args.out or REPO / "bench" / name).write_text(json.dumps(report, indent=1) + "\n")
    if "small_vs_big" in report:
        print(f"median ratio (big / small drop time): {report['small_vs_big']['median_ratio']:.2f}")


if __name__ == "__main__":
    main()
