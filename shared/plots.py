"""Training curves as PNG (matplotlib, headless), written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import matplotlib.ticker

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
    ax_acc.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
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


def plot_federated_run(records: list[dict], accuracy_path: str | Path, ownership_path: str | Path | None) -> None:
    """Accuracy and mean loss per round; and which node owned each block in each round (NoProp-DT runs only:
    FedAvg runs of one network pass ownership_path=None)."""
    import numpy as np

    rounds = [r["round"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [100 * r["accuracy"] for r in records], marker="o", color="tab:blue")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("server test accuracy (%)", color="tab:blue")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    loss_key, loss_label = ("mean_l2", "mean denoising loss") if ownership_path else ("train_loss", "mean train loss")
    ax2.plot(rounds, [r.get(loss_key) or float("nan") for r in records], marker="s", color="tab:orange")
    ax2.set_ylabel(loss_label, color="tab:orange")
    if ownership_path:
        ax2.set_yscale("log")
    save_figure(fig, accuracy_path)
    if ownership_path is None:
        return

    nodes = sorted({int(n) for r in records for owners in r["plan"].values() for n in owners})
    index = {n: i for i, n in enumerate(nodes)}
    T = max((int(t) for r in records for t in (*r["plan"], *r.get("uncovered", ()))), default=0)  # partial plans
    if not records or not T:
        return
    grid = np.full((T, len(records)), np.nan)
    labels = [["" for _ in records] for _ in range(T)]
    for j, r in enumerate(records):
        for t, owners in r["plan"].items():
            grid[int(t) - 1, j] = index[int(owners[0])]
            labels[int(t) - 1][j] = ",".join(str(index[int(n)]) for n in owners)
        for t in r.get("uncovered", ()):  # nobody could hold it that round: it kept its weights
            labels[int(t) - 1][j] = "-"
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(records) + 2), max(3, 0.4 * T + 1)))
    ax.imshow(grid, aspect="auto", cmap="tab20", vmin=0, vmax=max(19, len(nodes)), origin="lower",
              extent=(rounds[0] - 0.5, rounds[-1] + 0.5, 0.5, T + 0.5))
    if len(records) * T <= 400:
        for t in range(T):
            for j, rnd in enumerate(rounds):
                ax.text(rnd, t + 1, labels[t][j], ha="center", va="center", fontsize=7)
    ax.set_xlabel("round")
    ax.set_ylabel("block")
    ax.set_title("owner of each block (node index; " + ", ".join(f"{i}={n}" for n, i in list(index.items())[:6])
                 + (" ..." if len(nodes) > 6 else "") + ")", fontsize=8)
    save_figure(fig, ownership_path)


def plot_chain_diagnostics(records: list[dict], path: str | Path) -> Path | None:
    """One PNG of the chain's readouts per round: left, a blocks x rounds heatmap of each block's own accuracy
    (argmax u_hat_t along the label-free chain); right, the prediction, the chain's head, the blocks' ensemble, the
    nearest embedding of z_T and the worst class. Rounds without diagnostics are skipped; None when there are none."""
    import numpy as np

    records = [r for r in records if r.get("block_accuracy")]
    if not records:
        return None
    rounds = [r["round"] for r in records]
    T = max(int(t) for r in records for t in r["block_accuracy"])
    grid = np.full((T, len(records)), np.nan)
    for j, r in enumerate(records):
        for t, acc in r["block_accuracy"].items():
            grid[int(t) - 1, j] = 100 * acc
    fig, (ax_map, ax_read) = plt.subplots(1, 2, figsize=(max(9, 0.5 * len(records) + 7), max(3.5, 0.35 * T + 1)),
                                          layout="constrained")
    image = ax_map.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100, origin="lower",
                          extent=(rounds[0] - 0.5, rounds[-1] + 0.5, 0.5, T + 0.5))
    if len(records) * T <= 300:
        for t in range(T):
            for j, rnd in enumerate(rounds):
                ax_map.text(rnd, t + 1, f"{grid[t, j]:.0f}", ha="center", va="center", fontsize=7, color="white")
    ax_map.set_xlabel("round")
    ax_map.set_ylabel("block t")
    ax_map.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_map.set_title("each block's own accuracy (argmax u_hat_t, %)", fontsize=9)
    fig.colorbar(image, ax=ax_map, fraction=0.046)
    ax_read.plot(rounds, [100 * r["accuracy"] for r in records], marker="o", label="the prediction (--readout)")
    for key, label, marker in (("chain_accuracy", "chain: head on z_T", "^"),
                               ("ensemble_accuracy", "ensemble of the blocks", "D")):
        if all(key in r for r in records):
            ax_read.plot(rounds, [100 * r[key] for r in records], marker=marker, linestyle="--", label=label)
    ax_read.plot(rounds, [100 * r["nearest_accuracy"] for r in records], marker="s",
                 label="nearest embedding of z_T")
    worst = [min((v for v in r.get("class_accuracy", {}).values() if v is not None), default=float("nan"))
             for r in records]
    ax_read.plot(rounds, [100 * w for w in worst], marker="v", linestyle=":", label="worst class (the prediction)")
    ax_read.set_xlabel("round")
    ax_read.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_read.set_ylabel("test accuracy (%)")
    ax_read.set_ylim(0, 100)
    ax_read.grid(alpha=0.3)
    ax_read.legend(fontsize=8)
    return save_figure(fig, path)
