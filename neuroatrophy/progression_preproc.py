"""BrLP's preprocessing of a raw T1w scan, and the map between MNI predictions and the subject.

BrLP (Puglisi et al. 2024) works on skull-stripped T1w images affinely registered to MNI152,
resampled to 1.5 mm (122 x 146 x 122) and centre-cropped to 120 x 144 x 120, WhiteStripe
normalised then min-max scaled to [0, 1]. The authors' chain is ANTs N4 -> SynthStrip -> ANTs
affine registration to ``MNI152_T1_1mm_brain`` -> WhiteStripe (``intensity-normalization``) ->
MONAI ``Spacing(1.5)``, ``ResizeWithPadOrCrop((120, 144, 120))``, ``ScaleIntensity(0, 1)``.
Here, in Python, without FreeSurfer or ANTs:

1. **N4** bias-field correction (SimpleITK), fitted on a shrunk grid as turboprep does (ANTs
   ``-s 3``; here shrink 4 and three fitting levels by default, which cuts its cost threefold).
2. **Skull stripping** with deepbet's shipped networks (CPU, seconds), or a given brain mask.
3. **Affine registration** of the brain to the MNI152 (ICBM 2009a) brain template by
   :func:`neuroatrophy.thalamus_preproc.register_to_template`.
4. **One trilinear resampling** of the masked brain straight onto BrLP's cropped 1.5 mm grid
   (:data:`BRLP_AFFINE`): the same samples as MONAI's ``Spacing`` then ``ResizeWithPadOrCrop``
   on a 1 mm MNI image, since both interpolate at the same world points.
5. **WhiteStripe** (Shinohara et al. 2014): z-score by the mean and SD of the voxels within
   +-5 % (quantile) of the white-matter mode, the last peak of the smoothed histogram of brain
   voxels; then per-volume **min-max** to [0, 1] (MONAI ``ScaleIntensity(minv=0, maxv=1)``),
   background at 0.

With a zero background and positive intensities, WhiteStripe followed by min-max reduces to
dividing by the brain's maximum (both are increasing affine maps of intensity), which is what
BrLP's networks saw in training; WhiteStripe's parameters are still kept for inspection.

:func:`to_native` and :func:`to_mni` map volumes between BrLP's grid and the subject's scan
through the stored affine transform. World coordinates are RAS millimetres (nibabel's).
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage, signal

from .io import atomic_write, package_data
from .thalamus_image import check_same_grid, input_name, load_image, load_label_image

__all__ = [
    "BRLP_AFFINE",
    "BRLP_SHAPE",
    "MNI152_1MM_AFFINE",
    "MNI152_1MM_SHAPE",
    "MNI152_1P5MM_AFFINE",
    "MNI152_1P5MM_SHAPE",
    "PreprocessedT1",
    "WhiteStripe",
    "check_mni_space",
    "deepbet_brain_mask",
    "mni_image",
    "mni_template",
    "n4_bias_correct",
    "pad_or_crop",
    "pad_or_crop_affine",
    "pad_or_crop_slices",
    "preprocess_t1",
    "register_brain",
    "scale_intensity",
    "to_mni",
    "to_native",
    "whitestripe",
]

#: FSL's MNI152 1 mm grid (``MNI152_T1_1mm_brain.nii.gz``, BrLP's registration target)
MNI152_1MM_SHAPE = (182, 218, 182)
MNI152_1MM_AFFINE = np.array([[-1.0, 0, 0, 90], [0, 1.0, 0, -126], [0, 0, 1.0, -72], [0, 0, 0, 1]])
#: that grid after MONAI ``Spacing(pixdim=1.5)`` (BrLP's ``const.MNI152_1P5MM_AFFINE``)
MNI152_1P5MM_SHAPE = (122, 146, 122)
MNI152_1P5MM_AFFINE = np.array([[-1.5, 0, 0, 90], [0, 1.5, 0, -126], [0, 0, 1.5, -72], [0, 0, 0, 1]])
#: BrLP's network input: the 1.5 mm grid centre-cropped by ``ResizeWithPadOrCrop``
BRLP_SHAPE = (120, 144, 120)

FORMAT_VERSION = 1
_JSON_NAME = "preprocessing.json"
_IMAGE_NAME = "t1_mni.nii.gz"
_MASK_NAME = "brain_mask_mni.nii.gz"


# ------------------------------------------------------------------ grids


def pad_or_crop_slices(shape, target) -> list[tuple[int, int, int]]:
    """Per axis ``(pad_before, pad_after, crop_start)`` of MONAI's ``ResizeWithPadOrCrop``.

    MONAI pads symmetrically first (``SpatialPad``: ``width // 2`` before, the rest after), then
    centre-crops (``CenterSpatialCrop``: start ``n // 2 - size // 2`` on the padded length ``n``).
    For 122 x 146 x 122 -> 120 x 144 x 120 this drops the first and the last voxel of each axis.
    """
    if len(shape) != len(target):
        raise ValueError(f"shape {tuple(shape)} and target {tuple(target)} have different dimensions")
    out = []
    for n, size in zip(shape, target):
        width = max(int(size) - int(n), 0)
        before, after = width // 2, width - width // 2
        padded = int(n) + width
        start = max(padded // 2 - int(size) // 2, 0)
        out.append((before, after, start))
    return out


def pad_or_crop_affine(affine, shape, target) -> np.ndarray:
    """The voxel-to-world affine of an image after :func:`pad_or_crop` to ``target``."""
    shift = np.array([start - before for before, _, start in pad_or_crop_slices(shape, target)], dtype=float)
    out = np.array(affine, dtype=float)
    out[:3, 3] = out[:3, :3] @ shift + out[:3, 3]
    return out


def pad_or_crop(array, target, value=None) -> np.ndarray:
    """``ResizeWithPadOrCrop(spatial_size=target, mode="minimum")`` of a 3-D array.

    ``value`` is the padding value (default: the array's minimum, MONAI's ``mode="minimum"``).
    The inverse of a crop is a pad with the same call (and vice versa), as BrLP uses it.
    """
    array = np.asarray(array)
    plan = pad_or_crop_slices(array.shape, target)
    if any(before or after for before, after, _ in plan):
        fill = array.min() if value is None else value
        array = np.pad(array, [(before, after) for before, after, _ in plan], constant_values=fill)
    return array[tuple(slice(start, start + int(size)) for (_, _, start), size in zip(plan, target))]


#: voxel-to-world affine of BrLP's (120, 144, 120) input: MNI152_1P5MM_AFFINE shifted by one voxel
BRLP_AFFINE = pad_or_crop_affine(MNI152_1P5MM_AFFINE, MNI152_1P5MM_SHAPE, BRLP_SHAPE)


def mni_image(volume, dtype=np.float32) -> nib.Nifti1Image:
    """A NIfTI image of a volume on BrLP's grid: (120, 144, 120) or the uncropped (122, 146, 122)."""
    volume = np.asarray(volume)
    affine = _mni_grid_affine(volume.shape, "volume")
    return nib.Nifti1Image(volume.astype(dtype), affine)


def _mni_grid_affine(shape, name) -> np.ndarray:
    if tuple(shape) == BRLP_SHAPE:
        return BRLP_AFFINE.copy()
    if tuple(shape) == MNI152_1P5MM_SHAPE:
        return MNI152_1P5MM_AFFINE.copy()
    raise ValueError(f"{name}: expected a volume of shape {BRLP_SHAPE} (BrLP's grid) or {MNI152_1P5MM_SHAPE} "
                     f"(MNI152 at 1.5 mm), got {tuple(shape)}; pass a NIfTI image to use its own affine")


# ------------------------------------------------------------------ resampling


def _resample(data, data_affine, out_shape, out_affine, out_to_data_world, order: int, cval: float = 0.0):
    """Sample ``data`` at the points of the output grid (mapped into its world by ``out_to_data_world``).

    Slab by slab along the last axis, so a 256^3 native grid costs tens of MB, not GBs.
    """
    data = np.asarray(data)
    voxel_map = np.linalg.inv(np.asarray(data_affine, float)) @ np.asarray(out_to_data_world, float) \
        @ np.asarray(out_affine, float)
    is_bool = data.dtype == bool
    source = data.astype(np.uint8) if is_bool else data
    out_dtype = np.float32 if order > 0 else source.dtype
    out = np.empty(tuple(out_shape), dtype=out_dtype)
    nx, ny, nz = out.shape
    # x fastest, then y, so one slab of values reshapes to (z, y, x)
    ij = np.indices((ny, nx), dtype=np.float64).reshape(2, -1)[::-1]
    step = max(1, 2_000_000 // max(nx * ny, 1))
    for k0 in range(0, nz, step):
        k = np.arange(k0, min(k0 + step, nz), dtype=np.float64)
        grid = np.vstack([np.tile(ij, len(k)), np.repeat(k, nx * ny)])
        coords = voxel_map[:3, :3] @ grid + voxel_map[:3, 3:4]
        values = ndimage.map_coordinates(source, coords, order=order, mode="constant", cval=cval,
                                         output=out_dtype)
        out[:, :, k0:k0 + len(k)] = values.reshape(len(k), ny, nx).transpose(2, 1, 0)
    return out.astype(bool) if is_bool else out


_ORDERS = {"linear": 1, "nearest": 0}


def _order(interpolation) -> int:
    if interpolation not in _ORDERS:
        raise ValueError(f"interpolation must be one of {sorted(_ORDERS)}, got {interpolation!r}")
    return _ORDERS[interpolation]


# ------------------------------------------------------------------ the template


@functools.lru_cache(maxsize=1)
def _template_1mm() -> nib.Nifti1Image:
    path = package_data("nilearn", "datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                        needed_for="the MNI152 brain template")
    img = nib.load(str(path))
    return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)


@functools.lru_cache(maxsize=1)
def _template_on_grid() -> tuple[np.ndarray, np.ndarray]:
    tpl = _template_1mm()
    image = _resample(np.asarray(tpl.dataobj), tpl.affine, BRLP_SHAPE, BRLP_AFFINE, np.eye(4), order=1)
    return image, image > 0.05 * float(image.max())


def mni_template() -> tuple[np.ndarray, np.ndarray]:
    """nilearn's MNI152 (ICBM 2009a) brain on BrLP's grid: ``(image, brain_mask)``, copies."""
    image, mask = _template_on_grid()
    return image.copy(), mask.copy()


#: smoothing (voxels of 1.5 mm) before the MNI-space check: it discounts individual anatomy, not position
_CHECK_SIGMA = 2.0
#: below this correlation with the template an image is not in MNI space. Measured on Colin27
#: (a 1 mm scan in MNI space): 0.88 as it is, 0.75 / 0.57 / 0.36 shifted by 5 / 10 / 20 mm
MNI_CORRELATION_MIN = 0.7


@functools.lru_cache(maxsize=1)
def _smoothed_template() -> np.ndarray:
    return ndimage.gaussian_filter(_template_on_grid()[0], _CHECK_SIGMA)


def _template_correlation(image: np.ndarray) -> float:
    """Correlation of a smoothed volume on BrLP's grid with the smoothed template, in the template's brain."""
    mask = _template_on_grid()[1]
    a = ndimage.gaussian_filter(np.asarray(image, dtype=np.float32), _CHECK_SIGMA)[mask].astype(np.float64)
    b = _smoothed_template()[mask].astype(np.float64)
    if a.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def check_mni_space(img, name: str = "image", min_correlation: float = MNI_CORRELATION_MIN) -> float:
    """Check that an image lies in MNI152 space as its affine says; returns the correlation.

    The image is sampled on BrLP's grid through its own affine, both it and the MNI152 template are
    smoothed (3 mm) and correlated inside the template's brain; ``ValueError`` naming ``name``
    below ``min_correlation`` (0.7 rejects shifts beyond about 7 mm).
    """
    img = load_image(img, name=name)
    sampled = _resample(np.asarray(img.dataobj), img.affine, BRLP_SHAPE, BRLP_AFFINE, np.eye(4), order=1)
    r = _template_correlation(sampled)
    if not r >= min_correlation:
        raise ValueError(f"{name} does not look like an image in MNI152 space: its correlation with the MNI152 "
                         f"template is {r:.2f} (expected >= {min_correlation}); preprocess it with register=True")
    return r


# ------------------------------------------------------------------ steps


def n4_bias_correct(img, shrink: int = 4, iterations=(50, 50, 50), mask=None) -> nib.Nifti1Image:
    """N4 bias-field correction (SimpleITK), fitted on a grid shrunk by ``shrink``.

    The field is fitted inside ``mask`` (default: the Otsu foreground, i.e. the head) on the
    shrunk grid, as ANTs ``N4BiasFieldCorrection -s 3`` does in turboprep, then evaluated at full
    resolution and divided out. ``iterations`` gives the fitting levels (each doubles the B-spline
    mesh; SimpleITK's convergence threshold 0.001 usually stops a level early). Returns a float32
    image on the input's grid.
    """
    import SimpleITK as sitk

    from .thalamus_preproc import to_sitk

    img = load_image(img, name=input_name(img, "T1 image"))
    data = np.asarray(img.dataobj, dtype=np.float32)
    image = to_sitk(img)
    if mask is None:
        head = sitk.OtsuThreshold(image, 0, 1, 200)
    else:
        head = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(mask, np.uint8).transpose(2, 1, 0)))
        head.CopyInformation(image)
    head = sitk.And(head, sitk.Cast(image > 0, sitk.sitkUInt8))  # N4 works on log intensities
    factors = [max(1, int(shrink))] * 3
    small, small_mask = sitk.Shrink(image, factors), sitk.Shrink(head, factors)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
    n4.Execute(small, small_mask)
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image)).transpose(2, 1, 0)
    corrected = data / np.exp(log_field).astype(np.float32)
    return nib.Nifti1Image(corrected.astype(np.float32), img.affine)


