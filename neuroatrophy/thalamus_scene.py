"""Show thalamus segmentations and their evaluation in an MRML scene, and read them back.

The display side of the thalamus modules (:mod:`neuroatrophy.thalamus_labels`,
``thalamus_seg``, ``thalamus_eval``). Functions that add nodes take the scene
(``vtkMRMLScene``) as their first argument and reach MRML through
:mod:`neuroatrophy.mrml`, so the same calls work in 3D Slicer (``slicer.mrmlScene``)
and headless with ``slicer-core``. They leave the scene as it was when they raise.

* :func:`add_thalamus_segmentation`: a 10/49 label image as a segmentation node with
  the segments "Left thalamus" and "Right thalamus" (FreeSurfer colours, DICOM
  terminology).
* :func:`labels_from_segmentation`, :func:`labels_from_labelmap`, :func:`labels_from_node`:
  the inverse, so that segmentations drawn or imported in Slicer can be evaluated.
* :func:`add_volume_table`, :func:`add_metrics_table`, :func:`add_bland_altman_plot`,
  :func:`add_probability_volume`: results as table, chart and volume nodes.
* :func:`image_from_volume`, :func:`write_volume`: a volume node as a NIfTI image (inputs
  of the ``neuroatrophy thalamus`` commands).
* :func:`show_segmentation_result`, :func:`show_cohort_result`: the output folders of
  ``neuroatrophy thalamus segment`` and ``neuroatrophy thalamus cohort`` in a scene.

Geometry
--------
nibabel's affine and Slicer's IJK-to-RAS matrix are the same matrix (both map voxel
indices to RAS millimetres); only the array order differs: nibabel arrays are indexed
``[i, j, k]``, Slicer's ``[k, j, i]``.

Terminology
-----------
Each segment carries the tag ``TerminologyEntry`` in Slicer's serialised form
(``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry``): seven ``~``-separated
fields (terminology context, category, type, type modifier, anatomic context, region,
region modifier), codes as ``scheme^value^meaning``. The thalamus is the type
SCT 42695009 of the category SCT 123037004 "Anatomical Structure" in Slicer's
"Segmentation category and type - DICOM master list", where Left (SCT 7771000) and
Right (SCT 24028007) are *type* modifiers.
"""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from . import mrml
from .mrml import _remove_added_nodes_on_error
from .thalamus_labels import LEFT, RIGHT, STRUCTURE_COLORS, STRUCTURE_NAMES, TERMINOLOGY

__all__ = [
    "SEGMENT_IDS",
    "TERMINOLOGY_TAG",
    "TERMINOLOGY_CONTEXT",
    "ANATOMIC_CONTEXT",
    "terminology_entry",
    "segment_label",
    "add_thalamus_segmentation",
    "labels_from_segmentation",
    "labels_from_labelmap",
    "labels_from_node",
    "image_from_volume",
    "write_volume",
    "add_volume_table",
    "add_metrics_table",
    "add_bland_altman_plot",
    "add_probability_volume",
    "show_segmentation_result",
    "show_cohort_result",
    "bland_altman_inputs",
    "remove_thalamus_nodes",
]

#: Segment IDs of the two thalami in segmentations made by :func:`add_thalamus_segmentation`.
SEGMENT_IDS = {LEFT: "Left_thalamus", RIGHT: "Right_thalamus"}
#: Segment tag holding the terminology (``vtkSegment::GetTerminologyEntryTagName()``).
TERMINOLOGY_TAG = "TerminologyEntry"
#: Slicer's terminology context that holds SCT 42695009 Thalamus with Left/Right type modifiers.
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

# Codes of the thalamus in Slicer's terminologies: DICOM master list (42695009) and the
# older "3D Slicer General Anatomy list" (119406000).
_THALAMUS_CODES = {TERMINOLOGY["type"][1], "119406000"}
_SIDE_CODES = {TERMINOLOGY[LEFT][1]: LEFT, TERMINOLOGY[RIGHT][1]: RIGHT}
_LEFT_WORDS = {"left", "l", "lh", "lt"}
_RIGHT_WORDS = {"right", "r", "rh", "rt"}

_ATTR = "NeuroAtrophy."
ATTRIBUTE_KIND = _ATTR + "Kind"
_BLAND_ALTMAN_ATTRIBUTES = ("n", "bias", "sd", "loa_low", "loa_high")

# Colours of the Bland-Altman chart.
_POINT_COLOR = (0.12, 0.47, 0.71)
_BIAS_COLOR = (0.0, 0.0, 0.0)
_LOA_COLOR = (0.45, 0.45, 0.45)
_FIT_COLOR = (0.85, 0.1, 0.1)

# Files written by ``neuroatrophy thalamus segment`` / ``cohort``.
LABELS_FILE = "thalamus_labels.nii.gz"
PROBABILITY_FILE = "thalamus_probability.nii.gz"
VOLUMES_FILE = "volumes.csv"
METRICS_FILE = "metrics.csv"
AGREEMENT_FILE = "agreement.csv"
# Fewer subjects than this give no Bland-Altman chart (limits of agreement need an SD).
MIN_BLAND_ALTMAN_SUBJECTS = 3


# ------------------------------------------------------------------ terminology


