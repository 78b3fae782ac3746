"""`spoold bench-models`: the same lines through several models, compared by measurement.

Picking a model means running the same few thousand records through each
candidate and comparing speed, quality and cost. This runs the (optionally
sampled) lines of one batch file through each model with the daemon's own
engine adapter and request validation, one model loaded at a time, and
writes a Markdown table, a JSON file and a PNG chart (speed against
agreement with a reference model). Only figures are written: no prompt or
response text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .cpus import CpuPlacement
from .engine import Engine
from .records import EngineRequest, EngineResult
from .gpu import GpuReader, process_tree_mib
from .validation import LineValidator, ModelResolver, Repeat, check_file

log = logging.getLogger(__name__)

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class ModelReport:
    """One model's figures; every number in the Markdown table comes from here."""

    alias: str
    model: str
    lines: int
    load_seconds: float
    requests_per_second: float
    output_tokens_per_second: float
    first_result_seconds: float
    latency_p50_seconds: float
    latency_p95_seconds: float
    peak_memory_mib: float
    memory_source: str
    parse_share: float | None
    agreement: float | None
    cost_per_1000_lines: float | None
    errors: int
    answers: dict[str, Any] = field(default_factory=dict, repr=False)


def sample_requests(path: Path, resolver: ModelResolver, sample: int, seed: int = 0,
                    max_line_bytes: int = 4 << 20) -> list[dict]:
    """The lines of `path` the daemon would run (a reservoir sample of `sample` of them when given).

    Judged by the daemon's own checks (validation.check_file): bad lines and
    repeated custom_ids are left out, as the daemon would give them errors.
    """
    rng = random.Random(seed)
    requests: list[EngineRequest] = []
    repeats: set[int] = set()
    seen = 0
    with open(path, "rb") as f:
        for item in check_file(f, lambda finder: LineValidator(resolver, duplicates=finder), max_line_bytes):
            if isinstance(item, Repeat):
                repeats.add(item.request.line)
            elif isinstance(item, EngineRequest):
                seen += 1
                if not sample or len(requests) < sample:
                    requests.append(item)
                elif (j := rng.randrange(seen)) < sample:
                    requests[j] = item
    return [{"custom_id": r.custom_id, "method": "POST", "url": r.url, "body": r.body}
            for r in requests if r.line not in repeats]


def expected_kind(body: dict) -> str:
    """What a good answer parses as: `json` when asked for JSON, `score` when asked for a score, else `text`."""
    fmt = body.get("response_format") or {}
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        return "json"
    prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", []) if isinstance(m, dict))
    prompt += str(body.get("prompt", ""))
    return "score" if "score" in prompt.lower() else "text"


