"""Thalamus results in a real (slicer-core) MRML scene: segmentations and back, tables, Bland-Altman chart."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import slicer

from neuroatrophy import mrml
from neuroatrophy.thalamus_eval import bland_altman, proportional_bias
from neuroatrophy.thalamus_labels import LEFT, RIGHT, STRUCTURE_COLORS
from neuroatrophy.thalamus_scene import (
    SEGMENT_IDS,
    TERMINOLOGY_TAG,
    add_bland_altman_plot,
    add_metrics_table,
    add_probability_volume,
    add_thalamus_segmentation,
    add_volume_table,
    image_from_volume,
    labels_from_labelmap,
    labels_from_node,
    labels_from_segmentation,
    remove_thalamus_nodes,
    segment_label,
    show_cohort_result,
    show_segmentation_result,
    terminology_entry,
    write_volume,
)

SHAPE = (12, 10, 8)


def _labels(shape=SHAPE):
    data = np.zeros(shape, dtype=np.int16)
    data[2:5, 3:7, 2:6] = LEFT
    data[7:10, 2:6, 3:7] = RIGHT
    data[3, 4, 3] = 0  # a hole: round trips must keep it
    return data


def _oblique_las_affine():
    """LAS voxel axes, anisotropic 1.2 x 0.9 x 2.5 mm, rotated 17 degrees about z and 8 about x."""
    a, b = np.deg2rad(17.0), np.deg2rad(8.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([-1.2, 0.9, 2.5])
    affine[:3, 3] = [31.5, -18.0, 4.25]
    return affine


def _node_ids(scene):
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def _segments(node):
    segmentation = node.GetSegmentation()
    return {segmentation.GetNthSegmentID(i): segmentation.GetNthSegment(i)
            for i in range(segmentation.GetNumberOfSegments())}


# ------------------------------------------------------------------ segmentation round trips


@pytest.mark.parametrize("affine", [np.diag([1.0, 1.0, 1.0, 1.0]), _oblique_las_affine()], ids=["RAS", "LAS-oblique"])
def test_label_image_round_trips_through_a_segmentation_node(affine):
    scene = mrml.new_scene()
    img = nib.Nifti1Image(_labels(), affine)

    node = add_thalamus_segmentation(scene, img, name="Thalamus")
    back = labels_from_segmentation(node)

    assert back.shape == SHAPE
    np.testing.assert_allclose(back.affine, affine, atol=1e-9)
    np.testing.assert_array_equal(np.asarray(back.dataobj), _labels())
    # On an explicit reference grid (the same one) too.
    np.testing.assert_array_equal(np.asarray(labels_from_segmentation(node, reference=img).dataobj), _labels())


def test_segments_are_in_world_space_left_is_negative_x():
    """Slicer's segment voxels sit where the nibabel affine puts them (no i/k swap, no LPS flip)."""
    scene = mrml.new_scene()
    affine = _oblique_las_affine()
    node = add_thalamus_segmentation(scene, nib.Nifti1Image(_labels(), affine))
    image = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(node, SEGMENT_IDS[LEFT], image)
    from vtk.util import numpy_support

    dims = image.GetDimensions()
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
    k, j, i = np.argwhere(values > 0).mean(axis=0)
    vtk_matrix = mrml._mrml()[1].vtkMatrix4x4()
    image.GetImageToWorldMatrix(vtk_matrix)
    matrix = np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    extent = image.GetExtent()
    centre = matrix @ [i + extent[0], j + extent[2], k + extent[4], 1.0]
    expected = affine @ [*np.argwhere(_labels() == LEFT).mean(axis=0), 1.0]
    np.testing.assert_allclose(centre[:3], expected[:3], atol=1e-6)


