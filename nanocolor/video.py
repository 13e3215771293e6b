"""Colorizing videos: frames streamed through the network one at a time, colors held steady.

A video is read with PyAV (the optional extra `nanocolor[video]`; its wheels carry FFmpeg) one
frame at a time. Each frame is colorized as infer.py colorizes a photo (the network at the small
working size, its a*b* upsampled and joined with the frame's own full-resolution L*) and encoded
before the next one is decoded, so memory does not grow with the length. Audio packets are copied
unchanged; size, frame rate, frame count and timestamps are kept. The output goes to a temp file
beside its final name and is renamed only when complete.

Steady colors: colorizing each frame alone makes colors flicker, because the network's guess for
a wall changes with small changes of its input. Only a*b* needs to be steady (L* is the input's),
and at the working size a*b* is smooth, so ChromaSmoother keeps a running average of the predicted
a*b* there. Before each frame the average is moved by the global motion between the frames (phase
correlation of L*), it is trusted only where the moved L* matches the new frame's, and it starts
afresh at a scene cut (a large change of L* after alignment).

Shapes: frames are RGB (H, W, 3) uint8 and their L* (H, W); at the working size L* is (h, w) and
a*b* (h, w, 2), in LAB units. Arrays are NumPy or CuPy (backend.array_module), except the frames.
"""
from __future__ import annotations

import os
import secrets
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from .backend import array_module
from .data import ImageError
from .images import OUTPUT_KEY
from .infer import check_not_input, full_lightness, join_color, predict_working_ab, working_lightness
from .model import ColorNet
from .progress import progress_bar

VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".wmv", ".flv",
                    ".ogv", ".3gp"}

MEMORY = 0.85   # share of the moved running average kept at each frame: a memory of about 7 frames
MATCH_L = 12.0  # L* mismatch (moved history vs new frame) at which the history's weight falls to 1/e
CUT_L = 12.0    # mean |L* change| after alignment that starts a new scene (measured: pans <= 5, cuts >= 18)
MIN_OVERLAP = 0.5  # a motion that leaves less of the frame covered by the last one is a cut too


class VideoError(ImageError):
    """A video input that cannot be colorized: missing, not a video, no video stream, truncated,
    an unsupported codec, no frames, or PyAV not installed. The message is one line naming the file."""


def require_av(path: str | os.PathLike | None = None):
    """The PyAV module, or VideoError (naming `path`, if given) with the command that installs it."""
    try:
        import av
    except ImportError:
        where = f"{path}: " if path is not None else ""
        raise VideoError(f"{where}colorizing video needs PyAV: pip install 'nanocolor[video]'", "missing module") from None
    return av


