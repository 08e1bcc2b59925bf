"""The gRPC inference service of `noprop-edge serve`: noprop.v1.Inference and grpc.health.v1 over an EdgeModel.

Apart from deploy/edge.py and deploy/edge_cli.py because it needs noprop.proto (the generated gRPC modules) and
grpcio, which the loose copies of a device do not have; edge_cli.py imports this module only when `serve` runs.
grpcio and grpcio-health-checking are imported when a server is built, so that a missing one is a one-line error.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from noprop.deploy.edge import (
    DEFAULT_MAX_CONCURRENT,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_PORT,
    SERVICE_NAME,
    EdgeError,
    EdgeModel,
    fresh_seed,
    one_line,
    proto_modules,
)

if TYPE_CHECKING:
    import grpc
    from grpc_health.v1.health import HealthServicer


class _Malformed:
    """A request body that did not parse; the handler answers INVALID_ARGUMENT."""

    def __init__(self, error: str):
        self.error = error


def _lenient(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except Exception as exc:  # google.protobuf.message.DecodeError
            return _Malformed(one_line(exc, 100))
    return parse


class InferenceService:
    """noprop.v1.Inference over an EdgeModel; every bad request gets a status code, the server goes on."""

    def __init__(self, model: EdgeModel):
        import grpc

        self.grpc = grpc
        self.pb = proto_modules()[0]
        self.model = model
        self.manifest = model.info.to_manifest(model.path.name, model.sha256, model.size)
        self.requests = 0

    def _invalid(self, context, message: str):
        context.abort(self.grpc.StatusCode.INVALID_ARGUMENT, message)

    def Predict(self, request, context):  # noqa: N802 - gRPC method name
        self.requests += 1
        if isinstance(request, _Malformed):
            self._invalid(context, f"PredictRequest does not parse: {request.error}")
        info = self.model.info
        shape = tuple(int(s) for s in request.shape)
        if len(shape) != len(info.input_shape) + 1 or shape[1:] != info.input_shape or shape[0] < 1:
            self._invalid(context, f"shape {list(shape)} does not match the model's input "
                                   f"[N, {', '.join(map(str, info.input_shape))}] with N >= 1")
        n = shape[0]
        if len(request.pixels) != math.prod(shape):
            self._invalid(context, f"{len(request.pixels)} pixel values for shape {list(shape)} "
                                   f"(needs {math.prod(shape)})")
        x = np.fromiter(request.pixels, dtype=np.float32, count=len(request.pixels)).reshape(shape)
        noise = None
        if len(request.noise):
            if not self.model.stochastic:
                self._invalid(context, "this model is deterministic: send no noise")
            t1, d = info.noise_shape
            if len(request.noise) != t1 * n * d:
                self._invalid(context, f"{len(request.noise)} noise values, the model needs [T + 1, N, d] = "
                                       f"[{t1}, {n}, {d}] = {t1 * n * d}")
            noise = np.fromiter(request.noise, dtype=np.float32, count=len(request.noise)).reshape(t1, n, d)
        drawn = self.model.stochastic and noise is None
        seed = (request.seed if request.HasField("seed") else fresh_seed()) if drawn else None
        try:
            probs, labels = self.model.run(x, noise, rng=None if seed is None else np.random.default_rng(seed))
        except EdgeError as exc:
            self._invalid(context, str(exc))
        response = self.pb.PredictResponse(model_sha256=self.model.sha256, seed=seed)
        for p, label in zip(probs, labels, strict=True):
            response.predictions.add(label=int(label), class_name=info.class_names[int(label)],
                                     probabilities=p.tolist())
        return response

    def ModelInfo(self, request, context):  # noqa: N802 - gRPC method name
        if isinstance(request, _Malformed):
            self._invalid(context, f"ModelInfoRequest does not parse: {request.error}")
        return self.manifest


def build_server(model: EdgeModel, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, workers: int = 4,
                 tls: tuple[bytes, bytes] | None = None,
                 max_concurrent: int = DEFAULT_MAX_CONCURRENT) -> tuple[grpc.Server, HealthServicer, int]:
    """A started-ready grpc.Server with Inference and the standard health service; returns (server, health,
    bound port). Requests over max_request_bytes, and calls beyond max_concurrent in progress or queued for a worker
    thread, are refused by gRPC itself with RESOURCE_EXHAUSTED: queued requests hold at most max_concurrent x
    max_request_bytes. (gRPC frees a call's slot only after its reply is sent, so N clients calling back to back
    need a cap well above N: at 16 clients and a cap of 16, 0.3% of calls were refused.)"""
    from concurrent import futures

    try:
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    except ImportError as exc:
        raise EdgeError(f"serve needs grpcio and grpcio-health-checking ({one_line(exc)}): "
                        "pip install grpcio grpcio-health-checking") from None
    pb = proto_modules()[0]
    service = InferenceService(model)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="noprop-edge"),
        options=[("grpc.max_receive_message_length", max_request_bytes),
                 ("grpc.max_send_message_length", -1),
                 ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=max_concurrent,
    )
    handlers = {
        "Predict": grpc.unary_unary_rpc_method_handler(
            service.Predict, request_deserializer=_lenient(pb.PredictRequest),
            response_serializer=pb.PredictResponse.SerializeToString),
        "ModelInfo": grpc.unary_unary_rpc_method_handler(
            service.ModelInfo, request_deserializer=_lenient(pb.ModelInfoRequest),
            response_serializer=pb.ModelManifest.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    address = f"{host}:{port}"
    try:
        if tls is not None:
            bound = server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])]))
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise EdgeError(f"cannot listen on {address} ({one_line(exc, 100)}): is the port in use?") from None
    if not bound:
        raise EdgeError(f"cannot listen on {address}: is the port in use?")
    return server, health_servicer, bound


def serve(model: EdgeModel, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, workers: int = 4, grace: float = 5.0,
          tls: tuple[bytes, bytes] | None = None, max_concurrent: int = DEFAULT_MAX_CONCURRENT) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully: health turns NOT_SERVING, new calls are refused,
    calls in flight get `grace` seconds to finish."""
    server, health_servicer, bound = build_server(model, host, port, max_request_bytes, workers, tls, max_concurrent)
    stop = threading.Event()
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, lambda *_: stop.set())
    server.start()
    try:
        print(f"noprop-edge serve: listening on {host}:{bound} ({'TLS' if tls else 'insecure'}) with "
              f"{model.path.name} ({model.info.summary()}); max request {max_request_bytes} bytes, {workers} request "
              f"threads, at most {max_concurrent} calls at once", flush=True)
        while not stop.wait(0.25):
            pass
        print("noprop-edge serve: shutting down", file=sys.stderr, flush=True)
        health_servicer.enter_graceful_shutdown()
        server.stop(grace).wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("noprop-edge serve: stopped", file=sys.stderr, flush=True)


