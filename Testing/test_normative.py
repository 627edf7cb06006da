"""Normative model: parameter recovery, calibration, transfer, save/load and bad input."""

import json
import zipfile

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats

from neuroatrophy.basis import DesignSpec
from neuroatrophy.normative import ExtrapolationWarning, NormativeModel
from neuroatrophy.parallel import Cancelled
from neuroatrophy.warp import sinharcsinh_inverse

SITE_OFFSETS = {"A": 0.0, "B": 0.15, "C": -0.10}


def simulate(n, n_vertices, seed, sd_fn=None, sites=SITE_OFFSETS, age_range=(20, 80), skew=None):
    """Thickness-like data with a known mean (quadratic age, sex, site) and noise SD."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(*age_range, n)
    sex = rng.choice(["F", "M"], n)
    site = rng.choice(list(sites), n)
    slope = np.linspace(-0.004, -0.012, n_vertices)
    base = np.linspace(2.2, 3.0, n_vertices)
    mean = (
        base
        + slope * (age[:, None] - 50)
        - 0.00015 * (age[:, None] - 50) ** 2
        + 0.04 * (sex == "M")[:, None]
        + np.array([sites[s] for s in site])[:, None]
    )
    sd = np.full((n, 1), 0.2) if sd_fn is None else sd_fn(age)[:, None]
    noise = rng.standard_normal((n, n_vertices))
    if skew is not None:
        noise = sinharcsinh_inverse(noise, *skew)
    Y = mean + sd * noise
    covariates = pd.DataFrame({"subject_id": [f"sub-{seed}-{i:04d}" for i in range(n)],
                               "age": age, "sex": sex, "site": site})
    return Y, covariates, mean, np.broadcast_to(sd, Y.shape)


@pytest.fixture(scope="module")
def homoskedastic():
    Y, cov, mean, sd = simulate(600, 60, seed=1)
    Yt, covt, meant, sdt = simulate(3000, 60, seed=2)
    model = NormativeModel().fit(Y, cov)
    return model, (Y, cov), (Yt, covt, meant, sdt)


def test_recovers_mean_and_noise(homoskedastic):
    model, _, (Yt, covt, meant, sdt) = homoskedastic
    pred = model.predict(covt)
    # The fitted mean is within a small fraction of the 0.2 mm noise SD of the truth ...
    error = pred.mean - meant
    assert np.sqrt(np.mean(error**2)) < 0.15 * 0.2
    assert np.quantile(np.abs(error), 0.99) < 0.4 * 0.2
    # ... and the posterior's own uncertainty of the mean accounts for that error.
    param_sd = np.sqrt(pred.std**2 - 1.0 / model.beta_ * model.y_sd_**2)
    assert 0.8 < np.std(error / param_sd) < 1.25
    # Predictive SD ~ true noise SD (0.2 mm) plus a little parameter uncertainty.
    assert np.allclose(np.median(pred.std), 0.2, rtol=0.05)
    noise_sd = 1.0 / np.sqrt(model.beta_) * model.y_sd_
    assert np.isclose(np.median(noise_sd), 0.2, rtol=0.03) and np.allclose(noise_sd, 0.2, rtol=0.12)


def test_heldout_z_calibrated(homoskedastic):
    model, _, (Yt, covt, _, _) = homoskedastic
    table, calibration = model.evaluate(Yt, covt)
    assert abs(calibration["z_mean"]) < 0.03
    assert abs(calibration["z_sd"] - 1.0) < 0.03
    assert 0.04 < calibration["frac_beyond_1.96"] < 0.06
    # Explained variance is substantial (strong age effect) and MSLL beats the trivial model.
    assert (table["EV"] > 0.25).all() and (table["MSLL"] < -0.1).all()
    assert np.allclose(table["SMSE"], 1 - table["R2"], atol=0.01)
    assert (table["Rho"] > 0.5).all()


def test_z_matches_true_deviation(homoskedastic):
    model, _, (Yt, covt, meant, sdt) = homoskedastic
    dev = model.score(Yt, covt)
    true_z = (Yt - meant) / sdt
    assert np.corrcoef(dev.z.ravel(), true_z.ravel())[0, 1] > 0.99
    assert np.allclose(dev.centile, 100 * stats.norm.cdf(dev.z))


def _log_evidence(alpha, beta, Phi, y):
    n, d = Phi.shape
    A = alpha * np.eye(d) + beta * Phi.T @ Phi
    m = beta * np.linalg.solve(A, Phi.T @ y)
    ed = np.sum((y - Phi @ m) ** 2)
    return (0.5 * d * np.log(alpha) + 0.5 * n * np.log(beta) - 0.5 * beta * ed - 0.5 * alpha * m @ m
            - 0.5 * np.linalg.slogdet(A)[1] - 0.5 * n * np.log(2 * np.pi))


def test_matches_direct_evidence_maximisation():
    """The vectorised fixed point equals a per-vertex numerical optimum of the textbook evidence."""
    Y, cov, _, _ = simulate(200, 4, seed=3)
    model = NormativeModel(tol=1e-10, max_iter=2000).fit(Y, cov)
    Phi = model.design_.transform(cov)
    for v in range(Y.shape[1]):
        y = (Y[:, v] - model.y_mean_[v]) / model.y_sd_[v]
        # Null directions of Phi carry no evidence: drop them as the model does.
        U, s, Vt = np.linalg.svd(Phi, full_matrices=False)
        Phi_r = U[:, s > s[0] * 1e-10] * s[s > s[0] * 1e-10]
        best = optimize.minimize(lambda p: -_log_evidence(np.exp(p[0]), np.exp(p[1]), Phi_r, y),
                                 x0=[0.0, 0.0], method="Nelder-Mead",
                                 options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 5000})
        alpha, beta = np.exp(best.x)
        assert np.isclose(model.alpha_[v], alpha, rtol=1e-3)
        assert np.isclose(model.beta_[v], beta, rtol=1e-3)
        assert np.isclose(model.log_evidence_[v], -best.fun, rtol=1e-6)
        # Posterior mean and predictive variance from the explicit formulas.
        A = alpha * np.eye(Phi.shape[1]) + beta * Phi.T @ Phi
        A_inv = np.linalg.pinv(A)
        m = beta * A_inv @ Phi.T @ y
        assert np.allclose(Phi @ model.weights_[:, v], Phi @ m, atol=1e-5)
        var = 1 / beta + np.einsum("nd,de,ne->n", Phi, A_inv, Phi)
        mu, sd, _ = model._predict_warped(cov, [v])
        assert np.allclose(sd[:, 0] ** 2, var, rtol=1e-3)


def test_chunks_and_backends_agree():
    Y, cov, _, _ = simulate(150, 30, seed=4)
    reference = NormativeModel(chunk_size=4096, backend="sequential").fit(Y, cov)
    chunked = NormativeModel(chunk_size=7, n_jobs=2, backend="joblib").fit(Y, cov)
    single = NormativeModel(chunk_size=1, backend="sequential").fit(Y, cov)
    for other in (chunked, single):
        # Each response converges on its own: chunking changes nothing but summation order.
        assert np.allclose(other.alpha_, reference.alpha_, rtol=1e-12)
        assert np.allclose(other.weights_, reference.weights_, rtol=1e-12, atol=1e-14)


def test_heteroskedastic_noise_recovered():
    sd_fn = lambda age: 0.08 + 0.004 * (age - 20)   # 0.08 mm at 20 y to 0.32 mm at 80 y
    Y, cov, _, _ = simulate(800, 20, seed=5, sd_fn=sd_fn)
    Yt, covt, meant, sdt = simulate(2000, 20, seed=6, sd_fn=sd_fn)
    hetero = NormativeModel(heteroskedastic=True).fit(Y, cov)
    homo = NormativeModel().fit(Y, cov)
    pred = hetero.predict(covt)
    assert np.median(np.abs(pred.std / sdt - 1)) < 0.06
    z_het = hetero.score(Yt, covt).z
    z_hom = homo.score(Yt, covt).z
    old = covt["age"].to_numpy() > 65
    young = covt["age"].to_numpy() < 35
    assert abs(z_het[old].std() - 1) < 0.06 and abs(z_het[young].std() - 1) < 0.06
    assert z_hom[old].std() > 1.2 and z_hom[young].std() < 0.8   # the homoskedastic model is miscalibrated
    msll_het = hetero.evaluate(Yt, covt)[0]["MSLL"].mean()
    msll_hom = homo.evaluate(Yt, covt)[0]["MSLL"].mean()
    assert msll_het < msll_hom - 0.05


def test_sinharcsinh_warp_for_skewed_data():
    skew = (0.8, 1.0)    # right-skewed noise
    Y, cov, _, _ = simulate(800, 12, seed=7, skew=skew)
    Yt, covt, _, _ = simulate(2000, 12, seed=8, skew=skew)
    warped = NormativeModel(warp="sinharcsinh").fit(Y, cov)
    plain = NormativeModel().fit(Y, cov)
    z_w = warped.score(Yt, covt).z
    z_p = plain.score(Yt, covt).z
    # The warp acts on the standardised response, as PCNtoolkit's w-BLR does, so with a
    # strong age effect it removes much but not all of the noise's skew.
    assert abs(stats.skew(z_w.ravel())) < 0.5 * abs(stats.skew(z_p.ravel()))
    assert np.mean(z_w < -1.96) > 10 * np.mean(z_p < -1.96)       # lower tail no longer empty
    assert warped.evaluate(Yt, covt)[0]["MSLL"].mean() < plain.evaluate(Yt, covt)[0]["MSLL"].mean() - 0.02
    # Predictive median and quadrature mean differ in the direction of the skew.
    pred = warped.predict(covt.iloc[:5])
    assert np.all(pred.mean > pred.median)


@pytest.mark.parametrize("options", [{}, {"heteroskedastic": True}, {"warp": "sinharcsinh"}])
def test_save_load_round_trip_identical(tmp_path, options):
    Y, cov, _, _ = simulate(200, 15, seed=9)
    Yt, covt, _, _ = simulate(40, 15, seed=10)
    model = NormativeModel(**options).fit(Y, cov, response_names=[f"r{i}" for i in range(15)])
    model = model.adapt(*_new_site(Yt[:20], covt[:20]))
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = NormativeModel.load(path)
    for data, frame in ((Yt, covt), _new_site(Yt[20:], covt[20:])):
        a, b = model.score(data, frame), loaded.score(data, frame)
        assert np.array_equal(a.z, b.z) and np.array_equal(a.mean, b.mean) and np.array_equal(a.std, b.std)
    assert loaded.sites_ == model.sites_ and loaded._names() == model._names()
    with zipfile.ZipFile(path) as archive:
        metadata = json.loads(archive.read("metadata.json"))
        assert all(n.endswith(".npy") or n == "metadata.json" for n in archive.namelist())
    assert metadata["format"] == "neuroatrophy-model" and metadata["format_version"] == 1
    assert metadata["model_type"] == "NormativeModel"


def _new_site(Y, cov, offset=0.25):
    return Y + offset, cov.assign(site="D")


def test_adapt_to_new_site():
    Y, cov, _, _ = simulate(600, 40, seed=11)
    Yn, covn, meann, sdn = simulate(400, 40, seed=12)
    Yn, covn = _new_site(Yn, covn, offset=0.25)
    model = NormativeModel().fit(Y, cov)
    with pytest.raises(ValueError, match=r"site\(s\) \['D'\].*sub-12-0000.*adapt"):
        model.score(Yn, covn)
    adapted = model.adapt(Yn[:20], covn[:20])
    z = adapted.score(Yn[20:], covn[20:]).z
    assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.08
    # Scored as the average training site, the same subjects look 1.3 SD too thick.
    z_naive = model.score(Yn[20:], covn[20:].assign(site="A")).z
    assert z_naive.mean() > 0.9
    assert model.sites_ == ["A", "B", "C"] and adapted.sites_ == ["A", "B", "C", "D"]
    with pytest.raises(ValueError, match="already known"):
        adapted.adapt(Yn[:20], covn[:20])
    with pytest.raises(ValueError, match="at least 2 controls"):
        model.adapt(Yn[:1], covn[:1])


def test_progress_and_cancel():
    Y, cov, _, _ = simulate(100, 40, seed=13)
    seen = []
    NormativeModel(chunk_size=10, backend="sequential").fit(Y, cov, progress=lambda f, m: seen.append(f))
    assert seen == [0.25, 0.5, 0.75, 1.0]

    def cancel(fraction, message):
        raise Cancelled("stop")

    model = NormativeModel(chunk_size=10)
    with pytest.raises(Cancelled):
        model.fit(Y, cov, progress=cancel)
    assert not hasattr(model, "weights_")


def test_bad_input_errors():
    Y, cov, _, _ = simulate(100, 10, seed=14)
    with pytest.raises(ValueError, match=r"too few controls.*10 given"):
        NormativeModel().fit(Y[:10], cov[:10])
    bad = Y.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="sub-14-0003"):
        NormativeModel().fit(bad, cov)
    with pytest.raises(ValueError, match="rows but the covariates have"):
        NormativeModel().fit(Y[:50], cov)
    with pytest.raises(ValueError, match="warp"):
        NormativeModel(warp="boxcox").fit(Y, cov)
    with pytest.raises(ValueError, match="no variance.*response.*4"):
        constant = Y.copy()
        constant[:, 4] = 2.5
        NormativeModel().fit(constant, cov)
    model = NormativeModel().fit(Y, cov)
    with pytest.raises(ValueError, match="fitted on 10"):
        model.score(Y[:, :8], cov)
    with pytest.raises(ValueError, match="age"):
        model.score(Y, cov.drop(columns="age"))
    old = cov.iloc[:2].assign(age=[95.0, 50.0])
    with pytest.warns(ExtrapolationWarning, match=r"sub-14-0000.*outside the training range"):
        model.score(Y[:2], old)
    with pytest.raises(ValueError, match="unknown response"):
        model.centile_curves([30, 40], "nope")
    with pytest.raises(RuntimeError, match="not fitted"):
        NormativeModel().predict(cov)


def test_centile_curves_follow_the_data():
    Y, cov, mean, _ = simulate(800, 3, seed=15, sites={"A": 0.0})
    model = NormativeModel().fit(Y, cov)
    curves = model.centile_curves(np.array([30.0, 50.0, 70.0]), 1, sex="F", site="A")
    slope = np.linspace(-0.004, -0.012, 3)[1]
    true_median = 2.6 + slope * (curves["age"] - 50) - 0.00015 * (curves["age"] - 50) ** 2
    assert np.allclose(curves["p50"], true_median, atol=0.03)
    assert np.allclose(curves["p95"] - curves["p50"], 1.645 * 0.2, rtol=0.1)
    assert (np.diff(curves[["p5", "p25", "p50", "p75", "p95"]].to_numpy(), axis=1) > 0).all()


def test_design_spec_extrapolates_linearly():
    cov = pd.DataFrame({"age": np.linspace(20, 80, 50), "sex": "F", "site": "A"})
    spec = DesignSpec().fit(cov)
    far = spec.transform(pd.DataFrame({"age": [100.0, 120.0], "sex": "F", "site": "A"}))
    # Beyond the range only the linear age column changes.
    changed = np.flatnonzero(~np.isclose(far[0], far[1]))
    assert spec.column_names[changed[0]] == "age" and len(changed) == 1
