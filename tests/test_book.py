"""The built book in a real browser: every equation typeset, every figure loaded, nothing fetched
from outside the build.

The test builds nothing: `book/build.sh` builds the book (warnings are errors) and CI runs it
before the tests. Each page of `book/_build/html` is opened in headless Chromium, driven through
the DevTools protocol over a pipe (`--remote-debugging-pipe`: JSON messages ended by a NUL byte,
commands on fd 3, answers and events on fd 4), so the test needs no package beyond the standard
library. Every request a page makes is recorded; any that is not a file inside the build is
failed before it leaves the browser (and host names resolve nowhere), so the check itself never
touches the network.

Skipped, with the reason printed, where Chromium (Debian: `apt-get install chromium`) or the
built book is missing; `.ci/run` installs and builds both and sets TARFLOW_BOOK_REQUIRED=1, which
turns those skips into failures.

The reference picture `book/reference_page.png` (a page with equations and a figure) is made by
`python tests/test_book.py --screenshot`.
"""
import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = Path(os.environ.get("TARFLOW_BOOK_HTML", ROOT / "book" / "_build" / "html")).resolve()  # another build to check
SCREENSHOT_PAGE = "notebooks/01_patchify.html"
SCREENSHOT = ROOT / "book" / "reference_page.png"

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--remote-debugging-pipe", "about:blank"]

# Runs in the page after its load event: waits for MathJax and the images, then reports.
# Raw TeX is looked for in the visible text outside code, scripts and typeset math.
INSPECT = r"""
(async () => {
  const mj = window.MathJax;
  if (mj && mj.startup && mj.startup.promise) { await mj.startup.promise; }
  await Promise.all(Array.from(document.images).map(img => img.complete ? null :
      new Promise(done => { img.addEventListener('load', done); img.addEventListener('error', done); })));
  const items = (mj && mj.startup && mj.startup.document) ? Array.from(mj.startup.document.math) : [];
  const errors = [];
  for (const item of items) {
    const mml = mj.startup.toMML(item.root);
    // an error, an undefined macro (shown in red), or a macro left as text inside \text{}
    if (/<merror|mathcolor="red"|<mtext[^>]*>[^<]*\\/.test(mml)) { errors.push(item.math); }
  }
  const spans = Array.from(document.querySelectorAll('span.math, div.math'));
  const walker = document.createTreeWalker(document.documentElement, NodeFilter.SHOW_TEXT);
  const raw = [];
  const tex = /\\[()\[\]]|\$\$|\$[^$\s][^$]*\$|\\[A-Za-z]{2,}/;
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentElement;
    if (!parent || parent.closest('head, script, style, pre, code, textarea, mjx-container')) { continue; }
    const match = node.textContent.match(tex);
    if (match) { raw.push(node.textContent.trim().slice(0, 80)); }
  }
  return {
    mathjax: !!(mj && mj.startup && mj.startup.document),
    math_elements: spans.length,
    untypeset: spans.filter(s => !s.querySelector('mjx-container')).map(s => s.textContent.slice(0, 80)),
    typeset: document.querySelectorAll('mjx-container').length,
    math_errors: errors.map(t => t.slice(0, 80)),
    raw_tex: raw,
    images: document.images.length,
    broken_images: Array.from(document.images).filter(img => !(img.complete && img.naturalWidth > 0))
        .map(img => img.getAttribute('src')),
  };
})()
"""


