"""The built site in a real browser: every page of ``_toc.yml`` opened in headless Chromium with the network off.

A session fixture builds the site with the commands of ``make site`` (so it shows the executed notebooks as they
are now), serves ``_build/html`` on 127.0.0.1 and drives Chromium over the Chrome DevTools Protocol: a websocket,
spoken with tornado's client (installed anyway as a dependency of ipykernel), so neither WebDriver nor another
package is needed. Every request that does not go to the local server is refused and recorded. For each page the
test asserts that there is no console error, no request leaving 127.0.0.1, that every chart container of the
offline renderer (``lib.viz``) holds a rendered SVG or canvas, and that every internal link of the sidebar
navigation answers 200; it saves a full-page screenshot as ``_build/screenshots/<page>.png``.

It skips, with the reason, only where no Chromium binary can be found: ``make test`` first installs Debian's
``chromium`` when it is missing (``make browser``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urldefrag, urlsplit

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
HTML_DIR = REPO_ROOT / "_build" / "html"
SCREENSHOT_DIR = REPO_ROOT / "_build" / "screenshots"
CHROMIUM_NAMES = ("chromium", "chromium-browser")
CHROMIUM_MISSING = ("no Chromium binary found ($CHROMIUM if set, else " + " or ".join(CHROMIUM_NAMES) + " on the "
                    "PATH) and `make browser` could not install Debian's `chromium` (it needs apt-get and root): the "
                    "browser test of the built site is skipped")
# The commands of the Makefile's `site` target (test_site_commands_match_makefile keeps them in step).
SITE_COMMANDS = (
    ("python", "-m", "bookkit.site_assets", "--write-bundle", "book/_static"),
    ("jupyter-book", "build", ".", "-W", "-n", "--keep-going"),
)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # needed as root and in most containers; the browser only ever loads this site's own pages
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",  # Chromium picks a free port and writes it to <profile>/DevToolsActivePort
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--mute-audio",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    # Belt and braces: no host name but the local server's resolves; requests elsewhere are also refused below.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)
CHART_SELECTOR = ".refusal-book-chart"  # the container <div> that lib.viz.spec_to_html emits
MATH_SELECTOR = ".math"  # Sphinx's <span>/<div class="math"> around each formula; MathJax fills it with mjx-container
NAV_SELECTOR = ".bd-sidebar-primary a[href]"  # sphinx-book-theme's left sidebar: the table of contents
VIEWPORT = (1280, 900)
MAX_SCREENSHOT_HEIGHT = 16_000  # Chromium cannot capture much taller images in one piece
PAGE_LOAD_TIMEOUT_S = 60.0
CHART_TIMEOUT_S = 30.0

CHARTS_JS = f"""(() => {{
  const charts = Array.from(document.querySelectorAll({json.dumps(CHART_SELECTOR)})).map(el => ({{
    id: el.id, rendered: el.querySelector("svg, canvas") !== null,
    text: (el.textContent || "").trim().slice(0, 200)}}));
  const embedCalls = Array.from(document.scripts)
    .filter(s => !s.src && s.textContent.includes("vegaEmbed(")).length;
  return {{charts: charts, embedCalls: embedCalls}};
}})()"""
MATHS_JS = f"""Array.from(document.querySelectorAll({json.dumps(MATH_SELECTOR)})).map(el => ({{
  rendered: el.querySelector("mjx-container") !== null, text: (el.textContent || "").trim().slice(0, 80)}}))"""
NAV_JS = f"Array.from(document.querySelectorAll({json.dumps(NAV_SELECTOR)})).map(a => a.href)"
READING_JS = """(() => {
  const visible = el => el.offsetParent !== null && !el.closest("details:not([open])");
  const outputs = Array.from(document.querySelectorAll(".cell_output pre"));
  return {
    headers: Array.from(document.querySelectorAll("table th")).map(th => (th.textContent || "").trim()),
    scrolling: outputs.filter(pre => pre.scrollWidth > pre.clientWidth + 1)
                      .map(pre => (pre.textContent || "").trim().slice(0, 120)),
    visibleCode: Array.from(document.querySelectorAll(".cell .cell_input")).filter(visible).length,
    codeCells: document.querySelectorAll(".cell .cell_input").length,
    prose: Array.from(document.querySelectorAll("article p")).filter(p => !p.closest(".cell_output"))
                .map(p => (p.textContent || "").replace(/\\s+/g, " ").replace(/[\u2018\u2019]/g, "'").trim()),
  };
})()"""
TWO_FRAMES_JS = "new Promise(done => requestAnimationFrame(() => requestAnimationFrame(() => done(true))))"


# --------------------------------------------------------------------------------------------------------------------
# Pages, site build and local server
# --------------------------------------------------------------------------------------------------------------------


def _toc_entries(entry) -> list[str]:
    """Every ``root`` / ``file`` of a ``_toc.yml`` subtree, in reading order."""
    if isinstance(entry, list):
        return [name for item in entry for name in _toc_entries(item)]
    if not isinstance(entry, dict):
        return []
    names = [str(entry[key]) for key in ("root", "file") if key in entry]
    for key in ("parts", "chapters", "sections"):
        names += _toc_entries(entry.get(key, []))
    return names


def toc_pages(repo_root: Path = REPO_ROOT) -> list[str]:
    """HTML paths, relative to ``_build/html``, of the pages that ``_toc.yml`` lists (``book/intro.html``, ...)."""
    toc = yaml.safe_load((repo_root / "_toc.yml").read_text(encoding="utf-8")) or {}
    pages = []
    for name in _toc_entries(toc):
        path = Path(name)
        page = (path.with_suffix("") if path.suffix in {".md", ".ipynb"} else path).as_posix() + ".html"
        if page not in pages:
            pages.append(page)
    return pages


def screenshot_path(page: str) -> Path:
    """``_build/screenshots/<page>.png``: ``book/02_activations.html`` -> ``02_activations.png``."""
    name = Path(page).with_suffix("").as_posix().removeprefix("book/").replace("/", "-")
    return SCREENSHOT_DIR / f"{name}.png"


def find_chromium() -> str | None:
    """Path of the Chromium binary (``$CHROMIUM`` first), or None."""
    names = [os.environ["CHROMIUM"]] if os.environ.get("CHROMIUM") else CHROMIUM_NAMES
    return next((path for path in map(shutil.which, names) if path), None)


def build_site() -> None:
    """Run the commands of ``make site`` with this interpreter's environment; fail on the first problem."""
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", REFUSAL_BOOK_PROGRESS="0")
    for command in SITE_COMMANDS:
        program = sys.executable if command[0] == "python" else shutil.which(command[0], path=env["PATH"])
        if program is None:
            pytest.fail(f"cannot build the site: {command[0]!r} is not on the PATH (run `make setup`)", pytrace=False)
        done = subprocess.run([program, *command[1:]], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=1800)
        if done.returncode != 0:
            output = (done.stdout + done.stderr)[-6000:]
            pytest.fail(f"building the site failed: `{' '.join(command)}` exited {done.returncode}:\n{output}",
                        pytrace=False)


