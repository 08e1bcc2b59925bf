"""TLS and SuperNode authentication, with real processes on loopback: `noprop-certs` output, the launchers'
security flags, and one TLS federation with registered node keys in which two clients train (one through a relay
that records every byte: TLS records only, no plain text; the same relay in front of an --insecure server does see
HTTP/2 in the clear), while clients that trust another CA and a client whose key is not registered are refused."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import sqlite3
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from procs import Relay, Spawned, cleanup_all, quiet_env, script, wait_for, write_synthetic_npz

from noprop.client import launcher as client_launcher
from noprop.io import read_jsonl
from noprop.ops import preflight
from noprop.ops import server_cli as server_launcher
from noprop.ops.certs import authorized_keys, check_server_certificates, speaks_tls, tls_handshake
from noprop.ops.network import free_port

pytestmark = pytest.mark.e2e  # noprop-certs, noprop-server, noprop-client and Flower's SuperNode as processes

SMALL = ["--T", "2", "--channels", "4,8,8", "--hidden", "16", "--batch-size", "32", "--local-epochs", "1",
         "--eval-limit", "0", "--client-threads", "1", "--rounds", "1"]
H2_PREFACE = b"PRI * HTTP/2.0"
PLAINTEXT_MARKERS = (H2_PREFACE, b"blocks.", b"flwr.proto", b"application/grpc", b"npz:")


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    return write_synthetic_npz(tmp_path_factory.mktemp("data") / "task.npz", 600, 200)


def noprop_certs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([script("noprop-certs"), *args], capture_output=True, text=True, env=quiet_env(),
                          timeout=120)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pki") / "certs"
    res = noprop_certs(str(folder), "--host", "server.test", "--host", "10.9.8.7", "--clients", "4")
    assert res.returncode == 0, res.stderr
    return folder


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> Path:
    """A second, unrelated CA: clients that trust it must refuse the server."""
    folder = tmp_path_factory.mktemp("pki") / "other"
    assert noprop_certs(str(folder)).returncode == 0
    return folder


# ----------------------------------------------------------------------------------------------------------
# noprop-certs


def test_certificates_verify_against_the_ca_with_every_name(certs):
    from cryptography import x509
    from cryptography.x509 import DNSName, IPAddress
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((certs / "server.crt").read_bytes())
    store = Store([ca])
    import ipaddress

    for name in (DNSName("server.test"), DNSName("localhost"), IPAddress(ipaddress.ip_address("127.0.0.1")),
                 IPAddress(ipaddress.ip_address("10.9.8.7")), IPAddress(ipaddress.ip_address("::1"))):
        chain = PolicyBuilder().store(store).build_server_verifier(name).verify(server, [])
        assert chain[-1] == ca, name
    with pytest.raises(VerificationError):  # a name it was not made for
        PolicyBuilder().store(store).build_server_verifier(DNSName("elsewhere.test")).verify(server, [])
    other = x509.load_pem_x509_certificate(noprop_other_ca_cert(certs.parent))
    with pytest.raises(VerificationError):  # and another CA does not vouch for it
        PolicyBuilder().store(Store([other])).build_server_verifier(DNSName("localhost")).verify(server, [])


def noprop_other_ca_cert(where: Path) -> bytes:
    folder = where / "unrelated"
    if not (folder / "ca.crt").exists():
        assert noprop_certs(str(folder)).returncode == 0
    return (folder / "ca.crt").read_bytes()


def test_private_keys_are_0600_and_node_keys_load_in_flower(certs):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    secret = [certs / "ca.key", certs / "server.key", *(certs / "clients" / f"client{i}" for i in range(4))]
    public = [certs / "ca.crt", certs / "server.crt", *(certs / "clients" / f"client{i}.pub" for i in range(4))]
    for path in secret:
        assert path.stat().st_mode & 0o777 == 0o600, path
    for path in public:
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert not [p for p in certs.rglob("*") if p.name.endswith(".tmp")], "temporary files left behind"
    for i in range(4):  # Flower's own loaders: `flwr supernode register` and flower-supernode's private key
        registered = try_load_public_key(certs / "clients" / f"client{i}.pub")
        private = load_ssh_private_key((certs / "clients" / f"client{i}").read_bytes(), None)
        assert public_key_to_bytes(private.public_key()) == registered
        assert private.curve.name == "secp384r1"


def test_existing_ca_is_kept_unless_forced(tmp_path):
    folder = tmp_path / "certs"
    assert noprop_certs(str(folder)).returncode == 0
    before = (folder / "ca.crt").read_bytes()
    res = noprop_certs(str(folder), "--clients", "1")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "ca.crt exists" in res.stderr and "--force" in res.stderr
    assert (folder / "ca.crt").read_bytes() == before and not (folder / "clients").exists()
    res = noprop_certs(str(folder), "--force", "--client", "edge-1")
    assert res.returncode == 0, res.stderr
    assert (folder / "ca.crt").read_bytes() != before and (folder / "clients" / "edge-1.pub").exists()


# ----------------------------------------------------------------------------------------------------------
# The launchers' security flags (one line, exit 2, nothing started)


def one_line_exit_2(main, argv, capsys) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


def copy_without(certs: Path, dest: Path, missing: str) -> Path:
    shutil.copytree(certs, dest)
    (dest / missing).unlink()
    return dest


def foreign_server_certificate(certs: Path, other_ca: Path, dest: Path) -> Path:
    """This ca.crt beside a server certificate (and its key) that another CA signed."""
    shutil.copytree(certs, dest)
    for name in ("server.crt", "server.key"):
        shutil.copy(other_ca / name, dest / name)
    return dest


@pytest.mark.parametrize("case", ["neither", "both", "keys-without-tls", "missing-key", "missing-ca",
                                  "foreign-cert", "no-pub-files"])
def test_server_security_flags(case, certs, other_ca, npz, tmp_path, capsys):
    base = ["--port", str(free_port()), "--control-port", str(free_port()), "--out", str(tmp_path / "out"),
            "--dataset", f"npz:{npz}"]
    cases = {
        "neither": lambda: ([], "pass --certificates DIR"),
        "both": lambda: (["--certificates", str(certs), "--insecure"], "contradict"),
        "keys-without-tls": lambda: (["--insecure", "--authorized-keys", str(certs / "clients")],
                                     "needs --certificates"),
        "missing-key": lambda: (["--certificates", str(copy_without(certs, tmp_path / "c", "server.key"))],
                                "server.key does not exist"),
        "missing-ca": lambda: (["--certificates", str(copy_without(certs, tmp_path / "c", "ca.crt"))],
                               "ca.crt does not exist"),
        "no-pub-files": lambda: (["--certificates", str(certs), "--authorized-keys", str(tmp_path)], "no *.pub"),
        "foreign-cert": lambda: (["--certificates", str(foreign_server_certificate(certs, other_ca, tmp_path / "c"))],
                                 "is not signed by"),
    }
    argv, expected = cases[case]()
    err = one_line_exit_2(server_launcher.main, [*base, *argv], capsys)
    assert err.startswith("noprop-server: error:") and expected in err, err
    if case == "neither":
        assert "--insecure" in err and "noprop-certs" in err


@pytest.mark.parametrize("case", ["neither", "both", "key-without-tls", "missing-root", "key-pair-mismatch"])
def test_client_security_flags(case, certs, npz, tmp_path, capsys):
    base = ["--server", f"127.0.0.1:{free_port()}", "--data", f"npz:{npz}", "--wait", "0"]
    if case == "key-pair-mismatch":  # client0's private key beside client1's public key
        shutil.copy(certs / "clients" / "client0", tmp_path / "k")
        shutil.copy(certs / "clients" / "client1.pub", tmp_path / "k.pub")
    argv, expected = {
        "neither": ([], "pass --root-certificate FILE"),
        "both": (["--root-certificate", str(certs / "ca.crt"), "--insecure"], "contradict"),
        "key-without-tls": (["--insecure", "--key", str(certs / "clients" / "client0")], "needs --root-certificate"),
        "missing-root": (["--root-certificate", str(tmp_path / "nope.crt")], "nope.crt does not exist"),
        "key-pair-mismatch": (["--root-certificate", str(certs / "ca.crt"), "--key", str(tmp_path / "k")],
                              "is not the public key of"),
    }[case]
    err = one_line_exit_2(client_launcher.main, [*base, *argv], capsys)
    assert err.startswith("noprop-client: error:") and expected in err, err


# ----------------------------------------------------------------------------------------------------------
# Real federations on loopback


def start_server(tmp: Path, npz: Path, security: list[str], min_clients: int) -> tuple[Spawned, int, Path]:
    fleet, control = free_port(), free_port()
    while control == fleet:
        control = free_port()
    out = tmp / "out"
    server = Spawned([script("noprop-server"), "--port", str(fleet), "--control-port", str(control),
                      "--min-clients", str(min_clients), "--dataset", f"npz:{npz}", "--out", str(out), *SMALL,
                      *security], tmp / "server.log", quiet_env(), cwd=tmp)
    return server, fleet, out


def wait_submitted(server: Spawned) -> None:
    wait_for(lambda: "waiting for at least" in server.text() or server.proc.poll() is not None, 240,
             what="the server's run submission")
    assert server.proc.poll() is None, server.text()


def start_client(tmp: Path, npz: Path, name: str, port: int, security: list[str], partition: str = "0/2") -> Spawned:
    return Spawned([script("noprop-client"), "--server", f"127.0.0.1:{port}", "--data", f"npz:{npz}",
                    "--partition", partition, "--threads", "1", "--wait", "120", "--state-dir", str(tmp / name),
                    *security], tmp / f"{name}.log", quiet_env(tmp / name), cwd=tmp)


def wait_exit(p: Spawned, timeout: float) -> int:
    try:
        return p.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{p.log.name} still running after {timeout:.0f}s:\n{p.text()[-3000:]}")


def registered_nodes(server_log: str) -> dict[str, int]:
    """Node key name -> node id, from the server's "node key(s) registered: client0 (node 123), ..." line."""
    line = next((x for x in server_log.splitlines() if "node key(s) registered" in x), "")
    return {name: int(node) for name, node in re.findall(r"(\S+) \(node (\d+)\)", line)}


