"""nanocolor/png.py: PNGs compressed in row bands decode to the exact pixels, with their text."""
import io
import zlib

import numpy as np
import pytest
from PIL import Image

from nanocolor import png
from nanocolor.images import OUTPUT_KEY, encode_png


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 23, 3), (17, 1, 4), (301, 200, 3), (64, 50, 2), (33, 40)])
@pytest.mark.parametrize("band_bytes", [1, 1000, 1 << 22])
def test_band_compressed_png_decodes_to_the_same_pixels(monkeypatch, shape, band_bytes):
    monkeypatch.setattr(png, "BAND_BYTES", band_bytes)  # one row per band, several rows, one band
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    data = png.encode(pixels, {"nanocolor": "colorized from é.png", "other": "ж"})
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        np.testing.assert_array_equal(np.asarray(img), pixels)
        assert img.info["nanocolor"] == "colorized from é.png" and img.info["other"] == "ж"


def test_every_chunk_checksum_and_the_stream_checksum_hold():
    pixels = np.random.default_rng(0).integers(0, 256, (50, 40, 3), dtype=np.uint8)
    data = png.encode(pixels)
    assert data[:8] == png.PNG_SIGNATURE
    pos, idat = 8, b""
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert int.from_bytes(data[pos + 8 + length:pos + 12 + length], "big") == zlib.crc32(kind + body)
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    zlib.decompress(idat)  # checks the Adler-32 of the whole stream


def test_adler32_combine_matches_zlib():
    a, b = b"abc" * 1001, bytes(range(256)) * 300
    assert png.adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(a + b)
    assert png.adler32_combine(1, zlib.adler32(b), len(b)) == zlib.adler32(b)


def test_encode_png_keeps_alpha_and_marks_the_output():
    rgb = np.random.default_rng(1).uniform(0, 1, (9, 7, 3))
    alpha = np.arange(63, dtype=np.uint8).reshape(9, 7)
    with Image.open(io.BytesIO(encode_png(rgb, alpha, "note"))) as img:
        assert img.mode == "RGBA" and img.info[OUTPUT_KEY] == "note"
        np.testing.assert_array_equal(np.asarray(img)[..., 3], alpha)
        np.testing.assert_array_equal(np.asarray(img)[..., :3], np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        png.encode(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError):
        png.encode(np.zeros((0, 4, 3), np.uint8))
