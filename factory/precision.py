"""Which dtype a CPU replica serves: the checkpoint's 16-bit dtype where its greedy answers are
float32's, float32 where they are not.

Why: vLLM's CPU kernels for bf16 differ from CPU to CPU (oneDNN on AVX-512 BF16, AMX tiles and
SGL's brgemm on Intel Xeons, inductor's code when compiled), and a small model's greedy answer
often hangs on a near tie. SmolLM2-135M's first token for "What is the capital of France?" is
"The" by 0.098 nats in float32; on some CPUs bf16 flips it and the answer becomes "L'Étoile, la
Marseillaise, ...". What decides it is the kernel path, not the conversion of the weights: the
bf16 checkpoint scored in float32 answers "Paris".

How: a replica whose model says `dtype: auto` on a CPU starts its engine in the checkpoint's
16-bit dtype and asks it for greedy answers to REFERENCE_QUESTIONS. float32 (transformers, in a
short subprocess so the replica keeps none of its memory) then scores each answer with teacher
forcing: the regret of a chosen token is float32's best log-prob at that position minus the
log-prob of the token the engine chose. The 16-bit engine stays if no regret in the first
CHECKED_TOKENS tokens of any answer exceeds REGRET_LIMIT; otherwise the replica restarts its
engine in float32. One log line says which and why. The verdict is kept per model, machine
(CPU model and the ISA flags that pick kernels) and engine settings, so later starts go straight
to it; a different CPU checks again.

REGRET_LIMIT sits between the near ties a correct 16-bit engine may flip (SmolLM2 on a Zen 4,
eager: one flip, 0.067 nats, at the 15th token) and the flip that gives the wrong answer
(0.098 nats, at the first token).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("factory.precision")

REFERENCE_QUESTIONS = (
    "What is the capital of France?",
    "What is 2 + 2?",
    "Which planet is the largest in our solar system?",
    "Who wrote Romeo and Juliet?",
    "What color is the sky on a clear day?",
    "How many days are in a week?",
)
CHECKED_TOKENS = 12  # the answer itself; what a small model says after it is rambling
REGRET_LIMIT = 0.05  # nats: a choice float32 finds at most ~5 % less likely than its best is a tie
SIXTEEN_BIT = ("bfloat16", "float16")
# The CPU flags that choose vLLM's and oneDNN's kernel paths.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")
SCORE_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class Verdict:
    dtype: str  # what the replica serves
    candidate: str  # the 16-bit dtype that was checked
    worst_regret: float  # nats, over every checked token of every answer
    worst_question: str
    answer: str  # the 16-bit engine's answer to worst_question
    machine: str  # the CPU it was decided on

    def line(self, model: str, *, cached: bool) -> str:
        how = "kept from an earlier check" if cached else "checked now"
        if self.dtype == self.candidate:
            return (
                f"precision: {model} serves {self.dtype} on {self.machine}: its greedy answers match float32's "
                f"on {len(REFERENCE_QUESTIONS)} reference questions (worst regret {self.worst_regret:.3f} nats, "
                f"limit {REGRET_LIMIT}; {how})"
            )
        return (
            f"precision: {model} serves float32 on {self.machine}: {self.candidate} answered "
            f"{self.worst_question!r} with {self.answer!r}, a token float32 finds {self.worst_regret:.3f} nats "
            f"less likely than its own choice (limit {REGRET_LIMIT}); float32 serves fewer tokens/s but answers "
            f"right ({how})"
        )


def judge(regrets: list[list[float]], answers: list[str], candidate: str, machine: str) -> Verdict:
    """The verdict from each answer's per-token regrets (only the first CHECKED_TOKENS count)."""
    worst, where = 0.0, 0
    for i, per_token in enumerate(regrets):
        top = max(per_token[:CHECKED_TOKENS], default=0.0)
        if top > worst:
            worst, where = top, i
    dtype = candidate if worst <= REGRET_LIMIT else "float32"
    return Verdict(dtype, candidate, round(worst, 4), REFERENCE_QUESTIONS[where], answers[where], machine)


# -- when the check applies -------------------------------------------------------------------------
def candidate_dtype(configured: str, source: str) -> str | None:
    """The 16-bit dtype to check, or None when there is nothing to decide: an explicit dtype is
    the operator's choice, and a float32 checkpoint runs as float32 anyway."""
    if configured != "auto":
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else ""
    return name if name in SIXTEEN_BIT else None


# -- the machine and the cache ----------------------------------------------------------------------
def cpu_identity(cpuinfo: str | None = None) -> tuple[str, list[str]]:
    """(CPU model name, the kernel-choosing ISA flags it has) from /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    name, flags = "unknown CPU", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name == "unknown CPU":
            name = " ".join(value.split())
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return name, [f for f in ISA_FLAGS if f in flags]


def machine_label(cpuinfo: str | None = None) -> str:
    name, flags = cpu_identity(cpuinfo)
    return f"{name} ({', '.join(flags) or 'no AVX2'})"


def verdict_path(source: str, settings: dict[str, Any], cpuinfo: str | None = None, home: Path | None = None) -> Path:
    """Where the verdict for this model, this machine and these engine settings is kept."""
    import torch
    import vllm

    from factory.models import factory_home

    model = Path(source)
    weights = (
        sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in model.glob("*.safetensors"))
        if model.is_dir()
        else []
    )
    key = {
        "source": str(model.resolve()) if model.is_dir() else source,
        "weights": weights,
        "cpu": cpu_identity(cpuinfo),
        "settings": settings,
        "versions": [vllm.__version__, torch.__version__],
        "check": [REFERENCE_QUESTIONS, CHECKED_TOKENS, REGRET_LIMIT],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return Path(home or factory_home()) / "precision" / f"{digest}.json"


def load_verdict(path: Path) -> Verdict | None:
    try:
        return Verdict(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def save_verdict(path: Path, verdict: Verdict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(verdict), indent=2) + "\n")
    tmp.replace(path)


# -- the check --------------------------------------------------------------------------------------
def reference_prompts(source: str) -> list[list[int]]:
    """REFERENCE_QUESTIONS as the model's chat template renders them, in token ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    prompts = []
    for question in REFERENCE_QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return prompts


