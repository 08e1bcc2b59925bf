"""`noprop-server`: a Flower SuperLink plus the NoProp run, started, watched and stopped in one command.

What it does, in order:
1. checks the run settings (FederationConfig, one flag per field) and the evaluation dataset;
2. starts `flower-superlink` with the gRPC Fleet API (clients) on HOST:PORT (127.0.0.1:9092 by default)
   and its HTTP Control API on 127.0.0.1:CONTROL_PORT, state under --state-dir, no per-run dependency
   installation, telemetry and update checks off; with TLS (--certificates DIR from noprop-certs) or, only when
   asked for, without (--insecure); with --authorized-keys, SuperNode authentication on and every key in that
   folder registered through the Control API before the run is submitted;
3. writes a Flower app (STATE/app/pyproject.toml: the components noprop.server.app:app and
   noprop.client.app:app, whose code comes from the installed package, and the run settings as
   [tool.flwr.app.config]) and a connection in $FLWR_HOME/config.toml, and submits the run with `flwr run`;
4. prints a line per round from OUT/metrics.jsonl, keeps the ServerApp's log in STATE/run-ID.log
   (`flwr log --stream`), and polls `flwr ls` until the run has finished;
5. exits 0 if the run completed, 1 if it failed or was stopped (with the details and the log's tail), 2 on bad
   settings, 130 on Ctrl-C / SIGTERM (after `flwr stop` and stopping the SuperLink). Nothing is left running.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import tomli_w

from noprop.io import atomic_write_text
from noprop.ops.certs import key_fingerprint
from noprop.ops.cli import LaunchError, OneLineParser, examples, fail, say
from noprop.ops.flower import flower_command, flower_env
from noprop.ops.flower_app import CONNECTION, cli_error, parse_cli_json, read_done, write_app, write_connection
from noprop.ops.network import format_address, tcp_answers
from noprop.ops.preflight import PROG, Plan, prepare
from noprop.ops.processes import ProcessGroup, run_quiet, tail
from noprop.ops.progress import LogFollower, MetricsTail
from noprop.ops.report import round_line
from noprop.ops.run_flags import add_federation_flags
from noprop.ops.supervision import Interrupted, install_signal_handlers, raise_if_interrupted, shield_signals

STATUS_POLL_S = 30.0  # `flwr ls` costs ~2 s of CPU; the log stream ending is the prompt signal
CLI_TIMEOUT_S = 120.0
NODE_KEYS_RECORD = "node-keys.json"  # in --state-dir: the node id each --authorized-keys key was registered as


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Start a Flower SuperLink and run NoProp federated training on it: clients "
                    "(noprop-client) connect to --host:--port, the server plans block ownership, aggregates, "
                    "evaluates and checkpoints each round.",
        epilog=examples(
            "noprop-certs certs --host server.lan",
            "noprop-server --host 0.0.0.0 --certificates certs --rounds 4 --min-clients 4",
            "noprop-client --server server.lan:9092 --root-certificate ca.crt --data fashion-mnist --partition 0/4",
            "noprop-server --insecure --rounds 2 --min-clients 2 --out runs/fed",
            "noprop-server --insecure --config pyproject.toml",
        ) + "\nThe first three: TLS across machines (copy certs/ca.crt to each client); the last two: one machine. "
            "Follow a run with Flower's CLI: FLWR_HOME=OUT/.flower/flwr-home flwr ls noprop (or flwr log RUN-ID "
            "noprop --stream).",
    )
    net = p.add_argument_group("network and state")
    net.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                     help="address the Fleet API (the clients' side) listens on (default: 127.0.0.1, this machine "
                          "only; 0.0.0.0 = every interface)")
    net.add_argument("--port", type=int, default=9092, metavar="PORT", help="Fleet API port (default: 9092)")
    net.add_argument("--control-port", type=int, default=9093, metavar="PORT",
                     help="port of the SuperLink's HTTP Control API, always on 127.0.0.1 (default: 9093)")
    sec = p.add_argument_group("security (one of --certificates and --insecure is required)")
    sec.add_argument("--certificates", default=None, metavar="DIR",
                     help="TLS for the Fleet and Control APIs with DIR/ca.crt, DIR/server.crt, DIR/server.key (made by "
                          "noprop-certs DIR --host NAME); clients pass --root-certificate DIR/ca.crt")
    sec.add_argument("--insecure", action="store_true",
                     help="no TLS: unencrypted, unauthenticated connections (for a federation on one machine)")
    sec.add_argument("--authorized-keys", default=None, metavar="DIR",
                     help="only SuperNodes holding the private key of a DIR/*.pub may join (Flower's SuperNode "
                          "authentication; needs --certificates); clients pass --key")
    net.add_argument("--state-dir", default=None, metavar="DIR",
                     help="SuperLink database, Flower home (STATE/flwr-home: set FLWR_HOME to it for flwr ls / flwr "
                          "log), generated app and logs (default: OUT/.flower)")
    net.add_argument("--superlink-db", choices=("file", "memory"), default="file",
                     help="where the SuperLink keeps its state and the messages in flight: file (STATE/superlink.db; "
                          "clients keep their node ids across a server restart) or memory (no disk; as fast since "
                          "messages travel packed, BENCHMARKS.md; after a server restart, clients rejoin as new "
                          "nodes) (default: file)")
    net.add_argument("--startup-timeout", type=float, default=120.0, metavar="S",
                     help="seconds to wait for the SuperLink to come up (default: 120)")
    net.add_argument("--verbose", "-v", action="store_true",
                     help="echo the ServerApp's log as it arrives (default: a line per round)")
    add_federation_flags(p, defaults={"plan_by_speed": "on"})
    return p



# ----------------------------------------------------------------------------------------------------------
# The server


class Server:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.env = flower_env(plan.flwr_home)
        self.cli_env = {**self.env, "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200"}
        self.superlink: ProcessGroup | None = None
        self.log_stream: ProcessGroup | None = None
        self.run_id: str | None = None
        self.finished = False
        self.superlink_log = plan.state / "superlink.log"

    def say(self, message: str) -> None:
        say(PROG, message)

    # -- SuperLink ---------------------------------------------------------------------------------------
    def start_superlink(self) -> None:
        p = self.plan
        p.state.mkdir(parents=True, exist_ok=True)
        if p.tls is None:
            security = ["--insecure"]
        else:
            security = ["--ssl-ca-certfile", str(p.tls["ca"]), "--ssl-certfile", str(p.tls["cert"]),
                        "--ssl-keyfile", str(p.tls["key"])]
            if p.node_keys:
                security.append("--enable-supernode-auth")
        cmd = [flower_command("flower-superlink"), *security,
               "--fleet-api-address", p.fleet_address,
               "--host", "127.0.0.1", "--port", str(p.control_port),
               # with packed messages (7-8 objects each) the file store is as fast as memory (BENCHMARKS.md)
               "--database", str(p.state / "superlink.db") if p.superlink_db == "file" else ":flwr-in-memory:",
               "--disable-runtime-dependency-installation"]
        with open(self.superlink_log, "a") as f:
            f.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        mode = "no TLS (--insecure)" if p.tls is None else f"TLS with {p.tls['cert']}"
        if p.node_keys:
            mode += ", SuperNode authentication"
        self.say(f"starting the Flower SuperLink: Fleet API (clients, gRPC) on {p.fleet_address}, Control API "
                 f"on {p.control_address}; {mode}; log {self.superlink_log}")
        self.superlink = ProcessGroup("flower-superlink", cmd, self.env, log_path=self.superlink_log)
        start = time.monotonic()
        deadline = start + p.startup_timeout
        probe_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(p.host, p.host)
        while True:
            rc = self.superlink.poll()
            if rc is not None:
                raise LaunchError(f"the SuperLink exited with code {rc} while starting; its log "
                                  f"({self.superlink_log}) ends with: {tail(self.superlink_log, 5)}")
            if self._healthy() and tcp_answers(probe_host, p.port) is None:
                break
            if time.monotonic() > deadline:
                raise LaunchError(f"the SuperLink did not come up within {p.startup_timeout:.0f}s; see "
                                  f"{self.superlink_log}")
            time.sleep(0.5)
        self.say(f"SuperLink up after {time.monotonic() - start:.1f}s (pid {self.superlink.pid})")
        write_connection(p.flwr_home, p.control_address, p.tls["ca"] if p.tls else None)
        if p.node_keys:
            self.register_node_keys()

    def _healthy(self) -> bool:
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]  # loopback: never a proxy
        scheme = "http"
        if self.plan.tls is not None:
            scheme = "https"
            handlers.append(urllib.request.HTTPSHandler(
                context=ssl.create_default_context(cafile=str(self.plan.tls["ca"]))))
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(f"{scheme}://{self.plan.control_address}/health", timeout=2.0) as res:
                return res.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def register_node_keys(self) -> None:
        """Make the SuperLink's registered nodes match --authorized-keys: `flwr supernode register` each new key,
        `flwr supernode unregister` the node of each key removed since the last start with this --state-dir
        (STATE/node-keys.json remembers which node each key became; the SuperLink database outlives a restart)."""
        p = self.plan
        record_path = p.state / NODE_KEYS_RECORD
        # {fingerprint: {"name": ..., "node_id": ...}}; a SuperLink in memory starts with no node registered
        record = read_done(record_path) if p.superlink_db == "file" else {}
        current = {key_fingerprint(path): path for path in p.node_keys}
        lines = []
        for fingerprint, entry in list(record.items()):
            if fingerprint in current:
                continue
            res = self.flwr("supernode", "unregister", str(entry["node_id"]), CONNECTION, "--format", "json")
            detail = cli_error(res)
            if detail and "not found" not in detail.lower() and "already deleted" not in detail.lower():
                raise LaunchError(f"unregistering node {entry['node_id']} (key {entry['name']}, no longer in "
                                  f"--authorized-keys) failed: {detail}")
            del record[fingerprint]
            if p.superlink_db == "file":  # what the SuperLink database on disk holds
                atomic_write_text(record_path, json.dumps(record, indent=1))
            lines.append(f"{entry['name']} removed (node {entry['node_id']} unregistered)")
        for fingerprint, path in current.items():
            if fingerprint in record:
                lines.append(f"{path.stem} (node {record[fingerprint]['node_id']})")
                continue
            res = self.flwr("supernode", "register", str(path), CONNECTION, "--format", "json")
            detail = cli_error(res)
            if detail and "already in use" in detail.lower():  # registered before this record existed
                lines.append(f"{path.stem} (registered before, node unknown)")
                continue
            if detail:
                raise LaunchError(f"registering the node key {path} failed: {detail}")
            node_id = int((parse_cli_json(res.stdout) or {})["node-id"])
            record[fingerprint] = {"name": path.stem, "node_id": node_id}
            if p.superlink_db == "file":  # what the SuperLink database on disk holds
                atomic_write_text(record_path, json.dumps(record, indent=1))
            lines.append(f"{path.stem} (node {node_id})")
        self.say(f"SuperNode authentication: {len(current)} node key(s) registered: {', '.join(lines)}; other "
                 "SuperNodes are refused")

    # -- the flwr CLI --------------------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = CLI_TIMEOUT_S):
        return run_quiet([flower_command("flwr"), *args], self.cli_env, timeout=timeout, cwd=self.plan.state)

    def submit(self) -> str:
        p = self.plan
        write_app(p.app_dir, p.cfg)
        run_config = p.state / "run-config.toml"
        run_config.write_text(tomli_w.dumps(
            {k.replace("_", "-"): v for k, v in p.cfg.to_run_config().items()
             if k.replace("-", "_") in p.overrides}))
        with contextlib.suppress(FileNotFoundError):
            (p.out / "DONE.json").unlink()  # a previous run's; this run writes its own at the end
        args = ["run", str(p.app_dir), CONNECTION, "--format", "json"]
        if p.overrides:
            args += ["--run-config", str(run_config)]
        res = self.flwr(*args)
        info = parse_cli_json(res.stdout)
        if res.returncode != 0 or not info or not info.get("success") or not info.get("run-id"):
            detail = (info or {}).get("error-message") or (res.stderr.strip() or res.stdout.strip())
            raise LaunchError(f"flwr run failed (exit {res.returncode}): {detail}")
        self.run_id = str(info["run-id"])
        return self.run_id

    def status(self) -> tuple[str, str] | None:
        """('running', '') / ('finished:completed', details) ...; None if `flwr ls` did not answer."""
        res = self.flwr("ls", CONNECTION, "--run-id", str(self.run_id), "--format", "json", timeout=60.0)
        info = parse_cli_json(res.stdout)
        if res.returncode != 0 or not info or not info.get("runs"):
            return None
        run = info["runs"][0]
        return str(run.get("status", "")), str(run.get("status-details", "") or "")

    def stop_run(self) -> None:
        if self.run_id is None or self.finished:
            return
        self.say(f"stopping run {self.run_id} (flwr stop)")
        with contextlib.suppress(Exception):
            self.flwr("stop", str(self.run_id), CONNECTION, timeout=30.0)

    # -- following the run ----------------------------------------------------------------------------------
    def run_log_path(self) -> Path:
        return self.plan.state / f"run-{self.run_id}.log"

    def start_log_stream(self) -> None:
        path = self.run_log_path()
        path.write_bytes(b"")  # `flwr log --stream` starts from the beginning of the run's log
        self.log_stream = ProcessGroup("flwr log", [flower_command("flwr"), "log", str(self.run_id), CONNECTION,
                                                    "--stream"], self.cli_env, log_path=path, cwd=self.plan.state)

    def follow(self) -> tuple[str, str]:
        p = self.plan
        metrics = MetricsTail(p.out / "metrics.jsonl")
        echo = LogFollower(self.run_log_path()) if p.verbose else None
        self.start_log_stream()
        next_poll = time.monotonic() + STATUS_POLL_S
        restarts = 0  # of the log stream, if it breaks off while the run goes on
        while True:
            raise_if_interrupted()
            for record in metrics.poll():
                if not echo:  # with --verbose the ServerApp's own round lines are echoed already
                    self.say(round_line(record, p.cfg.num_rounds))
            if echo:
                echo.poll()
            if self.superlink is not None and self.superlink.poll() is not None:
                raise LaunchError(f"the SuperLink exited unexpectedly (code {self.superlink.poll()}); its log "
                                  f"({self.superlink_log}) ends with: {tail(self.superlink_log, 5)}")
            stream_done = self.log_stream is not None and self.log_stream.poll() is not None
            if stream_done or time.monotonic() >= next_poll:
                state = self.status()
                next_poll = time.monotonic() + STATUS_POLL_S
                if state and state[0].startswith("finished"):
                    self.finished = True
                    time.sleep(0.5)
                    for record in metrics.poll():
                        if not echo:
                            self.say(round_line(record, p.cfg.num_rounds))
                    if self.log_stream is not None:
                        with contextlib.suppress(Exception):
                            self.log_stream.wait(10.0)
                    if echo:
                        echo.poll()
                    return state
                if stream_done:  # the stream ended but the run has not (yet): follow it again, a few times
                    self.log_stream.stop(1.0)
                    self.log_stream = None
                    if restarts < 5:
                        restarts += 1
                        time.sleep(2.0)
                        self.start_log_stream()
            time.sleep(1.0)

    # -- the whole thing -------------------------------------------------------------------------------------
    def run(self) -> int:
        p, cfg = self.plan, self.plan.cfg
        self.start_superlink()
        run_id = self.submit()
        shape = cfg.round_shape()
        self.say(f"run {run_id} submitted: {cfg.num_rounds} rounds, {shape}, evaluating on {cfg.dataset}; output in "
                 f"{p.out}; Flower's CLI sees it with FLWR_HOME={p.flwr_home} flwr ls {CONNECTION}")
        hint_host = p.host if p.host not in ("0.0.0.0", "::") else "THIS-MACHINE"
        security = " --insecure" if p.tls is None else f" --root-certificate {p.tls['ca']}"
        if p.node_keys:
            security += " --key NODE-KEY"
        self.say(f"waiting for at least {cfg.min_nodes} clients; start each with: noprop-client --server "
                 f"{format_address(hint_host, p.port)} --data {cfg.client_data or cfg.dataset} --partition "
                 f"I/{cfg.min_nodes}{security}")
        status, details = self.follow()
        if status == "finished:completed":
            done = read_done(p.out / "DONE.json")
            acc = done.get("accuracy")
            if isinstance(acc, int | float):
                self.say(f"done: final accuracy {100 * acc:.2f}% on {done.get('eval_examples', '?')} test examples")
            else:
                self.say("done")
            self.say(f"checkpoint {p.out / 'checkpoint.pt'}; metrics {p.out / 'metrics.jsonl'}; plots "
                     f"{p.out / 'accuracy.png'}, {p.out / 'ownership.png'}; ServerApp log {self.run_log_path()}")
            return 0
        print(f"{PROG}: error: run {run_id} {status}: {details or 'no details'}", file=sys.stderr)
        log_tail = tail(self.run_log_path(), 30)
        if log_tail:
            print(f"---- last lines of the ServerApp log ({self.run_log_path()}) ----", file=sys.stderr)
            print(log_tail, file=sys.stderr, flush=True)
        return 1

    def shutdown(self) -> None:
        if self.log_stream is not None:
            self.log_stream.stop(2.0)
            self.log_stream = None
        if self.superlink is not None:
            self.say("stopping the SuperLink")
            self.superlink.stop(10.0)
            self.superlink = None



def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = prepare(args)
    except LaunchError as exc:
        return fail(PROG, str(exc))
    except KeyboardInterrupt:
        return 130
    install_signal_handlers()
    server = Server(plan)
    code = 1
    try:
        code = server.run()
    except KeyboardInterrupt as exc:
        shield_signals()
        why = signal.Signals(exc.signum).name if isinstance(exc, Interrupted) else "SIGINT"
        server.say(f"{why}: stopping")
        server.stop_run()
        code = 130
    except LaunchError as exc:
        shield_signals()
        server.stop_run()
        code = fail(PROG, str(exc), 1)
    finally:
        shield_signals()
        server.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