def is_video(path: str | os.PathLike) -> bool:
    """Whether a path names a video, by its extension."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def is_video_output(path: str | os.PathLike) -> bool:
    """Whether `path` is a video that colorize_video wrote (its comment starts with OUTPUT_KEY)."""
    if not is_video(path) or not Path(path).is_file():
        return False
    try:
        av = require_av()
        with av.open(str(path)) as container:
            return container.metadata.get("comment", "").startswith(OUTPUT_KEY)
    except Exception:  # unreadable, not a video, no PyAV: not ours
        return False


# -- steady colors ---------------------------------------------------------------------------------

def estimate_shift(prev, cur) -> tuple[float, float]:
    """Global motion (dy, dx) in pixels between two L* images (h, w): cur(y, x) ~ prev(y - dy, x - dx).

    Phase correlation: the inverse FFT of the cross-power spectrum, normalized to unit magnitude,
    peaks at the shift; a parabola through the peak and its neighbours gives the fraction of a pixel.
    """
    xp = array_module(prev)
    h, w = prev.shape
    window = xp.outer(xp.hanning(h), xp.hanning(w))  # tapered borders: their wrap-around would pull toward 0
    pair = xp.stack([prev, cur]).astype(xp.float64)
    spectra = xp.fft.rfft2((pair - pair.mean(axis=(1, 2), keepdims=True)) * window)
    cross = spectra[1] * xp.conj(spectra[0])
    corr = xp.fft.irfft2(cross / (xp.abs(cross) + 1e-9), s=(h, w))
    py, px = (int(v) for v in xp.unravel_index(int(xp.argmax(corr)), corr.shape))

    def refine(before: float, at: float, after: float) -> float:
        curvature = before - 2 * at + after
        return 0.0 if curvature >= 0 else float(np.clip(0.5 * (before - after) / curvature, -0.5, 0.5))

    dy = py + refine(float(corr[py - 1, px]), float(corr[py, px]), float(corr[(py + 1) % h, px]))
    dx = px + refine(float(corr[py, px - 1]), float(corr[py, px]), float(corr[py, (px + 1) % w]))
    return (dy - h if dy > h / 2 else dy), (dx - w if dx > w / 2 else dx)


def sample(image, ys, xs):
    """Bilinear samples of image (h, w, ...) at float pixel coordinates ys, xs (equal shapes S),
    clamped to the edges -> (*S, ...)."""
    xp = array_module(image)
    h, w = image.shape[:2]
    ys, xs = xp.clip(ys, 0, h - 1), xp.clip(xs, 0, w - 1)
    y0, x0 = xp.floor(ys).astype(xp.int64), xp.floor(xs).astype(xp.int64)
    y1, x1 = xp.minimum(y0 + 1, h - 1), xp.minimum(x0 + 1, w - 1)
    fy, fx = ys - y0, xs - x0
    if image.ndim == 3:  # weights broadcast over the channels
        fy, fx = fy[..., None], fx[..., None]
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(image.dtype, copy=False)


def _source_points(motion, h: int, w: int):
    """Where each pixel (y, x) of an (h, w) frame came from in the frame before: (qy, qx), each (h, w).

    motion = (a, b, ty, tx), a similarity about the centre c: q - c = [[1 + a, b], [-b, 1 + a]] (p - c) + t
    in (y, x) order, i.e. a zoom by 1 + a, a small turn b and a shift t."""
    a, b, ty, tx = (motion[i] for i in range(4))
    py, px = _centred_grid(array_module(motion), h, w)
    return (1 + a) * py + b * px + ty + (h - 1) / 2, (1 + a) * px - b * py + tx + (w - 1) / 2


def _centred_grid(xp, h: int, w: int):
    """Pixel coordinates (py, px), each (h, w) float64, measured from the frame's centre."""
    py = xp.arange(h, dtype=xp.float64)[:, None] - (h - 1) / 2
    px = xp.arange(w, dtype=xp.float64)[None, :] - (w - 1) / 2
    return py + 0 * px, px + 0 * py


def warp_image(image, motion):
    """image (h, w, ...) of the frame before, moved onto the next frame by `motion` (bilinear) ->
    (moved, inside): inside (h, w) is True where the moved pixel came from within the image."""
    h, w = image.shape[:2]
    qy, qx = _source_points(motion, h, w)
    inside = (qy >= 0) & (qy <= h - 1) & (qx >= 0) & (qx <= w - 1)
    return sample(image, qy, qx), inside


