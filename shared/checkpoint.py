"""Checkpoints: the model, the config that rebuilds it, the data's normalisation and class names, metrics.

One format for centralized and federated runs, so that export and the edge tooling accept either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from noprop.io import atomic_write
from noprop.methods import METHODS, build_model, config_from_dict
from noprop.model_configs import CNNConfig, ContinuousConfig, NoPropConfig

FORMAT = "noprop-fl/checkpoint"
FORMAT_VERSION = 1

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint", "load_train_state", "save_checkpoint",
           "save_train_state"]


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and what to do."""


@dataclass
class Checkpoint:
    method: str  # a key of noprop.methods.METHODS; selects the config class and the model class
    config: NoPropConfig | ContinuousConfig | CNNConfig  # CTConfig / FMConfig / AdjointConfig for ct / fm / adjoint
    state_dict: dict[str, torch.Tensor]
    data: dict = field(default_factory=dict)  # name, classes, mean, std, input_shape
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # e.g. round, ownership history

    def model(self, device: str | torch.device = "cpu"):
        model = build_model(self.method, self.config)
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()


def previous_path(path: str | os.PathLike) -> Path:
    """Where save_checkpoint(keep_previous=True) keeps the one before: checkpoint.pt -> checkpoint.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _rotate(path: Path) -> None:
    """Make the current checkpoint the previous one, atomically (a hard link renamed over the old previous),
    so that at every instant both names hold a whole checkpoint. A current file that fails its checks is not
    kept: it would push out a good previous one."""
    if not path.is_file():
        return
    try:
        load_checkpoint(path)
    except CheckpointError:
        return
    prev = previous_path(path)
    link = path.with_name(f".{prev.name}.{os.getpid()}.link")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:  # no hard links here (some network file systems): copy
        atomic_write(link, lambda f: f.write(path.read_bytes()))
    os.replace(link, prev)


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint, keep_previous: bool = False) -> Path:
    """Atomic write, with a SHA-256 of the payload so that a torn or altered file is detected on load.
    keep_previous: the checkpoint being replaced (if it is sound) becomes previous_path(path) first."""
    payload = {
        "method": ckpt.method,
        "config": ckpt.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        "data": ckpt.data,
        "metrics": ckpt.metrics,
        "extra": ckpt.extra,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    envelope = {"format": FORMAT, "version": FORMAT_VERSION, "sha256": hashlib.sha256(body).hexdigest(),
                "payload": body}
    out = io.BytesIO()
    torch.save(envelope, out)
    if keep_previous:
        _rotate(Path(path))
    return atomic_write(path, lambda f: f.write(out.getvalue()))


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: pass the .pt file a training run wrote")
    try:
        envelope = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several kinds for torn or foreign files
        raise CheckpointError(f"{path} is not a readable noprop-fl checkpoint ({type(exc).__name__}): "
                              "re-run training or use an earlier checkpoint") from None
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a noprop-fl checkpoint: pass a file written by noprop-train "
                              "or noprop-server")
    if envelope.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {envelope.get('version')}, this noprop-fl reads "
                              f"{FORMAT_VERSION}: use a matching noprop-fl")
    body = envelope.get("payload")
    if not isinstance(body, bytes) or hashlib.sha256(body).hexdigest() != envelope.get("sha256"):
        raise CheckpointError(f"{path} fails its checksum (corrupt or altered): use an earlier checkpoint")
    payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    if payload["method"] not in METHODS:
        raise CheckpointError(f"{path} holds a {payload['method']!r} model, which this noprop-fl does not know "
                              f"(it knows {', '.join(METHODS)}): use a matching noprop-fl")
    return Checkpoint(method=payload["method"], config=config_from_dict(payload["method"], payload["config"]),
                      state_dict=payload["state_dict"], data=payload["data"], metrics=payload["metrics"],
                      extra=payload["extra"])


def train_state_path(path: str | os.PathLike) -> Path:
    """Where noprop-train keeps what --resume needs beyond the model: checkpoint.pt -> checkpoint.train-state.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.train-state{path.suffix}")


def save_train_state(path: str | os.PathLike, epoch: int, optimizers: list[torch.optim.Optimizer]) -> Path:
    """The optimizers' state and torch's RNG after `epoch`, written atomically beside the checkpoint at path (not
    inside it: Adam's moments would triple the file every export reads), so a resumed run goes on as if unstopped."""
    buf = io.BytesIO()
    torch.save({"epoch": epoch, "optimizers": [o.state_dict() for o in optimizers], "rng": torch.get_rng_state()},
               buf)
    return atomic_write(train_state_path(path), lambda f: f.write(buf.getvalue()))


def load_train_state(path: str | os.PathLike, epoch: int) -> dict | None:
    """The train state saved with the checkpoint of `epoch`; None if missing, unreadable or of another epoch (a
    crash between the two writes)."""
    try:
        state = torch.load(train_state_path(path), map_location="cpu", weights_only=True)
    except Exception:  # missing, torn or foreign: the optimizers restart
        return None
    return state if isinstance(state, dict) and state.get("epoch") == epoch else None


def resume_mismatch(ckpt: Checkpoint, method: str, config) -> str | None:
    """Why a run of `method` that builds the model `config` cannot continue from ckpt, with the fix; None if it
    can. One rule for noprop-server's check before any process starts and for the ServerApp's resume: the data's
    input shape and classes first (the likelier slip), then the method and the model's settings."""
    saved = (list(ckpt.config.input_shape), ckpt.config.num_classes)
    wanted = (list(config.input_shape), config.num_classes)
    if saved != wanted:
        return (f"was trained on input {saved[0]} with {saved[1]} classes, this run's data has {wanted[0]} with "
                f"{wanted[1]}: resume on the original data, or use a new --out")
    saved_config = ckpt.config
    if getattr(config, "readout", None) is not None and getattr(saved_config, "readout", None) is not None:
        # the readout is inference only: the same weights fit either, and the run's readout goes on
        saved_config = dataclasses.replace(saved_config, readout=config.readout)
    if ckpt.method != method or saved_config != config:
        return (f"holds a {ckpt.method} model of other settings than this run's: give the original settings, or use "
                "a new --out")
    return None


def load_latest_checkpoint(path: str | os.PathLike) -> tuple[Checkpoint, Path, str | None]:
    """The checkpoint at path or, if that one is missing, torn or corrupt, the previous one. Returns it, the file
    it came from and, when the previous one was used, a message saying why. Both unusable: CheckpointError
    naming both problems."""
    path = Path(path)
    try:
        return load_checkpoint(path), path, None
    except CheckpointError as exc:
        latest_problem = _problem(exc)
    prev = previous_path(path)
    try:
        ckpt = load_checkpoint(prev)
    except CheckpointError as exc:
        raise CheckpointError(f"no usable checkpoint: {latest_problem}; {_problem(exc)}: start again without "
                              "resuming, or with another output folder") from None
    return ckpt, prev, f"{latest_problem}; using the previous checkpoint {prev}"


def _problem(exc: CheckpointError) -> str:
    """The what of a CheckpointError message, without its advice (the text after the last ': ')."""
    text = str(exc)
    return text.rsplit(": ", 1)[0] if ": " in text else text
