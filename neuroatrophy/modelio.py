"""Safe, versioned model files.

A model file is a zip archive holding ``metadata.json`` (format name, format
version, model type, hyperparameters, names) and one ``.npy`` member per array.
Arrays are read with ``allow_pickle=False`` and object arrays are refused, so
opening a file someone hands you never runs code. Inspect one with
``unzip -p model.npz metadata.json``.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "save_model_file", "load_model_file"]

FORMAT_NAME = "neuroatrophy-model"
FORMAT_VERSION = 1
_METADATA = "metadata.json"


def save_model_file(path, arrays: dict, metadata: dict) -> Path:
    """Write ``arrays`` and JSON-serialisable ``metadata`` to ``path`` atomically."""
    path = Path(path)
    if not path.parent.exists():
        raise FileNotFoundError(f"cannot save model to {path}: folder {path.parent} does not exist")
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **metadata}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
            archive.writestr(_METADATA, json.dumps(header, indent=2, sort_keys=True))
            for name, value in arrays.items():
                value = np.asarray(value)
                if value.dtype == object:
                    raise ValueError(f"array {name!r} has dtype object, which the model format does not store")
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, value, allow_pickle=False)
                archive.writestr(f"{name}.npy", buffer.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_model_file(path, expected_type: str | None = None) -> tuple[dict, dict]:
    """Read a model file; returns ``(arrays, metadata)``.

    Raises ``ValueError`` naming the file if it is not a NeuroAtrophy model, is of a newer
    format version, holds another model type, or is damaged.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if _METADATA not in names:
                raise ValueError(f"{path} is not a NeuroAtrophy model file (no {_METADATA})")
            metadata = json.loads(archive.read(_METADATA).decode("utf-8"))
            _check_header(path, metadata, expected_type)
            arrays = {}
            for name in names:
                if not name.endswith(".npy"):
                    continue
                with archive.open(name) as handle:
                    arrays[name[: -len(".npy")]] = np.lib.format.read_array(
                        io.BytesIO(handle.read()), allow_pickle=False
                    )
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path} is not a NeuroAtrophy model file (not a zip archive: {error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: metadata.json is not valid JSON ({error})") from None
    return arrays, metadata


def _check_header(path, metadata: dict, expected_type: str | None) -> None:
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a NeuroAtrophy model file (format {metadata.get('format')!r})")
    version = metadata.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has model format version {version!r}; this NeuroAtrophy reads versions "
            f"<= {FORMAT_VERSION}: update NeuroAtrophy"
        )
    if expected_type is not None and metadata.get("model_type") != expected_type:
        raise ValueError(f"{path} holds a {metadata.get('model_type')!r}, expected a {expected_type!r}")