def estimate_motion(prev, cur, steps: int = 3):
    """Global motion between two L* images (h, w) as _source_points' similarity (a, b, ty, tx), float64.

    The shift from phase correlation, then `steps` Gauss-Newton steps (Lucas-Kanade) on all four
    parameters over the pixels in view in both; of these motions, the one with the least mean
    |L* error| is kept.
    """
    xp = array_module(prev)
    h, w = prev.shape
    prev, cur = prev.astype(xp.float64), cur.astype(xp.float64)
    dy, dx = estimate_shift(prev, cur)
    stacked = xp.stack([prev, *xp.gradient(prev)], axis=-1)  # L* and its slopes, moved together
    py, px = _centred_grid(xp, h, w)
    motion, tried = xp.asarray([0.0, 0.0, -dy, -dx]), []
    for step in range(steps + 1):
        moved, inside = warp_image(stacked, motion)
        residual = (moved[..., 0] - cur)[inside]
        tried.append((float(xp.abs(residual).mean()) if residual.size else float("inf"), motion))
        if step == steps:
            break
        gy, gx = moved[..., 1][inside], moved[..., 2][inside]
        # d(moved L*)/d(a, b, ty, tx) by the chain rule through q(p)
        jacobian = xp.stack([gy * py[inside] + gx * px[inside], gy * px[inside] - gx * py[inside], gy, gx], axis=-1)
        normal = jacobian.T @ jacobian + 1e-6 * xp.eye(4)
        motion = motion - xp.linalg.solve(normal, jacobian.T @ residual)
    return min(tried, key=lambda pair: pair[0])[1]


class ChromaSmoother:
    """A running average of predicted a*b* at the working size: moved with the motion, trusted where
    the scene still matches, restarted at scene cuts. Call it once per frame, in order."""

    def __init__(self, memory: float = MEMORY):
        self.memory = memory
        self.L = self.ab = None
        self.cuts = 0  # scene cuts seen (the first frame not counted)

    def __call__(self, L, ab):
        """L* (h, w) and the network's a*b* (h, w, 2) of the next frame -> its steady a*b* (h, w, 2)."""
        xp = array_module(ab)
        if self.L is not None and self.L.shape == L.shape:
            motion = estimate_motion(self.L, L)
            moved_L, inside = warp_image(self.L, motion)
            change = xp.abs(L - moved_L)
            if is_scene_cut(change, inside):
                self.cuts += 1
            else:
                keep = (self.memory * inside * xp.exp(-(change / MATCH_L) ** 2)).astype(ab.dtype)[..., None]
                ab = keep * warp_image(self.ab, motion)[0] + (1 - keep) * ab
        self.L, self.ab = L, ab
        return ab


def is_scene_cut(change, inside) -> bool:
    """Whether |L* change| (h, w) after alignment, over the pixels `inside` both frames, says a new scene."""
    covered = float(inside.mean())
    return covered < MIN_OVERLAP or float((change * inside).sum()) > CUT_L * float(inside.sum())


def colorize_frame(model: ColorNet, rgb: np.ndarray, work_size: int,
                   smoother: ChromaSmoother | None = None) -> tuple[np.ndarray, np.ndarray]:
    """RGB frame (H, W, 3) uint8 (its color ignored) -> (its L* (H, W) float32, colorized RGB (H, W, 3)
    uint8); with a smoother, the frame's a*b* is steadied by the frames before it."""
    L = full_lightness(rgb)
    small = working_lightness(model, L, work_size)
    ab = predict_working_ab(model, small)
    if smoother is not None:
        ab = smoother(small, ab)
    return L, join_color(L, ab, np.uint8)


def colorize_frames(model: ColorNet, frames: Iterable[np.ndarray], work_size: int,
                    smooth: bool = True) -> Iterator[np.ndarray]:
    """RGB frames (H, W, 3) uint8 of one clip, in order -> colorized frames, one for one (streamed)."""
    smoother = ChromaSmoother() if smooth else None
    for rgb in frames:
        yield colorize_frame(model, rgb, work_size, smoother)[1]


# -- reading and writing ---------------------------------------------------------------------------

def open_video(path: str | os.PathLike):
    """An open PyAV input container whose first video stream can be decoded, or VideoError."""
    av, path = require_av(path), Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such file" if not path.exists() else f"{path}: not a file", "missing")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file (0 bytes)", "empty")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise VideoError(f"{path}: not a readable video ({_reason(err)})", "not a video") from None
    if not container.streams.video:
        kind = "only audio" if container.streams.audio else "no video stream"
        container.close()
        raise VideoError(f"{path}: has {kind}; nothing to colorize", "not a video")
    stream = container.streams.video[0]
    if stream.codec_context is None or not stream.codec_context.width:
        name = stream.codec_context.name if stream.codec_context is not None else "unknown"
        container.close()
        raise VideoError(f"{path}: its video codec ({name}) cannot be decoded here", "unsupported")
    stream.thread_type = "AUTO"  # FFmpeg's own decoding threads
    return container


