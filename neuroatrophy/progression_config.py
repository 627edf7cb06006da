"""BrLP configurations as data: architecture, schedule, normalisation and where the weights are.

A configuration is a JSON or YAML file. Two layouts are read:

* ours (``format_version`` 1): ``architecture`` (``autoencoder``, ``unet``, ``controlnet``: MONAI
  1.6 keyword arguments), ``scheduler``, ``image_shape``, ``scale_factor``, ``las_m``,
  ``ddim_steps``, ``minmax_params``, ``median_corrections`` and ``weights`` (file paths);
* BrLP's own inference configuration (``examples/confs.example.yaml``: ``autoencoder``, ``unet``,
  ``controlnet``, ``aux.{cn,mci,ad}``, ``las.m``, ``minmax_params``, ``median_corrections``), which
  implies the published architecture.

Relative weight paths are resolved against the configuration file's folder. A folder can be given
instead of a file; it is searched for a configuration and, failing that, for weight files with
BrLP's names (``autoencoder*.pth``, ``unet*.pth``, ``cnet*.pth``/``controlnet*.pth``, ``dcm_cn.json``...).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .io import atomic_write
from .progression_covariates import BRLP_MEDIAN_CORRECTIONS, BRLP_MINMAX, REGIONS, check_minmax

FORMAT_VERSION = 1
CONFIG_NAMES = ("brainprogression.json", "brainprogression.yaml", "config.json", "config.yaml", "confs.yaml", "confs.yml")
DCM_GROUPS = ("cn", "mci", "ad")
NETWORKS = ("autoencoder", "unet", "controlnet")

# Published BrLP networks (src/brlp/networks.py) with MONAI 1.6 argument names.
BRLP_AUTOENCODER = dict(
    spatial_dims=3, in_channels=1, out_channels=1, latent_channels=3, channels=[64, 128, 128, 128],
    num_res_blocks=2, norm_num_groups=32, norm_eps=1e-6, attention_levels=[False, False, False, False],
    with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
)
BRLP_UNET = dict(
    spatial_dims=3, in_channels=3, out_channels=3, num_res_blocks=2, channels=[256, 512, 768],
    attention_levels=[False, True, True], norm_num_groups=32, norm_eps=1e-6, resblock_updown=True,
    num_head_channels=[0, 512, 768], transformer_num_layers=1, with_conditioning=True,
    cross_attention_dim=8, num_class_embeds=None, upcast_attention=True, use_flash_attention=False,
)
BRLP_CONTROLNET_EXTRA = dict(conditioning_embedding_in_channels=4, conditioning_embedding_num_channels=[256])
BRLP_SCHEDULER = dict(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0205)
BRLP_IMAGE_SHAPE = (120, 144, 120)
BRLP_WEIGHT_PATTERNS = {
    "autoencoder": ("autoencoder*.safetensors", "autoencoder*.pth", "autoencoder*.pt"),
    "unet": ("unet*.safetensors", "unet*.pth", "unet*.pt", "diffusion*.pth"),
    "controlnet": ("controlnet*.safetensors", "controlnet*.pth", "cnet*.pth", "controlnet*.pt"),
}


def _controlnet_kwargs(unet: dict, extra: dict) -> dict:
    # The ControlNet mirrors the UNet's encoder; it has no output channels of its own.
    kwargs = {k: v for k, v in unet.items() if k != "out_channels"}
    kwargs.update(extra)
    return kwargs


@dataclass
class BrLPConfig:
    """Everything needed to build, load and run BrLP's networks.

    ``latent_shape_ae`` (the autoencoder's latent) and ``latent_shape_dm`` (the same padded so
    the UNet can halve it as often as it needs) are derived from the architecture.
    """

    autoencoder: dict = field(default_factory=lambda: copy.deepcopy(BRLP_AUTOENCODER))
    unet: dict = field(default_factory=lambda: copy.deepcopy(BRLP_UNET))
    controlnet: dict = field(default_factory=lambda: _controlnet_kwargs(BRLP_UNET, BRLP_CONTROLNET_EXTRA))
    scheduler: dict = field(default_factory=lambda: dict(BRLP_SCHEDULER))
    image_shape: tuple = BRLP_IMAGE_SHAPE
    scale_factor: float = 1.0
    las_m: int = 4
    ddim_steps: int = 25
    minmax_params: dict = field(default_factory=lambda: dict(BRLP_MINMAX))
    median_corrections: dict = field(default_factory=lambda: dict(BRLP_MEDIAN_CORRECTIONS))
    weights: dict = field(default_factory=dict)
    name: str = "brlp"
    source: str | None = None

    def __post_init__(self):
        self.image_shape = tuple(int(s) for s in self.image_shape)
        self.validate()

    # --- derived shapes -------------------------------------------------------------------
    @property
    def ae_downsampling(self) -> int:
        return 2 ** (len(self.autoencoder["channels"]) - 1)

    @property
    def latent_shape_ae(self) -> tuple:
        f = self.ae_downsampling
        return (int(self.autoencoder["latent_channels"]),) + tuple(s // f for s in self.image_shape)

    @property
    def latent_shape_dm(self) -> tuple:
        # BrLP pads the latent with DivisiblePad(k=4): the UNet halves it len(channels) - 1 times.
        k = 2 ** (len(self.unet["channels"]) - 1)
        c, *spatial = self.latent_shape_ae
        return (c,) + tuple(int(math.ceil(s / k) * k) for s in spatial)

    # --- checks -----------------------------------------------------------------------------
    def validate(self) -> None:
        f = self.ae_downsampling
        bad = [s for s in self.image_shape if s % f]
        if len(self.image_shape) != 3 or bad:
            raise ValueError(f"image_shape {self.image_shape} must be 3 sizes divisible by the autoencoder's downsampling {f}")
        c = self.latent_shape_ae[0]
        if self.unet["in_channels"] != c or self.unet["out_channels"] != c:
            raise ValueError(f"unet in/out_channels must equal the autoencoder's latent_channels ({c})")
        if self.controlnet.get("conditioning_embedding_in_channels") != c + 1:
            raise ValueError(f"controlnet conditioning_embedding_in_channels must be latent channels + 1 (age) = {c + 1}")
        if self.unet.get("cross_attention_dim") != 8:
            raise ValueError("unet cross_attention_dim must be 8 (age, sex, diagnosis and 5 volumes)")
        self.minmax_params = check_minmax(self.minmax_params)
        if self.median_corrections:
            missing = [r for r in REGIONS if r not in self.median_corrections]
            if missing:
                raise ValueError(f"median_corrections lacks {', '.join(missing)}")
            self.median_corrections = {r: tuple(float(v) for v in self.median_corrections[r]) for r in REGIONS}
        if not self.scale_factor > 0:
            raise ValueError(f"scale_factor must be positive (got {self.scale_factor})")
        if int(self.las_m) < 1 or int(self.ddim_steps) < 1:
            raise ValueError("las_m and ddim_steps must be at least 1")

    # --- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "architecture": {"autoencoder": self.autoencoder, "unet": self.unet, "controlnet": self.controlnet},
            "scheduler": self.scheduler,
            "image_shape": list(self.image_shape),
            "scale_factor": self.scale_factor,
            "las_m": self.las_m,
            "ddim_steps": self.ddim_steps,
            "minmax_params": {r: list(v) for r, v in self.minmax_params.items()},
            "median_corrections": {r: list(v) for r, v in self.median_corrections.items()},
            "weights": _jsonable_weights(self.weights),
        }

    def save(self, path) -> Path:
        """Write the configuration as JSON; weight paths are written relative to its folder when inside it."""
        path = Path(path)
        data = self.to_dict()
        data["weights"] = _relative_weights(self.weights, path.parent)
        with atomic_write(path) as tmp:
            Path(tmp).write_text(json.dumps(data, indent=2) + "\n")
        return path

    def weight_path(self, network: str) -> Path:
        """The weight file of ``network``, with an error that says how to provide it."""
        value = self.weights.get(network)
        if not value:
            raise FileNotFoundError(
                f"no {network} weights in the configuration{_from(self.source)}; download BrLP's published "
                "weights (links in https://github.com/LemuelPuglisi/BrLP) or train your own, and list them "
                "under 'weights' (see docs/progression.md)"
            )
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"{network} weights not found: {path}{_from(self.source)}")
        return path


def brlp_config(**overrides) -> BrLPConfig:
    """The published BrLP architecture and normalisation."""
    return BrLPConfig(**overrides)


def tiny_config(**overrides) -> BrLPConfig:
    """BrLP's structure at toy size: 24 x 32 x 24 images, latent 3 x 6 x 8 x 6, thousands of parameters."""
    autoencoder = dict(BRLP_AUTOENCODER, channels=[8, 8, 8], num_res_blocks=1, norm_num_groups=4,
                       attention_levels=[False, False, False])
    unet = dict(BRLP_UNET, channels=[16, 32, 32], num_res_blocks=1, norm_num_groups=8, num_head_channels=[0, 32, 32])
    settings = dict(
        autoencoder=autoencoder, unet=unet,
        controlnet=_controlnet_kwargs(unet, dict(conditioning_embedding_in_channels=4, conditioning_embedding_num_channels=[16])),
        image_shape=(24, 32, 24), las_m=2, ddim_steps=5, name="tiny",
    )
    settings.update(overrides)
    return BrLPConfig(**settings)


