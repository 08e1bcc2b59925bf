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
