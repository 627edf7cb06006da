"""Reading and checking 3-D images for thalamus segmentation and evaluation.

Every function accepts a path (NIfTI ``.nii``/``.nii.gz``, FreeSurfer ``.mgz``/``.mgh``, anything
nibabel reads) or an already loaded nibabel image, and names that input in its errors.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["load_image", "load_label_image", "same_grid", "check_same_grid", "voxel_sizes", "input_name"]


def input_name(image, default: str = "image") -> str:
    """A name for an input in messages: its file name, or ``default``."""
    if isinstance(image, (str, Path)):
        return str(image)
    filename = getattr(image, "get_filename", lambda: None)()
    return filename or default


def _read(image, name: str):
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.exists():
            raise FileNotFoundError(f"{name}: file not found: {path}")
        try:
            return nib.load(str(path))
        except Exception as exc:  # nibabel raises many types for unreadable files
            raise ValueError(f"{name}: could not read {path} as an image: {exc}") from exc
    if not hasattr(image, "affine") or not hasattr(image, "dataobj"):
        raise ValueError(f"{name}: expected a file path or a nibabel image, got {type(image).__name__}")
    return image


def _as_3d(img, name: str) -> np.ndarray:
    data = np.asarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{name}: expected a 3-D image, got shape {data.shape}")
    if min(data.shape) < 2:
        raise ValueError(f"{name}: image of shape {data.shape} is not a 3-D volume (a 2-D slice?)")
    return data


def load_image(image, name: str | None = None, allow_constant: bool = False) -> nib.Nifti1Image:
    """Load and check one 3-D intensity image; returns a float32 NIfTI image.

    Raises ``ValueError`` naming the input for a file nibabel cannot read, a 2-D or 4-D image,
    non-finite values, an empty (all-zero) or constant image, or a singular affine.
    """
    name = name or input_name(image)
    img = _read(image, name)
    data = _as_3d(img, name)
    if not np.issubdtype(data.dtype, np.number) and data.dtype != bool:
        raise ValueError(f"{name}: non-numeric image data ({data.dtype})")
    data = data.astype(np.float32)
    n_bad = int(np.count_nonzero(~np.isfinite(data)))
    if n_bad:
        raise ValueError(f"{name}: {n_bad} voxels are NaN or infinite")
    if not allow_constant:
        if not np.any(data):
            raise ValueError(f"{name}: the image is empty (all voxels are zero)")
        if float(data.max()) == float(data.min()):
            raise ValueError(f"{name}: the image is constant ({float(data.min())})")
    affine = _checked_affine(img, name)
    return nib.Nifti1Image(data, affine)


def load_label_image(image, name: str | None = None) -> nib.Nifti1Image:
    """Load and check one 3-D label map (integer values); returns an int32 NIfTI image."""
    name = name or input_name(image)
    img = _read(image, name)
    data = _as_3d(img, name)
    if data.dtype == bool:
        data = data.astype(np.int32)
    if not np.issubdtype(data.dtype, np.number):
        raise ValueError(f"{name}: non-numeric label data ({data.dtype})")
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{name}: label map holds NaN or infinite values")
    rounded = np.rint(data)
    if not np.array_equal(rounded, data):
        raise ValueError(f"{name}: label map holds non-integer values (is it an intensity image?)")
    return nib.Nifti1Image(rounded.astype(np.int32), _checked_affine(img, name))


def _checked_affine(img, name: str) -> np.ndarray:
    affine = np.asarray(img.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"{name}: the image's affine (voxel-to-world matrix) is missing or singular")
    return affine


def voxel_sizes(img) -> np.ndarray:
    """Voxel edge lengths in mm (from the affine's column norms)."""
    return np.sqrt((np.asarray(img.affine)[:3, :3] ** 2).sum(axis=0))


def same_grid(a, b, atol: float = 1e-3) -> bool:
    """True if two images have the same shape and (to ``atol`` mm) the same voxel-to-world affine."""
    return tuple(a.shape[:3]) == tuple(b.shape[:3]) and np.allclose(a.affine, b.affine, atol=atol)


def check_same_grid(a, b, name_a: str, name_b: str, atol: float = 1e-3) -> None:
    """Raise ``ValueError`` naming both inputs if they are not on the same voxel grid."""
    if tuple(a.shape[:3]) != tuple(b.shape[:3]):
        raise ValueError(f"{name_a} (shape {tuple(a.shape[:3])}) and {name_b} (shape {tuple(b.shape[:3])}) "
                         "are not on the same voxel grid")
    if not np.allclose(a.affine, b.affine, atol=atol):
        diff = float(np.abs(np.asarray(a.affine) - np.asarray(b.affine)).max())
        raise ValueError(f"{name_a} and {name_b} have the same shape but different voxel-to-world affines "
                         f"(max difference {diff:.3g}); resample one onto the other's grid first")
