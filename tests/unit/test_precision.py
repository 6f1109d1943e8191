"""The CPU precision check (factory/precision.py): its judgement, what it keys a verdict by, and
float32's scoring, on both outcomes (the 16-bit engine kept, float32 chosen)."""

from __future__ import annotations

import asyncio
import json

import pytest

from factory import precision
from factory.precision import CHECKED_TOKENS, REFERENCE_QUESTIONS, REGRET_LIMIT, Verdict, judge

N = len(REFERENCE_QUESTIONS)
ZEN4 = "model name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512vl\n"
SAPPHIRE = "model name\t: Intel(R) Xeon(R) Platinum 8488C\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ANSWERS = [f"answer {i}" for i in range(N)]


def test_answers_float32_agrees_with_keep_the_16_bit_engine():
    regrets = [[0.0] * CHECKED_TOKENS for _ in range(N)]
    regrets[2][3] = REGRET_LIMIT  # a tie float32 itself can hardly tell apart
    v = judge(regrets, ANSWERS, "bfloat16", "a CPU")
    assert v.dtype == "bfloat16" and v.worst_regret == REGRET_LIMIT


def test_a_clear_wrong_choice_moves_the_replica_to_float32_and_names_it():
    # SmolLM2 compiled in bf16 on a Zen 4: "L'Étoile" for the capital of France, 0.098 nats below "The".
    regrets = [[0.0] * CHECKED_TOKENS for _ in range(N)]
    regrets[0][0] = 0.0983
    v = judge(regrets, ["L'Étoile, la Marseillaise", *ANSWERS[1:]], "bfloat16", "AMD EPYC (avx2)")
    assert v.dtype == "float32"
    assert v.worst_question == "What is the capital of France?" and v.answer.startswith("L'Étoile")
    line = v.line("smollm2-135m", cached=False)
    assert "serves float32" in line and "0.098" in line and "L'Étoile" in line and "AMD EPYC" in line


def test_only_the_answer_counts_not_the_rambling_after_it():
    regrets = [[0.0] * (CHECKED_TOKENS + 4) for _ in range(N)]
    regrets[4][CHECKED_TOKENS + 2] = 0.5  # a later near tie that sends the rest elsewhere
    assert judge(regrets, ANSWERS, "bfloat16", "a CPU").dtype == "bfloat16"
    regrets[4][CHECKED_TOKENS - 1] = 0.5
    assert judge(regrets, ANSWERS, "bfloat16", "a CPU").dtype == "float32"


def test_the_cpu_is_named_with_the_flags_that_choose_kernels():
    assert precision.cpu_identity(ZEN4) == ("AMD EPYC 9R14", ["avx2", "avx512f", "avx512_bf16"])
    name, flags = precision.cpu_identity(SAPPHIRE)
    assert "Xeon" in name and {"amx_tile", "amx_bf16"} <= set(flags)
    assert precision.machine_label("") == "unknown CPU (no AVX2)"


def test_a_verdict_is_kept_per_machine(tiny_model_dir, tmp_path):
    settings = {"enforce_eager": True, "cpus": 2, "reference": None}
    amd = precision.verdict_path(str(tiny_model_dir), settings, ZEN4, tmp_path)
    assert amd == precision.verdict_path(str(tiny_model_dir), settings, ZEN4, tmp_path)
    assert amd != precision.verdict_path(str(tiny_model_dir), settings, SAPPHIRE, tmp_path)
    assert amd != precision.verdict_path(str(tiny_model_dir), {**settings, "enforce_eager": False}, ZEN4, tmp_path)
    v = Verdict("float32", "bfloat16", 0.1, REFERENCE_QUESTIONS[0], "L'Étoile", "AMD EPYC")
    precision.save_verdict(amd, v)
    assert precision.load_verdict(amd) == v
    amd.write_text("{not json")
    assert precision.load_verdict(amd) is None  # a damaged file means: check again


def test_only_a_16_bit_checkpoint_left_on_auto_is_checked(tiny_model_dir, tmp_path):
    assert precision.candidate_dtype("auto", str(tiny_model_dir)) == "bfloat16"
    assert precision.candidate_dtype("bfloat16", str(tiny_model_dir)) is None  # the operator chose
    fp32 = tmp_path / "fp32"
    fp32.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (fp32 / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))
    assert precision.candidate_dtype("auto", str(fp32)) is None


def test_float32_scores_its_own_greedy_answer_zero_and_a_worse_token_by_its_distance(tiny_model_dir):
    """The scorer subprocess, on the real tiny model: float32's own greedy choices cost nothing; a
    different token costs exactly float32's log-prob gap between the two."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt = precision.reference_prompts(str(tiny_model_dir))[0]
    ids, greedy = torch.tensor([prompt]), []
    with torch.inference_mode():
        for _ in range(4):
            logprobs = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
            greedy.append(int(logprobs.argmax()))
            ids = torch.cat([ids, torch.tensor([[greedy[-1]]])], 1)
        first = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)
    worst = int(first.argmin())
    own, other = precision.score(str(tiny_model_dir), [prompt, prompt], [greedy, [worst]])
    assert own == [0.0] * 4
    assert other[0] == pytest.approx(float(first.max() - first[worst]), abs=1e-3) and other[0] > 1.0


def test_a_check_that_cannot_run_leaves_the_engine_serving_and_keeps_no_verdict(tmp_path, caplog):
    plan = precision.Plan("m", str(tmp_path / "no-such-model"), "bfloat16", tmp_path / "verdict.json")
    with caplog.at_level("WARNING", logger="factory.precision"):
        assert asyncio.run(plan.run(engine=None)) == "bfloat16"
    assert plan.verdict is None and not (tmp_path / "verdict.json").exists()
    assert "serves bfloat16 unchecked" in caplog.text
