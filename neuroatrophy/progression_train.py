"""Training BrLP's networks and disease-course model on your own longitudinal data.

BrLP (Puglisi et al., MICCAI 2024; MedIA 2025) trains four components in sequence; this module does
the same on MONAI 1.6 with the settings of BrLP's ``scripts/training``:

1. :func:`train_autoencoder`: AutoencoderKL with L1 + KL (1e-7) + perceptual (0.001) + patch
   adversarial (0.025, least squares) losses; Adam, lr 1e-4; BrLP's micro-batch 2 accumulated to 16.
2. :func:`extract_latents`: the encoder mean ``z_mu`` of every image, saved as
   ``<image stem>_latent.npz`` (key ``data``), BrLP's format; :func:`compute_scale_factor` gives
   ``1 / std`` of the latents, which BrLP prints but does not save (we store it in the configuration).
3. :func:`train_unet`: the covariate-conditioned DiffusionModelUNet as a DDPM (BrLP's scheduler,
   epsilon prediction, MSE) on every latent; AdamW, lr 2.5e-5.
4. :func:`train_controlnet`: the ControlNet on baseline -> follow-up pairs of the same subject
   (:func:`make_pairs`: every earlier/later pair, as BrLP's ``prepare_csv.py``), initialised from the
   UNet, which stays frozen; condition = padded baseline latent + baseline age / 100; context at the
   follow-up.
5. :func:`train_dcm`: the auxiliary disease-course models (``progression_dcm``) on the volumes.

Input table (CSV/TSV or DataFrame), one row per scan: ``subject_id``, ``image_path`` (a T1w on BrLP's
grid: 120 x 144 x 120 at 1.5 mm MNI, as ``progression_preproc`` writes it; relative paths are read
from the table's folder), ``age`` (years), ``sex`` (F/M), ``diagnosis`` (CN/MCI/AD), the five
``REGIONS`` volumes in mm3, optional ``split`` (``train``/``valid``; default train). Raw scans are
accepted with ``preprocess=True`` (``progression_preproc.preprocess_t1``, cached in the output folder).

Every trainer is resumable: ``out_dir/checkpoint-<network>/`` holds the weights (safetensors) and
``state.pt`` (optimizer, gradient scaler, position in the epoch, RNG states, loss sums; written with
``torch.save`` and read with ``torch.load(weights_only=True)``). It is written at the end of every
epoch, every ``checkpoint_every`` steps and when training is cancelled, so training N + M steps in
one go equals training N steps, stopping and resuming for M (bit for bit on the CPU). The final
weights go to ``out_dir/<network>.safetensors``, a record of the losses and settings to
``out_dir/training_<network>.json`` and the configuration to ``out_dir/config.json``, loadable with
``BrLPNetworks.from_config(load_config(out_dir / "config.json"))``.

On CUDA, ``amp=None`` means mixed precision (``torch.autocast`` float16 + ``GradScaler``), as BrLP;
on the CPU training runs in float32.

Perceptual loss: MONAI's ``PerceptualLoss(network_type="squeeze")`` needs the ``lpips`` and
``torchvision`` packages and ImageNet SqueezeNet weights that torchvision downloads. Without network
access they cannot be fetched, so the term is used only when the packages are installed and the
weight file is already in torch's hub cache (``torch.hub.get_dir()/checkpoints``); otherwise it is
0 and the training record and progress messages say why.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import platform
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .io import atomic_write, replace_folder, safe_file_stem
from .parallel import Cancelled
from .progression_config import BrLPConfig, load_config
from .progression_covariates import (
    REGIONS,
    check_minmax,
    encode_context,
    encode_sex,
    normalise_diagnosis,
)
from .progression_nets import (
    build_autoencoder,
    build_controlnet,
    build_unet,
    load_checkpoint,
    read_state_dict,
    save_checkpoint,
)

__all__ = [
    "TABLE_COLUMNS",
    "Cancelled",
    "TrainingResult",
    "compute_scale_factor",
    "extract_latents",
    "fit_minmax",
    "load_training_image",
    "make_pairs",
    "perceptual_loss_status",
    "preprocess_table",
    "read_training_table",
    "train_autoencoder",
    "train_controlnet",
    "train_dcm",
    "train_unet",
]

log = logging.getLogger(__name__)

TABLE_COLUMNS = ("subject_id", "image_path", "age", "sex", "diagnosis") + REGIONS
SPLITS = ("train", "valid")
LATENT_KEY = "data"
STATE_FILE = "state.pt"
SQUEEZENET_FILE_PREFIX = "squeezenet1_1-"
# Settings that may change between a checkpoint and its resumption.
_RESUMABLE_CHANGES = ("epochs", "device", "num_workers", "checkpoint_every")


# ---------------------------------------------------------------------------------------------
# Input table
# ---------------------------------------------------------------------------------------------


def read_training_table(table, *, path_column: str | None = "image_path", image_shape=None,
                        base=None, name: str | None = None) -> pd.DataFrame:
    """Read and validate a training table (see the module docstring for its columns).

    Parameters
    ----------
    table : path or pandas.DataFrame
        CSV/TSV file or a DataFrame.
    path_column : str or None
        Column of file paths that must exist (``image_path``, ``latent_path``), or None for none.
    image_shape : tuple, optional
        When given, every image's header must have this shape (e.g. ``cfg.image_shape``).
    base : path, optional
        Folder that relative paths are read from (default: the table's folder, or the current one
        for a DataFrame).
    name : str, optional
        What the table is called in error messages (default: its path).

    Returns
    -------
    pandas.DataFrame
        A copy with ``subject_id`` as str, ``age`` and volumes as float, ``sex`` as ``"F"``/``"M"``,
        ``diagnosis`` as ``"CN"``/``"MCI"``/``"AD"``, ``split`` filled in and absolute paths.
    """
    required = [c for c in TABLE_COLUMNS if c != "image_path"] + ([path_column] if path_column else [])
    if isinstance(table, pd.DataFrame):
        where = name or "training table"
        frame = table.copy()
        frame.columns = [str(c).strip() for c in frame.columns]
        missing = [c for c in required if c not in frame.columns]
        if missing:
            raise ValueError(f"{where} has no {', '.join(missing)} column (columns: {list(frame.columns)})")
        base = Path(base) if base is not None else Path.cwd()
    else:
        from .cli import _read_table

        path = Path(table)
        where = name or str(path)
        frame = _read_table(path, "training table", required=required)
        base = Path(base) if base is not None else path.resolve().parent
    if len(frame) == 0:
        raise ValueError(f"{where} has no rows")
    frame = frame.reset_index(drop=True)
    rows = []
    for i, row in frame.iterrows():
        rows.append(_check_row(row, i, where, path_column, base))
    out = frame.copy()
    checked = pd.DataFrame(rows, index=frame.index)
    for column in checked.columns:
        out[column] = checked[column]
    if image_shape is not None and path_column:
        for i, row in out.iterrows():
            _check_image_header(row[path_column], tuple(image_shape), where, i, row["subject_id"])
    return out


def _check_row(row, i, where, path_column, base) -> dict:
    subject = str(row["subject_id"]).strip() if pd.notna(row["subject_id"]) else ""
    at = f"{where}, row {i + 2}" + (f" (subject {subject!r})" if subject else "")
    if not subject:
        raise ValueError(f"{at}: subject_id is empty")
    out = {"subject_id": subject}
    age = pd.to_numeric(pd.Series([row["age"]]), errors="coerce").iloc[0]
    if not np.isfinite(age) or not 0.0 < float(age) < 120.0:
        raise ValueError(f"{at}: age {row['age']!r} is not an age in years (0-120)")
    if float(age) <= 1.5:
        raise ValueError(f"{at}: age {row['age']!r} is not in years (BrLP's normalised ages age/100 must be "
                         "multiplied by 100)")
    out["age"] = float(age)
    try:
        out["sex"] = "F" if encode_sex(row["sex"]) == 1.0 else "M"
        out["diagnosis"] = normalise_diagnosis(row["diagnosis"])
    except ValueError as error:
        raise ValueError(f"{at}: {error}") from None
    for region in REGIONS:
        value = pd.to_numeric(pd.Series([row[region]]), errors="coerce").iloc[0]
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"{at}: column {region!r} must be a positive volume in mm3 (got {row[region]!r})")
        out[region] = float(value)
    split = str(row["split"]).strip().lower() if "split" in row.index and pd.notna(row["split"]) else "train"
    if split not in SPLITS:
        raise ValueError(f"{at}: split must be 'train' or 'valid' (got {row['split']!r})")
    out["split"] = split
    if path_column:
        value = row[path_column]
        if pd.isna(value) or not str(value).strip():
            raise ValueError(f"{at}: {path_column} is empty")
        path = Path(str(value).strip()).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise FileNotFoundError(f"{at}: {path_column} {path} does not exist")
        out[path_column] = str(path)
    return out


def _check_image_header(path, image_shape, where, i, subject):
    import nibabel as nib

    try:
        shape = tuple(int(s) for s in nib.load(path).shape)
    except Exception as error:  # noqa: BLE001 - nibabel raises several types for unreadable files
        raise ValueError(f"{where}, row {i + 2} (subject {subject!r}): cannot read image {path}: {error}") from None
    if shape[3:] and all(s == 1 for s in shape[3:]):
        shape = shape[:3]
    if shape != image_shape:
        raise ValueError(
            f"{where}, row {i + 2} (subject {subject!r}): image {path} has shape {shape}, expected "
            f"{image_shape} (BrLP's 1.5 mm MNI grid); preprocess raw scans first (preprocess=True)"
        )


def make_pairs(table: pd.DataFrame) -> pd.DataFrame:
    """Every (earlier, later) pair of scans of the same subject, as BrLP's ``prepare_csv.make_csv_B``.

    Columns ``subject_id``, ``sex``, ``split`` (the earlier scan's) and ``starting_<c>``/``followup_<c>``
    for every other column ``c``. Same-age scans are paired in table order.
    """
    if "subject_id" not in table.columns or "age" not in table.columns:
        raise ValueError("the table needs subject_id and age columns to make pairs")
    shared = [c for c in ("subject_id", "sex", "split") if c in table.columns]
    other = [c for c in table.columns if c not in shared]
    records = []
    for subject, rows in table.groupby("subject_id", sort=True):
        rows = rows.sort_values("age", kind="stable")
        for a in range(len(rows)):
            for b in range(a + 1, len(rows)):
                start, follow = rows.iloc[a], rows.iloc[b]
                record = {c: start[c] for c in shared}
                for c in other:
                    record[f"starting_{c}"] = start[c]
                    record[f"followup_{c}"] = follow[c]
                records.append(record)
    columns = shared + [f"{p}_{c}" for c in other for p in ("starting", "followup")]
    return pd.DataFrame(records, columns=columns)


def fit_minmax(table: pd.DataFrame) -> dict:
    """Volume normalisation from the training rows, as BrLP: ``{region: (min, max)}`` in mm3."""
    rows = table[table["split"] == "train"] if "split" in table.columns else table
    for region in REGIONS:
        if not rows[region].max() > rows[region].min():
            raise ValueError(f"column {region!r} has the same value in every training row; it cannot be min-max "
                             "normalised from the data (give minmax explicitly)")
    return check_minmax({r: (float(rows[r].min()), float(rows[r].max())) for r in REGIONS})


def _contexts(table: pd.DataFrame, minmax: dict, prefix: str = "", sex_column: str = "sex") -> np.ndarray:
    """(n, 8) conditioning vectors of a table's rows (``prefix`` ``followup_`` for pair tables)."""
    out = np.empty((len(table), 8), dtype=np.float32)
    for k, (_, row) in enumerate(table.iterrows()):
        volumes = {r: (float(row[prefix + r]) - minmax[r][0]) / (minmax[r][1] - minmax[r][0]) for r in REGIONS}
        try:
            out[k] = encode_context(row[prefix + "age"], row[sex_column], row[prefix + "diagnosis"], volumes)
        except ValueError as error:
            raise ValueError(f"subject {row['subject_id']!r} at age {row[prefix + 'age']}: {error} "
                             "(check minmax_params against this table's volumes)") from None
    return out


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def load_training_image(path, image_shape) -> np.ndarray:
    """An image on BrLP's grid as float32 scaled to [0, 1] (BrLP's per-volume ``ScaleIntensity``)."""
    import nibabel as nib

    try:
        data = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"cannot read image {path}: {error}") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if tuple(data.shape) != tuple(image_shape):
        raise ValueError(f"image {path} has shape {data.shape}, expected {tuple(image_shape)}")
    if not np.all(np.isfinite(data)):
        raise ValueError(f"image {path} has NaN or infinite voxels")
    lo, hi = float(data.min()), float(data.max())
    if not hi > lo:
        raise ValueError(f"image {path} is constant ({lo})")
    return (data - lo) / (hi - lo)


