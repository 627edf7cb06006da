"""BrLP's networks on MONAI 1.6, and safe, checked loading of their weights.

BrLP (Puglisi et al. 2024/2025) trained its autoencoder, diffusion UNet and ControlNet with MONAI
Generative 0.2.3, whose networks moved into MONAI core (1.4+) with renamed layers. A published
checkpoint is a plain ``state_dict`` saved with ``torch.save``; :func:`load_checkpoint` reads it
with ``weights_only=True`` (no code in the file is ever run), recognises MONAI-Generative and
MONAI-core key layouts, converts the former with MONAI's own ``load_old_state_dict``, and refuses a
file of another architecture with a message that says what differs. Our own files are safetensors.
"""

from __future__ import annotations

import contextlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .io import atomic_write
from .progression_config import NETWORKS, BrLPConfig

_BUILDERS = {}


def _builder(name):
    def register(func):
        _BUILDERS[name] = func
        return func

    return register


@_builder("autoencoder")
def build_autoencoder(cfg: BrLPConfig) -> nn.Module:
    """BrLP's AutoencoderKL (MONAI 1.6), in eval mode with random weights."""
    from monai.networks.nets import AutoencoderKL

    return AutoencoderKL(**cfg.autoencoder).eval()


@_builder("unet")
def build_unet(cfg: BrLPConfig) -> nn.Module:
    """BrLP's covariate-conditioned DiffusionModelUNet (MONAI 1.6), in eval mode."""
    _require_einops()
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(**cfg.unet).eval()


@_builder("controlnet")
def build_controlnet(cfg: BrLPConfig) -> nn.Module:
    """BrLP's ControlNet (MONAI 1.6), in eval mode."""
    _require_einops()
    from monai.networks.nets import ControlNet

    return ControlNet(**cfg.controlnet).eval()


def build_network(name: str, cfg: BrLPConfig) -> nn.Module:
    if name not in _BUILDERS:
        raise ValueError(f"unknown network {name!r}; expected one of {', '.join(NETWORKS)}")
    return _BUILDERS[name](cfg)


def _require_einops():
    try:
        import einops  # noqa: F401  (MONAI's attention blocks need it at construction)
    except ImportError:
        raise ImportError("BrLP's diffusion networks need einops: pip install einops") from None


@dataclass
class BrLPNetworks:
    """The three BrLP networks with their configuration."""

    autoencoder: nn.Module
    unet: nn.Module
    controlnet: nn.Module
    config: BrLPConfig

    @classmethod
    def from_config(cls, cfg: BrLPConfig, device="cpu", load_weights: bool = True, networks=NETWORKS) -> BrLPNetworks:
        """Build the networks and, with ``load_weights``, load the files the configuration names.

        ``networks`` limits which are built (the others are ``None``), e.g. only the autoencoder to
        encode latents for training.
        """
        built = {}
        for name in NETWORKS:
            if name not in networks:
                built[name] = None
                continue
            module = build_network(name, cfg)
            if load_weights:
                load_checkpoint(module, cfg.weight_path(name), name=name)
            built[name] = module.to(device).eval()
        return cls(config=cfg, **built)

    def to(self, device) -> BrLPNetworks:
        for name in NETWORKS:
            module = getattr(self, name)
            if module is not None:
                module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device


def read_state_dict(path) -> dict:
    """A state dict from ``.safetensors`` or ``.pth``/``.pt`` (``torch.load(weights_only=True)``).

    Training checkpoints that wrap the weights (``{"state_dict": ...}`` or ``{"model": ...}``) are
    unwrapped. Errors name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ValueError(f"cannot read {path} as safetensors (truncated or not a weight file?): {exc}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path} as a PyTorch weight file (truncated or corrupt?): {exc}") from None
    except Exception as exc:  # pickle.UnpicklingError and friends: not plain tensors
        raise ValueError(
            f"{path} is not a plain state dict of tensors and is not opened for safety (weights_only=True): {exc}"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state


def load_checkpoint(module: nn.Module, path, name: str = "network") -> str:
    """Load a weight file into ``module``; returns the layout found (``"monai"`` or ``"monai-generative"``).

    The file must hold exactly this architecture: every tensor the network needs, with the same
    shape, and nothing else. Otherwise a ValueError names the file, the network and what differs.
    """
    state = read_state_dict(path)
    return load_state(module, state, name=name, source=str(path))


def load_state(module: nn.Module, state: dict, name: str = "network", source: str = "state dict") -> str:
    """Load a state dict (either layout) into ``module`` with the checks of :func:`load_checkpoint`."""
    expected = module.state_dict()
    if set(state) == set(expected):
        _check_shapes(state, expected, name, source)
        module.load_state_dict(state)
        return "monai"
    if not hasattr(module, "load_old_state_dict"):
        raise ValueError(_mismatch_message(name, source, state, expected))
    remaining = dict(state)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # MONAI prints progress notes
            module.load_old_state_dict(remaining)
    except (KeyError, RuntimeError) as exc:
        raise ValueError(_mismatch_message(name, source, state, expected, detail=exc)) from None
    consumed = len(state) - len(remaining)
    if remaining or consumed != len(expected):
        raise ValueError(_mismatch_message(name, source, state, expected))
    return "monai-generative"


def _check_shapes(state, expected, name, source):
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        shown = "; ".join(f"{k}: file {a} vs network {b}" for k, a, b in bad[:3])
        raise ValueError(
            f"{source} does not match the {name} architecture of this configuration: {len(bad)} tensor(s) "
            f"have another shape ({shown}). Check that the configuration describes the network that was trained."
        )


def _mismatch_message(name, source, state, expected, detail=None) -> str:
    # Compare after undoing MONAI Generative's renames, so the message lists real differences.
    old_names = {_generative_name(k) for k in expected} | set(expected)
    missing = [k for k in expected if k not in state and _generative_name(k) not in state]
    unexpected = [k for k in state if k not in old_names]
    parts = [f"{source} does not hold a {name} of this architecture"]
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    reshaped = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} with another shape (e.g. {k}: file {tuple(state[k].shape)} vs network {tuple(expected[k].shape)})")
    if detail is not None and not (missing or unexpected):
        parts.append(str(detail).splitlines()[0][:300])
    parts.append(f"the file has {len(state)} tensors, the network {len(expected)}; is it the right network "
                 "(autoencoder / unet / controlnet) and configuration?")
    return "; ".join(parts)


def _generative_name(key: str) -> str:
    """The MONAI Generative 0.2.3 name of a MONAI 1.6 parameter (for error messages only)."""
    return (key.replace(".attn.to_q.", ".to_q.").replace(".attn.to_k.", ".to_k.").replace(".attn.to_v.", ".to_v.")
            .replace(".attn.out_proj.", ".proj_attn.").replace(".out_proj.", ".to_out.0.").replace("postconv", "conv"))


def save_checkpoint(module: nn.Module, path, metadata: dict | None = None) -> Path:
    """Write ``module``'s weights as safetensors (atomically); ``metadata`` is stored as strings."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