def serve_command(args: argparse.Namespace) -> int:
    """`noprop-edge serve`: its flags checked before the model loads (a bad flag is not a slow error), then serve."""
    from noprop.ops.network import is_loopback  # the package is here anyway; imported when serve runs, no torch there

    tls = None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise EdgeError("give both --tls-cert and --tls-key, or neither")
    if args.tls_cert:
        try:
            tls = (Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes())
        except OSError as exc:
            raise EdgeError(f"cannot read the TLS files ({one_line(exc, 100)})") from None
    elif not is_loopback(args.host) and not args.insecure:
        raise EdgeError(f"--host {args.host} opens the service to the network: give --tls-cert/--tls-key, "
                        "or --insecure to serve without TLS")
    if args.workers < 1 or args.max_concurrent < args.workers:
        raise EdgeError(f"--workers {args.workers} and --max-concurrent {args.max_concurrent}: need at least 1 "
                        "worker and --max-concurrent at least --workers")
    if args.max_request_bytes < 1024:
        raise EdgeError("--max-request-bytes must be at least 1024")
    if not 0 <= args.port <= 65535:
        raise EdgeError(f"--port {args.port} is not a port number")
    model = EdgeModel(args.model, threads=args.threads, arena=not args.no_arena)
    serve(model, args.host, args.port, args.max_request_bytes, args.workers, args.grace, tls, args.max_concurrent)
    return 0
