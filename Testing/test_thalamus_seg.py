"""Thalamus segmentation: model files, label post-processing, ensembles and whole-scan segmentation.

Whole-scan tests use an "oracle" model whose network ignores its input and returns the DK atlas'
thalami on the box: the segmentation of a real head (Colin27, moved by a known rigid motion)
then tests registration, the box and the mapping back to the scan's own grid against the AAL
thalamus drawn on that scan.
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from neuroatrophy.parallel import Cancelled
from neuroatrophy.thalamus_labels import LEFT, RIGHT, thalamus_volumes
from neuroatrophy.thalamus_net import (
    DEFAULT_ARCHITECTURE,
    MODEL_FORMAT_VERSION,
    ThalamusModel,
    build_network,
    load_model,
)
from neuroatrophy.thalamus_seg import ThalamusSegmenter, ensemble_labels, largest_component_per_side
from neuroatrophy.thalamus_synth import THALAMUS_BOX, box_affine, source_label_map

torch.set_num_threads(1)

MRICRON = Path("/usr/share/mricron/templates")
AAL_LEFT, AAL_RIGHT = 77, 78
SMALL_ARCHITECTURE = {**DEFAULT_ARCHITECTURE, "channels": [4, 8, 16], "strides": [2, 2]}


def _dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


# ------------------------------------------------------------------ model files


def _outputs(network, seed=0):
    x = torch.from_numpy(np.random.default_rng(seed).random((1, 1, 16, 16, 16)).astype(np.float32))
    with torch.inference_mode():
        return network.eval()(x).numpy()


def test_model_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = ThalamusModel(network=build_network(SMALL_ARCHITECTURE), architecture=SMALL_ARCHITECTURE,
                          box=THALAMUS_BOX, training={"note": "test"})
    weights = model.save(tmp_path / "sub" / "tiny.json")  # either suffix names the pair
    assert weights == tmp_path / "sub" / "tiny.safetensors"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["tiny.json", "tiny.safetensors"]
    loaded = load_model(tmp_path / "sub" / "tiny")
    np.testing.assert_array_equal(_outputs(loaded.network), _outputs(model.network))
    assert loaded.architecture == SMALL_ARCHITECTURE
    assert tuple(loaded.box["shape"]) == tuple(THALAMUS_BOX["shape"])
    assert loaded.training == {"note": "test"}
    assert loaded.path == weights
    assert not loaded.network.training  # eval mode


def test_default_architecture_builds_and_maps_the_box_to_three_classes():
    network = build_network()
    with torch.inference_mode():
        out = network.eval()(torch.zeros((1, 1, 32, 32, 32)))
    assert out.shape == (1, 3, 32, 32, 32)
    with pytest.raises(ValueError, match="unknown thalamus network architecture 'nnunet'"):
        build_network({**DEFAULT_ARCHITECTURE, "name": "nnunet"})


@pytest.fixture
def saved_model(tmp_path):
    model = ThalamusModel(network=build_network(SMALL_ARCHITECTURE), architecture=SMALL_ARCHITECTURE,
                          box=THALAMUS_BOX)
    model.save(tmp_path / "model")
    return tmp_path / "model"


def _edit_metadata(base, **changes):
    meta_path = base.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta.update(changes)
    meta_path.write_text(json.dumps(meta))
    return meta_path


def test_newer_model_format_is_refused_naming_the_file(saved_model):
    meta_path = _edit_metadata(saved_model, format_version=MODEL_FORMAT_VERSION + 1)
    with pytest.raises(ValueError, match=f"{meta_path}: model format version {MODEL_FORMAT_VERSION + 1} is newer"):
        load_model(saved_model)


def test_weights_of_another_architecture_are_refused_naming_the_file(saved_model):
    _edit_metadata(saved_model, architecture={**SMALL_ARCHITECTURE, "channels": [8, 16, 32]})
    weights = saved_model.with_suffix(".safetensors")
    with pytest.raises(ValueError, match=f"{weights}: weights do not match the architecture in model.json"):
        load_model(weights)


def test_missing_or_broken_model_files_are_named(saved_model):
    saved_model.with_suffix(".json").write_text("{not json")
    with pytest.raises(ValueError, match="model.json: not a valid model metadata file"):
        load_model(saved_model)
    saved_model.with_suffix(".json").write_text(json.dumps({"kind": "something else", "format_version": 1}))
    with pytest.raises(ValueError, match="model.json: not a NeuroAtrophy thalamus model"):
        load_model(saved_model)
    saved_model.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="model.json"):
        load_model(saved_model)
    with pytest.raises(FileNotFoundError, match="elsewhere.safetensors"):
        load_model(saved_model.parent / "elsewhere.safetensors")


def test_segmenter_refuses_an_empty_model_list_and_names_a_missing_model(tmp_path):
    with pytest.raises(ValueError, match="models: give at least one model"):
        ThalamusSegmenter(models=[])
    with pytest.raises(FileNotFoundError, match="absent_model.safetensors"):
        ThalamusSegmenter(models=tmp_path / "absent_model.safetensors")


# ------------------------------------------------------------------ labels and ensembles


def test_largest_component_per_side_keeps_the_largest_blob_of_each_side():
    labels = np.zeros((20, 10, 10), np.int16)
    labels[2:5, 2:5, 2:5] = LEFT       # 27 voxels
    labels[7:9, 7, 7] = LEFT           # 2 voxels, separate
    labels[12:14, 2:4, 2:4] = RIGHT    # 8 voxels
    labels[14, 4, 4] = RIGHT           # touches the block at a corner only: 26-connected, kept
    labels[18, 8, 8] = RIGHT           # isolated
    labels[16:18, 0:3, 0:3] = 0
    out = largest_component_per_side(labels)
    expected = np.zeros_like(labels)
    expected[2:5, 2:5, 2:5] = LEFT
    expected[12:14, 2:4, 2:4] = RIGHT
    expected[14, 4, 4] = RIGHT
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == labels.dtype
    np.testing.assert_array_equal(largest_component_per_side(np.zeros((4, 4, 4), np.int16)), 0)


def _maps():
    """Three members on an (8, 4, 4) grid: left block at x 1-2, right block at x 5-6, and disagreements."""
    base = np.zeros((8, 4, 4), np.int16)
    base[1:3] = LEFT
    base[5:7] = RIGHT
    m1, m2, m3 = base.copy(), base.copy(), base.copy()
    m2[3, 0, 0] = LEFT      # 2 of 3 vote left at (3, 0, 0)
    m3[3, 0, 0] = LEFT
    m3[1, 0, 0] = 0         # 1 of 3 votes background at (1, 0, 0)
    m2[4, 1, 1] = LEFT      # (4, 1, 1): a three-way tie 0 / left / right
    m3[4, 1, 1] = RIGHT
    m1[3, 2, 2] = RIGHT     # (3, 2, 2): one vote only, for right
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    return [nib.Nifti1Image(m, affine) for m in (m1, m2, m3)], base


def test_majority_vote_of_three_hand_made_maps():
    members, base = _maps()
    labels, vote = ensemble_labels(members, "majority")
    expected = base.copy()
    expected[3, 0, 0] = LEFT
    np.testing.assert_array_equal(np.asarray(labels.dataobj), expected)  # the tie goes to background
    expected_vote = (base > 0).astype(np.float32)
    expected_vote[3, 0, 0] = 2 / 3
    expected_vote[1, 0, 0] = 2 / 3
    expected_vote[4, 1, 1] = 2 / 3
    expected_vote[3, 2, 2] = 1 / 3
    np.testing.assert_allclose(np.asarray(vote.dataobj), expected_vote, atol=1e-6)
    np.testing.assert_allclose(labels.affine, members[0].affine)


def test_majority_ties_go_to_the_larger_probability_but_never_outvote():
    members, base = _maps()
    tie_break = np.zeros((3, 8, 4, 4), np.float32)
    tie_break[0] = 1.0
    tie_break[:, 4, 1, 1] = (0.2, 0.3, 0.5)   # tie at (4, 1, 1): right is most probable
    tie_break[:, 3, 0, 0] = (0.0, 0.0, 1.0)   # two votes for left beat any probability of right
    labels, _ = ensemble_labels(members, "majority", tie_break=tie_break)
    expected = base.copy()
    expected[3, 0, 0] = LEFT
    expected[4, 1, 1] = RIGHT
    np.testing.assert_array_equal(np.asarray(labels.dataobj), expected)


def test_staple_of_identical_members_returns_them():
    members, base = _maps()
    same = [nib.Nifti1Image(base.copy(), members[0].affine) for _ in range(3)]
    labels, vote = ensemble_labels(same, "staple")
    np.testing.assert_array_equal(np.asarray(labels.dataobj), base)
    np.testing.assert_array_equal(np.asarray(vote.dataobj), (base > 0).astype(np.float32))


def test_staple_follows_the_consensus_of_disagreeing_members():
    members, base = _maps()
    labels, _ = ensemble_labels(members, "staple")
    out = np.asarray(labels.dataobj)
    assert set(np.unique(out).tolist()) <= {0, LEFT, RIGHT}
    assert _dice(out == LEFT, base == LEFT) > 0.9 and _dice(out == RIGHT, base == RIGHT) > 0.9


def test_ensemble_refuses_mismatched_grids_and_bad_arguments():
    members, _ = _maps()
    shifted = nib.Nifti1Image(np.asarray(members[1].dataobj), np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match=r"label map 1 \(member 1\) is not on the grid of the first one"):
        ensemble_labels([members[0], shifted, members[2]])
    smaller = nib.Nifti1Image(np.asarray(members[2].dataobj)[:7], members[2].affine)
    with pytest.raises(ValueError, match=r"label map 2 \(member 2\) is not on the grid"):
        ensemble_labels([members[0], members[1], smaller])
    with pytest.raises(ValueError, match="at least two"):
        ensemble_labels(members[:1])
    with pytest.raises(ValueError, match="method must be 'majority' or 'staple', got 'mean'"):
        ensemble_labels(members, "mean")


# ------------------------------------------------------------------ the network on the box


class _Conv(torch.nn.Module):
    """A small random convolutional network with no left/right symmetry."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)

    def forward(self, x):
        return 4.0 * self.conv(x)


