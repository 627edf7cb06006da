"""The thalamus network and its model file.

A model file is a pair: ``<name>.safetensors`` (the weights, float32 tensors, no pickle) and
``<name>.json`` (format version, architecture, field of view, intensity normalisation, and the
training record that the model card reports). :func:`load_model` rebuilds the network from the
JSON and loads the tensors strictly, so a file that does not match its description is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .io import atomic_write

__all__ = ["MODEL_FORMAT_VERSION", "DEFAULT_ARCHITECTURE", "ThalamusModel", "build_network", "load_model",
           "shipped_model_path"]

MODEL_FORMAT_VERSION = 1

#: MONAI UNet (residual units, instance norm) with 3 outputs: background, left, right thalamus.
DEFAULT_ARCHITECTURE = {
    "name": "monai.networks.nets.UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 3,
    "channels": [16, 32, 64, 128, 256],
    "strides": [2, 2, 2, 2],
    "num_res_units": 1,
    "norm": "instance",
}


def build_network(architecture: dict | None = None) -> torch.nn.Module:
    """A fresh (randomly initialised) network of the given architecture."""
    from monai.networks.nets import UNet

    arch = dict(DEFAULT_ARCHITECTURE if architecture is None else architecture)
    if arch.get("name") != DEFAULT_ARCHITECTURE["name"]:
        raise ValueError(f"unknown thalamus network architecture {arch.get('name')!r}")
    return UNet(spatial_dims=arch["spatial_dims"], in_channels=arch["in_channels"], out_channels=arch["out_channels"],
                channels=tuple(arch["channels"]), strides=tuple(arch["strides"]),
                num_res_units=arch["num_res_units"], norm=arch["norm"])


@dataclass
class ThalamusModel:
    """A network with the metadata inference needs (field of view, normalisation) and its record."""

    network: torch.nn.Module
    architecture: dict = field(default_factory=lambda: dict(DEFAULT_ARCHITECTURE))
    box: dict | None = None
    normalization: dict = field(default_factory=lambda: {"method": "percentile", "low": 0.5, "high": 99.5})
    training: dict = field(default_factory=dict)
    path: Path | None = None
    #: thalamus-probability threshold of the labels (calibrated after training; see the model card)
    threshold: float = 0.5

    def save(self, path) -> Path:
        """Write ``<path>.safetensors`` and ``<path>.json`` atomically; returns the weights path."""
        from safetensors.torch import save_file

        from .thalamus_synth import THALAMUS_BOX

        base = _base(path)
        base.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.network.state_dict().items()}
        metadata = {
            "format_version": MODEL_FORMAT_VERSION,
            "kind": "neuroatrophy.thalamus_segmentation",
            "architecture": self.architecture,
            "box": self.box or THALAMUS_BOX,
            "normalization": self.normalization,
            "threshold": self.threshold,
            "labels": {"0": "background", "1": "left thalamus (FreeSurfer 10)", "2": "right thalamus (FreeSurfer 49)"},
            "training": self.training,
        }
        weights, meta = base.with_suffix(".safetensors"), base.with_suffix(".json")
        with atomic_write(meta) as tmp_meta, atomic_write(weights) as tmp_weights:
            tmp_meta.write_text(json.dumps(metadata, indent=2) + "\n")
            save_file(state, str(tmp_weights), metadata={"format": "pt"})
        return weights


def _base(path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def shipped_model_path() -> Path:
    """The weights shipped with the library (``neuroatrophy/data/models/thalamus_unet.safetensors``)."""
    return Path(__file__).resolve().parent / "data" / "models" / "thalamus_unet.safetensors"


def load_model(path=None, device: str = "cpu") -> ThalamusModel:
    """Load a model file (default: the shipped weights) into an eval-mode network.

    Raises ``FileNotFoundError``/``ValueError`` naming the file for a missing weights or metadata
    file, an unknown format version, or weights that do not match the described architecture.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    base = _base(path if path is not None else shipped_model_path())
    weights, meta_path = base.with_suffix(".safetensors"), base.with_suffix(".json")
    for p in (weights, meta_path):
        if not p.exists():
            raise FileNotFoundError(f"thalamus model file not found: {p} (a model is a .safetensors + .json pair)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{meta_path}: not a valid model metadata file: {exc}") from exc
    version = meta.get("format_version")
    if meta.get("kind") != "neuroatrophy.thalamus_segmentation" or not isinstance(version, int):
        raise ValueError(f"{meta_path}: not a NeuroAtrophy thalamus model description")
    if version > MODEL_FORMAT_VERSION:
        raise ValueError(f"{meta_path}: model format version {version} is newer than this library supports "
                         f"({MODEL_FORMAT_VERSION}); update neuroatrophy")
    network = build_network(meta["architecture"])
    try:
        state = load_file(str(weights), device=device)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights}: not a readable safetensors file: {exc}") from exc
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{weights}: weights do not match the architecture in {meta_path.name}: "
                         f"{str(exc).splitlines()[0]}") from exc
    network.to(device).eval()
    return ThalamusModel(network=network, architecture=meta["architecture"], box=meta["box"],
                         normalization=meta.get("normalization", {}), training=meta.get("training", {}),
                         path=weights, threshold=float(meta.get("threshold", 0.5)))
