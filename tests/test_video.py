"""Video colorization (nanocolor/video.py through colorize.py): clips made here from still photos
(a slow pan or zoom of a crop window, scene cuts between photos), with audio; the round trip, steady
colors against per-frame colorization, --compare, folders mixing photos and videos, bad inputs."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, colorful_rgb, run_colorize, run_script, save_image
from nanocolor import video
from nanocolor.color import rgb_to_lab
from nanocolor.infer import load_colorizer
from nanocolor.metrics import psnr

needs_av = pytest.mark.skipif(importlib.util.find_spec("av") is None,
                              reason="PyAV is not installed (pip install -e '.[video]')")
SHIPPED = REPO / "nanocolor" / "weights" / "colornet.npz"
PHOTOS = [REPO / "data" / "sample" / kind / name for kind, name in (("buildings", "0.jpg"), ("sea", "1.jpg"))]
SAMPLE_RATE = 48000


def write_clip(path: Path, frames: list[np.ndarray], fps: int = 24, audio: bool = True, codec: str = "libx264",
               pix_fmt: str = "yuv420p", options: dict | None = None) -> Path:
    """Encode RGB frames (H, W, 3) uint8 into a video file, with a mono AAC tone as long as the video."""
    import av
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options=options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], pix_fmt
        sound = out.add_stream("aac", rate=SAMPLE_RATE, layout="mono") if audio else None
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))
        if sound:
            n = SAMPLE_RATE * len(frames) // fps
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / SAMPLE_RATE)).astype(np.float32)[None]
            for start in range(0, n, 1024):
                chunk = av.AudioFrame.from_ndarray(tone[:, start:start + 1024], format="flt", layout="mono")
                chunk.sample_rate, chunk.pts = SAMPLE_RATE, start
                out.mux(sound.encode(chunk))
            out.mux(sound.encode(None))
    return path


def read_clip(path: Path) -> dict:
    """A video file's frames (RGB uint8), frame times (s), size, rate, audio packets and comment."""
    import av
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        info = {"size": (stream.codec_context.width, stream.codec_context.height), "rate": stream.average_rate,
                "comment": container.metadata.get("comment", "")}
        frames, times, audio = [], [], []
        for packet in container.demux():
            if packet.stream.type == "audio" and packet.dts is not None:
                audio.append((packet.pts, bytes(packet)))
            elif packet.stream is stream:
                for frame in packet.decode():
                    frames.append(frame.to_ndarray(format="rgb24"))
                    times.append(float(frame.pts * stream.time_base))
    return {**info, "frames": frames, "times": times, "audio": audio}


def pan_clip(size=(160, 96), frames_per_shot: int = 12, zoom: float = 1.0):
    """Truth frames of shots panning (and zooming) across PHOTOS, one shot per photo, and each
    shot's crop windows."""
    shots = []
    for photo_path in PHOTOS:
        photo = np.asarray(Image.open(photo_path).convert("RGB"))
        windows = video.pan_windows(photo.shape, frames_per_shot, size[0] / size[1], zoom=zoom, travel=0.5)
        shots.append((video.render_shot(photo, windows, size), windows))
    return shots


def shot_flicker(frames: list[np.ndarray], shots) -> float:
    """Mean over the shots of video.flicker of the frames' a*b* (frames in shot order)."""
    values, start = [], 0
    for shot, windows in shots:
        ab = [rgb_to_lab(f / 255.0)[..., 1:] for f in frames[start:start + len(shot)]]
        values.append(video.flicker(ab, windows))
        start += len(shot)
    return float(np.mean(values))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def shipped():
    return load_colorizer(SHIPPED)


# -- steady colors, without a codec ----------------------------------------------------------------