class _QuietHandler(SimpleHTTPRequestHandler):
    """Static files, without a log line per request."""

    def log_message(self, format, *args):  # noqa: A002 (the base class's signature)
        pass


class _QuietServer(ThreadingHTTPServer):
    """Ignores connections the browser drops mid-response (a tab closed while a request was in flight)."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass
class LocalSite:
    """A folder served over HTTP on 127.0.0.1."""

    root: Path
    port: int

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, page: str) -> str:
        return f"{self.origin}/{page}"

    def status(self, url: str) -> int:
        """HTTP status of a GET of ``url`` (never through a proxy)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code


@contextlib.contextmanager
def serve(root: Path) -> Iterator[LocalSite]:
    """Serve ``root`` on 127.0.0.1 on a free port, from a background thread, for the duration of the block."""
    server = _QuietServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, name="site-server", daemon=True)
    thread.start()
    try:
        yield LocalSite(root, server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --------------------------------------------------------------------------------------------------------------------
# Chromium over the DevTools protocol
# --------------------------------------------------------------------------------------------------------------------


class DevToolsError(RuntimeError):
    """Chromium did not start, or a DevTools command failed."""


class DevToolsConnection:
    """One DevTools websocket (a page target): commands that await their reply, and event handlers."""

    def __init__(self, websocket):
        self._ws = websocket
        self._next_id = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._handlers: dict[str, list[Callable[[dict], None]]] = defaultdict(list)
        self._tasks: set[asyncio.Task] = set()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, url: str) -> DevToolsConnection:
        from tornado.websocket import websocket_connect

        return cls(await websocket_connect(url, connect_timeout=20, max_message_size=1 << 29))

    def on(self, event: str, handler: Callable[[dict], None]) -> None:
        self._handlers[event].append(handler)

    def spawn(self, command) -> None:
        """Send a command from an event handler without waiting for its reply here (awaited by :meth:`close`)."""
        task = asyncio.ensure_future(command)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def send(self, method: str, timeout: float = 30.0, **params) -> dict:
        self._next_id += 1
        message_id = self._next_id
        reply_future = asyncio.get_running_loop().create_future()
        self._pending[message_id] = reply_future
        try:
            await self._ws.write_message(json.dumps({"id": message_id, "method": method, "params": params}))
            reply = await asyncio.wait_for(reply_future, timeout)
        finally:
            self._pending.pop(message_id, None)
        if "error" in reply:
            raise DevToolsError(f"{method} failed: {reply['error'].get('message', reply['error'])}")
        return reply.get("result", {})

    async def evaluate(self, expression: str, await_promise: bool = False):
        """Value of a JavaScript expression in the page (JSON-serialisable values only)."""
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=await_promise)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise DevToolsError(f"JavaScript failed: {details.get('exception', {}).get('description') or details}")
        return result["result"].get("value")

    async def _read(self) -> None:
        while True:
            message = await self._ws.read_message()
            if message is None:
                for future in self._pending.values():
                    if not future.done():
                        future.set_exception(DevToolsError("the DevTools connection closed"))
                return
            data = json.loads(message)
            if "id" in data:
                future = self._pending.get(data["id"])
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                for handler in self._handlers.get(data.get("method", ""), ()):
                    handler(data.get("params", {}))

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@dataclass
class PageReport:
    """What the browser saw on one page."""

    url: str
    console_errors: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    charts: list[dict] = field(default_factory=list)  # {"id", "rendered", "text"} per chart container
    embed_calls: int = 0  # inline scripts calling vegaEmbed(...)
    maths: list[dict] = field(default_factory=list)  # {"rendered", "text"} per formula (MATH_SELECTOR)
    nav_links: list[str] = field(default_factory=list)  # absolute hrefs of the sidebar's links
    reading: dict = field(default_factory=dict)  # READING_JS: table headers, sideways-scrolling outputs, code, prose


