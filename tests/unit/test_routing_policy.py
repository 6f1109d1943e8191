"""The routing policy (factory/policy/routing.py) and the routing-stats contract
(factory/routing/stats.py): exact rankings for constructed situations."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Gauge

from factory.policy.routing import (
    Balance,
    Picks,
    PrefixIndex,
    ReplicaView,
    prefix_hashes,
    rank,
    render_messages,
    render_prompt,
)
from factory.routing.stats import QUEUE_GAUGES, queue_lengths, replica_view, routing_stats

SYSTEM = "You are the support assistant of a power utility. " * 12  # ~600 characters: 4 whole blocks


def chat(system: str, question: str) -> str:
    return render_messages([{"role": "system", "content": system}, {"role": "user", "content": question}])


def view(id: str, load: int = 0, **kw) -> ReplicaView:
    return ReplicaView(id=id, load=load, **kw)


# --- prompt text and prefix hashes ---


def test_chats_sharing_a_system_prompt_share_its_blocks_and_no_more():
    a = prefix_hashes(chat(SYSTEM, "How do I read my meter?"))
    b = prefix_hashes(chat(SYSTEM, "Why is my bill so high this month?"))
    shared = len(f"<|system|>{SYSTEM}\n") // 128
    assert shared == 4
    assert a[:shared] == b[:shared]
    assert len(a) == len(b) == shared + 1 and a[shared] != b[shared]  # the block holding the questions differs
    assert prefix_hashes(chat(SYSTEM.upper(), "How do I read my meter?"))[0] != a[0]


def test_hashes_are_cumulative_and_cover_whole_blocks_only():
    block = "x" * 128
    assert prefix_hashes(block * 2 + "tail") == prefix_hashes(block * 2)
    h = prefix_hashes(block * 3)
    assert len(h) == 3 and len(set(h)) == 3  # the same block at another depth is another prefix
    assert prefix_hashes("y" * 127) == []
    assert len(prefix_hashes(block * 10, max_blocks=4)) == 4
    assert prefix_hashes("ab" * 8, block_chars=4) == prefix_hashes("ab" * 8 + "a", block_chars=4)


def test_rendering_keeps_roles_and_text_parts_of_objects_or_dicts():
    class Msg:
        def __init__(self, role, content):
            self.role, self.content = role, content

    parts = [{"type": "text", "text": "look "}, {"type": "image_url", "image_url": {"url": "x"}}, {"text": "here"}]
    assert render_messages([Msg("user", parts)]) == "<|user|>look here\n"
    assert render_messages([{"role": "user", "content": "hi"}]) != render_messages(
        [{"role": "system", "content": "hi"}]
    )
    assert render_prompt("plain") == "plain"
    assert render_prompt([["first"], "second"]) == "first"
    assert render_prompt([1, 22, 3]) == "1,22,3,"
    assert render_prompt([[1, 2], [3]]) == "1,2,"
    assert render_prompt(None) == render_prompt([]) == ""


# --- the prefix index ---


def test_index_reports_each_replicas_leading_match():
    index = PrefixIndex()
    index.record([1, 2, 3], "a", now_s=0)
    index.record([1, 9], "b", now_s=0)
    assert index.matches([1, 2, 3, 4], ["a", "b", "c"], now_s=1) == {"a": 3, "b": 1, "c": 0}
    assert index.matches([1, 5, 3], ["a"], now_s=1) == {"a": 1}  # the match ends at the first block not held


def test_index_evicts_least_recently_sent_blocks_tail_first():
    index = PrefixIndex(blocks_per_replica=4)
    index.record([1, 2, 3], "a", now_s=0)
    index.record([7, 8], "a", now_s=1)  # one block over the share: the oldest tail (3) goes
    assert index.matches([1, 2, 3], ["a"], now_s=2) == {"a": 2}
    assert index.matches([7, 8], ["a"], now_s=2) == {"a": 2}
    index.record([1, 2], "a", now_s=3)  # sending a prefix again refreshes it
    index.record([5, 6], "a", now_s=4)
    assert index.matches([1, 2], ["a"], now_s=5) == {"a": 2}
    assert index.matches([7, 8], ["a"], now_s=5) == {"a": 0}
    assert len(index) == 4


def test_index_forgets_blocks_older_than_ttl_and_departed_replicas():
    index = PrefixIndex(ttl_s=10)
    index.record([1, 2], "a", now_s=0)
    index.record([1, 2], "b", now_s=5)
    assert index.matches([1, 2], ["a", "b"], now_s=10) == {"a": 2, "b": 2}
    assert index.matches([1, 2], ["a", "b"], now_s=10.5) == {"a": 0, "b": 2}
    index.forget(["a"])
    assert index.matches([1, 2], ["a", "b"], now_s=11) == {"a": 0, "b": 0}
    with pytest.raises(ValueError):
        PrefixIndex(ttl_s=0)


# --- ranking ---


def test_a_replica_whose_engine_died_comes_last_and_alone_is_still_named():
    # Its prefix and its idleness count for nothing: it would answer 503 until Serve replaces it.
    views = [view("a", 0, engine_down=True), view("b", 5), view("c", 3, throttle_level=1)]
    assert rank(views, {"a": 9}) == ["b", "c", "a"]
    assert rank([view("a", engine_down=True)], {}) == ["a"]
    stats = routing_stats(model="m", running=0, waiting=0, max_num_seqs=8, control={}, engine_down=True)
    assert replica_view("a", stats, 0).engine_down
    assert not replica_view(
        "b", routing_stats(model="m", running=0, waiting=0, max_num_seqs=8, control={}), 0
    ).engine_down


def test_prefix_holder_wins_while_its_extra_load_is_within_the_margin():
    views = [view("a", 6, capacity=16), view("b", 2, capacity=16), view("c", 3, capacity=16)]
    assert rank(views, {"a": 3, "b": 0, "c": 1}) == ["a", "b", "c"]  # 6 - 2 <= max(4, 25% of 16)


def test_deepest_match_wins_and_ties_go_to_the_less_loaded_then_the_lower_id():
    views = [view("a", 3), view("b", 2), view("c", 2)]
    assert rank(views, {"a": 5, "b": 5, "c": 5}) == ["b", "c", "a"]
    assert rank(views, {"a": 5, "b": 4, "c": 4}) == ["a", "b", "c"]


def test_hot_prefix_spills_to_the_least_loaded_when_the_holder_is_too_far_ahead():
    views = [view("a", 7, capacity=16), view("b", 2, capacity=16)]
    assert rank(views, {"a": 4}) == ["b", "a"]  # 7 - 2 > 4
    big = [view("a", 12, capacity=64), view("b", 2, capacity=64)]
    assert rank(big, {"a": 4}) == ["a", "b"]  # the margin grows with capacity: 12 - 2 <= 16
    assert rank(big, {"a": 4}, Balance(min_requests=4, fraction=0.1)) == ["b", "a"]


def test_full_holder_spills_to_a_replica_with_room():
    views = [view("a", 4, capacity=4), view("b", 1, capacity=4)]
    assert rank(views, {"a": 2}) == ["b", "a"]
    assert rank([view("a", 4, capacity=4), view("b", 4, capacity=4)], {"a": 2}) == ["a", "b"]


def test_new_prefix_fills_the_busiest_replica_below_its_efficient_batch():
    views = [view("a", 5, efficient_batch=8), view("b", 0, efficient_batch=8), view("c", 7, efficient_batch=8)]
    assert rank(views, {}) == ["c", "b", "a"]
    views = [view("a", 5, efficient_batch=8), view("b", 0, efficient_batch=8), view("c", 8, efficient_batch=8)]
    assert rank(views, {}) == ["a", "b", "c"]
    # A batch cap below the efficient batch is the fill target.
    assert rank([view("a", 4, capacity=4, efficient_batch=8), view("b", 1)], {}) == ["b", "a"]


def test_without_an_efficient_batch_new_prefixes_spread_to_the_least_loaded():
    assert rank([view("a", 5), view("b", 0), view("c", 0)], {}) == ["b", "c", "a"]
    assert rank([view("a", 9, efficient_batch=8), view("b", 3, efficient_batch=8)], {}) == ["b", "a"]


def test_throttled_replicas_go_last_even_holding_the_prefix():
    views = [view("a", 0, throttle_level=1), view("b", 9), view("c", 2, throttle_level=2), view("d", 3)]
    assert rank(views, {"a": 6, "c": 6}) == ["d", "b", "a", "c"]


def test_when_all_are_throttled_the_least_throttled_are_ranked_by_the_same_rules():
    views = [view("a", 0, throttle_level=2), view("b", 3, throttle_level=1), view("c", 1, throttle_level=1)]
    assert rank(views, {"b": 2}) == ["b", "c", "a"]
    assert rank(views, {}) == ["c", "b", "a"]
    assert rank([], {}) == []


def test_a_hot_prefix_never_piles_onto_one_replica_while_another_idles():
    """One prefix, requests arriving faster than any finishes: the holder takes them until it
    is `margin` ahead, then the idle replica; from there they alternate by load."""
    index, loads, sent = PrefixIndex(), {"a": 0, "b": 0}, []
    hashes = prefix_hashes(chat(SYSTEM, "same question"))
    for _ in range(12):
        views = [view(r, loads[r], capacity=8) for r in loads]
        choice = rank(views, index.matches(hashes, loads, now_s=0))[0]
        index.record(hashes, choice, now_s=0)
        loads[choice] += 1
        sent.append(choice)
    assert sent[:6] == ["a"] * 5 + ["b"]  # a is 5 ahead of b (> margin 4): b gets it and learns the prefix
    assert loads == {"a": 6, "b": 6}


def test_replica_view_validates():
    with pytest.raises(ValueError):
        ReplicaView(id="a", load=-1)
    with pytest.raises(ValueError):
        ReplicaView(id="a", load=0, capacity=0)


# --- requests sent to a replica it has not reported yet ---


def test_picks_count_what_a_replica_has_not_received_and_has_probably_not_finished():
    p = Picks()
    for t, replica in ((0.0, "a"), (0.1, "a"), (0.2, "a"), (0.2, "b")):
        p.sent(replica, t)
    assert (p.unseen("a", None, 0.3), p.unseen("b", None, 0.3), p.unseen("c", None, 0.3)) == (3, 1, 0)
    assert p.unseen("a", 2, 0.3) == 1  # it reported receiving two of them
    assert p.unseen("a", 5, 0.3) == 0  # requests from elsewhere (the fallback path) never make it negative
    # Its requests take 0.15 s: of the three it has not reported, those sent over 0.15 s ago are done.
    assert p.unseen("a", 0, 0.3, duration_s=0.15) == 1
    assert p.unseen("a", 0, 0.3, duration_s=0.25) == 2
    assert p.unseen("a", 0, 5.0, duration_s=0.15) == 0
    p.forget(["b"])
    assert (p.unseen("a", None, 0.3), p.unseen("b", 0, 0.3)) == (0, 1)
