"""Synthetic thalamus images (SynthSeg-style generator on the MNI box) and training on them."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from neuroatrophy.thalamus_labels import LEFT, RIGHT
from neuroatrophy.thalamus_net import load_model
from neuroatrophy.thalamus_synth import (
    CONTRASTS,
    THALAMUS_BOX,
    SynthConfig,
    ThalamusSynth,
    box_affine,
    normalize_intensity,
    source_label_map,
)
from neuroatrophy.thalamus_train import TEST, TRAIN, VALIDATION, TrainConfig, synthetic_case, train

torch.set_num_threads(1)

WHITE_MATTER = (2, 41)
THALAMUS = (LEFT, RIGHT)
CORTEX = (3, 42)
CSF = (4, 43, 24)  # lateral ventricles and extra-cerebral CSF
#: FreeSurfer left/right homologues (FreeSurferColorLUT)
FREESURFER_PAIRS = ((2, 41), (3, 42), (4, 43), (5, 44), (7, 46), (8, 47), (LEFT, RIGHT), (11, 50), (12, 51),
                    (13, 52), (17, 53), (18, 54), (26, 58), (28, 60), (30, 62), (31, 63))

#: no spatial deformation and no mirroring: the box shows the source label map as it is
IDENTITY = {"rotation_deg": 0.0, "scaling": 0.0, "shear": 0.0, "translation_mm": 0.0, "elastic_mm": 0.0,
            "prob_flip": 0.0}
#: one constant intensity per tissue class: no texture, blur, bias field, noise or gamma
CLEAN = {"std_preset": (0.0, 0.0), "prob_keep_res": 1.0, "bias_std": 0.0, "noise_std": 0.0, "gamma_std": 0.0}


@pytest.fixture(scope="module")
def source():
    return source_label_map()


@pytest.fixture(scope="module")
def default_synth(source):
    return ThalamusSynth(labels=source)


@pytest.fixture(scope="module")
def identity_synth(source):
    return ThalamusSynth(SynthConfig(**IDENTITY, **CLEAN), labels=source)


@pytest.fixture(scope="module")
def identity_labels(identity_synth):
    return identity_synth.sample_labels(np.random.default_rng(0))


def _box_x_mm(mask):
    """Mean RAS x (mm) of the voxels of a box mask."""
    i = np.nonzero(mask)[0]
    affine = box_affine()
    return float(np.mean(affine[0, 0] * i + affine[0, 3]))


def _nearest_source_labels(source, round_half_up: bool):
    """The source label map sampled at the box voxels by nearest neighbour, computed independently."""
    to_source = np.linalg.inv(source.affine) @ box_affine()
    ijk = np.indices(THALAMUS_BOX["shape"]).reshape(3, -1).astype(float)
    voxel = to_source[:3, :3] @ ijk + to_source[:3, 3:4]
    # box voxel centres fall half-way between source voxels along one axis; either rounding is nearest
    index = np.floor(voxel + 0.5) if round_half_up else np.ceil(voxel - 0.5)
    data = np.asarray(source.dataobj)
    index = index.astype(int)
    inside = np.all((index >= 0) & (index < np.array(data.shape)[:, None]), axis=0)
    out = np.zeros(index.shape[1], dtype=data.dtype)
    out[inside] = data[tuple(index[:, inside])]
    return out.reshape(THALAMUS_BOX["shape"])


# ------------------------------------------------------------------ field of view and labels


def test_box_affine_centres_the_box_on_its_centre():
    affine = box_affine()
    centre_voxel = (np.asarray(THALAMUS_BOX["shape"]) - 1) / 2
    np.testing.assert_allclose(affine[:3, :3] @ centre_voxel + affine[:3, 3], THALAMUS_BOX["center_mm"])
    np.testing.assert_allclose(np.diag(affine)[:3], THALAMUS_BOX["spacing_mm"])


def test_source_label_map_merges_cortical_parcels(source):
    labels = np.unique(np.asarray(source.dataobj))
    assert labels.max() < 1000
    assert {0, 2, 3, 41, 42, LEFT, RIGHT} <= set(labels.tolist())


def test_identity_deformation_gives_the_source_thalamus_by_nearest_neighbour(source, identity_synth,
                                                                            identity_labels):
    _, target = identity_synth.render(np.random.default_rng(1), identity_labels, "t1", lesions=False)
    candidates = [_nearest_source_labels(source, up) for up in (True, False)]
    expected = [(c == LEFT) * 1 + (c == RIGHT) * 2 for c in candidates]
    assert any(np.array_equal(target, e) for e in expected)
    assert any(np.array_equal(identity_labels, c) for c in candidates)
    # the whole of both thalami lies in the box, with their FreeSurfer volumes (about 11 mL each)
    for code, value in ((LEFT, 1), (RIGHT, 2)):
        assert np.count_nonzero(target == value) == np.count_nonzero(np.asarray(source.dataobj) == code)


def test_left_thalamus_is_at_negative_x_with_and_without_flip(source, identity_labels):
    flip_synth = ThalamusSynth(SynthConfig(**{**IDENTITY, "prob_flip": 1.0}, **CLEAN), labels=source)
    flipped = flip_synth.sample_labels(np.random.default_rng(0))
    for labels in (identity_labels, flipped):
        assert _box_x_mm(labels == LEFT) < -5.0
        assert _box_x_mm(labels == RIGHT) > 5.0
    # the flip mirrors the anatomy about x = 0 and swaps the sides' names
    mirrored = identity_labels[::-1]
    swapped = mirrored.copy()
    for left, right in FREESURFER_PAIRS:
        swapped[mirrored == left] = right
        swapped[mirrored == right] = left
    assert np.array_equal(flipped, swapped)
    assert not np.array_equal(flipped, identity_labels)


def test_random_deformations_keep_the_sides_and_move_the_thalamus(source):
    synth = ThalamusSynth(SynthConfig(prob_flip=1.0), labels=source)
    rng = np.random.default_rng(3)
    centroids = []
    for _ in range(3):
        labels = synth.sample_labels(rng)
        assert _box_x_mm(labels == LEFT) < 0 < _box_x_mm(labels == RIGHT)
        centroids.append(np.argwhere(labels == LEFT).mean(axis=0))
    assert np.ptp(np.array(centroids), axis=0).max() > 0.5  # the draws do differ


# ------------------------------------------------------------------ sampling


def test_samples_are_reproducible_for_a_seed_and_in_range(default_synth):
    synth = default_synth
    image_a, target_a = synth.sample(np.random.default_rng(11))
    image_b, target_b = synth.sample(np.random.default_rng(11))
    image_c, _ = synth.sample(np.random.default_rng(12))
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(target_a, target_b)
    assert not np.array_equal(image_a, image_c)
    assert image_a.shape == target_a.shape == tuple(THALAMUS_BOX["shape"])
    assert image_a.dtype == np.float32 and target_a.dtype == np.uint8


@pytest.mark.parametrize("contrast", CONTRASTS)
def test_images_lie_in_unit_range_with_both_thalami(default_synth, contrast):
    synth = default_synth
    rng = np.random.default_rng(CONTRASTS.index(contrast))
    for lesions in (False, True):
        image, target = synth.sample(rng, contrast=contrast, lesions=lesions)
        assert np.isfinite(image).all()
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert image.std() > 0.05  # not a blank image
        assert set(np.unique(target).tolist()) == {0, 1, 2}


def test_unknown_contrast_is_refused(identity_synth):
    with pytest.raises(ValueError, match="contrast must be one of .*'t2'"):
        identity_synth.sample(np.random.default_rng(0), contrast="t2")


def _class_values(image, labels, lesion_value=None):
    def value(codes):
        mask = np.isin(labels, codes)
        if lesion_value is not None:
            mask &= image != lesion_value
        assert mask.any(), codes
        return float(image[mask].mean())

    return {"wm": value(WHITE_MATTER), "thalamus": value(THALAMUS), "cortex": value(CORTEX), "csf": value(CSF)}


@pytest.mark.parametrize("seed", range(4))
def test_t1_and_r1_presets_order_the_tissues(identity_synth, identity_labels, seed):
    for contrast in ("t1", "r1"):
        image, _ = identity_synth.render(np.random.default_rng(seed), identity_labels, contrast, lesions=False)
        v = _class_values(image, identity_labels)
        assert v["wm"] > v["thalamus"] > v["cortex"] > v["csf"], (contrast, v)


@pytest.fixture(scope="module")
def lesion_synth(source):
    config = SynthConfig(**IDENTITY, **CLEAN, lesions=(12, 12), lesion_radius_mm=(4.0, 5.0))
    return ThalamusSynth(config, labels=source)


@pytest.mark.parametrize("seed", range(3))
def test_flair_preset_has_grey_above_white_and_lesions_brightest(lesion_synth, identity_labels, seed):
    image, target = lesion_synth.render(np.random.default_rng(seed), identity_labels, "flair", lesions=True)
    wm = np.isin(identity_labels, WHITE_MATTER)
    values, counts = np.unique(image[wm], return_counts=True)
    assert len(values) == 2  # white matter and the lesions painted into it
    lesion_value = float(values[np.argmin(counts)])
    lesion = image == lesion_value
    v = _class_values(image, identity_labels, lesion_value)
    assert v["cortex"] > v["wm"]
    tissue_codes = [c for c in np.unique(identity_labels) if c != 0]
    others = [float(image[(identity_labels == c) & ~lesion].mean()) for c in tissue_codes
              if np.any((identity_labels == c) & ~lesion)]
    assert lesion_value > max(others)
    # lesions sit in white matter only, and the target does not see them
    wm_all = np.isin(identity_labels, (2, 41, 77, 85, 251, 252, 253, 254, 255))
    assert lesion.any() and not np.any(lesion & ~wm_all)
    expected = (identity_labels == LEFT) * 1 + (identity_labels == RIGHT) * 2
    np.testing.assert_array_equal(target, expected)


def test_lesions_replace_only_white_matter_and_leave_the_target(lesion_synth, identity_labels):
    classes = lesion_synth._classes[identity_labels]
    white_matter = classes[np.isin(identity_labels, WHITE_MATTER)][0]
    painted = lesion_synth._paint_lesions(np.random.default_rng(5), classes)
    changed = painted != classes
    assert changed.sum() > 1000
    assert np.all(classes[changed] == white_matter)
    assert len(np.unique(painted[changed])) == 1  # one lesion class
    _, with_lesions = lesion_synth.render(np.random.default_rng(5), identity_labels, "t1", lesions=True)
    _, without = lesion_synth.render(np.random.default_rng(5), identity_labels, "t1", lesions=False)
    np.testing.assert_array_equal(with_lesions, without)


def test_normalize_intensity_maps_percentiles_to_unit_range():
    values = np.arange(1001, dtype=np.float32)
    out = normalize_intensity(values, low=10, high=90)
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out[500], 0.5, atol=1e-6)
    np.testing.assert_array_equal(normalize_intensity(np.full(10, 3.0)), np.zeros(10))


# ------------------------------------------------------------------ training


def test_synthetic_cases_are_deterministic_and_kept_apart_from_training(default_synth):
    synth = default_synth
    test_a, target_a = synthetic_case(0, TEST, synth=synth)
    test_b, _ = synthetic_case(0, TEST, synth=synth)
    validation, _ = synthetic_case(0, VALIDATION, synth=synth)
    np.testing.assert_array_equal(test_a, test_b)
    assert not np.array_equal(test_a, validation)
    assert not np.array_equal(test_a, synthetic_case(1, TEST, synth=synth)[0])
    assert set(np.unique(target_a).tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="not the training stream"):
        synthetic_case(0, TRAIN, synth=synth)


def test_training_draws_differ_from_test_cases(default_synth):
    from neuroatrophy.thalamus_train import _SyntheticStream

    synth = default_synth
    tests = [synthetic_case(i, purpose, synth=synth)[0] for purpose in (TEST, VALIDATION) for i in range(2)]
    stream = iter(_SyntheticStream(0, asdict(SynthConfig()), THALAMUS_BOX))
    for _ in range(3):
        image = next(stream)[0][0].numpy()
        assert not any(np.array_equal(image, t) for t in tests)


SMALL_ARCHITECTURE = {"name": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                      "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "norm": "instance"}


def test_a_short_training_run_writes_a_loadable_model_with_its_history(tmp_path):
    config = TrainConfig(iterations=3, validation_every=1, validation_cases=1, num_workers=0, threads=1,
                         batch_size=1, train_shape=(32, 32, 32), architecture=SMALL_ARCHITECTURE)
    progress = []
    messages = []
    trained = train(config, tmp_path / "models" / "tiny", progress=lambda f, m: progress.append(f),
                    log=messages.append)
    assert (tmp_path / "models" / "tiny.safetensors").exists()
    record = json.loads((tmp_path / "models" / "tiny.json").read_text())["training"]
    assert [h["iteration"] for h in record["history"]] == [1, 2, 3]
    assert all(0.0 <= h["val_dice"] <= 1.0 and np.isfinite(h["loss"]) for h in record["history"])
    assert record["iterations"] == 3 and record["final"] is True
    assert record["best_validation_dice"] == max(h["val_dice"] for h in record["history"])
    best = next(h["iteration"] for h in record["history"] if h["val_dice"] == record["best_validation_dice"])
    assert record["best_iteration"] == best
    assert record["config"]["architecture"] == SMALL_ARCHITECTURE
    assert progress[-1] == pytest.approx(1.0) and len(messages) == 3
    assert trained.training["history"] == record["history"]

    model = load_model(tmp_path / "models" / "tiny.safetensors")
    assert model.architecture == SMALL_ARCHITECTURE
    assert model.box == {**THALAMUS_BOX, "shape": list(THALAMUS_BOX["shape"]),
                         "center_mm": list(THALAMUS_BOX["center_mm"])}
    assert model.training["history"] == record["history"]
    with torch.inference_mode():
        out = model.network(torch.zeros(1, 1, 32, 32, 32))
    assert out.shape == (1, 3, 32, 32, 32)


def test_train_config_from_json_refuses_unknown_settings(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"iterations": 7, "synth": {"rotation_deg": 5.0}}))
    config = TrainConfig.from_json(good)
    assert config.iterations == 7 and config.synth["rotation_deg"] == 5.0
    assert config.synth["scaling"] == SynthConfig().scaling
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"iterations": 7, "learning_rat": 0.1}))
    with pytest.raises(ValueError, match=r"bad.json: unknown training setting\(s\) \['learning_rat'\]"):
        TrainConfig.from_json(bad)
    bad_synth = tmp_path / "bad_synth.json"
    bad_synth.write_text(json.dumps({"synth": {"rotation": 5.0}}))
    with pytest.raises(ValueError, match=r"bad_synth.json: unknown synth setting\(s\) \['rotation'\]"):
        TrainConfig.from_json(bad_synth)