def test_segment_names_colours_and_terminology():
    scene = mrml.new_scene()
    node = add_thalamus_segmentation(scene, nib.Nifti1Image(_labels(), np.eye(4)), name="Ours")
    segments = _segments(node)
    assert list(segments) == [SEGMENT_IDS[LEFT], SEGMENT_IDS[RIGHT]]
    assert [s.GetName() for s in segments.values()] == ["Left thalamus", "Right thalamus"]
    for label, segment in zip((LEFT, RIGHT), segments.values()):
        np.testing.assert_allclose(segment.GetColor(), STRUCTURE_COLORS[label])
        value = mrml._mrml()[1].reference("")
        assert segment.GetTag(TERMINOLOGY_TAG, value)
        assert str(value) == terminology_entry(label)
        assert segment_label(segment) == label
    assert terminology_entry(LEFT) == (
        "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure"
        "~SCT^42695009^Thalamus~SCT^7771000^Left~Anatomic codes - DICOM master list~^^~^^")

    # Slicer's own parser reads the tag back: Thalamus with the Right modifier.
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(terminology_entry(RIGHT), entry)
    assert entry.GetTerminologyContextName() == "Segmentation category and type - DICOM master list"
    assert (entry.GetCategoryObject().GetCodeValue(), entry.GetCategoryObject().GetCodeMeaning()) == (
        "123037004", "Anatomical Structure")
    assert (entry.GetTypeObject().GetCodingSchemeDesignator(), entry.GetTypeObject().GetCodeValue(),
            entry.GetTypeObject().GetCodeMeaning()) == ("SCT", "42695009", "Thalamus")
    assert (entry.GetTypeModifierObject().GetCodeValue(), entry.GetTypeModifierObject().GetCodeMeaning()) == (
        "24028007", "Right")


def test_the_segmentation_survives_a_scene_file_round_trip(tmp_path):
    scene = mrml.new_scene()
    affine = _oblique_las_affine()
    add_thalamus_segmentation(scene, nib.Nifti1Image(_labels(), affine), name="Thalamus")
    mrml.save_scene(scene, tmp_path / "scene.mrml")

    loaded = mrml.load_scene(tmp_path / "scene.mrml")
    node = loaded.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    assert [segment_label(s) for s in _segments(node).values()] == [LEFT, RIGHT]
    back = labels_from_segmentation(node, reference=nib.Nifti1Image(_labels(), affine))
    np.testing.assert_array_equal(np.asarray(back.dataobj), _labels())


def test_a_linear_parent_transform_moves_the_labels():
    scene = mrml.new_scene()
    affine = _oblique_las_affine()
    node = add_thalamus_segmentation(scene, nib.Nifti1Image(_labels(), affine))
    volume = mrml.add_volume(scene, _labels().transpose(2, 1, 0), affine, "labels", label_map=True)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = mrml._mrml()[1].vtkMatrix4x4()
    matrix.SetElement(0, 3, 10.0)
    transform.SetMatrixTransformToParent(matrix)
    moved = affine.copy()
    moved[0, 3] += 10.0
    for shown in (node, volume):
        shown.SetAndObserveTransformNodeID(transform.GetID())
        back = labels_from_node(shown)
        np.testing.assert_allclose(back.affine, moved, atol=1e-9)
        np.testing.assert_array_equal(np.asarray(back.dataobj), _labels())


def test_an_absent_side_still_gets_an_empty_segment():
    scene = mrml.new_scene()
    data = _labels()
    data[data == RIGHT] = 0
    node = add_thalamus_segmentation(scene, nib.Nifti1Image(data, np.eye(4)))
    assert list(_segments(node)) == [SEGMENT_IDS[LEFT], SEGMENT_IDS[RIGHT]]
    np.testing.assert_array_equal(np.asarray(labels_from_segmentation(node).dataobj), data)


def test_reference_volume_sets_the_segmentation_geometry():
    scene = mrml.new_scene()
    affine = _oblique_las_affine()
    volume = mrml.add_volume(scene, np.zeros(SHAPE[::-1], dtype=np.float32), affine, "T1w")
    node = add_thalamus_segmentation(scene, nib.Nifti1Image(_labels(), affine), reference_volume_node=volume)
    back = labels_from_segmentation(node)  # on the reference volume's grid
    np.testing.assert_allclose(back.affine, affine, atol=1e-9)
    np.testing.assert_array_equal(np.asarray(back.dataobj), _labels())


