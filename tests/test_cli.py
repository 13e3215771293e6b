"""train.py and colorize.py as a user runs them: subprocesses from the repo root, tiny models,
checking the files they write, their sizes, and every error path's exit code and message."""
from __future__ import annotations

import csv
import importlib.util
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import colorful_rgb, run_script, save_image
from nanocolor.color import rgb_to_lab
from nanocolor.data import split_indices
from nanocolor.model import ColorNet
from nanocolor.serialize import load_npz

def tiny_run(epochs: int = 1) -> list[str]:
    """train.py arguments for a run of seconds: 40 sample photos at 16x16, widths (4, 8)."""
    return ["--epochs", str(epochs), "--limit", "40", "--size", "16", "--widths", "4,8", "--batch-size", "8", "--quiet"]


TINY_RUN = tiny_run()


def read_log(run_dir) -> list[dict]:
    with open(run_dir / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def weights_of(path) -> dict:
    arrays, _ = load_npz(path)
    return {name: a for name, a in arrays.items() if name.startswith("layer")}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def assert_no_traceback(result) -> None:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr


# ---------------------------------------------------------------------------------------------
# train.py

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny epoch on 40 bundled sample photos; shared by the tests that only read its files."""
    run_dir = tmp_path_factory.mktemp("train") / "run"
    result = run_script("train.py", *TINY_RUN, "--out", run_dir)
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_train_one_epoch_writes_the_run_files(trained_run):
    run_dir, result = trained_run
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.npz", "curves.png", "log.csv", "model.npz",
                                                         "preview.png"]
    rows = read_log(run_dir)
    assert len(rows) == 1 and rows[0]["epoch"] == "1"
    for column in ("train_loss", "val_loss", "val_psnr"):
        assert np.isfinite(float(rows[0][column])), rows[0]
    assert 0 < float(rows[0]["train_loss"]) < 1  # scaled ab lives in [-1, 1]
    model = ColorNet.load(run_dir / "model.npz")
    assert model.config["widths"] == [4, 8]
    _, meta = load_npz(run_dir / "checkpoint.npz", kinds=("checkpoint",))
    assert meta["epoch"] == 1
    with Image.open(run_dir / "preview.png") as preview:
        preview.load()
        assert preview.format == "PNG" and preview.mode == "RGB"
        assert preview.width >= 3 * 16 and preview.height >= 16  # gray | truth | colorized, 16 px cells
    assert "Traceback" not in result.stderr


def test_resume_continues_to_epoch_two(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run[0], run_dir)
    first_row = read_log(run_dir)[0]
    epoch1_weights = weights_of(run_dir / "model.npz")
    result = run_script("train.py", "--resume", run_dir, "--epochs", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    rows = read_log(run_dir)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert rows[0] == first_row  # the history is kept, not restarted
    _, meta = load_npz(run_dir / "checkpoint.npz", kinds=("checkpoint",))
    assert meta["epoch"] == 2
    epoch2_weights = weights_of(run_dir / "model.npz")
    assert any(not np.array_equal(epoch1_weights[k], epoch2_weights[k]) for k in epoch1_weights)


def test_resumed_run_equals_an_uninterrupted_one(trained_run, tmp_path):
    """1 epoch + --resume to 2 gives the very same weights as 2 epochs in one go."""
    resumed = tmp_path / "resumed"
    shutil.copytree(trained_run[0], resumed)
    assert run_script("train.py", "--resume", resumed, "--epochs", "2", "--quiet").returncode == 0
    straight = tmp_path / "straight"
    result = run_script("train.py", *tiny_run(epochs=2), "--out", straight)
    assert result.returncode == 0, result.stderr
    a, b = weights_of(resumed / "checkpoint.npz"), weights_of(straight / "checkpoint.npz")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_second_run_into_the_same_out_without_resume_fails(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run[0], run_dir)
    before = (run_dir / "checkpoint.npz").read_bytes()
    result = run_script("train.py", *TINY_RUN, "--out", run_dir)
    assert result.returncode == 2
    assert_no_traceback(result)
    assert len(error_lines(result.stderr)) == 1 and "--resume" in result.stderr
    assert (run_dir / "checkpoint.npz").read_bytes() == before  # the old run is untouched


def test_train_on_a_folder_without_images_fails_cleanly(tmp_path):
    (tmp_path / "data").mkdir()
    result = run_script("train.py", *TINY_RUN, "--data", tmp_path / "data", "--out", tmp_path / "run")
    assert result.returncode == 2
    assert_no_traceback(result)
    assert len(error_lines(result.stderr)) == 1
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


# ---------------------------------------------------------------------------------------------
# colorize.py

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny untrained model file, as train.py writes it (float16, with its training size)."""
    path = tmp_path_factory.mktemp("weights") / "tiny.npz"
    ColorNet((4, 8), seed=0, arch="seed").save(path, train_size=16)
    return path


def lightness_of(path) -> np.ndarray:
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    return rgb_to_lab(rgb)[..., 0]


def test_colorize_writes_a_same_size_image_beside_the_input(weights, tmp_path):
    src = save_image(tmp_path / "photo.jpg", colorful_rgb(23, 37), quality=95)  # 37 wide, 23 high
    original = src.read_bytes()
    result = run_script("colorize.py", src, "--weights", weights)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "photo_color.png"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (37, 23) and img.mode == "RGB"
    # the output keeps the input's lightness: only the color comes from the network
    assert np.median(np.abs(lightness_of(out) - lightness_of(src))) < 1.0
    assert src.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.jpg", "photo_color.png"]


def test_colorize_output_dir_and_compare(weights, tmp_path):
    a = save_image(tmp_path / "in" / "a.png", colorful_rgb(23, 37, seed=1))
    b = save_image(tmp_path / "in" / "b.jpg", colorful_rgb(30, 20, seed=2))
    out_dir = tmp_path / "out"
    result = run_script("colorize.py", a, b, "--output", out_dir, "--compare", "--weights", weights)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.png", "a_compare.png", "b.png", "b_compare.png"]
    for name, (w, h) in {"a": (37, 23), "b": (20, 30)}.items():
        with Image.open(out_dir / f"{name}.png") as img:
            assert img.size == (w, h)
        with Image.open(out_dir / f"{name}_compare.png") as cmp:
            assert cmp.height == h and cmp.width >= 3 * w  # gray | original | colorized
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["a.png", "b.jpg"]  # nothing beside inputs


def test_colorize_compare_beside_the_input(weights, tmp_path):
    src = save_image(tmp_path / "pic.png", colorful_rgb(23, 37))
    result = run_script("colorize.py", src, "--compare", "--weights", weights)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pic.png", "pic_color.png", "pic_compare.png"]


def test_colorize_a_folder(weights, tmp_path):
    folder = tmp_path / "scans"
    save_image(folder / "one.png", colorful_rgb(23, 37, seed=1))
    save_image(folder / "two.bmp", colorful_rgb(16, 9, seed=2)[..., 0])  # a gray scan
    (folder / "notes.txt").write_text("not a photo")
    result = run_script("colorize.py", folder, "--weights", weights)
    assert result.returncode == 0, result.stderr
    for name, size in (("one_color.png", (37, 23)), ("two_color.png", (9, 16))):
        with Image.open(folder / name) as img:
            assert img.size == size and img.mode == "RGB"


def test_colorize_keeps_the_alpha_channel(weights, tmp_path):
    alpha = np.tile(np.linspace(0, 255, 37).astype(np.uint8), (23, 1))
    rgba = np.dstack([colorful_rgb(23, 37), alpha])
    src = tmp_path / "logo.png"
    Image.fromarray(rgba, "RGBA").save(src)
    assert run_script("colorize.py", src, "--weights", weights).returncode == 0
    with Image.open(tmp_path / "logo_color.png") as img:
        assert img.mode == "RGBA" and img.size == (37, 23)
        np.testing.assert_array_equal(np.asarray(img)[..., 3], alpha)


def test_colorize_with_the_trained_run_files(trained_run, tmp_path):
    run_dir = trained_run[0]
    src = save_image(tmp_path / "p.png", colorful_rgb(23, 37))
    for weights_file in ("model.npz", "checkpoint.npz"):
        result = run_script("colorize.py", src, "--output", tmp_path / weights_file, "--weights", run_dir / weights_file)
        assert result.returncode == 0, result.stderr
        with Image.open(tmp_path / weights_file / "p.png") as img:
            assert img.size == (37, 23)


def test_colorize_with_the_shipped_weights(tmp_path):
    src = save_image(tmp_path / "photo.png", colorful_rgb(23, 37))
    result = run_script("colorize.py", src)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "photo_color.png") as img:
        assert img.size == (37, 23)


