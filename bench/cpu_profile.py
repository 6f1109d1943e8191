"""The embedded model's energy profile on this CPU: decode step time by batch, prefill tokens/s.

    .venv/bin/python bench/cpu_profile.py [--passes 3] [--out configs/profiles/cpu-smollm2-135m.modeled.json]

Runs SmolLM2-135M in the real vLLM engine with the factory's own engine settings (the embedded
default config through `llm_config_for`, vLLM's API-server defaults for the rest, so the step
token budget is the one a replica gets), in this process, with a scheduler subclass that times
each engine step the way the factory's meter does: from the end of `schedule()` to the end of
`update_from_output()`, the interval the modeled power source counts as busy.

- decode: `batch` requests with distinct random prompts of --prompt-tokens, ignore_eos, each
  --output-tokens long; step_s = mean over the steps that carry exactly `batch` decode tokens
  (every request prefilled, none finished). Context = prompt + half the output: the window's middle.
- prefill: `batch` fresh prompts, one output token; step_s = mean over --prefill-repeats of the
  step that carries all their prompt tokens; tok_s = prompt tokens / step_s.
- the whole sweep runs --passes times and each point keeps its fastest pass: on a shared machine
  other work only ever adds time. About a minute per pass on 2 idle cores.

Power is MODELED exactly as the factory models a CPU replica: while a step runs the device draws
telemetry.modeled_max_watts (120 W by default), so power_w is that figure at every point and
j_per_tok = power_w x step_s / batch (prefill: power_w / tok_s). Only the step times are measured.
Prompts are random token ids, distinct per request and per run, so prefix caching never skips work.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import sys
import time
from pathlib import Path

import vllm
from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.usage.usage_lib import UsageContext
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine.llm_engine import LLMEngine

from factory.app import llm_config_for
from factory.config import AUTO_PROFILE_CPU, FactoryConfig
from factory.models import resolve
from factory.policy.profile import EnergyProfile, ProfilePoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scheduler_vs_stock import cpu_model  # noqa: E402  (sibling script)

MODEL = "smollm2-135m"
FIRST_TOKEN_ID = 100  # random prompts draw from [FIRST_TOKEN_ID, vocab): clear of the special tokens


class StepClock(Scheduler):
    """vLLM's scheduler, recording (requests, tokens, seconds) for every non-empty step."""

    steps: list[tuple[int, int, float]] = []

    def schedule(self, *args, **kwargs):
        out = super().schedule(*args, **kwargs)
        self._open = (out, time.perf_counter())
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        result = super().update_from_output(scheduler_output, model_runner_output)
        out, t0 = self._open
        if out is scheduler_output and out.total_num_scheduled_tokens:
            StepClock.steps.append(
                (len(out.num_scheduled_tokens), out.total_num_scheduled_tokens, time.perf_counter() - t0)
            )
        return result


def _engine(cfg: FactoryConfig) -> LLMEngine:
    model = cfg.models[0]
    resolved = resolve(model.source)
    engine = llm_config_for(model, resolved, gpu=False, drain_timeout_s=0, metered=False).engine_kwargs
    args = EngineArgs(model=resolved.path_or_id, scheduler_cls=StepClock, disable_log_stats=True, **engine)
    # The factory's replicas build their engine in the API-server context (Ray Serve LLM does),
    # which sets vLLM's CPU step token budget (2048); LLM() would get the offline one (4096).
    return LLMEngine.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)


def _run(engine: LLMEngine, rng: random.Random, batch: int, prompt_tok: int, output_tok: int) -> list:
    """Serve `batch` requests to the end; returns the steps they took."""
    vocab = engine.model_config.get_vocab_size()
    params = SamplingParams(max_tokens=output_tok, ignore_eos=True, temperature=0.0)
    for _ in range(batch):
        prompt = [rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(prompt_tok)]
        engine.add_request(f"r{rng.getrandbits(64):x}", {"prompt_token_ids": prompt}, params)
    StepClock.steps.clear()
    while engine.has_unfinished_requests():
        engine.step()
    return list(StepClock.steps)


def _point(
    phase: str, batch: int, context: int, step_s: float, tokens: int, power_w: float, steps: int
) -> ProfilePoint:
    tok_s = tokens / step_s
    return ProfilePoint(
        phase=phase,
        batch=batch,
        context=context,
        step_s=round(step_s, 6),
        tok_s=round(tok_s, 2),
        power_w=power_w,
        j_per_tok=round(power_w / tok_s, 6),
        source="modeled",
        extra={"derived": ["tok_s", "j_per_tok"], "repeats": steps, "window_s": round(step_s * steps, 3)},
    )


