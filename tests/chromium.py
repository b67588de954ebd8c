"""Open a local HTML file in headless Chromium and report what a user would see (stdlib only).

Chromium is driven through the DevTools protocol over `--remote-debugging-pipe`: JSON messages
separated by NUL bytes, commands on the browser's fd 3 and replies/events on its fd 4. A fresh
browser with a new temporary profile is started for every `open_page` call and always stopped
(with every process it started) and its profile removed afterwards, also on errors and timeouts.

Tests use `require_chromium()` first: it skips when no Chromium is installed, except in CI
(`CI=true`), where a missing browser fails the test instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CHROMIUM", "Page", "open_page", "require_chromium"]

CHROMIUM: str | None = next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
)

FLAGS = [
    "--headless",
    "--no-sandbox",  # we may run as root, where the sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # without these a browser on a closed network keeps retrying its background fetches
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
    "--remote-debugging-pipe",
]

SETTLE_QUIET = 0.2  # after the load event: done once no event arrived for this long ...
SETTLE_MAX = 2.0  # ... or after this long at most

# Chromium wants its pipe ends at fds 3 (commands) and 4 (replies), and it starts processes that
# leave its process group (crashpad handlers daemonize into sessions of their own). So it runs
# under this small Python supervisor: a child subreaper, so that everything Chromium starts stays
# its descendant; it puts the pipe ends at 3 and 4 in the forked child and execs the browser,
# reaps every descendant, and once the browser exits (or on SIGTERM, or when the test process
# dies) kills what is left and exits after the last one is reaped (removing the profile if the
# test process died). A preexec_fn could deadlock in a threaded test process, and /bin/sh (dash)
# cannot name the fds above 9 that are handed over.
_SUPERVISOR = """\
import ctypes, os, signal, sys, time

browser = 0
stopping = False


def kill_all():
    if browser > 0:
        try:
            os.killpg(browser, signal.SIGKILL)
        except OSError:
            pass
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = f.read().rsplit(")", 1)[1].split()[1]
            if ppid == me:
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            pass


def on_term(signum, frame):
    global stopping
    stopping = True
    kill_all()


signal.signal(signal.SIGTERM, on_term)
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: SIGTERM when the test process dies
if stopping or os.getppid() != int(sys.argv[3]):  # told to stop, or the test process is gone
    sys.exit(1)
r, w = int(sys.argv[1]), int(sys.argv[2])
browser = os.fork()
if browser == 0:
    os.setpgid(0, 0)
    os.dup2(r, 3)
    os.dup2(w, 4)
    os.close(r)
    os.close(w)
    os.execv(sys.argv[5], sys.argv[5:])
os.close(r)
os.close(w)
code = 1
while True:
    if stopping:
        kill_all()
    try:
        pid, status = os.waitpid(-1, os.WNOHANG if stopping else 0)
    except ChildProcessError:
        break
    if pid == browser:
        code = os.waitstatus_to_exitcode(status)
        stopping = True  # the browser is gone: nothing it left behind is of use
    elif pid == 0:
        time.sleep(0.02)
if os.getppid() != int(sys.argv[3]):  # the test process died: remove the profile for it
    import shutil

    shutil.rmtree(sys.argv[4], ignore_errors=True)
