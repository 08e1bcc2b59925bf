"""Aggregation: weighted means checked by hand, and malformed replies rejected without touching the model."""

import numpy as np
import pytest

from noprop.server.aggregate import Reply, aggregate, keys_for_blocks, validate_reply, weighted_mean
from noprop.server.planner import OwnershipPlan


def state():
    return {
        "embedding.weight": np.zeros((2, 2), np.float32),
        "head.linear.weight": np.zeros((2, 2), np.float32),
        "blocks.1.w": np.zeros(3, np.float32),
        "blocks.2.w": np.zeros(3, np.float32),
        "blocks.2.bn.num_batches_tracked": np.array(0, np.int64),
    }


PLAN = OwnershipPlan(round=0, policy="replicate", owners={1: (7,), 2: (7, 8)},
                     assignments={7: (1, 2), 8: (2,)})


def reply(node, blocks, value, n):
    keys = keys_for_blocks(state(), blocks)
    arrays = {k: np.full_like(state()[k], value) for k in keys}
    return Reply(node_id=node, arrays=arrays, num_examples=n)


def test_keys_for_blocks_sends_only_owned_blocks_and_shared():
    assert keys_for_blocks(state(), [2]) == ["embedding.weight", "head.linear.weight", "blocks.2.w",
                                             "blocks.2.bn.num_batches_tracked"]


def test_weighted_means_by_hand():
    a, b = reply(7, (1, 2), 1.0, 100), reply(8, (2,), 4.0, 300)
    new = aggregate(state(), PLAN, [a, b])
    # block 1: only node 7 owned it
    assert np.allclose(new["blocks.1.w"], 1.0)
    # block 2: (100 * 1 + 300 * 4) / 400 = 3.25
    assert np.allclose(new["blocks.2.w"], 3.25)
    # shared: over every reply
    assert np.allclose(new["embedding.weight"], 3.25) and np.allclose(new["head.linear.weight"], 3.25)
    assert new["blocks.2.bn.num_batches_tracked"].dtype == np.int64
    assert int(new["blocks.2.bn.num_batches_tracked"]) == 3  # rint(3.25)
    assert new["blocks.1.w"].dtype == np.float32


def test_weighted_mean_of_unequal_arrays():
    out = weighted_mean([np.array([0.0, 2.0]), np.array([4.0, 6.0])], [3, 1])
    assert np.allclose(out, [1.0, 3.0])


def test_block_nobody_trained_keeps_its_weights():
    s = state()
    s["blocks.1.w"] = np.full(3, 9.0, np.float32)
    new = aggregate(s, PLAN, [reply(8, (2,), 1.0, 10)])
    assert np.array_equal(new["blocks.1.w"], s["blocks.1.w"])


@pytest.mark.parametrize("mutate, reason", [
    (lambda r: r.arrays.__setitem__("blocks.2.w", np.full(3, np.nan, np.float32)), "non-finite"),
    (lambda r: r.arrays.__setitem__("blocks.2.w", np.zeros(4, np.float32)), "expected float32[3]"),
    (lambda r: r.arrays.__setitem__("blocks.2.w", np.zeros(3, np.float64)), "expected float32[3]"),
    (lambda r: r.arrays.__setitem__("blocks.1.w", np.zeros(3, np.float32)), "not given: 1"),
    (lambda r: r.arrays.pop("head.linear.weight"), "keys differ"),
    (lambda r: setattr(r, "num_examples", 0), "num-examples"),
    (lambda r: setattr(r, "num_examples", 10**9), "exceeds"),
])
def test_malformed_replies_are_rejected(mutate, reason):
    r = reply(8, (2,), 1.0, 10)
    mutate(r)
    sent = keys_for_blocks(state(), (2,))
    problem = validate_reply(r, sent, state(), max_examples=1000)
    assert problem is not None and reason in problem
    assert validate_reply(reply(8, (2,), 1.0, 10), sent, state(), max_examples=1000) is None


# -- poisoned replies and robust aggregation (issue 6, item 5) --------------------------------------------------


def test_stale_or_unstamped_round_is_rejected():
    sent = keys_for_blocks(state(), (2,))
    r = reply(8, (2,), 1.0, 10)
    r.round = 3
    assert validate_reply(r, sent, state(), expected_round=3) is None
    r.round = 2
    assert "answers round 2, not the current round 3" in validate_reply(r, sent, state(), expected_round=3)
    r.round = None  # a client that does not stamp its reply
    assert "answers round None" in validate_reply(r, sent, state(), expected_round=3)


