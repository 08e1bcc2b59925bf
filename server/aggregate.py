"""Checking and combining the nodes' replies.

A block is averaged over the nodes that owned it this round; the shared embedding and head over every
reply; weights are example counts. A reply counts only if it holds exactly the keys the node was sent,
with the right shapes and dtypes and finite values: anything else is rejected whole, so a bad node can
never half-update the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from noprop.server.planner import OwnershipPlan


def block_of_key(key: str) -> int | None:
    """'blocks.3.fuse.0.weight' -> 3; shared keys -> None."""
    if key.startswith("blocks."):
        return int(key.split(".")[1])
    return None


def keys_for_blocks(state: dict[str, np.ndarray], blocks: tuple[int, ...] | list[int]) -> list[str]:
    """The keys a node owning these blocks is sent: its blocks' tensors plus every shared tensor."""
    owned = set(blocks)
    return [k for k in state if (b := block_of_key(k)) is None or b in owned]


@dataclass
class Reply:
    node_id: int
    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict = field(default_factory=dict)


def validate_reply(reply: Reply, sent_keys: list[str], reference: dict[str, np.ndarray],
                   max_examples: int | None = None) -> str | None:
    """None if the reply may count, else the reason it may not."""
    got, want = set(reply.arrays), set(sent_keys)
    if got != want:
        extra, missing = sorted(got - want), sorted(want - got)
        return f"keys differ from what was sent (extra {extra[:3]}, missing {missing[:3]})"
    if not isinstance(reply.num_examples, int) or reply.num_examples < 1:
        return f"num-examples {reply.num_examples!r} is not a positive integer"
    if max_examples is not None and reply.num_examples > max_examples:
        return f"num-examples {reply.num_examples} exceeds the {max_examples} the node reported"
    for key in sent_keys:
        arr, ref = reply.arrays[key], reference[key]
        if arr.shape != ref.shape or arr.dtype != ref.dtype:
            return f"{key}: got {arr.dtype}{list(arr.shape)}, expected {ref.dtype}{list(ref.shape)}"
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            return f"{key}: non-finite values"
    return None


def weighted_mean(arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Weighted mean in float64, cast back to the input dtype (integers rounded)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    acc = sum(wi * a.astype(np.float64) for wi, a in zip(w, arrays))
    if np.issubdtype(arrays[0].dtype, np.integer):
        acc = np.rint(acc)
    return np.asarray(acc, dtype=arrays[0].dtype)


def aggregate(state: dict[str, np.ndarray], plan: OwnershipPlan, replies: list[Reply]) -> dict[str, np.ndarray]:
    """New global state from validated replies; blocks nobody trained keep their weights."""
    new = dict(state)
    if not replies:
        return new
    for key in state:
        block = block_of_key(key)
        if block is None:
            contributing = replies
        else:
            contributing = [r for r in replies if r.node_id in plan.owners.get(block, ()) and key in r.arrays]
        if contributing:
            new[key] = weighted_mean([r.arrays[key] for r in contributing], [r.num_examples for r in contributing])
    return new
