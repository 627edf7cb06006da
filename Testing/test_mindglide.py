"""MindGlide's network, checkpoint loader and inference (neuroatrophy.mindglide)."""

import hashlib

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import DynUNet

from neuroatrophy.mindglide import (
    DGM_LABEL,
    MINDGLIDE_LABELS,
    PUBLISHED_SHA256,
    file_sha256,
    is_published_checkpoint,
    keep_largest_component,
    load_mindglide,
    mindglide_network,
    mindglide_preprocess,
    mindglide_window_settings,
    run_mindglide,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return mindglide_network().eval()


@pytest.fixture(scope="module")
def checkpoint(network, tmp_path_factory):
    """The network's plain state_dict saved as MindGlide publishes its weights."""
    path = tmp_path_factory.mktemp("mindglide") / "finetuned.pt"
    torch.save(network.state_dict(), path)
    return path


def fixed_input():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(1, 1, 32, 32, 32, generator=generator)


def test_labels_and_constants():
    assert len(MINDGLIDE_LABELS) == 20 and MINDGLIDE_LABELS[DGM_LABEL] == "DGM"
    assert MINDGLIDE_LABELS[18] == "Lesion" and MINDGLIDE_LABELS[19] == "Ventral_diencephalon"
    assert mindglide_window_settings() == {"roi_size": (128, 128, 64), "overlap": 0.5, "mode": "gaussian"}


def test_network_has_published_size(network):
    assert isinstance(network, DynUNet)
    assert sum(p.numel() for p in network.parameters()) == 30_781_744
    assert network.output_block.conv.conv.out_channels == 20


def test_checkpoint_round_trip_gives_identical_outputs(network, checkpoint):
    loaded = load_mindglide(checkpoint)
    assert not loaded.training
    assert loaded.checkpoint_sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert loaded.is_published is False and is_published_checkpoint(checkpoint) is False
    x = fixed_input()
    with torch.inference_mode():
        expected = network(x)
        got = loaded(x)
    assert got.shape == (1, 20, 32, 32, 32)
    assert torch.equal(got, expected)


def test_hash_check(checkpoint):
    digest = file_sha256(checkpoint)
    assert load_mindglide(checkpoint, expected_sha256=digest.upper()).checkpoint_sha256 == digest
    with pytest.raises(ValueError, match=r"finetuned\.pt.*does not match.*" + PUBLISHED_SHA256):
        load_mindglide(checkpoint, expected_sha256=PUBLISHED_SHA256)


def test_wrapped_checkpoints_are_accepted(network, tmp_path):
    state = network.state_dict()
    x = fixed_input()
    with torch.inference_mode():
        expected = network(x)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 12}
    torch.save(wrapped, tmp_path / "lightning.ckpt")
    torch.save({"model": state}, tmp_path / "model.pt")
    for name in ("lightning.ckpt", "model.pt"):
        with torch.inference_mode():
            assert torch.equal(load_mindglide(tmp_path / name)(x), expected), name


def test_other_architecture_is_refused(tmp_path):
    strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    small = DynUNet(3, 1, 4, [[3, 3, 3]] * 3, strides, strides[1:], filters=[8, 16, 32], norm_name="instance")
    path = tmp_path / "small_unet.pt"
    torch.save(small.state_dict(), path)
    with pytest.raises(ValueError, match=r"small_unet\.pt.*not a checkpoint of MindGlide.*missing keys.*shape mismatches"):
        load_mindglide(path)


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "weights.pt"
    text.write_text("this is not a checkpoint")
    with pytest.raises(ValueError, match=r"weights\.pt.*not a PyTorch checkpoint"):
        load_mindglide(text)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(ValueError, match=r"list\.pt.*state_dict"):
        load_mindglide(listed)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_mindglide(tmp_path / "absent.pt")


class ThresholdNet(torch.nn.Module):
    """Scores that label preprocessed intensities below ``threshold`` 1 and above it 2."""

    def __init__(self, threshold):
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, x):
        scores = torch.zeros(x.shape[0], 20, *x.shape[2:])
        scores[:, 1] = self.threshold - x[:, 0]
        scores[:, 2] = x[:, 0] - self.threshold
        return scores


def phantom():
    truth = np.zeros((40, 48, 30), dtype=np.uint8)
    truth[5:35, 6:42, 4:26] = 1
    truth[12:22, 15:30, 8:18] = 2
    image = np.select([truth == 1, truth == 2], [100.0, 200.0], 0.0).astype(np.float32)
    return truth, image


@pytest.mark.parametrize("affine", [
    np.diag([1.2, 1.2, 1.2, 1.0]),                                                  # resampled to 1 mm
    np.array([[-1.2, 0, 0, 30], [0, 0, 1.1, -20], [0, 1.3, 0, 5], [0, 0, 0, 1.0]]),  # axes permuted and flipped
    np.diag([-1.0, 1.0, 4.0, 1.0]),                                                 # anisotropic: nearest through z
], ids=["1.2mm", "permuted", "thick-slices"])
def test_preprocessing_maps_labels_back_to_input_grid(affine):
    truth, image = phantom()
    img = nib.Nifti1Image(image, affine)
    # halfway between the z-scores of the outer (most voxels) and inner (brightest) blocks
    z = mindglide_preprocess(img).data
    net = ThresholdNet((np.median(z) + np.percentile(z, 99)) / 2)
    fractions = []
    out = run_mindglide(img, net,
                        progress=lambda fraction, message: fractions.append(fraction))
    labels = np.asarray(out.dataobj)
    assert labels.shape == truth.shape and labels.dtype == np.uint8
    np.testing.assert_allclose(out.affine, affine)
    assert not labels[truth == 0].any()  # cropped, padded and reoriented back to the right place
    for label in (1, 2):
        dice = 2 * np.sum((labels == label) & (truth == label)) / (np.sum(labels == label) + np.sum(truth == label))
        assert dice > 0.99, (label, dice)
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)


def test_preprocess_resamples_and_normalises():
    _, image = phantom()
    prepared = mindglide_preprocess(nib.Nifti1Image(image, np.diag([1.2, 1.2, 1.2, 1.0])))
    assert prepared.crop == (slice(5, 35), slice(6, 42), slice(4, 26))  # the non-zero box
    assert prepared.data.shape == (36, 43, 26)  # 1.2 mm -> 1 mm
    values = prepared.data[prepared.data != 0]
    assert abs(values.mean()) < 1e-5 and abs(values.std() - 1) < 1e-4


def test_run_with_random_weights_returns_labels_on_input_grid(network):
    rng = np.random.default_rng(3)
    image = np.zeros((40, 48, 40), dtype=np.float32)
    image[4:36, 4:44, 4:36] = rng.normal(100, 20, (32, 40, 32))
    affine = np.array([[-1.2, 0, 0, 24], [0, 1.2, 0, -28], [0, 0, 1.2, -20], [0, 0, 0, 1.0]])
    out = run_mindglide(nib.Nifti1Image(image, affine), network, sw_batch_size=1)
    labels = np.asarray(out.dataobj)
    assert out.shape == image.shape and labels.dtype == np.uint8
    np.testing.assert_allclose(out.affine, affine)
    assert labels.max() < 20
    assert not network.training


def test_keep_largest_component():
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[1:5, 1:5, 1:5] = 3
    labels[5:7, 1:5, 1:5] = 7  # touches the first block: same component
    labels[8:10, 8:10, 8:10] = 3
    kept = keep_largest_component(labels)
    assert (kept == 3).sum() == 64 and (kept == 7).sum() == 32 and not kept[8:, 8:, 8:].any()