def superlink_nodes(state: Path) -> dict[int, tuple[str, str | None]]:
    """Every node the SuperLink's database (--superlink-db file, in --state-dir) knows: id -> (status, when it was
    last activated). Flower stores the unsigned 64-bit node ids as signed ones."""
    (db_path,) = state.rglob("superlink.db")
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        rows = db.execute("SELECT node_id, status, last_activated_at FROM node").fetchall()
    return {(n + 2**64 if n < 0 else n): (status, activated) for n, status, activated in rows}


@dataclass
class SecureRun:
    code: int
    records: list[dict]
    nodes: dict[str, int]  # registered key name -> node id
    clients: dict[str, Spawned]
    relay: Relay
    report: str
    server_log: str
    superlink_nodes: dict[int, tuple[str, str | None]]  # the SuperLink's node table: id -> (status, last activated)


def prime_state(state: Path, certs: Path, keys: Path, out: Path) -> None:
    """What an earlier noprop-server with these --authorized-keys and this --state-dir leaves behind: a SuperLink
    database with the keys registered (only the SuperLink is started, in this process; no run)."""
    from noprop.federation import FederationConfig

    fleet, control = free_port(), free_port()
    while control == fleet:
        control = free_port()
    plan = preflight.Plan(
        cfg=FederationConfig(out=str(out)), overrides={}, host="127.0.0.1", port=fleet, control_port=control,
        state=state, verbose=False, startup_timeout=180.0, tls=check_server_certificates(certs),
        node_keys=tuple(authorized_keys(keys)))
    server = server_launcher.Server(plan)
    try:
        server.start_superlink()
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory, npz, certs, other_ca):
    """One federation for the four tests below (a Flower run costs minutes on a loaded machine). An earlier
    server on the same --state-dir registered client2, whose key has left --authorized-keys since. noprop-server
    starts with --certificates and --authorized-keys holding client0.pub and client1.pub: client0 connects
    directly, client1 through a recording relay; at the same time a noprop-client and a bare flower-supernode
    that trust another CA, and bare flower-supernodes with the removed key client2 and the never registered key
    client3 (the right CA) try to join."""
    tmp = tmp_path_factory.mktemp("secure")
    keys, state = tmp / "authorized", tmp / "state"
    keys.mkdir()
    shutil.copy(certs / "clients" / "client2.pub", keys)
    prime_state(state, certs, keys, tmp / "out")
    (keys / "client2.pub").unlink()
    for name in ("client0.pub", "client1.pub"):
        shutil.copy(certs / "clients" / name, keys)
    server, fleet, out = start_server(tmp, npz, ["--certificates", str(certs), "--authorized-keys", str(keys),
                                                 "--state-dir", str(state)], min_clients=2)
    relay = Relay(fleet)
    clients: dict[str, Spawned] = {}

    def bare_supernode(name: str, flags: list[str]) -> Spawned:
        return Spawned([script("flower-supernode"), *flags, "--superlink", f"127.0.0.1:{fleet}", "--port",
                        str(free_port()), "--max-retries", "3"], tmp / f"{name}.log", quiet_env(tmp / name), cwd=tmp)

    try:
        wait_submitted(server)
        trust = ["--root-certificate", str(certs / "ca.crt")]
        clients["direct"] = start_client(tmp, npz, "direct", fleet, [*trust, "--key", str(certs / "clients/client0")])
        clients["relayed"] = start_client(tmp, npz, "relayed", relay.port,
                                          [*trust, "--key", str(certs / "clients/client1")], "1/2")
        clients["wrong-ca"] = start_client(tmp, npz, "wrong-ca", fleet, ["--root-certificate",
                                                                         str(other_ca / "ca.crt")])
        clients["wrong-ca-supernode"] = bare_supernode("wrong-ca-supernode",
                                                       ["--root-certificates", str(other_ca / "ca.crt")])
        for name, key in (("removed-key", "client2"), ("unknown-key", "client3")):
            clients[name] = bare_supernode(name, ["--root-certificates", str(certs / "ca.crt"),
                                                  "--auth-supernode-private-key", str(certs / "clients" / key)])
        code = wait_exit(server, 480)
        records = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
        report = "\n".join([f"--- server ---\n{server.text()[-3000:]}",
                            *(f"--- {name} ---\n{c.text()[-1500:]}" for name, c in clients.items())])
        yield SecureRun(code, records, registered_nodes(server.text()), clients, relay, report, server.text(),
                        superlink_nodes(state))
    finally:
        relay.close()
        cleanup_all([*clients.values(), server])


