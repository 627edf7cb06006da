"""SuStaIn results in a real (slicer-core) MRML scene: tables, CV chart, stage sequences, rollback."""

import numpy as np
import pandas as pd
import pytest
import slicer

from neuroatrophy import mrml
from neuroatrophy.subtypes_atlas import RegionAtlas, onset_map, stage_maps
from neuroatrophy.subtypes_pipeline import SubtypesResult
from neuroatrophy.subtypes_scene import (
    OUTSIDE_VALUE,
    add_cv_plot,
    add_onset_volume,
    add_stage_sequence,
    add_subject_table,
    remove_subtype_nodes,
    show_subtypes,
)
from neuroatrophy.sustain import CVResult, SustainModel, event_spec

AFFINE = np.array([[-2.0, 0, 0, 10], [0, 2.0, 0, -20], [0, 0, 2.0, -30], [0, 0, 0, 1]])
BIOMARKERS = ["Cortical GM", "Brainstem", "Spinal cord"]


def _atlas():
    labels = np.zeros((6, 5, 4), dtype=np.int16)
    labels[:2] = 1
    labels[2:4] = 2
    labels[4, :3] = 3
    return RegionAtlas(labels, AFFINE, {"Cortical GM": [1, 2], "Brainstem": [3]}, name="toy")


def _model(n_subtypes=2):
    spec = event_spec([[1, 2], [1], [1, 2]], [3.0, 2.0, 4.0], BIOMARKERS)
    sequences = [[0, 1, 2, 3, 4], [2, 4, 1, 0, 3]][:n_subtypes]
    fractions = [0.7, 0.3][:n_subtypes] if n_subtypes > 1 else [1.0]
    return SustainModel("zscore", spec, sequences, fractions, -5.0, np.array([sequences]), [fractions], [0.0])


def _staged(model, n=6):
    return pd.DataFrame({"ml_subtype": np.arange(n) % model.n_subtypes + 1, "ml_stage": np.arange(n) % 4,
                         "prob_ml_subtype": np.linspace(0.5, 1, n), "normal_appearing": np.arange(n) % 4 == 0},
                        index=pd.Index([f"sub-{i}" for i in range(n)], name="subject_id"))


def _cv():
    table = pd.DataFrame({"n_subtypes": [1, 1, 2, 2], "fold": [1, 2, 1, 2], "test_loglik": [-12.0, -10, -8, -9]})
    cvic = pd.Series({1: 44.0, 2: 35.0}, name="CVIC").rename_axis("n_subtypes")
    return CVResult(table, cvic, table.groupby("n_subtypes")["test_loglik"].mean())


def _result(cv=None, biomarkers=BIOMARKERS):
    models = [_model(1), _model(2)]
    if biomarkers != BIOMARKERS:
        for model in models:
            model.spec = event_spec([[1, 2], [1], [1, 2]], [3.0, 2.0, 4.0], biomarkers)
    zscores = pd.DataFrame(np.zeros((6, 3)), columns=biomarkers, index=_staged(models[1]).index)
    return SubtypesResult(models=models, chosen_n_subtypes=2, staged=_staged(models[1]), cv=cv, zscores=zscores,
                          settings={})


def _node_ids(scene):
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def test_subject_table_holds_the_staging():
    scene = mrml.new_scene()
    staged = _staged(_model())
    table = mrml.dataframe_from_table(add_subject_table(scene, staged, "subjects"))
    assert list(table["subject_id"]) == list(staged.index)
    np.testing.assert_array_equal(table["ml_stage"], staged["ml_stage"])
    np.testing.assert_array_equal(table["normal_appearing"], staged["normal_appearing"])
    with pytest.raises(ValueError, match=r"staged lacks column\(s\) \['ml_stage'\]"):
        add_subject_table(scene, staged[["ml_subtype"]], "subjects")


def test_cv_plot_charts_cvic_per_number_of_subtypes():
    scene = mrml.new_scene()
    chart = add_cv_plot(scene, _cv(), "CV")
    assert chart.GetNumberOfPlotSeriesNodes() == 1
    series = chart.GetNthPlotSeriesNode(0)
    assert (series.GetXColumnName(), series.GetYColumnName()) == ("n_subtypes", "cvic")
    table = mrml.dataframe_from_table(series.GetTableNode())
    np.testing.assert_allclose(table["cvic"], [44, 35])
    np.testing.assert_allclose(table["mean_test_loglik"], [-11, -8.5])