def preprocess_table(table: pd.DataFrame, cache_dir, *, progress=None, **preprocess_kwargs) -> pd.DataFrame:
    """Run ``progression_preproc.preprocess_t1`` on every raw scan, cached as NIfTI in ``cache_dir``.

    Returns a copy of ``table`` whose ``image_path`` points to the preprocessed images. A cached
    image is reused when it is newer than its source scan.
    """
    import nibabel as nib

    from .progression_preproc import preprocess_t1

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    used: set = set()
    out = table.copy()
    for k, (i, row) in enumerate(table.iterrows()):
        source = Path(row["image_path"])
        stem = safe_file_stem(_image_stem(source), used=used)
        target = cache_dir / f"{stem}_brlp.nii.gz"
        if not (target.is_file() and target.stat().st_mtime >= source.stat().st_mtime):
            try:
                pre = preprocess_t1(source, **preprocess_kwargs)
            except ValueError as error:
                raise ValueError(f"preprocessing {source} (subject {row['subject_id']!r}): {error}") from None
            with atomic_write(target) as tmp:
                nib.save(nib.Nifti1Image(pre.image.astype(np.float32), pre.affine), str(tmp))
        out.at[i, "image_path"] = str(target)
        _report(progress, (k + 1) / len(table), f"preprocessed {k + 1}/{len(table)} scans")
    return out


