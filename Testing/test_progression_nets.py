"""BrLP configurations, covariates, networks and checkpoint compatibility with MONAI Generative."""

import inspect
import json
import os

import numpy as np
import pytest
import torch

from neuroatrophy.progression_config import (
    BrLPConfig,
    brlp_config,
    config_from_dict,
    load_config,
    tiny_config,
)
from neuroatrophy.progression_covariates import (
    BRLP_MINMAX,
    REGIONS,
    denormalise_volumes,
    encode_context,
    encode_diagnosis,
    encode_sex,
    normalise_volumes,
)
from neuroatrophy.progression_nets import (
    BrLPNetworks,
    build_autoencoder,
    build_controlnet,
    build_unet,
    count_parameters,
    load_checkpoint,
    save_checkpoint,
)

torch.set_num_threads(1)

BRLP_YAML = """
autoencoder: 'weights/autoencoder-ep-5.pth'
unet: 'weights/unet-ep-5.pth'
controlnet: '/abs/cnet-ep-5.pth'
aux:
  cn:  "dcm/dcm_cn.json"
  mci: "dcm/dcm_mci.json"
  ad:  "dcm/dcm_ad.json"
las:
  m: 10
minmax_params:
  cerebral_cortex:          [370876, 744801]
  hippocampus:              [5006,   13955]
  amygdala:                 [1462,   5828]
  cerebral_white_matter:    [323328, 696723]
  lateral_ventricle:        [10404,  191374]
median_corrections:
  cerebral_cortex:          [0.5114, 0.1825]
  hippocampus:              [0.6227, 0.1667]
  amygdala:                 [1.0000, 0.0000]
  cerebral_white_matter:    [0.6461, 0.2016]
  lateral_ventricle:        [0.4650, 0.0817]
"""


# --- configuration --------------------------------------------------------------------------

def test_brlp_shapes_follow_the_published_architecture():
    cfg = brlp_config()
    assert cfg.image_shape == (120, 144, 120)
    assert cfg.latent_shape_ae == (3, 15, 18, 15)
    assert cfg.latent_shape_dm == (3, 16, 20, 16)  # BrLP's DivisiblePad(k=4)
    assert cfg.controlnet["conditioning_embedding_in_channels"] == 4
    assert "out_channels" not in cfg.controlnet


def test_brlp_inference_yaml_is_read_with_paths_relative_to_it(tmp_path):
    (tmp_path / "confs.yaml").write_text(BRLP_YAML)
    cfg = load_config(tmp_path / "confs.yaml")
    assert cfg.las_m == 10
    assert cfg.weights["autoencoder"] == str(tmp_path / "weights/autoencoder-ep-5.pth")
    assert cfg.weights["controlnet"] == "/abs/cnet-ep-5.pth"
    assert cfg.weights["dcm"]["mci"] == str(tmp_path / "dcm/dcm_mci.json")
    assert cfg.median_corrections["hippocampus"] == (0.6227, 0.1667)
    assert cfg.unet == brlp_config().unet
    # the folder alone finds the same configuration
    assert load_config(tmp_path).weights == cfg.weights
    with pytest.raises(FileNotFoundError, match="autoencoder weights not found.*autoencoder-ep-5.pth"):
        cfg.weight_path("autoencoder")


def test_config_json_round_trip(tmp_path):
    cfg = tiny_config(scale_factor=0.83, weights={"unet": str(tmp_path / "unet.safetensors")})
    cfg.save(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["weights"]["unet"] == "unet.safetensors"  # relative inside the folder
    back = load_config(tmp_path / "config.json")
    assert back.to_dict() == cfg.to_dict()
    assert back.latent_shape_ae == (3, 6, 8, 6)


def test_folder_with_brlp_weight_names_is_found(tmp_path):
    for name in ("autoencoder-ep-5.pth", "unet-ep-5.pth", "cnet-ep-5.pth", "dcm_cn.json", "dcm_ad.json"):
        (tmp_path / name).write_bytes(b"x")
    cfg = load_config(tmp_path)
    assert cfg.weights["controlnet"].endswith("cnet-ep-5.pth")
    assert set(cfg.weights["dcm"]) == {"cn", "ad"}
    (tmp_path / "unet-ep-4.pth").write_bytes(b"x")
    with pytest.raises(ValueError, match="several unet files"):
        load_config(tmp_path)


def test_missing_weights_explain_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="LemuelPuglisi/BrLP"):
        load_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="no unet weights.*LemuelPuglisi/BrLP"):
        brlp_config().weight_path("unet")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image_shape": (120, 144, 121)}, "divisible"),
        ({"minmax_params": {"hippocampus": (1, 2)}}, "lacks cerebral_cortex"),
        ({"scale_factor": 0}, "scale_factor"),
    ],
)
def test_bad_configuration_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        BrLPConfig(**change)