def test_bad_inputs_fail_alone_and_good_ones_are_still_written(weights, tmp_path):
    good = save_image(tmp_path / "good.png", colorful_rgb(23, 37))
    (tmp_path / "notimage.png").write_text("plain text, not a PNG")
    (tmp_path / "empty.jpg").write_bytes(b"")
    png = save_image(tmp_path / "whole.png", colorful_rgb(40, 40)).read_bytes()
    (tmp_path / "whole.png").unlink()
    (tmp_path / "cut.png").write_bytes(png[:len(png) // 2])
    bad = ["missing.png", "notimage.png", "empty.jpg", "cut.png"]
    result = run_script("colorize.py", tmp_path / "missing.png", tmp_path / "notimage.png", good,
                        tmp_path / "empty.jpg", tmp_path / "cut.png", "--weights", weights)
    assert result.returncode != 0
    assert_no_traceback(result)
    with Image.open(tmp_path / "good_color.png") as img:
        assert img.size == (37, 23)
    for name in bad:
        lines = [line for line in error_lines(result.stderr) if name in line]
        assert len(lines) == 1, (name, result.stderr)  # one line per bad input
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == sorted(["good.png", "good_color.png", "notimage.png", "empty.jpg", "cut.png"])


@pytest.mark.parametrize("name", ["missing.png", "notes.png"])
def test_a_single_bad_input_gives_an_error_and_no_file(name, weights, tmp_path):
    if name == "notes.png":
        (tmp_path / name).write_text("shopping list")
    result = run_script("colorize.py", tmp_path / name, "--weights", weights)
    assert result.returncode != 0
    assert_no_traceback(result)
    assert result.stderr.splitlines()[0].startswith("colorize.py: error:") and name in result.stderr.splitlines()[0]
    assert not list(tmp_path.glob("*_color.png"))


@pytest.mark.parametrize("kind", ["garbage", "truncated", "missing"])
def test_corrupt_weights_exit_2_with_one_line(kind, weights, tmp_path):
    bad = tmp_path / "bad.npz"
    if kind == "garbage":
        bad.write_bytes(b"\x00" * 100)
    elif kind == "truncated":
        bad.write_bytes(weights.read_bytes()[:-300])
    src = save_image(tmp_path / "photo.png", colorful_rgb(23, 37))
    result = run_script("colorize.py", src, "--weights", bad)
    assert result.returncode == 2
    assert_no_traceback(result)
    assert len(error_lines(result.stderr)) == 1 and "bad.npz" in result.stderr
    assert not (tmp_path / "photo_color.png").exists()


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
@pytest.mark.parametrize("script,args", [("colorize.py", ["photo.png"]), ("train.py", TINY_RUN + ["--out", "run"])])
def test_device_gpu_without_cupy_exits_2_with_one_line(script, args, weights, tmp_path):
    save_image(tmp_path / "photo.png", colorful_rgb(23, 37))
    args = [tmp_path / a if a in ("photo.png", "run") else a for a in args]
    if script == "colorize.py":
        args += ["--weights", weights]
    result = run_script(script, *args, "--device", "gpu")
    assert result.returncode == 2
    assert_no_traceback(result)
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "cupy" in lines[0].lower(), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]  # nothing written


def test_train_refuses_a_non_positive_learning_rate(tmp_path):
    result = run_script("train.py", "--lr", "-1", "--out", tmp_path / "run")
    assert result.returncode == 2
    assert "--lr must be above 0, got -1.0" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option, value, setting", [("--rebalance", "0.5", "rebalance"),
                                                    ("--chroma-match", "2", "chroma_match"),
                                                    ("--loss", "psnr", "loss")])
