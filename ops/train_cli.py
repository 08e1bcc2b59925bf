"""noprop-train: train NoProp-DT, -CT, -FM, the adjoint ODE, the backprop baseline or the plain CNN on one machine.

Writes into the run folder: metrics.jsonl (a line per epoch), checkpoint.pt (atomic, after every epoch) and
beside it the optimizers' and RNG state for --resume, curves.png, and config.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from noprop.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_train_state,
    save_checkpoint,
    save_train_state,
)
from noprop.config import EVAL_MODES, TrainConfig, build_config
from noprop.data import load_train_test
from noprop.device import resolve_device
from noprop.io import append_jsonl, atomic_write_text, read_jsonl, write_jsonl
from noprop.methods import METHODS, build_model, make_optimizer
from noprop.model import prototype_rows, scale_prototypes
from noprop.model_configs import (
    ADJOINT_SOLVERS,
    CT_L2_WEIGHTS,
    FM_SOLVERS,
    HEAD_KINDS,
    NORM_KINDS,
    PROTOTYPE_SCALES,
    PROTOTYPE_Z_PATHS,
    READOUTS,
    parse_embedding,
)
from noprop.ops.cli import OneLineParser, examples
from noprop.plots import plot_training_curves
from noprop.settings import Flag, SettingsError, add_flags
from noprop.sources import DatasetError
from noprop.trainer import BlockTrainer, OptimConfig, evaluate_accuracy, train_end_to_end_epoch


def parse_channels(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"channels must be three integers like 32,64,128, got {text!r}") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"channels must be three integers like 32,64,128, got {text!r}")
    return parts


# what TrainConfig's fields do not say themselves: help, choices, what an unset default means, the short -T
# (noprop.settings makes the flags and adds each default)
SOLVERS = tuple(dict.fromkeys((*FM_SOLVERS, *ADJOINT_SOLVERS)))
TRAIN_FLAGS = {
    "method": Flag("dt: NoProp-DT; ct, fm: NoProp-CT and -FM; adjoint, backprop: the baselines; cnn: the plain CNN "
                   "peer", listed=tuple(METHODS)),
    "dataset": Flag("fashion-mnist, mnist, cifar10, cifar100, imagefolder:DIR or npz:FILE", metavar="SPEC"),
    "data_root": Flag("folder holding the datasets", metavar="DIR", default="$NOPROP_DATA or ./data"),
    "download": Flag("let torchvision download MNIST/CIFAR", negatable=False),
    "subset": Flag("train on a class-stratified subset of N examples", default="all of the train split"),
    "eval_limit": Flag("evaluate on the first N test examples only", default="all of them"),
    "epochs": Flag("passes over the training data"),
    "T": Flag("dt, backprop: number of blocks", aliases=("-T",)),
    "embedding": Flag("class embedding (cnn: one-hot only)", metavar="one-hot|learned:D|prototype"),
    "prototype_scale": Flag("prototype rows: unit (one factor to mean norm 1) or image (the raw normalised images)",
                            choices=PROTOTYPE_SCALES, default="dt and ct unit; fm, backprop and adjoint image"),
    "prototype_z_path": Flag("prototype z read by a conv path (the paper) or by the FC path of the other embeddings",
                             choices=PROTOTYPE_Z_PATHS, default="dt and ct linear; fm, backprop and adjoint conv"),
    "head": Flag("output head (cnn: softmax only)", choices=HEAD_KINDS),
    "radial_sigma": Flag("width of the radial head's kernel"),
    "eta": Flag("dt, ct: weight of the L2 (denoising) term", default="the paper's values: dt 0.1, ct 1.0"),
    "clip": Flag("dt: the noise schedule's alpha-bar clip (sets SNR(T) and the last block's loss weight)"),
    "max_delta_snr": Flag("dt: cap on SNR(t) - SNR(t-1) in the loss weight", default="no cap"),
    "channels": Flag("conv widths of a block, three comma-separated numbers", parse=parse_channels),
    "hidden": Flag("hidden width of a block"),
    "dropout": Flag("dropout in a block"),
    "norm": Flag("dt, backprop: normalisation in a block (batch: Figure 6)", choices=NORM_KINDS),
    "z_skip": Flag("dt: blocks add the closed-form class posterior given z_{t-1} to their logits (not Figure 6; "
                   "the federation's default)", negatable=False),
    "readout": Flag("dt: how the blocks make a prediction: chain (Eq. 3, the paper's) or ensemble (the geometric "
                    "mean of every block's posterior from the image alone; the federation's default)",
                    choices=READOUTS),
    "z_dropout": Flag("dt: share of each training batch whose z_{t-1} is zeroed (every block also learns to read "
                      "the label from the image alone, as the ensemble readout uses it; 0 = off)"),
    "steps": Flag("ct, fm, adjoint: ODE steps from t=0 to 1", default="10"),
    "solver": Flag("fm: euler or heun; adjoint: euler, midpoint or rk4", listed=SOLVERS, default="euler"),
    "fm_sigma": Flag("fm: width of the Gaussian path"),
    "ct_l2_weight": Flag("ct: the L2 term's weight over t, snr (Eq. 9's SNR'(t)) or log-snr (-gamma'(t))",
                         choices=CT_L2_WEIGHTS, default="log-snr"),
    "grad_clip": Flag("ct: largest gradient norm of a training step (0 = off)", default="1"),
    "lr": Flag("AdamW learning rate"),
    "weight_decay": Flag("AdamW weight decay"),
    "batch_size": Flag("training batch size"),
    "eval_mode": Flag("inference mode of the test accuracy", choices=EVAL_MODES),
    "device": Flag("where training runs", metavar="auto|cpu|cuda|cuda:N|mps"),
    "seed": Flag("random seed"),
    "threads": Flag("torch CPU threads", default="torch's own choice"),
    "out": Flag("run folder", metavar="DIR", default="runs/METHOD-DATASET-TIME"),
}


EPILOG = examples(
    "noprop-train --method dt --dataset fashion-mnist --epochs 5 --embedding learned:20",
    "noprop-train --method cnn --epochs 5 --out runs/cnn",
    "noprop-train --method ct --epochs 5 --steps 10",
    "noprop-train --config run.toml --epochs 2",
    "noprop-train --out runs/cnn --method cnn --epochs 8 --resume",
)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="noprop-train", description=__doc__.splitlines()[0], argument_default=None,
                      epilog=EPILOG)
    add_flags(p, TrainConfig, TRAIN_FLAGS, show_defaults=True,
              config_help="TOML file with any of the settings below, at the top level or in a [train] table (flags "
                          "win over it)")
    p.add_argument("--resume", action="store_true",
                   help="continue --out's run after its last checkpointed epoch (same settings; --epochs may grow)")
    return p


RESUME_SAME = ("subset", "seed", "lr", "weight_decay", "batch_size")  # besides the model: a resume must keep these


def resume_from(out: Path, cfg: TrainConfig, model_cfg, data: dict, model) -> tuple[int, list[dict], dict | None]:
    """--resume: OUT's checkpoint into model. Returns its epoch, the metrics lines up to it and the saved train
    state (None: the optimizers restart). A checkpoint of other data, model or settings is a SettingsError."""
    path = out / "checkpoint.pt"
    if not path.exists():
        print(f"noprop-train: no checkpoint in {out} to resume from: starting at epoch 1")
        return 0, [], None
    ckpt = load_checkpoint(path)
    shape, classes = ckpt.data.get("input_shape"), ckpt.data.get("classes", [])
    if shape != data["input_shape"] or classes != data["classes"]:
        raise SettingsError(f"--resume: {path} was trained on input {shape} with {len(classes)} classes, the data "
                          f"has {data['input_shape']} with {len(data['classes'])}: resume on its dataset or use a new "
                          "--out")
    if not {"epoch", "train_config"} <= set(ckpt.extra):
        raise SettingsError(f"--resume: {path} was not written by noprop-train: use a new --out")
    changed = [k for k in RESUME_SAME if ckpt.extra["train_config"].get(k) != getattr(cfg, k)]
    if ckpt.method != cfg.method or ckpt.config != model_cfg:
        changed.insert(0, "the model")
    if changed:
        raise SettingsError(f"--resume: {path} was trained with other settings ({', '.join(changed)}): give the "
                          "original ones or use a new --out")
    model.load_state_dict(ckpt.state_dict)
    epoch = int(ckpt.extra["epoch"])
    metrics = out / "metrics.jsonl"
    records = [r for r in read_jsonl(metrics) if r["epoch"] < epoch] if metrics.exists() else []
    records.append(ckpt.metrics)  # lines past the checkpoint (a crash after their append) are dropped
    write_jsonl(metrics, records)
    state = load_train_state(path, epoch)
    print(f"noprop-train: resuming after epoch {epoch} from {path}"
          + ("" if state else " (no optimizer state saved with it: the optimizers restart)"))
    return epoch, records, state


def run(cfg: TrainConfig, on_event: Callable[[str], None] | None = None, resume: bool = False) -> dict:
    """Train as cfg says (resume: continue cfg.out's run, see resume_from); returns the last epoch's metrics record.

    on_event("train_start") runs once data and model are ready, on_event("epoch_trained") after each epoch's
    training and before its evaluation, on_event("epoch_done") after its checkpoint and plot: benchmarks use
    them to measure the memory of training alone.
    """
    def event(name: str) -> None:
        if on_event is not None:
            on_event(name)

    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    root = Path(cfg.data_root) if cfg.data_root else None
    train, test = load_train_test(cfg.dataset, root=root, download=cfg.download, subset=cfg.subset, seed=cfg.seed)
    if cfg.eval_limit:
        test = test.subset(range(min(cfg.eval_limit, len(test))))
    out = Path(cfg.out or f"runs/{cfg.method}-{cfg.dataset.split(':')[0]}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"

    init, embedding_lr_scale = None, 1.0
    if parse_embedding(cfg.embedding)[0] == "prototype":
        init, embedding_lr_scale = scale_prototypes(prototype_rows(train.x, train.y, train.num_classes, seed=cfg.seed),
                                                    cfg.prototype_scale)
    model_cfg = cfg.model_config(train.input_shape, train.num_classes, embedding_lr_scale)
    model = build_model(cfg.method, model_cfg, init).to(device)
    optim = OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size)
    length = f"T={cfg.T}" if cfg.method in ("dt", "backprop") else \
        "one network call" if cfg.method == "cnn" else f"{model_cfg.steps} steps"
    print(f"noprop-train: {cfg.method} on {train.name} ({len(train)} train / {len(test)} test, "
          f"{train.num_classes} classes, input {tuple(train.input_shape)}), {length}, embedding {cfg.embedding}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, device {device}; "
          f"writing to {out}")

    trainer = BlockTrainer(model, optim) if cfg.method == "dt" else None
    optimizer = None if trainer is not None else make_optimizer(cfg.method, model.parameters(), cfg.lr,
                                                                cfg.weight_decay)
    optimizers = [*trainer.block_optimizers.values(), trainer.shared_optimizer] if trainer else [optimizer]
    done, records, state = resume_from(out, cfg, model_cfg, train.describe(), model) if resume else (0, [], None)
    if not done:
        metrics_path.unlink(missing_ok=True)
    atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))  # after a resume's checks
    if state is not None:
        for opt, saved in zip(optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(saved)
        torch.set_rng_state(state["rng"])
    modes = ("deterministic", "stochastic") if cfg.eval_mode == "both" else (cfg.eval_mode,)
    event("train_start")
    batches = -(-len(train) // cfg.batch_size)
    for epoch in range(done + 1, cfg.epochs + 1):
        start = time.perf_counter()
        record: dict = {"epoch": epoch, "method": cfg.method}
        if trainer is not None:
            l2, ce = {}, {}
            for t in range(1, cfg.T + 1):
                with tqdm(total=batches, desc=f"epoch {epoch}/{cfg.epochs} block {t}/{cfg.T}", leave=False,
                          unit="batch", dynamic_ncols=True) as bar:
                    def on_batch(parts: dict, bar=bar) -> None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{parts['loss']:.3f}", l2=f"{parts['l2']:.3f}")
                    parts = trainer.train_block_epoch(t, train, on_batch=on_batch)
                l2[str(t)], ce[str(t)] = parts["l2"], parts["ce"]
            record.update(block_l2=l2, head_ce=ce[str(cfg.T)], train_loss=sum(l2.values()) / len(l2))
            block_passes = cfg.T
        else:
            with tqdm(total=batches, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, unit="batch",
                      dynamic_ncols=True) as bar:
                def on_batch(parts: dict, bar=bar) -> None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{parts['loss']:.3f}")
                parts = train_end_to_end_epoch(model, optimizer, train, cfg.batch_size, on_batch=on_batch)
            record["train_loss"] = parts.pop("loss")
            record.update(parts)
            # block evaluations per example: the whole chain (backprop), every ODE step (adjoint), one (ct, fm, cnn)
            block_passes = {"backprop": cfg.T, "adjoint": model_cfg.T}.get(cfg.method, 1)
        train_time = time.perf_counter() - start
        event("epoch_trained")
        record["train_time_s"] = round(train_time, 2)
        record["samples_per_s_per_block"] = round(len(train) * block_passes / train_time, 1)
        for mode in modes:
            record[f"test_acc_{mode}"] = evaluate_accuracy(model, test, mode, seed=cfg.seed)
        record["epoch_time_s"] = round(time.perf_counter() - start, 2)
        records.append(record)
        append_jsonl(metrics_path, record)
        accs = "  ".join(f"{m[:3]} {100 * record[f'test_acc_{m}']:.2f}%" for m in modes)
        print(f"epoch {epoch}/{cfg.epochs}  loss {record['train_loss']:.4f}  test acc {accs}  "
              f"({record['epoch_time_s']:.0f}s)", flush=True)
        save_checkpoint(out / "checkpoint.pt", Checkpoint(
            method=cfg.method, config=model_cfg, state_dict=model.state_dict(), data=train.describe(),
            metrics=record, extra={"epoch": epoch, "train_config": cfg.to_dict()}))
        save_train_state(out / "checkpoint.pt", epoch, optimizers)
        plot_training_curves(records, out / "curves.png", title=f"{cfg.method} on {train.name}")
        event("epoch_done")
    print(f"done: checkpoint {out / 'checkpoint.pt'}, metrics {metrics_path}, curves {out / 'curves.png'}")
    return records[-1]


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    toml_path, resume = args.pop("config"), bool(args.pop("resume"))
    try:
        cfg = build_config(toml_path, args)
        if resume and not cfg.out:
            raise SettingsError("--resume needs --out: the run folder to continue")
        run(cfg, resume=resume)
    except (SettingsError, DatasetError, CheckpointError, ValueError) as exc:
        print(f"noprop-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("noprop-train: interrupted; the last completed epoch's checkpoint is intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
