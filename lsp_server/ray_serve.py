"""`livekv serve --replicas N`: the websocket server as a Ray Serve application of N replicas, on one
machine or a Ray cluster.

Routing: Ray Serve's proxy takes every connection on --host/--port and its consistent-hash request
router (ray.serve.experimental.consistent_hash_router) picks the replica by the connection's
X-Livekv-Workspace header: the same value always reaches the same live replica, and losing a
replica moves only the workspaces it held. Connections without the header are spread at random.

Failover: when a replica dies its connections break; the clients reconnect (the router skips the
dead replica), and a request about a document the new replica does not hold gets `unknown_uri`,
on which the client re-opens it with its own text and retries (docs/protocol.md). Serve starts a
replacement replica, which joins the ring once its model has loaded.

Needs the `serve` extra (pip install 'livekv[serve]'); nothing else in livekv imports this module.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from pathlib import Path

try:
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig
except ModuleNotFoundError as e:
    raise ModuleNotFoundError(f"livekv serve --replicas runs under Ray Serve, which is not installed ({e}): "
                              "pip install 'livekv[serve]'", name=e.name) from None

from . import ws_protocol as P
from .options import ServeOptions
from .ray_replica import SESSION_HEADER_ENV, LivekvReplica, same_header
from .ws_http import LOOPBACK

log = logging.getLogger("livekv.ray")

APP = "livekv"
ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"
# A connection lasts as long as its editor; Serve would wait this long for it to end before
# stopping a replica. Waiting longer gains nothing: the client re-opens its documents elsewhere.
DRAIN_S = 2.0


def application(config, opts: ServeOptions):
    """The Serve application: opts.replicas replicas of LivekvReplica, routed by workspace."""
    router = RequestRouterConfig(request_router_class=ROUTER, request_router_kwargs={
        # past a dead (or full) replica, walk on along the ring: any live replica will do
        "num_fallback_replicas": max(0, opts.replicas - 1)})
    return LivekvReplica.options(
        num_replicas=opts.replicas, max_ongoing_requests=opts.replica_connections,
        ray_actor_options={"num_cpus": opts.replica_cpus}, request_router_config=router,
        graceful_shutdown_timeout_s=DRAIN_S).bind(config, opts)


def route_by_workspace() -> None:
    """Make Ray Serve route by P.WORKSPACE_HEADER, in the processes of a cluster started from here."""
    have = os.environ.get(SESSION_HEADER_ENV)
    if have is not None and not same_header(have, P.WORKSPACE_HEADER):
        raise ValueError(f"{SESSION_HEADER_ENV}={have} is set, but livekv routes by {P.WORKSPACE_HEADER}: "
                         "unset it or set it to that header")
    os.environ[SESSION_HEADER_ENV] = P.WORKSPACE_HEADER.lower()


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host")


def absolute(path: str | None) -> str | None:
    """A local path as the replicas must see it: they do not run in this working directory."""
    return str(Path(path).resolve()) if path is not None and Path(path).exists() else path


def start(config, opts: ServeOptions) -> str:
    """Start (or join) Ray, deploy the replicas and wait until each has loaded its model.
    Returns the websocket URL. ValueError for a port in use or a conflicting header setting."""
    if not opts.replicas:
        raise ValueError("start needs opts.replicas >= 1")
    config, opts = config.updated(model=absolute(config.model)), opts.updated(demo_file=absolute(opts.demo_file))
    if opts.ray_address is None:
        route_by_workspace()
        check_port_free(opts.host, opts.port)
    if not ray.is_initialized():
        # Ray puts the driver's working directory on every worker's import path; in a livekv
        # checkout its top-level kernels/ would shadow the `kernels` package transformers imports
        with contextlib.chdir("/"):
            ray.init(address=opts.ray_address, include_dashboard=False)
    serve.start(http_options={"host": opts.host, "port": opts.port})
    serve.run(application(config, opts), name=APP, route_prefix="/")
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    return f"ws://{host}:{opts.port}/"


def stop(opts: ServeOptions) -> None:
    """Undo start: a cluster started here goes entirely; on a joined one only this application."""
    if not ray.is_initialized():  # start failed before Ray was up
        return
    if opts.ray_address is None:
        serve.shutdown()
        ray.shutdown()
    else:
        serve.delete(APP)


def run_ray_server(config, opts: ServeOptions) -> int:
    """`livekv serve --replicas N`: serve until SIGINT/SIGTERM. Returns the exit code."""
    if opts.host not in LOOPBACK and opts.token is None:
        log.warning("listening on %s without --token: anyone who can reach this port can use the model", opts.host)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    log.info("starting %d replicas under Ray Serve (each loads the model)", opts.replicas)
    try:
        url = start(config, opts)
        log.info("livekv serve: %s, %d replicas; clients send %s: <workspace> to keep to one", url, opts.replicas,
                 P.WORKSPACE_HEADER)
        if opts.demo:
            log.info("demo page: %s", url.replace("ws:", "http:", 1))
        done.wait()
        log.info("shutting down")
    finally:
        stop(opts)
    return 0