def test_a_reweighted_loss_keeps_its_setting_and_resumes_bit_identically(option, value, setting, trained_run,
                                                                           tmp_path):
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    result = run_script("train.py", *TINY_RUN, option, value, "--out", resumed)
    assert result.returncode == 0, result.stderr
    arrays, meta = load_npz(resumed / "checkpoint.npz", kinds=("checkpoint",))
    assert meta["train_config"][setting] == (value if setting == "loss" else float(value))
    if setting == "rebalance":
        assert arrays["class_weights"].shape == (258,) and arrays["class_weights"].max() > 2
    plain = weights_of(trained_run[0] / "checkpoint.npz")  # the same run with the plain MSE
    assert any(not np.array_equal(a, plain[k]) for k, a in weights_of(resumed / "checkpoint.npz").items())
    assert run_script("train.py", "--resume", resumed, "--epochs", "2", "--quiet").returncode == 0
    result = run_script("train.py", *tiny_run(epochs=2), option, value, "--out", straight)
    assert result.returncode == 0, result.stderr
    a, b = weights_of(resumed / "checkpoint.npz"), weights_of(straight / "checkpoint.npz")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("extra", [["--chroma-match", "-1"], ["--chroma-match", "1", "--loss", "classify"],
                                   ["--chroma-match", "1", "--rebalance", "0.5"],
                                   ["--chroma-match", "1", "--loss", "psnr"]])
