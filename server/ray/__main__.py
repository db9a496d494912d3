"""`python -m server.ray`: Tessera on Ray Serve. The flags of `python -m server`, plus --replicas, --address,
--max-adapters-per-replica, --cpus-per-replica and --threads-per-replica. HTTP (the OpenAI API) on --host:--http-port
and gRPC (tessera.v1, through Ray's gRPC proxy) on --host:--port, as the single server; metrics stay per
replica (Ray's own /metrics covers the proxy)."""
from __future__ import annotations

import logging
import os
import signal
import threading

from server.cli import build_parser, parse

log = logging.getLogger("tessera.ray")


def parser():
    ap = build_parser()
    ap.prog = "python -m server.ray"
    r = ap.add_argument_group("ray serve")
    r.add_argument("--replicas", type=int, default=2, help="engine replicas")
    r.add_argument("--address", default=None, help="join this Ray cluster (e.g. ray://head:10001 or auto); "
                   "default: start a local one")
    r.add_argument("--max-adapters-per-replica", type=int, default=8,
                   help="adapters a replica holds for Ray's multiplexed routing (LRU beyond it)")
    r.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs each replica reserves")
    r.add_argument("--threads-per-replica", type=int, default=1, help="torch threads in each replica")
    return ap


def main(argv: list[str] | None = None) -> None:
    args, engine_cfg, server_cfg = parse(parser(), argv)
    if args.replicas < 1 or args.max_adapters_per_replica < 1:
        raise SystemExit("--replicas and --max-adapters-per-replica must be >= 1")
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions, HTTPOptions

    from server.ray.app import GRPC_SERVICER, application, runtime_env

    os.environ["PYTHONPATH"] = runtime_env()["env_vars"]["PYTHONPATH"]
    if args.address:
        ray.init(address=args.address, runtime_env=runtime_env())
    else:
        ray.init(address="local", include_dashboard=False, runtime_env=runtime_env())
    serve.start(http_options=HTTPOptions(host=args.host, port=args.http_port),
                grpc_options=gRPCOptions(port=args.port, grpc_servicer_functions=[GRPC_SERVICER]))
    log.info("starting %d replicas (%.1f CPUs, %d torch threads each, up to %d adapters each)", args.replicas,
             args.cpus_per_replica, args.threads_per_replica, args.max_adapters_per_replica)
    serve.run(application(engine_cfg, server_cfg.auth, replicas=args.replicas,
                          max_adapters=args.max_adapters_per_replica, cpus_per_replica=args.cpus_per_replica,
                          threads=args.threads_per_replica, default_max_new_tokens=engine_cfg.default_max_new_tokens,
                          served_model_name=server_cfg.served_model_name),
              name="tessera", route_prefix="/", blocking=False)
    log.info("SERVING: HTTP on %s:%d, gRPC on %s:%d (Ray Serve)", args.host, args.http_port, args.host, args.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down Serve, then Ray")
    serve.shutdown()  # Serve first: with Ray gone it hangs
    ray.shutdown()


if __name__ == "__main__":
    main()
