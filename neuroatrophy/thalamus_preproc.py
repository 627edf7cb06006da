"""Preprocessing of raw scans for thalamus segmentation, and mapping results back.

1. **Registration**: an affine transform from the MNI template (nilearn's ICBM 2009a T1, 2 mm)
   to the scan, by SimpleITK (Mattes mutual information, so any contrast works; rigid then
   affine, three resolution levels). Several starting positions are tried along the
   head-foot axis because a full-head scan's centre of mass sits well below the brain's.
2. **Field of view**: the scan is resampled once (trilinear) onto the network's box in MNI space
   (:data:`~neuroatrophy.thalamus_synth.THALAMUS_BOX`, 1 mm), which also reorients it and sets
   its resolution. A scan finer than 1 mm is smoothed first so that it does not alias.
3. **Back to native**: class probabilities on the box are interpolated back onto the scan's own
   voxel grid through the same transform, and labels are taken there, so the result lies on the
   input's grid whatever its orientation and resolution.

World coordinates here are RAS (nibabel's); SimpleITK's LPS is converted at its boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from .io import package_data
from .thalamus_image import voxel_sizes
from .thalamus_synth import THALAMUS_BOX, box_affine, normalize_intensity

__all__ = ["Registration", "register_to_template", "template_image", "crop_to_box", "box_to_native", "to_sitk"]

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def to_sitk(img):
    """A SimpleITK image (float32, LPS geometry) of a 3-D nibabel image."""
    import SimpleITK as sitk

    data = np.asarray(img.dataobj, dtype=np.float32)
    out = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    affine = _LPS @ np.asarray(img.affine, dtype=float)
    spacing = voxel_sizes(img)
    out.SetSpacing([float(s) for s in spacing])
    out.SetOrigin([float(v) for v in affine[:3, 3]])
    out.SetDirection([float(v) for v in (affine[:3, :3] / spacing).ravel()])
    return out


def template_image() -> nib.Nifti1Image:
    """The registration target: nilearn's MNI152 (ICBM 2009a symmetric) T1, brain, at 2 mm.

    Read from the nilearn wheel's data file with nibabel (importing ``nilearn.datasets`` costs
    seconds) and block-averaged from 1 mm to 2 mm.
    """
    img = nib.load(str(package_data("nilearn", "datasets", "data", _TEMPLATE_FILE,
                                    needed_for="the registration template")))
    data = np.asarray(img.dataobj, dtype=np.float32)
    shape = (np.asarray(data.shape) // 2) * 2
    data = data[: shape[0], : shape[1], : shape[2]]
    data = data.reshape(shape[0] // 2, 2, shape[1] // 2, 2, shape[2] // 2, 2).mean(axis=(1, 3, 5))
    affine = img.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = img.affine[:3, :3] @ np.full(3, 0.5) + img.affine[:3, 3]  # centre of the first 2x2x2 block
    return nib.Nifti1Image(data, affine)


_TEMPLATE_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


@dataclass
class Registration:
    """Affine map from template (MNI) world coordinates to the scan's world coordinates (RAS, mm).

    ``metric`` is the final Mattes mutual information (lower is better), comparable between
    the starting positions of one scan only.
    """

    template_to_scan: np.ndarray
    metric: float

    @property
    def scan_to_template(self) -> np.ndarray:
        return np.linalg.inv(self.template_to_scan)


def _itk_affine_to_ras(transform) -> np.ndarray:
    """4x4 RAS matrix of a SimpleITK (fixed -> moving point) affine/rigid transform."""
    import SimpleITK as sitk

    t = sitk.AffineTransform(3)
    t.SetMatrix(transform.GetMatrix())
    t.SetTranslation(transform.GetTranslation())
    t.SetCenter(transform.GetCenter())
    matrix = np.asarray(t.GetMatrix()).reshape(3, 3)
    center = np.asarray(t.GetCenter())
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = np.asarray(t.GetTranslation()) + center - matrix @ center
    return _LPS @ lps @ _LPS


def _prepare_moving(img) -> "object":
    """Smooth and subsample the scan to about 2 mm: registration runs at 2 mm and coarser."""
    import SimpleITK as sitk

    moving = to_sitk(img)
    spacing = np.asarray(moving.GetSpacing())
    factors = [max(1, int(round(2.0 / s))) for s in spacing]
    if max(factors) > 1:
        sigma = [0.5 * f * s for f, s in zip(factors, spacing)]
        moving = sitk.SmoothingRecursiveGaussian(moving, sigma)
        moving = sitk.Shrink(moving, factors)
    return moving


#: registration schedule: (shrink factors of the 2 mm template, smoothing sigmas in mm,
#: iterations, sampling fraction) per stage. Coarse levels suffice: the network's box leaves
#: about 19 mm of margin around the thalami, and the network absorbs the residual.
SCHEDULE = {"rigid": ((4, 2), (4.0, 2.0), 60, 0.1), "affine": ((2, 1), (2.0, 1.0), 40, 0.05)}


def _run_stage(fixed, moving, initial, seed: int, stage: str):
    import SimpleITK as sitk

    shrink, sigmas, iterations, sampling = SCHEDULE[stage]
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(sampling, int(seed) + 1)  # SimpleITK's seed 0 means the wall clock
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=iterations,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(sigmas))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(initial, inPlace=False)
    transform = reg.Execute(fixed, moving)
    return transform, reg.GetMetricValue()


def register_to_template(img, template=None, offsets_mm=(0.0, 25.0), seed: int = 0, cancel=None) -> Registration:
    """Affine registration of a scan to the MNI template (see the module docstring).

    Parameters
    ----------
    img : nibabel image
        The scan (any contrast, orientation and resolution; skull allowed).
    template : nibabel image, optional
        Default :func:`template_image`.
    offsets_mm : sequence of float
        Starting shifts of the scan's centre of mass along the head-foot axis (the brain lies
        above a full head's centre of mass); the best final metric wins.
    seed : int
        Seed of the metric's random sampling (results are reproducible for a given seed).
    cancel : callable, optional
        Called between stages; may raise to stop.
    """
    import SimpleITK as sitk

    fixed = to_sitk(template if template is not None else template_image())
    moving = _prepare_moving(img)
    best_rigid, best_metric = None, np.inf
    for offset in offsets_mm:
        init = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                 sitk.CenteredTransformInitializerFilter.MOMENTS)
        init = sitk.Euler3DTransform(init)
        # fixed -> moving: the scan's brain sits `offset` mm above (+z, in LPS too) its centre of mass
        init.SetTranslation(np.asarray(init.GetTranslation()) + np.array([0.0, 0.0, offset]))
        if cancel is not None:
            cancel()
        rigid, metric = _run_stage(fixed, moving, init, seed, "rigid")
        if metric < best_metric:
            best_rigid, best_metric = rigid, metric
    if cancel is not None:
        cancel()
    affine, metric = _run_stage(fixed, moving, _as_affine(best_rigid), seed, "affine")
    return Registration(_itk_affine_to_ras(_as_affine(affine)), float(metric))


def _as_affine(transform):
    """Flatten a (composite) SimpleITK transform of one rigid/affine part into an AffineTransform."""
    import SimpleITK as sitk

    if isinstance(transform, sitk.CompositeTransform):
        if transform.GetNumberOfTransforms() != 1:
            raise RuntimeError("expected a single registration transform")
        transform = transform.GetNthTransform(0)
    kind = transform.GetName()
    if kind == "Euler3DTransform":
        transform = sitk.Euler3DTransform(transform)
    elif kind == "AffineTransform":
        transform = sitk.AffineTransform(transform)
    out = sitk.AffineTransform(3)
    out.SetMatrix(transform.GetMatrix())
    out.SetTranslation(transform.GetTranslation())
    out.SetCenter(transform.GetCenter())
    return out


def crop_to_box(img, template_to_scan: np.ndarray, box: dict = THALAMUS_BOX, normalize: bool = True) -> np.ndarray:
    """Resample a scan onto the network's box (trilinear), optionally normalised to [0, 1]."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    spacing = voxel_sizes(img)
    box_spacing = float(box["spacing_mm"])
    if np.any(spacing < 0.9 * box_spacing):  # anti-alias before sampling a fine scan at 1 mm
        fwhm = np.sqrt(np.maximum(box_spacing**2 - spacing**2, 0.0))
        data = ndimage.gaussian_filter(data, fwhm / 2.355 / spacing, mode="nearest")
    box_to_scan_voxel = np.linalg.inv(img.affine) @ template_to_scan @ box_affine(box)
    shape = tuple(box["shape"])
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
    coords = box_to_scan_voxel[:3, :3].astype(np.float32) @ grid + box_to_scan_voxel[:3, 3:4].astype(np.float32)
    out = ndimage.map_coordinates(data, coords, order=1, mode="constant", cval=0.0).reshape(shape)
    return normalize_intensity(out) if normalize else out


