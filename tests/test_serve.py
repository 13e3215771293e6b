"""`nanocolor serve` as a person uses it: a real server on a free localhost port, its HTTP API
(good photos, bad uploads, 20 photos at once, a full queue), the command itself, and the page
driven by a real headless Chromium that uploads a photo and waits for its colorized version.

Only 127.0.0.1 is ever contacted. Servers are awaited by polling /api/health, never by sleeping.
"""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the [serve] extra (starlette, uvicorn, python-multipart) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (the [test] extra) is not installed")

from conftest import REPO, colorful_rgb, tiny_weights  # noqa: E402
from nanocolor import serve  # noqa: E402
from nanocolor.color import rgb_to_lab  # noqa: E402

STARTUP_TIMEOUT = 60.0  # seconds to wait for /api/health: generous, the CI machine is shared
SAMPLE_PHOTOS = sorted((REPO / "data" / "sample").rglob("*.jpg"))
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


# -- helpers -------------------------------------------------------------------------------------

def wait_for_health(url: str, timeout: float = STARTUP_TIMEOUT, process: subprocess.Popen | None = None) -> dict:
    """Poll GET url/api/health until it answers 200 (or fail after timeout seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}: {process.stderr.read()}")
        try:
            response = httpx.get(f"{url}/api/health", timeout=5)
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer /api/health within {timeout} s")
        time.sleep(0.05)


@contextmanager
def running_server(limits: serve.Limits, weights: list[str] | None = None) -> Iterator[str]:
    """A uvicorn server in a thread on a free 127.0.0.1 port; yields its base URL."""
    app = serve.create_app(serve.load_colorizers(weights or []), limits)
    sock = serve.listening_socket("127.0.0.1", 0)
    server = serve.make_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_for_health(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "the server thread did not stop"


def encoded(rgb: np.ndarray, fmt: str = "PNG", **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def gray_photo(path: Path) -> bytes:
    """A bundled color photo as a grayscale PNG: what a user would bring."""
    with Image.open(path) as img:
        return encoded(np.asarray(img.convert("L").convert("RGB")))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels: a decompression bomb's calling card."""
    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 7))
            + chunk(b"IEND", b""))


def mean_chroma(rgb_uint8: np.ndarray) -> float:
    lab = rgb_to_lab(rgb_uint8[..., :3].astype(np.float64) / 255.0)
    return float(np.hypot(lab[..., 1], lab[..., 2]).mean())


def post_photo(url: str, data: bytes, name: str = "photo.png", **fields: str) -> httpx.Response:
    return httpx.post(f"{url}/api/colorize", files={"file": (name, data)}, data=fields, timeout=120)


def decoded(response: httpx.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


LIMITS = serve.Limits(max_megapixels=1.0, max_upload_mb=2.0, jobs=2, queue=32)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with running_server(LIMITS) as base:
        yield base


# -- the API -------------------------------------------------------------------------------------

def test_health_weights_and_page(url):
    health = httpx.get(f"{url}/api/health").json()
    assert health["status"] == "ok" and health["models"] == 1
    assert httpx.get(f"{url}/api/weights").json() == [
        {"name": "shipped (colornet.npz)", "work_size": 128, "default": True}]
    page = httpx.get(url)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'type="file"' in page.text and "/api/colorize" in page.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text), "the page must not load outside assets"


def test_colorize_gray_png_returns_a_colored_png_of_the_same_size(url):
    photo = SAMPLE_PHOTOS[0]
    result = decoded(post_photo(url, gray_photo(photo)))
    assert result.size == Image.open(photo).size and result.mode == "RGB"
    assert mean_chroma(np.asarray(result)) > 3.0, "the output should have color"
    lightness_in = rgb_to_lab(np.asarray(Image.open(photo).convert("L").convert("RGB")) / 255.0)[..., 0]
    lightness_out = rgb_to_lab(np.asarray(result) / 255.0)[..., 0]
    assert np.abs(lightness_out - lightness_in).max() < 0.5, "the output keeps the input's lightness"


