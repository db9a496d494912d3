"""Tessera on Ray Serve (`python -m server.ray`): replicas that each run an engine, an adapter id as Ray's
multiplexed model id so a request goes to a replica that already holds its adapter, and one ingress for the
OpenAI HTTP API and the tessera.v1 gRPC service.

- replica.py: the `TesseraReplica` deployment (an engine, adapters as multiplexed models: loaded on demand,
  the least recently used unloaded past --max-adapters-per-replica).
- router.py: the `Router` ingress (no CPU of its own): the project's OpenAI routes over a `RemoteEngine`
  that streams from the replicas, and the gRPC `Generate`; every answer names its replica.
- app.py: the Serve application (`build_app`, also for `serve run deploy/ray/tessera.yaml`).
- __main__.py: the command line.
"""
