"""`livekv serve --replicas 2` under Ray Serve, on this machine: two local replicas, each loading
the embedded model, behind Ray Serve's proxy (the code path of the command: ray_serve.start).

Routing: connections that send the same X-Livekv-Workspace header reach the same replica, and
different workspaces spread over both. Failover: the replica holding a client's document is
killed mid-session; the client reconnects to the other one, gets unknown_uri, re-opens the
document with its own text, and goes on: the server's text is the client's, completions work.

Needs the `serve` extra (scripts/setup.sh --test installs it); skipped without Ray.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import InvalidStatus  # noqa: E402

from failover_client import HANG, FailoverClient, sha256  # noqa: E402
from livekv.incremental.config import Config  # noqa: E402
from livekv.lsp_server import ray_serve  # noqa: E402
from livekv.lsp_server import ws_protocol as P  # noqa: E402
from livekv.lsp_server.options import ServeOptions  # noqa: E402
from ws_helpers import INSERT_AT, NEW_LINE, NUMBERS, TEXT, URI, http_get, rng  # noqa: E402

# the replicas' processes inherit these from the Ray cluster the fixture starts
REPLICA_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """The websocket URL of two replicas; the Ray cluster and the environment are restored after."""
    saved = {k: os.environ.get(k) for k in (*REPLICA_ENV, ray_serve.SESSION_HEADER_ENV)}
    os.environ.update(REPLICA_ENV)
    # no CPUs reserved: a killed replica's replacement must never wait for one on a small machine
    opts = ServeOptions(port=free_port(), replicas=2, replica_cpus=0, demo=True)
    try:
        yield ray_serve.start(Config(max_new_tokens=8, precision="fp32"), opts)
    finally:
        if ray.is_initialized():
            ray_serve.stop(opts)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


async def replica_of(url: str, workspace: str | None) -> str:
    headers = {P.WORKSPACE_HEADER: workspace} if workspace is not None else {}
    async with connect(url, additional_headers=headers, open_timeout=HANG) as ws:
        await ws.send(json.dumps({"type": "hello", "id": 1}))
        hello = json.loads(await asyncio.wait_for(ws.recv(), HANG))
    assert hello["type"] == "ok" and hello["server"] == "livekv", hello
    return hello["replica"]


async def test_a_workspace_keeps_to_its_replica_and_workspaces_spread(cluster):
    owner = {}
    for w in (f"team-{i}" for i in range(16)):
        seen = {await replica_of(cluster, w) for _ in range(3)}
        assert len(seen) == 1, (w, seen)
        owner[w] = seen.pop()
    # 16 workspaces on one replica of two: about 1 in 30,000 with a uniform hash
    assert len(set(owner.values())) == 2, owner
    assert await replica_of(cluster, None) in set(owner.values())  # no header: served, anywhere


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.from_regex(r"[A-Za-z0-9._:/@+=-]{1,40}", fullmatch=True))
def test_any_workspace_name_keeps_to_one_replica(cluster, workspace):
    async def twice():
        return {await replica_of(cluster, workspace) for _ in range(2)}
    assert len(asyncio.run(twice())) == 1


async def test_the_proxy_serves_the_demo_and_checks_origins_as_one_process_does(cluster):
    url = cluster.replace("ws:", "http:")
    status, headers, body = http_get(url)
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"client.js" in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    status, headers, body = http_get(url + "client.js")
    assert status == 200 and b"class LivekvClient" in body
    assert http_get(url + "nothing-here")[0] == 404
    with pytest.raises(InvalidStatus) as e:
        async with connect(cluster, origin="https://evil.example", open_timeout=HANG):
            pass
    assert e.value.response.status_code == 403
    port = cluster.rsplit(":", 1)[1].strip("/")
    async with connect(cluster, origin=f"http://127.0.0.1:{port}", open_timeout=HANG) as ws:  # the page's own
        await ws.send(json.dumps({"type": "hello", "id": 1}))
        assert json.loads(await asyncio.wait_for(ws.recv(), HANG))["type"] == "ok"


def replica_actor(unique_id: str):
    """The Ray actor of the replica that says it is `unique_id` in its hello."""
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("#" + unique_id)]
    assert len(names) == 1, names
    return ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])


async def test_a_killed_replicas_documents_reopen_elsewhere_with_nothing_lost(cluster):
    c = FailoverClient(lambda: cluster, workspace="failover")
    text = TEXT + NUMBERS
    assert (await c.open(URI, text))["type"] == "ok"
    assert (await c.edit(URI, [{"range": rng(INSERT_AT, 0), "text": NEW_LINE + "\n"}]))["type"] == "ok"
    end = (len(c.text(URI).split("\n")) - 1, len(NUMBERS))
    before = await c.complete(URI, *end)
    assert before["type"] == "done" and not before["cancelled"] and before["text"], before
    first = c.replicas[-1]

    ray.kill(replica_actor(first))
    # typed while the replica was dying: the edit is sent again, answered unknown_uri, and the
    # re-open carries it
    edited = await c.edit(URI, [{"range": rng(0, 0), "text": "# moved\n"}])
    assert edited["type"] == "ok", edited
    assert len(c.replicas) == 2 and c.replicas[-1] != first, c.replicas
    assert c.reopened == [(URI, 2)]
    assert edited["stats"]["text_sha256"] == sha256(c.text(URI))

    assert (await c.edit(URI, [{"range": rng(1, 0, 1, 3), "text": "async def"}]))["type"] == "ok"
    stats = (await c.stats(URI))["stats"]
    assert stats["text_sha256"] == sha256(c.text(URI)) and stats["version"] == 3
    after = await c.complete(URI, end[0] + 1, end[1])
    assert after["type"] == "done" and not after["cancelled"] and after["text"] == "".join(after["tokens"])
    # the same text, freshly opened on the surviving replica, gets the same completion
    fresh = FailoverClient(lambda: cluster, workspace="failover")
    assert (await fresh.open(URI, c.text(URI)))["type"] == "ok" and fresh.replicas == c.replicas[-1:]
    assert (await fresh.complete(URI, end[0] + 1, end[1]))["text"] == after["text"] == before["text"]
    await c.close()
    await fresh.close()
