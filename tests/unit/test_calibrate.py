"""`factory calibrate`: refuses without a GPU before touching the probe, turns bad arguments into
one `factory:` line and exit 2, validates what the probe returns, and (CPU dry run through the
real command and the real probe) writes a profile that loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import factory.calibrate as calibrate
from factory.cli import main
from factory.policy.profile import load_profile

ROOT = Path(__file__).resolve().parents[2]
FACTORY = ROOT / ".venv" / "bin" / "factory"
NO_GPU = (
    "factory: no CUDA GPU here: calibrate measures a GPU's energy. "
    "Use --device cpu for a modeled dry run on tiny shapes (tiny, smollm2-135m).\n"
)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["calibrate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def no_probe(monkeypatch):
    """Fail the test if the command imports the probe."""
    monkeypatch.setattr(calibrate, "load_probe", lambda *a: pytest.fail("the probe was imported"))


def test_refuses_without_a_gpu_before_importing_the_probe(capsys, monkeypatch, tmp_path, no_probe):
    monkeypatch.setattr(calibrate, "cuda_available", lambda: False)
    out = tmp_path / "p.json"
    assert cli(capsys, "--shape", "llama-3.1-8b", "--out", str(out)) == (2, "", NO_GPU)
    assert not out.exists()


def test_refuses_on_this_machine_through_the_real_command(tmp_path):
    """The real path: torch's own answer, in the installed command."""
    if calibrate.cuda_available():
        pytest.skip("a CUDA GPU is here, so there is nothing to refuse")
    run = subprocess.run([str(FACTORY), "calibrate", "--shape", "llama-3.1-8b", "--out", "p.json"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert (run.returncode, run.stdout, run.stderr) == (2, "", NO_GPU)
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batches", "1,a"], "factory: --batches: 'a' is not an integer (comma-separated integers >= 1)"),
        (["--batches", "8,,64"], "factory: --batches: '' is not an integer"),
        (["--batches", ""], "factory: --batches: give at least one value"),
        (["--batches", "0,8"], "factory: --batches: 0 must be >= 1"),
        (["--contexts", " "], "factory: --contexts: give at least one value"),
        (["--contexts", "2k"], "factory: --contexts: '2k' is not an integer"),
        (["--phases", "decode,sample"], "factory: --phases: unknown phase 'sample'; known: decode, prefill"),
        (["--phases", ","], "factory: --phases: give at least one of decode, prefill"),
        (["--seconds", "0"], "factory: --seconds: must be > 0, got 0"),
        (["--seconds", "nan"], "factory: --seconds: must be > 0, got nan"),
        (["--seconds", "two"], "factory: --seconds: 'two' is not a number"),
        (["--repeats", "1.5"], "factory: --repeats: '1.5' is not an integer"),
        (["--repeats", "-1"], "factory: --repeats: must be > 0, got -1"),
        (["--device", "tpu"], "factory: --device must be cuda or cpu, got 'tpu'"),
        (["--out", "no/such/dir/p.json"], "factory: --out: directory no/such/dir does not exist"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2_before_any_work(capsys, monkeypatch, tmp_path, no_probe, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(calibrate, "cuda_available", lambda: pytest.fail("checked the GPU before the arguments"))
    code, out, err = cli(capsys, "--shape", "llama-3.1-8b", "--out", "p.json", *argv)
    assert (code, out) == (2, "")
    assert err.startswith(message) and err.count("\n") == 1, err


def test_missing_probe_says_where_it_lives(capsys, monkeypatch, tmp_path):
    """An installed factory without the checkout: `kernels.probe` cannot be imported."""
    monkeypatch.setitem(sys.modules, "kernels.probe", None)
    code, out, err = cli(capsys, "--device", "cpu", "--shape", "tiny", "--out", str(tmp_path / "p.json"))
    assert (code, out) == (2, "")
    assert err.startswith("factory: cannot import kernels.probe from ") and err.endswith(
        "the probe lives in the repository's kernels/ directory; run from a source checkout\n"
    )


def test_unknown_shape_lists_the_known_ones(capsys, tmp_path):
    from kernels.probe import SHAPES  # the real probe: its shapes are the list

    code, out, err = cli(capsys, "--device", "cpu", "--shape", "gpt-9", "--out", str(tmp_path / "p.json"))
    assert (code, out) == (2, "")
    assert err == f"factory: unknown shape 'gpt-9'; known shapes: {', '.join(sorted(SHAPES))}\n"
    assert "tiny" in SHAPES and "llama-3.1-8b" in SHAPES


def modeled_doc(points: list[dict]) -> dict:
    return {"schema": "factory.energy-profile/1", "card": "cpu", "driver": None, "model": "tiny",
            "date": "2026-11-26", "source": "modeled", "method": "dry run", "points": points,
            "skipped": [{"phase": "prefill", "batch": 2, "context": 8, "reason": "out of memory"}]}  # fmt: skip


def stub_probe(monkeypatch, doc: dict) -> list:
    """Stands in for the probe's GPU run (absent here); records how it was called."""
    calls = []

    def calibrate_(*args, **kwargs):
        calls.append((args, kwargs))
        kwargs["progress"]("decode", "batch", 1, done=1)
        return doc

    monkeypatch.setattr(calibrate, "load_probe", lambda: SimpleNamespace(SHAPES={"tiny": None}, calibrate=calibrate_))
    return calls


def test_validates_writes_and_prints_what_the_probe_returns(capsys, monkeypatch, tmp_path):
    point = {"phase": "decode", "batch": 2, "context": 8, "step_s": 0.004, "tok_s": 500.0, "power_w": 50.0,
             "j_per_tok": 0.1, "source": "modeled", "repeats": 1}  # fmt: skip
    calls = stub_probe(monkeypatch, modeled_doc([point]))
    out = tmp_path / "p.json"
    argv = ["--device", "cpu", "--shape", "tiny", "--batches", "8,1,8", "--contexts", "8", "--phases", "prefill,decode",
            "--seconds", "0.5", "--repeats", "2", "--out", str(out)]  # fmt: skip
    code, stdout, err = cli(capsys, *argv)
    assert code == 0, err
    assert calls == [(("tiny", [1, 8], [8]), {"phases": ["decode", "prefill"], "device": "cpu", "min_window_s": 0.5,
                                              "repeats": 2, "progress": calibrate._progress})]  # fmt: skip
    assert err == "decode batch 1 done=1\n"
    lines = stdout.splitlines()
    assert lines[0].split() == ["phase", "batch", "context", "step", "ms", "tok/s", "W", "J/tok", "source"]
    assert lines[1].split() == ["decode", "2", "8", "4.000", "500.0", "50.0", "0.1", "modeled"]
    assert lines[2:] == ["skipped: prefill batch 2 context 8: out of memory", f"wrote {out}"]
    assert load_profile(out).points[0].extra == {"repeats": 1}


def test_an_invalid_probe_document_is_kept_aside_not_written(capsys, monkeypatch, tmp_path):
    bad = {"phase": "decode", "batch": 2, "context": 8, "step_s": 0.004, "tok_s": 500.0, "power_w": 50.0,
           "j_per_tok": 0.2, "source": "modeled"}  # fmt: skip
    stub_probe(monkeypatch, modeled_doc([bad]))
    out = tmp_path / "p.json"
    code, stdout, err = cli(capsys, "--device", "cpu", "--shape", "tiny", "--out", str(out))
    assert (code, stdout) == (1, "")
    assert "points[0].j_per_tok: 0.2 is not power_w / tok_s = 0.1" in err
    assert not out.exists() and (tmp_path / "p.invalid.json").exists()


def test_cpu_dry_run_through_the_real_command_and_probe(tmp_path):
    run = subprocess.run(
        [str(FACTORY), "calibrate", "--device", "cpu", "--shape", "tiny", "--batches", "1,2", "--contexts", "8",
         "--seconds", "0.05", "--repeats", "1", "--out", "tmp.json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    profile = load_profile(tmp_path / "tmp.json")
    assert profile.model == "tiny"
    assert {p.source for p in profile.points} == {"modeled"}  # a CPU run is never shown as measured
    done = {(p.phase, p.batch, p.context) for p in profile.points}
    done |= {(s["phase"], s["batch"], s["context"]) for s in profile.skipped}
    assert done == {(phase, batch, 8) for phase in ("decode", "prefill") for batch in (1, 2)}
    assert run.stdout.splitlines()[0].split()[:3] == ["phase", "batch", "context"]
    assert run.stdout.endswith("wrote tmp.json\n")
