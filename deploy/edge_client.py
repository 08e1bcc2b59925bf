"""The client of `noprop-edge query`: call a running `noprop-edge serve` and print its answers.

Apart from deploy/edge.py and deploy/edge_cli.py because it needs noprop.proto (the generated gRPC modules) and
grpcio, which the loose copies of a device do not have; edge_cli.py imports this module only when `query` runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from noprop.deploy.edge import SERVICE_NAME, EdgeError, one_line, proto_modules
from noprop.deploy.edge_data import load_images, print_predictions


class RemoteError(EdgeError):
    """A failed RPC: exit 1, not 2 (the input was fine, the call was not). An EdgeError, so that edge_cli.py's main
    reports it in one line without naming this module."""

    exit_code = 1


def query(target: str, paths: list[str], show_info: bool = False, health_check: bool = False,
          timeout: float = 10.0, resize: bool = False, convert: bool = False, seed: int | None = None,
          as_json: bool = False, tls_ca: bytes | None = None) -> int:
    """Call a running `noprop-edge serve` (over TLS when tls_ca, the server's CA certificate, is given). seed None:
    a stochastic server draws one and reports it (printed, so the call can be repeated)."""
    try:
        import grpc
    except ImportError:
        raise EdgeError("query needs grpcio: pip install grpcio") from None
    pb, pb_grpc = proto_modules()
    options = [("grpc.max_receive_message_length", -1)]
    if tls_ca is not None:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=tls_ca), options)
    else:
        channel = grpc.insecure_channel(target, options)
    try:
        if health_check:
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout)
            print(f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
            if not paths and not show_info:
                return 0
        stub = pb_grpc.InferenceStub(channel)
        manifest = stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout)
        if show_info or not paths:
            from google.protobuf import json_format

            print(json_format.MessageToJson(manifest, preserving_proto_field_name=True, indent=2))
            if not paths:
                return 0
        shape = tuple(manifest.input_shape)
        x = load_images(paths, shape, resize, convert)
        request = pb.PredictRequest(shape=list(x.shape), pixels=x.ravel().tolist(), seed=seed)
        reply = stub.Predict(request, timeout=timeout)
        used = reply.seed if reply.HasField("seed") else None
    except grpc.RpcError as exc:
        raise RemoteError(f"{target}: {exc.code().name}: {one_line(exc.details())}") from None
    finally:
        channel.close()
    results = [{"file": str(p), "label": r.label, "class": r.class_name,
                "probability": float(r.probabilities[r.label])} for p, r in zip(paths, reply.predictions, strict=True)]
    print_predictions(results, as_json, used, drawn=seed is None)
    return 0


def query_command(args: argparse.Namespace) -> int:
    """`noprop-edge query`: read --tls-ca, then call the server."""
    try:
        ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    except OSError as exc:
        raise EdgeError(f"cannot read --tls-ca ({one_line(exc, 100)})") from None
    return query(args.target, args.images, args.info, args.health, args.timeout, args.resize, args.convert,
                 args.seed, args.json, ca)
