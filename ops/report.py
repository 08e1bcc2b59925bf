"""A round's line for people: the ServerApp logs it and noprop-server prints it from metrics.jsonl, so both say the
same thing. Torch-free: the launcher imports it."""

from __future__ import annotations


def blocks_trained(record: dict) -> tuple[int, int] | None:
    """(blocks some trained owner replied for, T) of a block-ownership round; None for a FedAvg round."""
    plan = record.get("plan")
    if not isinstance(plan, dict):
        return None
    trained_by = set(record.get("trained_by") or [])
    trained = sum(1 for owners in plan.values() if trained_by.intersection(owners))
    return trained, len(plan) + len(record.get("uncovered") or [])


def round_line(record: dict, num_rounds: int) -> str:
    """One metrics.jsonl record as "round r/N, accuracy ..., ... s (slowest client's training ... s), k nodes, ..."
    with the parts the record has (FedAvg rounds have no blocks, older records no training times)."""
    parts = [f"round {record.get('round', '?')}/{num_rounds}"]
    acc = record.get("accuracy")
    if isinstance(acc, int | float):
        parts.append(f"accuracy {100 * acc:.2f}%")
        nearest, blocks = record.get("nearest_accuracy"), record.get("block_accuracy")
        chain, ensemble = record.get("chain_accuracy"), record.get("ensemble_accuracy")
        if isinstance(nearest, int | float) and isinstance(blocks, dict) and blocks:
            both = (f"chain {100 * chain:.1f}%, ensemble {100 * ensemble:.1f}%, "
                    if isinstance(chain, int | float) and isinstance(ensemble, int | float) else "")
            parts[-1] += (f" ({both}nearest embedding {100 * nearest:.1f}%, blocks {100 * min(blocks.values()):.0f}-"
                          f"{100 * max(blocks.values()):.0f}%)")
    if (counts := blocks_trained(record)) is not None:
        parts.append(f"blocks trained {counts[0]}/{counts[1]}")
    for key, name in (("mean_l2", "mean denoising loss"), ("train_loss", "mean train loss")):
        if isinstance(record.get(key), int | float):
            parts.append(f"{name} {record[key]:.4f}")
            break
    t = record.get("round_time_s")
    if isinstance(t, int | float):
        train = record.get("client_train_time_s")
        slowest = max(train.values()) if isinstance(train, dict) and train else None
        if isinstance(slowest, int | float):
            parts.append(f"{t:.1f} s (slowest client's training {slowest:.1f} s)")
        else:
            parts.append(f"{t:.1f} s")
    nodes = record.get("nodes")
    if nodes is None and isinstance(record.get("trained_by"), list):
        nodes = len(record["trained_by"])
    if isinstance(nodes, list):
        nodes = len(nodes)
    if nodes is not None:
        parts.append(f"{nodes} nodes")
    failed = record.get("failed")
    if failed:
        parts.append(f"no reply from node(s) {', '.join(str(n) for n in failed)}")
    rejected = record.get("rejected")
    if isinstance(rejected, dict):
        parts += [f"reply of node {node} rejected: {why}" for node, why in rejected.items()]
    return ", ".join(parts)