def test_train_refuses_a_chroma_match_it_cannot_use(extra, tmp_path):
    result = run_script("train.py", *extra, "--out", tmp_path / "run")
    assert result.returncode == 2 and "--chroma-match" in result.stderr, result.stderr
    assert len(error_lines(result.stderr)) == 1
    assert_no_traceback(result)
    assert not (tmp_path / "run").exists()


def test_train_refuses_to_rebalance_the_per_photo_loss(tmp_path):
    result = run_script("train.py", "--loss", "psnr", "--rebalance", "0.5", "--out", tmp_path / "run")
    assert result.returncode == 2 and "--loss psnr" in result.stderr, result.stderr
    assert len(error_lines(result.stderr)) == 1
    assert_no_traceback(result)
    assert not (tmp_path / "run").exists()


def test_repeat_lists_a_folders_photos_k_times_and_keeps_the_split(tmp_path):
    common = ["--epochs", "1", "--size", "16", "--widths", "4,8", "--batch-size", "4", "--quiet"]
    data = tmp_path / "photos"
    for folder, count in (("common", 12), ("rare", 4)):
        for i in range(count):
            save_image(data / folder / f"{i:02d}.png", colorful_rgb(20, 20, seed=100 * len(folder) + i))
    for name, extra in (("plain", []), ("repeated", ["--repeat", f"{data / 'rare'}=3"])):
        result = run_script("train.py", "--data", data, *common, *extra, "--out", tmp_path / name)
        assert result.returncode == 0, result.stderr
    (plain, _), (repeated, meta) = (load_npz(tmp_path / name / "checkpoint.npz", kinds=("checkpoint",))
                                    for name in ("plain", "repeated"))
    assert meta["train_config"]["repeat"] == {str(data / "rare"): 3}
    # 16 photos, 2 held out as before; each training photo in rare/ (the last 4 paths) counts 3 times
    train_idx, _ = split_indices(16, 0.1, 0)
    rare_in_training = int(np.sum(train_idx >= 12))
    assert int(plain["adam.t"]) == 14 // 4  # Adam's step count: the batches of the epoch
    assert int(repeated["adam.t"]) == (14 + 2 * rare_in_training) // 4


def test_repeat_refuses_a_folder_outside_the_data(tmp_path):
    result = run_script("train.py", "--repeat", f"{tmp_path}=2", "--out", tmp_path / "run")
    assert result.returncode == 2 and "--repeat" in result.stderr and "not a folder inside --data" in result.stderr
    assert_no_traceback(result)
    assert not (tmp_path / "run").exists()
    result = run_script("train.py", "--repeat", "data/sample/forest=0", "--out", tmp_path / "run")
    assert result.returncode == 2 and "FOLDER=K" in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["0", "1.5", "nan"])