sys.exit(code if code >= 0 else 128 - code)
"""

_COLLECT = """(() => ({
  text: document.body ? document.body.innerText : "",
  images: Array.from(document.images, (img) => ({
    src: (img.getAttribute("src") ?? img.currentSrc ?? "").slice(0, 80),
    complete: img.complete,
    natural_width: img.naturalWidth,
    natural_height: img.naturalHeight,
  })),
  tables: Array.from(document.querySelectorAll("table"), (table) =>
    Array.from(table.rows, (row) => Array.from(row.cells, (cell) => cell.innerText))),
}))()"""


@dataclass
class Page:
    """What the page showed once loaded and settled.

    console_errors: console.error / console.assert messages, uncaught exceptions and the browser's
        own error log entries (e.g. "Failed to load resource: net::ERR_FILE_NOT_FOUND (url)").
    images: one dict per <img>: src (the attribute as written, first 80 characters), complete,
        natural_width and natural_height (both 0 for an image that failed to load).
    text: document.body.innerText.
    tables: per <table>, its rows (header rows included) as lists of cell texts (innerText).
    requests: URLs of every network request the page made besides the page itself, in order;
        data: URIs are left out (they fetch nothing), so a self-contained page has none.
    """

    console_errors: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    text: str = ""
    tables: list[list[list[str]]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


def require_chromium() -> str:
    """The Chromium binary; skips the test without one, or fails it in CI (CI=true)."""
    import pytest

    if CHROMIUM is None:
        reason = "Chromium not installed (looked for chromium, chromium-browser, google-chrome)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must have it (scripts/test.sh installs it)")
        pytest.skip(reason)
    return CHROMIUM


class _Browser:
    """Chromium (under its supervisor) speaking CDP over pipes; `close()` stops all of it."""

    def __init__(self, binary: str, profile: Path, stderr):
        # our ends of the pipes, and the browser's ends moved above 9 so that they cannot sit at
        # 3 or 4 already (the supervisor's dup2 would clobber one with the other)
        cmd_r, self._cmd_w = os.pipe()
        self._ev_r, ev_w = os.pipe()
        child_r = fcntl.fcntl(cmd_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_w = fcntl.fcntl(ev_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(cmd_r)
        os.close(ev_w)
        env = dict(os.environ, HOME=str(profile), XDG_CONFIG_HOME=str(profile / ".config"))
        argv = [binary, *FLAGS, f"--user-data-dir={profile / 'data'}", "about:blank"]
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    "-c",
                    _SUPERVISOR,
                    str(child_r),
                    str(child_w),
                    str(os.getpid()),
                    str(profile),
                    *argv,
                ],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                pass_fds=(child_r, child_w),
                env=env,
                start_new_session=True,  # no terminal signals from the test run's group
            )
        except BaseException:
            os.close(self._cmd_w)
            os.close(self._ev_r)
            raise
        finally:
            os.close(child_r)
            os.close(child_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict] = []  # every event received, in order
        self.last_event = time.monotonic()

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self._next_id += 1
        msg: dict = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._cmd_w, data) :]
        return self._next_id

    def pump(self, until: float) -> list[dict]:
        """Messages that arrive before `until` (monotonic); [] once it passed. Events are also
        appended to `self.events`."""
        while True:
            if b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "method" in msg:
                    self.events.append(msg)
                    self.last_event = time.monotonic()
                return [msg]
            left = until - time.monotonic()
            if left <= 0:
                return []
            ready, _, _ = select.select([self._ev_r], [], [], left)
            if ready:
                chunk = os.read(self._ev_r, 1 << 16)
                if not chunk:
                    raise _BrowserGone(f"Chromium exited (status {self.proc.poll()})")
                self._buf += chunk

    def call(self, method: str, params: dict | None, session: str | None, deadline: float) -> dict:
        """Send a command and wait for its reply; events seen meanwhile are kept."""
        want = self.send(method, params, session)
        while time.monotonic() < deadline:
            for msg in self.pump(deadline):
                if msg.get("id") == want:
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    return msg.get("result", {})
        raise TimeoutError(f"no reply to {method}")

    def close(self) -> None:
        """Ask the browser to quit; the supervisor then kills and reaps whatever is left. If that
        takes too long, SIGTERM the supervisor (it kills everything), and SIGKILL at last."""
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(OSError):
                    self.send("Browser.close")
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.terminate()
                    try:
                        self.proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait()
        finally:
            for fd in (self._cmd_w, self._ev_r):
                with contextlib.suppress(OSError):
                    os.close(fd)


class _BrowserGone(RuntimeError):
    pass


def _describe(args: list[dict]) -> str:
    parts = []
    for arg in args:
        if "value" in arg:
            value = arg["value"]
            parts.append(value if isinstance(value, str) else json.dumps(value))
        else:
            parts.append(arg.get("description") or arg.get("unserializableValue") or arg["type"])
    return " ".join(parts)


def _in_flight(events: list[dict], session: str) -> set[str]:
    """Ids of the page's network requests that neither finished nor failed yet."""
    pending: set[str] = set()
    for event in events:
        if event.get("sessionId") == session:
            method, request = event["method"], event.get("params", {}).get("requestId")
            if method == "Network.requestWillBeSent":
                pending.add(request)
            elif method in ("Network.loadingFinished", "Network.loadingFailed"):
                pending.discard(request)
    return pending


