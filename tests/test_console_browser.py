"""The admin console in a real browser: headless Chromium (Debian's `chromium`) driven over
the DevTools protocol, against a console over a fake source (every panel, every action) and
against a real host (a quarantined message released through the page, then delivered).

Chromium's --screenshot mode cannot click, so the test talks the DevTools protocol itself:
JSON commands over one WebSocket (wsproto, which hypercorn already depends on, on a Trio
stream). Clicks are real mouse events at the element's place on the page, so a button
hidden or covered by something else would not be hit.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os
import shutil
import signal
import smtplib
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from test_admin import NOW, TOKEN, FakeSource, message
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from mailpool.admin.server import serve_admin

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (tests/install_tools.sh installs it)")

WINDOW = (1280, 1800)
# The chart's bar colours (console.html, SERIES).
RECEIVED = (0x3A, 0x78, 0xC8)
DELIVERED = (0x3A, 0xA0, 0x5A)


class DevToolsError(Exception):
    pass


class _Reply:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.message: dict[str, Any] = {}


class DevTools:
    """A minimal Chrome DevTools Protocol client: one WebSocket to the browser, one page
    driven through a flattened session (commands carry its sessionId)."""

    def __init__(self, stream: trio.SocketStream, nursery: trio.Nursery) -> None:
        self.stream = stream
        self.nursery = nursery
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.send_lock = trio.Lock()
        self.next_id = 0
        self.pending: dict[int, _Reply] = {}
        self.session: str | None = None
        self.dialogs: list[str] = []  # messages of the confirm() dialogs the page opened
        self.accept_dialogs = True
        self.problems: list[str] = []  # uncaught exceptions, CSP violations, console errors

    @classmethod
    async def connect(cls, port: int, path: str, nursery: trio.Nursery) -> DevTools:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        self = cls(stream, nursery)
        await self._send(Request(host=f"127.0.0.1:{port}", target=path))
        accepted = False
        while not accepted:
            data = await stream.receive_some(65536)
            if not data:
                raise DevToolsError("the browser closed the connection during the handshake")
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, RejectConnection):
                    raise DevToolsError(f"WebSocket refused: HTTP {event.status_code}")
                if isinstance(event, AcceptConnection):
                    accepted = True
                    break
        nursery.start_soon(self._read)
        return self

    async def _send(self, event: Event) -> None:
        async with self.send_lock:
            await self.stream.send_all(self.ws.send(event))

    async def _read(self) -> None:
        parts: list[str] = []
        while True:
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    parts.append(event.data)
                    if event.message_finished:
                        self._dispatch(json.loads("".join(parts)))
                        parts = []
                elif isinstance(event, Ping):
                    await self._send(event.response())
                elif isinstance(event, CloseConnection):
                    self._fail_pending("the browser closed the DevTools connection")
                    return
            data = await self.stream.receive_some(1 << 20)
            if not data:
                self._fail_pending("the DevTools connection ended")
                return
            self.ws.receive_data(data)

    def _fail_pending(self, why: str) -> None:
        for reply in self.pending.values():
            reply.message = {"error": {"message": why}}
            reply.done.set()
        self.pending.clear()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "id" in msg:
            reply = self.pending.pop(msg["id"], None)
            if reply is not None:
                reply.message = msg
                reply.done.set()
            return
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Page.javascriptDialogOpening":
            # The page is blocked in confirm() until this is answered; the command that
            # caused it (a click) only returns afterwards.
            self.dialogs.append(params["message"])
            self.nursery.start_soon(functools.partial(
                self.send, "Page.handleJavaScriptDialog", {"accept": self.accept_dialogs}))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.problems.append(details.get("exception", {}).get("description")
                                 or details.get("text", "exception"))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error" \
                and params["entry"].get("source") != "network":
            # Network entries are the HTTP errors the page is meant to show (401, 403, 400);
            # what stays: CSP violations, script errors.
            self.problems.append(params["entry"]["text"])
        elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
            self.problems.append(" ".join(str(a.get("value")) for a in params["args"]))

    async def send(self, method: str, params: dict[str, Any] | None = None, *,
                   browser: bool = False) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session is not None and not browser:
            msg["sessionId"] = self.session
        reply = self.pending[self.next_id] = _Reply()
        await self._send(Message(data=json.dumps(msg)))
        await reply.done.wait()
        if "error" in reply.message:
            raise DevToolsError(f"{method}: {reply.message['error'].get('message')}")
        return reply.message.get("result", {})

    # --- a page ------------------------------------------------------------------------

    async def open(self, url: str) -> None:
        target = await self.send("Target.createTarget", {"url": "about:blank"}, browser=True)
        attached = await self.send("Target.attachToTarget",
                                   {"targetId": target["targetId"], "flatten": True},
                                   browser=True)
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            await self.send(f"{domain}.enable")
        await self.send("Page.navigate", {"url": url})

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression[:80]!r}: "
                                f"{result['exceptionDetails'].get('exception', {})}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, what: str, timeout: float = 20.0) -> Any:
        value: Any = None
        with trio.move_on_after(timeout):
            while True:
                try:
                    value = await self.evaluate(expression)
                except DevToolsError as exc:  # e.g. the page is still loading
                    value = exc
                if value and not isinstance(value, Exception):
                    return value
                await trio.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what} "
                             f"(last value {value!r}; page problems {self.problems})")

    async def click(self, selector: str) -> None:
        """A left click at the middle of the element, as the mouse would make it."""
        where = await self.evaluate(f"""(() => {{
            const e = document.querySelector({json.dumps(selector)});
            if (!e) return null;
            e.scrollIntoView({{block: "center"}});
            const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2];
        }})()""")
        assert where is not None, f"no {selector} on the page"
        x, y = where
        await self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y,
                                                         "button": "left", "clickCount": 1})

    async def type_into(self, selector: str, text: str) -> None:
        """Click into a field, empty it, and type `text` as keyboard input would."""
        await self.click(selector)
        await self.evaluate(f'document.querySelector({json.dumps(selector)}).value = ""')
        await self.send("Input.insertText", {"text": text})

    async def text(self, selector: str) -> str:
        return await self.evaluate(
            f"(document.querySelector({json.dumps(selector)}) || {{}}).textContent || ''")

    async def screenshot(self) -> bytes:
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        return base64.b64decode(shot["data"])


async def _devtools_address(profile: Path, proc: subprocess.Popen[bytes],
                            log: Path) -> tuple[int, str]:
    """Chromium writes the port it picked (and the browser's WebSocket path) here."""
    port_file = profile / "DevToolsActivePort"
    with trio.move_on_after(30):
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"chromium exited {proc.returncode}: "
                                     + log.read_text(errors="replace")[-2000:])
            try:
                port, path = port_file.read_text().split("\n")[:2]
                return int(port), path
            except (OSError, ValueError):
                await trio.sleep(0.05)
    raise AssertionError("chromium never wrote DevToolsActivePort: "
                         + log.read_text(errors="replace")[-2000:])