def test_train_refuses_a_rebalance_outside_0_to_1(value, tmp_path):
    result = run_script("train.py", "--rebalance", value, "--out", tmp_path / "run")
    assert result.returncode == 2 and "--rebalance must be" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_init_starts_from_given_weights_and_rejects_another_architecture(tmp_path):
    common = [*TINY_RUN, "--lr", "1e-9"]  # a negligible step: the result stays at the initial weights
    start = ColorNet((4, 8), seed=7, arch="seed")
    start.save(tmp_path / "start.npz", dtype=np.float32)
    result = run_script("train.py", *common, "--init", tmp_path / "start.npz", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    trained = ColorNet.load(tmp_path / "run" / "checkpoint.npz")
    for a, b in zip(start.param_layers, trained.param_layers):
        np.testing.assert_allclose(b.params["W"], a.params["W"], atol=1e-6)
    result = run_script("train.py", *common, "--widths", "4,6", "--init", tmp_path / "start.npz",
                        "--out", tmp_path / "other")  # narrower: neither the same net, nor one grown from it
    assert result.returncode == 2 and "does not match" in result.stderr


def test_the_textbook_engine_trains_and_colorizes_end_to_end(tmp_path, trained_run):
    """--conv im2col runs nanocolor/layers.py alone; it computes what the default engine computes."""
    run_dir, _ = trained_run
    args = [a for a in TINY_RUN if a != "--quiet"] + ["--quiet", "--seed", "2"]
    runs = {}
    for engine in ("im2col", "auto"):
        result = run_script("train.py", *args, "--conv", engine, "--out", tmp_path / engine)
        assert result.returncode == 0, result.stderr
        runs[engine] = weights_of(tmp_path / engine / "checkpoint.npz")
    for name, value in runs["auto"].items():
        np.testing.assert_allclose(runs["im2col"][name], value, rtol=1e-3, atol=1e-4, err_msg=name)
    photo = save_image(tmp_path / "in.png", colorful_rgb(21, 30, seed=5))
    outputs = {}
    for engine in ("im2col", "auto"):
        out = tmp_path / f"out_{engine}"
        result = run_script("colorize.py", photo, "--weights", run_dir / "model.npz", "--conv", engine, "--output", out)
        assert result.returncode == 0, result.stderr
        outputs[engine] = np.asarray(Image.open(out / "in.png"), dtype=int)
    assert outputs["im2col"].shape == (21, 30, 3)
    assert np.abs(outputs["im2col"] - outputs["auto"]).max() <= 1


def test_train_off_a_terminal_writes_a_few_progress_lines(tmp_path):
    """stderr is a pipe here, as in a log file or CI: no line per redraw of a progress bar."""
    result = run_script("train.py", *[a for a in tiny_run(2) if a != "--quiet"], "--limit", "80",
                        "--batch-size", "2", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    for epoch in (1, 2):
        progress = [line for line in lines if line.startswith(f"epoch {epoch}/2: ") and "batches" in line]
        assert 1 <= len(progress) <= 10, progress  # 36 steps, at most one line per tenth
        assert "loss=" in progress[-1]
    assert "\r" not in result.stderr
    assert sum("loading images" in line for line in lines) <= 10


def test_weights_by_the_name_of_a_shipped_file(tmp_path, monkeypatch):
    """--weights NAME finds nanocolor/weights/NAME.npz, unless NAME is a file of its own."""
    from nanocolor.infer import DEFAULT_WEIGHTS, weights_file
    monkeypatch.chdir(tmp_path)
    assert weights_file("colornet") == DEFAULT_WEIGHTS
    assert weights_file("no-such-model") == tmp_path.joinpath("no-such-model").relative_to(tmp_path)
    assert weights_file(tmp_path / "colornet") == tmp_path / "colornet"  # a path is a path
    (tmp_path / "colornet").write_bytes(b"a file of that name here")
    assert weights_file("colornet").resolve() == tmp_path / "colornet"
    assert weights_file("sub/colornet").name == "colornet" and weights_file("sub/colornet") != DEFAULT_WEIGHTS