def terminology_entry(label: int) -> str:
    """Slicer's serialised terminology entry of the left (10) or right (49) thalamus.

    Raises
    ------
    ValueError
        If ``label`` is not 10 or 49.
    """
    if label not in (LEFT, RIGHT):
        raise ValueError(f"label must be {LEFT} (left) or {RIGHT} (right) thalamus, got {label!r}")
    slicer, _, _ = mrml._mrml()
    category, kind, side = TERMINOLOGY["category"], TERMINOLOGY["type"], TERMINOLOGY[label]
    # The string form is Slicer's own: let its serialiser write it. Codes are (scheme, value, meaning);
    # the serialiser takes (value, scheme, meaning).
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        TERMINOLOGY_CONTEXT,
        category[1], category[0], category[2],
        kind[1], kind[0], kind[2],
        side[1], side[0], side[2],
        ANATOMIC_CONTEXT, "", "", "", "", "", "",
    )


def _side_from_terminology(entry: str):
    """10 or 49 if a serialised terminology entry is the left or right thalamus, else None."""
    fields = (entry or "").split("~")
    if len(fields) != 7:
        return None
    codes = [field.split("^") for field in fields]
    if len(codes[2]) != 3 or codes[2][1] not in _THALAMUS_CODES:
        return None
    # Slicer's lists put laterality in the type modifier; accept a region modifier too.
    for field in (codes[3], codes[6]):
        if len(field) == 3 and field[1] in _SIDE_CODES:
            return _SIDE_CODES[field[1]]
    return None


def _side_from_name(name: str):
    """10 or 49 if a segment name says left or right thalamus (e.g. "Left-Thalamus", "Thalamus_R")."""
    words = re.findall(r"[a-z]+", (name or "").lower())
    if not any(word.startswith("thal") for word in words):
        return None
    left, right = bool(_LEFT_WORDS & set(words)), bool(_RIGHT_WORDS & set(words))
    if left == right:
        return None
    return LEFT if left else RIGHT


def segment_label(segment):
    """The thalamus label of a segment (10 left, 49 right) from its terminology or name, or None.

    The terminology tag decides when it codes a lateralised thalamus; otherwise the name
    must contain a word starting with "thal" and one side word ("left"/"l"/"lh" or
    "right"/"r"/"rh").
    """
    _, vtk, _ = mrml._mrml()
    entry = vtk.reference("")
    side = _side_from_terminology(str(entry)) if segment.GetTag(TERMINOLOGY_TAG, entry) else None
    return side if side is not None else _side_from_name(segment.GetName())


# ------------------------------------------------------------------ images <-> oriented images


def _checked_label_image(labels_img, param="labels_img"):
    """A 3-D label image with values in {0, 10, 49} and an affine Slicer can represent."""
    from .thalamus_image import load_label_image

    img = load_label_image(labels_img, name=param)
    data = np.asarray(img.dataobj)
    unexpected = sorted(set(np.unique(data).tolist()) - {0, LEFT, RIGHT})
    if unexpected:
        raise ValueError(f"{param}: a thalamus label map holds 0, {LEFT} and {RIGHT} only; "
                         f"found {unexpected[:10]}")
    try:
        mrml._check_ijk_to_ras(img.affine)
    except ValueError as error:
        raise ValueError(f"{param}: {error}") from None
    return img


def _oriented_image(array_ijk, affine):
    """A ``vtkOrientedImageData`` holding ``array_ijk`` (nibabel order) on the grid of ``affine``."""
    slicer, _, numpy_support = mrml._mrml()
    array = np.asarray(array_ijk)
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*array.shape)
    # VTK runs i fastest: Fortran order of the [i, j, k] array.
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(order="F"), deep=True))
    image.SetImageToWorldMatrix(mrml._vtk_matrix(np.asarray(affine, dtype=float)))
    return image


def _geometry_image(shape, affine):
    """An oriented image with the grid of ``shape``/``affine`` and no voxels (a resampling target)."""
    slicer, _, _ = mrml._mrml()
    image = slicer.vtkOrientedImageData()
    image.SetExtent(0, shape[0] - 1, 0, shape[1] - 1, 0, shape[2] - 1)
    image.SetImageToWorldMatrix(mrml._vtk_matrix(np.asarray(affine, dtype=float)))
    return image


def _matrix_array(vtk_matrix):
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _grid_of(image):
    """``(shape, affine)`` of an oriented image; the affine maps index 0 of its extent."""
    _, vtk, _ = mrml._mrml()
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    extent = image.GetExtent()
    start = np.array([extent[0], extent[2], extent[4]], dtype=float)
    shape = tuple(int(extent[2 * a + 1] - extent[2 * a] + 1) for a in range(3))
    affine = _matrix_array(matrix)
    affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    return shape, affine