def smooth_scene(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """A random L* image (height, width) in [0, 100], smooth at the scale of a few pixels."""
    coarse = np.random.default_rng(seed).random((height // 4, width // 4)) * 100
    return np.asarray(Image.fromarray(coarse.astype(np.float32), "F").resize((width, height), Image.Resampling.BICUBIC))


def test_estimate_shift_finds_a_known_subpixel_shift():
    scene = smooth_scene()
    moved, _ = video.warp_image(scene, np.array([0.0, 0.0, -2.4, 3.7]))  # content moves by (+2.4, -3.7)
    dy, dx = video.estimate_shift(scene, moved)
    assert abs(dy - 2.4) < 0.25 and abs(dx + 3.7) < 0.25, (dy, dx)
    assert video.estimate_shift(scene, scene) == pytest.approx((0.0, 0.0), abs=1e-6)


def test_estimate_motion_finds_a_known_zoom_turn_and_shift():
    scene = smooth_scene(seed=1)
    truth = np.array([-0.03, 0.01, 1.5, -2.2])  # zoom in by 3%, turn by 0.6 degrees, shift
    moved, inside = video.warp_image(scene, truth)
    found = video.estimate_motion(scene, moved)
    assert (np.abs(found - truth) <= [3e-3, 3e-3, 0.15, 0.15]).all(), found
    assert inside.mean() > 0.9


def test_warp_image_moves_pixels_and_marks_the_uncovered_edge():
    image = np.arange(20, dtype=np.float32).reshape(4, 5)
    moved, inside = video.warp_image(image, np.array([0.0, 0.0, -1.0, -2.0]))
    np.testing.assert_allclose(moved[1:, 2:], image[:-1, :-2])
    assert not inside[0].any() and not inside[:, :2].any() and inside[1:, 2:].all()


def test_smoother_follows_a_pan_and_restarts_at_the_cut_only(shipped):
    model, work_size = shipped
    shots = pan_clip(frames_per_shot=8)
    frames = [f for shot, _ in shots for f in shot]
    smoother, predicted, steady = video.ChromaSmoother(), [], []
    from nanocolor.infer import full_lightness, predict_working_ab, working_lightness
    for rgb in frames:
        small = working_lightness(model, full_lightness(rgb), work_size)
        predicted.append(predict_working_ab(model, small))
        steady.append(smoother(small, predicted[-1]))
    assert smoother.cuts == len(shots) - 1
    first_of_second = len(shots[0][0])
    np.testing.assert_array_equal(steady[0], predicted[0])  # a scene starts from its own prediction
    np.testing.assert_array_equal(steady[first_of_second], predicted[first_of_second])
    assert not np.array_equal(steady[1], predicted[1])


def test_colorize_frames_streams_one_frame_at_a_time(shipped):
    model, work_size = shipped
    pulled = []

    def source():
        for i in range(4):
            pulled.append(i)
            yield colorful_rgb(24, 40, seed=i)

    outputs = video.colorize_frames(model, source(), work_size)
    for taken in range(1, 5):
        out = next(outputs)
        assert out.shape == (24, 40, 3) and out.dtype == np.uint8
        assert len(pulled) == taken  # no frame read ahead, none kept behind


# -- through colorize.py ---------------------------------------------------------------------------

@needs_av
def test_round_trip_keeps_size_rate_frames_timestamps_and_audio(tmp_path, capsys):
    frames = [colorful_rgb(48, 64, seed=i) for i in range(10)]
    clip = write_clip(tmp_path / "clip.mp4", frames, fps=25)
    code, out, err = run_colorize(capsys, clip)
    assert code == 0, err
    result = tmp_path / "clip_color.mp4"
    assert out.strip() == f"{clip} -> {result}"
    assert f"clip.mp4: 10/10 frames" in err[-1]  # the progress, in frames
    original, colorized = read_clip(clip), read_clip(result)
    assert colorized["size"] == original["size"] == (64, 48)
    assert colorized["rate"] == original["rate"] == 25
    assert len(colorized["frames"]) == len(original["frames"]) == 10
    assert colorized["times"] == pytest.approx(original["times"], abs=1e-3)
    assert colorized["audio"] == original["audio"] and len(original["audio"]) > 5
    assert colorized["comment"].startswith("nanocolor") and video.is_video_output(result)
    assert not video.is_video_output(clip)
    assert leftovers(tmp_path) == []


@needs_av
def test_a_phones_display_rotation_is_kept(tmp_path, capsys):
    import av
    with av.open(str(tmp_path / "phone.mp4"), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(90)
        for i in range(3):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(colorful_rgb(48, 64, seed=i), format="rgb24")))
        out.mux(stream.encode(None))
    code, _, err = run_colorize(capsys, tmp_path / "phone.mp4")
    assert code == 0, err
    with av.open(str(tmp_path / "phone_color.mp4")) as result:
        frame = next(result.decode(video=0))
        assert (frame.rotation, frame.width, frame.height) == (90, 64, 48)


@needs_av
def test_odd_frame_size_is_kept(tmp_path, capsys):
    clip = write_clip(tmp_path / "odd.mkv", [colorful_rgb(37, 51, seed=i) for i in range(3)], audio=False,
                      pix_fmt="yuv444p")
    code, _, err = run_colorize(capsys, clip)
    assert code == 0, err
    result = read_clip(tmp_path / "odd_color.mkv")
    assert result["size"] == (51, 37) and len(result["frames"]) == 3


def flicker_and_psnr(frames: list[np.ndarray], truth: list[np.ndarray], shots) -> tuple[float, float]:
    """(shot_flicker, mean PSNR against the truth frames) of a colorized clip."""
    return shot_flicker(frames, shots), float(np.mean([psnr(f, t) for f, t in zip(frames, truth)]))


def test_smoothing_halves_flicker_without_losing_psnr(shipped):
    """A pan and zoom across one photo, a cut, the same across another: the colorizer's own
    frames, with and without smoothing, against the truth frames."""
    model, work_size = shipped
    shots = pan_clip(zoom=1.15)
    truth = [f for shot, _ in shots for f in shot]
    smooth, smooth_psnr = flicker_and_psnr(list(video.colorize_frames(model, truth, work_size)), truth, shots)
    per_frame, per_frame_psnr = flicker_and_psnr(list(video.colorize_frames(model, truth, work_size, smooth=False)),
                                                 truth, shots)
    print(f"flicker: truth {shot_flicker(truth, shots):.3f}, per-frame {per_frame:.3f}, smoothed {smooth:.3f}; "
          f"PSNR per-frame {per_frame_psnr:.2f} dB, smoothed {smooth_psnr:.2f} dB")
    assert shot_flicker(truth, shots) < 0.1 * per_frame  # the measurement itself adds little
    assert smooth <= 0.5 * per_frame
    assert smooth_psnr >= per_frame_psnr


@needs_av
def test_steadier_through_files_and_no_smooth_gives_per_frame(tmp_path, capsys):
    """The same through colorize.py, video file in and out (the encoder's 8-bit YUV adds the same
    small noise to both), larger frames: --no-smooth is the per-frame colorization."""
    shots = pan_clip(size=(320, 192), zoom=1.15)
    truth = [f for shot, _ in shots for f in shot]
    clip = write_clip(tmp_path / "pan.mp4", truth, audio=False)
    scores = {}
    for name, extra in (("smooth", []), ("per_frame", ["--no-smooth"])):
        code, _, err = run_colorize(capsys, clip, "--output", tmp_path / name, *extra)
        assert code == 0, err
        scores[name] = flicker_and_psnr(read_clip(tmp_path / name / "pan.mp4")["frames"], truth, shots)
    (smooth, smooth_psnr), (per_frame, per_frame_psnr) = scores["smooth"], scores["per_frame"]
    print(f"through files: flicker per-frame {per_frame:.3f}, smoothed {smooth:.3f}; "
          f"PSNR per-frame {per_frame_psnr:.2f} dB, smoothed {smooth_psnr:.2f} dB")
    assert smooth <= 0.5 * per_frame
    assert smooth_psnr >= per_frame_psnr


@needs_av
def test_compare_writes_gray_beside_colorized(tmp_path, capsys):
    clip = write_clip(tmp_path / "clip.mp4", [colorful_rgb(48, 64, seed=i) for i in range(4)])
    code, out, err = run_colorize(capsys, clip, "--compare")
    assert code == 0, err
    compare, colorized = read_clip(tmp_path / "clip_compare.mp4"), read_clip(tmp_path / "clip_color.mp4")
    assert compare["size"] == (128, 48) and len(compare["frames"]) == 4
    left, right = compare["frames"][0][:, :64].astype(int), compare["frames"][0][:, 64:].astype(int)
    assert np.abs(left - left.mean(axis=-1, keepdims=True)).max() <= 6  # gray: R = G = B, up to the codec
    assert np.abs(right - colorized["frames"][0]).mean() < 3
    assert not compare["audio"] and not compare["comment"]


@needs_av
def test_a_folder_of_photos_and_videos(tmp_path, capsys):
    folder = tmp_path / "in"
    save_image(folder / "photo.png", colorful_rgb(20, 30))
    write_clip(folder / "films" / "clip.mov", [colorful_rgb(32, 48, seed=i) for i in range(3)])
    code, out, err = run_colorize(capsys, folder, "--output", tmp_path / "out")
    assert code == 0, err
    assert (tmp_path / "out" / "photo.png").is_file()
    assert len(read_clip(tmp_path / "out" / "films" / "clip.mov")["frames"]) == 3
    code, out, _ = run_colorize(capsys, folder)  # beside the inputs, then again: earlier outputs skipped
    code_again, out_again, _ = run_colorize(capsys, folder)
    assert code == code_again == 0
    assert "skipped 2 earlier outputs" in out_again and (folder / "films" / "clip_color.mov").is_file()


@needs_av
def test_never_replaces_a_users_file_and_ctrl_c_leaves_nothing(tmp_path, capsys, monkeypatch):
    clip = write_clip(tmp_path / "clip.mp4", [colorful_rgb(32, 48, seed=i) for i in range(6)])
    (tmp_path / "clip_color.mp4").write_bytes(b"the user's own file")
    code, out, err = run_colorize(capsys, clip)
    assert code == 0 and (tmp_path / "clip_color.mp4").read_bytes() == b"the user's own file"
    assert out.strip().endswith("clip_mp4_color.mp4")

    real, seen = video.colorize_frame, []

    def interrupted(*args, **kwargs):
        seen.append(1)
        if len(seen) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(video, "colorize_frame", interrupted)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_colorize(capsys, clip, "--compare", "--output", tmp_path / "out")
    assert code == 130 and "interrupted" in err[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == before + ["out"]
    assert list((tmp_path / "out").iterdir()) == []


def bad_videos(folder: Path) -> dict[str, str]:
    """Broken inputs and a word each one's error line must hold."""
    import av
    frames = [colorful_rgb(48, 64, seed=i) for i in range(12)]
    (folder / "text.mp4").write_text("this is not a video\n")
    whole = write_clip(folder / "whole.mp4", frames).read_bytes()  # index at the end: cut, it is lost
    (folder / "cut.mp4").write_bytes(whole[:len(whole) // 2])
    front = write_clip(folder / "front.mp4", frames, options={"movflags": "faststart"}).read_bytes()
    (folder / "cut_front.mp4").write_bytes(front[:len(front) * 2 // 3])  # index first: frames are lost
    for name, video_track in (("audio_only.mp4", False), ("no_frames.mkv", True)):
        with av.open(str(folder / name), "w") as out:
            if video_track:  # a video track that never gets a frame
                stream = out.add_stream("libx264", rate=24)
                stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            sound = out.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
            chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="flt", layout="mono")
            chunk.sample_rate, chunk.pts = SAMPLE_RATE, 0
            out.mux(sound.encode(chunk))
            out.mux(sound.encode(None))
    avi = write_clip(folder / "mpeg4.avi", frames, codec="mpeg4", audio=False).read_bytes()
    assert avi.count(b"FMP4") == 2
    (folder / "unknown_codec.avi").write_bytes(avi.replace(b"FMP4", b"QQQQ"))  # a codec no decoder knows
    for name in ("whole.mp4", "front.mp4", "mpeg4.avi"):
        (folder / name).unlink()
    return {"text.mp4": "not a readable video", "cut.mp4": "not a readable video", "cut_front.mp4": "truncated",
            "audio_only.mp4": "only audio", "no_frames.mkv": "no video frames",
            "unknown_codec.avi": "cannot be decoded"}


@needs_av
def test_bad_videos_one_line_each_in_a_real_process(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    expected = bad_videos(folder)
    save_image(folder / "good.png", colorful_rgb(20, 30))
    done = run_script("colorize.py", folder, "--output", tmp_path / "out")
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    for name, words in expected.items():
        assert len([line for line in errors if name in line and words in line]) == 1, (name, done.stderr)
    assert len(errors) == len(expected)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["good.png"]  # nothing partial
    assert f"{len(expected)} of {len(expected) + 1} inputs failed" in done.stderr


def test_without_pyav_a_video_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 100)
    save_image(tmp_path / "photo.png", colorful_rgb(20, 30))
    code, out, err = run_colorize(capsys, tmp_path / "clip.mp4", tmp_path / "photo.png")
    assert code == 1
    assert err == [f"colorize.py: error: {tmp_path / 'clip.mp4'}: colorizing video needs PyAV: "
                   "pip install 'nanocolor[video]'", "colorize.py: 1 of 2 inputs failed"]
    assert (tmp_path / "photo_color.png").is_file() and not video.is_video_output(tmp_path / "clip.mp4")
