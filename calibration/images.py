"""Calibration from a directory of images, decoded lazily batch by batch.

The preprocessing spec is a small TOML file (given with `--preprocess`, or `preprocess.toml` in the
image directory), applied in this order, as torchvision-style pipelines do:

    resize = 256            # shorter side, bilinear (default: the crop's larger side)
    crop = [224, 224]       # center crop (default: the model input's H, W)
    channels = "RGB"        # "RGB", "BGR" or "L" (grayscale)
    scale = 0.00392156862   # pixel value multiplier (default 1/255)
    mean = [0.485, 0.456, 0.406]
    std = [0.229, 0.224, 0.225]
    layout = "NCHW"         # or "NHWC"

Images in class subdirectories (`dir/cat/1.jpg`) get integer labels in sorted class order.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from qpasses.errors import CalibrationError, InputError

from .data import InputSpec, RowSelection

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp"}


@dataclass(frozen=True)
class Preprocess:
    crop: tuple[int, int]
    resize: int
    channels: str = "RGB"
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"

    def apply(self, path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.channels == "L" else "RGB")
                w, h = img.size
                ratio = self.resize / min(w, h)
                img = img.resize((max(self.crop[1], round(w * ratio)), max(self.crop[0], round(h * ratio))), Image.BILINEAR)
                left, top = (img.size[0] - self.crop[1]) // 2, (img.size[1] - self.crop[0]) // 2
                img = img.crop((left, top, left + self.crop[1], top + self.crop[0]))
                x = np.asarray(img, dtype=np.float32)
        except OSError as exc:
            raise CalibrationError(f"{path}: cannot decode image ({exc})") from None
        x = x[..., None] if x.ndim == 2 else x
        if self.channels == "BGR":
            x = x[..., ::-1]
        x = (x * self.scale - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1) if self.layout == "NCHW" else x, dtype=np.float32)


def read_preprocess(path: Path, spec: InputSpec) -> Preprocess:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path}: cannot read preprocessing spec ({exc})") from None
    layout = data.pop("layout", "NCHW")
    if layout not in ("NCHW", "NHWC"):
        raise InputError(f"{path}: layout: expected \"NCHW\" or \"NHWC\", got {layout!r}")
    if len(spec.shape) != 4:
        raise InputError(f"{path}: image data needs a 4-D model input, {spec.name} is {list(spec.shape)}")
    h, w = (spec.shape[2], spec.shape[3]) if layout == "NCHW" else (spec.shape[1], spec.shape[2])
    dynamic = not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0)
    if dynamic and "crop" not in data:
        raise InputError(f"{path}: model input {spec.name} is {list(spec.shape)}: give the image size as crop = [H, W]")
    crop = data.pop("crop", [h, w])
    crop = _sizes(path, "crop", [crop, crop] if isinstance(crop, int) else crop, 2)
    channels = data.pop("channels", "RGB")
    if channels not in ("RGB", "BGR", "L"):
        raise InputError(f"{path}: channels: expected \"RGB\", \"BGR\" or \"L\", got {channels!r}")
    n = 1 if channels == "L" else 3
    (resize,) = _sizes(path, "resize", [data.pop("resize", max(crop))], 1)
    (scale,) = _numbers(path, "scale", [data.pop("scale", 1 / 255)], 1, nonzero=True)
    prep = Preprocess(crop=crop, resize=resize, channels=channels, scale=scale,
                      mean=_numbers(path, "mean", data.pop("mean", [0.0]), n),
                      std=_numbers(path, "std", data.pop("std", [1.0]), n, nonzero=True), layout=layout)
    if data:
        raise InputError(f"{path}: {sorted(data)[0]}: unknown field")
    n_channels = spec.shape[1] if layout == "NCHW" else spec.shape[3]
    if n != n_channels or (crop != (h, w) and not dynamic):
        raise InputError(f"{path}: preprocessing gives {crop[0]}x{crop[1]} {channels} images, model input "
                         f"{spec.name} is {list(spec.shape)} ({layout})")
    return prep


def _sizes(path: Path, key: str, value, count: int) -> tuple[int, ...]:
    """`count` positive integers (pixels)."""
    if not isinstance(value, list) or len(value) != count or \
            any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value):
        want = "a positive integer" if count == 1 else f"{count} positive integers"
        raise InputError(f"{path}: {key}: expected {want}, got {value if count > 1 else value[0]!r}")
    return tuple(value)


def _numbers(path: Path, key: str, value, channels: int, nonzero: bool = False) -> tuple[float, ...]:
    """Finite numbers, one or one per channel (a zero would divide, or blank every pixel)."""
    value = value if isinstance(value, list) else [value]
    if len(value) not in (1, channels) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                              or not np.isfinite(v) or (nonzero and v == 0) for v in value):
        kind = "non-zero finite number" if nonzero else "finite number"
        want = f"a {kind}" if channels == 1 else f"{kind}s, 1 or {channels} of them"
        raise InputError(f"{path}: {key}: expected {want}, got {value if channels > 1 else value[0]!r}")
    return tuple(float(v) for v in value)


@dataclass
class ImageSource(RowSelection):
    """Image files decoded and preprocessed batch by batch."""

    name: str
    files: list[Path]
    prep: Preprocess
    labels: np.ndarray | None = None
    rows: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.rows is None:
            self.rows = np.arange(len(self.files))

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        for take in self.batch_rows(batch_size, limit):
            yield {self.name: np.stack([self.prep.apply(self.files[r]) for r in take])}

    def sample_shapes(self) -> dict[str, set[tuple[int, ...]]]:
        """The one sample shape the preprocessing gives (what a model with dynamic H/W is sized to)."""
        c = 1 if self.prep.channels == "L" else 3
        h, w = self.prep.crop
        return {self.name: {(c, h, w) if self.prep.layout == "NCHW" else (h, w, c)}}


def open_images(directory: Path, inputs: list[InputSpec], preprocess: Path | None) -> ImageSource:
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"{directory}: no images found")
    if len(inputs) != 1:
        raise CalibrationError(f"{directory}: images feed a single-input model; this one has {len(inputs)} inputs")
    spec_path = preprocess or directory / "preprocess.toml"
    if not spec_path.is_file():
        raise InputError(f"{directory}: images need a preprocessing spec: pass --preprocess FILE or add preprocess.toml")
    prep = read_preprocess(spec_path, inputs[0])
    classes = sorted({f.parent for f in files} - {directory})
    labels = np.array([classes.index(f.parent) for f in files]) if classes and all(f.parent != directory for f in files) else None
    return ImageSource(inputs[0].name, files, prep, labels)