def _reason(err: Exception) -> str:
    text = getattr(err, "strerror", None) or str(err) or err.__class__.__name__
    return " ".join(str(text).split())


def demuxed(container, path: Path) -> Iterator:
    """The first video stream's decoded frames (PyAV VideoFrames) and the audio streams' packets, in
    the order the file holds them. Demuxing or decoding errors (truncated, corrupt data) become VideoError."""
    av = require_av()
    video, audio = container.streams.video[0], list(container.streams.audio)
    packets = container.demux(video, *audio)
    while True:
        try:
            packet = next(packets)
            frames = packet.decode() if packet.stream is video else ()
        except StopIteration:
            return
        except av.error.FFmpegError as err:
            raise VideoError(f"{path}: truncated or corrupt video data ({_reason(err)})") from None
        if packet.stream is not video:
            if packet.dts is not None:  # the demuxer's empty end-of-stream packets are not data
                yield packet
            continue
        yield from frames


def frames_expected(container) -> int:
    """Frame count the container declares or its duration implies (0: unknown), for progress."""
    stream = container.streams.video[0]
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if stream.duration and rate:
        return int(round(float(stream.duration * stream.time_base * rate)))
    if container.duration and rate:
        return int(round(container.duration / 1e6 * float(rate)))
    return 0


class VideoWriter:
    """A video file written through a temp file beside `path`: renamed into place by finish(),
    removed by discard() (and when the with-block ends in an exception). H.264 where the container
    holds it, else the input's codec, else MPEG-4 part 2. Audio streams given as templates get
    their packets copied unchanged by copy(); `rotation` (degrees, counter-clockwise) is stored for players."""

    def __init__(self, path: str | os.PathLike, width: int, height: int, rate: Fraction, time_base: Fraction,
                 codec: str | None = None, audio: Iterable = (), note: str | None = None, rotation: float = 0):
        av = require_av()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.stem}.{secrets.token_hex(4)}.tmp{self.path.suffix}")
        self.container = av.open(str(self.tmp), "w")
        try:
            self.video = self.container.add_stream(self._encoder(codec), rate=rate)
            context = self.video.codec_context
            context.width, context.height, context.time_base = width, height, time_base
            odd = width % 2 or height % 2  # 4:2:0 needs even sides; 4:4:4 keeps the exact size
            context.pix_fmt = "yuv444p" if odd else "yuv420p"
            if context.name == "libx264":
                context.options = {"crf": "18", "preset": "veryfast"}
            else:
                context.bit_rate = int(width * height * max(1.0, float(rate)))  # 1 bit per pixel: looks clean
            self.video.time_base = time_base
            if rotation:  # a phone's upright display, as the input's display matrix said
                self.video.set_display_rotation(rotation)
            self.audio = {stream: self.container.add_stream_from_template(stream) for stream in audio}
            if note:
                self.container.metadata["comment"] = f"{OUTPUT_KEY}: {note}"
        except BaseException:
            self.discard()
            raise
        self.time_base = time_base

    def _encoder(self, codec: str | None) -> str:
        av = require_av()
        if "h264" in self.container.supported_codecs:
            return "libx264"
        for name in (codec, "mpeg4"):
            try:
                if name and name in self.container.supported_codecs and av.codec.Codec(name, "w"):
                    return name
            except av.codec.codec.UnknownCodecError:
                continue
        return "mpeg4"

    def write(self, rgb: np.ndarray, pts: int) -> None:
        """Encode one RGB frame (H, W, 3) uint8 shown at pts (in time_base units)."""
        av = require_av()
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts, frame.time_base = pts, self.time_base
        self.container.mux(self.video.encode(frame))

    def copy(self, packet) -> None:
        """Mux an input packet of one of the template audio streams, unchanged."""
        packet.stream = self.audio[packet.stream]
        self.container.mux(packet)

    def finish(self) -> None:
        """Flush the encoder, close the file, make it durable and rename it into place."""
        self.container.mux(self.video.encode(None))
        self.container.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        """Close and delete the temp file; the final name is never touched."""
        try:
            self.container.close()
        except Exception:  # a half-written file: its trailer may not be writable, and it is deleted anyway
            pass
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, kind, err, trace) -> None:
        if kind is not None:
            self.discard()


