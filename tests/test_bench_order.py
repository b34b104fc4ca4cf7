"""The interleaved benchmarks' round order (bench/order.py): the same on every rank, a permutation, and no strategy
stuck behind the same predecessor (a fixed rotation kept it, and read one strategy's leftovers as another's cost)."""

from __future__ import annotations

from edgeprism.bench.order import round_order

STRATEGIES = ["local", "transformers", "full_exchange", "segment_means:sm4", "segment_means:sm16", "pipeline",
              "tensor_parallel", "adaptive"]


def test_every_round_serves_every_strategy_once_in_an_order_every_rank_computes_alike():
    for round_ in range(-1, 5):
        order = round_order(STRATEGIES, round_)
        assert sorted(order) == sorted(STRATEGIES)
        assert order == round_order(list(STRATEGIES), round_)  # the other ranks and reruns get the same
    assert STRATEGIES == sorted(STRATEGIES, key=STRATEGIES.index)  # the caller's list is left alone


def test_predecessors_change_between_rounds():
    def predecessors(name, rounds):
        found = set()
        for round_ in rounds:
            order = round_order(STRATEGIES, round_)
            i = order.index(name)
            found.add(order[i - 1] if i else None)
        return found

    assert all(len(predecessors(name, range(5))) >= 3 for name in STRATEGIES)
    rotated = {STRATEGIES[(STRATEGIES.index("adaptive") - 1)]}  # what a fixed rotation always gave it (or None first)
    assert predecessors("adaptive", range(5)) - rotated - {None}
