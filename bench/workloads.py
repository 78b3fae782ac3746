"""The benchmark workloads: OpenAI-Batch chat files, identical for every contender."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("candidate data engineer python spark kafka score ticket priority summary customer refund "
         "shipping delay invoice contract renewal years experience team lead remote").split()


def default_rows(n: int, model: str) -> list[dict]:
    """n chat requests of exactly 32 output tokens (ignore_eos), short prompts."""
    return [_row(i, model, f"Score candidate {i} from 1 to 10 for the data engineer role.", 32) for i in range(n)]


def mixed_rows(n: int, model: str, seed: int = 7) -> list[dict]:
    """n chat requests whose prompt (10-320 tokens, lognormal) and output (4-128 tokens)
    lengths are drawn from a spread, like real scoring prompts. Lengths are counted
    with the model's own tokenizer so every request fits max_model_len (512)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        target = min(320, max(10, int(rng.lognormvariate(4.2, 0.7))))
        words: list[str] = []
        while len(tokenizer.encode(" ".join(words))) < target:
            words.append(rng.choice(WORDS))
        out = rng.choice([4, 8, 16, 32, 64, 128])
        rows.append(_row(i, model, " ".join(words), out))
    return rows


def _row(i: int, model: str, prompt: str, max_tokens: int) -> dict:
    return {"custom_id": f"bench-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": prompt}],
                     "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}


def write_workload(path: Path, rows: list[dict]) -> Path:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
