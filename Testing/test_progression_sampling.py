"""BrLP sampling (DDIM + ControlNet + LAS) on the tiny configuration with random weights."""

import numpy as np
import pytest
import torch

from neuroatrophy.parallel import Cancelled
from neuroatrophy.progression_config import tiny_config
from neuroatrophy.progression_nets import (
    build_autoencoder,
    build_controlnet,
    build_unet,
)
from neuroatrophy.progression_sampling import (
    brlp_timesteps,
    crop_latent,
    decode_las,
    make_scheduler,
    pad_latent,
    sample_latents,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def nets():
    cfg = tiny_config()
    torch.manual_seed(0)
    unet, controlnet, autoencoder = build_unet(cfg), build_controlnet(cfg), build_autoencoder(cfg)
    # Fresh networks have zero-initialised output convolutions (the UNet predicts 0, the ControlNet
    # adds nothing): perturb every weight so that noise prediction and condition are real.
    with torch.no_grad():
        for net in (unet, controlnet):
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return cfg, unet, controlnet, autoencoder


def contexts_for(ages, rng_seed=1):
    rng = np.random.default_rng(rng_seed)
    rows = [np.concatenate([[age / 100, 1.0, 0.5], rng.uniform(0.2, 0.8, 5)]) for age in ages]
    return np.asarray(rows, dtype=np.float32)


def baseline(cfg, seed=3):
    return torch.randn(cfg.latent_shape_ae, generator=torch.Generator().manual_seed(seed))


def run(nets, contexts, **kw):
    cfg, unet, controlnet, _ = nets
    settings = dict(m=2, num_inference_steps=4, scheduler_cfg=cfg.scheduler, latent_shape_ae=cfg.latent_shape_ae)
    settings.update(kw)
    return sample_latents(unet, controlnet, baseline(cfg), 70.0, contexts, **settings)


# --- scheduler ----------------------------------------------------------------------------------

def test_timesteps_are_brlps_monai_generative_ones():
    # MONAI Generative 0.2.3 (BrLP): arange(S) * (1000 // S), descending
    assert brlp_timesteps(50).tolist() == list(range(980, -1, -20))
    assert brlp_timesteps(25).tolist() == list(range(960, -1, -40))
    assert brlp_timesteps(3).tolist() == [666, 333, 0]
    for steps in (25, 50):
        scheduler = make_scheduler(tiny_config().scheduler, steps)
        assert scheduler.timesteps.tolist() == brlp_timesteps(steps).tolist()
        assert scheduler.clip_sample is False
    with pytest.raises(ValueError, match="num_inference_steps"):
        brlp_timesteps(1001)
    with pytest.raises(ValueError, match="num_inference_steps"):
        brlp_timesteps(0)


def test_make_scheduler_rejects_unknown_schedule_arguments():
    with pytest.raises(ValueError, match="scheduler settings"):
        make_scheduler(dict(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_begin=0.1), 5)


def _independent_ddim(z, eps_fn, steps, beta_start=0.0015, beta_end=0.0205, train=1000):
    """Song et al.'s deterministic DDIM (eta = 0) on scaled-linear betas, in float64."""
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, train, dtype=np.float64) ** 2
    alpha_bar = np.cumprod(1.0 - betas)
    delta = train // steps
    for t in range(delta * (steps - 1), -1, -delta):
        eps = eps_fn(z, t).double()
        a_t = alpha_bar[t]
        a_prev = alpha_bar[t - delta] if t - delta >= 0 else 1.0
        x0 = (z.double() - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        z = (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps).float()
    return z


def test_las_loop_equals_the_ddim_equations_with_brlps_condition(nets):
    cfg, unet, controlnet, _ = nets
    contexts = contexts_for([72.0, 75.0])
    m, steps, seed, scale = 2, 5, 11, 0.8
    got = run(nets, contexts, m=m, num_inference_steps=steps, seed=seed, scale_factor=scale)

    # BrLP's recipe written out independently: DivisiblePad(k=4) of the scaled latent, age / 100 as a
    # 4th channel, the same noise for chain j at every age, ControlNet residuals into the UNet.
    from monai.transforms import DivisiblePad

    padded = torch.as_tensor(DivisiblePad(k=4, mode="constant")(baseline(cfg) * scale))
    cond = torch.cat([padded, torch.full((1, *padded.shape[1:]), 0.70)])[None]
    noise = torch.randn((m, *cfg.latent_shape_dm), generator=torch.Generator().manual_seed(seed))
    for age_index in range(2):
        ctx = torch.as_tensor(contexts[age_index]).expand(m, 1, 8)

        def eps_fn(z, t, ctx=ctx):
            ts = torch.full((m,), t, dtype=torch.long)
            with torch.no_grad():
                down, mid = controlnet(x=z, timesteps=ts, context=ctx, controlnet_cond=cond.expand(m, -1, -1, -1, -1))
                return unet(x=z, timesteps=ts, context=ctx, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid)

        expected = _independent_ddim(noise.clone(), eps_fn, steps) / scale
        d0, h0, w0 = (np.array(cfg.latent_shape_dm[1:]) - np.array(cfg.latent_shape_ae[1:])) // 2
        d, h, w = cfg.latent_shape_ae[1:]
        expected = expected[:, :, d0:d0 + d, h0:h0 + h, w0:w0 + w]
        assert got[age_index].shape == expected.shape
        np.testing.assert_allclose(got[age_index].numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    assert got.abs().max() > 0.1  # a real signal, not zeros


def test_controlnet_condition_reaches_the_result_and_is_restored(nets):
    cfg, unet, controlnet, _ = nets
    embedding = controlnet.controlnet_cond_embedding
    contexts = contexts_for([72.0])
    a = run(nets, contexts)
    b = sample_latents(unet, controlnet, baseline(cfg), 50.0, contexts, m=2, num_inference_steps=4,
                       scheduler_cfg=cfg.scheduler, latent_shape_ae=cfg.latent_shape_ae)
    assert (a - b).abs().max() > 1e-4  # the baseline age changes the prediction
    assert controlnet.controlnet_cond_embedding is embedding


def test_pad_and_crop_round_trip():
    x = torch.randn(2, 3, 15, 18, 15)
    padded = pad_latent(x, (3, 16, 20, 16))
    assert padded.shape == (2, 3, 16, 20, 16)
    assert torch.equal(padded[:, :, :15, 1:19, :15], x)  # DivisiblePad puts the odd voxel at the end
    assert torch.equal(crop_latent(padded, (3, 15, 18, 15)), x)


# --- LAS ------------------------------------------------------------------------------------------

def test_shapes_and_decoding(nets):
    cfg, _, _, autoencoder = nets
    latents = run(nets, contexts_for([71.0, 73.0, 75.0]), m=3)
    assert latents.shape == (3, 3, *cfg.latent_shape_ae) and latents.dtype == torch.float32
    mask = np.zeros(cfg.image_shape, bool)
    mask[4:20, 6:26, 4:20] = True
    decoded = decode_las(autoencoder, latents, mask=mask, batch_size=2)
    assert decoded.mean_images.shape == (3, *cfg.image_shape)
    assert decoded.sd_maps.shape == (3, *cfg.image_shape)

    # BrLP's prediction: decode(mean latent); the SD map: SD (ddof=1) of the m decoded samples.
    with torch.no_grad():
        mean_image = autoencoder.decode_stage_2_outputs(latents[1].mean(0, keepdim=True))[0, 0].numpy()
        samples = autoencoder.decode_stage_2_outputs(latents[1])[:, 0].numpy()
    np.testing.assert_allclose(decoded.mean_images[1], mean_image, atol=1e-5)
    np.testing.assert_allclose(decoded.sd_maps[1], samples.std(axis=0, ddof=1), atol=1e-5)
    assert decoded.sd_maps.min() >= 0 and decoded.sd_maps[1].max() > 1e-4
    np.testing.assert_allclose(decoded.global_uncertainty[1], decoded.sd_maps[1][mask].mean(), rtol=1e-6)
    expected_latent_sd = latents[2].reshape(3, -1).std(dim=0, correction=1).mean().item()
    assert decoded.latent_sd[2] == pytest.approx(expected_latent_sd, rel=1e-5)

    plain = decode_las(autoencoder, latents, uncertainty=False)
    assert plain.sd_maps is None and plain.global_uncertainty is None
    np.testing.assert_allclose(plain.mean_images, decoded.mean_images, atol=1e-5)  # batch 1 vs 2
    with pytest.raises(ValueError, match="mask shape"):
        decode_las(autoencoder, latents, mask=np.ones((4, 4, 4), bool))


def test_common_random_numbers_across_target_ages(nets):
    contexts = contexts_for([72.0, 78.0, 72.0])
    contexts[2] = contexts[0]
    latents = run(nets, contexts)
    assert torch.equal(latents[0], latents[2])  # same conditioning + same noise -> same chains
    assert (latents[0] - latents[1]).abs().max() > 1e-4
    assert (latents[0, 0] - latents[0, 1]).abs().max() > 1e-2  # chains differ from each other


def test_m1_gives_zero_sd(nets):
    _, _, _, autoencoder = nets
    latents = run(nets, contexts_for([72.0, 74.0]), m=1)
    decoded = decode_las(autoencoder, latents)
    assert decoded.sd_maps.shape[0] == 2 and not decoded.sd_maps.any()
    np.testing.assert_array_equal(decoded.global_uncertainty, [0.0, 0.0])
    np.testing.assert_array_equal(decoded.latent_sd, [0.0, 0.0])


def test_batch_size_chunking_gives_the_same_result(nets):
    contexts = contexts_for([72.0, 76.0])
    whole = run(nets, contexts, m=3)
    fractions = []
    chunked = run(nets, contexts, m=3, batch_size=4, progress=lambda f, msg: fractions.append(f))
    # equal up to float rounding: batch size changes the order of convolution sums
    np.testing.assert_allclose(chunked.numpy(), whole.numpy(), rtol=1e-4, atol=1e-4)
    assert len(fractions) == 2 * 4 and fractions[-1] == pytest.approx(1.0)  # 2 chunks x 4 steps
    assert fractions == sorted(fractions)


def test_cancel_stops_sampling_and_decoding(nets):
    cfg, _, controlnet, autoencoder = nets
    embedding = controlnet.controlnet_cond_embedding
    calls = []

    def cancel_at_second(fraction, message):
        calls.append(message)
        if len(calls) == 2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        run(nets, contexts_for([72.0]), num_inference_steps=6, progress=cancel_at_second)
    assert len(calls) == 2 and "2/6" in calls[1]
    assert controlnet.controlnet_cond_embedding is embedding
    calls.clear()
    latents = torch.zeros((1, 3, *cfg.latent_shape_ae))
    with pytest.raises(Cancelled):
        decode_las(autoencoder, latents, progress=cancel_at_second)
    assert len(calls) == 2


def test_seeds_reproduce(nets):
    contexts = contexts_for([72.0])
    a, b = run(nets, contexts, seed=5), run(nets, contexts, seed=5)
    c = run(nets, contexts, seed=6)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_bad_inputs_are_named(nets):
    cfg, unet, controlnet, _ = nets
    kw = dict(m=2, num_inference_steps=2, scheduler_cfg=cfg.scheduler, latent_shape_ae=cfg.latent_shape_ae)
    ctx = contexts_for([72.0])
    with pytest.raises(ValueError, match="baseline_age"):
        sample_latents(unet, controlnet, baseline(cfg), 0.7, ctx, **kw)
    with pytest.raises(ValueError, match="contexts"):
        sample_latents(unet, controlnet, baseline(cfg), 70, ctx[:, :5], **kw)
    with pytest.raises(ValueError, match="baseline_latent"):
        sample_latents(unet, controlnet, torch.zeros(3, 4, 4, 4), 70, ctx, **kw)
    with pytest.raises(ValueError, match="m must"):
        sample_latents(unet, controlnet, baseline(cfg), 70, ctx, **dict(kw, m=0))


def test_channels_last_weights_give_the_same_result(nets):
    import copy

    from neuroatrophy.progression_sampling import use_channels_last

    cfg, unet, controlnet, autoencoder = nets
    contexts = contexts_for([72.0])
    plain = run(nets, contexts)
    copies = [copy.deepcopy(n) for n in (unet, controlnet, autoencoder)]
    use_channels_last(*copies)
    assert copies[0].conv_in.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    fast = sample_latents(copies[0], copies[1], baseline(cfg), 70.0, contexts, m=2, num_inference_steps=4,
                          scheduler_cfg=cfg.scheduler, latent_shape_ae=cfg.latent_shape_ae)
    np.testing.assert_allclose(fast.numpy(), plain.numpy(), rtol=1e-4, atol=1e-4)
    a = decode_las(autoencoder, plain).mean_images
    b = decode_las(copies[2], plain).mean_images
    np.testing.assert_allclose(b, a, atol=1e-4)