def measure_decode(engine, rng, batch: int, prompt_tok: int, output_tok: int, power_w: float) -> ProfilePoint:
    steps = _run(engine, rng, batch, prompt_tok, output_tok)
    full = [s for n, tok, s in steps if n == batch and tok == batch]
    if len(full) < output_tok // 2:  # the window would be dominated by ramp-up steps
        raise RuntimeError(f"decode batch {batch}: only {len(full)} full-batch steps of {len(steps)}")
    return _point("decode", batch, prompt_tok + output_tok // 2, sum(full) / len(full), batch, power_w, len(full))


def measure_prefill(engine, rng, batch: int, prompt_tok: int, repeats: int, power_w: float) -> ProfilePoint:
    times = []
    for _ in range(repeats):
        steps = _run(engine, rng, batch, prompt_tok, 1)
        whole = [s for n, tok, s in steps if n == batch and tok == batch * prompt_tok]
        if not whole:
            raise RuntimeError(f"prefill batch {batch}: {batch * prompt_tok} prompt tokens never ran in one step")
        times.append(whole[0])
    return _point("prefill", batch, prompt_tok, sum(times) / len(times), batch * prompt_tok, power_w, repeats)


def sweep(engine: LLMEngine, rng: random.Random, args: argparse.Namespace, power_w: float):
    """One pass over every decode and prefill batch, yielding each point as it is measured."""
    for batch in args.decode_batches:
        yield measure_decode(engine, rng, batch, args.prompt_tokens, args.output_tokens, power_w)
    for batch in args.prefill_batches:
        yield measure_prefill(engine, rng, batch, args.prompt_tokens, args.prefill_repeats, power_w)


def _row(p: ProfilePoint) -> str:
    return (
        f"{p.phase:<8}{p.batch:>6}{p.context:>8}{p.step_s * 1000:>10.2f}{p.tok_s:>11.1f}"
        f"{p.power_w:>8.1f}{p.j_per_tok:>10.4f}"
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(AUTO_PROFILE_CPU))
    ap.add_argument("--decode-batches", type=_ints, default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--prefill-batches", type=_ints, default=[1, 4, 16])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--prefill-repeats", type=int, default=3)
    ap.add_argument(
        "--passes", type=int, default=3, help="sweeps; each point keeps its fastest (a busy machine only adds time)"
    )
    args = ap.parse_args()
    cfg = FactoryConfig()  # the embedded default: the engine settings a CPU replica runs with
    power_w = cfg.telemetry.modeled_max_watts
    rng = random.Random(0)
    t0 = time.monotonic()
    engine = _engine(cfg)
    print(f"engine up in {time.monotonic() - t0:.0f} s; {cpu_model()}, {os.cpu_count()} cores", flush=True)
    _run(engine, rng, 8, args.prompt_tokens, 8)  # warm-up, not measured
    print(f"{'phase':<8}{'batch':>6}{'context':>8}{'step ms':>10}{'tok/s':>11}{'W':>8}{'J/tok':>10}", flush=True)
    fastest: dict[tuple[str, int], ProfilePoint] = {}
    for _ in range(args.passes):
        for point in sweep(engine, rng, args, power_w):
            print(_row(point), flush=True)
            key = (point.phase, point.batch)
            if key not in fastest or point.step_s < fastest[key].step_s:
                fastest[key] = point
    profile = EnergyProfile(
        card=cpu_model(),
        driver=None,
        model=MODEL,
        date=datetime.date.today().isoformat(),
        source="modeled",
        method=(
            f"bench/cpu_profile.py: vLLM {vllm.__version__} engine (CPU, eager, the factory's engine settings) "
            f"on {os.cpu_count()} cores; step time from the scheduler's step clock (end of schedule to end of "
            f"update, as the factory's meter counts busy time); decode: random {args.prompt_tokens}-token "
            f"prompts, ignore_eos, {args.output_tokens} output tokens, mean over full-batch decode steps, context = "
            f"prompt + half the output; "
            f"prefill: the step carrying all prompts, mean of {args.prefill_repeats}; fastest of {args.passes} "
            f"pass(es); power MODELED: "
            f"telemetry.modeled_max_watts = {power_w:g} W while a step runs, J/token = W x step_s / tokens"
        ),
        points=tuple(fastest.values()),
    )
    profile.save(args.out)
    print(f"wrote {args.out} in {time.monotonic() - t0:.0f} s (energy MODELED, {power_w:g} W busy)")
    return 0


if __name__ == "__main__":
    # The engine core runs in this process (read when the engine is built), so StepClock is the
    # class the engine uses and its records are readable here.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    sys.exit(main())