@asynccontextmanager
async def chromium(tmp_path: Path) -> AsyncIterator[DevTools]:
    assert CHROMIUM is not None
    profile = tmp_path / "chromium-profile"
    log = tmp_path / "chromium.log"
    args = [CHROMIUM, "--headless=new", "--remote-debugging-port=0",
            f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
            "--no-first-run", "--no-default-browser-check", "--disable-gpu",
            "--disable-dev-shm-usage", "--disable-extensions", "--disable-sync",
            "--disable-background-networking", "--mute-audio", "about:blank"]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium will not start its sandbox as root
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    devtools: DevTools | None = None
    try:
        port, path = await _devtools_address(profile, proc, log)
        async with trio.open_nursery() as nursery:
            devtools = await DevTools.connect(port, path, nursery)
            try:
                yield devtools
            finally:
                # Nothing awaited here: a checkpoint in the cancelled nursery would raise
                # Cancelled over the test's own failure, and the nursery would swallow both.
                nursery.cancel_scope.cancel()
    finally:
        if devtools is not None:
            await trio.aclose_forcefully(devtools.stream)
        # Its own session: the browser and every helper process it started, and no other.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n", png[:16]
    assert png[12:16] == b"IHDR"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


# Pixels of each bar colour on the chart's canvas, counted in the page.
COUNT_BARS = """(() => {
  const c = document.getElementById("chart");
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  const want = WANT;
  const out = {received: 0, delivered: 0, painted: 0};
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] === 0) continue;
    out.painted++;
    for (const [k, [r, g, b]] of Object.entries(want))
      if (d[i] === r && d[i + 1] === g && d[i + 2] === b && d[i + 3] === 255) out[k]++;
  }
  return out;
})()""".replace("WANT", json.dumps({"received": RECEIVED, "delivered": DELIVERED}))


def _round(x: float) -> int:
    return math.floor(x + 0.5)  # JavaScript's Math.round


# --- the whole console over a fake source ----------------------------------------------------


