"""What `factory bench` sends: prompts and answer lengths, built deterministically from a seed.

Datasets (the `--dataset` spec):
- `random`: prompts of random common English words; input and output lengths from distributions.
- `shared-prefix`: `prefix_groups` groups, each with a shared prefix of `prefix_len` words; every
  request is its group's prefix plus a unique question of `input_len` words (prefix caching's case).
- `sharegpt:FILE`: real conversations (ShareGPT JSON): the first human turn is the prompt, the
  following answer's length (≈ chars / 4 tokens) is max_tokens.
- `trace:FILE`: a trace (factory/bench/tracefile.py) replayed: random-word prompts of each entry's
  length, sent at each entry's `t_s`.

Lengths are in words, not tokens: each word below is one common lowercase word that BPE
tokenizers encode as one token with its leading space, so a prompt of N words is ≈ N tokens plus
the chat template. The exact count comes back in `usage.prompt_tokens`, and that is what the
metrics use; `expected_input_tok` only describes what was asked.

Every random prompt is a different slice of one random word corpus, starting at a distinct
offset, so no two prompts share a prefix and prefix caching cannot make them free.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from factory.bench.tracefile import TraceError, read_trace

# Short, frequent words: one token each (with the leading space) in GPT-2, Llama and Qwen vocabularies.
WORDS = (
    "the of and to in is was for on are as with his they at be this from have or by one had not but what "
    "all were when we there can an your which their said if do will each about how up out them then she "
    "many some so these would other into has more her two like him see time could no make than first "
    "been its who now people my made over did down only way find use may water long little very after "
    "words called just where most know get through back much before go good new write our used me man "
    "too any day same right look think also around another came come work three word must because does "
    "part even place well such here take why things help put years different away again off went old "
    "number great tell men say small every found still between name should home big give air line set "
    "own under read last never us left end along while might next sound below saw something thought both "
    "few those always looked show large often together asked house world going want school important "
    "until form food keep children feet land side without boy once animals life enough took sometimes "
    "four head above kind began almost live page got earth need far hand high year mother light parts "
    "country father let night following picture being study second eyes soon times story boys since "
    "white days paper hard near sentence better best across during today others however sure means knew "
    "try told young miles sun ways thing whole hear example heard several change answer room sea against "
    "top turned learn point city play toward five using himself usually money seen car morning given "
    "trees family"
).split()

DISTRIBUTIONS = ("fixed", "uniform", "lognormal", "normal")
KINDS = ("random", "shared-prefix", "sharegpt", "trace")
_HUMAN = {"human", "user"}
_ASSISTANT = {"gpt", "assistant", "chatgpt", "model", "bard", "bing"}


class DatasetError(ValueError):
    """A dataset spec or file that cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True)
class BenchRequest:
    index: int
    messages: list[dict]
    max_tokens: int
    expected_input_tok: int | None  # words asked (random/prefix/trace) or ≈ chars/4 (sharegpt)
    arrival_s: float | None = None  # trace replay only: send at t0 + arrival_s
    prefix: str | None = None  # requests with the same value share a prompt prefix
    cls: str = "standard"


@dataclass(frozen=True, slots=True)
class DatasetSpec:
    kind: str  # one of KINDS
    path: Path | None = None  # sharegpt and trace


def parse_dataset(spec: str) -> DatasetSpec:
    kind, _, rest = spec.partition(":")
    if kind in ("random", "shared-prefix"):
        if rest:
            raise DatasetError(f"dataset {spec!r}: {kind} takes no file (lengths come from --input-len/--output-len)")
        return DatasetSpec(kind)
    if kind in ("sharegpt", "trace"):
        if not rest:
            raise DatasetError(f"dataset {spec!r}: name the file, as {kind}:FILE")
        path = Path(rest).expanduser()
        if not path.is_file():
            raise DatasetError(f"dataset {spec!r}: {path} is not a readable file")
        return DatasetSpec(kind, path)
    raise DatasetError(
        f"dataset {spec!r}: unknown kind {kind!r}; use random, shared-prefix, sharegpt:FILE or trace:FILE"
    )


