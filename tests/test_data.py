"""Image decoding as the README promises it: any mode to RGB, EXIF orientation applied, transparency on white."""

import numpy as np
import PIL.Image
import pytest

from ldm_app.config import load_config
from ldm_app.data import load_image_dataset
from ldm_app.images import decode_image
from ldm_app.testing import TOY_COLORS, write_toy_dataset


def test_exif_orientation_is_applied(tmp_path):
    image = PIL.Image.new("RGB", (40, 20), "white")
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left as stored
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    image.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    shown = np.asarray(decode_image({"path": str(tmp_path / "photo.jpg"), "bytes": None}))
    assert shown.shape == (40, 20, 3)  # portrait, as a viewer shows it
    assert shown[2, 10, 0] > 200 and shown[2, 10, 1] < 60  # the strip is now on top
    assert shown[-3, 10].min() > 200


@pytest.mark.parametrize("make, expected", [
    (lambda: PIL.Image.new("I;16", (4, 4), 65535), (255, 255, 255)),  # 16-bit grey, full scale
    (lambda: PIL.Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),  # transparent black
    (lambda: PIL.Image.new("RGBA", (4, 4), (255, 0, 0, 255)), (255, 0, 0)),  # opaque red
])
def test_any_mode_becomes_rgb_with_transparency_on_white(make, expected):
    rgb = decode_image(make())
    assert rgb.mode == "RGB" and rgb.getpixel((1, 1)) == expected


def test_palette_transparency_becomes_white(tmp_path):
    image = PIL.Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 1)
    image.save(tmp_path / "p.png", transparency=0)
    rgb = decode_image({"path": str(tmp_path / "p.png"), "bytes": None})
    assert rgb.getpixel((0, 0)) == (255, 0, 0) and rgb.getpixel((2, 2)) == (255, 255, 255)


def test_undecodable_bytes_are_none():
    assert decode_image({"path": None, "bytes": b"not an image"}) is None


def test_sidecar_captions_stay_with_their_images(tmp_path):
    write_toy_dataset(tmp_path, n=4, layout="sidecar")
    ds = load_image_dataset(load_config(None, [f"data.path={tmp_path}"]).data)
    captions = {(tmp_path / f"{i:04d}.txt").read_text() for i in range(4)}
    assert len(ds) == 4 and set(ds["text"]) == captions
    for example in ds:  # each image's caption names its colour: check the pixels agree
        colour = example["text"].split()[0]
        assert np.asarray(decode_image(example["image"]))[16, 16].tolist() == list(TOY_COLORS[colour])
