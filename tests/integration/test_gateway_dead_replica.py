"""A replica that dies behind something still accepting its connections (Docker's port
proxy keeps accepting after the container is gone) must not keep getting requests until
the controller notices: the gateway takes it out of rotation on the first new connection
it closes without a byte of answer, and repeats a safe request on another replica.

The real ``Gateway`` on a real ``Server`` (fixtures from test_gateway_limits.py), with a
replica that accepts, reads the request and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
from test_gateway_limits import HOST, REV, TIMEOUT, gateway, until

from torpor.model import Replica


@contextlib.asynccontextmanager
async def dead_behind_a_proxy() -> AsyncIterator[tuple[str, list[bytes]]]:
    """An endpoint that accepts, reads what arrives, and closes without answering."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            seen.append(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}", seen
    finally:
        server.close()
        await server.wait_closed()


async def test_gets_reach_the_live_replica_and_the_dead_one_leaves_rotation() -> None:
    async with gateway() as env, dead_behind_a_proxy() as (dead, seen):
        await env.store.put_replica(
            Replica(name=f"{REV}-dead", function="fn", revision=REV, state="ready", endpoint=dead)
        )
        await until(lambda: len(env.rr.balancer.backends) == 2, "both replicas in the routes")
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{env.port}",
            headers={"Host": HOST.decode()},
            timeout=TIMEOUT,
            limits=httpx.Limits(max_keepalive_connections=0),
        ) as http:
            rs = await asyncio.gather(*(http.get(f"/n{i}") for i in range(12)))
        assert [r.status_code for r in rs] == [200] * 12
        # the dead replica saw at most the requests sent before it left rotation, and
        # every GET it swallowed was answered by the live one
        assert len(seen) >= 1, "the dead replica was never tried: the test proves nothing"
        assert [b.name for b in env.rr.balancer.backends] == [f"{REV}-r1"]
        assert len(env.replica.calls) == 12


async def test_a_post_it_swallowed_is_a_503_not_repeated_and_the_next_goes_elsewhere() -> None:
    async with gateway(ready=False) as env, dead_behind_a_proxy() as (dead, seen):
        await env.store.put_replica(
            Replica(name=f"{REV}-dead", function="fn", revision=REV, state="ready", endpoint=dead)
        )
        await until(lambda: env.rr.balancer.backends, "the dead replica in the routes")
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{env.port}",
            headers={"Host": HOST.decode()},
            timeout=TIMEOUT,
        ) as http:
            r = await http.post("/order", content=b"once only")
            assert r.status_code == 503 and r.headers["retry-after"]
            assert len(seen) == 1  # not repeated: a POST may have been acted on
            assert env.rr.balancer.backends == []  # out of rotation at once
            await env.add_replica()
            r = await http.post("/order", content=b"second")
            assert r.status_code == 200
        assert len(seen) == 1 and env.replica.calls[-1]["len"] == len(b"second")


async def test_an_ejected_replica_still_listed_ready_returns_after_the_ejection(
    monkeypatch,
) -> None:
    """One dropped connection must not cost a healthy replica its traffic for good."""
    monkeypatch.setattr("torpor.gateway.routes.EJECT_S", 0.2)
    async with gateway() as env:
        [b] = env.rr.balancer.backends
        env.gateway.table.eject(env.rr, b)
        assert env.rr.balancer.backends == []
        await until(lambda: env.rr.balancer.backends, "the replica back in rotation")
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{env.port}",
            headers={"Host": HOST.decode()},
            timeout=TIMEOUT,
        ) as http:
            assert (await http.get("/")).status_code == 200