class _MirrorSymmetric(torch.nn.Module):
    """Exactly left/right symmetric: mirroring the input mirrors the output and swaps left and right."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        mirrored = torch.flip(self.inner(torch.flip(x, dims=[2])), dims=[2])[:, [0, 2, 1]]
        return self.inner(x) + mirrored


def test_tta_of_a_mirror_symmetric_model_changes_nothing():
    image = np.random.default_rng(0).random(THALAMUS_BOX["shape"]).astype(np.float32)
    symmetric = ThalamusModel(network=_MirrorSymmetric(_Conv(1)).eval(), box=THALAMUS_BOX)
    plain = ThalamusSegmenter(models=symmetric).predict_box(image)
    tta = ThalamusSegmenter(models=symmetric, tta=True).predict_box(image)
    assert plain.shape == (3,) + tuple(THALAMUS_BOX["shape"])
    np.testing.assert_allclose(plain.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(tta, plain, atol=1e-5)
    # an asymmetric model does change under TTA (so the check above can fail)
    asymmetric = ThalamusModel(network=_Conv(1).eval(), box=THALAMUS_BOX)
    plain = ThalamusSegmenter(models=asymmetric).predict_box(image)
    tta = ThalamusSegmenter(models=asymmetric, tta=True).predict_box(image)
    assert np.abs(tta - plain).max() > 0.05


# ------------------------------------------------------------------ whole scans


def _dk_thalamus_on_box():
    source = source_label_map()
    to_source = np.linalg.inv(source.affine) @ box_affine()
    ijk = np.indices(THALAMUS_BOX["shape"]).reshape(3, -1)
    index = np.floor(to_source[:3, :3] @ ijk + to_source[:3, 3:4] + 0.5).astype(int)
    labels = np.asarray(source.dataobj)[tuple(index)].reshape(THALAMUS_BOX["shape"])
    return np.stack([~np.isin(labels, (LEFT, RIGHT)), labels == LEFT, labels == RIGHT]).astype(np.float32)


class _AtlasOracle(torch.nn.Module):
    """Returns the DK atlas' thalami on the box whatever the image."""

    def __init__(self):
        super().__init__()
        self.register_buffer("logits", torch.from_numpy(8.0 * _dk_thalamus_on_box()))

    def forward(self, x):
        return self.logits[None] + 0.0 * x