@functools.lru_cache(maxsize=1)
def _deepbet_model():
    try:
        import torch  # noqa: F401
        from deepbet import BrainExtraction
    except ImportError as exc:
        raise ImportError(
            f"skull_strip='deepbet' needs the deepbet package and its dependencies ({exc}): pip install "
            "deepbet --no-deps connected-components-3d fill_voids tqdm torch pandas; or pass skull_strip='none' "
            "for a brain-extracted image, or a brain mask") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return BrainExtraction(no_gpu=True)


def deepbet_brain_mask(img, threshold: float = 0.5) -> np.ndarray:
    """Brain mask of a T1w image by deepbet 1.0.2's shipped networks (CPU; bool, on the image's grid).

    deepbet (Fisch et al. 2024) locates the brain on a 128^3 copy, then segments its bounding
    box at 256^3; the mask keeps the largest component with holes filled.
    """
    img = load_image(img, name=input_name(img, "T1 image"))
    model = _deepbet_model()
    _, mask, _ = model.run(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine),
                           threshold=threshold)
    mask = np.asarray(mask.dataobj) > 0
    if mask.shape != img.shape[:3]:
        raise RuntimeError(f"deepbet returned a mask of shape {mask.shape} for an image of shape {img.shape}")
    return mask


def register_brain(brain_img, seed: int = 0, cancel=None) -> np.ndarray:
    """Affine native -> MNI map (4x4, RAS mm) of a skull-stripped brain, by registration to the template.

    Uses :func:`neuroatrophy.thalamus_preproc.register_to_template` (Mattes mutual information,
    rigid then affine, SimpleITK) against nilearn's MNI152 brain at 2 mm. A brain's centre of
    mass is the template's, so one starting position suffices.
    """
    from .thalamus_preproc import register_to_template

    registration = register_to_template(brain_img, offsets_mm=(0.0,), seed=seed, cancel=cancel)
    return registration.scan_to_template


