"""Load a page in real headless Chromium over the DevTools protocol (websocket-client) and
report what a person's browser would: each image's decoded width, console errors, failed loads,
and a full-page screenshot.

    chromium --headless --remote-debugging-port=0 --user-data-dir=TMP about:blank
    -> "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID" on stderr
    -> GET http://127.0.0.1:PORT/json/list gives the page target's websocket
    -> Runtime/Log/Page.enable, Page.navigate, wait for Page.loadEventFired, then evaluate.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import websocket  # websocket-client

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


@dataclass
class PageLoad:
    images: list[dict]  # {"src", "complete", "naturalWidth", "naturalHeight"} per <img>
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    screenshot: bytes = b""  # PNG of the whole page


class _DevTools:
    def __init__(self, url: str):
        self.socket = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.next_id, self.events = 0, []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, event: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(m.get("method") == event for m in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {event} within {timeout} s")
            self.events.append(json.loads(self.socket.recv()))


def load_page(url: str, browser: str, width: int = 1280, timeout: float = 60.0) -> PageLoad:
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    process = subprocess.Popen(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", f"--window-size={width},900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        port = _devtools_port(process, timeout)
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout))
        page = next(t for t in targets if t.get("type") == "page")
        tools = _DevTools(page["webSocketDebuggerUrl"])
        for domain in ("Runtime", "Log", "Page"):
            tools.call(f"{domain}.enable")
        tools.call("Page.navigate", url=url)
        tools.wait_for("Page.loadEventFired", timeout)
        images = tools.call("Runtime.evaluate", returnByValue=True, expression=(
            "Array.from(document.images).map(i => ({src: i.getAttribute('src'), complete: i.complete, "
            "naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight}))"))["result"]["value"]
        metrics = tools.call("Page.getLayoutMetrics")["cssContentSize"]
        shot = tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": metrics["width"], "height": metrics["height"],
                                "scale": 1})
        tools.socket.close()
        return PageLoad(images, _errors(tools.events), base64.b64decode(shot["data"]))
    finally:
        _close(process, profile)


def _close(process: subprocess.Popen, profile: str) -> None:
    """Kill the browser with its helper processes (its process group), then remove its
    profile, once they are gone: a helper still writing there makes a removal fail."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            shutil.rmtree(profile)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _devtools_port(process: subprocess.Popen, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if found := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line):
            return int(found.group(1))
    raise RuntimeError("the browser did not open its DevTools port:\n" + "".join(lines[-20:]))


def _errors(events: list[dict]) -> list[str]:
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            errors.append("exception: " + params["exceptionDetails"].get("text", ""))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
    return errors


def save_screenshot(load: PageLoad, path: Path) -> Path:
    path.write_bytes(load.screenshot)
    return path
