"""bench-models' figures and report, with the fast engine double (the vLLM run is in e2e)."""

import asyncio
import json
import os

from spoold.benchmodels import (agrees, expected_kind, markdown_table, parse_answer, run_model, score_agreement,
                                write_report)
from spoold.config import EngineSettings
from spoold.records import EngineResult

from .fake_engine import EchoEngine
from .helpers import ALL_CPUS, chat_line, needs_two_cpus, start_bound_worker


def answer(text):
    return EngineResult(200, json.dumps({"choices": [{"message": {"content": text}}]}), 1, 1)


def test_answers_parse_by_what_the_line_asks_for():
    assert expected_kind({"messages": [{"content": "Give a SCORE 1-5"}]}) == "score"
    assert expected_kind({"response_format": {"type": "json_object"}, "messages": []}) == "json"
    assert expected_kind({"prompt": "hello"}) == "text"
    assert parse_answer("score", answer("I'd say 4/5.")) == 4.0
    assert parse_answer("score", answer("no idea")) is None
    assert parse_answer("json", answer('{"ok": true}')) == {"ok": True}
    assert parse_answer("json", answer("{broken")) is None
    assert parse_answer("text", EngineResult(400, "{}")) is None
    assert agrees("score", 3.0, 4.0) and not agrees("score", 2.0, 4.0) and agrees("text", "a", "a")


def test_a_report_from_two_models_table_equals_json_and_the_chart_is_a_png(tmp_path):
    rows = [dict(chat_line(i), custom_id=f"c{i}") for i in range(12)]

    def make(model):
        return EchoEngine(EngineSettings(model=model, args={"delay": 0.001}))

    async def both():
        return [await run_model(a, m, rows, make, 4, 3.0) for a, m in (("a", "org/a"), ("b", "org/b"))]

    reports = asyncio.run(both())
    score_agreement(reports, rows, "a")
    paths = write_report(reports, tmp_path, "a", "in.jsonl")
    doc = json.loads(paths["json"].read_text())
    table = paths["markdown"].read_text().splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    for line, model in zip(table[2:4], doc["models"]):
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        assert cells["req/s"] == str(model["requests_per_second"]) and cells["agreement"] == str(model["agreement"])
    assert [m["parse_share"] for m in doc["models"]] == [1.0, 1.0]  # "Score candidate i" -> "line 0"
    assert [m["agreement"] for m in doc["models"]] == [1.0, 1.0] and doc["models"][0]["cost_per_1000_lines"] > 0
    assert markdown_table(reports, "a") == paths["markdown"].read_text().rstrip("\n")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_report_is_the_table_and_json(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where the `bench` extra is not installed
    rows = [dict(chat_line(i), custom_id=f"c{i}") for i in range(3)]
    reports = [asyncio.run(run_model("a", "org/a", rows, lambda m: EchoEngine(EngineSettings(model=m)), 2, 0.0))]
    score_agreement(reports, rows, "a")
    paths = write_report(reports, tmp_path, "a", "in.jsonl")
    assert set(paths) == {"json", "markdown"} and not (tmp_path / "report.png").exists()
    assert json.loads(paths["json"].read_text())["models"][0]["alias"] == "a"


@needs_two_cpus
def test_a_model_is_measured_with_the_daemons_cpu_placement():
    """On a CPU box the figures must be the daemon's: its threads keep off the engine's worker core."""
    class BoundWorkerEngine(EchoEngine):
        async def start(self):
            self.worker, self.worker_done = start_bound_worker(min(ALL_CPUS))  # binds itself, as vLLM's CPU worker does
            await super().start()

        async def handle(self, request):
            masks.append(os.sched_getaffinity(0))
            return await super().handle(request)

        async def close(self):
            self.worker_done.set()
            self.worker.join(30)
            await super().close()

    masks = []
    rows = [dict(chat_line(i), custom_id=f"c{i}") for i in range(4)]
    asyncio.run(run_model("a", "org/a", rows, lambda m: BoundWorkerEngine(EngineSettings(model=m)), 2, 0))
    assert masks and all(mask == ALL_CPUS - {min(ALL_CPUS)} for mask in masks)
    assert os.sched_getaffinity(0) == ALL_CPUS  # given back once the model is unloaded
