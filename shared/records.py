"""Model state <-> Flower records, in one place for the server and the client."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def to_numpy_state(state_dict: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in state_dict.items()}


def to_torch_state(state: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}


def arrays_to_record(state: Mapping[str, np.ndarray], keys: list[str] | None = None) -> ArrayRecord:
    """An ArrayRecord with the given keys of state (all keys when None), in that order."""
    record = ArrayRecord()
    for k in state if keys is None else keys:
        # np.asarray keeps 0-d arrays (BatchNorm's num_batches_tracked) 0-d; ascontiguousarray would not
        record[k] = Array.from_numpy_ndarray(np.asarray(state[k], order="C"))
    return record


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def state_digest(state: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of a model state (names, dtypes, shapes and bytes, in name order): equal digests mean the same
    weights bit for bit. Each round's metrics line records the digest of the model it trained from, so a resume
    that does not continue from the checkpoint shows."""
    h = hashlib.sha256()
    for key in sorted(state):
        value = np.ascontiguousarray(state[key])
        h.update(f"{key}:{value.dtype.str}:{value.shape};".encode())
        h.update(value.tobytes())
    return h.hexdigest()
