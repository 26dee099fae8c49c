"""A saved model ready to answer requests: locate it, preprocess one image exactly as evaluation
did, and predict probabilities for a batch, whatever the model's framework."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from bakeoff.data.cache import cache_side
from bakeoff.data.images import load_rgb, square_resize
from bakeoff.engines import ENGINES
from bakeoff.errors import BakeoffError
from bakeoff.zoo.spec import safe_name

__all__ = ["Preprocess", "Predictor", "find_model_dir", "saved_models", "load_predictor", "require_serve",
           "describe", "SERVED_FORMATS"]


def describe(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, for one-line errors."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else type(exc).__name__


def require_serve(*modules: str) -> None:
    """Fail early with the install hint when the ``serve`` extra is missing."""
    import importlib.util

    missing = [m for m in modules or ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(m) is None]
    if missing:
        raise BakeoffError(f"{', '.join(missing)} not installed: pip install 'bakeoff[serve]'")


def saved_models(out_dir) -> dict[str, Path]:
    """The models a run saved: ``{model id: OUT/models/<folder>}``, read from each folder's spec.json."""
    models = Path(out_dir).expanduser() / "models"
    if not models.is_dir():
        raise BakeoffError(f"{models} does not exist: pass the --out folder of a `bakeoff run` that saved models")
    saved = {}
    for folder in sorted(models.iterdir()):
        if (folder / "spec.json").is_file():
            try:
                saved[json.loads((folder / "spec.json").read_text()).get("id", folder.name)] = folder
            except (ValueError, OSError):  # unreadable: listed by its folder name, and loading it says why
                saved[folder.name] = folder
    return saved


def find_model_dir(out_dir, model_id: str) -> Path:
    """The folder of ``model_id`` (an id the run saved, a study alias of one, or its folder name).

    The id is only ever looked up among the run's saved models, never joined onto a path: a path
    given as the id (``/elsewhere``, ``../..``) is refused rather than served from outside the run.
    """
    saved = saved_models(out_dir)
    wanted = model_id.strip()
    by_name = {folder.name: folder for folder in saved.values()}
    found = saved.get(wanted) or by_name.get(wanted) or by_name.get(safe_name(wanted))
    if found is None and wanted:
        try:  # an alias (e.g. the study's "-FT" ids); only now, as the zoo imports the model libraries
            from bakeoff.zoo.registry import resolve

            found = saved.get(resolve(wanted).id)
        except BakeoffError:
            pass
    if found is not None:
        return found
    listed = ", ".join(saved) or "none"
    if wanted.startswith(("/", ".", "~", "\\")) or ".." in wanted or "\\" in wanted:
        raise BakeoffError(f"--model takes the id of a model the run saved, not a path: got {model_id!r}; "
                           f"saved: {listed}")
    raise BakeoffError(f"no saved model {model_id!r} in {Path(out_dir).expanduser() / 'models'}; saved: {listed}")


# What the training data scan takes (data.scan.IMAGE_EXTENSIONS): other formats Pillow could
# open (PSD, EPS, ...) are more decoder code exposed to clients for no model's sake.
SERVED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")


def _not_an_image(exc: BaseException) -> BakeoffError:
    # PIL raises several types for bad data; all mean "not an image"
    why = "not an image format it knows" if type(exc).__name__ == "UnidentifiedImageError" else describe(exc, 200)
    return BakeoffError(f"cannot decode the image ({why}): send JPEG or PNG bytes")


@dataclass(frozen=True)
class Preprocess:
    """Evaluation preprocessing of one model: resize to ``side``, centre-crop ``input_size``, normalise."""

    input_size: int
    side: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_meta(cls, meta: dict) -> "Preprocess":
        size = int(meta["input_size"])
        return cls(size, cache_side(size, float(meta.get("crop_pct", 0.875))), meta.get("interpolation", "bilinear"),
                   tuple(meta["mean"]), tuple(meta["std"]))

    def decode_cost(self, data: bytes) -> tuple[int, int, int]:
        """``(width, height, pixels)`` from the image's header alone, nothing decoded: ``pixels``
        counts what decoding holds at once, the image as decoded (a JPEG after the decoder's
        shrink, as ``load_rgb`` asks for) plus its resized copy (large for a thin strip).

        Raises BakeoffError when the bytes are not an image of a format the server takes.
        """
        try:
            with Image.open(io.BytesIO(data), formats=SERVED_FORMATS) as img:
                if img.format == "JPEG":
                    img.draft("RGB", (self.side, self.side))
                w, h = img.size
        except Exception as exc:
            raise _not_an_image(exc)
        if w < 1 or h < 1:
            raise BakeoffError(f"cannot decode the image (it is {w}x{h} pixels): send JPEG or PNG bytes")
        scale = self.side / min(w, h)
        return w, h, w * h + max(self.side, round(w * scale)) * max(self.side, round(h * scale))

    def __call__(self, data) -> np.ndarray:
        """Encoded image bytes (or a file object) -> 3 x S x S float32, as ``Batcher.eval_batch`` sees it.

        Raises BakeoffError when the bytes are not a decodable image.
        """
        try:
            img = load_rgb(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data,
                           draft_size=self.side)
        except Exception as exc:
            raise _not_an_image(exc)
        # Same steps and float32 arithmetic as the decode-once cache + Batcher, so the numbers match.
        arr = square_resize(img, self.side, self.interpolation)
        off = (self.side - self.input_size) // 2
        x = arr[off:off + self.input_size, off:off + self.input_size].transpose(2, 0, 1).astype(np.float32)
        mean = np.asarray(self.mean, np.float32).reshape(3, 1, 1) * np.float32(255.0)
        std = np.asarray(self.std, np.float32).reshape(3, 1, 1) * np.float32(255.0)
        return (x - mean) / std


@dataclass
class Predictor:
    """One loaded model: ``predict(N x 3 x S x S float32) -> N x classes`` probabilities."""

    model_id: str
    framework: str
    classes: list[str]
    meta: dict
    preprocess: Preprocess
    predict: Callable[[np.ndarray], np.ndarray]
    device: str
    model_dir: Path


def load_predictor(out_dir, model_id: str, device: str = "auto") -> Predictor:
    """Load ``OUT/models/<model_id>`` for serving; every missing piece is a one-line BakeoffError."""
    folder = find_model_dir(out_dir, model_id)
    spec_file = folder / "spec.json"
    if not spec_file.is_file():
        raise BakeoffError(f"saved model {folder} lacks spec.json: pass a folder written by `bakeoff run`")
    try:
        meta = json.loads(spec_file.read_text())
    except (ValueError, OSError) as exc:
        raise BakeoffError(f"cannot read {spec_file}: {describe(exc)}")
    framework = meta.get("framework", "pytorch")
    if framework not in ENGINES:
        raise BakeoffError(f"{spec_file} names framework {framework!r}; bakeoff serves {' and '.join(ENGINES)}")
    try:
        predict, meta, classes, dev = ENGINES[framework].load().load_predict(folder, device)
    except BakeoffError:
        raise
    except ImportError as exc:
        raise BakeoffError(f"{folder} is a {framework} model and {exc.name or 'its library'} is not installed: "
                           f"{ENGINES[framework].install_hint}")
    except Exception as exc:  # a corrupt or mismatched weights file: say which, not a traceback
        raise BakeoffError(f"cannot load the saved model in {folder}: {describe(exc)}")
    return Predictor(meta.get("id", model_id), framework, classes, meta, Preprocess.from_meta(meta), predict, dev,
                     folder)
