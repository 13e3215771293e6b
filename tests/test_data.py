"""Data loading on tiny images made here: every PIL mode and file type, the Kaggle layout,
gray and broken files, and the deterministic split / batch plan / flips."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import colorful_rgb, gray_rgb, save_image
from nanocolor.color import rgb_to_lab, scale_ab, scale_lightness
from nanocolor.data import (DataError, ImageError, epoch_plan, find_images, load_dataset, make_batch,
                            open_image, repeat_indices, split_indices, to_rgb)

SIZE = 8

# Four flat color blocks: survive palette quantization exactly and JPEG nearly so.
BLOCKS = np.zeros((16, 16, 3), np.uint8)
BLOCKS[:8, :8], BLOCKS[:8, 8:], BLOCKS[8:, :8], BLOCKS[8:, 8:] = (200, 30, 40), (20, 60, 220), (30, 180, 60), (240, 200, 20)


def load(root, **kwargs):
    """load_dataset at SIZE, no progress bar; returns (lightness, ab, warning messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lightness, ab = load_dataset(root, SIZE, progress=False, **kwargs)
    return lightness, ab, [str(w.message) for w in caught]


def skip_counts(message: str) -> tuple[int, int]:
    """(unreadable, gray) counts from the one 'skipped ...' warning."""
    unreadable = re.search(r"(\d+) unreadable", message)
    gray = re.search(r"(\d+) gray", message)
    assert unreadable and gray, message
    return int(unreadable.group(1)), int(gray.group(1))


# ---------------------------------------------------------------------------------------------
# Every image mode -> 8-bit RGB

def write_mode(path: Path, mode: str) -> tuple[Path, np.ndarray, float]:
    """Write BLOCKS (or a gray ramp) in PIL `mode`; returns (file, expected RGB uint8, tolerance)."""
    ramp = np.arange(16 * 16, dtype=np.float64).reshape(16, 16) / 255.0  # 0 .. 1
    if mode == "RGB":
        Image.fromarray(BLOCKS).save(path)
        return path, BLOCKS, 0
    if mode == "RGBA":
        alpha = np.full((16, 16), 255, np.uint8)
        alpha[:, :5] = 0  # fully transparent pixels keep their color channels
        Image.fromarray(np.dstack([BLOCKS, alpha]), "RGBA").save(path)
        return path, BLOCKS, 0
    if mode == "P":
        Image.fromarray(BLOCKS).quantize(4).save(path)
        return path, BLOCKS, 0
    if mode == "P+transparency":
        Image.fromarray(BLOCKS).quantize(4).save(path, transparency=0)
        return path, BLOCKS, 0
    if mode == "CMYK":
        Image.fromarray(BLOCKS).convert("CMYK").save(path, quality=95)
        return path, BLOCKS, 12
    gray = np.round(ramp * 255).astype(np.uint8)
    gray3 = np.repeat(gray[..., None], 3, axis=-1)
    if mode == "L":
        Image.fromarray(gray, "L").save(path)
        return path, gray3, 0
    if mode == "LA":
        Image.fromarray(np.dstack([gray, gray]), "LA").save(path)
        return path, gray3, 0
    if mode == "1":
        Image.fromarray(gray > 127).save(path)
        return path, np.where(gray3 > 127, 255, 0).astype(np.uint8), 0
    if mode == "I;16":
        Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(path)  # a 16-bit PNG
        return path, gray3, 1
    if mode == "F":
        Image.fromarray(ramp.astype(np.float32), "F").save(path)  # 32-bit float TIFF in [0, 1]
        return path, gray3, 1
    raise AssertionError(mode)


MODES = {"RGB": "png", "RGBA": "png", "P": "png", "P+transparency": "png", "CMYK": "jpg",
         "L": "png", "LA": "png", "1": "png", "I;16": "png", "F": "tif"}
OPENED_AS = {"RGB": ["RGB"], "RGBA": ["RGBA"], "P": ["P"], "P+transparency": ["P"], "CMYK": ["CMYK"],
             "L": ["L"], "LA": ["LA"], "1": ["1"], "I;16": ["I;16", "I"], "F": ["F"]}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_converts_to_rgb(mode, tmp_path):
    path, expected, tol = write_mode(tmp_path / f"img.{MODES[mode]}", mode)
    img = open_image(path)
    assert img.mode in OPENED_AS[mode]  # the file really holds that mode
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == (16, 16)
    got = np.asarray(rgb).astype(int)
    assert np.abs(got - expected.astype(int)).max() <= tol, f"{mode}: max error {np.abs(got - expected).max()}"


def test_sixteen_bit_png_uses_the_full_16_bit_range(tmp_path):
    """A 16-bit image whose brightest pixel is 65535 is white, not clipped at 255."""
    values = np.array([[0, 257, 32896], [49344, 65278, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    rgb = np.asarray(to_rgb(open_image(tmp_path / "deep.png")))
    np.testing.assert_array_equal(rgb[..., 0], [[0, 1, 128], [192, 254, 255]])


def test_color_modes_load_and_gray_modes_are_skipped(tmp_path):
    for mode, ext in MODES.items():
        write_mode(tmp_path / f"{mode.replace(';', '').replace('+', '_')}.{ext}", mode)
    lightness, ab, messages = load(tmp_path)
    assert lightness.shape == (5, SIZE, SIZE, 1) and ab.shape == (5, SIZE, SIZE, 2)  # RGB, RGBA, P x2, CMYK
    assert len(messages) == 1, messages
    assert skip_counts(messages[0]) == (0, 5)  # L, LA, 1, I;16, F carry no color


# ---------------------------------------------------------------------------------------------
# File types, folders, the Kaggle layout

EXTENSIONS = ["jpg", "jpeg", "JPG", "png", "bmp", "tif", "tiff", "webp"]


def test_every_extension_is_found_recursively_and_loaded(tmp_path):
    for i, ext in enumerate(EXTENSIONS):
        save_image(tmp_path / f"level{i % 3}" / "deeper" / f"photo{i}.{ext}", colorful_rgb(20, 24, seed=i))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "level0" / "data.npy").write_bytes(b"\x93NUMPY")
    found = find_images(tmp_path)
    assert sorted(p.name for p in found) == sorted(f"photo{i}.{ext}" for i, ext in enumerate(EXTENSIONS))
    lightness, ab, messages = load(tmp_path)
    assert messages == []
    assert lightness.shape == (len(EXTENSIONS), SIZE, SIZE, 1) and ab.shape == (len(EXTENSIONS), SIZE, SIZE, 2)
    assert lightness.dtype == np.float32 and ab.dtype == np.float32
    assert -1 <= lightness.min() and lightness.max() <= 1 and np.abs(ab).max() <= 1


def test_kaggle_layout_trains_only_on_color(tmp_path):
    for i in range(3):
        save_image(tmp_path / "color" / f"{i}.jpg", colorful_rgb(20, 20, seed=i))
        save_image(tmp_path / "gray" / f"{i}.jpg", gray_rgb(20, 20, seed=i))
    save_image(tmp_path / "color" / "sub" / "3.png", colorful_rgb(20, 20, seed=3))
    found = find_images(tmp_path)
    assert len(found) == 4 and all("color" in p.relative_to(tmp_path).parts[0] for p in found)
    lightness, _, messages = load(tmp_path)
    assert len(lightness) == 4
    assert messages == []  # the gray/ twins are not even looked at, so none is reported as skipped


def test_solid_color_gives_its_lab_values_and_center_crop(tmp_path):
    """A 60x10 strip red | green | blue is center-cropped to its green middle, then resized."""
    strip = np.zeros((10, 60, 3), np.uint8)
    strip[:, :20], strip[:, 20:40], strip[:, 40:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    save_image(tmp_path / "strip.png", strip)
    lightness, ab, _ = load(tmp_path)
    green = rgb_to_lab(np.array([0.0, 1.0, 0.0]))  # L* 87.7, a* -86.2, b* 83.2
    np.testing.assert_allclose(lightness[0, ..., 0], scale_lightness(green[0]), atol=1e-4)
    np.testing.assert_allclose(ab[0, ..., 0], scale_ab(green[1]), atol=1e-4)
    np.testing.assert_allclose(ab[0, ..., 1], scale_ab(green[2]), atol=1e-4)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(colorful_rgb(10, 20)).save(tmp_path / "rotated.jpg", exif=exif)
    assert open_image(tmp_path / "rotated.jpg").size == (10, 20)  # (width, height) as shown upright


def test_limit_takes_the_first_images(tmp_path):
    for i in range(5):
        save_image(tmp_path / f"{i}.png", colorful_rgb(12, 12, seed=i))
    lightness, _, _ = load(tmp_path, limit=2)
    full, _, _ = load(tmp_path)
    assert len(lightness) == 2
    np.testing.assert_array_equal(lightness, full[:2])


# ---------------------------------------------------------------------------------------------
# Gray and broken files: skipped, counted in one warning

def test_broken_and_gray_files_are_skipped_with_one_warning(tmp_path):
    for i in range(3):
        save_image(tmp_path / f"good{i}.png", colorful_rgb(20, 20, seed=i))
    save_image(tmp_path / "gray_rgb.jpg", gray_rgb(20, 20))
    save_image(tmp_path / "gray_l.png", gray_rgb(20, 20)[..., 0])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not a PNG\n")
    whole_png = save_image(tmp_path / "whole.png", colorful_rgb(40, 40, seed=9)).read_bytes()
    (tmp_path / "whole.png").unlink()
    (tmp_path / "truncated.png").write_bytes(whole_png[:len(whole_png) // 2])
    save_image(tmp_path / "whole.jpg", colorful_rgb(40, 40, seed=9), quality=95)
    whole_jpg = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "whole.jpg").unlink()
    (tmp_path / "truncated.jpg").write_bytes(whole_jpg[:len(whole_jpg) // 2])

    lightness, ab, messages = load(tmp_path)
    assert len(lightness) == 3 and len(ab) == 3
    assert len(messages) == 1, messages
    assert skip_counts(messages[0]) == (4, 2)


@pytest.mark.parametrize("name,content", [("empty.jpg", b""), ("text.png", b"hello"),
                                          ("fake.webp", b"RIFF\x00\x00\x00\x00WEBP")])
def test_open_image_raises_image_error_for_broken_files(name, content, tmp_path):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageError, match=name):
        open_image(tmp_path / name)


def test_open_image_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError):
        open_image(tmp_path / "missing.png")
    with pytest.raises(ImageError):
        open_image(tmp_path)


def test_empty_folder_raises_data_error(tmp_path):
    with pytest.raises(DataError):
        load_dataset(tmp_path, SIZE, progress=False)


def test_missing_folder_raises_data_error(tmp_path):
    with pytest.raises(DataError):
        load_dataset(tmp_path / "nowhere", SIZE, progress=False)


def test_folder_of_only_unusable_files_raises_data_error(tmp_path):
    (tmp_path / "a.png").write_text("nope")
    save_image(tmp_path / "b.png", gray_rgb(10, 10))
    (tmp_path / "readme.txt").write_text("no images here")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError):
            load_dataset(tmp_path, SIZE, progress=False)


# ---------------------------------------------------------------------------------------------
# Split, epoch plan, batches

def test_split_indices_deterministic_disjoint_complete():
    train, val = split_indices(50, 0.2, seed=7)
    again_train, again_val = split_indices(50, 0.2, seed=7)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(val, again_val)
    assert len(val) == 10 and len(train) == 40
    assert set(train).isdisjoint(val)
    assert sorted(set(train) | set(val)) == list(range(50))
    other_train, other_val = split_indices(50, 0.2, seed=8)
    assert set(other_val) != set(val)
    assert set(val) != set(range(40, 50)) and set(val) != set(range(10))  # shuffled, not a slice


def test_split_indices_edge_cases():
    train, val = split_indices(10, 0.0, seed=0)
    assert len(val) == 0 and sorted(train) == list(range(10))
    train, val = split_indices(5, 0.01, seed=0)
    assert len(val) == 1 and len(train) == 4  # asked for validation: at least one image
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError):
            split_indices(10, bad, seed=0)


def test_epoch_plan_deterministic_per_seed_and_epoch():
    plan = epoch_plan(20, 6, seed=3, epoch=1)
    again = epoch_plan(20, 6, seed=3, epoch=1)
    assert len(plan) == len(again) == 3  # 20 // 6: the last partial batch of 2 is dropped
    for (idx, flips), (idx2, flips2) in zip(plan, again):
        np.testing.assert_array_equal(idx, idx2)
        np.testing.assert_array_equal(flips, flips2)
        assert len(idx) == 6 and len(flips) == 6 and flips.dtype == bool
    used = np.concatenate([idx for idx, _ in plan])
    assert len(set(used)) == 18 and set(used) <= set(range(20))  # no image twice in an epoch

    def order(seed, epoch):
        return np.concatenate([idx for idx, _ in epoch_plan(20, 6, seed, epoch)])
    assert not np.array_equal(order(3, 1), order(3, 2))  # a new shuffle every epoch
    assert not np.array_equal(order(3, 1), order(4, 1))  # and per seed
    all_flips = np.concatenate([f for e in range(10) for _, f in epoch_plan(20, 5, 0, e)])
    assert 0.3 < all_flips.mean() < 0.7  # about half the images are flipped


def test_epoch_plan_with_fewer_images_than_a_batch_is_empty():
    assert epoch_plan(5, 8, seed=0, epoch=0) == []
    plan = epoch_plan(8, 8, seed=0, epoch=0)
    assert len(plan) == 1 and sorted(plan[0][0]) == list(range(8))


def test_make_batch_gathers_and_flips_left_right(rng):
    lightness = rng.standard_normal((6, 4, 5, 1)).astype(np.float32)
    ab = rng.standard_normal((6, 4, 5, 2)).astype(np.float32)
    lightness_before, ab_before = lightness.copy(), ab.copy()
    indices = np.array([4, 0, 3])
    flips = np.array([True, False, True])
    L, target = make_batch(lightness, ab, indices, flips)
    assert L.shape == (3, 4, 5, 1) and target.shape == (3, 4, 5, 2)
    for row, (i, flip) in enumerate(zip(indices, flips)):
        expected_L = lightness[i, :, ::-1] if flip else lightness[i]
        expected_ab = ab[i, :, ::-1] if flip else ab[i]
        np.testing.assert_array_equal(L[row], expected_L)
        np.testing.assert_array_equal(target[row], expected_ab)
    # the dataset itself is untouched
    np.testing.assert_array_equal(lightness, lightness_before)
    np.testing.assert_array_equal(ab, ab_before)


def test_photos_convert_to_lab_in_chunks_with_the_same_numbers(tmp_path, monkeypatch):
    """Chunks of LOAD_CHUNK photos (the memory of a big dataset's conversion), gray ones skipped
    between them: the arrays of a conversion all at once, in the same order."""
    import nanocolor.data as data
    rng = np.random.default_rng(0)
    for i in range(11):
        save_image(tmp_path / f"{i:02d}.png", gray_rgb(12, 10) if i in (3, 7) else colorful_rgb(12, 10, rng))
    with pytest.warns(UserWarning, match="2 gray"):
        whole = load_dataset(tmp_path, 8, progress=False)
    monkeypatch.setattr(data, "LOAD_CHUNK", 3)
    with pytest.warns(UserWarning, match="2 gray"):
        chunked = load_dataset(tmp_path, 8, progress=False)
    assert whole[0].shape == (9, 8, 8, 1)
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a, b)
    # with_paths names each photo of the arrays, in their order, the gray ones left out
    with pytest.warns(UserWarning, match="2 gray"):
        *arrays, paths = load_dataset(tmp_path, 8, progress=False, with_paths=True)
    assert [p.name for p in paths] == [f"{i:02d}.png" for i in range(11) if i not in (3, 7)]
    for a, b in zip(arrays, chunked):
        np.testing.assert_array_equal(a, b)


def test_repeat_indices_lists_a_folders_training_photos_k_times():
    paths = [Path("/d/a/0.png"), Path("/d/b/1.png"), Path("/d/b/sub/2.png"), Path("/d/c/3.png"), Path("/d/bb/4.png")]
    train = np.array([0, 2, 3, 4])  # photo 1 is a validation photo: it stays out
    np.testing.assert_array_equal(repeat_indices(train, paths, {"/d/b": 3}), [0, 2, 2, 2, 3, 4])
    np.testing.assert_array_equal(repeat_indices(train, paths, {"/d/b": 1, "/d/c": 2}), [0, 2, 3, 3, 4])
    with pytest.raises(DataError, match="--repeat /d/e: none of the training photos"):
        repeat_indices(train, paths, {"/d/e": 2})
    with pytest.raises(DataError):  # its only photo is a validation photo
        repeat_indices(np.array([0, 3]), paths, {"/d/b": 2})
