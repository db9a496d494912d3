"""The Serve application: `Router` (ingress, no CPU) -> `TesseraReplica` x N (an engine each).

`application(...)` builds it from the same configuration as `python -m server`; `build_app(args)` is the
import path for a Serve config file (`serve run deploy/ray/tessera.yaml`), taking `python -m server` flags.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ray import serve

from server.ray.replica import TesseraReplica
from server.ray.router import Router

ROOT = Path(__file__).resolve().parent.parent.parent
GRPC_SERVICER = "proto.tessera_pb2_grpc.add_InferenceServicer_to_server"


def runtime_env() -> dict:
    """Replicas import this checkout first (its `proto` package, not proto-plus's, which Ray's dependencies
    install under the same name) and use the driver's node address settings."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def _replica_class(max_adapters: int):
    class Replica(TesseraReplica):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def adapter(self, adapter_id: str):
            return await self.hold(adapter_id)

    Replica.__name__ = Replica.__qualname__ = "TesseraReplica"
    return Replica


def application(engine_cfg, auth, *, replicas: int = 2, max_adapters: int = 8, cpus_per_replica: float = 1.0,
                threads: int = 1, default_max_new_tokens: int = 256, served_model_name: str | None = None):
    """engine_cfg: an EngineConfig (each replica builds its engine from it); auth: server.api.auth.Auth."""
    replica = serve.deployment(
        _replica_class(max_adapters), name="TesseraReplica", num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica, "runtime_env": runtime_env()},
        max_ongoing_requests=max(8, engine_cfg.max_queue), health_check_period_s=5, health_check_timeout_s=30,
        graceful_shutdown_timeout_s=30)
    router = serve.deployment(serve.ingress()(Router), name="Router", max_ongoing_requests=10_000,
                              ray_actor_options={"num_cpus": 0, "runtime_env": runtime_env()})
    auth_kw = {"admin_token": auth.admin_token, "api_key": auth.api_key,
               "allow_unauthenticated_admin": auth.allow_unauthenticated_admin}
    return router.bind(replica.bind(dataclasses.asdict(engine_cfg), threads), auth_kw, default_max_new_tokens,
                       served_model_name)


def build_app(args: dict):
    """Serve config entry point: args = {"server_args": [python -m server flags], "replicas": N,
    "max_adapters_per_replica": K, "cpus_per_replica": C, "threads_per_replica": T}."""
    from server.cli import build_parser, configs

    ns = build_parser().parse_args([str(a) for a in args.get("server_args", [])])
    engine_cfg, server_cfg = configs(ns)
    return application(engine_cfg, server_cfg.auth, replicas=int(args.get("replicas", 2)),
                       max_adapters=int(args.get("max_adapters_per_replica", 8)),
                       cpus_per_replica=float(args.get("cpus_per_replica", 1)),
                       threads=int(args.get("threads_per_replica", 1)),
                       default_max_new_tokens=engine_cfg.default_max_new_tokens,
                       served_model_name=server_cfg.served_model_name)
