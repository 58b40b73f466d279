"""Image files in, model-ready pixels out: decoding with Pillow and the checkpoint's preprocessing.

Decoding: JPEG, PNG, WebP (anything Pillow reads) -> 8-bit RGB, with the EXIF orientation
applied; grayscale, palette, CMYK and alpha images are converted (alpha dropped, as
transformers' `convert_rgb` does), 16-bit grayscale keeps its top 8 bits. A file Pillow cannot
read is an `InputError` naming it.

Preprocessing follows transformers' ConvNext/ResNet image processor (PIL backend), as
`preprocessor_config.json` configures it: below 384 px, resize the shortest edge to
int(size / crop_pct) keeping the aspect ratio and center-crop size x size; at 384 px and up,
resize straight to size x size. Then rescale (x / 255) and normalise with its mean and std.
Resizing runs on the uint8 image in Pillow, exactly as the reference does.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from jaxaccel.errors import InputError
from jaxaccel.utils.files import read_lines

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any Pillow image (16-bit grayscale: its top 8 bits)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        image = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode(path: str | pathlib.Path) -> Image.Image:
    """An image file as 8-bit RGB, EXIF orientation applied; `InputError` naming the file."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later
            return to_rgb(ImageOps.exif_transpose(image))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{path}: not a readable image ({reason})") from None


def as_rgb_image(item) -> Image.Image:
    """A path, a PIL image or a uint8 [h, w, 3] (or [h, w]) array as an RGB PIL image."""
    if isinstance(item, Image.Image):
        return to_rgb(ImageOps.exif_transpose(item))
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3) or (
                item.ndim == 3 and item.shape[-1] not in (1, 3)):
            raise InputError(f"an image array must be uint8 [h, w, 3] or [h, w], got "
                             f"{item.dtype} {list(item.shape)}")
        return to_rgb(Image.fromarray(item.squeeze(-1) if item.ndim == 3 and item.shape[-1] == 1
                                      else item))
    return decode(item)


@dataclasses.dataclass(frozen=True)
class Preprocessor:
    """An image classifier's preprocessing, from its Config's fields."""

    size: int
    crop_pct: float | None
    resample: int
    rescale_factor: float | None
    mean: np.ndarray | None
    std: np.ndarray | None

    @classmethod
    def from_config(cls, cfg) -> "Preprocessor":
        return cls(size=cfg.image_size, crop_pct=cfg.crop_pct, resample=cfg.resample,
                   rescale_factor=cfg.rescale_factor if cfg.do_rescale else None,
                   mean=np.asarray(cfg.image_mean, np.float32) if cfg.do_normalize else None,
                   std=np.asarray(cfg.image_std, np.float32) if cfg.do_normalize else None)

    def resize_crop(self, image: Image.Image) -> Image.Image:
        """Resize (and crop) an RGB image to size x size, in uint8, as the reference does."""
        s = self.size
        if s >= 384 or not self.crop_pct:
            return image.resize((s, s), self.resample)
        short_target = int(s / self.crop_pct)
        w, h = image.size
        short, long = min(w, h), max(w, h)
        long_target = int(short_target * long / short)
        new_w, new_h = (short_target, long_target) if w <= h else (long_target, short_target)
        image = image.resize((new_w, new_h), self.resample)
        top, left = (new_h - s) // 2, (new_w - s) // 2
        return image.crop((left, top, left + s, top + s))

    def pixels(self, image: Image.Image) -> np.ndarray:
        """Float32 [size, size, 3]: resized, cropped, rescaled, normalised."""
        x = np.asarray(self.resize_crop(image), np.float32)
        if self.rescale_factor is not None:
            x = x * np.float32(self.rescale_factor)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x

    def __call__(self, item) -> np.ndarray:
        return self.pixels(as_rgb_image(item))


def list_images(directory: str | pathlib.Path) -> list[pathlib.Path]:
    """The image files directly in `directory`, by name; an error if there are none."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory")
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{directory}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_list(path: str | pathlib.Path) -> list[pathlib.Path]:
    """Image paths from a text file, one a line (relative to the file's folder)."""
    path = pathlib.Path(path)
    return [path.parent / line.strip() for line in read_lines(path, "--input") if line.strip()]


def describe(item, index: int) -> str:
    """How an input is named in output: its path, or `<image N>` for in-memory images."""
    return str(item) if isinstance(item, (str, pathlib.Path)) else f"<image {index}>"


def check_inputs(items: Sequence) -> None:
    if len(items) == 0:
        raise InputError("no images given")
