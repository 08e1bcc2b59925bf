"""Where a quickstart round's time goes, before and after issue 11, side by side in one run.

Runs `scripts/quickstart.sh` (a real noprop-server and 4 noprop-client processes over TLS on this machine, then
the ONNX export and edge evaluation) twice:
- before: every message in Flower's fresh per-message process (`noprop-client --no-worker`), the SuperLink on its
  SQL database on disk, the ServerApp pulling replies every 3 s (Flower's Grid), SuperExec polling every 1 s, and
  evaluation and checkpoint on the round's critical path (`--no-eval-in-background`);
- after: the defaults of this commit plus the quickstart's own settings (warm worker per node, pulls every 0.2 s,
  SuperExec every 0.2 s, evaluation and checkpoint of round r while round r+1 trains, `--superlink-db memory`).
and reads each round's breakdown from OUT/metrics.jsonl (server_timing, timeline, client_timing), the wall time,
CPU seconds and the final accuracy (PyTorch and ONNX). Writes bench/results/round_overhead/results.json and the
BENCHMARKS.md section "## Round overhead: where a quickstart round's time goes".

    .venv/bin/python bench/round_overhead.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
from benchlib import replace_section

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "round_overhead"
SECTION = "## Round overhead: where a quickstart round's time goes"

VARIANTS = {
    "before": {"QUICKSTART_CLIENT_FLAGS": "--no-worker", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0",
               "server": "--superlink-db file --reply-poll-s 3 --no-eval-in-background"},
    "after": {"server": ""},
}


def run_quickstart(name: str, rounds: int) -> dict:
    spec = VARIANTS[name]
    out = ROOT / "runs" / f"bench-overhead-{name}"
    env = dict(os.environ, OUT=str(out), DATA=str(ROOT / "data"), BIN=str(ROOT / ".venv" / "bin"),
               QUICKSTART_FLAGS=f"--rounds {rounds} {spec['server']}".strip())
    env.update({k: v for k, v in spec.items() if k != "server"})
    load = os.getloadavg()[0]
    start = time.monotonic()
    usage0 = os.times()  # CPU seconds of every process the script starts (they are all reaped: RUSAGE_CHILDREN)
    log = subprocess.run([str(ROOT / "scripts" / "quickstart.sh")], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout
    usage1 = os.times()
    wall = time.monotonic() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    torch_acc = float(re.search(r"final test accuracy \(PyTorch, server side\): ([0-9.]+)%", log).group(1))
    onnx_acc = float(re.search(r"accuracy ([0-9.]+)% \(\d+/\d+\)", log).group(1))
    return {"wall_s": round(wall, 1), "cpu_s": round((usage1.children_user - usage0.children_user)
                                                     + (usage1.children_system - usage0.children_system), 1),
            "load_at_start": round(load, 2), "load_at_end": round(os.getloadavg()[0], 2),
            "accuracy_torch": torch_acc, "accuracy_onnx": onnx_acc, "rounds": [round_summary(r) for r in records]}


def round_summary(r: dict) -> dict:
    """One round: wall, slowest client's training, the server's phases and the slowest reply's way (its parts)."""
    slowest = max(r["client_train_time_s"], key=r["client_train_time_s"].get)
    timeline = r.get("timeline", {}).get(slowest, {})
    return {"round": r["round"], "round_s": r["round_time_s"], "slowest_train_s": r["client_train_time_s"][slowest],
            "server": r.get("server_timing", {}), "slowest_reply": timeline,
            "client": r.get("client_timing", {}).get(slowest, {}),
            "median_to_app_s": statistics.median(t.get("to_app", 0.0) for t in r.get("timeline", {}).values()),
            "accuracy": r["accuracy"]}