def test_segments_resample_onto_a_finer_reference_grid():
    """Nearest neighbour onto a 0.5 mm grid offset by a quarter voxel (no ties), checked point by point."""
    scene = mrml.new_scene()
    coarse = np.diag([1.0, 1.0, 1.0, 1.0])
    node = add_thalamus_segmentation(scene, nib.Nifti1Image(_labels(), coarse))
    fine_affine = np.diag([0.5, 0.5, 0.5, 1.0])
    fine_affine[:3, 3] = 0.25
    fine_shape = (20, 16, 12)

    back = labels_from_segmentation(node, reference=nib.Nifti1Image(np.zeros(fine_shape, np.int16), fine_affine))

    ijk = np.indices(fine_shape).reshape(3, -1)
    coarse_index = np.rint(0.25 + 0.5 * ijk).astype(int)  # world = 0.25 + 0.5 i; coarse index = world
    inside = np.all(coarse_index < np.array(SHAPE)[:, None], axis=0)
    expected = np.zeros(ijk.shape[1], dtype=np.int16)
    expected[inside] = _labels()[tuple(coarse_index[:, inside])]
    np.testing.assert_array_equal(np.asarray(back.dataobj).ravel(), expected.reshape(fine_shape).ravel())


def test_imported_shared_labelmap_segments_are_read_by_name():
    """Segmentations made in Slicer share one labelmap layer; names like FreeSurfer's identify the sides."""
    scene = mrml.new_scene()
    data = _labels()
    labelmap = mrml.add_volume(scene, data.transpose(2, 1, 0), np.eye(4), "aseg", label_map=True)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "imported")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node, "")
    segments = _segments(node)
    assert node.GetSegmentation().GetNumberOfLayers() == 1
    for segment in segments.values():
        segment.SetName({LEFT: "Left-Thalamus", RIGHT: "Thalamus_R"}[segment.GetLabelValue()])

    back = labels_from_segmentation(node, reference=nib.Nifti1Image(data, np.eye(4)))
    np.testing.assert_array_equal(np.asarray(back.dataobj), data)


def test_unidentified_segments_are_named_in_the_error_and_a_mapping_resolves_them():
    scene = mrml.new_scene()
    node = add_thalamus_segmentation(scene, nib.Nifti1Image(_labels(), np.eye(4)))
    segmentation = node.GetSegmentation()
    for segment_id, name in zip(SEGMENT_IDS.values(), ("Segment_1", "Segment_2")):
        segment = segmentation.GetSegment(segment_id)
        segment.SetName(name)
        segment.RemoveTag(TERMINOLOGY_TAG)
    with pytest.raises(ValueError, match=r"segment 'Segment_1' \(ID 'Left_thalamus'\).*cannot be identified"):
        labels_from_segmentation(node)

    both = labels_from_segmentation(node, segment_labels={"Segment_1": "left", SEGMENT_IDS[RIGHT]: 49})
    np.testing.assert_array_equal(np.asarray(both.dataobj), _labels())
    only_left = labels_from_segmentation(node, segment_labels={"Segment_1": LEFT})
    np.testing.assert_array_equal(np.asarray(only_left.dataobj), np.where(_labels() == LEFT, LEFT, 0))
    with pytest.raises(ValueError, match="no segment with ID or name 'Segment_9'"):
        labels_from_segmentation(node, segment_labels={"Segment_9": LEFT})
    with pytest.raises(ValueError, match=r"segment_labels\['Segment_1'\] must be 10"):
        labels_from_segmentation(node, segment_labels={"Segment_1": 3})


def test_left_and_right_segments_that_overlap_are_refused():
    scene = mrml.new_scene()
    node = add_thalamus_segmentation(scene, nib.Nifti1Image(_labels(), np.eye(4)))
    # A third segment, drawn over the left thalamus but called right.
    left = (_labels() == LEFT).astype(np.uint8)
    extra = mrml.add_volume(scene, left.transpose(2, 1, 0), np.eye(4), "extra", label_map=True)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(extra, node, "")
    segmentation = node.GetSegmentation()
    segmentation.GetNthSegment(2).SetName("Right thalamus (pulvinar)")
    with pytest.raises(ValueError, match=r"segment 'Right thalamus \(pulvinar\)' overlaps the other side's "
                                         r"thalamus in 47 voxels"):
        labels_from_segmentation(node)


def test_label_maps_with_other_values_or_shear_are_refused():
    scene = mrml.new_scene()
    data = _labels()
    data[0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"labels_img: a thalamus label map holds 0, 10 and 49 only; found \[3\]"):
        add_thalamus_segmentation(scene, nib.Nifti1Image(data, np.eye(4)))
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(ValueError, match="labels_img: .*no shear"):
        add_thalamus_segmentation(scene, nib.Nifti1Image(_labels(), sheared))
    assert scene.GetNumberOfNodes() == 0


