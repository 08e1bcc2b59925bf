"""The anytime exit's calibration, at export time: the threshold with the fewest blocks per example whose accuracy
stays within a budget of the full chain's (noprop-export --blocks writes it into the bundle's manifest).

Apart from deploy/edge.py, the runtime, which only applies the rule (ExitRule) that this chooses.
"""

from __future__ import annotations

import numpy as np

from noprop.deploy.edge import EXIT_RULES, ExitRule, exit_scores

DEFAULT_MAX_LOSS_POINTS = 0.5  # the anytime calibration's accuracy loss against the full chain, in points


def exit_simulation(per_block: np.ndarray, final: np.ndarray, rule: ExitRule) -> tuple[np.ndarray, np.ndarray]:
    """(labels, blocks used) of `rule` from every block's probabilities [T, N, K] and the head's [N, K]: what
    BlockBundle.run(..., rule) returns, computed from one pass over all blocks."""
    T, n = per_block.shape[:2]
    labels, used = final.argmax(axis=1), np.full(n, T)
    open_rows = np.ones(n, dtype=bool)
    for t in range(1, T):
        leave = open_rows & rule.exits(per_block[t - 1], t)
        labels[leave] = per_block[t - 1][leave].argmax(axis=1)
        used[leave] = t
        open_rows &= ~leave
    return labels, used


def in_gaps(scores: np.ndarray, candidates: int) -> np.ndarray:
    """Thresholds at `candidates` quantiles of `scores`, each halfway (in float32) between its score and the next
    lower one: the same rows pass as at the score itself, with room for a float's wobble either way. The lowest
    score's threshold sits halfway to 0."""
    values = np.unique(scores.astype(np.float32))
    picked = np.unique(np.quantile(scores.astype(np.float32), np.linspace(0, 1, candidates), method="nearest"))
    below = np.concatenate([[0.0], values])[np.searchsorted(values, picked)]
    return ((picked.astype(np.float64) + below) / 2).astype(np.float32)


def calibrate_exit(per_block: np.ndarray, final: np.ndarray, labels: np.ndarray,
                   max_loss_points: float = DEFAULT_MAX_LOSS_POINTS, candidates: int = 400) -> dict:
    """The exit threshold with the fewest blocks per example whose accuracy on (per_block, final, labels) is at
    most max_loss_points below the full chain's, for each rule in EXIT_RULES; the cheaper rule is the default.

    Candidates are quantiles of the scores of blocks 1..T-1, each moved down to halfway to the next lower score
    (so a row whose score is the candidate still leaves when another batch size or CPU computes it an ulp lower),
    and "never" (2.0: the full chain). Ties go to the higher threshold."""
    labels = np.asarray(labels)
    n, T = len(labels), per_block.shape[0]
    full_correct = int((final.argmax(axis=1) == labels).sum())
    allowed = max_loss_points * n / 100 + 1e-9  # correct answers the exit may lose
    result: dict = {"max_loss_points": float(max_loss_points), "examples": int(n), "T": int(T),
                    "full_accuracy": full_correct / n,
                    "block_accuracy": [float((p.argmax(axis=1) == labels).mean()) for p in per_block]}
    best = {}
    for rule in EXIT_RULES:
        scores = np.stack([exit_scores(p, rule) for p in per_block[:-1]]) if T > 1 else np.ones((0, n), np.float32)
        grid = in_gaps(scores, candidates) if T > 1 else []
        chosen = (2.0, float(T), full_correct)
        for tau in (float(v) for v in grid):
            pred, used = exit_simulation(per_block, final, ExitRule(rule, tau))
            correct, cost = int((pred == labels).sum()), float(used.mean())
            if full_correct - correct <= allowed and (cost, -tau) < (chosen[1], -chosen[0]):
                chosen = (tau, cost, correct)
        tau, cost, correct = chosen
        used = exit_simulation(per_block, final, ExitRule(rule, tau))[1]
        best[rule] = {"threshold": tau, "mean_blocks": cost, "accuracy": correct / n,
                      "loss_points": 100 * (full_correct - correct) / n,
                      "exits_per_block": np.bincount(used, minlength=T + 1)[1:].tolist()}
    rule = min(EXIT_RULES, key=lambda r: (best[r]["mean_blocks"], r != "confidence"))
    result.update(rule=rule, threshold=best[rule]["threshold"], mean_blocks=best[rule]["mean_blocks"],
                  accuracy=best[rule]["accuracy"], rules=best)
    return result