def _remote_value(arg: dict) -> str:
    """Readable text of one console argument (a DevTools RemoteObject)."""
    if "value" in arg:
        return str(arg["value"])
    return str(arg.get("description") or arg.get("unserializableValue") or arg.get("type", "?"))


async def inspect_page(ws_url: str, url: str, screenshot: Path | None = None,
                       chart_timeout: float = CHART_TIMEOUT_S) -> PageReport:
    """Open ``url`` in the page target at ``ws_url`` with only its own origin reachable; report what happened."""
    origin = "{0.scheme}://{0.netloc}/".format(urlsplit(url))
    report = PageReport(url)
    page = await DevToolsConnection.open(ws_url)
    loaded = asyncio.Event()

    def request_paused(params: dict) -> None:
        if params["request"]["url"].startswith(origin):
            page.spawn(page.send("Fetch.continueRequest", requestId=params["requestId"]))
        else:
            report.external_requests.append(params["request"]["url"])
            page.spawn(page.send("Fetch.failRequest", requestId=params["requestId"], errorReason="BlockedByClient"))

    def console_called(params: dict) -> None:
        if params.get("type") in ("error", "assert"):
            text = " ".join(_remote_value(arg) for arg in params.get("args", []))
            report.console_errors.append(f"console.{params['type']}: {text}")

    def exception_thrown(params: dict) -> None:
        details = params.get("exceptionDetails", {})
        text = details.get("exception", {}).get("description") or details.get("text", "")
        report.console_errors.append(f"uncaught exception: {text} ({details.get('url', '')}:"
                                     f"{details.get('lineNumber', '?')})")

    def log_entry(params: dict) -> None:
        entry = params.get("entry", {})
        # Chromium asks every server for /favicon.ico by itself; the book declares no icon, so its 404 is no error.
        if entry.get("level") == "error" and entry.get("url") != origin + "favicon.ico":
            report.console_errors.append(f"{entry.get('source', 'log')}: {entry.get('text', '')} "
                                         f"{entry.get('url', '')}".rstrip())

    page.on("Fetch.requestPaused", request_paused)
    page.on("Runtime.consoleAPICalled", console_called)
    page.on("Runtime.exceptionThrown", exception_thrown)
    page.on("Log.entryAdded", log_entry)
    page.on("Page.loadEventFired", lambda params: loaded.set())
    try:
        await page.send("Fetch.enable", patterns=[{"urlPattern": "*"}])
        for domain in ("Page", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        await page.send("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0], height=VIEWPORT[1],
                        deviceScaleFactor=1, mobile=False)
        navigation = await page.send("Page.navigate", url=url)
        if navigation.get("errorText"):
            raise DevToolsError(f"could not open {url}: {navigation['errorText']}")
        await asyncio.wait_for(loaded.wait(), PAGE_LOAD_TIMEOUT_S)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + chart_timeout
        while True:  # vegaEmbed and MathJax render asynchronously after the load event
            state, maths = await page.evaluate(CHARTS_JS), await page.evaluate(MATHS_JS)
            done = all(chart["rendered"] for chart in state["charts"]) and all(m["rendered"] for m in maths)
            if done or loop.time() > deadline:
                break
            await asyncio.sleep(0.25)
        report.charts, report.embed_calls, report.maths = state["charts"], state["embedCalls"], maths
        report.nav_links = await page.evaluate(NAV_JS)
        report.reading = await page.evaluate(READING_JS)
        await page.evaluate(TWO_FRAMES_JS, await_promise=True)
        if screenshot is not None:
            await _save_screenshot(page, screenshot)
        await asyncio.sleep(0.2)  # let late console messages arrive
    finally:
        await page.close()
    return report


async def _save_screenshot(page: DevToolsConnection, path: Path) -> None:
    """Full-page PNG: the viewport is stretched to the page's height (capped), then captured; written atomically."""
    metrics = await page.send("Page.getLayoutMetrics")
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    height = min(MAX_SCREENSHOT_HEIGHT, max(VIEWPORT[1], math.ceil(size["height"])))
    await page.send("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0], height=height, deviceScaleFactor=1,
                    mobile=False)
    await page.evaluate(TWO_FRAMES_JS, await_promise=True)
    shot = await page.send("Page.captureScreenshot", timeout=120, format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(base64.b64decode(shot["data"]))
    os.replace(tmp, path)


class Chromium:
    """A headless Chromium process and an event loop to drive it, one fresh tab per page."""

    def __init__(self, binary: str, profile_dir: Path):
        self.profile_dir = profile_dir
        self.log_path = profile_dir / "chromium.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}",
                                             "about:blank"], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        self.loop = asyncio.new_event_loop()
        try:
            self.port = self._wait_for_port()
        except BaseException:
            self.quit()
            raise

    def _log_tail(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-3000:]

    def _wait_for_port(self, timeout: float = 60.0) -> int:
        port_file = self.profile_dir / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DevToolsError(f"Chromium exited with status {self.process.returncode} on start:\n"
                                    f"{self._log_tail()}")
            lines = port_file.read_text().split() if port_file.is_file() else []
            if lines and lines[0].isdigit():
                return int(lines[0])
            time.sleep(0.1)
        raise DevToolsError(f"Chromium opened no DevTools port within {timeout:.0f} s:\n{self._log_tail()}")

    def _http(self, path: str, method: str = "GET") -> bytes:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=20) as response:
            return response.read()

    def inspect(self, url: str, screenshot: Path | None = None, chart_timeout: float = CHART_TIMEOUT_S) -> PageReport:
        """Open ``url`` in a new tab, inspect it (see :func:`inspect_page`), close the tab."""
        target = json.loads(self._http("/json/new?about:blank", method="PUT"))
        try:
            coroutine = inspect_page(target["webSocketDebuggerUrl"], url, screenshot, chart_timeout)
            return self.loop.run_until_complete(
                asyncio.wait_for(coroutine, PAGE_LOAD_TIMEOUT_S + chart_timeout + 180))
        finally:
            with contextlib.suppress(OSError):
                self._http(f"/json/close/{target['id']}")

    def quit(self) -> None:
        self.loop.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --------------------------------------------------------------------------------------------------------------------