def _values_on_grid(image, shape, affine):
    """Voxel values of an oriented image on the grid ``shape``/``affine`` (nearest neighbour; 0 outside)."""
    slicer, _, numpy_support = mrml._mrml()
    out = np.zeros(shape, dtype=np.int32)
    extent = image.GetExtent()
    if image.GetPointData().GetScalars() is None or any(extent[2 * a] > extent[2 * a + 1] for a in range(3)):
        return out
    target = _geometry_image(shape, affine)
    image_shape, image_affine = _grid_of(image)
    if image_shape == tuple(shape) and np.allclose(image_affine, affine, atol=1e-6):
        resampled = image
    else:
        resampled = slicer.vtkOrientedImageData()
        if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                image, target, resampled, False, False):
            raise ValueError("could not resample a labelmap onto the reference grid")
    extent = resampled.GetExtent()
    if resampled.GetPointData().GetScalars() is None or any(extent[2 * a] > extent[2 * a + 1] for a in range(3)):
        return out
    # The resampled extent is given in the target's index space; it may be cropped or shifted.
    dims = tuple(extent[2 * a + 1] - extent[2 * a] + 1 for a in range(3))
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(dims[::-1]).transpose(2, 1, 0)
    if resampled is image:
        start = (0, 0, 0)
    else:
        start = (extent[0], extent[2], extent[4])
    source, destination = [], []
    for axis in range(3):
        low, high = max(start[axis], 0), min(start[axis] + dims[axis], shape[axis])
        if low >= high:
            return out
        source.append(slice(low - start[axis], high - start[axis]))
        destination.append(slice(low, high))
    out[tuple(destination)] = values[tuple(source)]
    return out


def _reference_grid(reference, param="reference"):
    """``(shape, affine)`` of a nibabel image (its grid); the affine must be Slicer-representable."""
    if not hasattr(reference, "affine") or not hasattr(reference, "shape"):
        raise ValueError(f"{param} must be a nibabel image (its grid is used), got {type(reference).__name__}")
    if len(reference.shape) < 3 or any(n < 1 for n in reference.shape[:3]):
        raise ValueError(f"{param}: expected a 3-D image, got shape {reference.shape}")
    try:
        affine = mrml._check_ijk_to_ras(reference.affine)
    except ValueError as error:
        raise ValueError(f"{param}: {error}") from None
    return tuple(int(n) for n in reference.shape[:3]), affine


# ------------------------------------------------------------------ segmentation nodes


def add_thalamus_segmentation(scene, labels_img, name="Thalamus", reference_volume_node=None):
    """Add a thalamus label map as a segmentation node with a left and a right segment.

    Parameters
    ----------
    scene : vtkMRMLScene
    labels_img : nibabel image or path
        Label map with values 0, 10 (left thalamus) and 49 (right thalamus).
    name : str, default "Thalamus"
        Node name.
    reference_volume_node : vtkMRMLVolumeNode, optional
        Volume whose grid becomes the segmentation's reference geometry (what Slicer's
        segment editor edits on, e.g. the input T1w). By default the label map's grid.

    Returns
    -------
    vtkMRMLSegmentationNode
        Segments ``"Left_thalamus"`` and ``"Right_thalamus"`` (:data:`SEGMENT_IDS`), named
        "Left thalamus" / "Right thalamus", in FreeSurfer's colour, with the
        ``TerminologyEntry`` tag of :func:`terminology_entry`. A side absent from the
        label map still gets its (empty) segment.

    Raises
    ------
    ValueError
        If the label map is not 3-D, holds other values, or its affine has shear;
        or ``reference_volume_node`` is not a volume of ``scene``.
    """
    mrml._check_scene(scene)
    mrml._check_name(name)
    img = _checked_label_image(labels_img)
    if reference_volume_node is not None:
        mrml._check_node(reference_volume_node, "vtkMRMLVolumeNode", "reference_volume_node")
        if not scene.IsNodePresent(reference_volume_node):
            raise ValueError(f"reference_volume_node {reference_volume_node.GetName()!r} is not in the scene")
    slicer, _, _ = mrml._mrml()
    data = np.asarray(img.dataobj)
    affine = np.asarray(img.affine, dtype=float)
    representation = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    with _remove_added_nodes_on_error(scene):
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
        segmentation = node.GetSegmentation()  # a new segmentation's source representation is the labelmap
        if reference_volume_node is not None:
            node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
        else:
            geometry = slicer.vtkSegmentationConverter.SerializeImageGeometry(_geometry_image(data.shape, affine))
            segmentation.SetConversionParameter(
                slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(), geometry)
        for label in (LEFT, RIGHT):
            segment = slicer.vtkSegment()
            segment.SetName(STRUCTURE_NAMES[label])
            segment.SetColor(*STRUCTURE_COLORS[label])
            segment.SetTag(TERMINOLOGY_TAG, terminology_entry(label))
            segment.AddRepresentation(representation, _oriented_image((data == label).astype(np.uint8), affine))
            if not segmentation.AddSegment(segment, SEGMENT_IDS[label]):
                raise ValueError(f"could not add the segment {STRUCTURE_NAMES[label]!r} to {name!r}")
        node.SetAttribute(ATTRIBUTE_KIND, "thalamus segmentation")
    return node


def _segment_ids(segmentation):
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def _mapped_label(value, key):
    """10 or 49 from a mapping value (10, 49, "left", "right")."""
    words = {"left": LEFT, "right": RIGHT}
    if isinstance(value, str) and value.strip().lower() in words:
        return words[value.strip().lower()]
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and int(value) in (LEFT, RIGHT):
        return int(value)
    raise ValueError(f"segment_labels[{key!r}] must be {LEFT}/'left' or {RIGHT}/'right', got {value!r}")