def test_unreadable_configuration_names_the_file(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("autoencoder: [unclosed")
    with pytest.raises(ValueError, match="c.yaml"):
        load_config(bad)
    with pytest.raises(ValueError, match="neither"):
        config_from_dict({"something": 1})
    with pytest.raises(ValueError, match="format_version 9"):
        config_from_dict({"format_version": 9})


# --- covariates -----------------------------------------------------------------------------

def test_context_follows_brlp_encoding():
    vols = {r: 0.1 * (i + 1) for i, r in enumerate(REGIONS)}
    ctx = encode_context(72.5, "F", "MCI", vols)
    np.testing.assert_allclose(ctx, [0.725, 1.0, 0.5, 0.1, 0.2, 0.3, 0.4, 0.5], rtol=1e-6)
    assert ctx.dtype == np.float32
    assert encode_sex("male") == 0.0 and encode_diagnosis("ad") == 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        ((72, 1, "CN"), "sex must be 'F' or 'M'"),
        ((72, "F", "SMC"), "diagnosis must be one of"),
        ((870, "F", "CN"), "age must be in years"),
    ],
)
def test_ambiguous_or_wrong_covariates_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        encode_context(*args, dict.fromkeys(REGIONS, 0.5))


def test_raw_volumes_instead_of_normalised_are_caught():
    raw = {r: BRLP_MINMAX[r][1] for r in REGIONS}
    with pytest.raises(ValueError, match="were mm3 given"):
        encode_context(70, "M", "CN", raw)
    norm = normalise_volumes(raw)
    assert norm == pytest.approx(dict.fromkeys(REGIONS, 1.0))
    assert denormalise_volumes(norm) == pytest.approx(raw)


# --- networks and checkpoints ---------------------------------------------------------------

def _perturb(module, seed):
    # MONAI zero-initialises output layers; perturb every weight so outputs depend on all of them.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return module.eval()


def _tiny_inputs(cfg, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((batch,) + cfg.latent_shape_dm, generator=g)
    cond = torch.randn((batch, cfg.latent_shape_dm[0] + 1) + cfg.latent_shape_dm[1:], generator=g)
    ctx = torch.rand((batch, 1, 8), generator=g)
    t = torch.tensor([999, 20][:batch])
    return z, cond, ctx, t


def test_safetensors_round_trip_gives_identical_outputs(tmp_path):
    cfg = tiny_config()
    unet = _perturb(build_unet(cfg), 1)
    save_checkpoint(unet, tmp_path / "unet.safetensors", metadata={"step": 3})
    other = build_unet(cfg)
    assert load_checkpoint(other, tmp_path / "unet.safetensors", "unet") == "monai"
    z, _, ctx, t = _tiny_inputs(cfg)
    with torch.no_grad():
        assert torch.equal(unet(z, t, ctx), other(z, t, ctx))


def test_networks_load_from_a_config_file(tmp_path):
    cfg = tiny_config()
    nets = {"autoencoder": build_autoencoder(cfg), "unet": build_unet(cfg), "controlnet": build_controlnet(cfg)}
    for name, module in nets.items():
        save_checkpoint(_perturb(module, 2), tmp_path / f"{name}.safetensors")
        cfg.weights[name] = str(tmp_path / f"{name}.safetensors")
    cfg.save(tmp_path / "config.json")
    loaded = BrLPNetworks.from_config(load_config(tmp_path / "config.json"))
    x = torch.rand(1, 1, *cfg.image_shape)
    with torch.no_grad():
        assert torch.equal(loaded.autoencoder.encode(x)[0], nets["autoencoder"].encode(x)[0])


def test_wrong_network_or_architecture_is_refused_clearly(tmp_path):
    cfg = tiny_config()
    save_checkpoint(build_autoencoder(cfg), tmp_path / "ae.safetensors")
    with pytest.raises(ValueError, match=r"ae.safetensors does not hold a unet.*missing.*right network"):
        load_checkpoint(build_unet(cfg), tmp_path / "ae.safetensors", "unet")
    wider = tiny_config(unet=dict(cfg.unet, channels=[16, 48, 48], num_head_channels=[0, 48, 48]))
    save_checkpoint(build_unet(wider), tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="another shape"):
        load_checkpoint(build_unet(cfg), tmp_path / "wide.safetensors", "unet")


def test_truncated_or_unsafe_files_are_refused(tmp_path):
    cfg = tiny_config()
    unet = build_unet(cfg)
    torch.save(unet.state_dict(), tmp_path / "unet.pth")
    save_checkpoint(unet, tmp_path / "unet.safetensors")
    for name in ("unet.pth", "unet.safetensors"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=f"cut-{name}.*truncated"):
            load_checkpoint(build_unet(cfg), tmp_path / f"cut-{name}", "unet")
    torch.save({"weight": os.getcwd}, tmp_path / "evil.pth")  # a callable: must never be unpickled
    with pytest.raises(ValueError, match="evil.pth"):
        load_checkpoint(build_unet(cfg), tmp_path / "evil.pth", "unet")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(build_unet(cfg), tmp_path / "nope.pth", "unet")


# --- MONAI Generative (BrLP's training library) -> MONAI core ------------------------------

def _assert_same(new, old):
    # The two libraries compute attention projections in a different float32 summation order, so
    # outputs agree to 1e-5 of their own scale (the perturbed random weights give outputs up to ~10).
    scale = max(1.0, old.abs().max().item())
    assert (new - old).abs().max().item() <= 1e-5 * scale


def _generative_kwargs(kwargs, accepted):
    out = {("num_channels" if k == "channels" else k): v for k, v in kwargs.items()}
    return {k: v for k, v in out.items() if k in accepted}


def _generative(cls_name, kwargs):
    import generative.networks.nets as gen

    cls = getattr(gen, cls_name)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**_generative_kwargs(kwargs, accepted))