def test_stage_sequence_has_one_volume_per_stage_with_the_stage_maps():
    scene = mrml.new_scene()
    model, atlas = _model(), _atlas()
    sequence, browser = add_stage_sequence(scene, model, atlas, 2, name="Subtype 2")
    expected = stage_maps(model, atlas, 2, background=OUTSIDE_VALUE)
    assert sequence.GetNumberOfDataNodes() == model.n_stages == 6
    assert [sequence.GetNthIndexValue(i) for i in range(6)] == ["0", "1", "2", "3", "4", "5"]
    for stage in range(6):
        item = sequence.GetNthDataNode(stage)
        np.testing.assert_allclose(mrml.array_from_volume(item), expected[stage].transpose(2, 1, 0))
        np.testing.assert_allclose(mrml.ijk_to_ras_from_volume(item), AFFINE)
    assert browser.GetMasterSequenceNode() is sequence
    proxy = browser.GetProxyNode(sequence)
    display = proxy.GetDisplayNode()
    high = float(model.trajectories().max())
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((0.0, high))
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(OUTSIDE_VALUE / 2)
    assert scene.GetNodeByID(display.GetColorNodeID()).GetName() == "NeuroAtrophy SuStaIn stage"
    for node in (sequence, browser, proxy):
        assert node.GetAttribute("NeuroAtrophy.UnmappedBiomarkers") == "Spinal cord"
        assert node.GetAttribute("NeuroAtrophy.Subtype") == "2"


def test_with_the_sequences_logic_the_proxy_follows_the_browser():
    scene = mrml.new_scene()
    logic = slicer.vtkSlicerSequencesLogic()
    logic.SetMRMLScene(scene)
    model, atlas = _model(), _atlas()
    sequence, browser = add_stage_sequence(scene, model, atlas, 1)
    expected = stage_maps(model, atlas, 1, background=OUTSIDE_VALUE)
    proxy = browser.GetProxyNode(sequence)
    color = proxy.GetDisplayNode().GetColorNodeID()
    for stage in (3, 5, 0):
        browser.SetSelectedItemNumber(stage)
        np.testing.assert_allclose(mrml.array_from_volume(proxy), expected[stage].transpose(2, 1, 0))
    assert proxy.GetDisplayNode().GetColorNodeID() == color  # display kept over stages


def test_onset_volume():
    scene = mrml.new_scene()
    model, atlas = _model(), _atlas()
    volume = add_onset_volume(scene, model, atlas, 1)
    np.testing.assert_array_equal(mrml.array_from_volume(volume), onset_map(model, atlas, 1).transpose(2, 1, 0))
    assert set(np.unique(mrml.array_from_volume(volume))) == {0, 1, 2}  # Cortical GM 1, Brainstem 2
    display = volume.GetDisplayNode()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (1.0, 5.0)


def test_show_subtypes_adds_everything_for_the_chosen_model():
    scene = mrml.new_scene()
    nodes = show_subtypes(scene, _result(cv=_cv()), atlas=_atlas())
    assert nodes["unmapped_biomarkers"] == ["Spinal cord"]
    assert len(nodes["stage_sequences"]) == len(nodes["stage_browsers"]) == len(nodes["onset_volumes"]) == 2
    assert nodes["subjects_table"].GetNumberOfRows() == 6
    assert nodes["cv_chart"].GetName() == "SuStaIn cross-validation"
    for sequence in nodes["stage_sequences"]:
        assert sequence.GetNumberOfDataNodes() == 6

    remove_subtype_nodes(scene, nodes)
    remaining = {scene.GetNthNode(i).GetClassName() for i in range(scene.GetNumberOfNodes())}
    assert remaining == {"vtkMRMLColorTableNode"}


def test_show_subtypes_with_the_default_atlas():
    scene = mrml.new_scene()
    nodes = show_subtypes(scene, _result())
    assert nodes["unmapped_biomarkers"] == ["Spinal cord"] and "cv_chart" not in nodes
    proxy = nodes["stage_browsers"][0].GetProxyNode(nodes["stage_sequences"][0])
    assert mrml.array_from_volume(proxy).shape == (91, 78, 72)  # aparc+aseg at 2 mm, KJI

    # No biomarker in the default atlas: no brain display, every biomarker listed.
    other = show_subtypes(mrml.new_scene(), _result(biomarkers=["region A", "region B", "region C"]))
    assert other["stage_sequences"] == [] and other["unmapped_biomarkers"] == ["region A", "region B", "region C"]


def test_errors_leave_the_scene_as_it_was():
    scene = mrml.new_scene()
    add_subject_table(scene, _staged(_model()), "existing")
    before = _node_ids(scene)

    # An explicit atlas without any of the biomarkers.
    with pytest.raises(ValueError, match="none of the biomarkers"):
        show_subtypes(scene, _result(biomarkers=["region A", "region B", "region C"]), atlas=_atlas())
    assert _node_ids(scene) == before

    # A broken CV result fails after the subjects table was added.
    with pytest.raises(ValueError, match="cv_result must be a CVResult"):
        show_subtypes(scene, _result(cv=object()), atlas=_atlas())
    assert _node_ids(scene) == before

    # A sheared atlas fails inside the sequence, after its node was added.
    sheared = _atlas()
    sheared.affine = sheared.affine.copy()
    sheared.affine[0, 1] = 1.0
    with pytest.raises(ValueError, match="no shear"):
        add_stage_sequence(scene, _model(), sheared, 1)
    assert _node_ids(scene) == before
