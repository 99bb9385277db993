"""Decoding: every mode to RGB, EXIF orientation, GIF/WebP/BMP, and a clear ImageError for bad files."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.errors import ImageError
from finetune.images import decode_for_size, open_image

from .helpers import image_bytes, png_with_claimed_size, solid


def _rgb(source: bytes | Path) -> np.ndarray:
    img = open_image(source)
    assert img.mode == "RGB"
    return np.asarray(img)


def _mode_image(mode: str) -> tuple[bytes, tuple[int, int, int]]:
    """(encoded image in ``mode``, the RGB a person sees at pixel (0, 0))."""
    if mode == "1":
        img = Image.new("1", (8, 8), 1)
        return image_bytes(img), (255, 255, 255)
    if mode == "L":
        return image_bytes(Image.new("L", (8, 8), 77)), (77, 77, 77)
    if mode == "LA":  # fully transparent: composited on white, not black
        return image_bytes(Image.new("LA", (8, 8), (0, 0))), (255, 255, 255)
    if mode == "P":
        img = Image.new("P", (8, 8), 1)
        img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
        img.info["transparency"] = 0
        img.putpixel((0, 0), 0)  # the transparent index
        return image_bytes(img, transparency=0), (255, 255, 255)
    if mode == "RGBA":
        img = Image.new("RGBA", (8, 8), (200, 0, 0, 255))
        img.putpixel((0, 0), (0, 0, 0, 0))
        return image_bytes(img), (255, 255, 255)
    if mode == "CMYK":  # JPEG holds CMYK; (0, 0, 0, 0) is white paper
        return image_bytes(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG", quality=100), (255, 255, 255)
    if mode == "I;16":  # 16-bit greyscale is scaled down to 8 bits, not clipped to white
        return image_bytes(Image.new("I;16", (8, 8), 32768)), (128, 128, 128)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    data, expected = _mode_image(mode)
    arr = _rgb(data)
    assert arr.shape == (8, 8, 3)
    assert np.abs(arr[0, 0].astype(int) - expected).max() <= 2, arr[0, 0]


def test_palette_transparency_keeps_opaque_colours() -> None:
    data, _ = _mode_image("P")
    arr = _rgb(data)
    assert tuple(arr[4, 4]) == (10, 200, 30)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(orientation: int) -> None:
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    img.paste((200, 0, 0), (0, 0, 20, 20))  # left half red, right half white
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: rotate 90 clockwise to display, 8: 90 counter-clockwise
    data = image_bytes(img, "JPEG", exif=exif.tobytes(), quality=95)
    arr = _rgb(data)
    assert arr.shape == (40, 20, 3)  # portrait once rotated
    red_on_top = arr[:20].mean(axis=(0, 1))[0] - arr[:20].mean(axis=(0, 1))[1] > 100
    assert red_on_top == (orientation == 6)
    small, _ = decode_for_size(data, 10)
    assert small.size == (10, 20)


def test_gif_gives_the_first_frame() -> None:
    frames = [solid((250, 0, 0), (10, 10)), solid((0, 250, 0), (10, 10))]
    data = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(io.BytesIO(data)) as gif:
        assert getattr(gif, "n_frames", 1) == 2
    arr = _rgb(data)
    assert arr[5, 5, 0] > 200 and arr[5, 5, 1] < 50


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "JPEG", "PNG"])
def test_accepted_formats(fmt: str, tmp_path: Path) -> None:
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(image_bytes(solid((30, 60, 90), (12, 10)), fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    arr = _rgb(path)
    assert arr.shape == (10, 12, 3)
    assert np.abs(arr[5, 5].astype(int) - (30, 60, 90)).max() <= 3


def test_jpeg_is_decoded_at_reduced_scale_but_resized_exactly() -> None:
    data = image_bytes(solid((0, 128, 255), (400, 300)), "JPEG")
    img, original = decode_for_size(data, 37)
    assert original == (400, 300)
    assert img.size == (49, 37)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not an image"),
        (b"just some text, not pixels", "not an image"),
        (image_bytes(solid((1, 2, 3), (64, 64)), "TIFF"), "not an image"),  # a real image, not an accepted format
        (image_bytes(solid((1, 2, 3), (64, 64)), "PNG")[:60], "truncated"),
        (image_bytes(solid((1, 2, 3), (64, 64)), "JPEG")[:200], "truncated"),
        (png_with_claimed_size(100_000, 100_000), "too large"),  # over twice Pillow's limit: its own error
        # Between Pillow's limit and twice that, Pillow only warns (an error under -W error); ours refuses.
        (png_with_claimed_size(12_000, 9_000), "pixels"),
    ],
    ids=["empty", "text", "tiff", "truncated-png", "truncated-jpeg", "bomb", "over-limit"],
)
def test_bad_files_raise_image_error(data: bytes, reason: str) -> None:
    with pytest.raises(ImageError, match=reason):
        open_image(data)


def test_pixel_limit_is_configurable() -> None:
    data = image_bytes(solid((1, 2, 3), (40, 40)))
    assert open_image(data, max_pixels=1600).size == (40, 40)
    with pytest.raises(ImageError, match="40x40 pixels, over the limit of 1599"):
        open_image(data, max_pixels=1599)


def test_missing_file_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        open_image(tmp_path / "nope.png")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_our_pixel_limit_refuses_what_pillow_only_warns_about() -> None:
    # With default warning filters Pillow lets 90-179 MP through with a warning; the engine must not.
    with pytest.raises(ImageError, match="12000x9000 pixels, over the limit"):
        open_image(png_with_claimed_size(12_000, 9_000))


def _open_paths() -> set[str]:
    paths = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed while listing
            pass
    return paths


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_files_are_closed_after_decoding(tmp_path: Path) -> None:
    # Pillow keeps multi-frame files (GIF) open after load() until the image is closed.
    frames = [solid((250, 0, 0), (10, 10)), solid((0, 250, 0), (10, 10))]
    path = tmp_path / "anim.gif"
    path.write_bytes(image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    images = [open_image(path), decode_for_size(path, 8)[0]]
    assert all(img.size in ((10, 10), (8, 8)) for img in images)
    assert str(path) not in _open_paths()


def test_exif_rotated_photo_reports_its_displayed_size() -> None:
    from finetune.images import decode_for_size

    exif = Image.Exif()
    exif[0x0112] = 6
    data = image_bytes(solid((10, 200, 10), (60, 30)), "JPEG", exif=exif.tobytes())
    _, original = decode_for_size(data, 16)
    assert original == (30, 60)


PAGE = b"<!DOCTYPE html><html><body><script>alert(document.cookie)</script></body></html>"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP"])
def test_an_html_page_appended_to_an_image_is_a_polyglot(fmt: str) -> None:
    """The first kilobyte was all that was looked at: a photo with a page after its end passed."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    data = image_bytes(noise, fmt)
    open_image(data)  # the image alone is fine
    for trailer in (PAGE, b"\n" * 5000 + b"<svg onload=alert(1)>", b"<SCRIPT src=//evil>"):
        with pytest.raises(ImageError, match="HTML or SVG document"):
            open_image(data + trailer)


def test_what_else_may_follow_an_image_is_kept() -> None:
    """Phones append data after a JPEG's end (a second, compressed image; vendor trailers), and an EXIF
    thumbnail carries its own end marker inside the first image: none of that is a page."""
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    thumb = image_bytes(solid((9, 9, 9), (16, 16)), "JPEG")
    # inside the image's own metadata, past the first kilobyte: the image's business, not a page after it
    data = image_bytes(photo, "JPEG", comment=b"x" * 2000 + b"<html> " + thumb)
    assert len(data) > 2048 and thumb[-2:] in data[:-2]  # an end marker before the real end
    second = image_bytes(Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)), "JPEG")
    for whole in (data, data + second, data + b"SEFH" + bytes(64) + b"vendor trailer"):
        assert open_image(whole).size == (64, 48)