# Judging a page
# --------------------------------------------------------------------------------------------------------------------


def page_problems(report: PageReport, site: LocalSite, toc: list[str]) -> list[str]:
    """Everything wrong with a page, one line each (empty when the page is fine)."""
    problems = [f"console error: {error}" for error in report.console_errors]
    problems += [f"request to another host (refused): {url}" for url in report.external_requests]
    for chart in report.charts:
        if not chart["rendered"]:
            problems.append(f"chart #{chart['id']} holds no SVG or canvas" +
                            (f" (it shows: {chart['text']!r})" if chart["text"] else ""))
    problems += [f"formula not typeset (MathJax did not run): {m['text']!r}" for m in report.maths if not m["rendered"]]
    if report.embed_calls != len(report.charts):
        problems.append(f"{report.embed_calls} inline vegaEmbed calls but {len(report.charts)} chart containers "
                        f"({CHART_SELECTOR}): some chart was not made by the offline renderer of lib.viz")
    internal = sorted({urldefrag(url).url for url in report.nav_links if url.startswith(site.origin + "/")})
    if not internal:
        problems.append(f"no link to this site in the sidebar ({NAV_SELECTOR})")
    for url in internal:
        status = site.status(url)
        if status != 200:
            problems.append(f"sidebar link {url} answers HTTP {status}")
    listed = {urlsplit(url).path.lstrip("/") for url in internal}
    missing = [page for page in toc if page not in listed]
    if missing:
        problems.append(f"pages of the table of contents missing from the sidebar: {missing}")
    return problems


