"""The plain CNN a Flower user would federate with FedAvg instead of noprop-fl: the reference peer.

The network is the x path of one NoProp-DT block (conv-ReLU-pool-drop, conv-ReLU-drop, conv-ReLU-pool-drop,
flatten, FC, BatchNorm; the MLP path for feature vectors), then ReLU and a linear classifier, trained end
to end with cross entropy. With one block per client, a NoProp client trains and sends about what a FedAvg
client of this network does, so it is the baseline for federated accuracy, compute, bytes and memory
(DESIGN.md, "The peer a user compares against"). It has no class embedding, no noise and no chain: its
inference is one network call in either mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from noprop.model import ChainPredictor, conv_path, mlp_path
from noprop.model_configs import CNNConfig

MODES = ("deterministic", "stochastic")


def x_path(cfg: CNNConfig) -> nn.Sequential:
    """One NoProp-DT block's x path, ending in BatchNorm1d: the conv path for images, the MLP for features."""
    if cfg.is_image:
        c, h, w = cfg.input_shape
        return conv_path(c, h, w, cfg.channels, cfg.hidden, cfg.dropout, batch_norm=True)
    return mlp_path(cfg.input_shape[0], cfg.hidden, cfg.dropout, batch_norm=True)


class CNN(ChainPredictor, nn.Module):
    """State dict: features.* (the block's x path), classifier.1.* (the linear layer after the ReLU)."""

    def __init__(self, cfg: CNNConfig, embedding_init: torch.Tensor | None = None):
        super().__init__()
        if embedding_init is not None:
            raise ValueError("the cnn method has no class embedding to initialise: pass no embedding rows")
        self.cfg = cfg
        self.features = x_path(cfg)
        self.classifier = nn.Sequential(nn.ReLU(), nn.Linear(cfg.hidden, cfg.num_classes))

    @property
    def T(self) -> int:
        return self.cfg.T

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def loss(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Plain cross entropy; generator is accepted for the common interface and unused (no noise)."""
        return F.cross_entropy(self.logits(x), y)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Class probabilities; noise is accepted for the chain interface (export, evaluation) and ignored."""
        return F.softmax(self.logits(x), dim=1)

    def predict_proba(self, x: torch.Tensor, mode: str = "deterministic",
                      generator: torch.Generator | None = None, steps: int | None = None) -> torch.Tensor:
        """Eval-mode probabilities. Nothing is random at inference, so both modes give the same answer and
        draw nothing (a stochastic chain would draw noise for a class embedding this model lacks)."""
        if mode not in MODES:
            raise ValueError(f"mode must be deterministic or stochastic, got {mode!r}")
        return super().predict_proba(x, "deterministic", None, steps)