def box_to_native(probabilities: np.ndarray, template_to_scan: np.ndarray, reference, box: dict = THALAMUS_BOX):
    """Interpolate (C, X, Y, Z) box probabilities onto the reference scan's grid.

    Returns ``(probabilities, region)``: a (C, ...) float32 array covering only the part of the
    reference grid that the box reaches (``region``, a tuple of slices), to keep memory small on
    large scans; voxels outside the box get probability 1 for class 0.
    """
    shape = np.asarray(reference.shape[:3])
    scan_voxel_to_box = np.linalg.inv(box_affine(box)) @ np.linalg.inv(template_to_scan) @ np.asarray(reference.affine)
    box_to_scan_voxel = np.linalg.inv(scan_voxel_to_box)
    corners = np.array([[i, j, k, 1.0] for i in (0, box["shape"][0] - 1) for j in (0, box["shape"][1] - 1)
                        for k in (0, box["shape"][2] - 1)])
    scan_corners = (box_to_scan_voxel @ corners.T)[:3]
    lo = np.clip(np.floor(scan_corners.min(axis=1)).astype(int) - 1, 0, shape)
    hi = np.clip(np.ceil(scan_corners.max(axis=1)).astype(int) + 2, 0, shape)
    region = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub_shape = tuple(int(b - a) for a, b in zip(lo, hi))
    n_classes = probabilities.shape[0]
    out = np.zeros((n_classes,) + sub_shape, dtype=np.float32)
    out[0] = 1.0
    if min(sub_shape) <= 0:
        return out, region
    grid = np.indices(sub_shape, dtype=np.float32).reshape(3, -1) + lo[:, None].astype(np.float32)
    coords = scan_voxel_to_box[:3, :3].astype(np.float32) @ grid + scan_voxel_to_box[:3, 3:4].astype(np.float32)
    for c in range(n_classes):
        cval = 1.0 if c == 0 else 0.0
        out[c] = ndimage.map_coordinates(probabilities[c], coords, order=1, mode="constant", cval=cval).reshape(sub_shape)
    return out, region
