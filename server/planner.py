"""Who trains which block this round: a pure function of (capacities, T, round, seed, policy).

Two steps. First, quotas: how many blocks each node holds, in proportion to how fast it gets through its
own data (throughput / examples, so nodes finish their round at about the same time), never more than it
can hold, and at least one per node whenever there are enough block slots. Second, owner sets: the quotas
are laid out once into T owner sets (one per block slot, largest remaining quota first, so the replicate
policy never puts a node twice on one block), and round r shifts the slots by r. Over T rounds every block
therefore passes through every slot, and so through every node's data, which is what non-IID data needs.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from noprop.federation import POLICIES


class PlanError(Exception):
    """The nodes cannot hold every block; the message says how many slots are missing."""


@dataclass(frozen=True)
class NodeCapacity:
    """What a node reported in discovery."""

    node_id: int
    max_blocks: int
    throughput: float  # samples per second through one block (training)
    num_examples: int
    device: str = "cpu"
    memory_mb: float = 0.0

    @property
    def speed(self) -> float:
        """Blocks per second this node can train over its own data: the weight of its share."""
        return self.throughput / max(self.num_examples, 1)


@dataclass(frozen=True)
class OwnershipPlan:
    round: int
    policy: str
    owners: dict[int, tuple[int, ...]]  # block t -> node ids
    assignments: dict[int, tuple[int, ...]] = field(default_factory=dict)  # node id -> blocks

    def blocks_of(self, node_id: int) -> tuple[int, ...]:
        return self.assignments.get(node_id, ())

    def to_json(self) -> dict:
        return {"round": self.round, "policy": self.policy,
                "owners": {str(t): list(n) for t, n in sorted(self.owners.items())}}


def apportion(weights: dict[int, float], total: int, caps: dict[int, int], floor: int) -> dict[int, int]:
    """Integer shares of total proportional to weights, each in [floor, cap] (highest deficit first)."""
    quota = {n: min(floor, caps[n]) for n in weights}
    weight_sum = sum(weights.values()) or 1.0
    ideal = {n: total * w / weight_sum for n, w in weights.items()}
    for _ in range(total - sum(quota.values())):
        open_nodes = [n for n in weights if quota[n] < caps[n]]
        if not open_nodes:
            break
        best = max(open_nodes, key=lambda n: (ideal[n] - quota[n], weights[n], -n))
        quota[best] += 1
    return quota


def plan_ownership(capacities: list[NodeCapacity], T: int, round: int, seed: int = 0, policy: str = "rotate",
                   replicas: int = 2) -> OwnershipPlan:
    """Every block owned by at least one node; no node above its capacity; work in proportion to speed."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}: use one of {', '.join(POLICIES)}")
    if not capacities:
        raise PlanError("no nodes to plan for: start at least one noprop-client")
    nodes = {c.node_id: c for c in capacities}
    caps = {n: max(0, min(c.max_blocks, T)) for n, c in nodes.items()}
    total_cap = sum(caps.values())
    if total_cap < T:
        raise PlanError(f"the {len(nodes)} node(s) can hold {total_cap} block(s) but T={T}: add nodes, raise "
                        "--max-blocks, or lower T")
    usable = [n for n in nodes if caps[n] > 0]
    if policy == "replicate":
        per_block = max(1, min(replicas, len(usable)))
    else:
        # more nodes than blocks: give blocks several owners so that every node's data is used
        per_block = max(1, math.ceil(len(usable) / T))
    while per_block > 1 and total_cap < per_block * T:
        per_block -= 1
    slots = per_block * T
    weights = {n: nodes[n].speed if nodes[n].speed > 0 else 1e-9 for n in usable}
    quota = apportion(weights, slots, caps, floor=1 if slots >= len(usable) else 0)

    # a seeded order of nodes breaks ties the same way every round
    order = sorted(usable)
    random.Random(seed).shuffle(order)
    rank = {n: i for i, n in enumerate(order)}
    left = dict(quota)
    owner_sets: list[tuple[int, ...]] = []
    for _ in range(T):
        picks = sorted((n for n in usable if left[n] > 0), key=lambda n: (-left[n], rank[n]))[:per_block]
        for n in picks:
            left[n] -= 1
        owner_sets.append(tuple(sorted(picks, key=rank.get)))
    shift = round % T
    owners = {t: owner_sets[(t - 1 + shift) % T] for t in range(1, T + 1)}
    assignments: dict[int, list[int]] = {}
    for t, ns in owners.items():
        for n in ns:
            assignments.setdefault(n, []).append(t)
    return OwnershipPlan(round=round, policy=policy, owners=owners,
                         assignments={n: tuple(sorted(b)) for n, b in assignments.items()})
