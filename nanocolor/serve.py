"""`nanocolor serve`: colorize photos in the browser, on a page served from this machine.

    nanocolor serve                                   # open http://127.0.0.1:8000
    nanocolor serve --weights runs/demo/model.npz     # offer a trained model beside the shipped one
    nanocolor serve --host 0.0.0.0 --port 8080        # reachable from other machines (no login!)

What it serves (Starlette on uvicorn; multipart forms parsed by python-multipart):

    GET  /                the page (nanocolor/serve_page.html, no outside assets: works offline)
    GET  /api/health      {"status": "ok", ...} once the models are loaded
    GET  /api/weights     the models to choose from: [{"name": ..., "default": true}, ...]
    POST /api/colorize    a multipart form with `file` (an image) and optional `weights` (a name)
                          -> image/png of the input's size; a bad request -> 4xx {"error": "..."}

How it stays responsive and bounded:
- Each model is loaded once, at start. The network runs in a worker thread, never on the event
  loop, so the page and /api/health answer while photos are being colorized.
- At most `--jobs` photos are decoded, colorized and encoded at once (an anyio CapacityLimiter);
  the network itself runs one photo at a time (a lock: layers keep per-call buffers, and they
  already spread one photo over all CPU cores).
- At most `--queue` colorize requests are admitted at once (uploading, waiting or working); one
  more gets 503 at once. Uploads are kept in memory, never on disk, and cut off at
  `--max-upload-mb`; images above `--max-megapixels` are refused from their header, before
  decoding. Memory is therefore bounded by about queue x upload size + jobs x one photo's work.
- An upload must arrive within `--upload-timeout` seconds plus one second per `--min-upload-rate`
  KiB received; a client that stalls or trickles gets 408 and its place in the queue is freed.
"""
from __future__ import annotations

import argparse
import ipaddress
import signal
import socket
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import anyio
import numpy as np
import uvicorn

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from . import __version__, backend, engine, options
from .data import ImageError, photo_arrays
from .data import decode_image as decode_image_file
from .infer import (DEFAULT_WEIGHTS, MAX_WORK_SIZE, check_work_size, colorize_array, encode_png, load_colorizer,
                    weights_file)
from .pipes import ends_quietly_on_closed_stdout
from .serialize import CorruptFileError

PAGE = Path(__file__).resolve().parent / "serve_page.html"
FORM_OVERHEAD = 64 * 1024  # bytes of multipart boundaries, headers and small fields around a file


class UploadError(Exception):
    """A request the server refuses: an HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Colorizer:
    """One loaded model and the name the page shows for it."""
    name: str
    path: Path
    model: object  # a ColorNet
    work_size: int


@dataclass
class Limits:
    """What one server accepts and how much it does at once."""
    max_megapixels: float = 16.0
    max_upload_mb: float = 50.0
    jobs: int = 2
    queue: int = 32
    upload_seconds: float = 30.0   # an upload may take this long, plus one second per min_upload_kib received
    min_upload_kib: float = 64.0

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1_000_000)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def load_colorizers(weights: list[str], work_size: int | None = None) -> list[Colorizer]:
    """The models to offer, loaded once: each --weights file (the first is the default), then the
    shipped model. Raises CorruptFileError, naming the file, for a missing or unusable one."""
    colorizers, seen = [], set()
    for path in [*weights, str(DEFAULT_WEIGHTS)]:
        resolved = weights_file(path).resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        model, default_size = load_colorizer(path)
        name = "shipped (colornet.npz)" if resolved == DEFAULT_WEIGHTS else str(path)
        colorizers.append(Colorizer(name, resolved, model, work_size or default_size))
    return colorizers


# -- turning uploaded bytes into a colorized PNG (runs in a worker thread) -----------------------

UPLOAD_STATUS = {"empty": 400, "too large": 413, "not an image": 415}  # ImageError.reason -> HTTP status


def decode_image(data: bytes, max_pixels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Image file bytes -> RGB float32 (H, W, 3) in [0, 1] and alpha uint8 (H, W) or None, upright
    (EXIF orientation applied). Raises UploadError for anything that is not a decodable image of
    at most max_pixels pixels; the pixel count is checked from the header, before decoding."""
    try:
        return photo_arrays(decode_image_file(data, "upload", max_pixels), "upload")
    except ImageError as err:
        raise UploadError(UPLOAD_STATUS.get(err.reason, 400), str(err)) from None


_network_lock = threading.Lock()  # one photo in the network at a time (see the module docstring)