def _image_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".mgz", ".mgh", ".nrrd", ".npz", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


class _ImageSet(torch.utils.data.Dataset):
    def __init__(self, paths, image_shape):
        self.paths, self.image_shape = list(paths), tuple(image_shape)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return {"image": torch.from_numpy(load_training_image(self.paths[i], self.image_shape))[None]}


class _TensorSet(torch.utils.data.Dataset):
    """Named tensors indexed along their first axis (latents, contexts, ages)."""

    def __init__(self, **tensors):
        self.tensors = tensors

    def __len__(self):
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}


# ---------------------------------------------------------------------------------------------
# Generic resumable training loop
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainingResult:
    """What a trainer wrote: the updated configuration, final weights, record and loss history."""

    config: BrLPConfig
    config_path: Path
    weights: Path
    record_path: Path
    history: list = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


@dataclass
class _Run:
    """One trainer's state: modules, optimizers and where it is in the epochs."""

    kind: str
    modules: dict            # name -> module saved in the checkpoint (the first is the trained network)
    optimizers: dict
    scalers: dict
    settings: dict
    epoch: int = 0           # completed epochs
    group: int = 0           # optimizer steps done in the current epoch
    step: int = 0            # optimizer steps done in total
    sums: dict = field(default_factory=dict)
    count: int = 0
    history: list = field(default_factory=list)


def _device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch finds no CUDA GPU; use device='cpu'")
    return device


def _use_amp(amp, device: torch.device) -> bool:
    if amp is None:
        return device.type == "cuda"
    if amp and device.type != "cuda":
        raise ValueError("amp=True needs a CUDA device (mixed precision is off on the CPU)")
    return bool(amp)


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16)


def _scaler(device: torch.device, amp: bool):
    return torch.amp.GradScaler(device.type, enabled=amp)


def _positive(value, name) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer (got {value!r})") from None
    if number < 1 or number != value:
        raise ValueError(f"{name} must be a positive integer (got {value!r})")
    return number


def _epoch_groups(n: int, batch_size: int, grad_accum: int, seed: int, epoch: int) -> list:
    """The epoch's optimizer steps, each a list of micro-batches (index arrays); a fixed shuffle per epoch."""
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
    batches = [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]
    return [batches[i:i + grad_accum] for i in range(0, len(batches), grad_accum)]


def _checkpoint_dir(out_dir: Path, kind: str) -> Path:
    return out_dir / f"checkpoint-{kind}"


