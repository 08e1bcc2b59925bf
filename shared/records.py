"""Model state <-> Flower records, in one place for the server and the client.

A message's tensors travel packed: `arrays_to_record` puts every tensor of a state into ONE Flower `Array`
(key `PACKED_KEY`, stype `PACKED_STYPE`) whose bytes are a small manifest (the names, dtypes and shapes, in
order) followed by the tensors' raw bytes. Flower 1.39 sends, hashes and stores every Array (and each of its
5 MB chunks) as an object of its own, one RPC and one database write each; one Array per tensor made a
NoProp-DT message 100-150 of them and cost seconds each way (BENCHMARKS.md, "Round overhead in the default
deployment"). `record_to_arrays` reads both layouts: a packed record, and Flower's own one Array per tensor
(`ArrayRecord(model.state_dict())`, Flower's aggregation results). A packed record is not something Flower's
strategies can average (they combine Arrays key by key): unpack it first (`arrays_to_record(..., packed=False)`,
as noprop.server.fedavg does before Flower's FedAvg sees the replies). Its stype is not numpy's, so a packed
record handed to Flower by mistake fails loudly instead of being averaged as bytes.

A reply's record is the sender's word: a malformed pack (wrong length, bad manifest, a dtype that is not a
plain number) raises `PackError`, a ValueError with the reason, and never anything else.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord

if TYPE_CHECKING:  # reading and writing records needs no torch (the relay ClientApp imports none)
    import torch

PACKED_KEY = "noprop.packed"  # the one key of a packed record
PACKED_STYPE = "noprop.packed.v1"  # the Array's serialisation type; Flower's own is "numpy.ndarray"
MAGIC = b"NPK1"
_HEAD = struct.Struct("<4sI")  # magic, manifest length in bytes
MAX_MANIFEST_BYTES = 16 * 2**20
DTYPE_KINDS = "biufc"  # bool, signed and unsigned integers, floats, complex: no objects, strings or records


class PackError(ValueError):
    """A packed record that cannot be read: the reason says what is wrong with it."""


def to_numpy_state(state_dict: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in state_dict.items()}


def to_torch_state(state: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    import torch

    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}


def arrays_to_record(state: Mapping[str, np.ndarray], keys: list[str] | None = None,
                     packed: bool = True) -> ArrayRecord:
    """An ArrayRecord with the given keys of state (all keys when None), in that order: packed into one Array
    (the default, what goes on the wire), or one Flower Array per tensor (packed=False: what Flower's strategies
    aggregate). `count_bytes()` measures the tensors' bytes either way (plus the manifest or numpy's headers)."""
    names = list(state if keys is None else keys)
    record = ArrayRecord()
    if not packed:
        for k in names:
            # np.asarray keeps 0-d arrays (BatchNorm's num_batches_tracked) 0-d; ascontiguousarray would not
            record[k] = Array.from_numpy_ndarray(np.asarray(state[k], order="C"))
        return record
    record[PACKED_KEY] = pack(state, names)
    return record


def pack(state: Mapping[str, np.ndarray], names: list[str]) -> Array:
    """One Array holding the named tensors: header, JSON manifest [[name, dtype, shape], ...], raw bytes."""
    values = [np.asarray(state[k], order="C") for k in names]
    for k, v in zip(names, values):
        if v.dtype.kind not in DTYPE_KINDS:
            raise TypeError(f"{k}: dtype {v.dtype} cannot be packed (numbers and booleans only)")
    manifest = json.dumps([[k, v.dtype.str, list(v.shape)] for k, v in zip(names, values)],
                          separators=(",", ":")).encode()
    parts = [_HEAD.pack(MAGIC, len(manifest)), manifest, *(v.tobytes() for v in values)]
    data = b"".join(parts)
    return Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)


def is_packed(record: ArrayRecord) -> bool:
    return PACKED_KEY in record


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """name -> np.ndarray (each its own writable copy) from a packed record or one with an Array per tensor.
    Raises PackError for a malformed pack."""
    if PACKED_KEY not in record:
        return {k: v.numpy() for k, v in record.items()}
    if len(record) != 1:
        others = sorted(k for k in record if k != PACKED_KEY)
        raise PackError(f"packed record also holds unpacked arrays ({', '.join(others[:3])})")
    return unpack(record[PACKED_KEY])


def unpack(array: Array) -> dict[str, np.ndarray]:
    if not isinstance(array, Array) or array.stype != PACKED_STYPE:
        raise PackError(f"packed array has serialisation type {getattr(array, 'stype', None)!r}, "
                        f"not {PACKED_STYPE!r}")
    data = array.data
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PackError(f"packed array holds {type(data).__name__}, not bytes")
    data = memoryview(data).cast("B")
    if len(data) < _HEAD.size:
        raise PackError(f"packed array of {len(data)} bytes is shorter than its {_HEAD.size}-byte header")
    magic, size = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise PackError(f"packed array starts with {bytes(magic)!r}, not {MAGIC!r}")
    if size > min(MAX_MANIFEST_BYTES, len(data) - _HEAD.size):
        raise PackError(f"manifest length {size} exceeds the {len(data) - _HEAD.size} bytes after the header")
    manifest = _read_manifest(bytes(data[_HEAD.size:_HEAD.size + size]))
    offset = _HEAD.size + size
    need = offset + sum(nbytes for _, _, _, nbytes in manifest)
    if need != len(data):
        raise PackError(f"packed array is {len(data)} bytes, its manifest describes {need}")
    out = {}
    for name, dtype, shape, nbytes in manifest:
        out[name] = np.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize if dtype.itemsize else 0,
                                  offset=offset).reshape(shape).copy()
        offset += nbytes
    return out


def _read_manifest(text: bytes) -> list[tuple[str, np.dtype, tuple[int, ...], int]]:
    try:
        entries = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackError(f"manifest is not JSON ({exc})") from None
    if not isinstance(entries, list):
        raise PackError(f"manifest is a {type(entries).__name__}, not a list of [name, dtype, shape]")
    out, seen = [], set()
    for i, entry in enumerate(entries):
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and isinstance(entry[1], str) and isinstance(entry[2], list)):
            raise PackError(f"manifest entry {i} is not [name, dtype, shape]: {str(entry)[:80]}")
        name, dtype_str, shape = entry
        if name in seen:
            raise PackError(f"manifest names {name!r} twice")
        seen.add(name)
        try:
            dtype = np.dtype(dtype_str)
        except (TypeError, ValueError):
            raise PackError(f"{name}: dtype {dtype_str[:40]!r} is not a numpy dtype") from None
        if dtype.kind not in DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise PackError(f"{name}: dtype {dtype_str[:40]!r} is not a plain number or boolean")
        if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**40 for n in shape) \
                or len(shape) > 32:
            raise PackError(f"{name}: shape {str(shape)[:60]} is not a list of at most 32 sizes >= 0")
        out.append((name, dtype, tuple(shape), math.prod(shape) * dtype.itemsize))
    return out


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
