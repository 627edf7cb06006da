"""Thalamus label conventions shared by segmentation, mask import, evaluation and the scene.

Thalamus label maps in this library use FreeSurfer's codes (also SynthSeg's, FastSurfer's and
FSL FIRST's): 10 = left thalamus, 49 = right thalamus, 0 = background. "Left" is the subject's
left, i.e. negative x in RAS world coordinates.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "LEFT",
    "RIGHT",
    "STRUCTURES",
    "STRUCTURE_NAMES",
    "STRUCTURE_COLORS",
    "TERMINOLOGY",
    "structure_mask",
    "thalamus_volumes",
]

LEFT = 10
RIGHT = 49

#: structure key -> labels it is made of
STRUCTURES = {"left": (LEFT,), "right": (RIGHT,), "both": (LEFT, RIGHT)}

STRUCTURE_NAMES = {LEFT: "Left thalamus", RIGHT: "Right thalamus"}

#: FreeSurfer colour LUT (Left-/Right-Thalamus), as RGB in [0, 1]
STRUCTURE_COLORS = {LEFT: (0.0, 118 / 255, 14 / 255), RIGHT: (0.0, 118 / 255, 14 / 255)}

#: DICOM/SNOMED CT coded terminology: (coding scheme, code value, meaning) for category, type and
#: anatomic region modifier, as Slicer's terminology entries spell them.
TERMINOLOGY = {
    "category": ("SCT", "123037004", "Anatomical Structure"),
    "type": ("SCT", "42695009", "Thalamus"),
    LEFT: ("SCT", "7771000", "Left"),
    RIGHT: ("SCT", "24028007", "Right"),
}


def structure_mask(labels, structure: str) -> np.ndarray:
    """Boolean mask of ``"left"``, ``"right"`` or ``"both"`` thalami in a 10/49 label array."""
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {sorted(STRUCTURES)}, got {structure!r}")
    return np.isin(np.asarray(labels), STRUCTURES[structure])


def thalamus_volumes(labels, voxel_volume_mm3: float | None = None) -> dict:
    """Left, right and total thalamic volume in mm³ of a 10/49 label map.

    Parameters
    ----------
    labels : nibabel image or array
        Label map; with an array, ``voxel_volume_mm3`` must be given.
    voxel_volume_mm3 : float, optional
        Volume of one voxel; taken from the image's affine when ``labels`` is an image.
    """
    if hasattr(labels, "affine"):
        voxel_volume_mm3 = float(abs(np.linalg.det(np.asarray(labels.affine)[:3, :3])))
        labels = np.asarray(labels.dataobj)
    elif voxel_volume_mm3 is None:
        raise ValueError("voxel_volume_mm3 is needed when labels is an array")
    labels = np.asarray(labels)
    left = float(np.count_nonzero(labels == LEFT)) * voxel_volume_mm3
    right = float(np.count_nonzero(labels == RIGHT)) * voxel_volume_mm3
    return {"left": left, "right": right, "both": left + right}