def _segment_labels(node, segment_labels):
    """``{segment ID: 10 or 49}`` of the segments to use."""
    segmentation = node.GetSegmentation()
    ids = _segment_ids(segmentation)
    if not ids:
        raise ValueError(f"segmentation {node.GetName()!r} has no segments")
    if segment_labels is not None:
        by_name = {}
        for segment_id in ids:
            by_name.setdefault(segmentation.GetSegment(segment_id).GetName(), []).append(segment_id)
        chosen = {}
        for key, value in dict(segment_labels).items():
            if key in ids:
                matched = [key]
            elif key in by_name:
                matched = by_name[key]
            else:
                names = [segmentation.GetSegment(i).GetName() for i in ids]
                raise ValueError(f"segment_labels: segmentation {node.GetName()!r} has no segment with ID or "
                                 f"name {key!r}; segments: {names}")
            for segment_id in matched:
                chosen[segment_id] = _mapped_label(value, key)
        if not chosen:
            raise ValueError("segment_labels is empty: name at least one segment")
        return chosen
    chosen = {}
    for segment_id in ids:
        segment = segmentation.GetSegment(segment_id)
        label = segment_label(segment)
        if label is None:
            raise ValueError(
                f"segment {segment.GetName()!r} (ID {segment_id!r}) of segmentation {node.GetName()!r} cannot be "
                f"identified as the left or right thalamus (by its terminology or name); pass "
                f"segment_labels={{segment ID or name: {LEFT} or {RIGHT}}} to say which segments to use")
        chosen[segment_id] = label
    return chosen


def _segmentation_grid(node):
    """``(shape, affine)`` of a segmentation's reference geometry, else of the union of its segments."""
    slicer, _, _ = mrml._mrml()
    segmentation = node.GetSegmentation()
    geometry = segmentation.DetermineCommonLabelmapGeometry(segmentation.EXTENT_REFERENCE_GEOMETRY, None)
    image = slicer.vtkOrientedImageData()
    if not geometry or not slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, image, False):
        raise ValueError(f"segmentation {node.GetName()!r} has no geometry (no reference volume and no voxels); "
                         "pass a reference image")
    shape, affine = _grid_of(image)
    if min(shape) < 1:
        raise ValueError(f"segmentation {node.GetName()!r} is empty and has no reference geometry; "
                         "pass a reference image")
    transform = node.GetParentTransformNode()
    if transform is not None:
        affine = _to_world(transform, node.GetName()) @ affine
    return shape, affine


def _to_world(transform, name):
    _, vtk, _ = mrml._mrml()
    if not transform.IsTransformToWorldLinear():
        raise ValueError(f"{name!r} is under a non-linear transform; harden it first")
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return _matrix_array(matrix)


def labels_from_segmentation(segmentation_node, reference=None, segment_labels=None):
    """A 10/49 label image of a segmentation's thalamus segments, on a reference grid.

    Parameters
    ----------
    segmentation_node : vtkMRMLSegmentationNode
        Segmentation made by :func:`add_thalamus_segmentation`, drawn in Slicer or imported.
    reference : nibabel image, optional
        Its grid (shape and affine) is the output grid; segments are resampled onto it
        (nearest neighbour, the segmentation's parent transform applied). By default
        the segmentation's reference geometry (else the union of its segments' grids).
    segment_labels : dict, optional
        Segment ID or name -> 10/"left" or 49/"right". Only these segments are used.
        By default every segment must be identifiable from its terminology or name
        (:func:`segment_label`). Several segments of one side are merged.

    Returns
    -------
    nibabel.Nifti1Image
        int16 label map (0, 10, 49).

    Raises
    ------
    ValueError
        If the segmentation has no segments, a segment cannot be identified (naming
        it), a mapped segment does not exist, or left and right segments overlap.
    """
    mrml._check_node(segmentation_node, "vtkMRMLSegmentationNode", "segmentation_node")
    slicer, _, _ = mrml._mrml()
    labels = _segment_labels(segmentation_node, segment_labels)
    shape, affine = (_segmentation_grid(segmentation_node) if reference is None
                     else _reference_grid(reference))
    segmentation = segmentation_node.GetSegmentation()
    out = np.zeros(shape, dtype=np.int16)
    for segment_id, label in labels.items():
        image = slicer.vtkOrientedImageData()
        segment = segmentation.GetSegment(segment_id)
        if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
                segmentation_node, segment_id, image, True):
            raise ValueError(f"segment {segment.GetName()!r} of {segmentation_node.GetName()!r} has no "
                             "binary labelmap")
        # Segments may share one labelmap layer: each is the voxels holding its label value.
        mask = _values_on_grid(image, shape, affine) == segment.GetLabelValue()
        clash = mask & (out != 0) & (out != label)
        if clash.any():
            raise ValueError(f"segmentation {segmentation_node.GetName()!r}: segment {segment.GetName()!r} "
                             f"overlaps the other side's thalamus in {int(clash.sum())} voxels")
        out[mask] = label
    return nib.Nifti1Image(out, affine)


