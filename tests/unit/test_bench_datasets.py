"""What `factory bench` sends: deterministic for a seed, lengths within each distribution's
bounds, shared prefixes that really are shared, ShareGPT and trace files read as documented,
and clear errors for what cannot be used."""

from __future__ import annotations

import json

import numpy as np
import pytest

from factory.bench.datasets import (
    WORDS,
    DatasetError,
    DatasetSpec,
    build_requests,
    parse_dataset,
    parse_length,
    sample_lengths,
)
from factory.bench.tracefile import TraceEntry, write_trace


def _text(req) -> str:
    return req.messages[0]["content"]


def test_random_is_deterministic_for_a_seed_and_differs_across_seeds():
    a = build_requests("random", 50, 7, input_len="uniform:10:40", output_len="lognormal:64:0.5")
    b = build_requests("random", 50, 7, input_len="uniform:10:40", output_len="lognormal:64:0.5")
    c = build_requests("random", 50, 8, input_len="uniform:10:40", output_len="lognormal:64:0.5")
    assert a == b
    assert [_text(r) for r in a] != [_text(r) for r in c]


def test_each_level_of_a_sweep_sends_prompts_no_earlier_level_sent():
    # Prompts repeated across levels would be served from the server's prefix cache.
    from factory.bench.runner import level_seed

    levels = [build_requests("random", 200, level_seed(0, i), input_len="64", output_len="8") for i in range(3)]
    first_words = [{" ".join(_text(r).split()[:8]) for r in level} for level in levels]
    assert not (first_words[0] & first_words[1]) and not (first_words[1] & first_words[2])


def test_random_prompts_have_the_asked_word_count_from_the_word_list_and_are_unique():
    reqs = build_requests("random", 300, 1, input_len="uniform:5:60", output_len="32")
    for i, r in enumerate(reqs):
        words = _text(r).split(" ")
        assert r.index == i and r.messages[0]["role"] == "user"
        assert len(words) == r.expected_input_tok and 5 <= len(words) <= 60
        assert set(words) <= set(WORDS)
        assert r.max_tokens == 32 and r.arrival_s is None and r.prefix is None
    # Unique even in their first 4 words: prefix caching cannot make one prompt free after another.
    starts = [" ".join(_text(r).split(" ")[:4]) for r in reqs]
    assert len(set(starts)) == len(starts)


@pytest.mark.parametrize(
    ("spec", "lo", "hi", "mean"),
    [
        ("512", 512, 512, 512),
        ("uniform:64:512", 64, 512, 288),
        ("lognormal:200:0.8", 1, 1600, 200),
        ("normal:100:30", 1, 10**6, 100),
    ],
)
def test_lengths_stay_in_each_distributions_bounds(spec, lo, hi, mean):
    values = sample_lengths(spec, 5000, np.random.default_rng(3))
    assert all(isinstance(v, int) for v in values)
    assert lo <= min(values) and max(values) <= hi
    assert abs(np.mean(values) - mean) / mean < 0.06


def test_lognormal_is_capped_and_normal_clipped_to_one():
    assert max(sample_lengths("lognormal:10:3", 4000, np.random.default_rng(0))) == 80  # 8 x mean
    assert min(sample_lengths("normal:2:50", 4000, np.random.default_rng(0))) == 1


@pytest.mark.parametrize(
    "spec", ["0", "abc", "uniform:10", "uniform:50:10", "uniform:1.5:9", "gauss:1:2", "lognormal:0:1", "normal:5:-1"]
)
def test_bad_length_specs_say_why(spec):
    with pytest.raises(DatasetError, match="length"):
        parse_length(spec)


