"""Contender 1, the ceiling: vLLM's offline `LLM.chat` over every prompt in one call.

Run as a script (vLLM spawns its engine process). Prints one line
`BENCH_RESULT {json}` with load and engine seconds and output tokens.
"""

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--engine", required=True, help="engine arguments as JSON")
    args = parser.parse_args()
    rows = [json.loads(line) for line in open(args.input)]

    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=args.model, **json.loads(args.engine))
    loaded = time.perf_counter()
    messages = [r["body"]["messages"] for r in rows]
    params = [SamplingParams(max_tokens=r["body"]["max_tokens"], temperature=r["body"]["temperature"],
                             ignore_eos=r["body"]["ignore_eos"]) for r in rows]
    outputs = llm.chat(messages, params, use_tqdm=False)
    done = time.perf_counter()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print("BENCH_RESULT " + json.dumps({"load_s": loaded - started, "engine_s": done - loaded,
                                        "requests": len(outputs), "output_tokens": tokens,
                                        "first_result_s": done - loaded}), flush=True)


if __name__ == "__main__":
    main()