def labels_from_labelmap(volume_node, reference=None, value_labels=None):
    """A 10/49 label image from a labelmap (or scalar) volume node.

    Parameters
    ----------
    volume_node : vtkMRMLLabelMapVolumeNode or vtkMRMLScalarVolumeNode
        Integer-valued volume; a linear parent transform is applied.
    reference : nibabel image, optional
        Output grid (nearest-neighbour resampling); by default the volume's own grid.
    value_labels : dict, optional
        Voxel value -> 10/"left" or 49/"right" (e.g. ``{77: 10, 78: 49}`` for AAL); other
        values become 0. By default the values must already be 0, 10 and 49.

    Returns
    -------
    nibabel.Nifti1Image
        int16 label map.

    Raises
    ------
    ValueError
        If the volume holds non-integer values, or values other than 0/10/49 without
        ``value_labels``.
    """
    mrml._check_node(volume_node, "vtkMRMLScalarVolumeNode", "volume_node")
    data = mrml.array_from_volume(volume_node)
    if data.ndim != 3:
        raise ValueError(f"volume {volume_node.GetName()!r} has several components per voxel")
    data = data.transpose(2, 1, 0)
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or not np.array_equal(np.rint(data), data):
            raise ValueError(f"volume {volume_node.GetName()!r} holds non-integer values; it is not a label map")
        data = data.astype(np.int64)
    if value_labels is not None:
        mapped = np.zeros(data.shape, dtype=np.int16)
        for value, label in dict(value_labels).items():
            mapped[data == value] = _mapped_label(label, value)
        data = mapped
    else:
        unexpected = sorted(set(np.unique(data).tolist()) - {0, LEFT, RIGHT})
        if unexpected:
            raise ValueError(f"volume {volume_node.GetName()!r} holds values {unexpected[:10]} besides 0, {LEFT} "
                             f"and {RIGHT}; pass value_labels={{value: {LEFT} or {RIGHT}}}")
        data = data.astype(np.int16)
    affine = mrml.ijk_to_ras_from_volume(volume_node)
    transform = volume_node.GetParentTransformNode()
    if transform is not None:
        affine = _to_world(transform, volume_node.GetName()) @ affine
    if reference is None:
        return nib.Nifti1Image(data, affine)
    shape, reference_affine = _reference_grid(reference)
    if tuple(data.shape) == shape and np.allclose(affine, reference_affine, atol=1e-6):
        return nib.Nifti1Image(data, reference_affine)
    values = _values_on_grid(_oriented_image(data, affine), shape, reference_affine)
    return nib.Nifti1Image(values.astype(np.int16), reference_affine)


def labels_from_node(node, reference=None, labels=None):
    """A 10/49 label image from a segmentation node or a labelmap volume node.

    ``labels`` is ``segment_labels`` of :func:`labels_from_segmentation` or ``value_labels``
    of :func:`labels_from_labelmap`.
    """
    if node is not None and hasattr(node, "IsA") and node.IsA("vtkMRMLSegmentationNode"):
        return labels_from_segmentation(node, reference, labels)
    if node is not None and hasattr(node, "IsA") and node.IsA("vtkMRMLScalarVolumeNode"):
        return labels_from_labelmap(node, reference, labels)
    raise ValueError(f"node must be a segmentation or a labelmap volume node, got "
                     f"{node.GetClassName() if hasattr(node, 'GetClassName') else type(node).__name__}")


# ------------------------------------------------------------------ volumes


def image_from_volume(volume_node):
    """A scalar volume node as a nibabel image (voxel type kept; linear parent transform applied).

    Raises
    ------
    ValueError
        If the node is not a scalar volume with image data, or has several components.
    """
    mrml._check_node(volume_node, "vtkMRMLScalarVolumeNode", "volume_node")
    data = mrml.array_from_volume(volume_node)
    if data.ndim != 3:
        raise ValueError(f"volume {volume_node.GetName()!r} has several components per voxel (e.g. RGB)")
    affine = mrml.ijk_to_ras_from_volume(volume_node)
    transform = volume_node.GetParentTransformNode()
    if transform is not None:
        affine = _to_world(transform, volume_node.GetName()) @ affine
    return nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), affine)


def write_volume(volume_node, path):
    """Write a scalar volume node to a NIfTI file (atomically); returns the path.

    Unlike Slicer's ``saveNode`` this leaves the node's storage node alone.
    """
    from .io import atomic_write

    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"path must end in .nii or .nii.gz, got {str(path)!r}")
    img = image_from_volume(volume_node)
    with atomic_write(path) as tmp:
        nib.save(img, str(tmp))
    return path


def add_probability_volume(scene, img, name="Thalamus probability"):
    """Add a thalamus probability map (0..1) as a scalar volume coloured yellow to red.

    Parameters
    ----------
    scene : vtkMRMLScene
    img : nibabel image or path
        3-D probability map.
    name : str

    Returns
    -------
    vtkMRMLScalarVolumeNode
        Float32 voxels; window fixed to [0, 1].
    """
    from .thalamus_image import load_image

    mrml._check_scene(scene)
    mrml._check_name(name)
    img = load_image(img, name="probability image", allow_constant=True)
    data = np.asarray(img.dataobj, dtype=np.float32)
    with _remove_added_nodes_on_error(scene):
        volume = mrml.add_volume(scene, data.transpose(2, 1, 0), img.affine, name)
        mrml.set_volume_display(volume, mrml.sequential_color_table(scene), (0.0, 1.0))
        volume.SetAttribute(ATTRIBUTE_KIND, "thalamus probability")
    return volume


