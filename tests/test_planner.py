"""The ownership planner: coverage, capacity, proportional work, rotation, determinism, edge cases."""

import pytest

from noprop.server.planner import NodeCapacity, PlanError, plan_ownership


def caps(*specs, examples=1000):
    """specs: (max_blocks, throughput) per node; node ids 101, 102, ..."""
    return [NodeCapacity(node_id=101 + i, max_blocks=m, throughput=tp, num_examples=examples)
            for i, (m, tp) in enumerate(specs)]


def check_plan(plan, capacities, T):
    assert set(plan.owners) == set(range(1, T + 1))
    assert all(len(o) >= 1 and len(set(o)) == len(o) for o in plan.owners.values())
    limit = {c.node_id: c.max_blocks for c in capacities}
    for node, blocks in plan.assignments.items():
        assert len(blocks) <= limit[node]
        assert all(node in plan.owners[t] for t in blocks)


@pytest.mark.parametrize("policy", ["rotate", "replicate"])
@pytest.mark.parametrize("specs", [
    [(10, 100)], [(10, 100), (10, 100), (10, 100), (10, 100)], [(3, 100), (3, 100), (4, 50)],
    [(1, 10)] * 10, [(2, 10)] * 25, [(10, 500), (2, 10), (10, 100)],
])
def test_every_block_owned_every_round_and_capacity_respected(policy, specs):
    capacities = caps(*specs)
    for r in range(12):
        check_plan(plan_ownership(capacities, 10, r, seed=3, policy=policy), capacities, 10)


def test_work_follows_throughput():
    plan = plan_ownership(caps((10, 300), (10, 100)), T=8, round=0)
    assert len(plan.blocks_of(101)) == 6 and len(plan.blocks_of(102)) == 2
    # the same throughput on four times the data is a quarter of the speed
    slow_big = [NodeCapacity(1, 10, 100.0, 4000), NodeCapacity(2, 10, 100.0, 1000)]
    plan = plan_ownership(slow_big, T=10, round=0)
    assert len(plan.blocks_of(1)) == 2 and len(plan.blocks_of(2)) == 8


@pytest.mark.parametrize("specs", [[(10, 100)] * 4, [(10, 300), (10, 100), (10, 50)], [(1, 1)] * 10])
def test_rotation_brings_every_block_to_every_node_within_T_rounds(specs):
    capacities = caps(*specs)
    T = 10
    seen = {t: set() for t in range(1, T + 1)}
    for r in range(T):
        plan = plan_ownership(capacities, T, r, seed=1)
        for t, owners in plan.owners.items():
            seen[t].update(owners)
    assert all(s == {c.node_id for c in capacities} for s in seen.values())


def test_rotation_moves_blocks_between_rounds_with_equal_nodes():
    capacities = caps(*[(10, 100)] * 5)
    a, b = plan_ownership(capacities, 10, 0), plan_ownership(capacities, 10, 1)
    assert all(a.owners[t] != b.owners[t] for t in range(1, 11))


def test_deterministic_for_a_seed():
    capacities = caps((4, 100), (4, 100), (4, 100))
    assert plan_ownership(capacities, 10, 2, seed=7) == plan_ownership(capacities, 10, 2, seed=7)
    plans = {tuple(plan_ownership(capacities, 10, 2, seed=s).owners.items()) for s in range(6)}
    assert len(plans) > 1, "the seed should matter for tie-breaking"


def test_one_node_owns_everything():
    plan = plan_ownership(caps((10, 50)), 10, 0)
    assert plan.blocks_of(101) == tuple(range(1, 11))


def test_more_nodes_than_blocks_uses_every_node():
    capacities = caps(*[(2, 100)] * 7)
    plan = plan_ownership(capacities, 3, 0)
    assert {n for o in plan.owners.values() for n in o} == {c.node_id for c in capacities}


def test_replicate_gives_several_distinct_owners():
    plan = plan_ownership(caps(*[(10, 100)] * 4), 10, 0, policy="replicate", replicas=3)
    assert all(len(o) == 3 for o in plan.owners.values())


def test_insufficient_capacity_and_bad_policy_are_errors():
    with pytest.raises(PlanError, match="hold 4 block"):
        plan_ownership(caps((2, 1), (2, 1)), 10, 0)
    with pytest.raises(PlanError):
        plan_ownership([], 10, 0)
    with pytest.raises(ValueError, match="unknown policy"):
        plan_ownership(caps((10, 1)), 10, 0, policy="random")


def test_node_leaving_is_planned_out_and_joining_planned_in():
    three = caps((10, 100), (10, 100), (10, 100))
    plan = plan_ownership(three[:2], 10, 4)
    assert set(plan.assignments) == {101, 102}
    plan = plan_ownership(three, 10, 5)
    assert set(plan.assignments) == {101, 102, 103}