def writer_like(container, path: str | os.PathLike, first_frame, width: int | None = None, audio: bool = True,
                note: str | None = None) -> VideoWriter:
    """A VideoWriter with the input's size (or `width`), frame rate, time base, codec and display
    rotation (read from its first decoded frame), and a copy of its audio streams."""
    stream = container.streams.video[0]
    context = stream.codec_context
    rate = stream.average_rate or stream.guessed_rate or Fraction(25)
    return VideoWriter(path, width or context.width, context.height, rate, stream.time_base, context.name,
                       container.streams.audio if audio else (), note, first_frame.rotation)


def colorize_video(model: ColorNet, path: str | os.PathLike, out_path: str | os.PathLike, work_size: int,
                   compare_path: str | os.PathLike | None = None, smooth: bool = True,
                   progress: bool = True) -> int:
    """Colorize a video file into out_path (same container; audio copied; same size, frame count and
    timestamps) and optionally gray | colorized side by side into compare_path (no audio). Returns the
    frame count. Raises VideoError for an input that cannot be read (nothing is written then) and
    OSError for an output that cannot; no partial output is ever left, Ctrl-C included."""
    path = Path(path)
    check_not_input(path, out_path, compare_path)
    writers: list[VideoWriter] = []  # opened at the first frame, which carries the display rotation
    with open_video(path) as container:
        bar = progress_bar(frames_expected(container), path.name, "frames", progress)
        try:
            count = _stream_frames(model, container, path, writers, (out_path, compare_path), work_size,
                                   ChromaSmoother() if smooth else None, bar)
            for writer in writers:
                writer.finish()
        except BaseException:
            for writer in writers:
                writer.discard()
            raise
        finally:
            bar.close()
    return count


def _stream_frames(model, container, path, writers, outputs, work_size, smoother, bar) -> int:
    """Decode, colorize and encode every frame into the writers (appended to `writers` at the first
    frame: output, then compare); returns the frame count, or raises VideoError when frames are missing."""
    av = require_av()
    stream, waiting = container.streams.video[0], []  # waiting: audio read before the outputs exist
    count, last_pts = 0, None
    for item in demuxed(container, path):
        if not isinstance(item, av.VideoFrame):  # an audio packet
            if writers:
                writers[0].copy(item)
            else:
                waiting.append(item)
            continue
        if not writers:
            writers.append(writer_like(container, outputs[0], item, note=f"colorized from {path.name}"))
            if outputs[1]:
                writers.append(writer_like(container, outputs[1], item, 2 * stream.codec_context.width, audio=False))
            for packet in waiting:
                writers[0].copy(packet)
        L, colorized = colorize_frame(model, item.to_ndarray(format="rgb24"), work_size, smoother)
        pts = _frame_pts(item, last_pts, stream)
        writers[0].write(colorized, pts)
        if outputs[1]:
            gray = join_color(L, np.zeros((1, 1, 2), np.float32), np.uint8)
            writers[1].write(np.concatenate([gray, colorized], axis=1), pts)
        count, last_pts = count + 1, pts
        bar.update(1)
    if count == 0:
        raise VideoError(f"{path}: holds no video frames", "empty")
    if count < stream.frames:  # the demuxer stops quietly at the end of a cut-off file
        raise VideoError(f"{path}: truncated: {count} of the {stream.frames} frames it declares could be read")
    return count