# ------------------------------------------------------------------ labelmap and scalar volumes


def test_labelmap_volume_to_labels_with_a_value_mapping_and_resampling():
    scene = mrml.new_scene()
    aal = np.where(_labels() == LEFT, 77, np.where(_labels() == RIGHT, 78, 0)).astype(np.int16)
    aal[0, 0, 0] = 5  # another structure, dropped by the mapping
    affine = _oblique_las_affine()
    volume = mrml.add_volume(scene, aal.transpose(2, 1, 0), affine, "aal", label_map=True)

    with pytest.raises(ValueError, match=r"volume 'aal' holds values \[5, 77, 78\] besides 0, 10 and 49"):
        labels_from_labelmap(volume)
    img = labels_from_node(volume, labels={77: "left", 78: RIGHT})
    np.testing.assert_allclose(img.affine, affine, atol=1e-9)
    np.testing.assert_array_equal(np.asarray(img.dataobj), _labels())

    # Onto a grid shifted by whole voxels: a shifted copy.
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, :3] @ [2, 1, 0]
    moved = labels_from_labelmap(volume, reference=nib.Nifti1Image(np.zeros(SHAPE, np.int16), shifted),
                                 value_labels={77: LEFT, 78: RIGHT})
    expected = np.zeros(SHAPE, np.int16)
    expected[:-2, :-1] = _labels()[2:, 1:]
    np.testing.assert_array_equal(np.asarray(moved.dataobj), expected)

    with pytest.raises(ValueError, match="must be a segmentation or a labelmap volume node"):
        labels_from_node(scene.AddNewNodeByClass("vtkMRMLTableNode"))


def test_volume_node_to_nifti_keeps_voxels_and_geometry(tmp_path):
    scene = mrml.new_scene()
    affine = _oblique_las_affine()
    values = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    volume = mrml.add_volume(scene, values.transpose(2, 1, 0), affine, "T1w")

    img = image_from_volume(volume)
    np.testing.assert_array_equal(np.asarray(img.dataobj), values)
    np.testing.assert_allclose(img.affine, affine, atol=1e-9)

    path = write_volume(volume, tmp_path / "t1w.nii.gz")
    read = nib.load(path)
    np.testing.assert_array_equal(np.asarray(read.dataobj), values)
    np.testing.assert_allclose(read.affine, affine, atol=1e-5)
    assert volume.GetStorageNode() is None  # the node is left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t1w.nii.gz"]


