"""Checking and combining the nodes' replies.

A block is averaged over the nodes that owned it this round; the shared embedding and head over every
reply, by example-weighted mean or, as an option against a poisoned node, by Flower's coordinate-wise median
or trimmed mean. A reply counts only if it answers this round, holds exactly the keys the node was sent
(its own blocks and the shared tensors), claims no more examples than the node holds, and has the right
shapes and dtypes and finite values within a bound of the global model's: anything else is rejected whole,
so a bad node can never half-update the model.

check_replies is the one reply check of every strategy (block ownership and the FedAvg family): it reads each
reply against what its node was sent, validates it, and says which nodes answered, failed or were rejected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg

from noprop.federation import AGGREGATIONS
from noprop.records import record_to_arrays
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
    round: int | None = None  # the round the node says it answers (the client stamps it)


def value_bound(reference: np.ndarray, max_value_ratio: float) -> float:
    """Largest magnitude a reply may hold in a tensor: the ratio times the global tensor's largest magnitude,
    which counts as at least 1 so that tensors that start at zero (biases, BatchNorm means) may grow."""
    ref_max = float(np.abs(reference).max()) if reference.size else 0.0
    return max_value_ratio * max(ref_max, 1.0)


def validate_reply(reply: Reply, sent_keys: list[str], reference: dict[str, np.ndarray],
                   max_examples: int | None = None, expected_round: int | None = None,
                   max_value_ratio: float | None = None) -> str | None:
    """None if the reply may count, else the reason it may not."""
    if expected_round is not None and reply.round != expected_round:
        return f"answers round {reply.round}, not the current round {expected_round} (stale or replayed)"
    got, want = set(reply.arrays), set(sent_keys)
    if got != want:
        extra, missing = sorted(got - want), sorted(want - got)
        sent_blocks = {block_of_key(k) for k in want}
        foreign = sorted({b for k in extra if (b := block_of_key(k)) is not None and b not in sent_blocks})
        if foreign:
            return f"holds block(s) it was not given: {', '.join(str(b) for b in foreign)}"
        return f"keys differ from what was sent (extra {extra[:3]}, missing {missing[:3]})"
    if not isinstance(reply.num_examples, int) or isinstance(reply.num_examples, bool) or reply.num_examples < 1:
        return f"num-examples {reply.num_examples!r} is not a positive integer"
    if max_examples is not None and reply.num_examples > max_examples:
        return f"num-examples {reply.num_examples} exceeds the {max_examples} the node reported"
    for key in sent_keys:
        arr, ref = reply.arrays[key], reference[key]
        if arr.shape != ref.shape or arr.dtype != ref.dtype:
            return f"{key}: got {arr.dtype}{list(arr.shape)}, expected {ref.dtype}{list(ref.shape)}"
        if not np.issubdtype(arr.dtype, np.floating) or not arr.size:
            continue
        if not np.isfinite(arr).all():
            return f"{key}: non-finite values"
        if max_value_ratio is not None:
            biggest, bound = float(np.abs(arr).max()), value_bound(ref, max_value_ratio)
            if biggest > bound:
                return (f"{key}: values up to {biggest:.3g}, beyond the bound {bound:.3g} ({max_value_ratio:g} x the "
                        "global tensor's largest magnitude, at least 1)")
    return None


@dataclass(frozen=True)
class Expected:
    """What one node was sent this round, so what its reply must be: exactly these keys, these metrics as numbers,
    at most max_examples examples (what it reported at discovery; None: unknown)."""

    node: int
    keys: tuple[str, ...]
    metrics: tuple[str, ...] = ()
    max_examples: int | None = None


@dataclass
class CheckedRound:
    """The replies of one round after check_replies: those that may count (with the message each came in, in
    arrival order), and by node those rejected (with the reason) and those that failed or never answered."""

    accepted: list[tuple[Message, Reply]] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    failed: list[int] = field(default_factory=list)
    bytes_from: dict[int, int] = field(default_factory=dict)


def read_reply(msg: Message, expected: Expected, arrays_key: str = "arrays") -> tuple[Reply | None, str | None]:
    """A train reply's parts, or the reason it is malformed (a reply is the sender's word: never trust its layout).
    The round stamp counts only as an int (a float 3.0 is no round); validate_reply judges the rest."""
    try:
        record, metrics = msg.content[arrays_key], msg.content["metrics"]
        if not isinstance(record, ArrayRecord) or not isinstance(metrics, MetricRecord):
            raise TypeError(f"{arrays_key!r} and 'metrics' must be an ArrayRecord and a MetricRecord")
        arrays = record_to_arrays(record)
    except Exception as exc:  # noqa: BLE001 - missing or wrong records arrive in several exception types
        return None, f"malformed reply ({type(exc).__name__}: {exc})"
    metrics = dict(metrics)
    missing = [k for k in expected.metrics if not isinstance(metrics.get(k), int | float)]
    if missing:
        return None, f"malformed reply: metrics {', '.join(missing)} missing"
    stamp = metrics.get("round")
    reply = Reply(node_id=expected.node, arrays=arrays, num_examples=metrics.get("num-examples"),  # type: ignore[arg-type]
                  metrics=metrics, round=stamp if isinstance(stamp, int) else None)
    return reply, None


def check_replies(replies: Iterable[Message], sent: dict[str, Expected], reference: dict[str, np.ndarray],
                  expected_round: int, max_value_ratio: float | None = None, log: Callable[[str], None] = print,
                  arrays_key: str = "arrays", silence: str = "no reply within the round timeout") -> CheckedRound:
    """Check every reply against what its node was sent (`sent`: message id -> Expected). A reply is matched to its
    node by its sender, or, for an error the SuperLink made for an unreachable node, by the message it answers; a
    node with no reply at all has failed, and `silence` says so in the log."""
    by_node = {e.node: e for e in sent.values()}
    out = CheckedRound()
    answered: set[int] = set()
    for msg in replies:
        # a node's own reply comes from it; an error the SuperLink made for it, by the message it answers
        expected = by_node.get(msg.metadata.src_node_id) or sent.get(msg.metadata.reply_to_message_id)
        node = expected.node if expected else msg.metadata.src_node_id
        if expected is None or node in answered:
            log(f"node {node}: reply ignored: it answers no message of round {expected_round} (or a second time)")
            continue
        answered.add(node)
        if msg.has_error():
            out.failed.append(node)
            log(f"node {node}: training failed: {msg.error.reason}")
            continue
        reply, problem = read_reply(msg, expected, arrays_key)
        if reply is not None:
            problem = validate_reply(reply, list(expected.keys), reference, max_examples=expected.max_examples,
                                     expected_round=expected_round, max_value_ratio=max_value_ratio)
        if problem:
            out.rejected[node] = problem
            log(f"node {node}: reply rejected: {problem}")
            continue
        out.bytes_from[node] = msg.content[arrays_key].count_bytes()
        out.accepted.append((msg, reply))
    for node in sorted(by_node):
        if node not in answered:
            out.failed.append(node)
            log(f"node {node}: {silence}")
    return out


def weighted_mean(arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Weighted mean in float64, cast back to the input dtype (integers rounded)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    acc = sum(wi * a.astype(np.float64) for wi, a in zip(w, arrays))
    if np.issubdtype(arrays[0].dtype, np.integer):
        acc = np.rint(acc)
    return np.asarray(acc, dtype=arrays[0].dtype)


def pooled_variance(means: list[np.ndarray], variances: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """The variance of the owners' data pooled: E[var_k + mean_k^2] - (E[mean_k])^2 under the weights.

    BatchNorm's running_var is a per-owner variance about that owner's own mean; averaging it linearly
    leaves out the spread of the means, which is large when the owners' labels differ.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    m = [a.astype(np.float64) for a in means]
    pooled_mean = sum(wi * mi for wi, mi in zip(w, m))
    second = sum(wi * (v.astype(np.float64) + mi**2) for wi, v, mi in zip(w, variances, m))
    return np.asarray(np.maximum(second - pooled_mean**2, 0.0), dtype=variances[0].dtype)