# ------------------------------------------------------------------ tables


def add_volume_table(scene, volumes, name="Thalamus volumes", table_node=None):
    """Add thalamic volumes (mm³) as a table node.

    Parameters
    ----------
    scene : vtkMRMLScene
    volumes : dict or pandas.DataFrame
        ``{"left": mm³, "right": mm³, "both": mm³}`` (one subject; stored as columns
        ``structure``, ``volume_mm3``), or a DataFrame stored as it is (e.g. a cohort's
        ``subject, left, right, both``).
    name : str
    table_node : vtkMRMLTableNode, optional
        Existing table to overwrite.

    Returns
    -------
    vtkMRMLTableNode
    """
    if isinstance(volumes, dict):
        if not volumes:
            raise ValueError("volumes is empty")
        try:
            values = [float(v) for v in volumes.values()]
        except (TypeError, ValueError):
            raise ValueError(f"volumes must map structures to numbers, got {volumes!r}") from None
        if not np.all(np.isfinite(values)):
            raise ValueError(f"volumes must be finite, got {volumes!r}")
        frame = pd.DataFrame({"structure": [str(k) for k in volumes], "volume_mm3": values})
    elif isinstance(volumes, pd.DataFrame):
        if volumes.empty:
            raise ValueError("volumes is an empty table")
        frame = volumes
    else:
        raise ValueError(f"volumes must be a dict or a DataFrame, got {type(volumes).__name__}")
    node = mrml.table_from_dataframe(scene, frame, name, table_node=table_node)
    node.SetAttribute(ATTRIBUTE_KIND, "thalamus volumes")
    return node


_REQUIRED_METRIC_COLUMNS = ("method", "structure", "dice")


def add_metrics_table(scene, metrics, name="Thalamus metrics", table_node=None):
    """Add segmentation metrics (``thalamus_eval.evaluate_masks``: one row per subject, method and structure).

    Raises
    ------
    ValueError
        If ``metrics`` is not a non-empty DataFrame with at least ``method``, ``structure``
        and ``dice`` columns.
    """
    if not isinstance(metrics, pd.DataFrame):
        raise ValueError(f"metrics must be a DataFrame, got {type(metrics).__name__}")
    missing = [c for c in _REQUIRED_METRIC_COLUMNS if c not in metrics.columns]
    if missing:
        raise ValueError(f"metrics lacks column(s) {missing} (needs {list(_REQUIRED_METRIC_COLUMNS)})")
    if metrics.empty:
        raise ValueError("metrics is an empty table")
    node = mrml.table_from_dataframe(scene, _text_columns(metrics), name, table_node=table_node)
    node.SetAttribute(ATTRIBUTE_KIND, "thalamus metrics")
    return node


def _text_columns(frame):
    """Object columns as text, missing values as "" (``evaluate_masks`` leaves ``subject`` None)."""
    frame = frame.copy()
    for column in frame.columns:
        if frame[column].dtype == object:
            frame[column] = pd.Series([("" if value is None or (isinstance(value, float) and np.isnan(value))
                                        else str(value)) for value in frame[column]], index=frame.index, dtype=str)
    return frame


# ------------------------------------------------------------------ Bland-Altman


def _paired_values(measured, reference, subjects):
    measured = np.asarray(measured, dtype=float).ravel()
    reference = np.asarray(reference, dtype=float).ravel()
    if measured.shape != reference.shape:
        raise ValueError(f"measured ({measured.size} values) and reference ({reference.size} values) must be paired")
    if subjects is not None:
        subjects = [str(s) for s in subjects]
        if len(subjects) != measured.size:
            raise ValueError(f"subjects must name the {measured.size} pairs, got {len(subjects)} names")
    return measured, reference, subjects


