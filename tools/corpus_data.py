"""Real data for the corpus models, preprocessed as each package's own code does it (tools/corpus.toml).

Images come from scikit-image's bundled samples and scikit-learn's `load_sample_images`, several
crops of each; calibration and evaluation never share a source image (every fourth source is for
evaluation). OCR text and the layout detector's document pages are rendered with Pillow; speech is synthesised by espeak-ng (Debian's
`espeak-ng`). Everything is seeded: the same call gives the same arrays.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CROPS_PER_IMAGE = 4


def source_images() -> list[tuple[str, np.ndarray]]:
    """(name, HxWx3 uint8 RGB) of every bundled photo; grayscale ones are repeated to 3 channels."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = ["astronaut", "camera", "cat", "coffee", "coins", "hubble_deep_field", "immunohistochemistry",
             "page", "rocket", "text", "clock", "horse", "moon", "retina", "brick", "grass", "gravel", "colorwheel"]
    images = []
    for name in names:
        image = np.asarray(getattr(skimage.data, name)())
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        images.append((name, np.ascontiguousarray(image[..., :3]).astype(np.uint8)))
    for i, image in enumerate(load_sample_images().images):
        images.append((f"sklearn-{i}", image))
    return images


def crops(image: np.ndarray, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """The whole image and n-1 random crops of 50-90% of each side, some mirrored."""
    out = [image]
    h, w = image.shape[:2]
    for _ in range(n - 1):
        ch, cw = int(h * rng.uniform(0.5, 0.9)), int(w * rng.uniform(0.5, 0.9))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = image[y:y + ch, x:x + cw]
        out.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    return out


def letterbox(image: np.ndarray, size: tuple[int, int], fill: int) -> np.ndarray:
    """Resize keeping the aspect ratio into the top-left of a size[0] x size[1] canvas."""
    h, w = image.shape[:2]
    r = min(size[0] / h, size[1] / w)
    resized = np.asarray(Image.fromarray(image).resize((max(1, int(w * r)), max(1, int(h * r))), Image.BILINEAR))
    canvas = np.full((size[0], size[1], 3), fill, np.uint8)
    canvas[:resized.shape[0], :resized.shape[1]] = resized
    return canvas


def resize_crop(image: np.ndarray, size: tuple[int, int], resize: int) -> np.ndarray:
    """Resize to resize x resize (aspect ratio not kept), then take the centre size[0] x size[1]."""
    resized = np.asarray(Image.fromarray(image).resize((resize, resize), Image.BILINEAR))
    top, left = (resize - size[0]) // 2, (resize - size[1]) // 2
    return resized[top:top + size[0], left:left + size[1]]


def fit(image: np.ndarray, entry: dict) -> np.ndarray:
    """The registry's `fit`: letterbox (default, padded with `fill`), stretch, or resize-crop."""
    size = tuple(entry["size"])
    how = entry.get("fit", "letterbox")
    if how == "stretch":
        return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
    if how == "resize-crop":
        return resize_crop(image, size, entry["resize"])
    return letterbox(image, size, entry.get("fill", 0))


def normalise(image: np.ndarray, entry: dict) -> np.ndarray:
    """HxWx3 RGB uint8 -> float32 as the package feeds it: 3xHxW, or HxWx3 for `layout = "NHWC"`."""
    x = image[..., ::-1] if entry.get("channels") == "BGR" else image
    x = (x.astype(np.float32) * entry["scale"] - np.asarray(entry["mean"], np.float32)) / np.asarray(entry["std"], np.float32)
    return np.ascontiguousarray(x if entry.get("layout") == "NHWC" else x.transpose(2, 0, 1), dtype=np.float32)


def image_split(entry: dict, seed: int = 0, whole: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, evaluation) batches [N, 3, H, W] (or [N, H, W, 3]) for an image model; without
    the `whole` images (only random crops: another seed's crops share nothing with the first's)."""
    rng = np.random.default_rng(seed)
    calib, evals = [], []
    for i, (_, image) in enumerate(source_images()):
        for crop in crops(image, rng, CROPS_PER_IMAGE)[0 if whole else 1:]:
            (evals if i % 4 == 3 else calib).append(normalise(fit(crop, entry), entry))
    return np.stack(calib), np.stack(evals)


WORDS = ("the of model layer int8 scale table figure results method data input output latency accuracy "
         "calibration quantized network we show that this paper in for with on is are by as from range error "
         "per channel tensor kernel runtime measured and a to").split()


def document_pages(entry: dict, count: int, seed: int, evaluation: bool) -> np.ndarray:
    """Rendered document pages, normalised as `normalise` does, for a layout detector: a header, a
    title, paragraphs in one or two columns, figures (bundled photos, split between calibration and
    `evaluation` pages as `image_split` splits them) with captions, ruled tables with captions, and a
    footer, at random sizes and places."""
    rng = np.random.default_rng(seed)
    photos = [image for i, (_, image) in enumerate(source_images()) if (i % 4 == 3) == evaluation]
    out = []
    for _ in range(count):
        w, h = 1000, int(rng.integers(1250, 1450))
        page = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(235, 256, 3)))
        draw = ImageDraw.Draw(page)
        ink = tuple(int(v) for v in rng.integers(0, 60, 3))
        margin, columns = int(rng.integers(60, 110)), int(rng.integers(1, 3))

        def text(x: int, y: int, width: int, size: int, lines: int) -> int:
            font = ImageFont.load_default(size=size)
            for _ in range(lines):
                line, words = "", rng.choice(WORDS, 40)
                for word in words:
                    if draw.textlength(f"{line} {word}", font=font) > width:
                        break
                    line = f"{line} {word}".strip()
                draw.text((x, y), line, fill=ink, font=font)
                y += int(size * 1.45)
            return y

        y = text(margin, 30, w // 2, 14, 1) + 30  # header
        y = text(margin + int(rng.integers(0, 200)), y, w - 2 * margin - 200, int(rng.integers(30, 44)), 1) + 25  # title
        column_w = (w - 2 * margin - (columns - 1) * 40) // columns
        for c in range(columns):
            x, cy = margin + c * (column_w + 40), y
            while cy < h - 220:
                kind = rng.choice(["text", "text", "figure", "table"])
                if kind == "text":
                    cy = text(x, cy, column_w, int(rng.integers(15, 20)), int(rng.integers(3, 10))) + 20
                elif kind == "figure":
                    photo = photos[int(rng.integers(len(photos)))]
                    fh = int(rng.integers(120, 300))
                    fw = min(column_w, int(fh * photo.shape[1] / photo.shape[0]))
                    page.paste(Image.fromarray(photo).resize((fw, fh), Image.BILINEAR), (x + (column_w - fw) // 2, cy))
                    cy = text(x + 20, cy + fh + 8, column_w - 40, 13, int(rng.integers(1, 3))) + 20  # caption
                else:
                    cy = text(x + 20, cy, column_w - 40, 13, 1) + 6  # caption above the table
                    rows, cols = int(rng.integers(3, 8)), int(rng.integers(2, 6))
                    row_h, col_w = int(rng.integers(22, 30)), column_w // cols
                    for r in range(rows + 1):
                        draw.line([(x, cy + r * row_h), (x + cols * col_w, cy + r * row_h)], fill=ink, width=1)
                    for k in range(cols + 1):
                        draw.line([(x + k * col_w, cy), (x + k * col_w, cy + rows * row_h)], fill=ink, width=1)
                    for r in range(rows):
                        for k in range(cols):
                            text(x + k * col_w + 4, cy + r * row_h + 5, col_w - 8, 12, 1)
                    cy += rows * row_h + 24
        text(w // 2 - 60, h - 60, 200, 13, 1)  # footer
        out.append(normalise(fit(np.asarray(page), entry), entry))
    return np.stack(out)


def rotations(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each square image in its four rotations (what an orientation classifier sees), and the labels."""
    out = [np.rot90(batch, k, axes=(2, 3)) for k in range(4)]
    labels = np.repeat(np.arange(4), len(batch))
    return np.ascontiguousarray(np.concatenate(out)), labels


ALPHABET = "0123456789abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ"


def text_images(entry: dict, count: int, seed: int) -> np.ndarray:
    """Captcha-like text lines [N, C, H, W]: 4-6 random characters, random size, offset and noise, in
    gray; C = 1 for `channels = "L"`, else 3 (the gray line in each), normalised as `normalise` does."""
    rng = np.random.default_rng(seed)
    h, w = entry["size"]
    out = []
    for _ in range(count):
        text = "".join(rng.choice(list(ALPHABET), rng.integers(4, 7)))
        canvas = Image.new("L", (w, h), int(rng.integers(200, 256)))
        font = ImageFont.load_default(size=int(rng.integers(30, 44)) * h // 64)
        draw = ImageDraw.Draw(canvas)
        draw.text((int(rng.integers(2, 20)), int(rng.integers(0, 12)) * h // 64), text, fill=int(rng.integers(0, 80)), font=font)
        for _ in range(int(rng.integers(1, 4))):  # a few strike lines, as captchas have
            draw.line([tuple(rng.integers(0, [w, h])) for _ in range(2)], fill=int(rng.integers(60, 160)), width=1)
        x = np.clip(np.asarray(canvas, np.float32) + rng.normal(0, 6, (h, w)), 0, 255)[None]
        if entry.get("channels", "L") != "L":
            x = np.repeat(x, 3, axis=0)
        mean = np.asarray(entry.get("mean", [0.0]), np.float64).reshape(-1, 1, 1)
        std = np.asarray(entry.get("std", [1.0]), np.float64).reshape(-1, 1, 1)
        out.append((x * entry["scale"] - mean) / std)
    return np.stack(out).astype(np.float32)


PHRASES = ["the quick brown fox jumps over the lazy dog", "quantization keeps the model small and fast",
           "please call me back tomorrow morning", "it is raining in the north of the country",
           "seven hundred and twenty three", "voice activity detection finds the speech",
           "open the window and let the air in", "we measured the latency on two cores",
           "the meeting starts at nine", "turn left at the next street", "a cup of coffee with milk",
           "this sentence is for evaluation only", "numbers like four five six", "goodbye and thank you"]
CALIBRATION_PHRASES, EVALUATION_PHRASES = PHRASES[:len(PHRASES) * 3 // 4], PHRASES[len(PHRASES) * 3 // 4:]


def speech(seed: int, phrases: list[str]) -> np.ndarray:
    """16 kHz float audio: the phrases spoken by espeak-ng with silences and noise between them."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("corpus data: the VAD model needs espeak-ng (Debian: apt-get install espeak-ng)")
    rng = np.random.default_rng(seed)
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, phrase in enumerate(phrases):
            path = Path(tmp) / f"{i}.wav"
            voice = ["en", "en-us", "en-gb"][i % 3]
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(int(rng.integers(130, 190))), "-w", str(path), phrase],
                           check=True, capture_output=True)
            with wave.open(str(path)) as f:
                rate, raw = f.getframerate(), f.readframes(f.getnframes())
            audio = np.frombuffer(raw, np.int16).astype(np.float32) / 32768.0
            n = int(len(audio) * 16000 / rate)  # resample to 16 kHz (linear)
            audio = np.interp(np.linspace(0, len(audio) - 1, n), np.arange(len(audio)), audio)
            gap = rng.normal(0, 0.003, int(rng.integers(4000, 16000)))
            parts += [gap, audio * rng.uniform(0.4, 1.0)]
    return np.concatenate(parts + [rng.normal(0, 0.003, 8000)]).astype(np.float32)


def windows(audio: np.ndarray, size: int = 512, context: int = 64) -> np.ndarray:
    """[n, context + size]: each window of `size` samples after the last `context` samples before it
    (zeros for the first), as silero_vad's OnnxWrapper feeds the 16 kHz model."""
    n = len(audio) // size
    padded = np.concatenate([np.zeros(context, audio.dtype), audio[:n * size]])
    return np.stack([padded[i * size:i * size + context + size] for i in range(n)])