def test_tls_federation_with_node_keys_completes_a_run(secure_run):
    run = secure_run
    assert run.code == 0, run.report
    assert sorted(run.nodes) == ["client0", "client1"], run.report  # both keys registered before the run
    assert [r["round"] for r in run.records] == [1], run.report
    # exactly the two registered nodes got work and trained, none of the four others
    assert sorted(run.records[0]["nodes"]) == sorted(run.nodes.values()), run.records
    assert all(run.records[0]["num_examples"][str(n)] > 0 for n in run.nodes.values()), run.records
    assert all("SuperNode ID" in run.clients[name].text() for name in ("direct", "relayed")), run.report


def test_clients_trusting_another_ca_are_refused(secure_run):
    launcher, supernode = secure_run.clients["wrong-ca"], secure_run.clients["wrong-ca-supernode"]
    assert wait_exit(launcher, 60) == 2, launcher.text()  # checked before its SuperNode starts: one line
    assert "TLS with the server" in launcher.text() and "not trusted" in launcher.text(), launcher.text()
    assert "starting a Flower SuperNode" not in launcher.text()
    assert wait_exit(supernode, 60) != 0, supernode.text()  # and Flower itself refuses the handshake
    assert "CERTIFICATE_VERIFY_FAILED" in supernode.text() and "SuperNode ID" not in supernode.text()