def _frame_pts(frame, last_pts: int | None, stream) -> int:
    """The frame's own timestamp; one frame duration after the last where it has none."""
    if frame.pts is not None:
        return int(frame.pts)
    if last_pts is None:
        return 0
    rate = stream.average_rate or stream.guessed_rate or Fraction(25)
    return last_pts + max(1, int(round(1 / (rate * stream.time_base))))


# -- measuring steadiness on clips with known truth --------------------------------------------------

def render_shot(photo: np.ndarray, windows: list[tuple[float, float, float, float]],
                size: tuple[int, int]) -> list[np.ndarray]:
    """A shot filmed from a still photo (H0, W0, 3) uint8: one frame (height, width, 3) uint8 per crop
    window (y, x, h, w) in photo pixels, resized (bicubic) to size = (width, height)."""
    img = Image.fromarray(photo)
    return [np.asarray(img.resize(size, Image.Resampling.BICUBIC, box=(x, y, x + w, y + h)))
            for y, x, h, w in windows]


def pan_windows(photo_shape: tuple[int, ...], frames: int, aspect: float, zoom: float = 1.0,
                travel: float = 0.25) -> list[tuple[float, float, float, float]]:
    """Crop windows (y, x, h, w) of a slow pan across a photo (H0, W0, ...): the largest window of
    `aspect` (width / height) that fits, shrunk by `zoom` over the shot (1: no zoom), moving
    diagonally over `travel` of the room it has to move."""
    H0, W0 = photo_shape[:2]
    h_full = min(H0, W0 / aspect)
    windows = []
    for t in np.linspace(0.0, 1.0, frames):
        h = h_full * (1 - (1 - 1 / zoom) * t)
        w = h * aspect
        windows.append(((H0 - h) * t * travel, (W0 - w) * t * travel, h, w))
    return windows


def flicker_map(ab: np.ndarray, ab_next: np.ndarray, window, window_next) -> tuple[np.ndarray, np.ndarray]:
    """|change of a*b*| (H, W) from one frame to the next at the scene point each pixel of the first
    shows, and where that point is still in view (H, W) bool. ab, ab_next: a*b* (H, W, 2) of frames
    filmed through crop windows (y, x, h, w) of the same photo (render_shot)."""
    H, W = ab.shape[:2]
    y0, x0, h0, w0 = window
    y1, x1, h1, w1 = window_next
    ys = y0 + (np.arange(H)[:, None] + 0.5) * h0 / H  # scene coordinates of the first frame's pixel centres
    xs = x0 + (np.arange(W)[None, :] + 0.5) * w0 / W
    v = (ys - y1) * H / h1 - 0.5 + np.zeros((1, W))  # where the next frame shows them
    u = (xs - x1) * W / w1 - 0.5 + np.zeros((H, 1))
    seen = (v >= 0) & (v <= H - 1) & (u >= 0) & (u <= W - 1)
    return np.linalg.norm(sample(ab_next.astype(np.float64), v, u) - ab, axis=-1), seen


def flicker(ab_frames: list[np.ndarray], windows: list[tuple[float, float, float, float]]) -> float:
    """Mean |change of a*b*| at the same scene point between consecutive frames of one shot: 0 for a
    perfectly steady shot. ab_frames: a*b* (H, W, 2) of each frame; windows: the crop window
    (y, x, h, w) each was filmed through (render_shot); pixels are followed while in view (bilinear)."""
    changes = []
    for i in range(len(ab_frames) - 1):
        change, seen = flicker_map(ab_frames[i], ab_frames[i + 1], windows[i], windows[i + 1])
        changes.append(change[seen].mean())
    return float(np.mean(changes))