def config_from_dict(data: dict, base: Path | None = None, source: str | None = None) -> BrLPConfig:
    """A configuration from our layout or BrLP's inference YAML layout (see the module docstring)."""
    if not isinstance(data, dict):
        raise ValueError(f"configuration{_from(source)} is not a mapping")
    if "architecture" in data or "format_version" in data:
        return _ours_from_dict(data, base, source)
    if any(k in data for k in ("autoencoder", "unet", "controlnet", "aux", "las")):
        return _brlp_from_dict(data, base, source)
    raise ValueError(f"configuration{_from(source)} has neither 'architecture' (ours) nor BrLP's 'autoencoder'/'unet' keys")


def load_config(path) -> BrLPConfig:
    """Read a configuration file (JSON/YAML) or find one (or BrLP-named weight files) in a folder."""
    path = Path(path)
    if path.is_dir():
        return _config_from_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"configuration not found: {path}")
    return config_from_dict(_read_mapping(path), base=path.parent, source=str(path))


def _read_mapping(path: Path) -> dict:
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        raise ValueError(f"cannot parse configuration {path}: {exc}") from None


def _ours_from_dict(data: dict, base, source) -> BrLPConfig:
    version = data.get("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise ValueError(f"configuration{_from(source)} has format_version {version}; this NeuroAtrophy reads up to {FORMAT_VERSION}")
    arch = data.get("architecture", {})
    unknown = sorted(set(arch) - set(NETWORKS))
    if unknown:
        raise ValueError(f"configuration{_from(source)}: unknown network(s) in 'architecture': {', '.join(unknown)}")
    defaults = BrLPConfig()
    kwargs = dict(
        autoencoder=arch.get("autoencoder", defaults.autoencoder),
        unet=arch.get("unet", defaults.unet),
        scheduler=data.get("scheduler", defaults.scheduler),
        image_shape=data.get("image_shape", defaults.image_shape),
        scale_factor=float(data.get("scale_factor", 1.0)),
        las_m=int(data.get("las_m", defaults.las_m)),
        ddim_steps=int(data.get("ddim_steps", defaults.ddim_steps)),
        minmax_params=data.get("minmax_params", defaults.minmax_params),
        median_corrections=data.get("median_corrections", defaults.median_corrections),
        weights=_resolve_weights(data.get("weights", {}), base),
        name=str(data.get("name", "brlp")),
        source=source,
    )
    kwargs["controlnet"] = arch.get("controlnet", _controlnet_kwargs(kwargs["unet"], BRLP_CONTROLNET_EXTRA))
    return BrLPConfig(**kwargs)


def _brlp_from_dict(data: dict, base, source) -> BrLPConfig:
    weights = {name: data.get(name) for name in NETWORKS if data.get(name)}
    aux = data.get("aux") or {}
    if aux:
        weights["dcm"] = {group: aux[group] for group in DCM_GROUPS if aux.get(group)}
    las = data.get("las") or {}
    return BrLPConfig(
        las_m=int(las.get("m", 4)),
        minmax_params=data.get("minmax_params", BRLP_MINMAX),
        median_corrections=data.get("median_corrections", BRLP_MEDIAN_CORRECTIONS),
        weights=_resolve_weights(weights, base),
        source=source,
    )


def _config_from_folder(folder: Path) -> BrLPConfig:
    for name in CONFIG_NAMES:
        if (folder / name).is_file():
            return load_config(folder / name)
    weights = {}
    for network, patterns in BRLP_WEIGHT_PATTERNS.items():
        found = sorted({p for pattern in patterns for p in folder.glob(pattern)})
        if len(found) > 1:
            raise ValueError(
                f"weights folder {folder} holds several {network} files ({', '.join(p.name for p in found)}); "
                f"keep one or write a configuration ({CONFIG_NAMES[0]}) that names it"
            )
        if found:
            weights[network] = str(found[0])
    dcm = {g: str(folder / f"dcm_{g}.json") for g in DCM_GROUPS if (folder / f"dcm_{g}.json").is_file()}
    if dcm:
        weights["dcm"] = dcm
    if not weights:
        raise FileNotFoundError(
            f"no configuration ({', '.join(CONFIG_NAMES)}) and no BrLP weight files (autoencoder*.pth, unet*.pth, "
            f"cnet*.pth, dcm_cn.json ...) in {folder}; download BrLP's published weights (links in "
            "https://github.com/LemuelPuglisi/BrLP) into this folder, see docs/progression.md"
        )
    return BrLPConfig(weights=weights, source=str(folder))


def _resolve_weights(weights: dict, base) -> dict:
    def resolve(value):
        if value is None:
            return None
        p = Path(str(value)).expanduser()
        return str(p if p.is_absolute() or base is None else Path(base) / p)

    out = {}
    for key, value in (weights or {}).items():
        out[key] = {g: resolve(v) for g, v in value.items()} if isinstance(value, dict) else resolve(value)
    return out


def _relative_weights(weights: dict, folder: Path) -> dict:
    def rel(value):
        if value is None:
            return None
        p = Path(value)
        try:
            return str(p.resolve().relative_to(folder.resolve()))
        except ValueError:
            return str(p)

    return {k: ({g: rel(v) for g, v in val.items()} if isinstance(val, dict) else rel(val)) for k, val in weights.items()}


def _jsonable_weights(weights: dict) -> dict:
    return {k: ({g: str(v) for g, v in val.items()} if isinstance(val, dict) else (str(val) if val else None))
            for k, val in weights.items()}


def _from(source) -> str:
    return f" ({source})" if source else ""
