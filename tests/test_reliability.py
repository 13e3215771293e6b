"""Reliability: bad images, bad weights and bad training settings give one clear line and an exit
code; killed or interrupted training never loses a checkpoint, and resuming is exact."""
from __future__ import annotations

import os
import random
import re
import signal
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import (colorful_rgb, gray_rgb, make_photos, run_colorize, run_train, save_image, script_env,
                      tiny_weights, train_cmd)
from nanocolor import data, serialize
from nanocolor.color import rgb_to_lab
from nanocolor.loss import MSELoss
from nanocolor.model import ColorNet
from nanocolor.optim import Adam
from nanocolor.serialize import CorruptFileError, load_npz, save_npz
from nanocolor.trainer import TrainConfig, Trainer, TrainingStopped

# Largest change of L* when an sRGB color in [0, 1] is rounded to 8 bits: the steepest total slope
# sum_i |dL*/dc_i| is ~130 per unit (dark grays near L* = 8), times half a step, 0.5 / 255.
# tests/test_properties.py checks this bound on random colors.
L8_TOL = 0.26

# -- helpers ---------------------------------------------------------------------------------------

def lightness(rgb01: np.ndarray) -> np.ndarray:
    return rgb_to_lab(np.asarray(rgb01, dtype=np.float64))[..., 0]


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height RGB pixels, with (almost) no pixel data."""
    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 7))
                     + chunk(b"IEND", b""))
    return path


def truncated_copy(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    blob = src.read_bytes()
    dst.write_bytes(blob[:int(len(blob) * fraction)])
    return dst


def stray_temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.tmp")]


def one_line_errors(err_lines: list[str], name: str) -> list[str]:
    return [line for line in err_lines if name in line]


def checkpoint_arrays(run: Path) -> dict:
    arrays, _ = load_npz(run / "checkpoint.npz", kinds=("checkpoint",))
    return arrays


def assert_same_arrays(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)  # bit-identical


# -- colorize.py: bad and unusual images ----------------------------------------------------------

def test_batch_with_bad_files_does_the_good_ones_and_names_each_failure(tmp_path, capsys):
    weights = tiny_weights(tmp_path / "w.npz")
    src, out = tmp_path / "in", tmp_path / "out"
    good = {"a.png": save_image(src / "a.png", colorful_rgb(9, 13)),
            "b.jpg": save_image(src / "b.jpg", colorful_rgb(16, 10, seed=1), quality=90),
            "one.png": save_image(src / "one.png", colorful_rgb(1, 1, seed=2)),
            "row.png": save_image(src / "row.png", colorful_rgb(1, 23, seed=3)),
            "col.png": save_image(src / "col.png", colorful_rgb(17, 1, seed=4))}
    big_png = save_image(tmp_path / "big.png", colorful_rgb(64, 64, seed=5))
    big_jpg = save_image(tmp_path / "big.jpg", colorful_rgb(64, 64, seed=6), quality=95)
    (src / "empty.png").write_bytes(b"")
    (src / "text.png").write_text("this is not an image\n")
    bad = {"empty.png": "empty", "text.png": "not an image",
           "cut.png": "cannot decode", "cut.jpg": "cannot decode", "bomb.png": "decompression bomb"}
    truncated_copy(big_png, src / "cut.png")
    truncated_copy(big_jpg, src / "cut.jpg")
    png_declaring(src / "bomb.png", 20000, 20000)
    code, stdout, err = run_colorize(capsys, src, "--output", out, "--weights", weights)

    assert code == 1
    for name, src_path in good.items():
        with Image.open(out / f"{Path(name).stem}.png") as img:
            assert img.size == Image.open(src_path).size
        assert f"{name} ->" in stdout
    for name, reason in bad.items():
        lines = one_line_errors(err, name)
        assert len(lines) == 1, (name, err)
        assert reason in lines[0] and lines[0].startswith("colorize.py: error:")
        assert not (out / f"{Path(name).stem}.png").exists()
    assert err[-1] == f"colorize.py: {len(bad)} of {len(good) + len(bad)} inputs failed"
    assert len(err) == len(bad) + 1  # nothing else: no traceback
    assert stray_temp_files(tmp_path) == []


def test_pixel_limit_is_checked_from_the_header(tmp_path, monkeypatch, capsys):
    bomb = png_declaring(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(data.ImageError, match=r"20000x20000 pixels is above the limit of 100,000,000"):
        data.open_image(bomb)
    photo = save_image(tmp_path / "photo.png", colorful_rgb(30, 40))
    monkeypatch.setattr(data, "MAX_PIXELS", 30 * 40 - 1)
    code, _, err = run_colorize(capsys, photo, "--weights", tiny_weights(tmp_path / "w.npz"))
    assert code == 1 and "40x30 pixels is above the limit of 1,199" in err[0]
    assert not (tmp_path / "photo_color.png").exists()
    monkeypatch.setattr(data, "MAX_PIXELS", 30 * 40)
    code, _, _ = run_colorize(capsys, photo, "--weights", tiny_weights(tmp_path / "w.npz"))
    assert code == 0 and (tmp_path / "photo_color.png").exists()


def _unusual_images(folder: Path) -> dict:
    """name -> (path, expected RGB in [0, 1] as a viewer shows it, expected alpha or None)."""
    rgb = colorful_rgb(11, 14, seed=7)
    alpha = np.random.default_rng(0).integers(0, 256, (11, 14), dtype=np.uint8)
    cases = {}
    levels16 = np.random.default_rng(1).integers(0, 65536, (9, 12)).astype(np.uint16)
    levels16[0, 0] = 3  # a dark corner: values below 256 must still be read as 16-bit
    p = save_image(folder / "deep.png", levels16)
    assert Image.open(p).mode == "I;16"
    cases["deep.png"] = (p, np.repeat(levels16[..., None] / 65535.0, 3, axis=-1), None)
    dark16 = np.random.default_rng(2).integers(0, 200, (5, 6)).astype(np.uint16)  # all below 256
    p = save_image(folder / "dark16.png", dark16)
    cases["dark16.png"] = (p, np.repeat(dark16[..., None] / 65535.0, 3, axis=-1), None)
    p = folder / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(p, quality=95)
    with Image.open(p) as img:
        assert img.mode == "CMYK"
        cases["cmyk.jpg"] = (p, np.asarray(img.convert("RGB")) / 255.0, None)
    p = folder / "rgba.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(p)
    cases["rgba.png"] = (p, rgb / 255.0, alpha)
    p = folder / "la.png"
    Image.fromarray(np.dstack([rgb[..., 1], alpha]), "LA").save(p)
    cases["la.png"] = (p, np.repeat(rgb[..., 1:2], 3, axis=-1) / 255.0, alpha)
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p = folder / "palette.png"
    pal.save(p)
    cases["palette.png"] = (p, np.asarray(pal.convert("RGB")) / 255.0, None)
    p = folder / "palette_transparent.png"
    pal.save(p, transparency=0)
    index = np.asarray(pal)
    cases["palette_transparent.png"] = (p, np.asarray(pal.convert("RGB")) / 255.0,
                                        np.where(index == 0, 0, 255).astype(np.uint8))
    p = folder / "bilevel.png"
    Image.fromarray(rgb).convert("1").save(p)
    cases["bilevel.png"] = (p, np.asarray(Image.open(p).convert("RGB")) / 255.0, None)
    p = save_image(folder / "gray.jpg", gray_rgb(8, 5)[..., 0], quality=95)
    cases["gray.jpg"] = (p, np.asarray(Image.open(p).convert("RGB")) / 255.0, None)
    return cases


def test_unusual_modes_keep_size_lightness_and_alpha(tmp_path, capsys):
    cases = _unusual_images(tmp_path / "in")
    code, _, err = run_colorize(capsys, tmp_path / "in", "--output", tmp_path / "out",
                                "--weights", tiny_weights(tmp_path / "w.npz"))
    assert code == 0, err
    for name, (_, expected_rgb, expected_alpha) in cases.items():
        with Image.open(tmp_path / "out" / f"{Path(name).stem}.png") as out:
            assert out.size == (expected_rgb.shape[1], expected_rgb.shape[0]), name
            assert out.mode == ("RGBA" if expected_alpha is not None else "RGB"), name
            pixels = np.asarray(out)
        if expected_alpha is not None:
            np.testing.assert_array_equal(pixels[..., 3], expected_alpha, err_msg=name)
        dL = np.abs(lightness(pixels[..., :3] / 255.0) - lightness(expected_rgb)).max()
        assert dL <= L8_TOL, f"{name}: L* off by {dL:.3f}"


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpeg_comes_out_upright(tmp_path, capsys, orientation):
    stored = colorful_rgb(6, 14, seed=orientation)
    stored[:, :7] //= 4  # a dark left half, so a wrong rotation or mirror shows
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "turned.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    with Image.open(path) as img:
        upright = np.asarray(ImageOps.exif_transpose(img).convert("RGB")) / 255.0
    code, _, err = run_colorize(capsys, path, "--weights", tiny_weights(tmp_path / "w.npz"))
    assert code == 0, err
    out = np.asarray(Image.open(tmp_path / "turned_color.png")) / 255.0
    assert out.shape == upright.shape
    assert upright.shape[:2] == (stored.shape[:2] if orientation == 3 else stored.shape[1::-1])
    assert np.abs(lightness(out) - lightness(upright)).max() <= L8_TOL


def test_unwritable_outputs_fail_alone_and_leave_nothing_behind(tmp_path, capsys):
    weights = tiny_weights(tmp_path / "w.npz")
    src = tmp_path / "in"
    a = save_image(src / "a.png", colorful_rgb(8, 8))
    b = save_image(src / "b.png", colorful_rgb(8, 8, seed=1))
    c = save_image(src / "c.jpg", colorful_rgb(8, 8, seed=2))
    save_image(src / "c.png", colorful_rgb(8, 8, seed=3))  # same output name as c.jpg
    # --output is a regular file, or lies under one: one line, exit 2, the file untouched
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("keep me")
    for output in (blocker, blocker / "sub"):
        code, _, err = run_colorize(capsys, a, b, "--output", output, "--weights", weights)
        assert code == 2 and len(err) == 1 and err[0].startswith("colorize.py: error:") and "is a file" in err[0]
        assert blocker.read_text() == "keep me"
    # an output name taken by a folder or by another input's output: a distinct name, nothing lost
    out = tmp_path / "out"
    (out / "b.png").mkdir(parents=True)
    code, stdout, err = run_colorize(capsys, src, "--output", out, "--weights", weights)
    assert code == 0, err
    assert f"{b} -> {out / 'b_png.png'}" in stdout and (out / "b.png").is_dir()
    assert f"{c} -> {out / 'c.png'}" in stdout and f"{src / 'c.png'} -> {out / 'c_png.png'}" in stdout
    assert (out / "a.png").is_file()
    # writing into the input folder must never overwrite an input
    before = a.read_bytes()
    code, stdout, err = run_colorize(capsys, a, "--output", src, "--weights", weights)
    assert code == 0 and f"{a} -> {src / 'a_png.png'}" in stdout and a.read_bytes() == before
    assert stray_temp_files(tmp_path) == []


def test_outputs_are_written_atomically_with_normal_permissions(tmp_path, capsys, monkeypatch):
    """A failure while the bytes go to disk leaves no output and no temp file."""
    weights = tiny_weights(tmp_path / "w.npz")
    photo = save_image(tmp_path / "p.png", colorful_rgb(8, 8))
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(serialize.os, "fsync", failing_fsync)
    code, _, err = run_colorize(capsys, photo, "--weights", weights)
    assert code == 1 and calls and "No space left on device" in err[0]
    assert not (tmp_path / "p_color.png").exists() and stray_temp_files(tmp_path) == []
    monkeypatch.undo()
    code, _, _ = run_colorize(capsys, photo, "--weights", weights)
    umask = os.umask(0)
    os.umask(umask)
    assert code == 0 and (tmp_path / "p_color.png").stat().st_mode & 0o777 == 0o666 & ~umask


# -- colorize.py: bad weights ---------------------------------------------------------------------

def _weights_case(tmp_path: Path, case: str, monkeypatch) -> tuple[Path, str]:
    """Write one kind of bad weights file; returns its path and a word its error must contain."""
    path = tmp_path / f"{case}.npz"
    good = tiny_weights(tmp_path / "good.npz")
    if case == "missing":
        return path, "no such file"
    if case == "empty":
        path.write_bytes(b"")
        return path, "empty"
    if case == "text":
        path.write_text("weights\n")
        return path, "not an .npz file"
    if case == "truncated":
        truncated_copy(good, path, 0.6)
        return path, "corrupt or truncated"
    if case == "flipped_byte":
        blob = bytearray(good.read_bytes())
        arrays, _ = load_npz(good)
        w = arrays["layer0.W"].tobytes()
        at = bytes(blob).index(w) + len(w) // 2  # inside the first weight array
        blob[at] ^= 0x40
        path.write_bytes(bytes(blob))
        return path, "corrupt"  # the zip's own CRC catches it
    if case == "checksum":  # a consistent zip whose arrays were changed after the checksum was taken
        with np.load(good) as npz:
            arrays = {name: npz[name] for name in npz.files}
        arrays["layer0.W"] = arrays["layer0.W"] * 2
        np.savez(path, **arrays)
        return path, "checksum mismatch"
    if case == "future_version":
        monkeypatch.setattr(serialize, "FORMAT_VERSION", serialize.FORMAT_VERSION + 1)
        tiny_weights(path)
        monkeypatch.undo()
        return path, "format version"
    if case == "other_architecture":  # arrays of a wider network under this network's config
        save_npz(path, ColorNet((4, 16), arch="seed").state_arrays(), kind="weights", config=ColorNet((4, 8), arch="seed").config)
        return path, "architecture needs"
    if case == "no_config":
        save_npz(path, ColorNet((4, 8), arch="seed").state_arrays(), kind="weights")
        return path, "architecture"
    if case in ("nan", "inf"):
        arrays = ColorNet((4, 8), arch="seed").state_arrays()
        arrays["layer3.W"][0, 0, 0, 0] = np.nan if case == "nan" else np.inf
        save_npz(path, arrays, kind="weights", config=ColorNet((4, 8), arch="seed").config)
        return path, "NaN or infinite"
    if case == "missing_param":
        arrays = ColorNet((4, 8), arch="seed").state_arrays()
        del arrays["layer3.b"]
        save_npz(path, arrays, kind="weights", config=ColorNet((4, 8), arch="seed").config)
        return path, "missing parameter layer3.b"
    if case == "not_nanocolor":
        np.savez(path, x=np.zeros(3))
        return path, "not a nanocolor file"
    raise AssertionError(case)


WEIGHT_CASES = ["missing", "empty", "text", "truncated", "flipped_byte", "checksum", "future_version",
                "other_architecture", "no_config", "nan", "inf", "missing_param", "not_nanocolor"]


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_bad_weights_give_one_clear_line_and_exit_2(tmp_path, capsys, monkeypatch, case):
    path, reason = _weights_case(tmp_path, case, monkeypatch)
    photo = save_image(tmp_path / "p.png", colorful_rgb(8, 8))
    code, stdout, err = run_colorize(capsys, photo, "--weights", path)
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"colorize.py: error: {path}") and reason in err[0], err
    assert not (tmp_path / "p_color.png").exists() and stdout == ""


def test_any_byte_flip_or_truncation_of_a_checkpoint_is_caught_or_harmless(tmp_path):
    """load_npz either raises CorruptFileError or returns exactly the saved arrays."""
    path = tmp_path / "checkpoint.npz"
    arrays = ColorNet((4, 8), seed=3, arch="seed").state_arrays()
    save_npz(path, arrays, kind="checkpoint", config={"widths": [4, 8], "kernel": 3})
    blob = path.read_bytes()
    rnd = random.Random(0)
    variants = [blob[:n] for n in range(0, len(blob), 97)]
    for _ in range(250):
        flipped = bytearray(blob)
        flipped[rnd.randrange(len(blob))] ^= 1 << rnd.randrange(8)
        variants.append(bytes(flipped))
    bad = tmp_path / "bad.npz"
    caught = 0
    for variant in variants:
        bad.write_bytes(variant)
        try:
            loaded, _ = load_npz(bad)
        except CorruptFileError as err:
            assert str(bad) in str(err)
            caught += 1
            continue
        assert_same_arrays(loaded, arrays)  # the flip hit a byte no reader uses (zip timestamps, ...)
    assert caught > 0.8 * len(variants)


# -- train.py: bad settings ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    return make_photos(tmp_path_factory.mktemp("photos"), 12)


def _train_case(case: str, tmp: Path, photos: Path) -> tuple[list, str]:
    """The arguments for one bad setting and a phrase its error line must contain."""
    if case == "empty_folder":
        (tmp / "empty").mkdir()
        return ["--data", tmp / "empty", "--size", "8", "--batch-size", "2"], "no image files found"
    if case == "no_color_photos":
        for i in range(3):
            save_image(tmp / "gray" / f"{i}.png", gray_rgb(12, 12, seed=i))
        (tmp / "gray" / "broken.jpg").write_bytes(b"\xff\xd8\xff")
        return ["--data", tmp / "gray", "--size", "8", "--batch-size", "2"], "none of the 4 image files"
    if case == "size_not_divisible":
        return ["--data", photos, "--size", "15", "--batch-size", "2"], "--size 15 must divide by 2"
    if case == "size_zero":
        return ["--data", photos, "--size", "0", "--batch-size", "2"], "at least 1"
    if case == "batch_too_large":
        return ["--data", photos, "--size", "8", "--batch-size", "50"], "batch size 50 is larger than"
    if case == "unknown_device":
        return ["--data", photos, "--size", "8", "--batch-size", "2", "--device", "tpu"], "unknown device 'tpu'"
    if case == "resume_nothing":
        return ["--resume", tmp / "nowhere", "--data", photos], "no such file"
    raise AssertionError(case)


TRAIN_CASES = ["empty_folder", "no_color_photos", "size_not_divisible", "size_zero", "batch_too_large",
               "unknown_device", "resume_nothing"]


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_bad_settings_give_one_clear_line_and_exit_2(tmp_path, photo_folder, case):
    args, reason = _train_case(case, tmp_path, photo_folder)
    common = [] if case == "resume_nothing" else ["--out", tmp_path / "run"]
    result = run_train(*args, *common, "--epochs", "1", "--widths", "4,8", "--quiet", cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(errors) == 1 and errors[0].startswith("train.py: error:") and reason in errors[0], result.stderr
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


# -- training that survives faults -----------------------------------------------------------------

def small_config(data_dir: Path, out: Path, epochs: int, **settings) -> TrainConfig:
    return TrainConfig(data=str(data_dir), out=str(out), epochs=epochs, batch_size=2, lr=3e-3, size=8,
                       val_fraction=0.25, seed=5, widths=(4, 8), progress=False, **settings)


def test_non_finite_loss_stops_naming_epoch_and_step_and_keeps_the_checkpoint(tmp_path, photo_folder,
                                                                             monkeypatch):
    run = tmp_path / "run"
    Trainer(small_config(photo_folder, run, epochs=2)).run()
    good = checkpoint_arrays(run)
    real_forward, calls = MSELoss.forward, []

    def forward(self, ab_pred, ab_true):
        calls.append(1)
        return float("nan") if len(calls) == 3 else real_forward(self, ab_pred, ab_true)
    monkeypatch.setattr(MSELoss, "forward", forward)
    trainer = Trainer(small_config(photo_folder, run, epochs=4), resume=True)
    with pytest.raises(TrainingStopped, match=r"loss is nan at epoch 3, step 3") as stop:
        trainer.run()
    assert stop.value.exit_code == 1
    assert_same_arrays(checkpoint_arrays(run), good)


def test_diverging_run_from_the_command_line(tmp_path, photo_folder):
    result = run_train("--data", photo_folder, "--out", tmp_path / "run", "--epochs", "2", "--size", "8",
                       "--batch-size", "2", "--widths", "4,8", "--lr", "1e30", "--quiet", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "diverged" in line]
    assert len(errors) == 1 and re.search(r"training diverged: loss is (nan|inf) at epoch 1, step \d+", errors[0])
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


def test_an_update_that_breaks_the_weights_at_the_end_of_an_epoch_is_never_saved(tmp_path, photo_folder,
                                                                                monkeypatch):
    """The loss of a step is computed before its update: a last step that turns the weights to NaN
    would otherwise reach the epoch's checkpoint, and --resume could never load it again."""
    run = tmp_path / "run"
    Trainer(small_config(photo_folder, run, epochs=1)).run()
    good = checkpoint_arrays(run)
    real_step, steps = Adam.step, []

    def step(self):
        real_step(self)
        steps.append(1)
        if len(steps) == 4:  # the last of epoch 2's four steps
            self.slots[0][0]["W"][...] = np.nan
    monkeypatch.setattr(Adam, "step", step)
    trainer = Trainer(small_config(photo_folder, run, epochs=3), resume=True)
    assert trainer.epoch == 1 and len(trainer.train_idx) // 2 == 4
    with pytest.raises(TrainingStopped, match=r"epoch 2, step 4"):
        trainer.run()
    arrays = checkpoint_arrays(run)  # still loadable: the NaN weights never reached it
    assert_same_arrays(arrays, good)


