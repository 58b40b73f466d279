"""Decoding and preprocessing vs. transformers' image processor on real photographs, and the
bad inputs a user will feed classify: each is handled or a one-line error naming the file."""

import io

import numpy as np
import pytest
from PIL import Image

skimage_data = pytest.importorskip("skimage.data", reason="test extra (scikit-image) missing")

from jaxaccel.errors import InputError  # noqa: E402
from jaxaccel.inputs.images import Preprocessor, decode, list_images  # noqa: E402
from jaxaccel.models.resnet import Config, preprocessing  # noqa: E402

PHOTOS = {"astronaut": skimage_data.astronaut, "chelsea": skimage_data.chelsea,
          "coffee": skimage_data.coffee, "rocket": skimage_data.rocket,
          "camera": skimage_data.camera}
PRE = {"crop_pct": 0.875, "do_normalize": True, "do_rescale": True, "do_resize": True,
       "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3,
       "rescale_factor": 0.00392156862745098}


def write_photos(folder) -> list:
    """Each sample photograph resized and re-encoded as JPEG, PNG and WebP."""
    paths = []
    for name, load in PHOTOS.items():
        image = Image.fromarray(load())
        image = image.resize((image.width * 2 // 3, image.height * 2 // 3))
        for fmt, suffix in (("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp")):
            paths.append(folder / f"{name}{suffix}")
            image.save(paths[-1], fmt)
    return paths


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos"))


def preprocessor(side: int) -> Preprocessor:
    cfg = Config(hidden_sizes=(8,), depths=(1,), labels=("a",),
                 **preprocessing({**PRE, "size": {"shortest_edge": side}}))
    return Preprocessor.from_config(cfg)


@pytest.mark.parametrize("side", [224, 64, 384])
def test_matches_transformers_image_processor(photos, side):
    """transformers' ConvNext processor (what ResNet checkpoints name), its PIL backend."""
    transformers = pytest.importorskip("transformers", reason="reference extra not installed")
    reference = transformers.ConvNextImageProcessorPil(**PRE, size={"shortest_edge": side})
    ours = preprocessor(side)
    for path in photos:
        image = Image.open(path).convert("RGB")  # the reference leaves grayscale as is
        want = reference(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        got = ours(path)
        assert got.shape == want.shape == (side, side, 3)
        # within 1/255 per pixel, in normalised units (divided by std)
        assert np.abs(got - want).max() <= (1 / 255) / min(PRE["image_std"]) + 1e-6, path


def test_grayscale_cmyk_16bit_and_exif_orientation(tmp_path):
    gray = skimage_data.camera()
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(skimage_data.chelsea()).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    tall = Image.fromarray(skimage_data.chelsea())  # 451 wide, 300 high
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    tall.save(tmp_path / "rotated.jpg", exif=exif)
    for name in ("gray.png", "cmyk.jpg", "deep.png", "rotated.jpg"):
        assert decode(tmp_path / name).mode == "RGB"
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(decode(tmp_path / "deep.png"))[..., 0], gray)
    assert decode(tmp_path / "rotated.jpg").size == (300, 451)


def test_one_pixel_image_is_classifiable(tmp_path):
    Image.new("RGB", (1, 1), (200, 10, 10)).save(tmp_path / "dot.png")
    out = preprocessor(64)(tmp_path / "dot.png")
    assert out.shape == (64, 64, 3) and np.isfinite(out).all()


@pytest.mark.parametrize("name, content", [
    ("truncated.jpg", "truncated"), ("notes.jpg", b"these are not the pixels you want\n"),
    ("empty.png", b"")])
def test_unreadable_files_are_one_line_errors_naming_them(tmp_path, name, content):
    if content == "truncated":
        buf = io.BytesIO()
        Image.fromarray(skimage_data.astronaut()).save(buf, "JPEG")
        content = buf.getvalue()[:len(buf.getvalue()) // 3]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError) as err:
        decode(tmp_path / name)
    assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)


def test_directory_without_images_is_an_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no pictures here")
    with pytest.raises(InputError, match="no image files"):
        list_images(tmp_path)
