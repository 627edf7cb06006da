"""MindGlide's published network, its checkpoint loader and its inference, rebuilt from the published facts.

MindGlide (Goebl et al., Nat Commun 2025;16:3149; PyPI ``mindglide`` 1.3.0, MIT) segments a brain MRI of any
single contrast into 20 labels with a MONAI ``DynUNet``. Its weights are not on PyPI: users download
``_20240404_conjurer_trained_dice_7733.pt`` (Hugging Face ``MS-PINPOINT/mindglide``) themselves and give its
path to :func:`load_mindglide`. A fine-tuned checkpoint of the same architecture loads too;
:func:`is_published_checkpoint` tells the two apart by SHA-256.

MindGlide has **no thalamus label**: label 3 (:data:`DGM_LABEL`) is all deep grey matter (thalamus and basal
ganglia). Use :func:`neuroatrophy.thalamus_masks.load_external_mask` with ``fmt="mindglide"`` and a thalamus
prior to split it.

This module imports torch and MONAI; it is only needed by users of MindGlide and by the benchmark.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import DynUNet
from scipy import ndimage

from .thalamus_image import input_name, load_image, voxel_sizes

__all__ = [
    "DGM_LABEL",
    "MINDGLIDE_LABELS",
    "PUBLISHED_FILENAME",
    "PUBLISHED_SHA256",
    "MindGlideInput",
    "file_sha256",
    "is_published_checkpoint",
    "keep_largest_component",
    "load_mindglide",
    "mindglide_network",
    "mindglide_preprocess",
    "mindglide_window_settings",
    "run_mindglide",
]

#: MindGlide's output labels (``consts.PROPERTIES``)
MINDGLIDE_LABELS = {
    0: "Background", 1: "CSF", 2: "Ventricles_3_4_5", 3: "DGM", 4: "Pons", 5: "Brainstem", 6: "Cerebellum",
    7: "Temporal_lobe", 8: "Temporal_horn_lateral_ventricle", 9: "Lateral_ventricle", 10: "Optic_chiasm",
    11: "Cerebellar_vermis", 12: "Corpus_callosum", 13: "White_matter", 14: "Frontal_GM", 15: "Limbic_GM",
    16: "Parietal_GM", 17: "Occipital_GM", 18: "Lesion", 19: "Ventral_diencephalon",
}
#: deep grey matter: the thalamus *and* the basal ganglia
DGM_LABEL = 3
PUBLISHED_SHA256 = "881e30efd9444a25ee70c01d795dd9fb21ac750a48f1ba8070fcd79fb75e76ca"
PUBLISHED_FILENAME = "_20240404_conjurer_trained_dice_7733.pt"

# DynUNet configuration (MONAI dynunet-tutorial rule for patch 128x128x64 at 1 mm)
_STRIDES = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
_KERNELS = [[3, 3, 3]] * 6
_FILTERS = [32, 64, 128, 256, 320, 320]
_N_CLASSES = 20
_TARGET_SPACING_MM = 1.0
_ANISOTROPY_RATIO = 3.0  # nnU-Net: resample the thick axis by nearest neighbour when max/min spacing >= 3
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "network", "net")
_PREFIXES = ("module.", "_orig_mod.")


# --------------------------------------------------------------------------------------------------- network

def mindglide_network() -> DynUNet:
    """MindGlide's ``DynUNet`` (published configuration, 30,781,744 parameters), randomly initialised."""
    return DynUNet(
        spatial_dims=3, in_channels=1, out_channels=_N_CLASSES,
        kernel_size=_KERNELS, strides=_STRIDES, upsample_kernel_size=_STRIDES[1:],
        filters=_FILTERS, norm_name="instance", deep_supervision=True, deep_supr_num=3, res_block=False,
    )


def mindglide_window_settings() -> dict:
    """MindGlide's sliding-window settings, as keyword arguments of MONAI's ``SlidingWindowInferer``.

    MindGlide itself runs 4 windows per batch (``sw_batch_size=4``); pass ``sw_batch_size`` separately
    (1 keeps memory low on a CPU).
    """
    return {"roi_size": (128, 128, 64), "overlap": 0.5, "mode": "gaussian"}