def add_bland_altman_plot(scene, measured, reference, method_name, subjects=None, percent=False, name=None,
                          units="mm³"):
    """Add a Bland-Altman chart: differences against means, bias, limits of agreement, proportional bias.

    Parameters
    ----------
    scene : vtkMRMLScene
    measured, reference : array_like of shape (n,)
        Paired values (e.g. thalamic volumes by a method and by the reference segmentation).
    method_name : str
        Shown in the chart's title and names.
    subjects : sequence of str, optional
        One name per pair, stored with the points.
    percent : bool, default False
        Differences (and the proportional-bias regression) in percent of the pair's mean
        (:func:`thalamus_eval.bland_altman`).
    name : str, optional
        Chart name; default ``"Bland-Altman <method_name>"``.
    units : str, default "mm³"
        Units of the values, for the axis titles.

    Returns
    -------
    vtkMRMLPlotChartNode
        Series: the points (``"<method_name>"``, table ``"<name> points"`` with columns
        [subject,] mean, difference), and from table ``"<name> lines"`` (columns mean,
        bias, loa_low, loa_high[, fit], sampled at the lowest and highest mean) the bias
        (solid), the 95 % limits of agreement (dashed) and, with 3 or more pairs of
        different means, the regression of the difference on the mean (proportional
        bias, dotted). The
        chart's attributes ``NeuroAtrophy.BlandAltman.<n|bias|sd|loa_low|loa_high>`` and
        ``NeuroAtrophy.ProportionalBias.<slope|intercept|p_value>`` hold the statistics.

    Raises
    ------
    ValueError
        If the values are not paired, or the statistics cannot be computed (too few pairs).
    """
    from .thalamus_eval import bland_altman, proportional_bias

    mrml._check_scene(scene)
    mrml._check_name(method_name, "method_name")
    name = name or f"Bland-Altman {method_name}"
    mrml._check_name(name)
    measured, reference, subjects = _paired_values(measured, reference, subjects)
    stats = bland_altman(measured, reference, percent=percent)
    # A regression line needs 3 pairs with different means; fewer give the bias and limits only.
    has_fit = stats.n >= 3 and np.ptp(stats.means) > 0
    fit = proportional_bias(measured, reference, percent=percent) if has_fit else None

    points = {}
    if subjects is not None:
        points["subject"] = pd.Series(subjects, dtype=str)
    points["mean"] = np.asarray(stats.means, dtype=float)
    points["difference"] = np.asarray(stats.differences, dtype=float)
    x = np.array([np.min(points["mean"]), np.max(points["mean"])])
    lines = {"mean": x, "bias": np.full(2, float(stats.bias)), "loa_low": np.full(2, float(stats.loa_low)),
             "loa_high": np.full(2, float(stats.loa_high))}
    if fit is not None:
        lines["fit"] = float(fit.intercept) + float(fit.slope) * x
    difference_units = "%" if percent else units
    with _remove_added_nodes_on_error(scene):
        points_table = mrml.table_from_dataframe(scene, pd.DataFrame(points), f"{name} points")
        lines_table = mrml.table_from_dataframe(scene, pd.DataFrame(lines), f"{name} lines")
        chart = mrml.add_plot(scene, points_table, "mean", ["difference"], name, plot_type="Scatter",
                              x_label=f"Mean of {method_name} and reference ({units})",
                              y_label=f"{method_name} - reference ({difference_units})",
                              colors=[_POINT_COLOR], marker_styles=["circle"])
        chart.GetNthPlotSeriesNode(0).SetName(method_name)
        mrml.add_plot_series(scene, chart, lines_table, "mean", "bias", f"Bias {float(stats.bias):.4g}",
                             line_style="solid", color=_BIAS_COLOR)
        mrml.add_plot_series(scene, chart, lines_table, "mean", "loa_low", "Lower limit of agreement",
                             line_style="dash", color=_LOA_COLOR)
        mrml.add_plot_series(scene, chart, lines_table, "mean", "loa_high", "Upper limit of agreement",
                             line_style="dash", color=_LOA_COLOR)
        if fit is not None:
            mrml.add_plot_series(scene, chart, lines_table, "mean", "fit",
                                 f"Proportional bias (slope {float(fit.slope):.3g}, p = {float(fit.p_value):.3g})",
                                 line_style="dot", color=_FIT_COLOR)
        chart.SetAttribute(ATTRIBUTE_KIND, "bland-altman")
        for key in _BLAND_ALTMAN_ATTRIBUTES:
            chart.SetAttribute(f"{_ATTR}BlandAltman.{key}", repr(float(getattr(stats, key))))
        if fit is not None:
            for key in ("slope", "intercept", "p_value"):
                chart.SetAttribute(f"{_ATTR}ProportionalBias.{key}", repr(float(getattr(fit, key))))
    return chart


# ------------------------------------------------------------------ result folders


def _read_csv(path):
    try:
        return pd.read_csv(path, dtype={"subject": str})
    except Exception as error:  # pandas raises many types for malformed files
        raise ValueError(f"could not read the table {path}: {error}") from error


def show_segmentation_result(scene, folder, name="Thalamus", reference_volume_node=None, probability=False):
    """Show the output folder of ``neuroatrophy thalamus segment``.

    Parameters
    ----------
    scene : vtkMRMLScene
    folder : path
        Holds ``thalamus_labels.nii.gz`` and ``volumes.csv`` (structure, volume_mm3), and
        ``thalamus_probability.nii.gz``.
    name : str
        Node names: ``<name>``, ``<name> volumes``, ``<name> probability``.
    reference_volume_node : vtkMRMLVolumeNode, optional
        Reference geometry of the segmentation (the input volume).
    probability : bool, default False
        Also load the probability map.

    Returns
    -------
    dict
        ``segmentation`` (vtkMRMLSegmentationNode), ``volumes_table`` (vtkMRMLTableNode),
        ``probability_volume`` (only with ``probability``).

    Raises
    ------
    FileNotFoundError
        If the label map (or the requested probability map) is missing.
    """
    mrml._check_scene(scene)
    folder = Path(folder)
    labels_file = folder / LABELS_FILE
    if not labels_file.is_file():
        raise FileNotFoundError(f"no {LABELS_FILE} in {folder}")
    probability_file = folder / PROBABILITY_FILE
    if probability and not probability_file.is_file():
        raise FileNotFoundError(f"no {PROBABILITY_FILE} in {folder}")
    labels = _checked_label_image(labels_file, param=str(labels_file))
    volumes_file = folder / VOLUMES_FILE
    if volumes_file.is_file():
        volumes = _read_csv(volumes_file)
        missing = [c for c in ("structure", "volume_mm3") if c not in volumes.columns]
        if missing:
            raise ValueError(f"{volumes_file} lacks column(s) {missing}")
    else:
        from .thalamus_labels import thalamus_volumes

        volumes = thalamus_volumes(labels)
    nodes = {}
    with _remove_added_nodes_on_error(scene):
        nodes["segmentation"] = add_thalamus_segmentation(scene, labels, name, reference_volume_node)
        nodes["volumes_table"] = add_volume_table(scene, volumes, f"{name} volumes")
        if probability:
            nodes["probability_volume"] = add_probability_volume(scene, probability_file, f"{name} probability")
    return nodes