def colorize_bytes(colorizer: Colorizer, data: bytes, max_pixels: int) -> bytes:
    """Image file bytes -> the colorized PNG's bytes: same size, lightness and alpha as the input."""
    rgb, alpha = decode_image(data, max_pixels)
    with _network_lock:
        colorized = colorize_array(colorizer.model, rgb, colorizer.work_size)
    return encode_png(colorized, alpha)


# -- the web app ---------------------------------------------------------------------------------

def error(status: int, message: str) -> JSONResponse:
    """A one-line JSON error: {"error": "..."}."""
    return JSONResponse({"error": " ".join(message.split())}, status_code=status)


class InMemoryMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, keeping uploaded files in memory instead of spilling them
    to temporary files (the request body is already capped at --max-upload-mb)."""
    spool_max_size = 1 << 62


async def capped_body(request: Request, max_bytes: int, limits: Limits) -> AsyncIterator[bytes]:
    """The request body in chunks, raising UploadError(413) as soon as it passes max_bytes, and
    UploadError(408) when it falls behind: each chunk must come within limits.upload_seconds of
    the start plus one second per limits.min_upload_kib KiB received before it."""
    received, start, chunks = 0, time.monotonic(), request.stream().__aiter__()
    while True:
        deadline = start + limits.upload_seconds + received / (limits.min_upload_kib * 1024)
        with anyio.move_on_after(max(deadline - time.monotonic(), 0)) as waited:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
        if waited.cancelled_caught:  # a stalled or trickling client must not keep its place in the queue
            raise UploadError(408, f"upload too slow: {received:,} bytes after {time.monotonic() - start:.0f} s "
                                   f"(this server waits {limits.upload_seconds:g} s plus 1 s per "
                                   f"{limits.min_upload_kib:g} KiB)")
        received += len(chunk)
        if received > max_bytes:
            raise UploadError(413, f"upload is above this server's limit of {max_bytes / 2**20:g} MiB")
        yield chunk


async def read_upload(request: Request, limits: Limits) -> tuple[bytes, str | None]:
    """The uploaded file's bytes and the chosen weights' name (None: the default) from a
    multipart form. Raises UploadError for a missing file, a broken form or a too large body."""
    max_bytes = limits.max_upload_bytes + FORM_OVERHEAD
    if int(request.headers.get("content-length") or 0) > max_bytes:
        raise UploadError(413, f"upload is above this server's limit of {limits.max_upload_mb:g} MiB")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UploadError(400, "send the photo as a multipart/form-data form with a 'file' field")
    parser = InMemoryMultiPartParser(request.headers, capped_body(request, max_bytes, limits), max_files=1,
                                     max_fields=4)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise UploadError(400, f"bad multipart form ({err})") from None
    try:
        upload, weights = form.get("file"), form.get("weights")
        if not isinstance(upload, UploadFile):
            raise UploadError(400, "the form has no 'file' field with an image")
        return await upload.read(), weights if isinstance(weights, str) and weights else None
    finally:
        await form.close()


def create_app(colorizers: list[Colorizer], limits: Limits | None = None) -> Starlette:
    """The Starlette app: the page and the API over the given models (the first is the default)."""
    limits = limits or Limits()
    by_name = {c.name: c for c in colorizers}
    state = {"admitted": 0, "done": 0}  # changed only on the event loop, so no lock is needed

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": __version__, "models": len(colorizers),
                             "in_progress": state["admitted"], "done": state["done"]})

    async def weights(request: Request) -> Response:
        return JSONResponse([{"name": c.name, "work_size": c.work_size, "default": i == 0}
                             for i, c in enumerate(colorizers)])

    async def colorize(request: Request) -> Response:
        if state["admitted"] >= limits.queue:
            return error(503, f"busy: {limits.queue} photos are in progress; try again in a moment")
        state["admitted"] += 1
        try:
            data, name = await read_upload(request, limits)
            colorizer = by_name.get(name or colorizers[0].name)
            if colorizer is None:
                raise UploadError(400, f"unknown weights {name!r}; GET /api/weights lists them")
            start = time.perf_counter()
            png = await anyio.to_thread.run_sync(colorize_bytes, colorizer, data, limits.max_pixels,
                                                 limiter=request.app.state.jobs)
            state["done"] += 1
            return Response(png, media_type="image/png",
                            headers={"X-Colorize-Seconds": f"{time.perf_counter() - start:.3f}"})
        except UploadError as err:
            return error(err.status, err.message)
        except MemoryError:
            return error(503, "not enough memory for this photo right now")
        finally:
            state["admitted"] -= 1

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error(exc.status_code, str(exc.detail))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.jobs = anyio.CapacityLimiter(limits.jobs)  # made on the server's event loop
        yield

    return Starlette(routes=[Route("/", page), Route("/api/health", health), Route("/api/weights", weights),
                             Route("/api/colorize", colorize, methods=["POST"])],
                     exception_handlers={HTTPException: http_error},
                     lifespan=lifespan)


# -- the command ---------------------------------------------------------------------------------

def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), ready for uvicorn; port 0 picks a free port."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def make_server(app: Starlette, log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for app, to be started with server.run(sockets=[listening_socket(...)])."""
    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanocolor serve", description=__doc__.split("\n\n")[0],
                                epilog="Open the printed address in a browser; Ctrl-C stops the server.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--weights", action="append", default=[], metavar="NPZ",
                   help="also offer this model (model.npz or checkpoint.npz, or a shipped model's name such "
                        "as colornet-v1; repeatable); the first given is the default, the shipped model is always offered")
    p.add_argument("--max-megapixels", type=float, default=Limits.max_megapixels,
                   help=f"refuse larger images (default {Limits.max_megapixels:g})")
    p.add_argument("--max-upload-mb", type=float, default=Limits.max_upload_mb,
                   help=f"refuse larger uploads (default {Limits.max_upload_mb:g} MiB)")
    p.add_argument("--jobs", type=int, default=Limits.jobs,
                   help=f"photos decoded and colorized at once (default {Limits.jobs})")
    p.add_argument("--queue", type=int, default=Limits.queue,
                   help=f"colorize requests admitted at once, more get 503 (default {Limits.queue})")
    p.add_argument("--upload-timeout", type=float, default=Limits.upload_seconds, metavar="SECONDS",
                   help=f"an upload may take SECONDS plus 1 s per --min-upload-rate KiB; slower or stalled "
                        f"clients get 408 and free their place in the queue (default {Limits.upload_seconds:g})")
    p.add_argument("--min-upload-rate", type=float, default=Limits.min_upload_kib, metavar="KIB_PER_S",
                   help=f"see --upload-timeout (default {Limits.min_upload_kib:g} KiB/s)")
    p.add_argument("--work-size", type=int, default=None,
                   help="longer side at which the network predicts color "
                        "(default: the one stored with the weights, 128 for the shipped model, else the "
                        f"training size x 2; at most {MAX_WORK_SIZE})")
    engine.add_options(p)
    return p.parse_args(argv)