def file_sha256(path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file (hex), read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_published_checkpoint(path) -> bool:
    """True if the file is MindGlide's published checkpoint (by SHA-256)."""
    path = _existing(path)
    return file_sha256(path) == PUBLISHED_SHA256


def load_mindglide(path, expected_sha256: str | None = None, device="cpu") -> DynUNet:
    """Load a MindGlide checkpoint into :func:`mindglide_network`, in eval mode.

    Parameters
    ----------
    path : str or Path
        A ``.pt`` file holding the network's ``state_dict`` (the published format), or one wrapped in a dict
        (``{"state_dict": ...}``, ``{"model": ...}``), with or without ``module.`` prefixes.
    expected_sha256 : str, optional
        Check the file against this hash first (e.g. :data:`PUBLISHED_SHA256`).
    device : str or torch.device
        Where the weights go.

    Returns
    -------
    monai.networks.nets.DynUNet
        With attributes ``checkpoint_path``, ``checkpoint_sha256`` and ``is_published`` (whether the file is the
        published checkpoint; fine-tuned checkpoints load too).
    """
    path = _existing(path)
    digest = file_sha256(path)
    if expected_sha256 is not None and digest != str(expected_sha256).strip().lower():
        raise ValueError(f"{path}: SHA-256 {digest} does not match the expected {expected_sha256} "
                         "(a different or incomplete download?)")
    try:
        obj = torch.load(str(path), map_location=device, weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for non-checkpoints
        raise ValueError(f"{path}: not a PyTorch checkpoint of tensors that loads with weights_only=True: "
                         f"{exc}") from exc
    state = _unwrap_state_dict(obj, path)
    net = mindglide_network()
    _check_state_dict(net.state_dict(), state, path)
    net.load_state_dict(state, strict=True)
    net.to(device).eval()
    net.checkpoint_path = str(path)
    net.checkpoint_sha256 = digest
    net.is_published = digest == PUBLISHED_SHA256
    return net


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MindGlide checkpoint not found: {path}")
    return path


def _unwrap_state_dict(obj, path) -> dict:
    """The tensor dict inside common checkpoint wrappers, without DataParallel/compile prefixes."""
    for _ in range(3):  # wrappers may nest, e.g. {"model": {"state_dict": ...}}
        if not isinstance(obj, Mapping):
            break
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors), found {type(obj).__name__}")  # noqa: TRY004
    state = dict(obj)
    non_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if non_tensors or not state:
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors); entries that are not tensors: "
                         f"{_few(non_tensors) if non_tensors else 'the file holds an empty dict'}")
    for prefix in _PREFIXES:
        if all(str(k).startswith(prefix) for k in state):
            state = {str(k)[len(prefix):]: v for k, v in state.items()}
    return state