def test_unregistered_node_keys_cannot_join(secure_run):
    assert "client2 removed (node" in secure_run.server_log, secure_run.server_log  # unregistered on restart
    # the SuperLink's own node table: the two registered keys' nodes, and the removed key's node unregistered and
    # never activated; no node at all for the never registered key
    removed = int(re.search(r"client2 removed \(node (\d+)", secure_run.server_log).group(1))
    nodes = secure_run.superlink_nodes
    assert set(nodes) == {*secure_run.nodes.values(), removed}, (nodes, secure_run.nodes)
    assert nodes[removed][0] == "unregistered" and nodes[removed][1] in (None, ""), nodes
    assert all(nodes[n][1] for n in secure_run.nodes.values()), nodes  # those two were activated
    for name in ("removed-key", "unknown-key"):  # right CA, key unknown to the SuperLink: refused, exit at once
        client = secure_run.clients[name]
        assert wait_exit(client, 60) != 0, client.text()
        assert "Failed to activate SuperNode" in client.text() and "SuperNode ID" not in client.text(), client.text()


def test_traffic_through_a_relay_is_tls_only(secure_run):
    up, down = secure_run.relay.streams("up"), secure_run.relay.streams("down")
    assert up and down, "nothing went through the relay"
    for stream in up:  # the client's TLS probe and its SuperNode's gRPC connections
        assert stream[:2] == b"\x16\x03", f"a connection that does not start with a TLS handshake: {stream[:32]!r}"
    for marker in PLAINTEXT_MARKERS:
        assert not any(marker in s for s in up + down), f"{marker!r} crossed the relay in plain text"
    assert secure_run.code == 0 and secure_run.records, secure_run.report
    sent = secure_run.records[0]["bytes_to"][str(secure_run.nodes["client1"])]  # the blocks sent to client1
    assert sum(map(len, down)) > sent, "the relayed client's model traffic did not go through the relay"