RAW_COLUMNS = ("n_a", "n_b", "low", "high", "k", "versus")  # code names a report page must not show as headers


def reading_problems(report: PageReport, statements: tuple[str, ...]) -> list[str]:
    """What keeps a page from reading as a report (the conclusions): a table header that is a code name
    (``RAW_COLUMNS``), an output that scrolls sideways, a code cell shown open, or a computed statement that is not
    in the page's prose (each of ``statements`` must occur in some paragraph outside the cell outputs; Sphinx's
    curly apostrophes are read as straight ones)."""
    reading = report.reading
    problems = [f"table header {name!r} is a code name, not a reader's" for name in reading["headers"]
                if name in RAW_COLUMNS]
    problems += [f"output scrolls sideways: {text!r}" for text in reading["scrolling"]]
    if reading["visibleCode"]:
        problems.append(f"{reading['visibleCode']} of {reading['codeCells']} code cells are shown open, not collapsed")
    problems += [f"no paragraph states {text!r}" for text in statements
                 if not any(text in paragraph for paragraph in reading["prose"])]
    return problems


# --------------------------------------------------------------------------------------------------------------------
# Fixtures and tests
# --------------------------------------------------------------------------------------------------------------------

PAGES = toc_pages()
PAGES_WITH_MATHS = ("01_organisms", "04_directions", "05_anatomy", "08_judge_audit")  # written with $...$ / $$...$$


@pytest.fixture(scope="session")
def chromium_binary() -> str:
    binary = find_chromium()
    if binary is None:
        pytest.skip(CHROMIUM_MISSING)
    return binary


