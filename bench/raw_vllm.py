"""Contender 1, the ceiling: vLLM's offline `LLM.chat` over every prompt in one call.

Run as a script (vLLM spawns its engine process). Loads the model once and
prints `READY {json}` with the load seconds; then for each workload path
read from stdin it runs `LLM.chat` over the whole file and prints one line
`BENCH_RESULT {json}` with engine seconds and output tokens. Staying loaded
lets bench.run alternate it with the others seconds apart, not minutes.
"""

import argparse
import json
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--engine", required=True, help="engine arguments as JSON")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=args.model, **json.loads(args.engine))
    print("READY " + json.dumps({"load_s": time.perf_counter() - started}), flush=True)
    for path in sys.stdin:
        rows = [json.loads(line) for line in open(path.strip())]
        began = time.perf_counter()
        messages = [r["body"]["messages"] for r in rows]
        params = [SamplingParams(max_tokens=r["body"]["max_tokens"], temperature=r["body"]["temperature"],
                                 ignore_eos=r["body"]["ignore_eos"]) for r in rows]
        outputs = llm.chat(messages, params, use_tqdm=False)
        seconds = time.perf_counter() - began
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        print("BENCH_RESULT " + json.dumps({"engine_s": seconds, "requests": len(outputs),
                                            "output_tokens": tokens, "first_result_s": seconds}), flush=True)


if __name__ == "__main__":
    main()