async def greedy_answers(engine: Any, prompts: list[list[int]]) -> list[tuple[list[int], str]]:
    """Each prompt's greedy answer from a vLLM engine client (AsyncLLM), all at once."""
    import asyncio

    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=CHECKED_TOKENS)

    async def one(ids: list[int]) -> tuple[list[int], str]:
        last = None
        async for out in engine.generate({"prompt_token_ids": ids}, params, f"precision-{uuid.uuid4().hex}"):
            last = out
        done = last.outputs[0]
        return list(done.token_ids), done.text

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def score(reference: str, prompts: list[list[int]], answers: list[list[int]]) -> list[list[float]]:
    """float32's regret of every answer token (see the module's docstring), from a subprocess."""
    request = json.dumps({"model": reference, "prompts": prompts, "answers": answers})
    proc = subprocess.run(
        [sys.executable, "-m", "factory.precision", "score"],
        input=request,
        capture_output=True,
        text=True,
        timeout=SCORE_TIMEOUT_S,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"float32 scoring failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["regrets"]


def _score_main() -> None:
    """`python -m factory.precision score`: JSON in on stdin, regrets out on stdout."""
    import torch
    from transformers import AutoModelForCausalLM

    request = json.loads(sys.stdin.read())
    model = AutoModelForCausalLM.from_pretrained(request["model"], dtype=torch.float32).eval()
    regrets = []
    with torch.inference_mode():
        for prompt, answer in zip(request["prompts"], request["answers"], strict=True):
            if not answer:
                regrets.append([])
                continue
            ids = torch.tensor([prompt + answer])
            logprobs = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
            chosen = logprobs.gather(1, torch.tensor(answer).unsqueeze(1)).squeeze(1)
            regrets.append([round(float(x), 5) for x in logprobs.max(dim=1).values - chosen])
    print(json.dumps({"regrets": regrets}))


async def check(engine: Any, source: str, candidate: str, reference: str | None = None) -> Verdict:
    """Ask the running 16-bit engine, score its answers in float32, judge. `reference` is the
    checkpoint float32 scores with (default: the served one, upcast)."""
    import asyncio

    started = time.monotonic()
    prompts = reference_prompts(source)
    answers = await greedy_answers(engine, prompts)
    regrets = await asyncio.to_thread(score, reference or source, prompts, [ids for ids, _ in answers])
    verdict = judge(regrets, [text for _, text in answers], candidate, machine_label())
    log.info("precision check of %s took %.1f s", source, time.monotonic() - started)
    return verdict


@dataclasses.dataclass
class Plan:
    """One replica's precision decision: what its engine starts in, and whether to check it."""

    model: str
    source: str
    candidate: str | None  # the 16-bit dtype under question; None = nothing to decide
    path: Path | None = None  # where the verdict is kept
    verdict: Verdict | None = None  # known before the engine starts (kept from an earlier check)
    reference: str | None = None

    @classmethod
    def for_engine(cls, model: str, source: str, engine_kwargs: dict[str, Any], reference: str | None) -> Plan:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return cls(model, source, None)  # GPUs' 16-bit kernels are what those models are trained for
        candidate = candidate_dtype(str(engine_kwargs.get("dtype", "auto")), source)
        if candidate is None:
            return cls(model, source, None)
        settings = {k: engine_kwargs.get(k) for k in ("enforce_eager", "block_size", "compilation_config")}
        settings["cpus"] = len(os.sched_getaffinity(0))  # oneDNN's reduction order follows the thread count
        settings["reference"] = reference
        path = verdict_path(source, settings)
        verdict = load_verdict(path)
        if verdict is not None:
            log.info(verdict.line(model, cached=True))
        return cls(model, source, candidate, path, verdict, reference)

    @property
    def pending(self) -> bool:
        return self.candidate is not None and self.verdict is None

    @property
    def dtype(self) -> str | None:
        """The dtype to start the engine in (None = as configured)."""
        return self.verdict.dtype if self.verdict is not None else self.candidate

    async def run(self, engine: Any) -> str:
        """Check the running engine, keep and log the verdict; the dtype to serve. A check that
        cannot run (the reference unreadable, the scorer failing) leaves the engine as it is,
        says so, and is tried again at the next start: it must never keep a replica from serving."""
        assert self.candidate is not None and self.path is not None
        try:
            self.verdict = await check(engine, self.source, self.candidate, self.reference)
        except Exception as err:
            log.warning("precision: %s serves %s unchecked: the check failed (%s)", self.model, self.candidate, err)
            return self.candidate
        save_verdict(self.path, self.verdict)
        log.info(self.verdict.line(self.model, cached=False))
        return self.verdict.dtype


if __name__ == "__main__":
    if sys.argv[1:] != ["score"]:
        sys.exit("usage: python -m factory.precision score  (a JSON request on stdin)")
    _score_main()