def test_blocks_not_given_are_named():
    r = reply(8, (1, 2), 1.0, 10)  # trained block 1 too, which node 8 was not sent
    problem = validate_reply(r, keys_for_blocks(state(), (2,)), state())
    assert problem == "holds block(s) it was not given: 1"


@pytest.mark.parametrize("value, ok", [(1.0, True), (49.0, True), (51.0, False), (-1e4, False)])
def test_values_far_out_of_range_are_rejected(value, ok):
    # the global tensors are 0, so the bound is 50 x max(0, 1) = 50
    sent = keys_for_blocks(state(), (2,))
    r = reply(8, (2,), 0.0, 10)
    r.arrays["head.linear.weight"] = np.full((2, 2), value, np.float32)
    problem = validate_reply(r, sent, state(), max_value_ratio=50.0)
    assert (problem is None) == ok, problem
    if not ok:
        assert problem.startswith("head.linear.weight: values up to") and "bound 50" in problem


def test_value_bound_scales_with_the_global_tensor():
    s = state()
    s["blocks.2.w"] = np.array([0.0, -20.0, 3.0], np.float32)
    sent = keys_for_blocks(s, (2,))
    r = reply(8, (2,), 0.0, 10)
    r.arrays["blocks.2.w"] = np.array([0.0, -900.0, 0.0], np.float32)  # 45 x 20: inside 50 x 20
    assert validate_reply(r, sent, s, max_value_ratio=50.0) is None
    r.arrays["blocks.2.w"] = np.array([0.0, 1100.0, 0.0], np.float32)  # 55 x 20
    assert "blocks.2.w: values up to 1.1e+03" in validate_reply(r, sent, s, max_value_ratio=50.0)


def test_boolean_example_count_is_not_an_integer():
    r = reply(8, (2,), 1.0, 10)
    r.num_examples = True
    assert "num-examples True" in validate_reply(r, keys_for_blocks(state(), (2,)), state())


PLAN5 = OwnershipPlan(round=0, policy="rotate", owners={1: (1, 2, 3, 4), 2: (5,)},
                      assignments={1: (1,), 2: (1,), 3: (1,), 4: (1,), 5: (2,)})


def five_replies(outlier: float) -> list[Reply]:
    """Five nodes whose shared tensors are 1.0, 1.1, 0.9, 1.05 and one outlier; block 1 held by four of them."""
    values = [1.0, 1.1, 0.9, 1.05, outlier]
    return [reply(n, (1,) if n < 5 else (2,), v, 100) for n, v in zip(range(1, 6), values)]


@pytest.mark.parametrize("method", ["median", "trimmed-mean"])
def test_one_outlier_moves_the_mean_but_not_the_robust_shared_tensors(method):
    calm, poisoned = five_replies(1.0), five_replies(40.0)
    mean_calm = aggregate(state(), PLAN5, calm)["head.linear.weight"]
    mean_poisoned = aggregate(state(), PLAN5, poisoned)["head.linear.weight"]
    assert np.allclose(mean_poisoned, (1.0 + 1.1 + 0.9 + 1.05 + 40.0) / 5, atol=1e-5)  # the mean follows the outlier
    assert float(mean_poisoned.max() - mean_calm.max()) > 7.0
    robust_calm = aggregate(state(), PLAN5, calm, method, trim_fraction=0.2)["head.linear.weight"]
    robust_poisoned = aggregate(state(), PLAN5, poisoned, method, trim_fraction=0.2)["head.linear.weight"]
    expected = 1.05 if method == "median" else (1.0 + 1.05 + 1.1) / 3  # trimmed: 0.9 and the outlier cut
    assert np.allclose(robust_poisoned, expected, atol=1e-6)
    assert np.allclose(robust_poisoned, robust_calm, atol=0.06)  # moved by less than the honest spread (0.2)
    assert robust_poisoned.dtype == np.float32


def test_robust_option_leaves_blocks_to_their_owners_mean():
    new = aggregate(state(), PLAN5, five_replies(40.0), "median")
    # block 1: weighted mean of its four owners (equal counts); block 2: only node 5 (the outlier) owned it
    assert np.allclose(new["blocks.1.w"], (1.0 + 1.1 + 0.9 + 1.05) / 4)
    assert np.allclose(new["blocks.2.w"], 40.0)
    assert new["blocks.2.bn.num_batches_tracked"].dtype == np.int64


def test_unknown_aggregation_is_refused():
    with pytest.raises(ValueError, match="unknown aggregation 'max'"):
        aggregate(state(), PLAN5, five_replies(1.0), "max")
