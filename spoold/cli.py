"""`spoold`: one entry point, one verb per job a person does.

    spoold run                      the daemon, in the foreground
    spoold submit FILE... [--model] validate and copy files into the inbox
    spoold validate FILE...         per-line report; exit 1 if any line is bad
    spoold status [--json]          queued, processing and finished jobs
    spoold watch [--json]           live progress bars from the event feed
    spoold api [--listen]           the OpenAI-compatible HTTP API over the spool
    spoold retry JOB...             run a finished job's failed lines again, as a new job
    spoold results JOB [-o FILE]    one result per custom_id over a job and its retries
    spoold doctor [--json]          check the setup, one line per check, with what to do
    spoold demo                     the whole pipeline on a tiny local model

Every verb takes `--config PATH` (default /etc/spoold/spoold.toml or
$SPOOLD_CONFIG).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from dataclasses import replace
from typing import TYPE_CHECKING

from . import __version__
from .config import DEFAULT_CONFIG_PATH, Config, ConfigError, config_path, engine_settings_for, load_config

if TYPE_CHECKING:  # the verbs import what they use when they run: `spoold --help` stays quick
    from .owncancel import OwnCancel
    from .spool import Spool

log = logging.getLogger("spoold")

EXIT_OK, EXIT_BAD_INPUT, EXIT_USAGE = 0, 1, 2
#: What a shell sees of a program SIGPIPE ends (128 + 13); Python ignores SIGPIPE and raises instead.
EXIT_BROKEN_PIPE = 141

#: What a JOB argument is, for every verb that takes one.
JOB_HELP = ("a job id, as `spoold status` shows it (scores-20261206T132548-a725bfbe3bca02a4); given the name "
            "of a file submitted instead, it says which jobs came from it and does nothing")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the verb; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, not at exit, so that a reader gone away is met below
        return code
    except ConfigError as e:
        print(f"spoold: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except NoSpool as e:
        print(f"spoold: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `spoold status | head`: the reader has all it wants; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor one at exit's flush
        return EXIT_BROKEN_PIPE
    except PermissionError as e:  # a part of the spool this user is kept out of: whose it is, how to get in
        from .access import refused

        print(f"spoold: {refused(e)}", file=sys.stderr)
        if args.func is cmd_run:  # the daemon's log keeps where it met the refusal, for a bug report
            log.error("stopped by a refused %s", e.filename, exc_info=True)
        return EXIT_BAD_INPUT


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with help text for every verb."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH",
                        help=f"config file (default: $SPOOLD_CONFIG or {DEFAULT_CONFIG_PATH})")
    parser = argparse.ArgumentParser(
        prog="spoold",
        description="Batch LLM inference from a spool directory: drop OpenAI-Batch JSONL "
                    "files into the inbox, get every line answered by vLLM in the outbox.",
        epilog="Run `spoold VERB --help` for the options of one verb.")
    parser.add_argument("--version", action="version", version=f"spoold {__version__}")
    verbs = parser.add_subparsers(title="verbs", metavar="VERB")

    p = verbs.add_parser("run", parents=[common], help="run the daemon in the foreground",
                         description="Load the model, finish this host's unfinished jobs, then "
                                     "claim and run drops from the inbox until SIGTERM.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--host-id", help="override [spool] host_id (one daemon per GPU: spoold@.service)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT", help='override [metrics] listen ("" = off)')
    p.set_defaults(func=cmd_run)

    p = verbs.add_parser("submit", parents=[common], help="copy batch files into the inbox",
                         description="Validate each FILE, then copy it into the inbox atomically "
                                     "(hidden temp name, fsync, rename). Bad lines are reported and the "
                                     "file goes in (each gets an error record) unless --strict; a file "
                                     "the daemon would fail whole (compressed, too big, no request lines) "
                                     "never goes in.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--model", metavar="NAME",
                   help="set every line's body.model to NAME (e.g. an alias from [models])")
    p.add_argument("--strict", action="store_true", help="refuse a file that has any bad line")
    p.add_argument("--priority", type=_priority, metavar="N",
                   help="the batch's weight among your own, 1-100 (default 1): while several of yours "
                        "run, one of priority N gets N times the share of a default one (each user who "
                        "submits gets an equal share of the engine, as each API key does)")
    p.set_defaults(func=cmd_submit)

    p = verbs.add_parser("validate", parents=[common], help="check batch files line by line",
                         description="Print one line per bad input line (FILE:LINE: code: what is "
                                     "wrong) and a summary; exit 1 if any line is bad. A file the daemon "
                                     "would fail whole (compressed, over [limits] max_file_bytes, no request "
                                     "lines) gets one line (FILE: code: why) and exit 1.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_validate)

    p = verbs.add_parser("status", parents=[common], help="show queued, running and finished jobs",
                         description="Read the spool (works while the daemon is down).")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = verbs.add_parser("doctor", parents=[common], help="check the setup and say what is wrong",
                         description="Check, one line each, what spoold needs: the config, the models (readable "
                                     "by the service user), vLLM's build against the GPUs NVML sees, GPU memory, "
                                     "the spool's directories and filesystem, the event socket and metrics port, "
                                     "the systemd unit, the newest heartbeat and disk space. Each failing check "
                                     "says what to do. Exit 0 only if no check failed (a check that does not "
                                     "apply here is shown as skip).")
    p.add_argument("--json", action="store_true", help="machine-readable output: {ok, checks: [...]}")
    p.add_argument("--unit", default="spoold", help="the systemd unit to look at (default: spoold; e.g. spoold@0)")
    p.add_argument("--user", default="spoold",
                   help="the user the service runs as, for the model check (default: spoold; this user if "
                        "there is none)")
    p.set_defaults(func=cmd_doctor)

    p = verbs.add_parser("watch", parents=[common], help="follow live progress from the event feed",
                         description="Subscribe to the daemon's ZeroMQ feed ([events] endpoint) and show "
                                     "one progress bar per job: done/total, req/s, ETA, GPU. Ctrl-C quits.")
    p.add_argument("--json", action="store_true", help="print raw events, one JSON object per line")
    p.add_argument("--endpoint", help="connect here instead of [events] endpoint (e.g. tcp://gpu-box:5557)")
    p.set_defaults(func=cmd_watch)

    p = verbs.add_parser("cancel", parents=[common], help="stop a running or waiting job",
                         description="Ask the daemon that owns each JOB (an id from `spoold status`) to "
                                     "stop it: lines with a result keep it, the rest get none, and the "
                                     "job goes to the outbox with status \"cancelled\". A job may be "
                                     "cancelled by its owner (who submitted it), the daemon's user or root; a "
                                     "submitter's cancel is asked for in the inbox and taken by the daemon "
                                     "within a second or so. A split batch is cancelled whole, by its id, "
                                     "on every daemon running its parts. A drop not yet claimed is withdrawn "
                                     "by deleting it from the inbox.")
    p.add_argument("jobs", nargs="+", metavar="JOB", help=JOB_HELP)
    p.set_defaults(func=cmd_cancel)

    p = verbs.add_parser("retry", parents=[common], help="run a finished job's failed lines again",
                         description="For each finished JOB (an id from `spoold status`), drop a new job into "
                                     "the inbox with the lines of JOB's input that have no final answer: a "
                                     "5xx answer, an engine_crashed or batch_expired error, or none at all (a "
                                     "cancelled job). Bad lines and 4xx answers are final and are not retried. "
                                     "The new job's batch.json names JOB as retry_of; `spoold results JOB` "
                                     "then merges them. A job may be retried by its submitter, the daemon's "
                                     "user and root; the retry shares the engine as the job's submitter.")
    p.add_argument("jobs", nargs="+", metavar="JOB", help=JOB_HELP)
    p.set_defaults(func=cmd_retry)

    p = verbs.add_parser("results", parents=[common], help="one result per custom_id over a job and its retries",
                         description="Write JOB's results merged with those of every retry of it (`spoold "
                                     "retry`, retries of retries too), one line per custom_id: the latest "
                                     "success, else the latest answer. Output and error lines in the OpenAI "
                                     "batch output format, streamed; a summary goes to stderr.")
    p.add_argument("job", metavar="JOB", help=JOB_HELP)
    p.add_argument("-o", "--output", metavar="FILE", help="write here, atomically (default: standard output)")
    p.set_defaults(func=cmd_results)

    p = verbs.add_parser("models", parents=[common], help="list the configured models and where each is loaded",
                         description="Each [models] alias, what it resolves to, its own engine settings, "
                                     "and which daemons on this spool have it loaded now.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

    p = verbs.add_parser("bench-models", parents=[common], help="compare models on the same lines",
                         description="Run the (sampled) valid lines of FILE through each model, one "
                                     "loaded at a time, with the daemon's engine settings; write "
                                     "report.md, report.json and report.png (speed against agreement "
                                     "with the reference model). Needs the GPU to itself: stop the "
                                     "daemon or give it another GPU first.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--models", required=True, metavar="A,B,...", help="aliases (or ids) from [models]")
    p.add_argument("--sample", type=int, default=0, metavar="N", help="use N random valid lines (default all)")
    p.add_argument("--reference", metavar="A", help="the model others are compared with (default the first)")
    p.add_argument("--out", metavar="DIR", help="where to write the report (default bench-models-<time>/)")
    p.add_argument("--inflight", type=int, default=0, metavar="N",
                   help="requests in flight (default as the daemon: [engine] max_inflight)")
    p.add_argument("--gpu-hour-price", type=float, metavar="USD",
                   help="price of a GPU-hour for the cost column (default [models] gpu_hour_price)")
    p.set_defaults(func=cmd_bench_models)

    p = verbs.add_parser("api", parents=[common], help="serve the OpenAI Files and Batches API over the spool (HTTP)",
                         description="Serve the OpenAI-compatible HTTP API at [api] listen (default "
                                     "127.0.0.1:8090): point the `openai` SDK's base_url at "
                                     "http://HOST:PORT/v1. Keys come from [api] keys_file (NAME:KEY[:admin] "
                                     "per line, reread on SIGHUP); without one, loopback only.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--listen", metavar="HOST:PORT", help="override [api] listen (HOST:PORT or a socket path)")
    p.set_defaults(func=cmd_api)

    p = verbs.add_parser("demo", parents=[common], help="run a sample batch on a tiny local model",
                         description="Build a tiny random-weight model, start the daemon on a "
                                     "temporary spool, submit a sample batch and show the results. "
                                     "Needs no GPU and no network.")
    p.add_argument("--lines", type=int, default=200, help="requests in the sample batch (default 200)")
    p.set_defaults(func=cmd_demo)
    return parser


def _config(args: argparse.Namespace) -> Config:
    path = config_path(args.config)
    return load_config(path, must_exist=bool(args.config))


class NoSpool(Exception):
    """The spool the config names does not exist; the message says which config named it."""


def _spool(args: argparse.Namespace, config: Config) -> Spool:
    """The spool `config` names, for a verb that looks into it. A missing one is said, with where its
    path came from (a config not found means the default: the commonest reason is a forgotten --config),
    rather than shown as an empty queue or a job that is not there."""
    from .spool import Spool

    root = Path(config.spool.root)
    try:
        is_dir = root.is_dir()
    except OSError:  # kept out of a parent: the verb's own look says whose it is
        is_dir = True
    if not is_dir:
        path = config_path(args.config)
        named = (f"that is [spool] root in {path}; the daemon makes the spool when it first starts"
                 if Path(path).exists() else
                 f"{path} does not exist, so that is the default [spool] root; name your config with --config "
                 f"PATH (or $SPOOLD_CONFIG)")
        raise NoSpool(f"no spool at {root}: {named}")
    return Spool(config.spool)


def setup_logging(verbose: bool = False) -> None:
    """Journal when started by systemd, stderr otherwise; never prompt text either way."""
    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler | None = None
    if os.environ.get("JOURNAL_STREAM") and os.environ.get("INVOCATION_ID"):
        try:
            from systemd.journal import JournalHandler

            handler = JournalHandler(SYSLOG_IDENTIFIER="spoold")
            # The journal keeps priority, logger and time as fields of its own.
            handler.setFormatter(logging.Formatter("%(message)s"))
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def cmd_run(args: argparse.Namespace) -> int:
    """`spoold run`: the daemon in the foreground until SIGTERM (systemd's ExecStart); the exit status says why."""
    from .daemon import Daemon
    from .engine import EngineLoadError, load_engine
    from .spool import check_results_group, results_gid

    setup_logging(args.verbose)

    def read_config() -> Config:
        config = _config(args)
        if args.host_id:
            config = replace(config, spool=replace(config.spool, host_id=args.host_id))
        if args.metrics_listen is not None:
            config = replace(config, metrics=replace(config.metrics, listen=args.metrics_listen))
        return config

    config = read_config()
    try:
        check_results_group(config.spool.group)
    except ValueError as e:
        raise ConfigError(f"[spool] group: {e}") from None
    if not config.engine.model:
        raise ConfigError("[engine] model is not set: name a Hugging Face id, a local path "
                          "or an alias from [models]")
    from .webhooks import read_secrets

    webhook_secrets = read_secrets(config.webhooks)
    served = _resolver(config).served
    def make_engine(model: str = served):
        return load_engine(engine_settings_for(config, model))

    try:
        engine = make_engine()
    except (EngineLoadError, ValueError) as e:
        raise ConfigError(str(e)) from None
    from .events import EventPublisher
    from .metrics import Metrics

    metrics = Metrics()
    metrics.serve(config.metrics.listen)
    try:
        events = EventPublisher(config.events.endpoint, config.spool.host_id, results_gid(config.spool.group))
    except Exception as e:  # zmq.ZMQError: a bad or busy endpoint
        raise ConfigError(f"[events] endpoint {config.events.endpoint!r}: {e}") from None
    return Daemon(config, engine, metrics=metrics, events=events, reload_config=read_config,
                  make_engine=make_engine, webhook_secrets=webhook_secrets).run()


def cmd_api(args: argparse.Namespace) -> int:
    """`spoold api`: the OpenAI Files and Batches API over the spool, until SIGTERM; jobs still run in the daemon."""
    from .apiserver import serve

    setup_logging(args.verbose)
    config = _config(args)
    if args.listen is not None:
        config = replace(config, api=replace(config.api, listen=args.listen))
    return serve(config)


def cmd_cancel(args: argparse.Namespace) -> int:
    """`spoold cancel`: stop jobs (a split batch on every daemon running a part), keeping their results so far;
    a submitter's own running job is asked for through the inbox."""
    from .groups import Groups

    spool = _spool(args, _config(args))
    missing = 0
    for job_id in args.jobs:
        try:
            job = spool.request_cancel(job_id) or Groups(spool).request_cancel(job_id)
        except PermissionError:  # a running job is the daemon's to change: its owner asks in the inbox
            outcome = _cancel_own(spool, job_id)
            missing += not outcome.asked
            print(outcome.said if outcome.asked else f"spoold: {outcome.said}",
                  file=sys.stdout if outcome.asked else sys.stderr)
            continue
        if job is None:
            missing += 1
            print(f"spoold: no job {job_id!r} in {spool.processing}/ (finished ones are in outbox/; "
                  f"a drop not yet claimed is withdrawn by deleting it from the inbox)", file=sys.stderr)
            _say_where(spool, job_id)
        else:
            where = "every daemon running its parts" if job.path.parent.name == "groups" else job.path.parent.name
            print(f"cancelling {job.id} on {where}: its results so far go to {spool.outbox / job.id}")
    return 1 if missing else 0


def _cancel_own(spool: Spool, job_id: str) -> OwnCancel:
    """The cancel of a running job this user may not mark: asked for in the inbox, if the job is theirs."""
    from .owncancel import OwnCancel, cancel_own_job

    try:
        outcome = cancel_own_job(spool, job_id)
    except PermissionError:
        outcome = None
    return outcome or OwnCancel(False, f"cannot cancel {job_id!r}: a running job in {spool.processing}/ is "
                                       f"changed by its owner, the daemon's user and root only; run it as root "
                                       f"(sudo spoold cancel ...)")


def cmd_retry(args: argparse.Namespace) -> int:
    """`spoold retry`: drop a new job of a finished job's retryable failures, linked to it by `retry_of`."""
    from .retries import NoSuchJob, finished_job, write_retry

    config = _config(args)
    spool = _spool(args, config)
    missing = 0
    for job_id in args.jobs:
        try:
            job = finished_job(spool.outbox, job_id)
        except NoSuchJob as e:
            print(f"spoold: {e}", file=sys.stderr)
            _say_where(spool, job_id)
            missing += 1
            continue
        refusal = _retry_refusal(spool, job)
        if refusal is not None:
            print(f"spoold: {refusal}", file=sys.stderr)
            missing += 1
            continue
        drop = write_retry(job, spool.inbox, config.limits.max_line_bytes)
        if drop.path is None:
            print(f"{job_id}: every line has its final answer; nothing to retry")
        else:
            why = ", ".join(f"{n} {reason}" for reason, n in sorted(drop.reasons.items()))
            print(f"{job_id}: {drop.lines} lines ({why}) dropped as {drop.path}; when it is done, "
                  f"`spoold results {job_id}` merges them")
    return EXIT_BAD_INPUT if missing else EXIT_OK


def _retry_refusal(spool: Spool, job: Path) -> str | None:
    """Why this user may not retry finished `job` (None: they may). Said before any drop is made: the
    claim would run a drop naming someone else's job as a job of its own, which `results` never merges."""
    from .access import user_name
    from .retries import job_submitter, may_retry

    if may_retry(job, os.geteuid(), os.stat(spool.outbox).st_uid):
        return None
    return (f"cannot retry {job.name!r}: it is {user_name(job_submitter(job))}'s job; only its submitter, the "
            f"daemon's user and root may retry it (sudo spoold retry ...)")


def cmd_results(args: argparse.Namespace) -> int:
    """`spoold results`: one result per custom_id over a job and its retries, the latest success winning."""
    from .retries import NoSuchJob, merge_results, retry_chain

    spool = _spool(args, _config(args))
    try:
        chain = retry_chain(spool.outbox, args.job)
    except NoSuchJob as e:
        print(f"spoold: {e}", file=sys.stderr)
        _say_where(spool, args.job)
        return EXIT_BAD_INPUT
    if args.output:
        from .durable import atomic_output

        with atomic_output(Path(args.output)) as out:
            merged = merge_results(chain, out)
    else:
        merged = merge_results(chain, sys.stdout.buffer)
        sys.stdout.flush()
    print(f"{args.job}: {merged.results} results, {merged.from_retries} of them from {len(chain) - 1} "
          f"retries; {merged.failing} still without a success", file=sys.stderr)
    return EXIT_OK


def _say_where(spool: Spool, typed: str) -> None:
    """After "no such job": where the job typed is, or which jobs came from a drop of that name."""
    from .joblookup import hint

    if (where := hint(spool, typed)) is not None:
        print(f"spoold: {where}", file=sys.stderr)


def cmd_models(args: argparse.Namespace) -> int:
    """`spoold models`: the configured models, their aliases, and which one a daemon has loaded now."""
    import json

    from .catalog import model_rows, render

    rows = model_rows(_config(args))
    print(json.dumps(rows, indent=2) if args.json else render(rows))
    return 0


def cmd_bench_models(args: argparse.Namespace) -> int:
    """`spoold bench-models`: the same lines through each named model, to pick one on speed and answers."""
    import asyncio
    import time

    from .benchmodels import markdown_table, run_model, sample_requests, score_agreement, write_report
    from .engine import load_engine

    setup_logging()
    config = _config(args)
    resolver = _resolver(config)
    aliases = [a.strip() for a in args.models.split(",") if a.strip()]
    models = {}
    for alias in aliases:
        model, why = resolver.resolve(alias)
        if model is None:
            raise ConfigError(f"--models: {why}")
        models[alias] = model
    reference = args.reference or aliases[0]
    if reference not in models:
        raise ConfigError(f"--reference {reference!r} is not one of --models")
    rows = sample_requests(Path(args.file), resolver, args.sample)
    if not rows:
        print(f"spoold: {args.file}: no valid lines to run", file=sys.stderr)
        return 1
    inflight = args.inflight or config.engine.inflight_limit
    price = config.models.gpu_hour_price if args.gpu_hour_price is None else args.gpu_hour_price

    async def run_all():
        return [await run_model(alias, model, rows, lambda m: load_engine(engine_settings_for(config, m)),
                                inflight, price) for alias, model in models.items()]

    reports = asyncio.run(run_all())
    score_agreement(reports, rows, reference)
    out = Path(args.out or time.strftime("bench-models-%Y%m%dT%H%M%S"))
    paths = write_report(reports, out, reference, args.file)
    print(markdown_table(reports, reference))
    if "png" in paths:
        print(f"\nwrote {paths['markdown']}, {paths['json']} and {paths['png']}")
    else:
        print(f"\nwrote {paths['markdown']} and {paths['json']}; for the chart, install matplotlib "
              "(pip install 'spoold[bench]')")
    return 0


def _resolver(config: Config):
    from .validation import ModelResolver

    return ModelResolver(config.models.aliases, config.engine.model)


def _context_tokens(config: Config) -> Callable[[str], int]:
    """model → its configured `max_model_len` (0 where vLLM takes it from the model): what `validate` and
    `submit` hold a line that sets no output limit to, as the daemon does with the loaded model's own."""
    return lambda model: engine_settings_for(config, model).max_model_len


#: Line errors that say a line is not one JSON object at all (rather than a request with a wrong field).
NOT_JSONL_CODES = frozenset({"invalid_json", "not_an_object"})


def _print_report(report, out=sys.stdout) -> None:
    if report.refused is not None:  # the daemon would fail it unread: no line counts to show
        print(f"{report.path}: {report.refused.code}: {report.refused}; the daemon would fail the whole file",
              file=out)
        return
    for err in report.errors:
        print(f"{report.path}:{err.line}: {err.code}: {err.message}", file=out)
    print(f"{report.path}: {report.lines} lines, {report.valid} valid, {len(report.errors)} bad", file=out)
    if report.errors and not report.valid and all(e.code in NOT_JSONL_CODES for e in report.errors):
        # the whole file is another shape: say which conversion makes it JSONL, not only what each line lacks
        src = shlex.quote(report.path)
        print(f"{report.path}: no line is a JSON object: JSONL has one request object per line. A JSON array "
              f"converts with `jq -c '.[]' {src} > fixed.jsonl`, pretty-printed JSON with "
              f"`jq -c . {src} > fixed.jsonl`", file=out)


def cmd_validate(args: argparse.Namespace) -> int:
    """`spoold validate`: every line checked as the daemon checks it, nothing submitted; fails if any line is bad."""
    from .submit import validate_file

    config = _config(args)
    bad = False
    for path in args.files:
        try:
            with _file_bar(path, "checking") as progress:
                report = validate_file(path, _resolver(config), config.limits, progress=progress,
                                       context_tokens=_context_tokens(config))
        except OSError as e:
            print(f"{path}: cannot read: {e.strerror or e}", file=sys.stderr)
            bad = True
            continue
        _print_report(report)
        bad = bad or bool(report.errors) or report.refused is not None
    return EXIT_BAD_INPUT if bad else EXIT_OK


@contextlib.contextmanager
def _file_bar(path: str, doing: str) -> Iterator[Callable[[int], None]]:
    """A progress bar over `path`'s bytes on stderr, shown only on a terminal (scripts and logs get none),
    cleared when done; yields what to tell how many bytes are done."""
    from tqdm import tqdm

    try:
        size = os.stat(path).st_size
    except OSError:
        size = None  # the caller's open says why
    with tqdm(total=size, desc=f"{doing} {Path(path).name}", unit="B", unit_scale=True, leave=False,
              disable=None, file=sys.stderr, mininterval=0.25) as bar:
        yield lambda done: bar.update(done - bar.n)


def _priority(text: str) -> int:
    """`--priority`: a whole number from 1 to MAX_PRIORITY, or a usage error saying so."""
    from .jobrecord import MAX_PRIORITY, parse_priority

    priority = parse_priority(text)
    if priority is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to {MAX_PRIORITY}")
    return priority


def cmd_submit(args: argparse.Namespace) -> int:
    """`spoold submit`: validate, then put each file in the inbox atomically, so the daemon never claims half a file."""
    from .heartbeat import START_A_DAEMON
    from .submit import submit_file, validate_file

    config = _config(args)
    resolver = _resolver(config)
    if args.model:
        model, why = resolver.resolve(args.model)
        if model is None:
            print(f"spoold: --model: {why}", file=sys.stderr)
            return EXIT_USAGE
    spool = _spool(args, config)
    inbox = spool.inbox
    if not inbox.is_dir():
        print(f"spoold: inbox {inbox} does not exist: the daemon makes it when it first starts ({START_A_DAEMON})",
              file=sys.stderr)
        return EXIT_USAGE
    status, submitted = EXIT_OK, False
    for path in args.files:
        try:
            with _file_bar(path, "checking") as progress:
                report = validate_file(path, resolver, config.limits, args.model, progress,
                                       _context_tokens(config))
            if report.refused is not None:  # it would fail unrun: never submit it
                _print_report(report, sys.stderr)
                status = EXIT_BAD_INPUT
                continue
            if report.errors:
                _print_report(report, sys.stderr)
                if args.strict:
                    status = EXIT_BAD_INPUT
                    continue
            metadata = {"priority": str(args.priority)} if args.priority else None
            with _file_bar(path, "copying") as progress:
                dest = submit_file(path, inbox, args.model, config.limits.max_line_bytes, metadata, progress)
        except OSError as e:
            print(f"{path}: cannot submit: {_why_not(e, inbox)}", file=sys.stderr)
            status = EXIT_BAD_INPUT
            continue
        print(f"{path} -> {dest}")
        submitted = True
    if submitted:
        _warn_if_no_daemon(spool, config.heartbeat.seconds, f"the drops wait in {spool.inbox}/")
    return status


def _why_not(e: OSError, inbox: Path) -> str:
    """Why a file could not be submitted: the inbox refusing this user says whose it is and how to get in;
    anything else (the file itself unreadable, a full disk) is the system's own words."""
    from .access import refused

    if isinstance(e, PermissionError) and e.filename and Path(os.fsdecode(e.filename)).is_relative_to(inbox):
        return refused(e)
    return str(e.strerror or e)


def _warn_if_no_daemon(spool: Spool, beat_seconds: float, so: str) -> None:
    """With no daemon beating, a drop waits and a watch shows nothing, silently: say so (`so`: what waits),
    and what to do."""
    from .heartbeat import START_A_DAEMON, host_beats

    try:
        beats = host_beats(spool.processing, beat_seconds)
    except PermissionError:
        return  # a user outside the spool's group: unknown, so not said
    if not any(beat.beating for beat in beats):
        print(f"spoold: no daemon is running on this spool, so {so}: {START_A_DAEMON}", file=sys.stderr)


def cmd_status(args: argparse.Namespace) -> int:
    """`spoold status`: queued, running and finished jobs, read from the spool (no daemon needed)."""
    from .status import render_status, spool_status, status_json

    config = _config(args)
    status = spool_status(_spool(args, config), config.watchdog.stall_seconds, config.heartbeat.seconds)
    print(status_json(status) if args.json else render_status(status))
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    """`spoold doctor`: every check of the setup, each failure with what to do about it."""
    from .doctor import as_json, passed, render, run_checks

    checks = run_checks(config_path(args.config), args.unit, args.user)
    print(as_json(checks) if args.json else render(checks))
    return EXIT_OK if passed(checks) else EXIT_BAD_INPUT


def cmd_watch(args: argparse.Namespace) -> int:
    """`spoold watch`: live progress bars from the daemon's ZeroMQ feed."""
    from .spool import Spool
    from .viewer import watch_bars, watch_json

    if args.endpoint:  # another host's feed: this spool says nothing of it
        endpoint = args.endpoint
    else:
        config = _config(args)
        endpoint = config.events.endpoint
        # not _spool(): a watch may well be started before the daemon first makes the spool
        _warn_if_no_daemon(Spool(config.spool), config.heartbeat.seconds, "no events come until one starts")
    return watch_json(endpoint) if args.json else watch_bars(endpoint)


def cmd_demo(args: argparse.Namespace) -> int:
    """`spoold demo`: a sample batch through a tiny model built locally, to see the whole path work on a new box."""
    from .demo import run_demo

    return run_demo(lines=args.lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
