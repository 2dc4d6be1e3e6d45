"""Image-directory calibration: preprocessing against a numpy reference, labels, the CLI path."""

import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLE
from qpasses.calibration.data import InputSpec, open_source
from qpasses.errors import InputError

SPEC = [InputSpec("input", ("N", 1, 8, 8), np.dtype(np.float32))]
PREP = 'channels = "L"\nscale = 0.00392156862745098\nmean = [0.5]\nstd = [0.5]\n'


@pytest.fixture
def digit_images(tmp_path):
    """The example's calibration digits as 8-bit PNGs in class folders."""
    x = np.load(EXAMPLE / "eval.npz")
    pixels = np.rint((x["input"][:40, 0] * 0.5 + 0.5) * 255).astype(np.uint8)
    for i, (img, label) in enumerate(zip(pixels, x["labels"][:40])):
        folder = tmp_path / "images" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(folder / f"{i:03d}.png")
    (tmp_path / "images" / "preprocess.toml").write_text(PREP)
    return tmp_path / "images", pixels, x["labels"][:40]


def test_images_match_numpy_preprocessing(digit_images):
    directory, pixels, labels = digit_images
    source = open_source(directory, SPEC)
    assert len(source) == 40
    got = np.concatenate([b["input"] for b in source.batches(16)])
    order = [int(p.stem) for p in source.files]
    expected = ((pixels[order] / 255.0 - 0.5) / 0.5).astype(np.float32)[:, None]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_array_equal(source.batch_labels(), labels[order])


def test_spec_must_fit_the_model(digit_images, tmp_path):
    directory, _, _ = digit_images
    (tmp_path / "rgb.toml").write_text('channels = "RGB"\n')
    with pytest.raises(InputError, match="model input"):
        open_source(directory, SPEC, tmp_path / "rgb.toml")
    (tmp_path / "typo.toml").write_text('chanels = "L"\n')
    with pytest.raises(InputError, match="chanels: unknown field"):
        open_source(directory, SPEC, tmp_path / "typo.toml")
    (directory / "preprocess.toml").unlink()
    with pytest.raises(InputError, match="preprocessing spec"):
        open_source(directory, SPEC)


def test_quantize_from_images(digit_images, tmp_path):
    directory, _, _ = digit_images
    proc = subprocess.run(["qpass", "quantize", str(EXAMPLE / "model.onnx"), "-t", "snpe", "--data", str(directory),
                           "-o", str(tmp_path / "out.onnx")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "calibrated on 35 samples" in proc.stderr


def test_a_model_with_dynamic_size_takes_it_from_the_crop(digit_images, tmp_path):
    directory, _, _ = digit_images
    dynamic = [InputSpec("input", ("N", 1, "H", "W"), np.dtype(np.float32))]
    with pytest.raises(InputError, match=r"crop = \[H, W\]"):
        open_source(directory, dynamic)
    (directory / "preprocess.toml").write_text(PREP + "crop = [8, 8]\n")
    source = open_source(directory, dynamic)
    assert source.sample_shapes() == {"input": {(1, 8, 8)}}
    assert next(source.batches(4))["input"].shape == (4, 1, 8, 8)
