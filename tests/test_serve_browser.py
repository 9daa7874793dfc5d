"""`cvformers serve` in a real browser: the server runs as its own process on a free loopback port,
headless Chromium (Debian's `chromium`, driven through playwright with the system executable) types
and clicks, gradio_client calls the same endpoints a script would, and eight concurrent requests
must leave the server's memory where it was.

Screenshots of the four tabs land in a temporary folder, or in ``$CVFORMERS_SCREENSHOTS`` when set:
``CVFORMERS_SCREENSHOTS=docs/images python -m pytest -m browser -s`` refreshes the README's.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
TIMEOUT_MS = 60_000  # one wait in the browser; sampling takes well under a second a request here


def _needs_gradio():
    pytest.importorskip("gradio", reason="the web page needs the ui extra: pip install -e '.[ui]'")
    pytest.importorskip("gradio_client", reason="gradio_client comes with the ui extra")


def _needs_browser():
    pytest.importorskip("playwright.sync_api", reason="playwright (the dev extra) drives the browser")
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: apt-get install chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (what the kernel holds in RAM for it)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _needs_gradio()
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cvformers", "serve", "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server stopped: {log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not answer within 120 s: {log.read_text()}")
            time.sleep(0.3)
        yield url, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Pictures from the shapes data to upload."""
    from cvformers.data.shapes import parse_caption, render
    from cvformers.images import save_png

    folder = tmp_path_factory.mktemp("uploads")
    return [save_png(render(parse_caption(c)), folder / f"{name}.png")
            for name, c in (("red-circle", "a large red circle"), ("green-square", "a large green square"),
                            ("circle-above-square", "a small red circle above a large blue square"))]


