"""`noprop-server --superlink-db memory` SIGKILLed mid-run and started again with --resume, under live clients:
the restarted SuperLink has forgotten every node, each noprop-client starts its SuperNode again, which joins as a
new node, and the run finishes from the checkpoint with all of them."""

from __future__ import annotations

import pytest
from procs import Spawned, alive, cleanup_all, descendants, quiet_env, wait_for
from test_e2e import NUM_CLIENTS, Federation, npz  # noqa: F401 - fixture

from noprop.ops.network import port_free

pytestmark = pytest.mark.e2e
ROUNDS = 2  # killed after round 1; the resumed run trains round 2 with every client back


def test_clients_rejoin_a_server_restarted_in_memory(tmp_path, npz):  # noqa: F811
    fed = Federation(tmp_path, npz, rounds=ROUNDS, extra=["--superlink-db", "memory", "--round-timeout", "120"])
    resumed = None
    try:
        wait_for(lambda: fed.metrics() or fed.server.proc.poll() is not None, 300, what="round 1's metrics line")
        assert fed.metrics(), fed.report()
        cmd = list(fed.server.proc.args)
        ports = [int(cmd[cmd.index(flag) + 1]) for flag in ("--port", "--control-port")]
        tree = descendants(fed.server.pid) | {fed.server.pid}
        fed.server.proc.kill()
        wait_for(lambda: not any(alive(p) for p in tree) and all(port_free("127.0.0.1", p) for p in ports), 60,
                 what="the killed server's processes and ports gone")
        resumed = Spawned([*cmd, "--resume"], tmp_path / "server-resumed.log", quiet_env(), cwd=tmp_path)
        wait_for(lambda: resumed.proc.poll() is not None, 600, interval=1.0, what="the resumed run to end")
        assert resumed.proc.returncode == 0, resumed.text()[-4000:] + fed.report()
        assert all(c.proc.poll() is None for c in fed.clients), fed.report()  # no client launcher gave up
    finally:
        cleanup_all([*fed.clients, fed.server, *([resumed] if resumed else [])])
    records = fed.metrics()
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1)), records
    first_nodes = set(records[0]["nodes"])
    last = records[-1]
    # every client came back, as a new node (the SuperLink in memory had forgotten the old ids)
    assert len(last["trained_by"]) == NUM_CLIENTS and not set(last["trained_by"]) & first_nodes, (records[0], last)
    for c in fed.clients:
        assert "joining again as a new node" in c.text(), c.text()[-3000:]