def _rotation(axis, degrees):
    angle = np.deg2rad(degrees)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(4)
    r[i, i] = r[j, j] = np.cos(angle)
    r[i, j], r[j, i] = -np.sin(angle), np.sin(angle)
    return r


@pytest.fixture(scope="module")
def oracle():
    return ThalamusModel(network=_AtlasOracle().eval(), box=THALAMUS_BOX)


@pytest.fixture(scope="module")
def head():
    """Colin27 and its AAL labels, moved by a rigid motion (affine only), and a 2 mm LAS copy of the head."""
    ch2 = nib.load(str(MRICRON / "ch2.nii.gz"))
    motion = _rotation(1, 10.0) @ _rotation(2, 6.0)
    motion[:3, 3] = (12.0, -8.0, 15.0)
    affine = motion @ ch2.affine
    data = np.asarray(ch2.dataobj, dtype=np.float32)
    scan = nib.Nifti1Image(data, affine)
    aal = np.asarray(nib.load(str(MRICRON / "aal.nii.gz")).dataobj)
    # 2 mm: means of 2x2x2 blocks, stored right to left (LAS); block (I, J, K) is centred on the 1 mm
    # voxel coordinates (2I + 0.5, 2J + 0.5, 2K + 0.5)
    n = (np.asarray(data.shape) // 2) * 2
    blocks = data[:n[0], :n[1], :n[2]].reshape(n[0] // 2, 2, n[1] // 2, 2, n[2] // 2, 2).mean(axis=(1, 3, 5))
    coarse = np.diag([2.0, 2.0, 2.0, 1.0])
    coarse[:3, 3] = 0.5
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, blocks.shape[0] - 1
    scan_2mm = nib.Nifti1Image(np.ascontiguousarray(blocks[::-1]), affine @ coarse @ flip)
    return {"scan": scan, "aal": aal, "scan_2mm": scan_2mm}


@pytest.fixture(scope="module")
def single(oracle, head):
    messages = []
    result = ThalamusSegmenter(models=oracle).segment(head["scan"], progress=lambda f, m: messages.append((f, m)))
    return result, messages


@pytest.fixture(scope="module")
def pair(oracle, head):
    return ThalamusSegmenter(models=oracle).segment({"T1w": head["scan"], "T1w 2mm": head["scan_2mm"]})


def test_segmentation_lies_on_the_scan_grid_and_overlaps_aal(single, head):
    result, _ = single
    scan, aal = head["scan"], head["aal"]
    assert result.labels.shape == scan.shape
    np.testing.assert_allclose(result.labels.affine, scan.affine)
    labels = np.asarray(result.labels.dataobj)
    assert set(np.unique(labels).tolist()) == {0, LEFT, RIGHT}
    assert _dice(labels == LEFT, aal == AAL_LEFT) > 0.70
    assert _dice(labels == RIGHT, aal == AAL_RIGHT) > 0.70
    probability = np.asarray(result.probability.dataobj)
    assert result.probability.shape == scan.shape
    assert probability.min() >= 0.0 and probability.max() <= 1.0 + 1e-6
    assert np.all(probability[labels > 0] > 0.5)
    assert result.volumes == thalamus_volumes(result.labels)
    assert 6000 < result.volumes["left"] < 16000 and 6000 < result.volumes["right"] < 16000
    assert result.per_input == {} and result.vote_fraction is None
    assert list(result.registrations) == ["image"]


def test_segmentation_reports_progress_to_the_end(single):
    _, messages = single
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions)
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert any("registering" in m for _, m in messages)


def test_two_inputs_on_different_grids_give_an_ensemble_on_the_first_grid(pair, single, head):
    scan, aal = head["scan"], head["aal"]
    assert pair.labels.shape == scan.shape
    np.testing.assert_allclose(pair.labels.affine, scan.affine)
    assert list(pair.per_input) == ["T1w", "T1w 2mm"]
    for member in pair.per_input.values():
        assert member.shape == scan.shape
        np.testing.assert_allclose(member.affine, scan.affine)
        member_labels = np.asarray(member.dataobj)
        # the 2 mm copy was registered on its own and mapped back onto the 1 mm grid
        assert _dice(member_labels == LEFT, aal == AAL_LEFT) > 0.65
        assert _dice(member_labels == RIGHT, aal == AAL_RIGHT) > 0.65
    # the first member is the single-input segmentation of the same scan: registration is seeded, so
    # only voxels at a probability tie (multi-threaded sums) may differ
    differ = np.asarray(pair.per_input["T1w"].dataobj) != np.asarray(single[0].labels.dataobj)
    assert np.count_nonzero(differ) <= 10
    vote = np.asarray(pair.vote_fraction.dataobj)
    assert vote.shape == scan.shape
    assert set(np.unique(vote).tolist()) <= {0.0, 0.5, 1.0}
    labels = np.asarray(pair.labels.dataobj)
    assert np.mean(vote[labels > 0] == 1.0) > 0.8  # the members agree on most of the thalamus
    assert _dice(labels == LEFT, aal == AAL_LEFT) > 0.70
    assert _dice(labels == RIGHT, aal == AAL_RIGHT) > 0.70
    assert list(pair.registrations) == ["T1w", "T1w 2mm"]


def test_result_save_writes_the_documented_files(pair, tmp_path):
    out = tmp_path / "sub-01"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    assert pair.save(out) == out
    assert sorted(p.name for p in out.iterdir()) == [
        "labels_T1w.nii.gz", "labels_T1w_2mm.nii.gz", "settings.json", "thalamus_labels.nii.gz",
        "thalamus_probability.nii.gz", "volumes.csv", "vote_fraction.nii.gz"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folders left
    labels = nib.load(str(out / "thalamus_labels.nii.gz"))
    np.testing.assert_array_equal(np.asarray(labels.dataobj), np.asarray(pair.labels.dataobj))
    np.testing.assert_allclose(labels.affine, pair.labels.affine, atol=1e-5)
    volumes = pd.read_csv(out / "volumes.csv")
    assert list(volumes.columns) == ["structure", "volume_mm3"]
    assert dict(zip(volumes["structure"], volumes["volume_mm3"])) == pytest.approx(pair.volumes)
    assert thalamus_volumes(labels) == pytest.approx(pair.volumes)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["ensemble"] == "majority" and settings["tta"] is False
    assert set(settings["registrations"]) == {"T1w", "T1w 2mm"}
    np.testing.assert_allclose(settings["registrations"]["T1w"]["template_to_scan"],
                               pair.registrations["T1w"].template_to_scan, atol=1e-5)
    vote = nib.load(str(out / "vote_fraction.nii.gz"))
    np.testing.assert_array_equal(np.asarray(vote.dataobj), np.asarray(pair.vote_fraction.dataobj))


def test_bad_inputs_are_named_before_any_work(oracle, tmp_path):
    segmenter = ThalamusSegmenter(models=oracle)
    flat = tmp_path / "slice_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 20)).astype(np.float32), np.eye(4)), str(flat))
    with pytest.raises(ValueError, match="slice_T1w.nii.gz.*3-D"):
        segmenter.segment(flat)
    good = np.random.default_rng(1).random((20, 20, 20)).astype(np.float32)
    bad = good.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(ValueError, match=r"^FLAIR \(image\): 1 voxels are NaN or infinite"):
        segmenter.segment({"T1w": nib.Nifti1Image(good, np.eye(4)), "FLAIR": nib.Nifti1Image(bad, np.eye(4))})
    with pytest.raises(FileNotFoundError, match="missing_R1.nii.gz"):
        segmenter.segment({"R1": tmp_path / "missing_R1.nii.gz"})
    with pytest.raises(ValueError, match="images: give at least one scan"):
        segmenter.segment({})
    with pytest.raises(ValueError, match="ensemble must be one of"):
        segmenter.segment(flat, ensemble="vote")


def test_segmentation_can_be_cancelled_from_progress(oracle, head):
    def progress(fraction, message):
        raise Cancelled()

    with pytest.raises(Cancelled):
        ThalamusSegmenter(models=oracle).segment(head["scan_2mm"], progress=progress)