def parse_length(spec: str) -> tuple[str, tuple[float, ...]]:
    """Parses "512" | "uniform:64:512" | "lognormal:MEAN:SIGMA" | "normal:MEAN:STD" -> (kind, params)."""
    parts = spec.strip().split(":")
    try:
        nums = tuple(float(p) for p in (parts if len(parts) == 1 else parts[1:]))
    except ValueError:
        raise DatasetError(f"length {spec!r}: parameters must be numbers") from None
    kind = "fixed" if len(parts) == 1 else parts[0]
    want = {"fixed": 1, "uniform": 2, "lognormal": 2, "normal": 2}
    if kind not in want:
        raise DatasetError(
            f"length {spec!r}: unknown distribution {kind!r}; "
            "use N, uniform:LO:HI, lognormal:MEAN:SIGMA or normal:MEAN:STD"
        )
    if len(nums) != want[kind]:
        raise DatasetError(f"length {spec!r}: {kind} takes {want[kind]} parameter(s)")
    if kind == "fixed" and (nums[0] < 1 or nums[0] != int(nums[0])):
        raise DatasetError(f"length {spec!r}: a fixed length is a whole number >= 1")
    if kind == "uniform" and not (1 <= nums[0] <= nums[1] and all(v == int(v) for v in nums)):
        raise DatasetError(f"length {spec!r}: uniform needs whole numbers 1 <= LO <= HI")
    if kind in ("lognormal", "normal") and (nums[0] < 1 or nums[1] < 0):
        raise DatasetError(f"length {spec!r}: {kind} needs MEAN >= 1 and a spread >= 0")
    return kind, nums


def sample_lengths(spec: str, n: int, rng: np.random.Generator) -> list[int]:
    """n lengths (>= 1). lognormal's MEAN is the lengths' mean (not mu) and SIGMA the log's
    sigma; lognormal is capped at 8 x MEAN so one giant prompt cannot dominate a run."""
    kind, p = parse_length(spec)
    if kind == "fixed":
        return [int(p[0])] * n
    if kind == "uniform":
        values = rng.integers(int(p[0]), int(p[1]) + 1, size=n)
    elif kind == "lognormal":
        mean, sigma = p
        values = np.minimum(rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, size=n), 8 * mean)
    else:
        values = rng.normal(p[0], p[1], size=n)
    return [max(1, int(round(v))) for v in values]


class _Corpus:
    """One random word sequence; a prompt of L words is a slice of it, found in O(1) by offsets."""

    def __init__(self, rng: np.random.Generator, n_words: int):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=n_words)]
        self.text = " ".join(words)
        self.starts = np.zeros(n_words + 1, dtype=np.int64)  # char offset of each word; last = len + 1
        np.cumsum([len(w) + 1 for w in words], out=self.starts[1:])

    def words(self, at: int, count: int) -> str:
        return self.text[self.starts[at] : self.starts[at + count] - 1]


def _unique_prompts(rng: np.random.Generator, lengths: list[int]) -> list[str]:
    """One prompt per length, each starting at a distinct corpus offset (so no shared prefix)."""
    if not lengths:
        return []
    longest = max(lengths)
    corpus = _Corpus(rng, len(lengths) + longest + 1)
    offsets = rng.permutation(len(lengths) + 1)[: len(lengths)]
    return [corpus.words(int(o), n) for o, n in zip(offsets, lengths, strict=True)]


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def build_requests(
    spec: str | DatasetSpec,
    n: int | None,
    seed: int,
    *,
    input_len: str = "512",
    output_len: str = "128",
    prefix_groups: int = 8,
    prefix_len: int = 1024,
) -> list[BenchRequest]:
    ds = parse_dataset(spec) if isinstance(spec, str) else spec
    if ds.kind != "trace" and (n is None or n < 1):
        raise DatasetError(f"dataset {ds.kind}: the number of requests must be >= 1 (got {n})")
    rng = np.random.default_rng(seed)
    if ds.kind == "random":
        ins, outs = sample_lengths(input_len, n, rng), sample_lengths(output_len, n, rng)
        prompts = _unique_prompts(rng, ins)
        return [BenchRequest(i, _user(prompts[i]), outs[i], ins[i]) for i in range(n)]
    if ds.kind == "shared-prefix":
        return _shared_prefix(rng, n, input_len, output_len, prefix_groups, prefix_len)
    if ds.kind == "sharegpt":
        return _sharegpt(rng, ds.path, n)
    return _trace(rng, ds.path, n, prefix_len)