def _check_state_dict(expected, state, path) -> None:
    """Raise ValueError listing missing, unexpected and mis-shaped keys before torch's own strict load."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs network {tuple(expected[k].shape)}"
                  for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches ({_few(mismatched)})")
        raise ValueError(f"{path}: not a checkpoint of MindGlide's DynUNet (filters {_FILTERS}, {_N_CLASSES} classes, "
                         f"deep supervision 3): " + "; ".join(parts))


def _few(items, limit: int = 4) -> str:
    items = list(items)
    return ", ".join(str(i) for i in items[:limit]) + (", ..." if len(items) > limit else "")


# --------------------------------------------------------------------------------------------------- preprocessing

@dataclass
class MindGlideInput:
    """An image prepared as MindGlide does, with what is needed to map labels back to its grid.

    Attributes
    ----------
    data : ndarray
        float32 (X, Y, Z): RAS, cropped to the non-zero box, 1 mm, z-scored over non-zero voxels.
    image : nibabel.Nifti1Image
        The input image (its grid is the output grid).
    orientation : ndarray
        nibabel orientation from the input's voxel axes to RAS.
    ras_shape : tuple
        Shape of the input reoriented to RAS.
    crop : tuple of slice
        The non-zero bounding box in the RAS array.
    spacing : tuple of float
        RAS voxel sizes (mm) before resampling.
    thick_axis : int or None
        Axis resampled by nearest neighbour (anisotropic input), else None.
    """

    data: np.ndarray
    image: nib.Nifti1Image
    orientation: np.ndarray
    ras_shape: tuple
    crop: tuple
    spacing: tuple
    thick_axis: int | None

    @property
    def cropped_shape(self) -> tuple:
        return tuple(s.stop - s.start for s in self.crop)


def mindglide_preprocess(img) -> MindGlideInput:
    """Prepare an image as MindGlide's ``get_transforms`` does.

    RAS reorientation (nearest axes, no interpolation), crop to the bounding box of non-zero voxels, resampling to
    1 mm (cubic; for anisotropic images with max/min spacing >= 3, cubic in-plane and nearest neighbour through
    the thick axis, nnU-Net style), then z-scoring over the non-zero voxels (zeros stay zero, no clipping).
    No skull stripping, bias correction or registration.
    """
    image = load_image(img, name=input_name(img))
    orientation = nib.orientations.io_orientation(image.affine)
    ras = nib.orientations.apply_orientation(np.asarray(image.dataobj, dtype=np.float32), orientation)
    spacing = np.empty(3)
    spacing[orientation[:, 0].astype(int)] = voxel_sizes(image)
    crop = _nonzero_box(ras)
    cropped = ras[crop]
    thick_axis = _thick_axis(spacing)
    target = _target_shape(cropped.shape, spacing)
    data = _resize(cropped, target, order=3, thick_axis=thick_axis) if target != cropped.shape else cropped.copy()
    return MindGlideInput(data=_zscore_nonzero(data), image=image, orientation=orientation, ras_shape=ras.shape,
                          crop=crop, spacing=tuple(float(s) for s in spacing), thick_axis=thick_axis)


def _nonzero_box(data) -> tuple:
    nonzero = np.argwhere(data != 0)
    lo, hi = nonzero.min(axis=0), nonzero.max(axis=0) + 1
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _thick_axis(spacing) -> int | None:
    spacing = np.asarray(spacing, dtype=float)
    if spacing.max() / spacing.min() >= _ANISOTROPY_RATIO:
        return int(np.argmax(spacing))
    return None


def _target_shape(shape, spacing) -> tuple:
    return tuple(max(1, round(n * s / _TARGET_SPACING_MM)) for n, s in zip(shape, spacing))


def _resize(data, shape, order: int, thick_axis: int | None) -> np.ndarray:
    """Resize to ``shape`` with voxel edges aligned (like skimage ``resize``); nearest along ``thick_axis``."""
    data = np.asarray(data, dtype=np.float32)
    factors = [t / s for t, s in zip(shape, data.shape)]
    if thick_axis is None:
        return ndimage.zoom(data, factors, order=order, mode="nearest", grid_mode=True)
    in_plane = list(factors)
    in_plane[thick_axis] = 1.0
    data = ndimage.zoom(data, in_plane, order=order, mode="nearest", grid_mode=True)
    through = [1.0, 1.0, 1.0]
    through[thick_axis] = factors[thick_axis]
    return ndimage.zoom(data, through, order=0, mode="nearest", grid_mode=True)


def _zscore_nonzero(data) -> np.ndarray:
    out = data.astype(np.float32, copy=True)
    nonzero = out != 0
    if nonzero.any():
        values = out[nonzero]
        std = float(values.std())
        out[nonzero] = (values - float(values.mean())) / (std if std > 0 else 1.0)
    return out


# --------------------------------------------------------------------------------------------------- inference

def run_mindglide(image, net, sw_batch_size: int = 1, overlap: float = 0.5, progress=None,
                  keep_largest: bool = True) -> nib.Nifti1Image:
    """Segment one image with a MindGlide network, as MindGlide's ``run_inference`` does.

    Parameters
    ----------
    image : str, Path, nibabel image or MindGlideInput
        Any single-contrast brain MRI (T1w, T2w, FLAIR, ...), or the output of :func:`mindglide_preprocess`.
    net : torch.nn.Module
        From :func:`load_mindglide` (or any module mapping (B, 1, X, Y, Z) to (B, C, X, Y, Z) scores).
        It is run in eval mode under ``torch.inference_mode`` on its own device.
    sw_batch_size : int
        Windows per forward pass (MindGlide uses 4; 1 keeps memory low).
    overlap : float
        Sliding-window overlap (MindGlide: 0.5).
    progress : callable, optional
        ``progress(fraction, message)``; an exception raised from it stops the run.
    keep_largest : bool
        Keep only the largest connected component of the non-zero labels (MindGlide's default).

    Returns
    -------
    nibabel.Nifti1Image
        ``uint8`` MindGlide labels (:data:`MINDGLIDE_LABELS`) on the input's grid.
    """
    report = progress or (lambda fraction, message: None)
    report(0.0, "MindGlide: preprocessing")
    prepared = image if isinstance(image, MindGlideInput) else mindglide_preprocess(image)
    labels_1mm = _sliding_window_labels(prepared.data, net, sw_batch_size, overlap, report)
    report(0.9, "MindGlide: mapping labels back to the input grid")
    labels = _to_input_grid(labels_1mm, prepared)
    if keep_largest:
        labels = keep_largest_component(labels)
    report(1.0, "MindGlide: done")
    return nib.Nifti1Image(labels.astype(np.uint8), prepared.image.affine)


def _sliding_window_labels(data, net, sw_batch_size, overlap, report) -> np.ndarray:
    """Argmax labels of the sliding-window scores over a preprocessed array."""
    settings = dict(mindglide_window_settings(), overlap=overlap)
    n_calls = math.ceil(_n_windows(data.shape, settings["roi_size"], overlap) / sw_batch_size)
    done = [0]
    device = _device_of(net)

    def predictor(batch):
        scores = net(batch)
        done[0] += 1
        report(0.05 + 0.85 * min(done[0] / n_calls, 1.0), f"MindGlide: window batch {done[0]} of {n_calls}")
        return scores

    inferer = SlidingWindowInferer(sw_batch_size=sw_batch_size, **settings)
    was_training = getattr(net, "training", False)
    if isinstance(net, torch.nn.Module):
        net.eval()
    try:
        with torch.inference_mode():
            batch = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None].to(device)
            scores = inferer(batch, predictor)
            return torch.argmax(scores[0], dim=0).to(torch.uint8).cpu().numpy()
    finally:
        if isinstance(net, torch.nn.Module):
            net.train(was_training)


def _n_windows(shape, roi_size, overlap) -> int:
    """Number of windows MONAI's sliding window visits (same rule as ``sliding_window_inference``)."""
    size = [max(s, r) for s, r in zip(shape, roi_size)]
    interval = [r if r == s else max(int(r * (1 - overlap)), 1) for s, r in zip(size, roi_size)]
    return len(dense_patch_slices(size, roi_size, interval))


def _device_of(net):
    if isinstance(net, torch.nn.Module):
        for parameter in net.parameters():
            return parameter.device
    return torch.device("cpu")


def _to_input_grid(labels_1mm, prepared: MindGlideInput) -> np.ndarray:
    """Labels on the 1 mm grid -> cropped RAS grid (per-label linear resize, argmax) -> padded -> input axes."""
    cropped_shape = prepared.cropped_shape
    if labels_1mm.shape == cropped_shape:
        cropped = labels_1mm
    else:
        cropped = np.zeros(cropped_shape, dtype=np.uint8)
        best = np.full(cropped_shape, -np.inf, dtype=np.float32)
        for label in np.unique(labels_1mm):
            score = _resize(labels_1mm == label, cropped_shape, order=1, thick_axis=prepared.thick_axis)
            better = score > best
            cropped[better] = label
            best[better] = score[better]
    ras = np.zeros(prepared.ras_shape, dtype=np.uint8)
    ras[prepared.crop] = cropped
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), prepared.orientation)
    return np.ascontiguousarray(nib.orientations.apply_orientation(ras, back))


def keep_largest_component(labels) -> np.ndarray:
    """Labels with every voxel outside the largest connected (26-neighbour) non-zero component set to 0."""
    labels = np.asarray(labels)
    components, n = ndimage.label(labels != 0, structure=ndimage.generate_binary_structure(3, 3))
    if n <= 1:
        return labels.copy()
    largest = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
    return np.where(components == largest, labels, 0).astype(labels.dtype)