def find_chromium():
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class Browser:
    """Headless Chromium with one page, driven over the DevTools pipe."""

    def __init__(self, binary, timeout=60.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="tarflow-book-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def give_pipe_fds():  # in the child: the pipe ends become fds 3 and 4, kept across exec
            high_r, high_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w))
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.process = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self.profile}"],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, preexec_fn=give_pipe_fds, close_fds=False)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events = []
        self.session = None
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            self.send(f"{domain}.enable")
        # Every request outside file:// pauses here and is failed: nothing leaves the machine.
        self.send("Fetch.enable", {"patterns": [{"urlPattern": "*"}]})

    def close(self):
        try:
            self.send("Browser.close", session=False)
        except (OSError, TimeoutError, RuntimeError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        shutil.rmtree(self.profile, ignore_errors=True)

    def _read_message(self, deadline):
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _handle_event(self, message):
        if message.get("method") == "Fetch.requestPaused":
            params = message["params"]
            url = params["request"]["url"]
            if url.startswith("file:"):
                self.send("Fetch.continueRequest", {"requestId": params["requestId"]}, wait=False)
            else:
                self.send("Fetch.failRequest", {"requestId": params["requestId"], "errorReason": "BlockedByClient"},
                          wait=False)
        self.events.append(message)

    def send(self, method, params=None, session=True, wait=True):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        if not wait:
            return None
        sent, deadline = self._next_id, time.monotonic() + self.timeout
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") == sent:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]
            if "method" in answer:
                self._handle_event(answer)

    def wait_for(self, method):
        deadline = time.monotonic() + self.timeout
        while not any(event.get("method") == method for event in self.events):
            message = self._read_message(deadline)
            if "method" in message:
                self._handle_event(message)

    def open(self, url):
        """Load `url`, run INSPECT in it; returns (report, urls requested, urls that failed to load)."""
        self.events = []
        self.send("Page.navigate", {"url": url})
        self.wait_for("Page.loadEventFired")
        result = self.send("Runtime.evaluate", {"expression": INSPECT, "awaitPromise": True, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"inspecting {url}: {result['exceptionDetails']}")
        requested, failed, ids = [], [], {}
        for event in self.events:
            if event.get("method") == "Network.requestWillBeSent":
                ids[event["params"]["requestId"]] = event["params"]["request"]["url"]
                requested.append(event["params"]["request"]["url"])
            elif event.get("method") == "Network.loadingFailed" and event["params"]["requestId"] in ids:
                # (a request of the page before, cut short by this navigation, is not this page's)
                failed.append(ids[event["params"]["requestId"]] + " " + event["params"]["errorText"])
        return result["result"]["value"], requested, failed

    def screenshot(self, url, path, width=1100, height=1300, scroll_to="img"):
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        self.open(url)
        self.send("Runtime.evaluate", {"expression": f"document.querySelector('{scroll_to}').scrollIntoView("
                                                     "{block: 'center'})"})
        time.sleep(0.5)
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        Path(path).write_bytes(base64.b64decode(data))


def outside(url, build):
    """True when `url` is not a file inside the directory `build` (data: URLs are in the page)."""
    parsed = urlparse(url)
    if parsed.scheme in ("data", "blob", "about"):
        return False
    if parsed.scheme != "file":
        return True
    return not Path(os.path.normpath(unquote(parsed.path))).is_relative_to(build)


def problems(report, requested, failed, build):
    """Everything wrong with one page, as readable lines (empty when the page is fine)."""
    found = [f"request outside the build: {url}" for url in requested if outside(url, build)]
    found += [f"failed to load: {line}" for line in failed]
    found += [f"not typeset: {text!r}" for text in report["untypeset"]]
    found += [f"MathJax error in: {text!r}" for text in report["math_errors"]]
    found += [f"raw TeX left in the text: {text!r}" for text in report["raw_tex"]]
    found += [f"figure did not load: {src}" for src in report["broken_images"]]
    if report["math_elements"] and not report["mathjax"]:
        found.append("the page has equations but MathJax did not run")
    return found


def expected_pages():
    """The HTML page every chapter (book/*.md) and every notebook should have."""
    pages = [f"book/{p.stem}.html" for p in sorted((ROOT / "book").glob("*.md")) if p.name != "README.md"]
    pages += [f"notebooks/{p.stem}.html" for p in sorted((ROOT / "notebooks").glob("*.ipynb"))]
    return pages


def skip_or_fail(reason):
    print(f"\ntests/test_book.py skipped: {reason}")
    if os.environ.get("TARFLOW_BOOK_REQUIRED") == "1":
        pytest.fail(f"{reason} (TARFLOW_BOOK_REQUIRED=1)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    binary = find_chromium()
    if binary is None:
        skip_or_fail("no Chromium found (apt-get install chromium, or set CHROMIUM=/path/to/chrome)")
    if not (BUILD / "index.html").exists():
        skip_or_fail(f"the book is not built ({BUILD} is missing; run book/build.sh)")
    chromium = Browser(binary)
    yield chromium
    chromium.close()


def all_built_pages(build):
    """Every HTML page of the build except assets and redirects (index.html only points at the intro)."""
    return sorted(p.relative_to(build).as_posix() for p in build.rglob("*.html")
                  if p.parts[len(build.parts)] not in ("_static", "_sources")
                  and 'http-equiv="Refresh"' not in p.read_text()[:500])


def test_every_chapter_and_notebook_is_built(browser):
    assert 'url=book/intro.html' in (BUILD / "index.html").read_text()
    missing = [page for page in expected_pages() if not (BUILD / page).exists()]
    assert not missing, f"not in the book (add them to book/_toc.yml): {missing}"


def test_every_page_typeset_with_figures_and_nothing_from_outside(browser):
    pages = all_built_pages(BUILD)
    assert len(pages) >= len(expected_pages())
    report_lines, equations, figures = [], 0, 0
    for page in pages:
        report, requested, failed = browser.open((BUILD / page).as_uri())
        report_lines += [f"{page}: {line}" for line in problems(report, requested, failed, BUILD)]
        equations += report["typeset"]
        figures += report["images"]
        if page.startswith("notebooks/"):
            assert report["images"] > 0, f"{page} shows no figure"
    print(f"\n{len(pages)} pages, {equations} equations typeset, {figures} figures loaded")
    assert not report_lines, "\n".join(report_lines)
    assert equations > 500 and figures >= 8


def test_latex_source_is_named_after_the_project_and_defines_the_macros():
    """The PDF route: `book/build.sh --builder latex` (CI runs it) writes a complete LaTeX file."""
    tex = BUILD.parent / "latex" / "tarflow_ref.tex"
    if not tex.exists():
        skip_or_fail(f"no LaTeX build ({tex} is missing; run book/build.sh --builder latex)")
    text = tex.read_text()
    assert text.count("\\begin{document}") == 1 and text.rstrip().endswith("\\end{document}")
    assert "\\title{tarflow\\_ref:" in text
    sys.path.insert(0, str(ROOT / "book" / "_ext"))
    from tarflow_book import MACROS
    preamble = text[:text.index("\\begin{document}")]
    for name, body in MACROS.items():
        assert f"\\providecommand{{\\{name}}}{{{body}}}" in preamble
        assert f"\\{name}" in text[len(preamble):], f"no page uses \\{name} any more"


@pytest.fixture
def planted(browser, tmp_path):
    """A copy of the build to plant failures in; returns (copy, check(page) -> problems)."""
    copy = tmp_path / "html"
    shutil.copytree(BUILD, copy)

    def check(page):
        return problems(*browser.open((copy / page).as_uri()), copy)
    assert check("book/patchify.html") == []
    return copy, check


def plant(path, old, new):
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_catches_raw_tex_and_an_undefined_macro(planted):
    copy, check = planted
    page = copy / "book" / "patchify.html"
    plant(page, '<span class="math notranslate nohighlight">', '<span class="notranslate">')
    assert any(line.startswith("raw TeX left") for line in check("book/patchify.html"))
    shutil.copy(BUILD / "book" / "patchify.html", page)
    plant(page, '"macros": {"R": "\\\\mathbb{R}"}', '"macros": {}')
    found = check("book/patchify.html")
    assert found and all(line.startswith("MathJax error in:") for line in found), found
    assert any("\\R" in line for line in found)


def test_catches_an_outside_request(planted):
    copy, check = planted
    plant(copy / "book" / "flow.html", "</body>", '<img src="https://example.invalid/pixel.png"></body>')
    found = check("book/flow.html")
    assert any(line == "request outside the build: https://example.invalid/pixel.png" for line in found), found
    plant(copy / "book" / "attention.html", "</head>", '<link rel="stylesheet" href="file:///etc/hostname"></head>')
    found = check("book/attention.html")
    assert any(line == "request outside the build: file:///etc/hostname" for line in found), found


def test_catches_a_missing_figure(planted):
    copy, check = planted
    page = copy / "notebooks" / "03_affine_flow.html"
    figure = re.search(r'<img [^>]*src="\.\./(_images/[^"]+)"', page.read_text()).group(1)
    (copy / figure).unlink()
    found = check("notebooks/03_affine_flow.html")
    assert any(line == f"figure did not load: ../{figure}" for line in found), found


if __name__ == "__main__":
    if sys.argv[1:] != ["--screenshot"]:
        sys.exit("usage: python tests/test_book.py --screenshot   (writes book/reference_page.png)")
    chromium = Browser(find_chromium())
    try:
        chromium.screenshot((BUILD / SCREENSHOT_PAGE).as_uri(), SCREENSHOT)
    finally:
        chromium.close()
    print(f"wrote {SCREENSHOT.relative_to(ROOT)}")
