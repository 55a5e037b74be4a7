"""GET /dashboard in a real headless Chromium (Debian's `chromium`), driven over the DevTools protocol.

The page must load with no console error or exception, poll /metrics.json,
and its charts must show the figures of a short load run: the payments and
amounts paid equal the backend's summary, the accepted/s chart saw the load,
and every canvas has something drawn on it. A screenshot is saved under
results/ (its path is printed). Skipped only when chromium is not installed
(`make test` installs it).
"""
import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time

import aiohttp
import pytest

from stack import ROOT, payment, request, wait_until
from test_e2e import send_many

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         "--window-size=1400,1300", "--remote-debugging-port=0"]


class Browser:
    """One headless Chromium and a DevTools connection to its first page."""

    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="rinha-chromium-")
        self.log = open(os.path.join(self.profile, "chromium.log"), "wb")
        self.process = subprocess.Popen([CHROMIUM] + FLAGS + ["--user-data-dir=" + self.profile, "about:blank"],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        wait_until(lambda: os.path.exists(port_file) and open(port_file).read().count("\n") >= 1,
                   timeout=30, what="chromium's DevTools port")
        self.port = int(open(port_file).read().split()[0])
        self.events = []
        self._next_id = 0
        self._pending = {}

    async def connect(self, session):
        async with session.get("http://127.0.0.1:%d/json/list" % self.port) as response:
            targets = await response.json()
        page = next(t for t in targets if t["type"] == "page")
        self.ws = await session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        for domain in ("Runtime", "Log", "Page"):
            await self.call(domain + ".enable")

    async def _read(self):
        async for message in self.ws:
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self.events.append(data)

    async def call(self, method, **params):
        self._next_id += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        await self.ws.send_str(json.dumps({"id": self._next_id, "method": method, "params": params}))
        answer = await asyncio.wait_for(future, 30)
        assert "error" not in answer, answer
        return answer["result"]

    async def evaluate(self, expression):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def console_errors(self):
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(params["exceptionDetails"])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(params)
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                errors.append(params["entry"])
        return errors

    def close(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


# Pixels of each canvas that differ from the panel background: a blank chart has none.
CANVAS_INK = """
[...document.querySelectorAll('canvas')].map(c => {
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let ink = 0;
  for (let i = 3; i < d.length; i += 4) if (d[i] > 0) ink++;
  return [c.id, ink];
})
"""


async def _drive(url, load, until, artefact):
    browser = Browser()
    try:
        async with aiohttp.ClientSession() as session:
            await browser.connect(session)
            await browser.call("Page.navigate", url=url)
            deadline = time.monotonic() + 20
            while not await browser.evaluate("!!(window.__dashboard && window.__dashboard.ready)"):
                assert time.monotonic() < deadline, "the dashboard never rendered: %s" % browser.console_errors()
                await asyncio.sleep(0.2)
            await asyncio.get_running_loop().run_in_executor(None, load)
            deadline = time.monotonic() + 30
            while True:
                state = await browser.evaluate("JSON.parse(JSON.stringify(window.__dashboard))")
                if until(state["figures"]):
                    break
                if time.monotonic() > deadline:
                    rows = await browser.evaluate("fetch('/metrics.json').then(r => r.json()).then(d => "
                                                  "d.instances.map(s => s.series.rows.map(r => [r[0], r[11]])))")
                    raise AssertionError("the charts never showed the run: %s; series: %s" % (state, rows))
                await asyncio.sleep(0.25)
            ink = dict(await browser.evaluate(CANVAS_INK))
            dom = await browser.evaluate("({polls: document.body.dataset.polls, errors: document.body.dataset.errors,"
                                         " status: document.getElementById('status').textContent,"
                                         " books: document.querySelector('#books tbody').innerText})")
            shot = await browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            with open(artefact, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
            return state, ink, dom, browser.console_errors()
    finally:
        browser.close()


def test_dashboard_in_chromium_shows_a_load_run(stack):
    payments = [payment(19.90) for _ in range(300)]

    def load():
        # Spread over ~3 s so the accepted/s chart has several points.
        for part in range(6):
            assert set(send_many(stack.port, payments[part * 50:(part + 1) * 50], threads=8)) == {202}
            time.sleep(0.5)

    def shows_the_run(figures):
        books = (figures or {}).get("books", {})
        paid = sum(b["payments"] for b in books.values())
        # The per-second series (1 s samples, read every 1 s) catch up with the books shortly after.
        return (paid == len(payments) and len(figures["instances"]) == 2
                and abs(figures["money_drawn"]["default gross"] - len(payments) * 19.90) < 0.005
                and figures["last_rate"] == 0)

    results = os.path.join(ROOT, "results")
    os.makedirs(results, exist_ok=True)
    artefact = os.path.join(results, "dashboard-%s.png" % time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    state, ink, dom, errors = asyncio.run(
        _drive("http://127.0.0.1:%d/dashboard" % stack.port, load, shows_the_run, artefact))
    print("\ndashboard screenshot: %s" % artefact)

    assert errors == [], "console errors: %s" % errors
    assert state["errors"] == 0 and int(dom["errors"]) == 0, dom
    assert state["polls"] >= 3 and int(dom["polls"]) == state["polls"]
    figures = state["figures"]
    summary = stack.summary()
    assert figures["books"]["default"]["payments"] == summary["default"]["totalRequests"] == len(payments)
    assert figures["books"]["default"]["gross"] == pytest.approx(summary["default"]["totalAmount"])
    assert figures["books"]["default"]["fees"] == pytest.approx(summary["default"]["totalAmount"] * 0.05)
    assert figures["books"]["fallback"]["payments"] == summary["fallback"]["totalRequests"]
    assert sum(figures["accepted"].values()) == len(payments)
    assert figures["max_rate"] > 0, "the accepted/s chart never rose"
    assert figures["max_p99_ms"] > 0, "no accept p99 drawn"
    assert all(v is not None and v > 0 for v in figures["p99_window_ms"].values())
    assert figures["money_drawn"]["default gross"] == pytest.approx(len(payments) * 19.90), figures["money_drawn"]
    assert all(n >= 3 for n in figures["series_points"].values())
    assert figures["circuits"] == {"1": ["closed", "closed"], "2": ["closed", "closed"]}
    assert "5,970.00" in dom["books"], dom["books"]       # 300 x 19.90 in the books table
    for canvas, pixels in ink.items():
        assert pixels > 500, "canvas %s is blank" % canvas
    assert os.path.getsize(artefact) > 10_000


def test_dashboard_is_self_contained(stack):
    status, headers, body = request(stack.port, "GET", "/dashboard")
    assert status == 200 and headers["content-type"].startswith("text/html")
    text = body.decode()
    # No CDN, no external script, style or font: everything inline.
    for marker in ("http://", "https://", "<script src", "<link rel=\"stylesheet\"", "@import"):
        assert marker not in text.replace("http://www.w3.org", ""), marker
    assert "<canvas" in text and "fetch(\"/metrics.json\"" in text
    assert "default-src 'none'" in headers["content-security-policy"]
    assert request(stack.port, "POST", "/dashboard")[0] == 405
