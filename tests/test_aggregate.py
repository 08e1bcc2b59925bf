"""Aggregation: weighted means checked by hand, and malformed replies rejected without touching the model."""

import numpy as np
import pytest

from noprop.model import NoPropDT
from noprop.model_configs import NoPropConfig
from noprop.records import to_numpy_state
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
# skewed honest values and unequal counts, so that median, trimmed mean, mean and weighted mean all differ; the
# outlier claims most of the data, which would buy it the weighted median
HONEST, COUNTS5 = (1.0, 1.05, 0.9, 1.3), (100, 200, 300, 400, 2000)


def five_replies(outlier: float) -> list[Reply]:
    """Five nodes whose shared tensors are HONEST and one outlier; block 1 held by the first four."""
    return [reply(n, (1,) if n < 5 else (2,), v, count)
            for n, v, count in zip(range(1, 6), (*HONEST, outlier), COUNTS5)]


def robust_rules(values: np.ndarray) -> dict[str, float]:
    """What each combiner makes of the five values: median, trimmed mean (0.2 of 5 cuts one at each end), and
    the two it must not be (the example-weighted mean and median)."""
    order = np.argsort(values)
    cumulative = np.cumsum(np.asarray(COUNTS5)[order])
    weighted_median = values[order][np.searchsorted(cumulative, cumulative[-1] / 2)]
    return {"median": float(np.median(values)), "trimmed-mean": float(np.sort(values)[1:-1].mean()),
            "weighted mean": float(np.average(values, weights=COUNTS5)), "weighted median": float(weighted_median)}


@pytest.mark.parametrize("method", ["median", "trimmed-mean"])
def test_one_outlier_moves_the_mean_but_not_the_robust_shared_tensors(method):
    calm, poisoned = five_replies(1.0), five_replies(40.0)
    mean_calm = aggregate(state(), PLAN5, calm)["head.linear.weight"]
    mean_poisoned = aggregate(state(), PLAN5, poisoned)["head.linear.weight"]
    rules = robust_rules(np.array([*HONEST, 40.0]))
    assert np.allclose(mean_poisoned, rules["weighted mean"], atol=1e-5)  # the mean follows the outlier
    assert float(mean_poisoned.max() - mean_calm.max()) > 7.0
    robust_calm = aggregate(state(), PLAN5, calm, method, trim_fraction=0.2)["head.linear.weight"]
    robust_poisoned = aggregate(state(), PLAN5, poisoned, method, trim_fraction=0.2)["head.linear.weight"]
    np.testing.assert_allclose(robust_poisoned, rules[method], rtol=0, atol=1e-6)
    for name, value in rules.items():  # the replies tell the rules apart, so a wrong rule cannot pass
        if name != method:
            assert abs(value - rules[method]) > 0.05, (name, value)
    np.testing.assert_allclose(robust_calm, robust_rules(np.array([*HONEST, 1.0]))[method], rtol=0, atol=1e-6)
    assert np.abs(robust_poisoned - robust_calm).max() < 0.2  # moved by less than half the honest spread (0.4)
    assert robust_poisoned.dtype == np.float32


def test_robust_option_leaves_blocks_to_their_owners_mean():
    new = aggregate(state(), PLAN5, five_replies(40.0), "median")
    # block 1: example-weighted mean of its four owners (not their median 1.025, nor their plain mean 1.0625)
    assert np.allclose(new["blocks.1.w"], np.average(HONEST, weights=COUNTS5[:4]), rtol=0, atol=1e-6)
    assert np.allclose(new["blocks.1.w"], 1.1)
    assert np.allclose(new["blocks.2.w"], 40.0)  # only node 5 (the outlier) owned block 2
    assert new["blocks.2.bn.num_batches_tracked"].dtype == np.int64


# -- BatchNorm buffers of a real NoProp-DT (issue 14, item 11a) -----------------------------------------------


BN_MODEL = NoPropConfig(input_shape=(1, 12, 12), num_classes=4, T=2, channels=(8, 16, 16), hidden=32, dropout=0.0)
BN_PLAN = OwnershipPlan(round=0, policy="replicate", owners={1: (1, 2, 3), 2: (1,)},
                        assignments={1: (1, 2), 2: (1,), 3: (1,)})
BN_COUNTS = {1: 100, 2: 300, 3: 50}
BN_TRACKED = {1: 10, 2: 20, 3: 9}  # weighted mean 16.56: rounding gives 17, truncation 16