def check_numbers(args: argparse.Namespace) -> None:
    """Every numeric option in range, before anything is loaded (ValueError naming the option)."""
    for option, value in (("--max-megapixels", args.max_megapixels), ("--max-upload-mb", args.max_upload_mb),
                          ("--upload-timeout", args.upload_timeout), ("--min-upload-rate", args.min_upload_rate)):
        options.check_number(option, value, low=0, above=True)
    options.check_number("--jobs", args.jobs, low=1)
    options.check_number("--queue", args.queue, low=1)
    options.check_number("--port", args.port, low=0, high=65535)
    check_work_size(args.work_size)


def reachable_warning(host: str) -> str | None:
    """A warning when the server listens on `host` (a bound address) beyond this machine: it has no login."""
    if ipaddress.ip_address(host.split("%")[0]).is_loopback:
        return None
    return (f"nanocolor serve: warning: listening on {host}, not only on this machine; there is no login, "
            f"so anyone who can reach it on the network can use it")


@ends_quietly_on_closed_stdout
def main(argv: list[str] | None = None) -> int:
    """Run the server until Ctrl-C; 2 for bad settings, weights or an address in use."""
    args = parse_args(argv)
    limits = Limits(args.max_megapixels, args.max_upload_mb, args.jobs, args.queue, args.upload_timeout,
                    args.min_upload_rate)
    try:
        check_numbers(args)
        backend.use_device(args.device)
        engine.set_conv(args.conv)
        colorizers = load_colorizers(args.weights, args.work_size)
        sock = listening_socket(args.host, args.port)
    except (ValueError, backend.DeviceError, CorruptFileError) as err:  # CorruptFileError is a ValueError
        print(f"nanocolor serve: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"nanocolor serve: error: cannot listen on {args.host}:{args.port} ({err.strerror or err})",
              file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"nanocolor serve: http://{shown}:{port}/  ({len(colorizers)} model(s); Ctrl-C stops)", flush=True)
    warning = reachable_warning(host)
    if warning:
        print(warning, file=sys.stderr)
    # Ctrl-C means stop, even when started from a script in the background (which ignores SIGINT):
    # uvicorn shuts down on it, then raises it again through this handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        make_server(create_app(colorizers, limits)).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl-C, then raises it again
        print("nanocolor serve: stopped", file=sys.stderr)
        return 130
    return 0  # SIGTERM: uvicorn shuts down gracefully, then the process ends by that signal


if __name__ == "__main__":
    sys.exit(main())