async def test_console_over_fake_source(nursery: trio.Nursery, tmp_path: Path) -> None:
    source = FakeSource()
    source.traces["0HOLD1@example.test"] = [
        {"seq": 41, "time": "2023-11-14T22:13:20.000000Z", "type": "LG", "code": "94",
         "job": "smtp-server-1", "queue_id": "0HOLD1", "message_id": "0HOLD1@example.test",
         "explanation": "SMTP server: message received"},
        {"seq": 47, "time": "2023-11-14T22:13:21.000000Z", "type": "LG", "code": "OW",
         "job": "framework-1", "queue_id": "0HOLD1", "detail": "rule 0: subject matches",
         "explanation": "Filtering: message kept"}]
    hostile = '<img src=x onerror="document.title=\'owned\'">'
    source.recent = [{"time": NOW, "kind": "reject", "code": "550", "detail": hostile,
                      "listener": "smtp", "ip": "192.0.2.9"}]
    addr = await nursery.start(functools.partial(serve_admin, token=TOKEN),
                               source, "127.0.0.1", 0)
    async with chromium(tmp_path) as page:
        await page.open(f"http://127.0.0.1:{addr[1]}/")
        await page.wait_for("Number(document.body.dataset.refreshes) >= 1", "the first poll")
        # No history yet: an empty chart, not a single bar pixel.
        assert await page.evaluate('document.getElementById("chart").dataset.points') == "0"
        bars = await page.evaluate(COUNT_BARS)
        assert (bars["received"], bars["delivered"]) == (0, 0)

        # An hour of samples: bars below the sessions line so no pixel of either is shared.
        start = int(NOW // 60) * 60 - 59 * 60
        source.samples = [{"t": start + 60 * i, "received": (7 * i) % 31,
                           "delivered": (5 * i) % 23, "in_use": 4, "waiting": 5}
                          for i in range(60)]
        await page.wait_for('document.getElementById("chart").dataset.points === "60"',
                            "the chart to draw sixty minutes")
        geometry = await page.evaluate("""(() => {
            const c = document.getElementById("chart");
            return [c.clientWidth, c.clientHeight, window.devicePixelRatio];
        })()""")
        width, height, ratio = geometry
        assert ratio == 1
        # The page's layout (console.html, drawChart): margins 44/44/12/22, sixty slots,
        # scale 50 (the nice maximum over 30); each bar floor(slot / 2) - 1 wide.
        plot_h = height - 34
        bar_w = max(1, math.floor((width - 88) / 60 / 2) - 1)
        bars = await page.evaluate(COUNT_BARS)
        for key in ("received", "delivered"):
            expected = sum(bar_w * _round(plot_h * s[key] / 50) for s in source.samples)
            assert bars[key] == expected > 0, (key, bars, expected)

        png = await page.screenshot()
        (tmp_path / "console.png").write_bytes(png)
        assert png_size(png) == tuple(await page.evaluate(
            "[innerWidth * devicePixelRatio, innerHeight * devicePixelRatio]"))

        # Recent events: a hostile detail is shown as text, never as markup.
        await page.wait_for(f'document.getElementById("events").textContent'
                            f'.includes({json.dumps(hostile)})', "the event")
        assert await page.evaluate('document.querySelectorAll("#events img").length') == 0
        assert await page.evaluate("document.title") == "mailpool console"

        # The hold queue, through the queues table.
        await page.click('#queues button[data-queue="hold"]')
        release = '#messages button[data-action="release"][data-qid="0HOLD1"]'
        await page.wait_for(f"document.querySelector({json.dumps(release)}) !== null",
                            "0HOLD1 with a release button")
        row = await page.text('#messages tr:first-child')
        assert "0HOLD1" in row and "bob@example.test" in row and "<0HOLD1@example.test>" in row

        # No token typed: nothing is sent.
        await page.click(release)
        await page.wait_for('document.getElementById("notice").textContent === '
                            '"release 0HOLD1: type the admin token first"', "the refusal")
        assert source.controls == []

        # A wrong token: the server's refusal, shown.
        await page.type_into("#token", "not-it")
        await page.click(release)
        await page.wait_for('document.getElementById("notice").textContent === '
                            '"release 0HOLD1: the bearer token is not [admin] token"',
                            "the 403")
        assert source.controls == []

        await page.type_into("#token", TOKEN)
        assert await page.evaluate(
            'sessionStorage.getItem("mailpool-admin-token")') == TOKEN
        await page.click(release)
        await page.wait_for('document.getElementById("notice").textContent === '
                            '"release 0HOLD1: done"', "the release")
        assert source.controls == [{"op": "queue-release", "queue_id": "0HOLD1"}]
        await page.wait_for(f"document.querySelector({json.dumps(release)}) === null",
                            "0HOLD1 gone from the hold queue")

        # The journal trace of a message, from its row.
        await page.click('#messages button[data-trace="0HOLD2@example.test"]')
        await page.wait_for('document.getElementById("trace").textContent.includes('
                            '"no journal records")', "an empty trace")
        source.messages["hold"].append(message("hold", "0HOLD1", "bob@example.test"))
        await page.wait_for('document.querySelector(\'#messages button[data-trace='
                            '"0HOLD1@example.test"]\') !== null', "0HOLD1 back on hold")
        await page.click('#messages button[data-trace="0HOLD1@example.test"]')
        await page.wait_for('document.querySelectorAll("#trace tr").length === 2',
                            "two trace records")
        trace = await page.text("#trace")
        assert "SMTP server: message received" in trace and "detail=rule 0" in trace
        assert await page.text("#trace-id") == "<0HOLD1@example.test>"

        # Delete asks first: declined, nothing happens; accepted, it is gone.
        delete = '#messages button[data-action="delete"][data-qid="0HOLD2"]'
        page.accept_dialogs = False
        await page.click(delete)
        assert page.dialogs == ["Delete 0HOLD2 from its queue? This cannot be undone."]
        assert len(source.controls) == 1
        page.accept_dialogs = True
        await page.click(delete)
        await page.wait_for('document.getElementById("notice").textContent === '
                            '"delete 0HOLD2: done"', "the delete")
        assert source.controls[-1] == {"op": "queue-delete", "queue_id": "0HOLD2"}

        # `pool change` as a form: only what was changed is sent.
        await page.type_into('#pool-fields input[name="maximum_jobs"]', "40")
        await page.click('#pool-form button[type="submit"]')
        await page.wait_for('document.getElementById("notice").textContent === '
                            '"smtp-server: changed maximum_jobs = 40"', "the pool change")
        assert source.changes == [("smtp-server", {"maximum_jobs": 40})]
        await page.type_into('#pool-fields input[name="maximum_jobs"]', "0")
        await page.click('#pool-form button[type="submit"]')
        await page.wait_for('document.getElementById("notice").textContent === '
                            '"pool change: smtp-server: maximum_jobs: 0: must be >= 1"',
                            "the refused pool change")
        assert source.pools["smtp-server"]["parameters"]["maximum_jobs"] == 40

        assert await page.evaluate('document.getElementById("state").className') == ""
        # The page ran without one error: its inline script and style passed the CSP.
        assert page.problems == []


# --- a real host: a quarantined message released through the page --------------------------


def _send(smtp: tuple[str, int], subject: str) -> str:
    with smtplib.SMTP(*smtp, timeout=10) as s:
        s.ehlo("client.example.test")
        s.mail("carol@example.test")
        s.rcpt("alice@example.test")
        code, text = s.data(f"Subject: {subject}\r\nMessage-ID: <held-1@example.test>\r\n"
                            "\r\nPlease keep this.\r\n".encode())
        assert code == 250
    return text.decode().rsplit(" ", 1)[-1]


async def test_release_on_a_real_host(host: Any, tmp_path: Path) -> None:
    h = host(f'[admin]\ntoken = "{TOKEN}"\n\n'
             '[[filter]]\naction = "keep"\nsubject = "hold me"\n')
    h.add_user("alice", "alice@example.test")
    qid = await trio.to_thread.run_sync(_send, h.smtp, "hold me")
    with trio.fail_after(20):
        while [p.name for p in h.queue_files("quarantine")] != [qid]:
            await trio.sleep(0.05)
    listen = json.loads((h.data / "run" / "listen.json").read_text())
    async with chromium(tmp_path) as page:
        await page.open(f"http://{listen['admin']}/")
        await page.wait_for("Number(document.body.dataset.refreshes) >= 1", "the first poll")
        await page.type_into("#token", TOKEN)
        await page.click('#queues button[data-queue="quarantine"]')
        release = f'#messages button[data-action="release"][data-qid="{qid}"]'
        await page.wait_for(f"document.querySelector({json.dumps(release)}) !== null",
                            f"{qid} in the quarantine view")
        row = await page.text("#messages tr:first-child")
        assert "carol@example.test" in row and "alice@example.test" in row
        assert "<held-1@example.test>" in row
        png = await page.screenshot()
        (tmp_path / "quarantine.png").write_bytes(png)
        png_size(png)
        assert h.maildir_files("alice") == []

        await page.click(release)
        await page.wait_for('document.getElementById("notice").textContent === '
                            f'"release {qid}: done"', "the release")
        with trio.fail_after(20):
            while not h.maildir_files("alice"):
                await trio.sleep(0.05)
        delivered = h.maildir_files("alice")[0].read_bytes()
        assert b"Please keep this." in delivered and b"Subject: hold me" in delivered
        await page.wait_for('document.getElementById("messages").textContent === '
                            '"no messages"', "the quarantine view empty")
        # The chart of the last hour: the message's arrival and its delivery, as bars.
        await page.wait_for(COUNT_BARS.replace("return out;", "return out.received > 0 && "
                                                "out.delivered > 0 && out;"),
                            "bars for the message received and delivered")
        assert int(await page.evaluate(
            'document.getElementById("chart").dataset.points')) >= 1
    assert [r["code"] for r in h.journal("--code", "QR")] == ["QR"]