def _brlp_checkpoint(tmp_path, name, cls_name, kwargs, seed):
    old = _perturb(_generative(cls_name, kwargs), seed)
    path = tmp_path / f"{name}-ep-5.pth"
    torch.save(old.state_dict(), path)  # exactly how BrLP's training scripts save
    return old, path


def test_brlp_autoencoder_checkpoint_loads_and_matches(tmp_path):
    cfg = brlp_config()
    old, path = _brlp_checkpoint(tmp_path, "autoencoder", "AutoencoderKL", cfg.autoencoder, 3)
    new = build_autoencoder(cfg)
    assert count_parameters(new) == 13_766_248
    assert load_checkpoint(new, path, "autoencoder") == "monai-generative"
    x = torch.rand(1, 1, 32, 40, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z_old, z_new = old.encode(x)[0], new.encode(x)[0]
        _assert_same(z_new, z_old)
        _assert_same(new.decode(z_new), old.decode(z_old))


def test_brlp_unet_and_controlnet_checkpoints_load_and_match(tmp_path):
    cfg = brlp_config()
    z = torch.randn((1,) + cfg.latent_shape_dm, generator=torch.Generator().manual_seed(1))
    cond = torch.randn((1, 4) + cfg.latent_shape_dm[1:], generator=torch.Generator().manual_seed(2))
    ctx = torch.rand(1, 1, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([500])

    old, path = _brlp_checkpoint(tmp_path, "cnet", "ControlNet", cfg.controlnet, 4)
    with torch.no_grad():
        down_old, mid_old = old(z, t, controlnet_cond=cond, context=ctx)
    del old
    cnet = build_controlnet(cfg)
    assert count_parameters(cnet) == 229_658_624
    assert load_checkpoint(cnet, path, "controlnet") == "monai-generative"
    path.unlink()
    with torch.no_grad():
        down, mid = cnet(z, t, controlnet_cond=cond, context=ctx)
    _assert_same(mid, mid_old)
    for a, b in zip(down, down_old):
        _assert_same(a, b)
    del cnet

    old, path = _brlp_checkpoint(tmp_path, "unet", "DiffusionModelUNet", cfg.unet, 5)
    with torch.no_grad():
        eps_old = old(z, t, context=ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    del old
    unet = build_unet(cfg)
    assert count_parameters(unet) == 553_198_595
    assert load_checkpoint(unet, path, "unet") == "monai-generative"
    with torch.no_grad():
        eps = unet(z, t, context=ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    _assert_same(eps, eps_old)


def test_incomplete_generative_checkpoint_is_refused(tmp_path):
    cfg = tiny_config()
    old = _generative("ControlNet", cfg.controlnet)
    state = old.state_dict()
    dropped = next(k for k in state if "proj_attn" in k or "to_out" in k)
    del state[dropped]
    torch.save(state, tmp_path / "cnet.pth")
    with pytest.raises(ValueError, match="cnet.pth does not hold a controlnet"):
        load_checkpoint(build_controlnet(cfg), tmp_path / "cnet.pth", "controlnet")