def test_probability_volume():
    scene = mrml.new_scene()
    probability = np.linspace(0, 1, np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    volume = add_probability_volume(scene, nib.Nifti1Image(probability, _oblique_las_affine()), "p")
    np.testing.assert_array_equal(mrml.array_from_volume(volume), probability.transpose(2, 1, 0))
    np.testing.assert_allclose(mrml.ijk_to_ras_from_volume(volume), _oblique_las_affine(), atol=1e-9)
    display = volume.GetDisplayNode()
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((1.0, 0.5))


# ------------------------------------------------------------------ tables and the Bland-Altman chart


def test_volume_and_metrics_tables():
    scene = mrml.new_scene()
    table = mrml.dataframe_from_table(add_volume_table(scene, {"left": 8000.0, "right": 7900.5, "both": 15900.5}))
    assert list(table["structure"]) == ["left", "right", "both"]
    np.testing.assert_allclose(table["volume_mm3"], [8000.0, 7900.5, 15900.5])

    cohort = pd.DataFrame({"subject": ["a", "b"], "left": [1.0, 2.0], "right": [3.0, 4.0], "both": [4.0, 6.0]})
    pd.testing.assert_frame_equal(mrml.dataframe_from_table(add_volume_table(scene, cohort, "cohort")), cohort,
                                  check_dtype=False)

    metrics = pd.DataFrame({"subject": [None, None], "method": ["ours", "ours"], "structure": ["left", "both"],
                            "dice": [0.9, 0.85], "hd95_mm": [1.0, np.nan]})
    stored = mrml.dataframe_from_table(add_metrics_table(scene, metrics, "metrics"))
    assert list(stored["subject"]) == ["", ""]
    np.testing.assert_allclose(stored["dice"], [0.9, 0.85])
    assert np.isnan(stored["hd95_mm"][1])
    with pytest.raises(ValueError, match=r"metrics lacks column\(s\) \['dice'\]"):
        add_metrics_table(scene, metrics.drop(columns="dice"))
    with pytest.raises(ValueError, match="volumes must map structures to numbers"):
        add_volume_table(scene, {"left": "big"})


def _simulated_volumes(n=30, seed=3):
    rng = np.random.default_rng(seed)
    reference = rng.normal(8000, 800, n)
    measured = 1.1 * reference - 300 + rng.normal(0, 150, n)  # proportional bias 0.1
    return measured, reference


def test_bland_altman_chart_draws_the_computed_statistics():
    scene = mrml.new_scene()
    measured, reference = _simulated_volumes()
    subjects = [f"sub-{i:02d}" for i in range(len(measured))]
    stats = bland_altman(measured, reference)
    fit = proportional_bias(measured, reference)

    chart = add_bland_altman_plot(scene, measured, reference, "ours", subjects=subjects)

    assert chart.GetName() == "Bland-Altman ours"
    series = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
    assert [s.GetYColumnName() for s in series] == ["difference", "bias", "loa_low", "loa_high", "fit"]
    assert series[0].GetPlotType() == series[0].PlotTypeScatter
    points = mrml.dataframe_from_table(series[0].GetTableNode())
    assert list(points["subject"]) == subjects
    np.testing.assert_allclose(points["mean"], (measured + reference) / 2)
    np.testing.assert_allclose(points["difference"], measured - reference)
    lines = mrml.dataframe_from_table(series[1].GetTableNode())
    np.testing.assert_allclose(lines["mean"], [points["mean"].min(), points["mean"].max()])
    np.testing.assert_allclose(lines["bias"], [stats.bias] * 2)
    np.testing.assert_allclose(lines["loa_low"], [stats.bias - 1.959964 * stats.sd] * 2, rtol=1e-6)
    np.testing.assert_allclose(lines["loa_high"], [stats.loa_high] * 2)
    np.testing.assert_allclose(lines["fit"], fit.intercept + fit.slope * lines["mean"])
    assert 0.05 < fit.slope < 0.15  # the simulated proportional bias, seen by the chart's line
    assert float(chart.GetAttribute("NeuroAtrophy.BlandAltman.bias")) == pytest.approx(stats.bias)
    assert float(chart.GetAttribute("NeuroAtrophy.ProportionalBias.slope")) == pytest.approx(fit.slope)

    remove_thalamus_nodes(scene, [chart])
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 0
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == 0


def test_bland_altman_in_percent_and_with_two_pairs():
    scene = mrml.new_scene()
    measured, reference = _simulated_volumes(n=10)
    chart = add_bland_altman_plot(scene, measured, reference, "ours", percent=True)
    lines = mrml.dataframe_from_table(chart.GetNthPlotSeriesNode(1).GetTableNode())
    np.testing.assert_allclose(lines["bias"], bland_altman(measured, reference, percent=True).bias)
    np.testing.assert_allclose(lines["fit"].iloc[0], proportional_bias(measured, reference, percent=True).intercept
                               + proportional_bias(measured, reference, percent=True).slope * lines["mean"].iloc[0])
    assert "(%)" in chart.GetYAxisTitle()

    two = add_bland_altman_plot(scene, [1.0, 2.0], [1.5, 2.0], "two", name="two pairs")
    assert two.GetNumberOfPlotSeriesNodes() == 4  # no regression line through two points


# ------------------------------------------------------------------ result folders and rollback


def _segment_folder(folder, affine):
    folder.mkdir()
    nib.save(nib.Nifti1Image(_labels(), affine), folder / "thalamus_labels.nii.gz")
    pd.DataFrame({"structure": ["left", "right", "both"], "volume_mm3": [1.0, 2.0, 3.0]}).to_csv(
        folder / "volumes.csv", index=False)
    return folder


def test_show_segmentation_result(tmp_path):
    scene = mrml.new_scene()
    folder = _segment_folder(tmp_path / "out", _oblique_las_affine())
    nib.save(nib.Nifti1Image(np.full(SHAPE, 0.5, np.float32), _oblique_las_affine()),
             folder / "thalamus_probability.nii.gz")
    nodes = show_segmentation_result(scene, folder, name="T", probability=True)
    np.testing.assert_array_equal(np.asarray(labels_from_segmentation(nodes["segmentation"]).dataobj), _labels())
    np.testing.assert_allclose(mrml.dataframe_from_table(nodes["volumes_table"])["volume_mm3"], [1.0, 2.0, 3.0])
    assert nodes["probability_volume"].GetName() == "T probability"
    remove_thalamus_nodes(scene, nodes)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 0


def test_show_cohort_result_with_metrics(tmp_path):
    scene = mrml.new_scene()
    measured, reference = _simulated_volumes(n=6)
    subjects = [f"s{i}" for i in range(6)]
    pd.DataFrame({"subject": subjects, "left": measured / 2, "right": measured / 2, "both": measured}).to_csv(
        tmp_path / "volumes.csv", index=False)
    metrics = pd.DataFrame({"subject": subjects * 2, "method": ["ours"] * 6 + ["atlas"] * 6,
                            "structure": ["both"] * 12, "dice": np.linspace(0.7, 0.9, 12),
                            "volume_pred_mm3": np.r_[measured, reference + 500],
                            "volume_ref_mm3": np.r_[reference, reference]})
    metrics.to_csv(tmp_path / "metrics.csv", index=False)
    pd.DataFrame({"method": ["ours"], "structure": ["both"], "bias": [1.0]}).to_csv(tmp_path / "agreement.csv",
                                                                                   index=False)
    nodes = show_cohort_result(scene, tmp_path, name="C")
    assert list(mrml.dataframe_from_table(nodes["volumes_table"])["subject"]) == subjects
    assert mrml.dataframe_from_table(nodes["agreement_table"])["bias"].tolist() == [1.0]
    assert sorted(nodes["bland_altman_charts"]) == ["atlas", "ours"]
    atlas = nodes["bland_altman_charts"]["atlas"]
    assert float(atlas.GetAttribute("NeuroAtrophy.BlandAltman.bias")) == pytest.approx(500.0)
    assert float(atlas.GetAttribute("NeuroAtrophy.BlandAltman.sd")) == pytest.approx(0.0, abs=1e-9)


def test_errors_leave_the_scene_as_it_was(tmp_path):
    scene = mrml.new_scene()
    volume = mrml.add_volume(scene, np.zeros((2, 2, 2), np.float32), np.eye(4), "T1w")
    before = _node_ids(scene)

    # The probability file is unreadable: the segmentation and table added before are removed.
    folder = _segment_folder(tmp_path / "bad", np.eye(4))
    (folder / "thalamus_probability.nii.gz").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="probability image: could not read"):
        show_segmentation_result(scene, folder, reference_volume_node=volume, probability=True)
    assert _node_ids(scene) == before

    # metrics.csv without volumes: the tables added before the charts are removed.
    pd.DataFrame({"subject": ["a"], "left": [1.0], "right": [1.0], "both": [2.0]}).to_csv(
        tmp_path / "volumes.csv", index=False)
    pd.DataFrame({"subject": ["a"], "method": ["m"], "structure": ["both"], "dice": [0.8]}).to_csv(
        tmp_path / "metrics.csv", index=False)
    with pytest.raises(ValueError, match=r"metrics lacks column\(s\) \['volume_pred_mm3', 'volume_ref_mm3'\]"):
        show_cohort_result(scene, tmp_path)
    assert _node_ids(scene) == before

    with pytest.raises(ValueError, match="need non-zero means"):
        add_bland_altman_plot(scene, [0.0, 1.0, 2.0], [0.0, 1.0, 3.0], "m", percent=True)
    with pytest.raises(ValueError, match="must be paired"):
        add_bland_altman_plot(scene, [1.0, 2.0, 3.0], [1.0, 2.0], "m")
    other = mrml.new_scene().AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    with pytest.raises(ValueError, match="reference_volume_node .* is not in the scene"):
        add_thalamus_segmentation(scene, nib.Nifti1Image(_labels(), np.eye(4)), reference_volume_node=other)
    with pytest.raises(FileNotFoundError, match="no thalamus_labels.nii.gz in"):
        show_segmentation_result(scene, tmp_path / "missing")
    assert _node_ids(scene) == before