@pytest.fixture(scope="session")
def browser(chromium_binary, tmp_path_factory) -> Iterator[Chromium]:
    chromium = Chromium(chromium_binary, tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.quit()


@pytest.fixture(scope="session")
def built_site(chromium_binary) -> Iterator[LocalSite]:
    """The site built as ``make site`` builds it, served on 127.0.0.1 (built only when Chromium is there)."""
    build_site()
    missing = [page for page in PAGES if not (HTML_DIR / page).is_file()]
    if missing:
        pytest.fail(f"the build made no page for {missing} of _toc.yml", pytrace=False)
    with serve(HTML_DIR) as site:
        yield site


def _recipe(makefile: str, target: str) -> tuple[str, str]:
    """(prerequisites, recipe text) of ``target`` in a Makefile."""
    match = re.search(rf"^{re.escape(target)}:([^\n]*)\n((?:\t[^\n]*\n?)*)", makefile, re.MULTILINE)
    assert match, f"the Makefile has no {target!r} target"
    return match.group(1), match.group(2)


def test_site_commands_match_makefile():
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    _, site_recipe = _recipe(makefile, "site")
    for command in SITE_COMMANDS:
        assert " ".join(command[1:]) in site_recipe, f"`make site` no longer runs {' '.join(command)}"
    test_prerequisites, _ = _recipe(makefile, "test")
    assert "browser" in test_prerequisites.split(), "`make test` must install the browser first (`make browser`)"


def test_toc_pages_are_read_in_order(tmp_path):
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nparts:\n  - caption: A\n    chapters:\n"
                                       "      - file: book/ch.ipynb\n        sections:\n          - file: book/s\n"
                                       "  - chapters:\n      - file: book/intro\n", encoding="utf-8")
    assert toc_pages(tmp_path) == ["book/intro.html", "book/ch.html", "book/s.html"]
    assert screenshot_path("book/02_activations.html") == SCREENSHOT_DIR / "02_activations.png"


@pytest.mark.parametrize("page", PAGES, ids=[Path(page).stem for page in PAGES])
def test_page_renders_offline(page, browser, built_site):
    screenshot = screenshot_path(page)
    screenshot.unlink(missing_ok=True)
    report = browser.inspect(built_site.url(page), screenshot)
    problems = page_problems(report, built_site, PAGES)
    assert not problems, f"{page} in headless Chromium:\n  " + "\n  ".join(problems)
    if Path(page).stem in PAGES_WITH_MATHS:
        assert report.maths, f"{page} shows no formula ({MATH_SELECTOR}): is dollarmath still enabled in _config.yml?"
    assert screenshot.stat().st_size > 10_000, f"{screenshot} looks empty"


REPORT_PAGE = "book/09_conclusions.html"
REPORT_STATEMENTS = ("under zero ablation and both definitions of mean ablation", "LAT's second component's own share",
                     "came out more robust than every reference model")


def test_the_conclusions_read_as_a_report(browser, built_site):
    """The conclusions page: computed statements wrap in the prose, tables carry names a reader understands, no
    output scrolls sideways and every code cell is collapsed."""
    report = browser.inspect(built_site.url(REPORT_PAGE))
    assert "replication" in report.reading["headers"], "the replication table is missing from the conclusions"
    problems = reading_problems(report, REPORT_STATEMENTS)
    assert not problems, f"{REPORT_PAGE} does not read as a report:\n  " + "\n  ".join(problems)


def test_reading_check_catches_a_notebook_dump(browser, tmp_path):
    """The net of the report check: a raw header, a sideways-scrolling output, an open code cell and a statement
    printed in an output instead of the prose are each reported; the report form passes."""
    long_line = "x" * 400
    dump = ('<article><div class="cell"><div class="cell_input"><pre>print(statement)</pre></div>'
            f'<div class="cell_output"><pre style="overflow-x:auto;width:300px">{long_line}</pre>'
            '<p>LAT is robust</p><table><tr><th>n_a</th><th>verdict</th></tr></table></div></div></article>')
    report_form = ('<article><details class="hide above-input"><summary>Show code</summary><div class="cell">'
                   '<div class="cell_input"><pre>glue()</pre></div></div></details>'
                   '<p>The verdict: LAT is robust to foreign directions.</p>'
                   '<table><tr><th>prompts</th><th>verdict</th></tr></table></article>')
    for name, body in (("dump.html", dump), ("report.html", report_form)):
        (tmp_path / name).write_text(f"<!DOCTYPE html><html><body>{body}</body></html>", encoding="utf-8")
    with serve(tmp_path) as site:
        dumped, reported = (browser.inspect(site.url(name), chart_timeout=1.0) for name in ("dump.html",
                                                                                           "report.html"))
    assert reading_problems(reported, ("LAT is robust",)) == []
    problems = "\n".join(reading_problems(dumped, ("LAT is robust",)))
    assert "table header 'n_a' is a code name" in problems
    assert f"output scrolls sideways: {long_line[:120]!r}" in problems
    assert "1 of 1 code cells are shown open" in problems
    assert "no paragraph states 'LAT is robust'" in problems