def _shared_prefix(rng, n: int, input_len: str, output_len: str, groups: int, prefix_len: int) -> list[BenchRequest]:
    if groups < 1 or prefix_len < 1:
        raise DatasetError(f"shared-prefix needs prefix_groups >= 1 and prefix_len >= 1 (got {groups}, {prefix_len})")
    ins, outs = sample_lengths(input_len, n, rng), sample_lengths(output_len, n, rng)
    prefixes = _unique_prompts(rng, [prefix_len] * groups)
    questions = _unique_prompts(rng, ins)
    # Balanced like round-robin, but shuffled so a group's requests do not arrive in lockstep.
    group_of = rng.permutation(np.arange(n) % groups)
    out = []
    for i in range(n):
        g = int(group_of[i])
        text = prefixes[g] + " " + questions[i]
        out.append(BenchRequest(i, _user(text), outs[i], prefix_len + ins[i], prefix=str(g)))
    return out


def _turns(conv: dict) -> list | None:
    for key in ("conversations", "conversation", "messages"):
        if isinstance(conv.get(key), list):
            return conv[key]
    return None


def _first_exchange(conv) -> tuple[str, str] | None:
    """(first human turn, the answer right after it), or None if the conversation has no such pair."""
    turns = _turns(conv) if isinstance(conv, dict) else None
    if not turns:
        return None

    def role_text(t) -> tuple[str, str]:
        if not isinstance(t, dict):
            return "", ""
        role = t.get("from", t.get("role", ""))
        text = t.get("value", t.get("content", ""))
        return str(role).lower(), text if isinstance(text, str) else ""

    for a, b in zip(turns, turns[1:], strict=False):
        (ra, ta), (rb, tb) = role_text(a), role_text(b)
        if ra in _HUMAN and ta.strip():
            return (ta, tb) if rb in _ASSISTANT and tb.strip() else None
    return None


def _sharegpt(rng, path: Path, n: int) -> list[BenchRequest]:
    try:
        doc = json.loads(path.read_text())
    except OSError as err:
        raise DatasetError(f"sharegpt {path}: {err.strerror or err}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"sharegpt {path}: not JSON ({err})") from err
    if not isinstance(doc, list):
        raise DatasetError(f"sharegpt {path}: expected a JSON list of conversations, got {type(doc).__name__}")
    pairs = [p for p in map(_first_exchange, doc) if p is not None]
    if not pairs:
        raise DatasetError(
            f"sharegpt {path}: none of {len(doc)} entries has a human turn followed by an answer "
            '(expected {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]})'
        )
    # Answer length in tokens ≈ chars / 4 (English BPE average); the server's usage is what counts.
    order = rng.permutation(len(pairs))
    out = []
    for i in range(n):  # cycles when n > len(pairs): repeats are the same prompt (prefix-cache hits)
        prompt, answer = pairs[int(order[i % len(pairs)])]
        approx_out_tok, approx_in_tok = max(1, math.ceil(len(answer) / 4)), max(1, math.ceil(len(prompt) / 4))
        out.append(BenchRequest(i, _user(prompt), approx_out_tok, approx_in_tok))
    return out


def _trace(rng, path: Path, n: int | None, prefix_len: int) -> list[BenchRequest]:
    """A request per entry. An entry with a prefix shares the first min(prefix_len, input_tok - 1)
    words with every entry of the same prefix; the rest of its prompt is its own."""
    try:
        entries = read_trace(path)
    except TraceError as err:
        raise DatasetError(str(err)) from err
    entries = entries if n is None else entries[:n]
    if not entries:
        raise DatasetError(f"trace {path}: no entries")
    shared = [min(prefix_len, e.input_tok - 1) if e.prefix is not None else 0 for e in entries]
    tails = _unique_prompts(rng, [e.input_tok - s for e, s in zip(entries, shared, strict=True)])
    names = sorted({e.prefix for e in entries if e.prefix is not None})
    prefixes = dict(zip(names, _unique_prompts(rng, [prefix_len] * len(names)), strict=True))
    out = []
    for i, (e, s, tail) in enumerate(zip(entries, shared, tails, strict=True)):
        text = tail if s == 0 else " ".join(prefixes[e.prefix].split(" ", s)[:s]) + " " + tail
        out.append(BenchRequest(i, _user(text), e.output_tok, e.input_tok, e.t_s, e.prefix, e.cls))
    return out