# Runs the script named by argv[1]; when it is about to rename its Nth finished checkpoint temp file
# onto checkpoint.npz, it first sends itself a signal ($NANOCOLOR_TEST_RENAME_SIGNAL = "N,SIGNAME").
# SIGKILL there leaves the temp file written and fsync'ed but never renamed.
SIGNAL_AT_RENAME = """
import os, runpy, signal, sys
count, name = os.environ["NANOCOLOR_TEST_RENAME_SIGNAL"].split(",")
real_replace, renames = os.replace, []
def replace(src, dst, **kwargs):
    if os.path.basename(dst) == "checkpoint.npz":
        renames.append(dst)
        if len(renames) == int(count):
            os.kill(os.getpid(), getattr(signal, name))
    return real_replace(src, dst, **kwargs)
os.replace = replace
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def train_with_signal(*args, cwd: Path, at: str | None = None, at_rename: str | None = None):
    """train.py sending itself a signal at a chosen moment: `at` = "EPOCH,STEP,SIGNAME" (the
    trainer's test hook), or `at_rename` = "N,SIGNAME" (just before its Nth checkpoint rename)."""
    cmd = train_cmd(*args)
    env = {"NANOCOLOR_TEST_SIGNAL_AT": at} if at else {}
    if at_rename:
        cmd[1:2] = ["-c", SIGNAL_AT_RENAME, cmd[1]]
        env["NANOCOLOR_TEST_RENAME_SIGNAL"] = at_rename
    return subprocess.run(cmd, cwd=cwd, env=script_env(**env), capture_output=True, text=True, timeout=120)


def checkpoint_position(run: Path) -> tuple[int, int] | None:
    """(epoch, step) of a run's checkpoint, after verifying it loads; None when there is none."""
    if not (run / "checkpoint.npz").exists():
        return None
    _, meta = load_npz(run / "checkpoint.npz", kinds=("checkpoint",))
    return meta["epoch"], meta["step"]


def test_sigkill_at_chosen_moments_leaves_a_loadable_checkpoint_and_resume_finishes(tmp_path, photo_folder):
    """SIGKILL in the middle of an epoch (the last epoch's checkpoint remains) and between writing a
    checkpoint's temp file and renaming it (the old checkpoint remains, the temp file is cleared
    by the next start): after every kill both files load, and the epochs never go back."""
    run = tmp_path / "run"
    common = ["--data", photo_folder, "--size", "8", "--batch-size", "2", "--widths", "4,8", "--quiet",
              "--epochs", "1000"]
    positions = []
    for attempt in range(8):
        before = checkpoint_position(run)
        epoch = before[0] if before else 0
        where = ["--resume", run] if before else ["--out", run]
        if attempt % 2:  # killed inside its first checkpoint save, before the rename
            result = train_with_signal(*common, *where, cwd=tmp_path, at_rename="1,SIGKILL")
        else:  # one epoch done and saved, then killed at step 1 + attempt % 3 of the next
            result = train_with_signal(*common, *where, cwd=tmp_path, at=f"{epoch + 2},{1 + attempt % 3},SIGKILL")
        assert result.returncode == -signal.SIGKILL, result.stderr
        leftovers = list(run.glob(".checkpoint.npz.*.tmp"))
        assert len(leftovers) == attempt % 2, leftovers  # exactly the kills inside a save left one
        position = checkpoint_position(run)  # checksum verified
        assert position == (before if attempt % 2 else (epoch + 1, 0)), (attempt, before, position)
        ColorNet.load(run / "model.npz")
        positions.append(position)
    assert positions == sorted(positions) and positions[-1][0] == 4
    result = run_train(*common[:-2], "--resume", run, "--epochs", 6, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert checkpoint_position(run) == (6, 0) and not list(run.glob(".checkpoint.npz.*.tmp"))


def test_sigint_and_sigterm_at_chosen_moments_then_resume_is_bit_identical(tmp_path, photo_folder):
    """SIGTERM while the photos load, SIGINT and SIGTERM inside epochs, at an epoch's first step and
    during a checkpoint save: each is one line and exit 130, the checkpoint holds exactly the
    moment it stopped at, and the resumed run ends with the weights of an uninterrupted one."""
    common = ["--data", photo_folder, "--size", "8", "--batch-size", "2", "--widths", "4,8", "--quiet",
              "--seed", "3", "--epochs", "4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_train(*common, "--out", straight, cwd=tmp_path).returncode == 0
    # (moment, message, checkpoint (epoch, step) afterwards; None: no checkpoint)
    plan = [({"at": "0,0,SIGTERM"}, "interrupted; nothing more was saved", None),
            ({"at": "1,2,SIGINT"}, "interrupted at epoch 1, step 2;", (0, 2)),
            ({"at": "2,0,SIGTERM"}, "interrupted at epoch 2, step 0;", (1, 0)),
            ({"at": "3,3,SIGINT"}, "interrupted at epoch 3, step 3;", (2, 3)),
            ({"at_rename": "1,SIGTERM"}, "interrupted after epoch 3;", (3, 0))]
    for moment, message, position in plan:
        where = ["--resume", split] if (split / "checkpoint.npz").exists() else ["--out", split]
        result = train_with_signal(*common, *where, cwd=tmp_path, **moment)
        assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("train.py: ") and message in lines[0], result.stderr
        assert checkpoint_position(split) == position
    assert run_train(*common, "--resume", split, cwd=tmp_path).returncode == 0
    assert checkpoint_position(split) == (4, 0)
    assert_same_arrays(checkpoint_arrays(split), checkpoint_arrays(straight))


def test_sigkill_at_random_moments_leaves_a_loadable_checkpoint_and_resume_finishes(tmp_path, photo_folder):
    """The randomized variant of test_sigkill_at_chosen_moments...: 16 kills at moments drawn from
    a seeded generator, each delivered by the trainer's hook (or just before a checkpoint rename),
    so the moments are the same on any machine, however fast."""
    run = tmp_path / "run"
    common = ["--data", photo_folder, "--size", "8", "--batch-size", "2", "--widths", "4,8", "--quiet",
              "--epochs", "1000"]  # 5 steps an epoch
    rnd = random.Random(1)
    positions = []
    for attempt in range(16):
        before = checkpoint_position(run)
        epoch = before[0] if before else 0
        where = ["--resume", run] if before else ["--out", run]
        during_save = rnd.random() < 0.5
        if during_save:  # inside the first checkpoint save, before its rename: the old one remains
            result = train_with_signal(*common, *where, cwd=tmp_path, at_rename="1,SIGKILL")
            expected = before
        else:  # in epoch epoch + ahead, before its step `step`: the epochs before it are saved
            ahead, step = rnd.randint(1, 3), rnd.randint(0, 4)
            result = train_with_signal(*common, *where, cwd=tmp_path, at=f"{epoch + ahead},{step},SIGKILL")
            expected = (epoch + ahead - 1, 0) if before or ahead > 1 else None
        assert result.returncode == -signal.SIGKILL, result.stderr
        leftovers = list(run.glob(".checkpoint.npz.*.tmp"))
        assert len(leftovers) == during_save, leftovers  # exactly the kills inside a save left one
        position = checkpoint_position(run)  # checksum verified
        assert position == expected, (attempt, before, position)
        if position:
            ColorNet.load(run / "model.npz")
            positions.append(position)
    assert positions == sorted(positions) and positions[-1][0] > 0  # never went backwards
    last = positions[-1][0]
    result = run_train(*common[:-2], "--resume", run, "--epochs", last + 2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert checkpoint_position(run) == (last + 2, 0) and not list(run.glob(".checkpoint.npz.*.tmp"))


def test_resume_is_bit_identical_to_training_in_one_go(tmp_path, photo_folder):
    common = ["--data", photo_folder, "--size", "8", "--batch-size", "2", "--widths", "4,8", "--quiet",
              "--seed", "3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_train(*common, "--out", straight, "--epochs", "4", cwd=tmp_path).returncode == 0
    assert run_train(*common, "--out", split, "--epochs", "1", cwd=tmp_path).returncode == 0
    assert run_train(*common, "--resume", split, "--epochs", "2", cwd=tmp_path).returncode == 0
    assert run_train(*common, "--resume", split, "--epochs", "4", cwd=tmp_path).returncode == 0
    assert_same_arrays(checkpoint_arrays(split), checkpoint_arrays(straight))


@pytest.mark.parametrize("schedule", [{}, {"schedule": "cosine", "warmup": 3}])
def test_resume_after_a_mid_epoch_interrupt_is_bit_identical(tmp_path, photo_folder, monkeypatch, schedule):
    """SIGTERM inside epoch 2 (the trainer saves a checkpoint and stops), then resumed: same weights
    (with a learning-rate schedule too: the resumed run takes up the schedule where it stopped)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    Trainer(small_config(photo_folder, straight, epochs=3, **schedule)).run()
    import nanocolor.trainer as trainer_module
    real_make_batch, batches = trainer_module.make_batch, []

    def make_batch(*args):
        batches.append(1)
        if len(batches) == 6:  # while preparing the second step of epoch 2
            os.kill(os.getpid(), signal.SIGTERM)
        return real_make_batch(*args)
    monkeypatch.setattr(trainer_module, "make_batch", make_batch)
    with pytest.raises(TrainingStopped, match=r"interrupted at epoch 2, step [12];") as stop:
        Trainer(small_config(photo_folder, split, epochs=3, **schedule)).run()
    assert stop.value.exit_code == 130
    _, meta = load_npz(split / "checkpoint.npz")
    assert meta["epoch"] == 1 and meta["step"] in (1, 2)  # before or after that step, but mid-epoch
    monkeypatch.undo()
    Trainer(small_config(photo_folder, split, epochs=3), resume=True).run()  # the schedule comes from the run
    assert_same_arrays(checkpoint_arrays(split), checkpoint_arrays(straight))


def test_sigint_and_sigterm_at_random_moments_then_resume_is_bit_identical(tmp_path, photo_folder):
    """The randomized variant of test_sigint_and_sigterm_at_chosen_moments...: eight stops at
    moments drawn from a seeded generator (a step of an epoch ahead, or a checkpoint save), each
    one line and exit 130 with the checkpoint at exactly that moment; the resumed run ends with
    the weights of an uninterrupted one. The moments are the same on any machine."""
    common = ["--data", photo_folder, "--size", "8", "--batch-size", "2", "--widths", "4,8", "--quiet",
              "--seed", "4", "--epochs", "12"]  # 5 steps an epoch
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_train(*common, "--out", straight, cwd=tmp_path).returncode == 0
    rnd = random.Random(2)
    for _ in range(8):
        before = checkpoint_position(split) or (0, 0)
        where = ["--resume", split] if (split / "checkpoint.npz").exists() else ["--out", split]
        name = rnd.choice(["SIGINT", "SIGTERM"])
        if rnd.random() < 0.25:  # during the next checkpoint save
            moment, position = {"at_rename": f"1,{name}"}, (before[0] + 1, 0)
            message = f"interrupted after epoch {before[0] + 1};"
        else:  # before step `step` of epoch `epoch` (1-based), at or after where the run stands
            epoch = before[0] + rnd.randint(1, 2)
            low = before[1] + 1 if epoch == before[0] + 1 else 0
            if low > 4:  # the run stands at its epoch's last step: the next epoch it is
                epoch, low = epoch + 1, 0
            step = rnd.randint(low, 4)
            moment, position = {"at": f"{epoch},{step},{name}"}, (epoch - 1, step)
            message = f"interrupted at epoch {epoch}, step {step};"
        result = train_with_signal(*common, *where, cwd=tmp_path, **moment)
        assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and message in lines[0], (moment, result.stderr)
        assert checkpoint_position(split) == position, moment
    assert run_train(*common, "--resume", split, cwd=tmp_path).returncode == 0
    assert checkpoint_position(split) == (12, 0)
    assert_same_arrays(checkpoint_arrays(split), checkpoint_arrays(straight))