def _save_state(run: _Run, out_dir: Path) -> None:
    """Write the checkpoint folder all at once (staging folder renamed over the old one)."""
    target = _checkpoint_dir(out_dir, run.kind)
    staging = out_dir / f".{target.name}-tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        for name, module in run.modules.items():
            save_checkpoint(module, staging / f"{name}.safetensors")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {
            "kind": run.kind, "settings": run.settings, "epoch": run.epoch, "group": run.group, "step": run.step,
            "sums": run.sums, "count": run.count, "history": run.history, "rng": rng,
            "optimizers": {k: o.state_dict() for k, o in run.optimizers.items()},
            "scalers": {k: s.state_dict() for k, s in run.scalers.items()},
        }
        torch.save(state, staging / STATE_FILE)
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _restore_state(run: _Run, out_dir: Path, device: torch.device) -> bool:
    """Load the checkpoint into ``run`` if one exists; False when there is none."""
    folder = _checkpoint_dir(out_dir, run.kind)
    path = folder / STATE_FILE
    if not path.is_file():
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"cannot read the training checkpoint {path} (delete the folder or resume=False): {error}") from None
    old = state.get("settings", {})
    changed = [k for k in sorted(set(old) | set(run.settings))
               if k not in _RESUMABLE_CHANGES and old.get(k) != run.settings.get(k)]
    if changed:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {run.settings.get(k)!r}" for k in changed[:4])
        raise ValueError(
            f"the checkpoint in {folder} was made with other settings ({shown}); resume with the same "
            "settings, or pass resume=False to start again"
        )
    if int(state["epoch"]) > run.settings["epochs"]:
        raise ValueError(f"the checkpoint in {folder} has already trained {state['epoch']} epochs, more than "
                         f"epochs={run.settings['epochs']}")
    for name, module in run.modules.items():
        load_checkpoint(module, folder / f"{name}.safetensors", name=name)
    for name, optimizer in run.optimizers.items():
        optimizer.load_state_dict(state["optimizers"][name])
    for name, scaler in run.scalers.items():
        scaler.load_state_dict(state["scalers"][name])
    for key in ("epoch", "group", "step", "count"):
        setattr(run, key, int(state[key]))
    run.sums = {k: float(v) for k, v in state["sums"].items()}
    run.history = list(state["history"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and device.type == "cuda":
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return True


def _report(progress, fraction, message):
    if progress is not None:
        progress(float(min(max(fraction, 0.0), 1.0)), message)


def _loader(dataset, batches, num_workers):
    # A private generator: creating a DataLoader iterator must not draw from the global RNG, whose
    # state is part of the checkpoint.
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                       generator=torch.Generator().manual_seed(0))


def _train_loop(run: _Run, out_dir: Path, train_set, valid_set, micro_step, apply_step, *, epochs, batch_size,
                grad_accum, seed, num_workers, checkpoint_every, progress):
    """Epochs of optimizer steps (each ``grad_accum`` micro-batches) with checkpoints and progress.

    ``micro_step(batch, weight, train)`` runs one micro-batch (backward when ``train``) and returns its
    losses; ``apply_step()`` steps the optimizers. Cancelling from ``progress`` saves a checkpoint at
    the last completed step, then raises.
    """
    n = len(train_set)
    steps_per_epoch = len(_epoch_groups(n, batch_size, grad_accum, seed, 0))
    total = max(epochs * steps_per_epoch, 1)
    for epoch in range(run.epoch, epochs):
        groups = _epoch_groups(n, batch_size, grad_accum, seed, epoch)
        remaining = groups[run.group:]
        batches = iter(_loader(train_set, [b for g in remaining for b in g], num_workers))
        for group in remaining:
            for optimizer in run.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            size = sum(len(b) for b in group)
            for indices in group:
                losses = micro_step(next(batches), len(indices) / size, True)
                for key, value in losses.items():
                    run.sums[key] = run.sums.get(key, 0.0) + value * len(indices)
                run.count += len(indices)
            apply_step()
            run.group += 1
            run.step += 1
            if checkpoint_every and run.step % checkpoint_every == 0:
                _save_state(run, out_dir)
            try:
                _report(progress, run.step / total,
                        f"{run.kind}: epoch {epoch + 1}/{epochs}, step {run.group}/{len(groups)}, "
                        + ", ".join(f"{k} {v / max(run.count, 1):.4g}" for k, v in run.sums.items()))
            except Cancelled:
                _save_state(run, out_dir)
                raise
        record = {"epoch": epoch + 1, "steps": run.step}
        record.update({k: v / max(run.count, 1) for k, v in run.sums.items()})
        if valid_set is not None and len(valid_set):
            record.update({f"valid_{k}": v for k, v in _validate(valid_set, micro_step, batch_size, seed, epoch).items()})
        run.history.append(record)
        run.epoch, run.group, run.sums, run.count = epoch + 1, 0, {}, 0
        _save_state(run, out_dir)


def _validate(valid_set, micro_step, batch_size, seed, epoch) -> dict:
    # The same noise and timesteps at every epoch, so validation losses are comparable across epochs;
    # the training RNG is left untouched.
    sums, count = {}, 0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(int(seed))
        batches = [list(range(i, min(i + batch_size, len(valid_set)))) for i in range(0, len(valid_set), batch_size)]
        for indices, batch in zip(batches, _loader(valid_set, batches, 0)):
            for key, value in micro_step(batch, 1.0, False).items():
                sums[key] = sums.get(key, 0.0) + value * len(indices)
            count += len(indices)
    return {k: v / count for k, v in sums.items()}


def _versions() -> dict:
    import monai

    from . import __version__

    return {"neuroatrophy": __version__, "torch": torch.__version__, "monai": monai.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _start(run: _Run, out_dir: Path, resume: bool, seed: int, device: torch.device, progress) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = _checkpoint_dir(out_dir, run.kind)
    if resume and _restore_state(run, out_dir, device):
        _report(progress, 0.0, f"{run.kind}: resuming from {folder} (epoch {run.epoch}, step {run.step})")
        return
    if folder.exists():
        shutil.rmtree(folder)
    torch.manual_seed(int(seed))


def _finish(run: _Run, cfg: BrLPConfig, out_dir: Path, seconds: float, extra: dict, scale_factor=None,
            minmax=None) -> TrainingResult:
    """Write the final weights, the training record and the updated configuration."""
    network = next(iter(run.modules))
    weights = save_checkpoint(run.modules[network], out_dir / f"{network}.safetensors",
                              metadata={"network": network, "steps": run.step})
    for name, module in list(run.modules.items())[1:]:  # e.g. the discriminator, for fine-tuning later
        save_checkpoint(module, out_dir / f"{name}.safetensors", metadata={"network": name, "steps": run.step})
    new_cfg = _updated_config(cfg, out_dir, {network: str(weights)}, scale_factor=scale_factor, minmax=minmax)
    config_path = new_cfg.save(out_dir / "config.json")
    new_cfg = load_config(config_path)
    record = {
        "network": network, "settings": run.settings, "history": run.history, "steps": run.step,
        "seconds_this_run": round(seconds, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": _versions(), "weights": weights.name, "config": config_path.name, **extra,
    }
    record_path = out_dir / f"training_{network}.json"
    with atomic_write(record_path) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
    return TrainingResult(config=new_cfg, config_path=config_path, weights=weights, record_path=record_path,
                          history=list(run.history), steps=run.step, seconds=seconds)


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (Path, torch.device)):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _updated_config(cfg: BrLPConfig, out_dir: Path, new_weights: dict, scale_factor=None, minmax=None) -> BrLPConfig:
    """``cfg`` with the new weights, keeping weights an existing ``out_dir/config.json`` of the same
    architecture lists (so the trainers can be called one after the other on one folder)."""
    weights = {}
    existing = out_dir / "config.json"
    if existing.is_file():
        try:
            old = load_config(existing)
        except (ValueError, FileNotFoundError):
            old = None
        if old is not None and old.to_dict()["architecture"] == cfg.to_dict()["architecture"]:
            weights.update({k: v for k, v in old.weights.items() if v})
    weights.update({k: v for k, v in cfg.weights.items() if v})
    weights.update(new_weights)
    new = copy.deepcopy(cfg)
    new.weights = weights
    if scale_factor is not None:
        new.scale_factor = float(scale_factor)
    if minmax is not None:
        new.minmax_params = check_minmax(minmax)
    new.validate()
    return new


def _settings(kind, cfg, **values) -> dict:
    arch = {"autoencoder": cfg.autoencoder, "unet": cfg.unet, "controlnet": cfg.controlnet}
    settings = {"network": kind, "architecture": json.dumps(arch, sort_keys=True),
                "scheduler": json.dumps(cfg.scheduler, sort_keys=True)}
    settings.update({k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in values.items()})
    return settings


def _init_module(module, init, name):
    if init is not None:
        load_checkpoint(module, init, name=name)
    return module


# ---------------------------------------------------------------------------------------------
# 1. Autoencoder
# ---------------------------------------------------------------------------------------------


def perceptual_loss_status() -> tuple[bool, str]:
    """Whether BrLP's perceptual loss (LPIPS on SqueezeNet) can run offline, and why (not)."""
    import importlib.util

    missing = [p for p in ("lpips", "torchvision") if importlib.util.find_spec(p) is None]
    if missing:
        return False, f"perceptual loss off: {' and '.join(missing)} not installed (its weight is 0)"
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(checkpoints.glob(f"{SQUEEZENET_FILE_PREFIX}*.pth")) if checkpoints.is_dir() else []
    if not found:
        return False, (f"perceptual loss off: SqueezeNet ImageNet weights ({SQUEEZENET_FILE_PREFIX}*.pth) are not "
                       f"in {checkpoints} and cannot be downloaded offline (its weight is 0)")
    return True, f"perceptual loss on: LPIPS SqueezeNet with local weights {found[0].name}"


def _perceptual_loss(enabled):
    if not enabled:
        return None, "perceptual loss off (perceptual_weight is 0 or perceptual=False)"
    ok, message = perceptual_loss_status()
    if not ok:
        return None, message
    import warnings

    from monai.losses import PerceptualLoss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            loss = PerceptualLoss(spatial_dims=3, network_type="squeeze", is_fake_3d=True, fake_3d_ratio=0.2)
        except Exception as error:  # noqa: BLE001 - download attempt or incompatible package versions
            return None, f"perceptual loss off: it could not be built offline ({error})"
    return loss.eval(), message


def _kl_loss(z_mu, z_sigma):
    # BrLP's KLDivergenceLoss: sum over the latent, mean over the batch.
    kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1, dim=list(range(1, z_mu.ndim)))
    return kl.mean()


def train_autoencoder(table, cfg: BrLPConfig, out_dir, *, epochs: int = 5, batch_size: int = 2, grad_accum: int = 8,
                      lr: float = 1e-4, kl_weight: float = 1e-7, adv_weight: float = 0.025,
                      perceptual_weight: float = 0.001, perceptual: bool = True, discriminator_channels: int = 32,
                      device="cpu", amp=None, resume: bool = True, seed: int = 0, progress=None,
                      preprocess: bool = False, num_workers: int = 0, checkpoint_every: int | None = None,
                      init=None) -> TrainingResult:
    """Train BrLP's AutoencoderKL with its patch discriminator.

    Parameters
    ----------
    table : path or DataFrame
        The training table (module docstring); ``split == "valid"`` rows give a validation loss.
    cfg : BrLPConfig
        Architecture (``brlp_config()`` for BrLP's, ``tiny_config()`` for tests).
    out_dir : path
        Output folder (created); see the module docstring for what it holds.
    epochs, batch_size, grad_accum : int
        Epochs; micro-batch size; micro-batches accumulated per optimizer step (BrLP: 5, 2, 8).
    lr, kl_weight, adv_weight, perceptual_weight : float
        BrLP's Adam learning rate (generator and discriminator) and loss weights.
    perceptual : bool
        Use the perceptual term when its pretrained weights are available locally (see the module
        docstring); otherwise it is 0.
    discriminator_channels : int
        First-layer channels of the PatchDiscriminator (BrLP: 32; 3 layers).
    device, amp : str, bool or None
        Torch device; mixed precision (None: on for CUDA, off on the CPU).
    resume : bool
        Continue from ``out_dir/checkpoint-autoencoder`` when it exists (same settings required).
    seed : int
        Seeds the initial weights, the shuffling and the KL sampling.
    progress : callable(fraction, message), optional
        Called after every optimizer step; raising ``Cancelled`` stops after saving a checkpoint.
    preprocess : bool
        The images are raw scans: run ``progression_preproc.preprocess_t1`` on them first (cached in
        ``out_dir/preprocessed``).
    num_workers : int
        DataLoader worker processes for reading images.
    checkpoint_every : int, optional
        Also checkpoint every this many optimizer steps (besides every epoch).
    init : path, optional
        Weights to start from (e.g. BrLP's published autoencoder), instead of random ones.
    """
    t0 = time.time()
    out_dir, device = Path(out_dir), _device(device)
    amp = _use_amp(amp, device)
    epochs, batch_size, grad_accum = (_positive(epochs, "epochs"), _positive(batch_size, "batch_size"),
                                      _positive(grad_accum, "grad_accum"))
    frame = read_training_table(table, image_shape=None if preprocess else cfg.image_shape)
    if preprocess:
        out_dir.mkdir(parents=True, exist_ok=True)
        frame = preprocess_table(frame, out_dir / "preprocessed", progress=None)
    train_rows, valid_rows = frame[frame["split"] == "train"], frame[frame["split"] == "valid"]
    if len(train_rows) == 0:
        raise ValueError("the training table has no rows with split 'train'")

    perc_fn, perc_message = _perceptual_loss(perceptual and perceptual_weight > 0)
    _report(progress, 0.0, perc_message)
    log.info(perc_message)
    from monai.losses import PatchAdversarialLoss
    from monai.networks.nets import PatchDiscriminator

    torch.manual_seed(int(seed))
    autoencoder = _init_module(build_autoencoder(cfg), init, "autoencoder").to(device).train()
    discriminator = PatchDiscriminator(spatial_dims=3, num_layers_d=3, channels=int(discriminator_channels),
                                       in_channels=1, out_channels=1).to(device).train()
    if perc_fn is not None:
        perc_fn = perc_fn.to(device)
    adv_fn = PatchAdversarialLoss(criterion="least_squares")
    optimizers = {"generator": torch.optim.Adam(autoencoder.parameters(), lr=lr),
                  "discriminator": torch.optim.Adam(discriminator.parameters(), lr=lr)}
    scalers = {k: _scaler(device, amp) for k in optimizers}
    settings = _settings("autoencoder", cfg, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                         kl_weight=kl_weight, adv_weight=adv_weight, perceptual_weight=perceptual_weight,
                         perceptual_used=perc_fn is not None, discriminator_channels=int(discriminator_channels),
                         seed=int(seed), amp=amp, device=device, n_train=len(train_rows), n_valid=len(valid_rows),
                         num_workers=num_workers, checkpoint_every=checkpoint_every,
                         init=str(init) if init else None)
    run = _Run("autoencoder", {"autoencoder": autoencoder, "discriminator": discriminator}, optimizers, scalers, settings)
    _start(run, out_dir, resume, seed, device, progress)
    autocast = lambda: _autocast(device, amp)

    def micro_step(batch, weight, train):
        images = batch["image"].to(device)
        autoencoder.train(train)
        discriminator.train(train)
        # Generator: the discriminator judges but is not updated by this loss.
        discriminator.requires_grad_(False)
        with autocast():
            reconstruction, z_mu, z_sigma = autoencoder(images)
            rec = torch.nn.functional.l1_loss(reconstruction.float(), images.float())
            kl = _kl_loss(z_mu.float(), z_sigma.float())
            per = perc_fn(reconstruction.float(), images.float()) if perc_fn is not None else rec.new_zeros(())
            gen = adv_fn(discriminator(reconstruction.contiguous().float())[-1], target_is_real=True, for_discriminator=False)
            loss_g = rec + kl_weight * kl + perceptual_weight * per + adv_weight * gen
        discriminator.requires_grad_(True)
        if train:
            scalers["generator"].scale(loss_g * weight).backward()
        with autocast():
            fake = adv_fn(discriminator(reconstruction.contiguous().detach())[-1], target_is_real=False, for_discriminator=True)
            real = adv_fn(discriminator(images.contiguous().detach())[-1], target_is_real=True, for_discriminator=True)
            loss_d = adv_weight * 0.5 * (fake + real)
        if train:
            scalers["discriminator"].scale(loss_d * weight).backward()
        return {"l1": rec.item(), "kl": kl.item(), "perceptual": per.item(), "adversarial": gen.item(),
                "generator": loss_g.item(), "discriminator": loss_d.item()}

    def apply_step():
        for name, optimizer in optimizers.items():
            scalers[name].step(optimizer)
            scalers[name].update()

    train_set = _ImageSet(train_rows["image_path"], cfg.image_shape)
    valid_set = _ImageSet(valid_rows["image_path"], cfg.image_shape) if len(valid_rows) else None
    _train_loop(run, out_dir, train_set, valid_set, micro_step, apply_step, epochs=epochs, batch_size=batch_size,
                grad_accum=grad_accum, seed=seed, num_workers=num_workers, checkpoint_every=checkpoint_every,
                progress=progress)
    autoencoder.eval()
    return _finish(run, cfg, out_dir, time.time() - t0, {"perceptual": perc_message})


# ---------------------------------------------------------------------------------------------
# 2. Latents and their scale
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_latents(autoencoder: nn.Module, table, out_dir, *, image_shape=None, device=None, progress=None,
                    preprocess: bool = False) -> pd.DataFrame:
    """Encode every image with the encoder mean and save ``<stem>_latent.npz`` (key ``data``), as BrLP.

    Parameters
    ----------
    autoencoder : nn.Module
        A trained AutoencoderKL (e.g. ``BrLPNetworks.from_config(cfg, networks=("autoencoder",)).autoencoder``).
    table : path or DataFrame
        The training table.
    out_dir : path
        Folder for the latent files (created) and ``latents.csv``.
    image_shape : tuple, optional
        The autoencoder's input shape (default: the first image's).
    device : optional
        Default: the autoencoder's device.

    Returns
    -------
    pandas.DataFrame
        The table with a ``latent_path`` column (also written to ``out_dir/latents.csv``), ready for
        :func:`train_unet` and :func:`train_controlnet`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = read_training_table(table, image_shape=None if preprocess else image_shape)
    if preprocess:
        frame = preprocess_table(frame, out_dir / "preprocessed")
    if image_shape is None:
        import nibabel as nib

        image_shape = tuple(int(s) for s in nib.load(frame["image_path"].iloc[0]).shape[:3])
    device = next(autoencoder.parameters()).device if device is None else _device(device)
    was_training = autoencoder.training
    autoencoder.to(device).eval()
    used: set = set()
    paths = []
    for k, (_, row) in enumerate(frame.iterrows()):
        image = torch.from_numpy(load_training_image(row["image_path"], image_shape))[None, None].to(device)
        z_mu = autoencoder.encode(image)[0][0].float().cpu().numpy()
        target = out_dir / f"{safe_file_stem(_image_stem(Path(row['image_path'])), used=used)}_latent.npz"
        with atomic_write(target) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **{LATENT_KEY: z_mu.astype(np.float32)})
        paths.append(str(target))
        _report(progress, (k + 1) / len(frame), f"encoded {k + 1}/{len(frame)} images")
    autoencoder.train(was_training)
    frame["latent_path"] = paths
    with atomic_write(out_dir / "latents.csv") as tmp:
        frame.to_csv(tmp, index=False)
    return frame


def _load_latent(path) -> np.ndarray:
    try:
        with np.load(str(path)) as data:
            return np.asarray(data[LATENT_KEY], dtype=np.float32)
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"cannot read latent {path} (an .npz with key {LATENT_KEY!r}): {error}") from None


def compute_scale_factor(latents) -> float:
    """BrLP's latent scale ``1 / std(z)``, over all given latents.

    ``latents``: an array/tensor, a list of them, a list of ``.npz`` paths or a table with
    ``latent_path``. (BrLP uses the first training latent only; all of them give a steadier value.)
    """
    if isinstance(latents, pd.DataFrame):
        latents = list(latents["latent_path"])
    if isinstance(latents, (np.ndarray, torch.Tensor)):
        arrays = [np.asarray(latents, dtype=np.float64)]
    else:
        arrays = [_load_latent(x) if isinstance(x, (str, Path)) else np.asarray(x, dtype=np.float64) for x in latents]
    if not arrays:
        raise ValueError("compute_scale_factor needs at least one latent")
    values = np.concatenate([np.ravel(a) for a in arrays]).astype(np.float64)
    std = float(values.std())
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"the latents have no spread (std {std}); cannot compute a scale factor")
    return 1.0 / std


def _latent_tensor(paths, cfg: BrLPConfig, scale: float) -> torch.Tensor:
    from .progression_sampling import pad_latent

    out = []
    for path in paths:
        z = _load_latent(path)
        if tuple(z.shape) != tuple(cfg.latent_shape_ae):
            raise ValueError(f"latent {path} has shape {z.shape}, expected {cfg.latent_shape_ae} for this configuration")
        out.append(pad_latent(torch.from_numpy(z)[None] * scale, cfg.latent_shape_dm)[0])
    return torch.stack(out)


def _resolve_minmax(minmax, cfg: BrLPConfig, frame: pd.DataFrame) -> dict:
    if minmax is None:
        return dict(cfg.minmax_params)
    if isinstance(minmax, str):
        if minmax != "data":
            raise ValueError(f"minmax must be None (the configuration's), 'data' or a dict (got {minmax!r})")
        return fit_minmax(frame)
    return check_minmax(minmax)


# ---------------------------------------------------------------------------------------------
# 3. Diffusion UNet
# ---------------------------------------------------------------------------------------------


def _ddpm(cfg: BrLPConfig):
    from monai.networks.schedulers import DDPMScheduler

    settings = dict(cfg.scheduler)
    return DDPMScheduler(num_train_timesteps=int(settings.pop("num_train_timesteps", 1000)),
                         schedule=settings.pop("schedule", "scaled_linear_beta"), **settings)


def _noised(scheduler, z, device):
    noise = torch.randn(z.shape, device=device)
    timesteps = torch.randint(0, scheduler.num_train_timesteps, (z.shape[0],), device=device).long()
    return scheduler.add_noise(original_samples=z, noise=noise, timesteps=timesteps), noise, timesteps


def train_unet(latent_table, cfg: BrLPConfig, out_dir, *, epochs: int = 5, batch_size: int = 16, grad_accum: int = 1,
               lr: float = 2.5e-5, scale_factor: float | None = None, minmax=None, device="cpu", amp=None,
               resume: bool = True, seed: int = 0, progress=None, num_workers: int = 0,
               checkpoint_every: int | None = None, init=None) -> TrainingResult:
    """Train the covariate-conditioned DiffusionModelUNet as a DDPM on every latent (BrLP's LDM).

    Parameters
    ----------
    latent_table : path or DataFrame
        :func:`extract_latents`' table (``latent_path`` plus the training table's columns).
    cfg : BrLPConfig
        Architecture and scheduler.
    scale_factor : float, optional
        Latent scale; default ``compute_scale_factor`` of the training latents. Written to the
        configuration; the ControlNet must be trained with the same value.
    minmax : None, "data" or dict
        Volume normalisation: the configuration's (default), the training rows' min/max ("data", as
        BrLP does on its own data) or given; written to the configuration.
    init : path, optional
        UNet weights to start from (fine-tuning).

    Other parameters are those of :func:`train_autoencoder`. Each latent's context is its own scan's
    age, sex, diagnosis and normalised volumes (``encode_context``).
    """
    t0 = time.time()
    out_dir, device = Path(out_dir), _device(device)
    amp = _use_amp(amp, device)
    epochs, batch_size, grad_accum = (_positive(epochs, "epochs"), _positive(batch_size, "batch_size"),
                                      _positive(grad_accum, "grad_accum"))
    frame = read_training_table(latent_table, path_column="latent_path", name=None)
    train_rows, valid_rows = frame[frame["split"] == "train"], frame[frame["split"] == "valid"]
    if len(train_rows) == 0:
        raise ValueError("the latent table has no rows with split 'train'")
    minmax = _resolve_minmax(minmax, cfg, frame)
    scale = float(scale_factor) if scale_factor is not None else compute_scale_factor(list(train_rows["latent_path"]))
    if not scale > 0:
        raise ValueError(f"scale_factor must be positive (got {scale_factor})")

    def dataset(rows):
        return _TensorSet(z=_latent_tensor(rows["latent_path"], cfg, scale),
                          context=torch.from_numpy(_contexts(rows, minmax))[:, None, :])

    train_set = dataset(train_rows)
    valid_set = dataset(valid_rows) if len(valid_rows) else None
    torch.manual_seed(int(seed))
    unet = _init_module(build_unet(cfg), init, "unet").to(device).train()
    scheduler = _ddpm(cfg)
    optimizers = {"unet": torch.optim.AdamW(unet.parameters(), lr=lr)}
    scalers = {"unet": _scaler(device, amp)}
    settings = _settings("unet", cfg, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                         scale_factor=scale, minmax=json.dumps(minmax, sort_keys=True), seed=int(seed), amp=amp,
                         device=device, n_train=len(train_rows), n_valid=len(valid_rows), num_workers=num_workers,
                         checkpoint_every=checkpoint_every, init=str(init) if init else None)
    run = _Run("unet", {"unet": unet}, optimizers, scalers, settings)
    _start(run, out_dir, resume, seed, device, progress)

    def micro_step(batch, weight, train):
        unet.train(train)
        z, context = batch["z"].to(device), batch["context"].to(device)
        noised, noise, timesteps = _noised(scheduler, z, device)
        with _autocast(device, amp):
            prediction = unet(x=noised, timesteps=timesteps, context=context)
            loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        if train:
            scalers["unet"].scale(loss * weight).backward()
        return {"mse": loss.item()}

    def apply_step():
        scalers["unet"].step(optimizers["unet"])
        scalers["unet"].update()

    _train_loop(run, out_dir, train_set, valid_set, micro_step, apply_step, epochs=epochs, batch_size=batch_size,
                grad_accum=grad_accum, seed=seed, num_workers=num_workers, checkpoint_every=checkpoint_every,
                progress=progress)
    unet.eval()
    return _finish(run, cfg, out_dir, time.time() - t0, {"scale_factor": scale}, scale_factor=scale, minmax=minmax)


# ---------------------------------------------------------------------------------------------
# 4. ControlNet
# ---------------------------------------------------------------------------------------------


def _pair_frame(pair_table) -> pd.DataFrame:
    """Pairs from a latent table (made with :func:`make_pairs`) or a ready pair table."""
    if not isinstance(pair_table, pd.DataFrame):
        from .cli import _read_table

        path = Path(pair_table)
        raw = _read_table(path, "latent table", required=("subject_id",))
        if "starting_latent_path" in raw.columns:
            for prefix in ("starting_", "followup_"):
                raw[prefix + "latent_path"] = [str(p if Path(p).is_absolute() else path.resolve().parent / p)
                                               for p in raw[prefix + "latent_path"]]
            pair_table = raw
        else:
            pair_table = read_training_table(raw, path_column="latent_path", base=path.resolve().parent, name=str(path))
    if "starting_latent_path" in pair_table.columns:
        pairs = pair_table.copy()
        if "split" not in pairs.columns:
            pairs["split"] = "train"
        required = ["subject_id", "sex", *(f"{p}_{c}" for p in ("starting", "followup")
                                           for c in ("latent_path", "age", "diagnosis", *REGIONS))]
        missing = [c for c in required if c not in pairs.columns]
        if missing:
            raise ValueError(f"the pair table has no {', '.join(missing)} column")
        return pairs.reset_index(drop=True)
    frame = read_training_table(pair_table, path_column="latent_path")
    return make_pairs(frame)


def train_controlnet(pair_table, cfg: BrLPConfig, unet_weights=None, out_dir=None, *, epochs: int = 5,
                     batch_size: int = 16, grad_accum: int = 1, lr: float = 2.5e-5, device="cpu", amp=None,
                     resume: bool = True, seed: int = 0, progress=None, num_workers: int = 0,
                     checkpoint_every: int | None = None, init=None) -> TrainingResult:
    """Train BrLP's ControlNet on baseline -> follow-up pairs, with the UNet frozen.

    Parameters
    ----------
    pair_table : path or DataFrame
        :func:`extract_latents`' latent table (every earlier/later pair of a subject is used,
        :func:`make_pairs`) or a pair table with ``starting_*``/``followup_*`` columns. The pair's
        split is its baseline's.
    cfg : BrLPConfig
        The configuration returned by :func:`train_unet` (its ``scale_factor`` and ``minmax_params``
        are those the UNet was trained with).
    unet_weights : path, optional
        The trained UNet (default: ``cfg.weights["unet"]``).
    out_dir : path
        Output folder.
    init : path, optional
        ControlNet weights to start from; default: the UNet's weights (``strict=False``, as BrLP).

    Other parameters are those of :func:`train_unet`. Condition: the padded, scaled baseline latent
    and the baseline age / 100 as a fourth channel; context: the follow-up's age, sex, diagnosis and
    volumes.
    """
    if out_dir is None:
        raise ValueError("out_dir is required")
    t0 = time.time()
    out_dir, device = Path(out_dir), _device(device)
    amp = _use_amp(amp, device)
    epochs, batch_size, grad_accum = (_positive(epochs, "epochs"), _positive(batch_size, "batch_size"),
                                      _positive(grad_accum, "grad_accum"))
    unet_weights = Path(unet_weights) if unet_weights is not None else cfg.weight_path("unet")
    pairs = _pair_frame(pair_table)
    if len(pairs) == 0:
        raise ValueError("no baseline -> follow-up pairs: the ControlNet needs subjects with two or more scans")
    train_rows, valid_rows = pairs[pairs["split"] == "train"], pairs[pairs["split"] == "valid"]
    if len(train_rows) == 0:
        raise ValueError("no training pairs (split 'train')")
    minmax, scale = dict(cfg.minmax_params), float(cfg.scale_factor)

    def dataset(rows):
        shape = cfg.latent_shape_dm
        age = torch.tensor(rows["starting_age"].to_numpy(dtype=np.float32) / 100.0)
        condition = torch.cat([_latent_tensor(rows["starting_latent_path"], cfg, scale),
                               age.view(-1, 1, 1, 1, 1).expand(-1, 1, *shape[1:])], dim=1)
        return _TensorSet(z=_latent_tensor(rows["followup_latent_path"], cfg, scale), condition=condition,
                          context=torch.from_numpy(_contexts(rows, minmax, prefix="followup_"))[:, None, :])

    train_set = dataset(train_rows)
    valid_set = dataset(valid_rows) if len(valid_rows) else None
    torch.manual_seed(int(seed))
    unet = build_unet(cfg)
    load_checkpoint(unet, unet_weights, name="unet")
    unet.to(device).eval().requires_grad_(False)
    controlnet = build_controlnet(cfg)
    if init is not None:
        load_checkpoint(controlnet, init, name="controlnet")
    else:
        controlnet.load_state_dict(read_state_dict(unet_weights), strict=False)
    controlnet.to(device).train()
    scheduler = _ddpm(cfg)
    optimizers = {"controlnet": torch.optim.AdamW(controlnet.parameters(), lr=lr)}
    scalers = {"controlnet": _scaler(device, amp)}
    settings = _settings("controlnet", cfg, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                         scale_factor=scale, minmax=json.dumps(minmax, sort_keys=True), seed=int(seed), amp=amp,
                         device=device, n_train=len(train_rows), n_valid=len(valid_rows), num_workers=num_workers,
                         checkpoint_every=checkpoint_every, unet=_file_signature(unet_weights),
                         init=str(init) if init else None)
    run = _Run("controlnet", {"controlnet": controlnet}, optimizers, scalers, settings)
    _start(run, out_dir, resume, seed, device, progress)

    def micro_step(batch, weight, train):
        controlnet.train(train)
        z, condition, context = (batch[k].to(device) for k in ("z", "condition", "context"))
        noised, noise, timesteps = _noised(scheduler, z, device)
        with _autocast(device, amp):
            down, mid = controlnet(x=noised, timesteps=timesteps, context=context, controlnet_cond=condition)
            prediction = unet(x=noised, timesteps=timesteps, context=context,
                              down_block_additional_residuals=down, mid_block_additional_residual=mid)
            loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        if train:
            scalers["controlnet"].scale(loss * weight).backward()
        return {"mse": loss.item()}

    def apply_step():
        scalers["controlnet"].step(optimizers["controlnet"])
        scalers["controlnet"].update()

    _train_loop(run, out_dir, train_set, valid_set, micro_step, apply_step, epochs=epochs, batch_size=batch_size,
                grad_accum=grad_accum, seed=seed, num_workers=num_workers, checkpoint_every=checkpoint_every,
                progress=progress)
    controlnet.eval()
    new_cfg = copy.deepcopy(cfg)
    new_cfg.weights = dict(cfg.weights, unet=str(unet_weights))
    return _finish(run, new_cfg, out_dir, time.time() - t0, {"n_pairs": len(pairs), "unet_weights": str(unet_weights)})


def _file_signature(path) -> str:
    stat = Path(path).stat()
    return f"{Path(path).name}:{stat.st_size}"


# ---------------------------------------------------------------------------------------------
# 5. Disease-course model
# ---------------------------------------------------------------------------------------------


def train_dcm(table, out_dir, *, cfg: BrLPConfig | None = None, minmax=None, n_iter: int = 5000, seed: int = 64,
              source_dimension: int = 4, regression: bool = True, min_subjects: int = 5, progress=None) -> dict:
    """Fit BrLP's disease-course models (leaspy logistic, one per diagnosis group) and the regression fallback.

    Parameters
    ----------
    table : path or DataFrame
        The training table (images are not needed; ``image_path`` may be absent). Only ``train``
        rows are used.
    out_dir : path
        Writes ``out_dir/dcm/`` (``DiseaseCourseModel.save``: ``dcm_cn.json``... and metadata) and
        ``out_dir/dcm_regression.json``.
    cfg : BrLPConfig, optional
        Its ``minmax_params`` normalise the volumes (unless ``minmax`` is given) and, when given, an
        updated ``out_dir/config.json`` lists the models under ``weights["dcm"]`` (per group) and
        ``weights["regression"]``.
    minmax : None, "data" or dict
        As in :func:`train_unet`.
    n_iter, seed, source_dimension : int
        MCMC-SAEM settings (BrLP: 5000, 64, 4).
    regression : bool
        Also fit ``RegressionCourse`` (the single-visit fallback).

    Returns
    -------
    dict
        ``{"dcm": folder, "regression": path or None, "config": path or None}``.
    """
    from .progression_dcm import DiseaseCourseModel, RegressionCourse

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = read_training_table(table, path_column=None)
    frame = frame[frame["split"] == "train"]
    if isinstance(minmax, str) or minmax is None:
        minmax = fit_minmax(frame) if minmax == "data" else (
            dict(cfg.minmax_params) if cfg is not None else _resolve_minmax(None, BrLPConfig(), frame))
    minmax = check_minmax(minmax)
    visits = frame[["subject_id", "age", "diagnosis"]].copy()
    for region in REGIONS:
        lo, hi = minmax[region]
        visits[region] = (frame[region] - lo) / (hi - lo)
    fit_progress = (lambda f, m: progress(0.9 * f, m)) if progress is not None else None
    dcm = DiseaseCourseModel().fit(visits, n_iter=n_iter, seed=seed, source_dimension=source_dimension,
                                   progress=fit_progress, min_subjects=min_subjects)
    folder = dcm.save(out_dir / "dcm")
    regression_path = None
    if regression:
        regression_path = RegressionCourse().fit(visits).save(out_dir / "dcm_regression.json")
    _report(progress, 1.0, f"disease-course models fitted for {', '.join(dcm.groups)}")
    config_path = None
    if cfg is not None:
        weights = {"dcm": {g.lower(): str(folder / f"dcm_{g.lower()}.json") for g in dcm.groups}}
        if regression_path is not None:
            weights["regression"] = str(regression_path)
        new_cfg = _updated_config(cfg, out_dir, weights, minmax=minmax)
        config_path = new_cfg.save(out_dir / "config.json")
    return {"dcm": folder, "regression": regression_path, "config": config_path}
