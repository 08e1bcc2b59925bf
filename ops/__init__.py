"""Operations: starting, watching and stopping Flower's processes, their network, flags and security.

Not the method: noprop (shared/) holds NoProp itself, its data and records; this subpackage holds what the
console scripts (noprop-server, noprop-client, noprop-sim, noprop-certs) need around it to run a federation, and
the command lines of noprop-server, noprop-sim, noprop-train and noprop-data. It imports only noprop and itself:
the ServerApp and ClientApp it names by their Flower references (ops.flower_app), as the deployment does.
"""
