"""What each choice of the CPU precision check costs: tokens/s of the embedded model in its 16-bit
dtype and in float32, same engine settings as a CPU replica (eager, the default KV cache), side by
side in one run, plus what the check itself decides on this machine.

    .venv/bin/python bench/precision_speed.py [--model ~/.cache/factory/models/smollm2-135m]
        [--batches 1,32] [--output-len 128] [--out result.json]

vLLM offline (`LLM.generate`, greedy, ignore_eos) for each dtype and batch size; the prompt is
256 tokens. Compare figures only within one run (the CPU is named in the output).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path


def _throughput(model: str, dtype: str, batches: list[int], output_len: int) -> dict[int, float]:
    from vllm import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, enforce_eager=True, max_model_len=1024, max_num_seqs=max(batches),
              kv_cache_memory_bytes=2**29, seed=0)  # fmt: skip
    prompt = {"prompt_token_ids": [(i * 7919) % 30000 + 100 for i in range(256)]}
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=8))  # warm-up
    out = {}
    for batch in batches:
        started = time.perf_counter()
        results = llm.generate([prompt] * batch, params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        out[batch] = sum(len(r.outputs[0].token_ids) for r in results) / elapsed
    llm.llm_engine.engine_core.shutdown()
    return out


async def _verdict(model: str) -> dict:
    """The check's own decision, on a bf16 engine built as the replica builds it."""
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from factory import precision

    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(model, dtype="bfloat16", enforce_eager=True, max_model_len=1024, kv_cache_memory_bytes=2**28)
    )
    try:
        verdict = await precision.check(engine, model, "bfloat16")
    finally:
        engine.shutdown()
    return {"dtype": verdict.dtype, "worst_regret": verdict.worst_regret, "worst_question": verdict.worst_question}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path("~/.cache/factory/models/smollm2-135m").expanduser()))
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from factory.precision import machine_label

    batches = [int(b) for b in args.batches.split(",")]
    result = {"cpu": machine_label(), "model": args.model, "output_len": args.output_len, "tokens_per_s": {}}
    for dtype in ("bfloat16", "float32"):
        result["tokens_per_s"][dtype] = _throughput(args.model, dtype, batches, args.output_len)
    result["check"] = asyncio.run(_verdict(args.model))
    print(f"{result['cpu']}; {Path(args.model).name}, eager, output {args.output_len} tokens, energy not measured")
    print(f"{'batch':>5}  {'bf16 tok/s':>10}  {'fp32 tok/s':>10}  {'fp32/bf16':>9}")
    for b in batches:
        bf16, fp32 = result["tokens_per_s"]["bfloat16"][b], result["tokens_per_s"]["float32"][b]
        print(f"{b:>5}  {bf16:>10.1f}  {fp32:>10.1f}  {fp32 / bf16:>9.2f}")
    print(f"the check on this machine: {result['check']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