def bland_altman_inputs(metrics, structure="both"):
    """Per method, the paired volumes ``(subjects, measured, reference)`` of one structure.

    ``metrics`` is the table of ``thalamus_eval.evaluate_masks`` (columns subject, method,
    structure, volume_pred_mm3, volume_ref_mm3). Methods with fewer than
    :data:`MIN_BLAND_ALTMAN_SUBJECTS` subjects are left out.
    """
    needed = ["subject", "method", "structure", "volume_pred_mm3", "volume_ref_mm3"]
    missing = [c for c in needed if c not in metrics.columns]
    if missing:
        raise ValueError(f"metrics lacks column(s) {missing}")
    rows = metrics[metrics["structure"].astype(str) == structure]
    pairs = {}
    for method, group in rows.groupby("method", sort=False):
        group = group.dropna(subset=["volume_pred_mm3", "volume_ref_mm3"])
        if len(group) >= MIN_BLAND_ALTMAN_SUBJECTS:
            pairs[str(method)] = (group["subject"].astype(str).tolist(),
                                  group["volume_pred_mm3"].to_numpy(float), group["volume_ref_mm3"].to_numpy(float))
    return pairs


def show_cohort_result(scene, folder, name="Thalamus cohort", structure="both"):
    """Show the output folder of ``neuroatrophy thalamus cohort``.

    Parameters
    ----------
    scene : vtkMRMLScene
    folder : path
        Holds ``volumes.csv`` (subject, left, right, both) and, when references were given,
        ``metrics.csv`` (``evaluate_masks``' table) and ``agreement.csv``.
    name : str
        Prefix of the node names.
    structure : {"both", "left", "right"}
        Structure of the Bland-Altman charts.

    Returns
    -------
    dict
        ``volumes_table``; with references ``metrics_table``, ``agreement_table`` (if the
        file exists) and ``bland_altman_charts`` (dict method -> vtkMRMLPlotChartNode, for
        methods with at least :data:`MIN_BLAND_ALTMAN_SUBJECTS` subjects).

    Raises
    ------
    FileNotFoundError
        If ``volumes.csv`` is missing.
    """
    mrml._check_scene(scene)
    mrml._check_name(name)
    folder = Path(folder)
    volumes_file = folder / VOLUMES_FILE
    if not volumes_file.is_file():
        raise FileNotFoundError(f"no {VOLUMES_FILE} in {folder}")
    volumes = _read_csv(volumes_file)
    metrics_file, agreement_file = folder / METRICS_FILE, folder / AGREEMENT_FILE
    metrics = _read_csv(metrics_file) if metrics_file.is_file() else None
    agreement = _read_csv(agreement_file) if agreement_file.is_file() else None
    nodes = {}
    with _remove_added_nodes_on_error(scene):
        nodes["volumes_table"] = add_volume_table(scene, volumes, f"{name} volumes")
        if agreement is not None:
            nodes["agreement_table"] = mrml.table_from_dataframe(scene, agreement, f"{name} agreement")
        if metrics is not None:
            nodes["metrics_table"] = add_metrics_table(scene, metrics, f"{name} metrics")
            nodes["bland_altman_charts"] = {
                method: add_bland_altman_plot(scene, measured, reference, method, subjects=subjects,
                                              name=f"{name} Bland-Altman {method} ({structure})")
                for method, (subjects, measured, reference) in bland_altman_inputs(metrics, structure).items()
            }
    return nodes


def remove_thalamus_nodes(scene, nodes) -> None:
    """Remove nodes shown by this module (a ``show_*`` dict or a list); charts take their series and tables."""
    mrml._check_scene(scene)
    if isinstance(nodes, dict):
        nodes = list(nodes.values())
    flat = []
    for node in nodes:
        if isinstance(node, dict):
            flat += list(node.values())
        elif isinstance(node, (list, tuple)):
            flat += list(node)
        else:
            flat.append(node)
    expanded = []
    for node in flat:
        if node is None or isinstance(node, str) or not scene.IsNodePresent(node):
            continue
        if node.IsA("vtkMRMLPlotChartNode"):
            for index in range(node.GetNumberOfPlotSeriesNodes()):
                series = node.GetNthPlotSeriesNode(index)
                expanded += [series, series.GetTableNode() if series is not None else None]
        expanded.append(node)
    mrml.remove_nodes(scene, expanded)