def robust_combine(arrays: list[np.ndarray], method: str, trim_fraction: float) -> np.ndarray:
    """Coordinate-wise median or trimmed mean (Flower's own functions; example counts play no part, so a node
    cannot buy weight by claiming more data), cast back to the input dtype (integers rounded)."""
    results = [([a], 1) for a in arrays]
    if method == "median":
        out = aggregate_median(results)[0]
    else:
        out = aggregate_trimmed_avg(results, trim_fraction)[0]
    if np.issubdtype(arrays[0].dtype, np.integer):
        out = np.rint(out)
    return np.asarray(out, dtype=arrays[0].dtype)


def aggregate(state: dict[str, np.ndarray], plan: OwnershipPlan, replies: list[Reply], method: str = "mean",
              trim_fraction: float = 0.2, block_step: dict[int, float] | None = None) -> dict[str, np.ndarray]:
    """New global state from validated replies; blocks nobody trained keep their weights. ``method`` applies
    to the shared tensors (embedding and head), which every node trains; a block has its one or few owners
    and is always their weighted mean. block_step[t] < 1 moves block t only that share of the way from its
    weights to the owners' mean (integer buffers take the owners' value)."""
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}: use one of {', '.join(AGGREGATIONS)}")
    new = dict(state)
    if not replies:
        return new
    for key in state:
        block = block_of_key(key)
        if block is None:
            contributing = replies
        else:
            contributing = [r for r in replies if r.node_id in plan.owners.get(block, ()) and key in r.arrays]
        if not contributing:
            continue
        arrays = [r.arrays[key] for r in contributing]
        weights = [r.num_examples for r in contributing]
        mean_key = key.removesuffix("running_var") + "running_mean"
        if block is None and method != "mean":
            new[key] = robust_combine(arrays, method, trim_fraction)
        elif key.endswith("running_var") and all(mean_key in r.arrays for r in contributing):
            new[key] = pooled_variance([r.arrays[mean_key] for r in contributing], arrays, weights)
        else:
            new[key] = weighted_mean(arrays, weights)
        step = (block_step or {}).get(block, 1.0) if block is not None else 1.0
        if step < 1.0 and np.issubdtype(state[key].dtype, np.floating):
            old = state[key].astype(np.float64)
            new[key] = np.asarray(old + step * (new[key].astype(np.float64) - old), dtype=state[key].dtype)
    return new
