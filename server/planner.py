"""Who trains which block this round: a pure function of (capacities, T, round, seed, policy).

Two steps. First, quotas: how many blocks each node holds, in proportion to how fast it gets through its
own data (throughput / examples, so nodes finish their round at about the same time), never more than it
can hold, and at least one per node whenever there are enough block slots. Second, owner sets: the quotas
are laid out once into T owner sets (one per block slot, largest remaining quota first, so the replicate
policy never puts a node twice on one block), and round r shifts the slots by r. Over T rounds every block
therefore passes through every slot, and so through every node's data, which is what non-IID data needs.

Label-aware ownership: where nodes report the classes they hold, a block's owners are picked to hold as many
classes together as they can, and the owner sets are ordered so that a block goes next round to owners whose
classes differ from its last ones (lay_out_owner_sets).

Nodes are ordered by their identity (`NodeCapacity.name`: the partition or key name a node reports), never by
Flower's node id, which simulation and a restarted SuperLink draw at random: the same nodes and seed give the
same plan in every run. Measured throughputs within THROUGHPUT_TOLERANCE of each other count as equal, so
that timing noise between like machines does not move a block from one run to the next.

Nodes that together hold fewer than T blocks are an error, unless the caller asks for a partial plan
(partial=True, mid-run, after nodes left): then the plan covers as many blocks as the nodes can hold, a
window that moves on by that many blocks each round so that none starves, and names the rest in uncovered;
those keep their weights that round, like a dead node's blocks.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from noprop.federation import POLICIES


class PlanError(Exception):
    """The nodes cannot hold every block (or, for a partial plan, any); the message says how many they can."""


@dataclass(frozen=True)
class NodeCapacity:
    """What a node reported in discovery. node_id addresses the node; name orders it and seeds it."""

    node_id: int
    max_blocks: int
    throughput: float  # samples per second through one block (training)
    num_examples: int
    device: str = "cpu"
    memory_mb: float = 0.0
    name: str = ""  # the node's stable identity ("" in tests that need none: the node id stands in)
    classes: frozenset[int] = frozenset()  # the classes the node holds (label-aware ownership); empty: unknown

    @property
    def identity(self) -> str:
        return self.name or f"node-{self.node_id}"

    @property
    def speed(self) -> float:
        """Blocks per second this node can train over its own data: the weight of its share."""
        return self.throughput / max(self.num_examples, 1)


THROUGHPUT_TOLERANCE = 1.5  # throughputs within this factor of a faster one count as that one's


def settled_throughputs(capacities: list[NodeCapacity]) -> dict[int, float]:
    """Each node's throughput with measurement noise settled: going from the fastest down, a node within
    THROUGHPUT_TOLERANCE of its group's fastest joins that group and counts at its speed. Like machines then
    weigh the same whatever their timings, while a node 1.5x slower or more still gets less work."""
    settled: dict[int, float] = {}
    group_top = None
    for c in sorted(capacities, key=lambda c: (-c.throughput, c.identity, c.node_id)):
        if group_top is None or group_top > THROUGHPUT_TOLERANCE * c.throughput:
            group_top = c.throughput
        settled[c.node_id] = group_top
    return settled


@dataclass(frozen=True)
class OwnershipPlan:
    round: int
    policy: str
    owners: dict[int, tuple[int, ...]]  # block t -> node ids (a partial plan: the covered blocks only)
    assignments: dict[int, tuple[int, ...]] = field(default_factory=dict)  # node id -> blocks
    uncovered: tuple[int, ...] = ()  # blocks nobody trains this round (partial plans only)

    def blocks_of(self, node_id: int) -> tuple[int, ...]:
        return self.assignments.get(node_id, ())

    def to_json(self) -> dict:
        out = {"round": self.round, "policy": self.policy,
               "owners": {str(t): list(n) for t, n in sorted(self.owners.items())}}
        if self.uncovered:
            out["uncovered"] = list(self.uncovered)
        return out


def apportion(weights: dict[int, float], total: int, caps: dict[int, int], floor: int,
              rank: dict[int, int] | None = None) -> dict[int, int]:
    """Integer shares of total proportional to weights, each in [floor, cap] (highest deficit first; ties go to
    the lower rank, by default the lower node id)."""
    rank = rank or {n: n for n in weights}
    quota = {n: min(floor, caps[n]) for n in weights}
    weight_sum = sum(weights.values()) or 1.0
    ideal = {n: total * w / weight_sum for n, w in weights.items()}
    for _ in range(total - sum(quota.values())):
        open_nodes = [n for n in weights if quota[n] < caps[n]]
        if not open_nodes:
            break
        best = max(open_nodes, key=lambda n: (ideal[n] - quota[n], weights[n], -rank[n]))
        quota[best] += 1
    return quota


def lay_out_owner_sets(quota: dict[int, int], rank: dict[int, int], n_blocks: int, per_block: int,
                       classes: dict[int, frozenset[int]]) -> list[tuple[int, ...]]:
    """The quotas laid out into n_blocks owner sets of per_block distinct nodes each.

    Without labels: largest remaining quota first. With the classes each node reported (label-aware ownership):
    a set's owners are chosen to cover as many classes together as they can, and the sets are ordered so that
    each one's classes differ most from the set before it, since rotation hands a block from one set to the next
    round by round. A node whose remaining quota equals the sets still to fill is always picked, which keeps
    every node on distinct sets."""
    left = dict(quota)
    aware = any(classes.get(n) for n in quota)
    sets: list[tuple[int, ...]] = []
    for i in range(n_blocks):
        remaining = n_blocks - i
        open_nodes = sorted((n for n in quota if left[n] > 0), key=lambda n: (-left[n], rank[n]))
        picks = [n for n in open_nodes if left[n] >= remaining][:per_block]
        covered: set[int] = set().union(*(classes.get(n, frozenset()) for n in picks))
        while len(picks) < per_block:
            candidates = [n for n in open_nodes if n not in picks]
            if not candidates:
                break
            if aware:
                best = max(candidates, key=lambda n: (len(classes.get(n, frozenset()) - covered), left[n], -rank[n]))
            else:
                best = candidates[0]
            picks.append(best)
            covered |= classes.get(best, frozenset())
        for n in picks:
            left[n] -= 1
        sets.append(tuple(sorted(picks, key=rank.get)))
    if not aware or len(sets) < 3:
        return sets
    # a chain through the sets in which each differs most from the one before (fewest shared classes)
    def held(owner_set: tuple[int, ...]) -> set[int]:
        return set().union(*(classes.get(n, frozenset()) for n in owner_set))

    chain, rest = [sets[0]], sets[1:]
    while rest:
        last = held(chain[-1])
        nxt = min(range(len(rest)), key=lambda j: (len(held(rest[j]) & last), j))
        chain.append(rest.pop(nxt))
    # the chain is a cycle (the last set hands its blocks to the first): 2-opt moves until no reversal helps
    shared = [[len(held(a) & held(b)) for b in chain] for a in chain]
    order, n = list(range(len(chain))), len(chain)
    improved = True
    while improved:
        improved = False
        for i in range(n - 1):
            for j in range(i + 2, n if i else n - 1):
                a, b, c, d = order[i], order[i + 1], order[j], order[(j + 1) % n]
                if shared[a][c] + shared[b][d] < shared[a][b] + shared[c][d]:
                    order[i + 1:j + 1] = reversed(order[i + 1:j + 1])
                    improved = True
    return [chain[k] for k in order]


def covered_window(T: int, capacity: int, round: int) -> list[int]:
    """The capacity blocks a partial plan trains in this round: consecutive (cyclically from 1..T), starting
    where the previous round's window ended, so any ceil(T / capacity) consecutive rounds train every block."""
    start = (round * capacity) % T
    return sorted((start + i) % T + 1 for i in range(capacity))