def _errors_and_requests(events: list[dict], session: str, page_url: str) -> Page:
    page = Page()
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            message = _describe(params.get("args", []))
            if params["type"] == "assert":
                message = f"Assertion failed: {message}".rstrip(": ")
            page.console_errors.append(message)
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            description = details.get("exception", {}).get("description")
            text = details.get("text", "Uncaught")
            page.console_errors.append(f"{text} {description}" if description else text)
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            url = entry.get("url")
            page.console_errors.append(f"{entry['text']} ({url})" if url else entry["text"])
        elif method == "Network.requestWillBeSent":
            url = params.get("request", {}).get("url", "")
            if url != page_url and not url.startswith("data:"):
                page.requests.append(url)
    return page


def open_page(path: Path, timeout: float = 30.0) -> Page:
    """Load `path` in a fresh headless Chromium and return what it showed (see `Page`).

    Waits for the load event, then until no browser event came for SETTLE_QUIET seconds and no
    request is in flight (at most SETTLE_MAX). Raises TimeoutError, naming what was seen so far,
    when that takes longer than `timeout` seconds in all; RuntimeError when the browser fails or
    quits.
    """
    binary = CHROMIUM
    if binary is None:
        raise RuntimeError("Chromium is not installed")
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(path)
    url = path.as_uri()
    deadline = time.monotonic() + timeout
    profile = Path(tempfile.mkdtemp(prefix="langmerge-chromium-"))
    stage = "starting Chromium"
    session = ""
    browser = None
    with tempfile.TemporaryFile() as log:
        try:
            browser = _Browser(binary, profile, log)
            target = browser.call("Target.createTarget", {"url": "about:blank"}, None, deadline)
            stage = "attaching to the page"
            attached = browser.call(
                "Target.attachToTarget",
                {"targetId": target["targetId"], "flatten": True},
                None,
                deadline,
            )
            session = attached["sessionId"]
            for domain in ("Runtime", "Log", "Page", "Network"):
                browser.call(f"{domain}.enable", None, session, deadline)
            stage = f"loading {url}"
            nav = browser.call("Page.navigate", {"url": url}, session, deadline)
            if nav.get("errorText"):
                raise RuntimeError(f"navigating to {url}: {nav['errorText']}")
            while not any(
                e["method"] == "Page.loadEventFired" and e.get("sessionId") == session
                for e in browser.events
            ):
                if not browser.pump(deadline):
                    raise TimeoutError("no load event")
            stage = "letting the page settle"
            settle_end = min(time.monotonic() + SETTLE_MAX, deadline)
            while (now := time.monotonic()) < settle_end:
                quiet_end = browser.last_event + SETTLE_QUIET
                if now >= quiet_end and not _in_flight(browser.events, session):
                    break
                browser.pump(settle_end if now >= quiet_end else min(quiet_end, settle_end))
            stage = "reading the page"
            result = browser.call(
                "Runtime.evaluate",
                {"expression": _COLLECT, "returnByValue": True},
                session,
                deadline,
            )
            if "exceptionDetails" in result:
                raise RuntimeError(f"collecting the page failed: {result['exceptionDetails']}")
            page = _errors_and_requests(browser.events, session, url)
            value = result["result"]["value"]
            page.text, page.images, page.tables = value["text"], value["images"], value["tables"]
            return page
        except (TimeoutError, RuntimeError, BrokenPipeError) as err:
            seen = _errors_and_requests(browser.events, session, url) if browser else Page()
            events = len(browser.events) if browser else 0
            log.seek(0)
            lines = log.read().decode(errors="replace").splitlines()
            # without a system bus (containers, CI) every run logs dbus errors: not the news
            tail = "\n".join(line for line in lines if ":ERROR:dbus/" not in line)[-2000:]
            detail = (
                f"while {stage}: {err} ({events} events; console errors {seen.console_errors}; "
                f"requests {seen.requests}; Chromium's output: {tail!r})"
            )
            if isinstance(err, TimeoutError):
                raise TimeoutError(f"Chromium timed out after {timeout}s {detail}") from err
            raise RuntimeError(f"Chromium failed {detail}") from err
        finally:
            try:
                if browser is not None:
                    browser.close()
            finally:
                shutil.rmtree(profile, ignore_errors=True)
