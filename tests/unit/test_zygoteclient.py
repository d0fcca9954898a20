"""The driver's reading of a forked replica's readiness report (``zygoteclient``): only a
line naming the replica's own port is "ready"; anything else is "no word" (None), and a
report that has not come is "not yet" (``wait`` -> False)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from torpor.drivers.zygoteclient import LINE_LIMIT, Report, ready_line


@pytest.mark.parametrize(
    ("line", "ready"),
    [
        (b'{"ready": 8080, "t": 1.5}', True),
        (b'{"ready": 8080}', True),
        (b'{"ready": 8081, "t": 1.5}', False),  # another port
        (b'{"ready": "8080"}', False),  # a string
        (b'{"ready": true}', False),  # a bool is no port
        (b'{"ready": 8080.0}', False),
        (b'{"pid": 12}', False),
        (b"[8080]", False),
        (b"ready", False),
        (b"", False),
        (b"\xff\xfe", False),
    ],
)
def test_ready_line(line: bytes, ready: bool) -> None:
    assert ready_line(line, 8080) is ready


async def _report() -> tuple[Report, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    rep = Report(8080, ours)
    rep.listen()
    return rep, theirs


@pytest.mark.parametrize(
    ("sent", "result"),
    [
        ([b'{"ready": 8080, "t": 1}\n'], True),
        ([b'{"rea', b'dy": 8080}\n'], True),  # in pieces
        ([b'{"ready": 9}\n'], None),
        ([b"not json\n"], None),
        ([b'{"ready": 8080}'], None),  # closed before the line ended
        ([], None),  # closed without a word (the child died)
        ([b"x" * (LINE_LIMIT + 10)], None),  # no line end within the limit
    ],
)
async def test_a_report_resolves_once_from_what_the_child_sends(
    sent: list[bytes], result: bool | None
) -> None:
    rep, child = await _report()
    assert await rep.wait(0.0) is False  # nothing yet
    for chunk in sent:
        child.sendall(chunk)
    if not sent or not sent[-1].endswith(b"\n") and len(sent[-1]) <= LINE_LIMIT:
        child.close()
    assert await rep.wait(5.0) is True
    assert rep.result is result
    child.close()


async def test_waiters_wake_when_the_report_comes_and_time_out_without_it() -> None:
    rep, child = await _report()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await rep.wait(0.05) is False
    assert loop.time() - t0 >= 0.04
    waiters = [asyncio.ensure_future(rep.wait(30.0)) for _ in range(3)]
    await asyncio.sleep(0)
    child.sendall(b'{"ready": 8080}\n')
    assert await asyncio.wait_for(asyncio.gather(*waiters), 5) == [True, True, True]
    assert rep.result is True
    child.close()


async def test_closing_a_report_gives_no_word() -> None:
    rep, child = await _report()
    waiter = asyncio.ensure_future(rep.wait(30.0))
    await asyncio.sleep(0)
    rep.close()
    assert await asyncio.wait_for(waiter, 5) is True
    assert rep.result is None
    child.close()