def plan_ownership(capacities: list[NodeCapacity], T: int, round: int, seed: int = 0, policy: str = "rotate",
                   replicas: int = 2, partial: bool = False, by_speed: bool = True) -> OwnershipPlan:
    """Every block owned by at least one node; no node above its capacity; work in proportion to speed.

    Nodes that cannot hold T blocks raise PlanError, or with partial=True get the blocks they can hold
    (covered_window), the rest in the plan's uncovered; PlanError still if they can hold none. by_speed=False
    weighs the nodes by their data alone, as if every node trained equally fast.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}: use one of {', '.join(POLICIES)}")
    if not capacities:
        raise PlanError("no nodes to plan for: start at least one noprop-client")
    nodes = {c.node_id: c for c in capacities}
    caps = {n: max(0, min(c.max_blocks, T)) for n, c in nodes.items()}
    total_cap = sum(caps.values())
    blocks = list(range(1, T + 1))
    if total_cap < T:
        if not partial or total_cap == 0:
            raise PlanError(f"the {len(nodes)} node(s) can hold {total_cap} block(s) but T={T}: add nodes, raise "
                            "--max-blocks, or lower T")
        blocks = covered_window(T, total_cap, round)
    n_blocks = len(blocks)
    usable = [n for n in nodes if caps[n] > 0]
    if policy == "replicate":
        per_block = max(1, min(replicas, len(usable)))
    else:
        # more nodes than blocks: give blocks several owners so that every node's data is used
        per_block = max(1, math.ceil(len(usable) / n_blocks))
    while per_block > 1 and total_cap < per_block * n_blocks:
        per_block -= 1
    slots = per_block * n_blocks
    # a seeded order of the nodes' identities breaks ties the same way every round and in every run
    order = sorted(usable, key=lambda n: (nodes[n].identity, n))
    random.Random(seed).shuffle(order)
    rank = {n: i for i, n in enumerate(order)}
    throughput = settled_throughputs([nodes[n] for n in usable]) if by_speed else dict.fromkeys(usable, 1.0)
    weights = {n: max(throughput[n] / max(nodes[n].num_examples, 1), 1e-12) for n in usable}
    quota = apportion(weights, slots, caps, floor=1 if slots >= len(usable) else 0, rank=rank)
    classes = {n: nodes[n].classes for n in usable}
    owner_sets = lay_out_owner_sets(quota, rank, n_blocks, per_block, classes)
    shift = 0 if policy == "stay" else round % n_blocks
    owners = {t: owner_sets[(i + shift) % n_blocks] for i, t in enumerate(blocks)}
    assignments: dict[int, list[int]] = {}
    for t, ns in owners.items():
        for n in ns:
            assignments.setdefault(n, []).append(t)
    return OwnershipPlan(round=round, policy=policy, owners=owners,
                         assignments={n: tuple(sorted(b)) for n, b in assignments.items()},
                         uncovered=tuple(t for t in range(1, T + 1) if t not in owners))