def test_relay_sees_plain_http2_without_tls(tmp_path, npz):
    """The check above can fail: in front of a SuperLink without TLS (the one noprop-server --insecure starts; bare
    here, as no run is needed), the same relay reads the HTTP/2 preface of noprop-client --insecure in the clear."""
    fleet, control = free_port(), free_port()
    while control == fleet:
        control = free_port()
    superlink = Spawned([script("flower-superlink"), "--insecure", "--fleet-api-address", f"127.0.0.1:{fleet}",
                         "--host", "127.0.0.1", "--port", str(control)], tmp_path / "superlink.log", quiet_env(),
                        cwd=tmp_path)
    relay = Relay(fleet)
    client = start_client(tmp_path, npz, "plain", relay.port, ["--insecure"])  # it waits for the SuperLink
    try:
        wait_for(lambda: any(H2_PREFACE in s for s in relay.streams("up")) or client.proc.poll() is not None
                 or superlink.proc.poll() is not None, 240, what="the client's first gRPC bytes through the relay")
        assert any(s.startswith(H2_PREFACE) for s in relay.streams("up")), (relay.streams("up"), client.text(),
                                                                            superlink.text()[-2000:])
    finally:
        relay.close()
        cleanup_all([client, superlink])


def test_plain_text_beyond_loopback_needs_insecure_and_warns(npz, tmp_path, capsys):
    """--insecure on a reachable address is allowed but said out loud, before anything starts (a bad value given
    with it then stops the launcher)."""
    ports = ["--port", str(free_port()), "--control-port", str(free_port()), "--startup-timeout", "0"]
    code = server_launcher.main(["--host", "0.0.0.0", "--insecure", *ports, "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 2 and "WARNING" in out and "without TLS" in out, out
    code = server_launcher.main(["--host", "127.0.0.1", "--insecure", *ports, "--out", str(tmp_path / "out")])
    assert code == 2 and "WARNING" not in capsys.readouterr().out  # this machine only: no warning
    code = client_launcher.main(["--server", "10.255.255.1:9092", "--insecure", "--data", f"npz:{npz}",
                                 "--partition", "5/2"])
    out = capsys.readouterr().out
    assert code == 2 and "WARNING" in out and "not encrypted" in out, out



def test_client_tls_probe_tells_trusted_untrusted_and_plain_servers_apart(certs, other_ca):
    """noprop-client's check before it starts a SuperNode, against a TLS server holding noprop-certs' server
    certificate (Python's ssl here; the federation test above meets Flower's) and a plain TCP server."""
    import ssl as ssl_module

    context = ssl_module.SSLContext(ssl_module.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "server.crt", certs / "server.key")
    context.set_alpn_protocols(["h2"])
    tls_listener, plain_listener = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))

    def serve(listener: socket.socket, wrap: bool) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with contextlib.suppress(OSError), conn:
                if wrap:
                    with context.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1)  # until the client closes
                else:
                    conn.recv(1024)
                    conn.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00")  # an HTTP/2 frame, as gRPC would answer

    for listener, wrap in ((tls_listener, True), (plain_listener, False)):
        threading.Thread(target=serve, args=(listener, wrap), daemon=True).start()
    tls_port, plain_port = tls_listener.getsockname()[1], plain_listener.getsockname()[1]
    try:
        assert tls_handshake("127.0.0.1", tls_port, certs / "ca.crt") is None
        assert tls_handshake("localhost", tls_port, certs / "ca.crt") is None
        assert "not trusted" in tls_handshake("127.0.0.1", tls_port, other_ca / "ca.crt")
        assert "no TLS handshake" in tls_handshake("127.0.0.1", plain_port, certs / "ca.crt")
        assert speaks_tls("127.0.0.1", tls_port) and not speaks_tls("127.0.0.1", plain_port)
    finally:
        tls_listener.close()
        plain_listener.close()