def test_browser_check_catches_broken_pages(browser, tmp_path):
    """The net itself: a chart that fails to render, a missing Vega bundle, a formula MathJax never typeset, a script
    or style from another host, a chart made without the offline renderer and a dead sidebar link are each
    reported; a sound page passes."""
    from bookkit import site_assets
    from lib import viz

    site_assets.write_vega_bundle(tmp_path)
    good_spec = {"data": {"values": [{"a": 1.0}, {"a": 2.0}]}, "mark": "bar",
                 "encoding": {"y": {"field": "a", "type": "quantitative"}}}
    broken_spec = {"data": {"values": [{"a": 1.0}]}, "mark": "bar",
                   "encoding": {"y": {"field": "a", "type": "no-such-type"}}}
    bundle = f'<script src="{viz.BUNDLE_NAME}"></script>'

    def write(name: str, head: str, body: str, links: tuple[str, ...]) -> None:
        nav = "".join(f'<a class="reference internal" href="{link}">{link}</a>' for link in links)
        (tmp_path / name).write_text(f'<!DOCTYPE html><html><head><meta charset="utf-8">{head}</head><body>'
                                     f'<div class="bd-sidebar-primary"><nav>{nav}</nav></div>{body}</body></html>',
                                     encoding="utf-8")

    write("good.html", bundle, viz.spec_to_html(good_spec), ("good.html", "bad.html#top"))
    write("bad.html", bundle + '<link rel="stylesheet" href="https://fonts.example.org/font.css">'
          '<script src="http://203.0.113.9/lib.js"></script>',
          viz.spec_to_html(good_spec) + viz.spec_to_html(broken_spec) +
          '<div id="altair-viz-0"></div><script>window.vegaEmbed("#altair-viz-0", '
          + json.dumps(good_spec) + ");</script>",
          ("good.html", "bad.html", "gone.html"))
    write("nobundle.html", "", viz.spec_to_html(good_spec) + '<span class="math">\\(x^2\\)</span>',
          ("good.html", "bad.html"))

    toc = ["good.html", "bad.html"]
    with serve(tmp_path) as site:
        good, bad, nobundle = (browser.inspect(site.url(name), chart_timeout=3.0)
                               for name in ("good.html", "bad.html", "nobundle.html"))
        assert page_problems(good, site, toc) == []
        assert len(good.charts) == 1 and good.charts[0]["rendered"]

        problems = "\n".join(page_problems(bad, site, toc))
        broken_id = viz.spec_id(broken_spec)
        assert f"chart #{broken_id} holds no SVG or canvas" in problems
        assert f"chart #{viz.spec_id(good_spec)} holds" not in problems
        assert "console error" in problems
        assert "request to another host (refused): https://fonts.example.org/font.css" in problems
        assert "request to another host (refused): http://203.0.113.9/lib.js" in problems
        assert "3 inline vegaEmbed calls but 2 chart containers" in problems
        assert f"sidebar link {site.origin}/gone.html answers HTTP 404" in problems

        problems = "\n".join(page_problems(nobundle, site, toc))
        assert "holds no SVG or canvas (it shows: '[chart not rendered: vega-bundle.js is not loaded" in problems
        assert "formula not typeset (MathJax did not run): '\\\\(x^2\\\\)'" in problems
