"""What a node tells the server in discovery: device, memory budget, blocks it can hold, measured speed."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from noprop.data import LabelledData
from noprop.model import NoPropDT
from noprop.model_configs import NoPropConfig
from noprop.trainer import BlockTrainer, OptimConfig


def available_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / 2**20
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 4096.0  # no way to tell: assume a small device


def block_memory_mb(cfg: NoPropConfig, batch_size: int) -> tuple[float, float]:
    """(MB held per owned block, MB of activations while one block trains), estimated from shapes.

    Held: parameters, gradients and two AdamW moments (4 float32 copies). Activations: the conv feature
    maps of one batch, three copies (output, ReLU/dropout masks, gradient).
    """
    params = sum(p.numel() for p in NoPropDT(cfg, owned_blocks=[1]).block(1).parameters())
    held = 4 * 4 * params / 2**20
    if cfg.is_image:
        c1, c2, c3 = cfg.channels
        _, h, w = cfg.input_shape
        per_sample = c1 * h * w + (c1 + c2 + c3) * (h // 2) * (w // 2) + 4 * cfg.hidden
    else:
        per_sample = 8 * cfg.hidden
    act = 3 * 4 * per_sample * batch_size / 2**20
    return held, act


def max_blocks_for_memory(cfg: NoPropConfig, batch_size: int, budget_mb: float, data_mb: float) -> int:
    held, act = block_memory_mb(cfg, batch_size)
    room = budget_mb - data_mb - act - 300.0  # 300 MB for the runtime itself
    return max(0, math.floor(room / held))


def measure_throughput(cfg: NoPropConfig, data: LabelledData, device: torch.device, batch_size: int,
                       steps: int = 3) -> float:
    """Training samples per second through one block, on this node's own data and device."""
    model = NoPropDT(cfg, owned_blocks=[1]).to(device)
    trainer = BlockTrainer(model, OptimConfig(batch_size=batch_size))
    n = min(batch_size, len(data))
    x, y = data.x[:n].to(device), data.y[:n].to(device)
    trainer.step(1, x, y)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(1, x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * n / (time.perf_counter() - start)
