"""The server process: engine + gRPC (Inference, health, reflection) + the OpenAI-compatible HTTP API +
/metrics, and a graceful drain.

Lifecycle: bind the gRPC, HTTP and metrics ports (a port in use exits at once, before the model loads)
-> load the model -> warm up (a base and an adapter request) -> start the engine thread -> serve gRPC
and HTTP, report SERVING -> on SIGTERM/SIGINT: health NOT_SERVING (HTTP /health 503), new calls
UNAVAILABLE (HTTP 503), running gRPC and HTTP streams get --shutdown-grace seconds to finish -> stop ->
exit 0.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kernels import cpu_ext
from server.errors import ModelLoadError
from proto import tessera_pb2 as pb
from server.api.auth import Auth
from server.api.frontend import Frontend
from server.api.openai.http_server import HttpServer, bind
from server.api.openai.routes import create_app
from server.api.service import InferenceService
from server.api.wire import add_inference_service
from server.config import EngineConfig
from server.engine.async_engine import AsyncEngine
from server.engine.warmup import warm_up
from server.interpreter import freeze_startup_heap
from server.metrics import Metrics

log = logging.getLogger("tessera.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str | None = None  # None = same as host
    metrics_port: int | None = 9400  # None = no metrics endpoint
    http_port: int | None = 8000  # the OpenAI-compatible API on host; None = off
    served_model_name: str | None = None  # the base model's name in the HTTP API; None = the model's own
    auth: Auth = Auth()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set = mutual TLS, clients must present a certificate it signed
    max_message_bytes: int = 4 << 20
    shutdown_grace_s: float = 30.0
    max_concurrent_rpcs: int | None = None


def _credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    if cfg.tls_cert is None:
        return None
    key, cert = cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes()
    ca = cfg.tls_client_ca.read_bytes() if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _engine_gauges(engine: AsyncEngine | None) -> dict | None:
    if engine is None:  # still loading: only the counters
        return None
    s = engine.stats()
    return {**vars(s), "weight_bytes": engine.engine.weight_bytes, "max_loras": engine.engine.cfg.max_loras}


def _bind(server: grpc.aio.Server, address: str, creds) -> int:
    try:
        port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError:  # grpc >= 1.6x raises "Failed to bind" instead of returning 0
        port = 0
    if port == 0:
        raise SystemExit(f"cannot listen on {address}: port {address.rsplit(':', 1)[-1]} is in use "
                         "(or the address is not local); pick another with --port / --host")
    return port


def _load_engine(engine_cfg: EngineConfig) -> AsyncEngine:
    engine = AsyncEngine.from_config(engine_cfg)
    warm_up(engine.engine)
    return engine


async def serve(engine_cfg: EngineConfig, cfg: ServerConfig) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", cfg.max_message_bytes),
                                      ("grpc.max_send_message_length", cfg.max_message_bytes),
                                      ("grpc.so_reuseport", 0)],
                             maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
    address = f"{cfg.host}:{cfg.port}"
    creds = _credentials(cfg)
    port = _bind(server, address, creds)  # before the model loads: a taken port fails in a second
    http_sock = bind(cfg.host, cfg.http_port) if cfg.http_port is not None else None
    engine: AsyncEngine | None = None  # the gauges read it once it is loaded
    metrics = Metrics(lambda: _engine_gauges(engine))
    if cfg.metrics_port is not None:
        mhost = cfg.metrics_host or cfg.host
        try:
            mport = metrics.serve(mhost, cfg.metrics_port)
        except OSError as exc:
            raise SystemExit(f"cannot serve metrics on {mhost}:{cfg.metrics_port}: {exc.strerror or exc} "
                             "(pick another --metrics-port, or -1 to disable)") from None
        log.info("metrics on http://%s:%d/metrics", mhost, mport)

    try:
        engine = await asyncio.to_thread(_load_engine, engine_cfg)
    except ModelLoadError as exc:
        metrics.close()
        if http_sock is not None:
            http_sock.close()
        raise SystemExit(f"cannot load the model: {exc}") from None
    cpu_ext.log_status()
    await engine.start()
    engine.engine.adapters.observer = metrics
    frontend = Frontend(engine, cfg.auth, metrics, engine_cfg.default_max_new_tokens,
                        cfg.served_model_name or engine.model_config.name)
    add_inference_service(InferenceService(frontend), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    await server.start()
    http = None
    if http_sock is not None:
        http = HttpServer(create_app(frontend), http_sock, cfg.max_message_bytes)
        await http.start()
        log.info("OpenAI-compatible API on http://%s:%d/v1 (model %r)", cfg.host, http_sock.getsockname()[1],
                 frontend.served_model_name)
    # the drain handlers go in before SERVING: a SIGTERM right after readiness (an orchestrator, a test) drains
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    freeze_startup_heap()  # before SERVING: collections never walk what startup built
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s:%d (%s)", engine.model_config.name, cfg.host, port, "TLS" if creds else "plaintext")
    await stop.wait()

    log.info("draining: NOT_SERVING, refusing new calls, %d streams get up to %.0fs to finish",
             frontend.active_streams, cfg.shutdown_grace_s)
    frontend.draining = True
    await health_servicer.enter_graceful_shutdown()
    try:
        await asyncio.wait_for(frontend.wait_idle(), timeout=cfg.shutdown_grace_s)
    except asyncio.TimeoutError:
        log.warning("grace period over: cancelling %d streams", frontend.active_streams)
    if http is not None:
        await http.stop()
    await server.stop(grace=1.0)
    await engine.shutdown()
    metrics.close()
    log.info("stopped")