def test_shared_prefix_groups_share_exact_prefix_text_and_questions_differ():
    reqs = build_requests("shared-prefix", 64, 5, input_len="20", output_len="8", prefix_groups=4, prefix_len=100)
    by_group: dict[str, list[str]] = {}
    for r in reqs:
        by_group.setdefault(r.prefix, []).append(_text(r))
        assert r.expected_input_tok == 120 and len(_text(r).split(" ")) == 120
    assert sorted(by_group) == ["0", "1", "2", "3"]
    assert all(len(texts) == 16 for texts in by_group.values())  # balanced
    prefixes = {g: {" ".join(t.split(" ")[:100]) for t in texts} for g, texts in by_group.items()}
    assert all(len(p) == 1 for p in prefixes.values())  # one exact prefix per group
    assert len({next(iter(p)) for p in prefixes.values()}) == 4  # and different across groups
    assert len({_text(r) for r in reqs}) == 64
    assert [r.prefix for r in reqs[:8]] != ["0", "1", "2", "3"] * 2  # groups interleaved at random


def _sharegpt(tmp_path, doc) -> str:
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(doc))
    return f"sharegpt:{path}"


def test_sharegpt_reads_both_key_styles_skips_unusable_and_cycles(tmp_path):
    doc = [
        {"conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "x" * 41}]},
        {"conversations": [{"role": "user", "content": "second question"}, {"role": "assistant", "content": "abcd"}]},
        {"conversations": [{"from": "human", "value": "no answer"}]},  # skipped
        {"conversations": [{"from": "gpt", "value": "answer first"}, {"from": "human", "value": "then q"}]},
        {"other": 1},
    ]
    reqs = build_requests(_sharegpt(tmp_path, doc), 5, 0)
    asked = {_text(r): r.max_tokens for r in reqs}
    assert asked == {"hello there": 11, "second question": 1}  # ceil(41 / 4), ceil(4 / 4)
    assert [r.index for r in reqs] == [0, 1, 2, 3, 4]
    assert reqs == build_requests(_sharegpt(tmp_path, doc), 5, 0)


@pytest.mark.parametrize(
    ("content", "match"),
    [("", "not JSON"), ("{not json", "not JSON"), ('{"a": 1}', "list"), ('[{"conversations": []}, 3]', "none of 2")],
)
def test_sharegpt_garbage_or_empty_is_a_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=match):
        build_requests(f"sharegpt:{path}", 4, 0)


def test_trace_builds_prompts_arrivals_and_shared_prefixes(tmp_path):
    path = tmp_path / "t.jsonl"
    write_trace(
        path,
        [
            TraceEntry(0.0, 30, 5),
            TraceEntry(0.5, 40, 6, prefix="doc", cls="high"),
            TraceEntry(0.7, 50, 7, prefix="doc"),
            TraceEntry(1.5, 8, 9, cls="low"),
        ],
    )
    reqs = build_requests(f"trace:{path}", None, 0, prefix_len=20)
    assert [(r.arrival_s, r.max_tokens, r.cls, r.prefix) for r in reqs] == [
        (0.0, 5, "standard", None),
        (0.5, 6, "high", "doc"),
        (0.7, 7, "standard", "doc"),
        (1.5, 9, "low", None),
    ]
    assert [len(_text(r).split(" ")) for r in reqs] == [30, 40, 50, 8]
    assert _text(reqs[1]).split(" ")[:20] == _text(reqs[2]).split(" ")[:20]
    assert _text(reqs[1]).split(" ")[20:] != _text(reqs[2]).split(" ")[20:30]
    assert len(build_requests(f"trace:{path}", 2, 0)) == 2


def test_trace_file_errors_become_dataset_errors(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"t_s": 0, "input_tok": 4}\n')
    with pytest.raises(DatasetError, match="missing 'output_tok'"):
        build_requests(f"trace:{path}", None, 0)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("nope", "unknown kind"),
        ("sharegpt", "name the file"),
        ("trace:/does/not/exist.jsonl", "not a readable file"),
        ("random:x", "takes no file"),
    ],
)
def test_bad_dataset_specs_say_why(spec, match):
    with pytest.raises(DatasetError, match=match):
        parse_dataset(spec)


def test_parse_dataset_and_request_count():
    assert parse_dataset("random") == DatasetSpec("random")
    with pytest.raises(DatasetError, match=">= 1"):
        build_requests("random", 0, 0)
