"""The folder a fine-tuned model is kept in, whatever its framework: OUT/models/<model>/."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from bakeoff.data.scan import CLASS_MAP_FILE
from bakeoff.errors import BakeoffError
from bakeoff.protocol import Protocol
from bakeoff.zoo.spec import ModelSpec, safe_name

__all__ = ["save_model_dir", "read_model_dir"]


def save_model_dir(spec: ModelSpec, classes: list[str], protocol: Protocol, out_dir: Path, filename: str,
                   write: Callable[[Path], None], meta: dict) -> Path:
    """Write the model file with ``write(tmp_path)`` (renamed into place, so a crash never leaves a
    half-written model), then spec.json (the spec plus ``meta``), the class map and protocol.json."""
    folder = Path(out_dir) / "models" / safe_name(spec.id)
    folder.mkdir(parents=True, exist_ok=True)
    stem, dot, ext = filename.rpartition(".")
    tmp = folder / f"{stem}.tmp{dot}{ext}"  # keep the suffix: some savers insist on it
    write(tmp)
    os.replace(tmp, folder / filename)
    (folder / "spec.json").write_text(json.dumps(spec.to_dict() | {"num_classes": len(classes)} | meta, indent=2))
    (folder / CLASS_MAP_FILE).write_text(json.dumps({c: i for i, c in enumerate(classes)}, indent=2))
    (folder / "protocol.json").write_text(json.dumps(protocol.to_dict(), indent=2))
    return folder / filename


def read_model_dir(model_dir, filename: str, written_by: str = "") -> tuple[Path, dict, list[str]]:
    """The folder ``save_model_dir`` wrote: (folder, spec.json as a dict, class names in
    prediction order); a one-line error when a file is missing."""
    folder = Path(model_dir)
    missing = [n for n in (filename, "spec.json", CLASS_MAP_FILE) if not (folder / n).is_file()]
    if missing:
        raise BakeoffError(f"saved model {folder} lacks {', '.join(missing)}: pass a folder under OUT/models/ "
                           f"written by `bakeoff run`{written_by}")
    meta = json.loads((folder / "spec.json").read_text())
    class_map = json.loads((folder / CLASS_MAP_FILE).read_text())
    return folder, meta, [c for c, _ in sorted(class_map.items(), key=lambda kv: kv[1])]