def bn_replies(real_state: dict[str, np.ndarray]) -> list[Reply]:
    """Three owners of block 1 with their own running statistics (node 1 also owns block 2) and their own heads."""
    rng = np.random.default_rng(0)
    replies = []
    for node, blocks in BN_PLAN.assignments.items():
        arrays = {k: real_state[k].copy() for k in keys_for_blocks(real_state, blocks)}
        for key, value in arrays.items():
            if key.endswith("running_mean"):
                arrays[key] = (2.0 * node + 0.1 * rng.normal(size=value.shape)).astype(np.float32)
            elif key.endswith("running_var"):
                arrays[key] = rng.uniform(0.5, 2.0 * node, size=value.shape).astype(np.float32)
            elif key.endswith("num_batches_tracked"):
                arrays[key] = np.array(BN_TRACKED[node], np.int64)
            elif key.startswith("head."):
                arrays[key] = value + np.float32(0.1 * node**2)
        replies.append(Reply(node_id=node, arrays=arrays, num_examples=BN_COUNTS[node]))
    return replies


@pytest.mark.parametrize("method", ["mean", "median"])
def test_batchnorm_buffers_are_pooled_over_the_blocks_owners(method):
    """A block's BatchNorm buffers follow its owners' example counts under every method (the robust option is for
    the shared tensors): running_mean their weighted mean, running_var the variance of their data pooled, and
    num_batches_tracked the rounded weighted mean, still int64."""
    real_state = to_numpy_state(NoPropDT(BN_MODEL).state_dict())
    replies = bn_replies(real_state)
    new = aggregate(real_state, BN_PLAN, replies, method)
    weights = np.array([r.num_examples for r in replies], np.float64)
    layers = [k.removesuffix(".running_mean") for k in real_state
              if k.startswith("blocks.1.") and k.endswith("running_mean")]
    assert len(layers) == 6, layers  # x path, z path (three) and fuse (two)
    for layer in layers:
        means = np.stack([r.arrays[f"{layer}.running_mean"] for r in replies]).astype(np.float64)
        variances = np.stack([r.arrays[f"{layer}.running_var"] for r in replies]).astype(np.float64)
        pooled_mean = np.average(means, axis=0, weights=weights)
        pooled_var = np.average(variances + means**2, axis=0, weights=weights) - pooled_mean**2
        np.testing.assert_allclose(new[f"{layer}.running_mean"], pooled_mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(new[f"{layer}.running_var"], pooled_var, rtol=1e-5, atol=1e-6)
        # the spread of the owners' means counts: a plain average of the variances would be well below
        assert (pooled_var - np.average(variances, axis=0, weights=weights)).min() > 0.5
        tracked = new[f"{layer}.num_batches_tracked"]
        assert tracked.dtype == np.int64 and tracked.shape == () and int(tracked) == 17
        assert new[f"{layer}.running_mean"].dtype == new[f"{layer}.running_var"].dtype == np.float32
    only_owner = replies[0]  # block 2: node 1's buffers as they came
    for key in (k for k in real_state if k.startswith("blocks.2.")):
        assert np.array_equal(new[key], only_owner.arrays[key]) and new[key].dtype == real_state[key].dtype, key
    heads = np.stack([r.arrays["head.linear.weight"] for r in replies]).astype(np.float64)
    shared = np.average(heads, axis=0, weights=weights) if method == "mean" else np.median(heads, axis=0)
    np.testing.assert_allclose(new["head.linear.weight"], shared, rtol=0, atol=1e-6)


def test_unknown_aggregation_is_refused():
    with pytest.raises(ValueError, match="unknown aggregation 'max'"):
        aggregate(state(), PLAN5, five_replies(1.0), "max")


def test_a_block_step_moves_a_block_only_that_share_of_the_way():
    s = state()
    s["blocks.2.w"] = np.full(3, 2.0, np.float32)
    a, b = reply(7, (1, 2), 1.0, 100), reply(8, (2,), 4.0, 300)
    new = aggregate(s, PLAN, [a, b], block_step={2: 0.2})
    assert np.allclose(new["blocks.2.w"], 2.0 + 0.2 * (3.25 - 2.0))  # by hand: a fifth of the way to the mean
    assert np.allclose(new["blocks.1.w"], 1.0)  # no step given: the owners' mean
    assert np.allclose(new["embedding.weight"], 3.25)  # shared tensors: never stepped
    assert int(new["blocks.2.bn.num_batches_tracked"]) == 3 and new["blocks.2.w"].dtype == np.float32