def parse_answer(kind: str, result: EngineResult) -> Any:
    """The answer in a comparable form, or None when it does not parse as `kind`."""
    if result.status_code != 200:
        return None
    try:
        choice = json.loads(result.body_json)["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    text = (choice.get("message") or {}).get("content") if "message" in choice else choice.get("text")
    text = (text or "").strip()
    if kind == "json":
        try:
            return json.loads(text)
        except ValueError:
            return None
    if kind == "score":
        m = _NUMBER.search(text)
        return float(m.group()) if m else None
    return text


def agrees(kind: str, a: Any, b: Any) -> bool:
    """Same answer: scores within ±1, JSON and text equal."""
    if kind == "score":
        return abs(a - b) <= 1
    return a == b


async def run_model(alias: str, model: str, rows: list[dict], make_engine: Callable[[str], Engine],
                    inflight: int, gpu_hour_price: float, cpus: CpuPlacement | None = None) -> ModelReport:
    """Load one model, run every row through it, unload it; measure all the way.

    Placed on the CPUs as the daemon is (`CpuPlacement`), so a CPU box
    measures what the daemon would do.
    """
    cpus = cpus or CpuPlacement()
    gpus = GpuReader()
    sampler = _PeakSampler(gpus)
    sampler_task = asyncio.create_task(sampler.run())
    started = time.monotonic()
    engine = make_engine(model)
    try:
        cpus.release()
        await engine.start()
        load_seconds = time.monotonic() - started
        cpus.keep_off_engine()
        latencies, answers, tokens, errors, first = await _run_rows(engine, model, rows, inflight)
        elapsed = time.monotonic() - started - load_seconds
    finally:
        await engine.close()
        cpus.release()
        sampler_task.cancel()
    kinds = [expected_kind(r["body"]) for r in rows]
    judged = [a for a, k in zip(answers.values(), kinds) if k != "text"]
    return ModelReport(
        alias=alias, model=model, lines=len(rows), load_seconds=round(load_seconds, 2),
        requests_per_second=round(len(rows) / elapsed, 2) if elapsed > 0 else 0.0,
        output_tokens_per_second=round(tokens / elapsed, 1) if elapsed > 0 else 0.0,
        first_result_seconds=round(first, 3),
        latency_p50_seconds=round(_percentile(latencies, 50), 3),
        latency_p95_seconds=round(_percentile(latencies, 95), 3),
        peak_memory_mib=round(sampler.peak, 1), memory_source=sampler.source,
        parse_share=round(sum(a is not None for a in judged) / len(judged), 3) if judged else None,
        agreement=None,
        cost_per_1000_lines=(round(gpu_hour_price * elapsed / 3600 / len(rows) * 1000, 4)
                             if gpu_hour_price and rows else None),
        errors=errors, answers=answers)


async def _run_rows(engine: Engine, model: str, rows: list[dict], inflight: int):
    slots = asyncio.Semaphore(inflight)
    latencies: list[float] = []
    answers: dict[str, Any] = {}
    counts = {"tokens": 0, "errors": 0}
    begin = time.monotonic()
    first: list[float] = []

    async def one(row: dict) -> None:
        async with slots:
            body = {**row["body"], "model": model}
            t = time.monotonic()
            result = await engine.handle(EngineRequest(0, row["custom_id"], row["url"], body))
            latencies.append(time.monotonic() - t)
            if not first:
                first.append(time.monotonic() - begin)
            bar.update()
            counts["tokens"] += result.completion_tokens
            counts["errors"] += result.status_code != 200
            answers[row["custom_id"]] = parse_answer(expected_kind(row["body"]), result)

    with tqdm(total=len(rows), desc=model.rsplit("/", 1)[-1][:30], unit="req", leave=False) as bar:
        await asyncio.gather(*(one(r) for r in rows))
    return latencies, answers, counts["tokens"], counts["errors"], first[0] if first else 0.0


def score_agreement(reports: list[ModelReport], rows: list[dict], reference: str) -> None:
    """Each model's share of lines whose answer agrees with the reference model's."""
    ref = next(r for r in reports if r.alias == reference)
    kinds = {row["custom_id"]: expected_kind(row["body"]) for row in rows}
    for report in reports:
        pairs = [(kinds[cid], a, ref.answers.get(cid)) for cid, a in report.answers.items()]
        pairs = [(k, a, b) for k, a, b in pairs if a is not None and b is not None]
        report.agreement = round(sum(agrees(k, a, b) for k, a, b in pairs) / len(pairs), 3) if pairs else None


COLUMNS = [("model", "alias"), ("load s", "load_seconds"), ("req/s", "requests_per_second"),
           ("out tok/s", "output_tokens_per_second"), ("first result s", "first_result_seconds"),
           ("p50 s", "latency_p50_seconds"), ("p95 s", "latency_p95_seconds"),
           ("peak memory MiB", "peak_memory_mib"), ("parses", "parse_share"),
           ("agreement", "agreement"), ("$ / 1000 lines", "cost_per_1000_lines"), ("errors", "errors")]


def markdown_table(reports: list[ModelReport], reference: str) -> str:
    """The comparison as a Markdown table; each cell is the JSON value as written."""
    head = "| " + " | ".join(title for title, _ in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    rows = [head, rule]
    for r in reports:
        cells = ["–" if getattr(r, key) is None else str(getattr(r, key)) for _, key in COLUMNS]
        rows.append("| " + " | ".join(cells) + " |")
    memory = {r.memory_source for r in reports}
    rows.append("")
    rows.append(f"Agreement: share of lines answered like `{reference}` (scores within ±1, JSON and text "
                f"equal). Parses: share of JSON or score answers that parse. Peak memory: {', '.join(memory)}.")
    return "\n".join(rows)


def write_chart(reports: list[ModelReport], path: Path, reference: str) -> None:
    """Speed against agreement, one labelled point per model: up and to the right is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for r in reports:
        y = 100 * (r.agreement or 0.0)
        ax.scatter(r.requests_per_second, y, s=80)
        ax.annotate(f"{r.alias}\n{r.output_tokens_per_second:g} tok/s", (r.requests_per_second, y),
                    textcoords="offset points", xytext=(8, 4), fontsize=9)
    ax.set_xlabel("requests per second (higher is faster)")
    ax.set_ylabel(f"agreement with {reference} (%)")
    ax.set_ylim(-5, 110)
    ax.set_xlim(0, max(r.requests_per_second for r in reports) * 1.3 or 1)
    ax.grid(True, alpha=0.3)
    ax.set_title("spoold bench-models: speed against agreement")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(reports: list[ModelReport], out: Path, reference: str, source: str) -> dict[str, Path]:
    """report.md, report.json and (with matplotlib, the `bench` extra) report.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {"input_file": source, "reference": reference,
           "models": [{k: v for k, v in asdict(r).items() if k != "answers"} for r in reports]}
    paths = {"json": out / "report.json", "markdown": out / "report.md", "png": out / "report.png"}
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
    paths["markdown"].write_text(markdown_table(reports, reference) + "\n")
    try:
        write_chart(reports, paths["png"], reference)
    except ImportError:  # the daemon does not need matplotlib; only this chart does
        del paths["png"]
    return paths


def _percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, math.ceil(pct) - 1))]


class _PeakSampler:
    """The highest GPU memory in use (NVML) or, without NVML, this process tree's RSS."""

    def __init__(self, gpus: GpuReader) -> None:
        self.gpus, self.peak = gpus, 0.0
        self.source = "GPU memory used (NVML)" if gpus.read() else "process memory (RSS, no NVML)"

    async def run(self) -> None:
        while True:
            readings = self.gpus.read()
            now = (sum(g["memory_used_bytes"] for g in readings) / 2**20) if readings else process_tree_mib()
            self.peak = max(self.peak, now)
            await asyncio.sleep(0.2)