def _shots_dir(tmp_path) -> Path:
    folder = Path(os.environ.get("CVFORMERS_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _decode_all(page, gallery: str) -> list:
    """Every image the gallery shows, fetched by its address and decoded."""
    from PIL import Image

    shown = []
    for src in page.locator(f"{gallery} .grid-container img").evaluate_all("els => els.map(e => e.src)"):
        body = page.request.get(src).body()
        with Image.open(io.BytesIO(body)) as im:
            im.load()
            shown.append(im.size)
    return shown


def _set_number(page, field: str, value) -> None:
    box = page.locator(f"{field} input[type=number]")
    box.fill(str(value))
    box.press("Tab")  # the slider takes the typed value when the box loses focus


def _wait_for_images(page, gallery: str, count: int) -> None:
    page.wait_for_function(
        "([sel, n]) => document.querySelectorAll(sel + ' .grid-container img').length === n"
        " && !document.querySelector(sel + ' .wrap.generating')",
        arg=[gallery, count], timeout=TIMEOUT_MS)
    page.wait_for_timeout(400)  # the gallery fades back in from its pending look


def test_the_page_in_chromium(server, pictures, tmp_path):
    _needs_browser()
    from playwright.sync_api import sync_playwright

    url, _, log = server
    shots = _shots_dir(tmp_path)
    with sync_playwright() as p:
        # no sandbox: CI runs as root; no /dev/shm: containers give it 64 MB
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            outside = []  # anything the page asks of a host other than this machine (the network is off)
            page.on("request", lambda r: outside.append(r.url)
                    if not r.url.startswith((url, "data:", "blob:")) else None)
            page.goto(url)
            page.locator("#t2i-generate").wait_for(timeout=TIMEOUT_MS)

            # text to image: three images, each a decodable picture of the tile size
            page.locator("#t2i-prompt textarea, #t2i-prompt input").first.fill("a small red circle above a large blue square")
            _set_number(page, "#t2i-num", 3)
            _set_number(page, "#t2i-candidates", 0)
            page.locator("#t2i-generate").click()
            _wait_for_images(page, "#t2i-gallery", 3)
            assert _decode_all(page, "#t2i-gallery") == [(128, 128)] * 3
            page.locator("#t2i-grid a").first.wait_for(timeout=TIMEOUT_MS)  # the grid PNG to download
            page.get_by_text("Sampling", exact=True).click()  # show the sampling settings in the picture
            page.get_by_text("Top-p", exact=True).wait_for(timeout=TIMEOUT_MS)
            page.screenshot(path=str(shots / "serve-text-to-image.png"), full_page=True)

            # an empty prompt: the library's sentence on the page, then the server still draws
            page.locator("#t2i-prompt textarea, #t2i-prompt input").first.fill("")
            page.locator("#t2i-generate").click()
            page.get_by_text("the prompt is empty").first.wait_for(timeout=TIMEOUT_MS)
            assert "Traceback" not in page.content()
            page.get_by_test_id("toast-close").first.click()
            page.locator("#t2i-prompt textarea, #t2i-prompt input").first.fill("a large purple plus")
            _set_number(page, "#t2i-num", 2)
            page.locator("#t2i-generate").click()
            _wait_for_images(page, "#t2i-gallery", 2)
            assert _decode_all(page, "#t2i-gallery") == [(128, 128)] * 2

            # image prompt: the top rows of an upload, the rest completed
            page.get_by_role("tab", name="Image prompt").click()
            page.locator("#ip-image input[type=file]").set_input_files(str(pictures[2]))
            page.locator("#ip-preview img").first.wait_for(timeout=TIMEOUT_MS)
            page.locator("#ip-prompt textarea, #ip-prompt input").first.fill("a small red circle above a large green plus")
            _set_number(page, "#ip-rows", 3)  # the circle's rows
            page.locator("#ip-generate").click()
            _wait_for_images(page, "#ip-gallery", 8)
            page.screenshot(path=str(shots / "serve-image-prompt.png"), full_page=True)

            # zero-shot: two uploads, CLIP's probabilities as a bar chart
            page.get_by_role("tab", name="Zero-shot").click()
            page.locator("#zs-files input[type=file]").set_input_files([str(p) for p in pictures])
            page.locator("#zs-files").get_by_text("green-square").first.wait_for(timeout=TIMEOUT_MS)
            page.locator("#zs-classify").click()
            page.locator("#zs-chart canvas, #zs-chart .vega-embed svg").first.wait_for(timeout=TIMEOUT_MS)
            page.wait_for_timeout(500)  # the chart animates in
            page.screenshot(path=str(shots / "serve-zero-shot.png"), full_page=True)

            # attention: per-head maps and the rollout of a ViT for an upload
            page.get_by_role("tab", name="Attention").click()
            page.locator("#at-image input[type=file]").set_input_files(str(pictures[1]))
            page.locator("#at-preview img").first.wait_for(timeout=TIMEOUT_MS)
            page.locator("#at-show").click()
            page.locator("#at-picture img").first.wait_for(timeout=TIMEOUT_MS)
            page.screenshot(path=str(shots / "serve-attention.png"), full_page=True)
            assert outside == [], f"the page reached outside this machine: {outside}"
        finally:
            browser.close()
    assert "Traceback" not in log.read_text()


def test_the_api_under_load(server, pictures):
    """gradio_client, as a script would: the endpoints and their refusals, progress per step, one
    queue slot shared by the tabs, then eight concurrent generate calls asking 1..8 images; every
    answer has its count, and the server's memory after them is within 20% of before."""
    from gradio_client import Client, handle_file
    from PIL import Image

    url, proc, _ = server
    client = Client(url, verbose=False)
    gallery, grid = client.predict("a yellow triangle left of a green square", "default", 4, 16, 0, 0.5, 0, 1.0,
                                   1.25, api_name="/generate")
    assert len(gallery) == 4 and all(item["caption"].startswith(f"#{i + 1}  CLIP ") for i, item in enumerate(gallery))
    with Image.open(grid) as im:
        assert "yellow triangle" in im.text["prompt"] and '"candidates": 16' in im.text["cvformers"]
    completions, _ = client.predict(handle_file(str(pictures[0])), "a large red circle", "default", 4, 2, 0,
                                    api_name="/image_prompt")
    assert len(completions) == 2
    with pytest.raises(Exception, match="the prompt is empty"):
        client.predict("", "default", 2, 0, 0, 0.5, 0, 1.0, 1.25, api_name="/generate")

    # uploads that are not images: refused with a sentence, and the server goes on
    broken = Path(grid).with_name("broken.png")
    broken.write_bytes(b"\x89PNG but not really")
    with pytest.raises(Exception, match="broken.png is not a readable image"):
        client.predict(handle_file(str(broken)), "vit_nano_patch4_28", api_name="/attention")
    with pytest.raises(Exception, match="Invalid file type"):
        client.predict([handle_file(__file__)], "circle, square", "a {}", api_name="/zero_shot")

    # progress while sampling: 64 candidates are 4 batches of an 8x8 grid, 256 steps
    job = client.submit("a large purple plus", "default", 4, 64, 0, 0.5, 0, 1.0, 1.25, api_name="/generate")
    reported = set()
    while not job.done():
        for step in job.status().progress_data or []:
            reported.add((step.index, step.length, step.unit))
        time.sleep(0.01)
    assert len(job.result()[0]) >= 1 and reported, "no progress reported while sampling"
    assert {(length, unit) for _, length, unit in reported} == {(256, "steps")}

    # one queue slot for every tab: a quick zero-shot request sent just after a long generation
    # waits for it, instead of taking a core from it
    long = client.submit("a small red circle above a large blue square", "default", 16, 128, 0, 0.5, 0, 1.0, 1.25,
                         api_name="/generate")
    time.sleep(0.2)
    quick = client.submit([handle_file(str(pictures[0]))], "circle, square", "a picture of a {}",
                          api_name="/zero_shot")
    while quick.status().code.name != "PROCESSING" and not quick.done():
        time.sleep(0.002)
    state = long.status()  # how far the long one was when the quick one started: finished, or nearly
    steps = state.progress_data
    assert state.code.name == "FINISHED" or (steps and steps[-1].index >= 0.9 * steps[-1].length), \
        f"the quick request ran beside the long one: {state.code.name}, {steps}"
    assert len(long.result()[0]) >= 1 and quick.result() is not None

    before = rss_mb(proc.pid)
    jobs = [client.submit("a small white square below a cyan circle", "default", n, 0, n, 0.5, 0, 1.0, 1.25,
                          api_name="/generate") for n in range(1, 9)]
    results = [job.result(timeout=120) for job in jobs]
    after = rss_mb(proc.pid)
    assert [len(gallery) for gallery, _ in results] == list(range(1, 9))
    for gallery, _ in results:
        for item in gallery:
            with Image.open(item["image"]) as im:
                assert im.size == (128, 128)
    print(f"\nserver memory: {before:.0f} MB before 8 concurrent requests, {after:.0f} MB after "
          f"({100 * (after - before) / before:+.1f}%)")
    assert abs(after - before) <= 0.2 * before, (before, after)