def table(results: dict) -> list[str]:
    rows = [("round wall (s)", lambda r: r["round_s"]),
            ("slowest client's training (s)", lambda r: r["slowest_train_s"]),
            ("round / slowest training", lambda r: r["round_s"] / r["slowest_train_s"]),
            ("overhead beyond training (s)", lambda r: r["round_s"] - r["slowest_train_s"]),
            ("server: discovery", lambda r: r["server"].get("discovery", 0.0)),
            ("server: build messages", lambda r: r["server"].get("build_messages", 0.0)),
            ("server: validate + aggregate",
             lambda r: r["server"].get("validate", 0) + r["server"].get("aggregate", 0)),
            ("server: head fit", lambda r: r["server"].get("head_fit", 0.0)),
            ("server: evaluation", lambda r: r["server"].get("evaluate", 0.0)),
            ("server: checkpoint", lambda r: r["server"].get("checkpoint", 0.0)),
            ("slowest reply: push -> ClientApp process start", lambda r: r["slowest_reply"].get("to_process", 0.0)),
            ("slowest reply: process start -> app import (Flower start, message pull)",
             lambda r: r["slowest_reply"].get("to_app", 0.0)),
            ("slowest reply: app import -> handler", lambda r: r["slowest_reply"].get("to_handler", 0.0)),
            ("slowest reply: handler: imports (torch)", lambda r: r["client"].get("imports", 0.0)),
            ("slowest reply: handler: data load + partition", lambda r: r["client"].get("data", 0.0)),
            ("slowest reply: handler: model build", lambda r: r["client"].get("model", 0.0)),
            ("slowest reply: handler: reply arrays", lambda r: r["client"].get("reply", 0.0)),
            ("slowest reply: relay to the worker and back", lambda r: r["client"].get("relay", 0.0)),
            ("slowest reply: handler end -> server (push back, polling)",
             lambda r: r["slowest_reply"].get("back", 0.0)),
            ("ClientApp process CPU s to handler end", lambda r: r["slowest_reply"].get("cpu_process", 0.0))]
    before, after = results["before"]["rounds"], results["after"]["rounds"]
    head = "| part (mean over rounds; round 1 alone has discovery) | before | after |"
    lines = [head, "|---|---|---|"]
    for name, get in rows:
        b = statistics.mean(get(r) for r in before)
        a = statistics.mean(get(r) for r in after)
        lines.append(f"| {name} | {b:.2f} | {a:.2f} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in ("before", "after"):
        print(f"[round_overhead] quickstart, {name} ...", flush=True)
        results[name] = run_quickstart(name, args.rounds)
        print(json.dumps({k: v for k, v in results[name].items() if k != "rounds"}), flush=True)
    results["machine"] = {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                          "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d")}
    (RESULTS / "results.json").write_text(json.dumps(results, indent=1))
    b, a = results["before"], results["after"]
    lines = [SECTION, "",
             f"`bench/round_overhead.py --rounds {args.rounds}`, {results['machine']['date']}: the quickstart "
             f"(`scripts/quickstart.sh`: noprop-server + 4 noprop-client processes over TLS, 1 torch thread each, "
             f"Fashion-MNIST, T=10, widths 16,32,64) run twice in one benchmark on this {os.cpu_count()}-core, "
             f"{results['machine']['memory_gb']} GiB machine, nothing else running. "
             "Before: `noprop-client --no-worker` (Flower's fresh process does everything per message), "
             "`--superlink-db file`, `--reply-poll-s 3` (Flower's Grid), FLWR_SUPEREXEC_TASK_POLL_INTERVAL=1.0, "
             "`--no-eval-in-background`. After: the warm worker per node, replies pulled every 0.2 s, SuperExec "
             "every 0.2 s, evaluation and checkpoint of round r while round r+1 trains (so the last round alone "
             "still waits for them), `--superlink-db memory` (the quickstart's setting). Parts in seconds, from "
             "metrics.jsonl "
             "(server_timing, timeline, client_timing) of the slowest client of each round.", "",
             *table(results), "",
             "| | before | after |", "|---|---|---|",
             f"| quickstart wall (s), all of it | {b['wall_s']} | {a['wall_s']} |",
             f"| CPU s of all its processes | {b['cpu_s']} | {a['cpu_s']} |",
             f"| load average at start / end | {b['load_at_start']} / {b['load_at_end']} | "
             f"{a['load_at_start']} / {a['load_at_end']} |",
             f"| final accuracy, PyTorch / ONNX (%) | {b['accuracy_torch']} / {b['accuracy_onnx']} | "
             f"{a['accuracy_torch']} / {a['accuracy_onnx']} |",
             "| rounds: wall / slowest training (s) | "
             + ", ".join(f"{r['round_s']:.0f}/{r['slowest_train_s']:.0f}" for r in b["rounds"]) + " | "
             + ", ".join(f"{r['round_s']:.0f}/{r['slowest_train_s']:.0f}" for r in a["rounds"]) + " |", ""]
    replace_section(ROOT / "BENCHMARKS.md", SECTION, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
