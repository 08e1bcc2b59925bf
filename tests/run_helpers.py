"""Small helpers shared by the federation tests."""

from __future__ import annotations

from noprop.diagnostics import chain_diagnostics


def chain_numbers(model, data, mode: str = "deterministic", seed: int = 0) -> tuple[float, float]:
    """(head accuracy, nearest-embedding accuracy) of the chain on data, as the server records them each round."""
    found = chain_diagnostics(model, data, mode, seed=seed)
    return found["accuracy"], found["nearest_accuracy"]
