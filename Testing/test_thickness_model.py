"""CorticalThicknessModel on fsaverage5 and the `neuroatrophy` command end to end."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from neuroatrophy.cli import main
from neuroatrophy.io import read_surface_data, write_surface_data
from neuroatrophy.surface import dk_atlas, template_thickness
from neuroatrophy.thickness_model import CorticalThicknessModel, regional_means

N_VERTICES = 20484


def simulate_cohort(n, seed, sites=("A", "B"), atrophy_region=None, offset=0.0):
    rng = np.random.default_rng(seed)
    base = np.maximum(template_thickness(), 0.0)
    cortex = ~dk_atlas().medial_wall
    age = rng.uniform(20, 75, n)
    sex = rng.choice(["F", "M"], n)
    site = rng.choice(list(sites), n)
    sd = 0.2
    Y = base + cortex * (-0.01 * (age[:, None] - 50) + 0.03 * (sex == "M")[:, None] + offset
                         + sd * rng.standard_normal((n, N_VERTICES)))
    Y[:, ~cortex] = np.abs(Y[:, ~cortex])
    if atrophy_region is not None:
        Y[:, dk_atlas().region_mask(atrophy_region)] -= 4 * sd
    cov = pd.DataFrame({"subject_id": [f"s{seed}-{i:03d}" for i in range(n)], "age": age, "sex": sex, "site": site})
    return Y, cov


@pytest.fixture(scope="module")
def fitted():
    Y, cov = simulate_cohort(150, seed=1)
    return CorticalThicknessModel().fit(Y, cov)


def test_patient_map_finds_planted_atrophy(fitted):
    Y, cov = simulate_cohort(3, seed=2, atrophy_region="L_superiortemporal")
    pm = fitted.patient_map(Y[0], cov.iloc[[0]], min_cluster_size=10)
    truth = dk_atlas().region_mask("L_superiortemporal")
    assert np.isnan(pm.z[dk_atlas().medial_wall]).all()
    assert np.mean(pm.atrophy.mask[truth]) > 0.9                     # sensitivity
    assert np.mean(pm.atrophy.mask[~truth & fitted.cortex_]) < 0.03  # false positives
    assert pm.regions.iloc[0]["region"] == "L_superiortemporal"
    assert pm.regions.set_index("region").loc["L_superiortemporal", "regional_z"] < -5
    assert pm.subject_id == "s2-000" and pm.sex in ("F", "M")
    assert np.isclose(pm.regional_thickness["L_superiortemporal"],
                      regional_means(Y[0], dk_atlas())[0][dk_atlas().label_of("L_superiortemporal") - 1])


def test_region_centile_curves(fitted):
    curves = fitted.region_centile_curves("R_precentral", sex="F", site="A")
    assert list(curves.columns) == ["age", "p5", "p25", "p50", "p75", "p95"]
    assert curves["p50"].iloc[0] > curves["p50"].iloc[-1]             # thinning with age
    with pytest.raises(ValueError, match="unknown response 'R_nowhere'"):
        fitted.region_centile_curves("R_nowhere")


def test_save_load_identical(fitted, tmp_path):
    Y, cov = simulate_cohort(5, seed=3)
    path = tmp_path / "model.npz"
    fitted.save(path)
    loaded = CorticalThicknessModel.load(path)
    for a, b in zip(fitted.score(Y, cov), loaded.score(Y, cov)):
        assert np.array_equal(a, b, equal_nan=True)
    a, b = fitted.patient_maps(Y, cov), loaded.patient_maps(Y, cov)
    pd.testing.assert_frame_equal(a[0].regions, b[0].regions)


def test_bad_inputs(fitted, tmp_path):
    Y, cov = simulate_cohort(5, seed=4)
    with pytest.raises(ValueError, match=r"10242 vertices per subject \(one hemisphere of fsaverage5"):
        fitted.score(Y[:, :10242], cov)
    with pytest.raises(ValueError, match=r"81924 vertices per subject \(both hemispheres of fsaverage6\)"):
        fitted.score(np.zeros((5, 81924)), cov)
    with pytest.raises(ValueError, match="too few controls"):
        CorticalThicknessModel().fit(Y, cov)
    with pytest.raises(ValueError, match="template"):
        CorticalThicknessModel(template="fsaverage").fit(Y, cov)
    not_a_model = tmp_path / "model.npz"
    np.savez(not_a_model, x=np.arange(3))
    with pytest.raises(ValueError, match="not a NeuroAtrophy model file"):
        CorticalThicknessModel.load(not_a_model)


def test_adapt_new_site(fitted):
    Y, cov = simulate_cohort(60, seed=5, sites=("Z",), offset=0.15)
    adapted = fitted.adapt(Y[:25], cov[:25])
    z, _ = adapted.score(Y[25:], cov[25:])
    assert abs(np.nanmean(z)) < 0.1
    assert "Z" in adapted.sites_ and "Z" not in fitted.sites_


# ---------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def cohort_on_disk(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    Yc, covc = simulate_cohort(90, seed=6)
    Yp, covp = simulate_cohort(3, seed=7, atrophy_region="R_lateraloccipital")
    cov = pd.concat([covc.assign(group="control"), covp.assign(group="patient")], ignore_index=True)
    Y = np.vstack([Yc, Yp])
    for sid, y in zip(cov["subject_id"], Y):
        surf = root / "subjects" / sid / "surf"
        surf.mkdir(parents=True)
        write_surface_data(surf / "lh.thickness.fsaverage5.mgh", y[:10242])
        write_surface_data(surf / "rh.thickness.fsaverage5.mgh", y[10242:])
    cov.to_csv(root / "cohort.csv", index=False)
    return root


def test_cli_fit_map_info(cohort_on_disk, tmp_path, capsys):
    root = cohort_on_disk
    model = tmp_path / "model.npz"
    assert main(["fit", "--cohort", str(root / "cohort.csv"), "--subjects-dir", str(root / "subjects"),
                 "--out", str(model), "--progress", "json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    fractions = [line["progress"] for line in lines if "progress" in line]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    quality = json.loads((tmp_path / "model.quality.json").read_text())
    assert quality["n_train"] == 72 and quality["n_test"] == 18
    assert abs(quality["calibration"]["z_mean"]) < 0.1

    out = tmp_path / "maps"
    assert main(["map", "--model", str(model), "--cohort", str(root / "cohort.csv"),
                 "--subjects-dir", str(root / "subjects"), "--out", str(out), "--min-cluster-size", "5"]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["subject_id"]) == ["s7-000", "s7-001", "s7-002"]
    assert all("R_lateraloccipital" in regions for regions in summary["top_regions"])
    z_lh = read_surface_data(out / "s7-000" / "lh.z.fsaverage5.mgh")
    z_rh = read_surface_data(out / "s7-000" / "rh.z.fsaverage5.mgh")
    truth = dk_atlas().region_mask("R_lateraloccipital")
    assert np.mean(np.concatenate([z_lh, z_rh])[truth] < -1.96) > 0.8

    capsys.readouterr()
    assert main(["info", "--model", str(model)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "CorticalThicknessModel" and info["sites"] == ["A", "B"]


def test_cli_errors_are_clear_and_write_nothing(cohort_on_disk, tmp_path, capsys):
    root = cohort_on_disk
    bad = pd.read_csv(root / "cohort.csv")
    bad.loc[3, "subject_id"] = bad.loc[2, "subject_id"]
    bad.to_csv(tmp_path / "dup.csv", index=False)
    model = tmp_path / "model.npz"
    code = main(["fit", "--cohort", str(tmp_path / "dup.csv"), "--subjects-dir", str(root / "subjects"),
                 "--out", str(model), "--progress", "json"])
    assert code == 2
    error = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"error"' in line][0]["error"]
    assert "duplicate" in error.lower() and "s6-002" in error
    assert list(tmp_path.iterdir()) == [tmp_path / "dup.csv"]


def test_cli_runs_as_a_module(tmp_path):
    result = subprocess.run([sys.executable, "-m", "neuroatrophy", "info", "--model", str(tmp_path / "none.npz")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "model file not found" in result.stderr