def test_colorize_jpeg_and_odd_sizes_keep_size_and_alpha(url):
    jpeg = decoded(post_photo(url, (REPO / "docs" / "outside" / "rocket.jpg").read_bytes(), "rocket.jpg"))
    assert jpeg.size == (640, 427)
    tiny = decoded(post_photo(url, encoded(colorful_rgb(1, 23))))
    assert tiny.size == (23, 1)
    rgba = np.dstack([colorful_rgb(30, 41), np.arange(30 * 41, dtype=np.uint8).reshape(30, 41)])
    with_alpha = decoded(post_photo(url, encoded(rgba)))
    assert with_alpha.mode == "RGBA" and with_alpha.size == (41, 30)
    assert np.array_equal(np.asarray(with_alpha)[..., 3], rgba[..., 3])


def test_weights_field_picks_a_model(url):
    assert post_photo(url, encoded(colorful_rgb(16, 16)), weights="shipped (colornet.npz)").status_code == 200
    response = post_photo(url, encoded(colorful_rgb(16, 16)), weights="nope.npz")
    assert response.status_code == 400 and "unknown weights" in response.json()["error"]


GOOD_PNG = encoded(colorful_rgb(40, 60))
BAD_UPLOADS = {
    "empty": (b"", 400, "empty file (0 bytes)"),
    "text": (b"hello, this is not a photo\n" * 10, 415, "not an image"),
    "truncated png": (GOOD_PNG[:len(GOOD_PNG) // 2], 400, "cannot decode"),
    "decompression bomb": (png_declaring(20000, 20000), 413, "20000x20000 pixels is above"),
    "over --max-megapixels": (encoded(np.zeros((1001, 1000, 3), np.uint8)), 413, "1000x1001 pixels is above"),
    "over --max-upload-mb": (os.urandom(3 * 2**20), 413, "above this server's limit of 2 MiB"),
}


@pytest.mark.parametrize("name", BAD_UPLOADS)
def test_bad_uploads_get_a_4xx_with_one_line_json(url, name):
    data, status, message = BAD_UPLOADS[name]
    response = post_photo(url, data)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert "\n" not in response.text and message in response.json()["error"]


def test_bad_requests_get_a_4xx_with_one_line_json(url):
    cases = [httpx.post(f"{url}/api/colorize", content=GOOD_PNG, headers={"content-type": "image/png"}),
             httpx.post(f"{url}/api/colorize", data={"weights": "x"}, files={"other": ("a.png", GOOD_PNG)}),
             httpx.post(f"{url}/api/colorize", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"}),
             httpx.get(f"{url}/api/colorize"), httpx.get(f"{url}/no/such/page")]
    assert [r.status_code for r in cases] == [400, 400, 400, 405, 404]
    for response in cases:
        assert set(response.json()) == {"error"} and "\n" not in response.text


def test_the_server_keeps_serving_after_bad_uploads(url):
    for data, _, _ in BAD_UPLOADS.values():
        post_photo(url, data)
    assert httpx.get(f"{url}/api/health").json()["status"] == "ok"
    assert decoded(post_photo(url, GOOD_PNG)).size == (60, 40)


def test_twenty_parallel_uploads_all_complete_while_health_stays_responsive(url):
    photos = SAMPLE_PHOTOS[::len(SAMPLE_PHOTOS) // 20][:20]
    uploads = [gray_photo(p) for p in photos]
    health_seconds = []

    def poll_health(stop: threading.Event) -> None:
        while not stop.is_set():
            start = time.perf_counter()
            assert httpx.get(f"{url}/api/health", timeout=30).status_code == 200
            health_seconds.append(time.perf_counter() - start)
            time.sleep(0.1)

    stop = threading.Event()
    with ThreadPoolExecutor(21) as pool:
        poller = pool.submit(poll_health, stop)
        start = time.perf_counter()
        responses = list(pool.map(lambda data: post_photo(url, data), uploads))
        elapsed = time.perf_counter() - start
        stop.set()
        poller.result()
    for photo, response in zip(photos, responses):
        assert decoded(response).size == Image.open(photo).size
    print(f"20 parallel uploads: {elapsed:.1f} s; /api/health during them: max {max(health_seconds):.3f} s")
    assert max(health_seconds) < 5.0, "the event loop must stay free while photos are colorized"


def test_a_full_queue_answers_503_and_then_recovers(monkeypatch):
    release, started = threading.Event(), threading.Event()
    real = serve.colorize_bytes

    def slow_colorize(*args):
        started.set()
        assert release.wait(60)
        return real(*args)

    monkeypatch.setattr(serve, "colorize_bytes", slow_colorize)
    with running_server(serve.Limits(queue=1)) as base, ThreadPoolExecutor(1) as pool:
        first = pool.submit(post_photo, base, GOOD_PNG)
        assert started.wait(60)
        busy = post_photo(base, GOOD_PNG)
        assert busy.status_code == 503 and "busy" in busy.json()["error"]
        assert httpx.get(f"{base}/api/health").json()["in_progress"] == 1
        release.set()
        assert decoded(first.result(timeout=120)).size == (60, 40)
        assert decoded(post_photo(base, GOOD_PNG)).size == (60, 40)


def test_uploads_stay_in_memory(monkeypatch):
    """A 1.5 MB upload (above Starlette's 1 MB spool threshold) is parsed without a temporary
    file: creating one would fail this request."""
    def no_temporary_files(*args, **kwargs):
        raise AssertionError("an upload was about to be written to a temporary file")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_temporary_files)
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    data = encoded(noise)
    assert len(data) > 2**20
    with running_server(serve.Limits(max_upload_mb=4)) as base:
        assert decoded(post_photo(base, data)).size == (700, 700)


def test_the_picked_weights_are_the_ones_that_run(tmp_path):
    """Two different models offered (not byte copies): each name the client picks gets that model's
    colors, exactly as the model colorizes the photo alone; a server that always ran the first one fails."""
    first, second = tiny_weights(tmp_path / "first.npz", seed=1), tiny_weights(tmp_path / "second.npz", seed=2)
    photo = encoded(colorful_rgb(24, 32))
    with running_server(LIMITS, [str(first), str(second)]) as base:
        names = [m["name"] for m in httpx.get(f"{base}/api/weights").json()]
        assert names == [str(first), str(second), "shipped (colornet.npz)"]
        served = {name: np.asarray(decoded(post_photo(base, photo, weights=name))) for name in names}
    for colorizer in serve.load_colorizers([str(first), str(second)]):
        alone = np.asarray(Image.open(io.BytesIO(serve.colorize_bytes(colorizer, photo, LIMITS.max_pixels))))
        assert np.array_equal(served[colorizer.name], alone), colorizer.name
    assert not np.array_equal(served[str(first)], served[str(second)])  # the two models differ


def stalled_upload(base: str) -> socket.socket:
    """A client that sends the headers and the first 1,000 bytes of a 100 kB upload, then stops."""
    start = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"p.png\"\r\n"
             b"Content-Type: image/png\r\n\r\n" + os.urandom(1000))
    port = int(base.rsplit(":", 1)[1])
    client = socket.create_connection(("127.0.0.1", port), timeout=STARTUP_TIMEOUT)
    client.sendall(b"POST /api/colorize HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   b"Content-Type: multipart/form-data; boundary=b\r\n"
                   b"Content-Length: 100000\r\n\r\n" + start)
    return client


def response_head(client: socket.socket) -> bytes:
    """The status line and headers the server sends (waits for them; the socket's timeout bounds it)."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = client.recv(4096)
        if not chunk:
            break
        received += chunk
    return received


def test_stalled_uploads_are_dropped_and_free_the_queue():
    """Defect: a client that sent part of an upload and stalled held its place in the queue for ever:
    three of them filled --queue 3 and good uploads got 503. The body now has a deadline (here 0.5 s
    plus 1 s per 64 KiB); the test waits for the server's answer to each stalled client, not a guessed time."""
    limits = serve.Limits(queue=3, upload_seconds=0.5, min_upload_kib=64)
    with running_server(limits) as base:
        clients = [stalled_upload(base) for _ in range(3)]
        try:
            heads = [response_head(client) for client in clients]
        finally:
            for client in clients:
                client.close()
        for head in heads:
            assert head.startswith(b"HTTP/1.1 408 "), head
        limits.upload_seconds = STARTUP_TIMEOUT  # the good upload below must not race the short deadline
        assert httpx.get(f"{base}/api/health").json()["in_progress"] == 0
        assert decoded(post_photo(base, GOOD_PNG)).size == (60, 40)


# -- the command ---------------------------------------------------------------------------------

def start_command(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("NANOCOLOR_DEVICE", None)
    return subprocess.Popen([sys.executable, "-m", "nanocolor", "serve", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("stop, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)],
                         ids=["ctrl-c", "sigterm"])
def test_nanocolor_serve_command_serves_until_stopped(tmp_path, stop, exit_code):
    weights = tmp_path / "mine.npz"
    shutil.copy(serve.DEFAULT_WEIGHTS, weights)
    process = start_command("--port", "0", "--weights", str(weights))
    try:
        line = process.stdout.readline()  # printed once the models are loaded and the port is bound
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, f"no address in {line!r}; stderr: {process.stderr.read() if process.poll() is not None else ''}"
        base = f"http://127.0.0.1:{match.group(1)}"
        assert wait_for_health(base, process=process)["models"] == 2
        models = httpx.get(f"{base}/api/weights").json()
        assert [m["name"] for m in models] == [str(weights), "shipped (colornet.npz)"] and models[0]["default"]
        assert decoded(post_photo(base, GOOD_PNG)).size == (60, 40)
    finally:
        process.send_signal(stop)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == exit_code, stderr
    assert "Traceback" not in stderr


class NoServer:
    """Stands in for uvicorn's server: main() returns as soon as it would start serving."""
    started = 0

    def __init__(self, app):
        pass

    def run(self, sockets):
        NoServer.started += 1
        for sock in sockets:
            sock.close()


@pytest.mark.parametrize("args, message", [
    (["--port", "99999"], "--port must be at least 0 and at most 65535, got 99999"),
    (["--port", "-1"], "--port must be at least 0"),
    (["--max-upload-mb", "nan"], "--max-upload-mb must be finite and above 0, got nan"),
    (["--max-upload-mb", "inf"], "--max-upload-mb must be finite and above 0, got inf"),
    (["--max-megapixels", "nan"], "--max-megapixels must be finite and above 0, got nan"),
    (["--upload-timeout", "0"], "--upload-timeout must be above 0"),
    (["--min-upload-rate", "-1"], "--min-upload-rate must be above 0"),
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--queue", "0"], "--queue must be at least 1"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_serve_checks_the_port_and_every_number_before_it_starts(monkeypatch, capsys, args, message):
    """Defects: --port 99999 ended in an OverflowError traceback; --max-upload-mb nan (or inf) and
    --max-megapixels nan started a server that answered every upload, even a good photo, with 500."""
    monkeypatch.setattr(serve, "make_server", NoServer)
    NoServer.started = 0
    assert serve.main(["--host", "127.0.0.1", *args]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("nanocolor serve: error: ") and message in err[0], err
    assert NoServer.started == 0


def test_serve_on_a_network_address_warns_that_there_is_no_login(monkeypatch, capsys):
    monkeypatch.setattr(serve, "make_server", NoServer)
    assert serve.main(["--host", "127.0.0.1", "--port", "0"]) == 0
    assert capsys.readouterr().err == ""
    assert serve.main(["--host", "0.0.0.0", "--port", "0"]) == 0  # bound for a moment, never listening
    assert capsys.readouterr().err.splitlines() == [
        "nanocolor serve: warning: listening on 0.0.0.0, not only on this machine; there is no login, "
        "so anyone who can reach it on the network can use it"]


@pytest.mark.parametrize("args, message", [
    (["--weights", "no/such.npz"], "no/such.npz"),
    (["--max-megapixels", "0"], "--max-megapixels must be above 0"),
    (["--device", "tpu"], "tpu"),
    (["--work-size", "5000"], "--work-size must be at most"),
])
def test_nanocolor_serve_bad_settings_are_one_line_and_exit_2(args, message):
    process = start_command("--port", "0", *args)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nanocolor serve: error:") and message in lines[0]


def test_nanocolor_serve_port_in_use_is_one_line_and_exit_2():
    with serve.listening_socket("127.0.0.1", 0) as taken:
        taken.listen()
        process = start_command("--port", str(taken.getsockname()[1]))
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2 and "cannot listen on 127.0.0.1:" in stderr and len(stderr.splitlines()) == 1


# -- the page in a real browser ------------------------------------------------------------------

def chromium_driver(download_dir: Path, profile_dir: Path):
    """Headless Chromium (Debian's chromium + chromium-driver) under selenium, offline flags."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"no Chromium: {CHROMIUM} and {CHROMEDRIVER} are needed "
                    "(apt-get install chromium chromium-driver; .ci/run does this)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the [test] extra) is not installed")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile_dir}", "--window-size=1000,1040"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir)})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


FETCH_AS_BASE64 = """
const [src, done] = arguments;
fetch(src).then(r => r.arrayBuffer()).then(buffer => {
  let text = ""; for (const byte of new Uint8Array(buffer)) text += String.fromCharCode(byte);
  done(btoa(text));
}).catch(err => done("error: " + err));
"""


def test_page_in_headless_chromium_colorizes_uploaded_photos(url, tmp_path):
    """Choose two photos on the page, wait for both colorized images, check them, take a screenshot
    (also written to $NANOCOLOR_SCREENSHOT when set: that is how docs/serve.png is made)."""
    photos = [REPO / "docs" / "outside" / "rocket.jpg", REPO / "docs" / "outside" / "chelsea.png"]
    gray_dir = tmp_path / "upload"
    gray_dir.mkdir()
    uploads = []
    for photo in photos:  # what a user brings: gray photos
        uploads.append(gray_dir / f"{photo.stem}.png")
        Image.open(photo).convert("L").save(uploads[-1])
    driver = chromium_driver(tmp_path / "downloads", tmp_path / "profile")
    try:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
        driver.set_script_timeout(60)
        driver.get(url)
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#weights option"))
        driver.find_element(By.ID, "file").send_keys("\n".join(str(p) for p in uploads))
        WebDriverWait(driver, 180).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result[data-state=done]")) == len(uploads)
            or d.find_elements(By.CSS_SELECTOR, ".result[data-state=error]"))
        assert not driver.find_elements(By.CSS_SELECTOR, ".result[data-state=error]"), \
            driver.find_element(By.CSS_SELECTOR, ".result[data-state=error] .status").text
        for card in driver.find_elements(By.CSS_SELECTOR, ".result"):
            name = card.find_element(By.TAG_NAME, "h2").text
            img = card.find_element(By.CSS_SELECTOR, "img.colorized")
            png = driver.execute_async_script(FETCH_AS_BASE64, img.get_attribute("src"))
            result = Image.open(io.BytesIO(base64.b64decode(png)))
            assert result.size == Image.open(gray_dir / name).size
            assert mean_chroma(np.asarray(result.convert("RGB"))) > 3.0, f"{name}: no color"
            link = card.find_element(By.CSS_SELECTOR, "a.download")
            assert link.get_attribute("download") == f"{Path(name).stem}_color.png"
        screenshot = tmp_path / "serve.png"
        assert driver.save_screenshot(str(screenshot))
        assert Image.open(screenshot).size[0] > 500
        if os.environ.get("NANOCOLOR_SCREENSHOT"):
            shutil.copy(screenshot, os.environ["NANOCOLOR_SCREENSHOT"])
    finally:
        driver.quit()
