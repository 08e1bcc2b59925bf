"""Training curves as PNG (matplotlib, headless), written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from noprop.io import atomic_write  # noqa: E402


def save_figure(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def plot_training_curves(records: list[dict], path: str | Path, title: str = "") -> Path:
    """Left: test accuracy per epoch (each inference mode). Right: each block's training loss parts."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [r["epoch"] for r in records]
    for key, label in (("test_acc_deterministic", "deterministic"), ("test_acc_stochastic", "stochastic")):
        if any(key in r for r in records):
            ax_acc.plot(epochs, [100 * r.get(key, float("nan")) for r in records], marker="o", label=label)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend()
    blocks = sorted({int(t) for r in records for t in r.get("block_l2", {})})
    for t in blocks:
        ax_loss.plot(epochs, [r["block_l2"].get(str(t), float("nan")) for r in records], label=f"block {t}")
    if blocks:
        ax_loss.set_ylabel("denoising error ||u_hat - u||^2")
        ax_loss.set_yscale("log")
        ax_loss.legend(fontsize=7, ncol=2)
    elif any("train_loss" in r for r in records):
        ax_loss.plot(epochs, [r.get("train_loss", float("nan")) for r in records], label="train loss")
        ax_loss.set_ylabel("cross-entropy")
        ax_loss.legend()
    ax_loss.set_xlabel("epoch")
    ax_loss.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