@dataclass
class WhiteStripe:
    """WhiteStripe parameters: ``mu``, ``sigma`` of the stripe, the WM ``mode``, stripe bounds, size."""

    mu: float
    sigma: float
    mode: float
    lower: float
    upper: float
    n_voxels: int

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("mu", "sigma", "mode", "lower", "upper", "n_voxels")}


def _last_mode(values: np.ndarray, tail: float = 0.96, bins: int = 256) -> float:
    """The highest-intensity peak of the smoothed histogram (values above the ``tail`` quantile dropped)."""
    low, high = np.quantile(values, [0.0, tail])
    if high <= low:
        return float(high)
    counts, edges = np.histogram(values[values <= high], bins=bins, range=(low, high))
    smooth = ndimage.gaussian_filter1d(counts.astype(float), sigma=bins / 64, mode="nearest")
    peaks, _ = signal.find_peaks(np.concatenate([[0.0], smooth, [0.0]]), prominence=0.05 * smooth.max())
    centres = 0.5 * (edges[:-1] + edges[1:])
    index = peaks[-1] - 1 if len(peaks) else int(np.argmax(smooth))
    return float(centres[index])


def whitestripe(image, mask, width: float = 0.05) -> WhiteStripe:
    """WhiteStripe (Shinohara et al. 2014) for a T1w image: the normal-appearing white matter stripe.

    The WM mode is the last (highest-intensity) peak of the smoothed histogram of brain voxels
    (``mask``); the stripe holds the brain voxels within ``width`` (as a quantile) either side of
    the mode's quantile. Normalise with ``(image - mu) / sigma``.
    """
    image = np.asarray(image, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != image.shape:
        raise ValueError(f"brain mask of shape {mask.shape} does not match the image's {image.shape}")
    values = image[mask]
    if values.size < 100:
        raise ValueError(f"WhiteStripe: the brain mask holds {values.size} voxels; it needs a brain")
    mode = _last_mode(values)
    q = float(np.mean(values < mode))
    lower, upper = np.quantile(values, [max(q - width, 0.0), min(q + width, 1.0)])
    stripe = values[(values > lower) & (values < upper)]
    if stripe.size < 10 or stripe.std() == 0:
        raise ValueError("WhiteStripe: no white-matter stripe found (is the image a T1w brain?)")
    return WhiteStripe(float(stripe.mean()), float(stripe.std()), mode, float(lower), float(upper), int(stripe.size))


def scale_intensity(volume) -> np.ndarray:
    """Per-volume min-max to [0, 1] as MONAI ``ScaleIntensity(minv=0, maxv=1)`` (float32)."""
    volume = np.asarray(volume, dtype=np.float64)
    low, high = float(volume.min()), float(volume.max())
    if high == low:
        return np.zeros(volume.shape, np.float32)
    return ((volume - low) / (high - low)).astype(np.float32)


# ------------------------------------------------------------------ result


@dataclass
class PreprocessedT1:
    """A T1w scan on BrLP's grid, with what is needed to map volumes back to the subject.

    Attributes
    ----------
    image : (120, 144, 120) float32 array in [0, 1], background 0
    brain_mask : (120, 144, 120) bool array
    native_to_mni : (4, 4) affine map of native world points (RAS mm) to MNI152 points
    native_shape, native_affine : the scan's voxel grid
    source : a name for the scan (its file name)
    affine : voxel-to-world (MNI) affine of ``image`` (:data:`BRLP_AFFINE`)
    whitestripe : WhiteStripe parameters (intensities of the N4-corrected scan) and ``wm_level``,
        where the stripe's mean lies in ``image``'s [0, 1] scale
    settings : how it was made (n4, skull_strip, register, seed, template)
    """

    image: np.ndarray
    brain_mask: np.ndarray
    native_to_mni: np.ndarray
    native_shape: tuple
    native_affine: np.ndarray
    source: str = "T1"
    affine: np.ndarray = field(default_factory=lambda: BRLP_AFFINE.copy())
    whitestripe: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        self.image = np.asarray(self.image, dtype=np.float32)
        self.brain_mask = np.asarray(self.brain_mask, dtype=bool)
        self.native_to_mni = np.asarray(self.native_to_mni, dtype=float)
        self.native_affine = np.asarray(self.native_affine, dtype=float)
        self.native_shape = tuple(int(n) for n in self.native_shape)
        self.affine = np.asarray(self.affine, dtype=float)
        for name, array in (("image", self.image), ("brain_mask", self.brain_mask)):
            if array.shape != BRLP_SHAPE:
                raise ValueError(f"{self.source}: {name} must have shape {BRLP_SHAPE}, got {array.shape}")
        for name, matrix in (("native_to_mni", self.native_to_mni), ("native_affine", self.native_affine),
                             ("affine", self.affine)):
            if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix[:3, :3])) < 1e-9:
                raise ValueError(f"{self.source}: {name} must be an invertible 4x4 affine")
        if len(self.native_shape) != 3:
            raise ValueError(f"{self.source}: native_shape must have 3 dimensions, got {self.native_shape}")
        if not np.allclose(self.affine, BRLP_AFFINE, atol=1e-4):
            raise ValueError(f"{self.source}: affine must be BrLP's grid affine (BRLP_AFFINE), "
                             f"got {self.affine.tolist()}")

    @property
    def mni_to_native(self) -> np.ndarray:
        """The inverse map: MNI152 points to the scan's world points."""
        return np.linalg.inv(self.native_to_mni)

    @property
    def volume_scale(self) -> float:
        """|det| of the native -> MNI linear part: a volume in MNI mm^3 = native mm^3 x volume_scale."""
        return float(abs(np.linalg.det(self.native_to_mni[:3, :3])))

    def native_to_mni_sitk(self):
        """The native -> MNI map as a SimpleITK ``AffineTransform`` (LPS points, as ITK uses them).

        ITK resampling pulls values, so resampling a native image onto an MNI grid takes the
        inverse (``.GetInverse()``).
        """
        import SimpleITK as sitk

        lps = np.diag([-1.0, -1.0, 1.0, 1.0])
        matrix = lps @ self.native_to_mni @ lps
        transform = sitk.AffineTransform(3)
        transform.SetMatrix([float(v) for v in matrix[:3, :3].ravel()])
        transform.SetTranslation([float(v) for v in matrix[:3, 3]])
        return transform

    def native_reference(self) -> nib.Nifti1Image:
        """An empty image on the scan's grid (for :func:`to_native` and viewers)."""
        return nib.Nifti1Image(np.zeros(self.native_shape, np.uint8), self.native_affine)

    def mni_image(self) -> nib.Nifti1Image:
        """``image`` as a NIfTI image in MNI152 space."""
        return nib.Nifti1Image(self.image, self.affine)

    # ---------------------------------------------------------- files

    def save(self, folder) -> Path:
        """Write ``t1_mni.nii.gz``, ``brain_mask_mni.nii.gz`` and ``preprocessing.json`` into ``folder``.

        Each file is written atomically; the JSON is written last and holds the SHA-256 of the
        images, so :meth:`load` detects a folder whose images were replaced by a later, unfinished
        save. Other files in the folder are left alone.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        digests = {}
        for name, img in ((_IMAGE_NAME, nib.Nifti1Image(self.image, self.affine)),
                          (_MASK_NAME, nib.Nifti1Image(self.brain_mask.astype(np.uint8), self.affine))):
            with atomic_write(folder / name) as tmp:
                img.to_filename(str(tmp))
                digests[name] = _sha256(tmp)
        record = {
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "grid": {"shape": list(BRLP_SHAPE), "affine": self.affine.tolist()},
            "native_to_mni": self.native_to_mni.tolist(),
            "volume_scale": self.volume_scale,
            "native_shape": list(self.native_shape),
            "native_affine": self.native_affine.tolist(),
            "whitestripe": self.whitestripe,
            "settings": self.settings,
            "files": {"image": _IMAGE_NAME, "brain_mask": _MASK_NAME},
            "sha256": digests,
        }
        with atomic_write(folder / _JSON_NAME) as tmp:
            tmp.write_text(json.dumps(record, indent=2))
        return folder

    @classmethod
    def load(cls, folder) -> PreprocessedT1:
        """Read a folder written by :meth:`save`; ``ValueError`` naming the file if it is inconsistent."""
        folder = Path(folder)
        path = folder / _JSON_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no {_JSON_NAME} (not a preprocessed T1 folder)")
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: unreadable JSON: {exc}") from exc
        if record.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported format_version {record.get('format_version')!r}")
        arrays = {}
        for key, name in (("image", _IMAGE_NAME), ("brain_mask", _MASK_NAME)):
            file = folder / name
            if not file.is_file():
                raise FileNotFoundError(f"{folder}: {name} is missing")
            if _sha256(file) != record["sha256"][name]:
                raise ValueError(f"{file} does not match {path} (changed or an unfinished save)")
            img = nib.load(str(file))
            arrays[key] = np.asarray(img.dataobj)
            if not np.allclose(img.affine, record["grid"]["affine"], atol=1e-4):
                raise ValueError(f"{file}: its affine is not the one in {path}")
        return cls(image=arrays["image"].astype(np.float32), brain_mask=arrays["brain_mask"] > 0,
                   native_to_mni=np.array(record["native_to_mni"]), native_shape=tuple(record["native_shape"]),
                   native_affine=np.array(record["native_affine"]), source=record.get("source", "T1"),
                   affine=np.array(record["grid"]["affine"]), whitestripe=record.get("whitestripe", {}),
                   settings=record.get("settings", {}))


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------ pipeline


def _brain_mask(img, skull_strip, name: str) -> tuple[np.ndarray, str]:
    """The native brain mask for ``skull_strip`` and a description of how it was made."""
    if isinstance(skull_strip, str) and skull_strip in ("deepbet", "none"):
        if skull_strip == "deepbet":
            return deepbet_brain_mask(img), "deepbet"
        # an already brain-extracted scan: the brain is what differs from the background value
        data = np.asarray(img.dataobj)
        return ndimage.binary_fill_holes(data > data.min()), "none"
    is_path = isinstance(skull_strip, Path) or (isinstance(skull_strip, str) and (
        Path(skull_strip).exists() or any(c in skull_strip for c in "/\\.")))
    if not is_path and not hasattr(skull_strip, "dataobj"):
        raise ValueError(f"skull_strip must be 'deepbet', 'none' or a brain-mask image (path or nibabel image), "
                         f"got {skull_strip!r}")
    mask_name = input_name(skull_strip, "brain mask")
    mask_img = load_label_image(skull_strip, name=mask_name)
    check_same_grid(mask_img, img, mask_name, name)
    return np.asarray(mask_img.dataobj) > 0, f"mask:{Path(mask_name).name}"


def _report(progress, fraction: float, message: str) -> None:
    if progress is not None:
        progress(float(fraction), message)


def preprocess_t1(t1, *, n4=True, skull_strip="deepbet", register: bool = True, progress=None,
                  seed: int = 0, name: str | None = None) -> PreprocessedT1:
    """BrLP's preprocessing of a T1w scan (see the module docstring).

    Parameters
    ----------
    t1 : path or nibabel image
        A 3-D T1w scan (any orientation and resolution; skull allowed).
    n4 : bool or dict
        N4 bias-field correction (off for an image already corrected); a dict passes options to
        :func:`n4_bias_correct` (``shrink``, ``iterations``).
    skull_strip : "deepbet", "none" or a brain-mask image (path or nibabel, on the scan's grid)
        "none" means the scan is already brain-extracted (background = its minimum).
    register : bool
        Affine registration to MNI152. ``False`` accepts a scan already in MNI152 space after
        checking that it is (:func:`check_mni_space`); for a turboprep / BrLP-preprocessed
        182 x 218 x 182 image pass ``n4=False, skull_strip="none", register=False``.
    progress : callable(fraction, message), optional
        Raising :class:`neuroatrophy.parallel.Cancelled` from it stops the preprocessing.
    seed : int
        Seed of the registration's metric sampling (results are reproducible).
    name : str, optional
        The scan's name in messages and in ``source`` (default: its file name).
    """
    name = name or input_name(t1, "T1 image")
    _report(progress, 0.0, f"Loading {Path(name).name}")
    img = load_image(t1, name=name)
    data = np.asarray(img.dataobj, dtype=np.float32)
    if not isinstance(n4, (bool, dict)):
        raise ValueError(f"n4 must be True, False or a dict of n4_bias_correct options, got {n4!r}")
    settings = {"n4": n4 if isinstance(n4, dict) else bool(n4), "register": bool(register), "seed": int(seed)}
    if n4 is not False:
        _report(progress, 0.02, "N4 bias-field correction")
        img = n4_bias_correct(img, **(n4 if isinstance(n4, dict) else {}))
        data = np.asarray(img.dataobj, dtype=np.float32)
    _report(progress, 0.3, "Skull stripping")
    mask, settings["skull_strip"] = _brain_mask(img, skull_strip, name)
    if not mask.any():
        raise ValueError(f"{name}: the brain mask is empty (skull_strip={settings['skull_strip']!r})")
    # background value: 0 for a raw scan (BrLP's skull-stripped images), the minimum if negative
    background = min(0.0, float(data.min()))
    brain = np.where(mask, data, background).astype(np.float32)
    brain_img = nib.Nifti1Image(brain, img.affine)
    if register:
        _report(progress, 0.45, "Registration to MNI152")
        native_to_mni = register_brain(brain_img, seed=seed,
                                       cancel=lambda: _report(progress, 0.6, "Registration to MNI152"))
    else:
        native_to_mni = np.eye(4)
    _report(progress, 0.9, "Resampling to MNI152 1.5 mm")
    mni_to_native = np.linalg.inv(native_to_mni)
    image = _resample(brain, img.affine, BRLP_SHAPE, BRLP_AFFINE, mni_to_native, order=1, cval=background)
    mask_mni = _resample(mask.astype(np.float32), img.affine, BRLP_SHAPE, BRLP_AFFINE, mni_to_native,
                         order=1) >= 0.5
    if not mask_mni.any():
        raise ValueError(f"{name}: no brain voxel lands on the MNI152 grid (registration failed?)")
    if not register:
        r = _template_correlation(np.where(mask_mni, image, background))
        if not r >= MNI_CORRELATION_MIN:
            raise ValueError(f"{name} does not look like an image in MNI152 space (register=False): its correlation "
                             f"with the MNI152 template is {r:.2f} (expected >= {MNI_CORRELATION_MIN}); "
                             "use register=True")
    _report(progress, 0.95, "WhiteStripe normalisation")
    ws = whitestripe(image, mask_mni)
    z = (image.astype(np.float64) - ws.mu) / ws.sigma
    scaled = scale_intensity(z)
    scaled[~mask_mni] = 0.0
    z_low, z_high = float(z.min()), float(z.max())
    stats = ws.to_dict() | {"wm_level": (0.0 - z_low) / (z_high - z_low)}
    settings["template"] = "MNI152 ICBM 2009a symmetric (nilearn)"
    result = PreprocessedT1(image=scaled, brain_mask=mask_mni, native_to_mni=native_to_mni,
                            native_shape=img.shape[:3], native_affine=img.affine, source=Path(name).name,
                            whitestripe=stats, settings=settings)
    _report(progress, 1.0, "Preprocessing done")
    return result


# ------------------------------------------------------------------ native <-> MNI


def to_native(mni_volume, pre: PreprocessedT1, interpolation: str = "linear") -> nib.Nifti1Image:
    """Resample a volume in MNI152 space onto the subject's native grid.

    ``mni_volume``: an array on BrLP's grid (120, 144, 120), the uncropped 1.5 mm grid
    (122, 146, 122), or a nibabel image in MNI152 space (its own affine). Voxels outside it get 0.
    ``"nearest"`` keeps the dtype (for labels and masks); ``"linear"`` returns float32.
    """
    order = _order(interpolation)
    if hasattr(mni_volume, "dataobj"):
        data, affine = np.asarray(mni_volume.dataobj), np.asarray(mni_volume.affine, float)
        if data.ndim != 3:
            raise ValueError(f"{input_name(mni_volume, 'MNI volume')}: expected a 3-D image, got shape {data.shape}")
    else:
        data = np.asarray(mni_volume)
        affine = _mni_grid_affine(data.shape, "MNI volume")
    if order > 0:
        data = data.astype(np.float32)
    out = _resample(data, affine, pre.native_shape, pre.native_affine, pre.native_to_mni, order=order)
    return nib.Nifti1Image(out.astype(np.uint8) if out.dtype == bool else out, pre.native_affine)


def to_mni(native_img, pre: PreprocessedT1, interpolation: str = "linear") -> np.ndarray:
    """Resample an image of the subject (any grid in its native world) onto BrLP's MNI grid.

    Returns a (120, 144, 120) array: float32 for ``"linear"``; for ``"nearest"`` (label maps, masks)
    int32 labels, or bool for an in-memory bool image.
    """
    order = _order(interpolation)
    name = input_name(native_img, "native image")
    img = load_image(native_img, name=name, allow_constant=True) if order > 0 else _load_any(native_img, name)
    data = np.asarray(img.dataobj)
    return _resample(data, img.affine, BRLP_SHAPE, BRLP_AFFINE, pre.mni_to_native, order=order)


def _load_any(image, name):
    """A 3-D image with its dtype kept (labels, masks)."""
    if hasattr(image, "dataobj") and np.asarray(image.dataobj).dtype == bool:
        return image
    return load_label_image(image, name=name)
