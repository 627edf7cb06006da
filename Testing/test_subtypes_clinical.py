"""Tests of neuroatrophy.subtypes_clinical: ANCOVA across subtypes and stage associations."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from neuroatrophy.subtypes_clinical import holm, stage_associations, subtype_differences


def cohort(rng, n=240):
    """Subjects with subtype 1..3, stage 0..15 and a score depending on subtype, stage and age."""
    subtype = rng.integers(1, 4, n)
    stage = rng.integers(0, 16, n)
    age = rng.uniform(20, 70, n)
    male = rng.random(n) < 0.5
    slope = np.array([0.0, 0.4, 0.1, -0.2])[subtype]
    offset = np.array([0.0, 0.0, 1.5, 3.0])[subtype]
    edss = offset + slope * stage + 0.05 * age + 0.5 * male + rng.normal(0, 1.0, n)
    return pd.DataFrame({
        "subject_id": [f"s{i:03d}" for i in range(n)], "ml_subtype": subtype, "ml_stage": stage,
        "age": age, "sex": np.where(male, "M", "F"), "edss": edss, "sdmt": 50 - 1.5 * stage + rng.normal(0, 5, n),
    })


def test_holm_adjustment():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.5]), [0.04, 0.09, 0.09, 0.5])
    np.testing.assert_allclose(holm([0.6, 0.7]), [1.0, 1.0])


def test_without_covariates_the_f_test_is_one_way_anova(rng):
    table = cohort(rng)
    result = subtype_differences(table, ["edss", "sdmt"], include_stage0=True)
    for score in ("edss", "sdmt"):
        rows = result[result.score == score].set_index("effect", append=True)
        f_row = result[(result.score == score) & (result.effect == "subtype")].iloc[0]
        groups = [table.loc[table.ml_subtype == k, score] for k in (1, 2, 3)]
        expected = stats.f_oneway(*groups)
        assert f_row.statistic == pytest.approx(expected.statistic, rel=1e-10)
        assert f_row.p == pytest.approx(expected.pvalue, rel=1e-8)
        assert (f_row.df_num, f_row.df_den, f_row.n, f_row.n_excluded) == (2, len(table) - 3, len(table), 0)
        means = result[(result.score == score) & (result.effect == "adjusted_mean")]
        np.testing.assert_allclose(means.estimate, [g.mean() for g in groups], rtol=1e-10)
        assert means.n.tolist() == [len(g) for g in groups]
        assert len(rows) == 1 + 3 + 3

    # Pairwise contrasts: pooled-variance t-tests with the ANOVA's residual variance, Holm adjusted.
    contrasts = result[(result.score == "edss") & (result.effect == "contrast")]
    groups = {k: table.loc[table.ml_subtype == k, "edss"].to_numpy() for k in (1, 2, 3)}
    pooled = sum(((g - g.mean()) ** 2).sum() for g in groups.values()) / (len(table) - 3)
    for row in contrasts.itertuples():
        a, b = groups[row.subtype], groups[row.versus]
        se = np.sqrt(pooled * (1 / len(a) + 1 / len(b)))
        assert row.estimate == pytest.approx(a.mean() - b.mean(), rel=1e-10)
        assert row.statistic == pytest.approx((a.mean() - b.mean()) / se, rel=1e-10)
    assert [(r.subtype, r.versus) for r in contrasts.itertuples()] == [(1, 2), (1, 3), (2, 3)]
    assert all(type(v) is int for v in contrasts.subtype)   # labels as given, not 1.0
    np.testing.assert_allclose(contrasts.p_holm, holm(contrasts.p))


def test_with_covariates_the_f_test_is_the_nested_model_comparison(rng):
    table = cohort(rng)
    table.loc[[3, 10], "edss"] = np.nan
    table.loc[20, "age"] = np.nan
    result = subtype_differences(table, "edss", covariates=["age", "sex"])
    f_row = result[result.effect == "subtype"].iloc[0]

    used = (table.ml_stage != 0) & table.edss.notna() & table.age.notna()
    sub = table[used]
    y = sub.edss.to_numpy()
    base = np.column_stack([np.ones(len(sub)), sub.age, sub.sex == "M"]).astype(float)
    full = np.column_stack([base, sub.ml_subtype == 2, sub.ml_subtype == 3]).astype(float)

    def rss(X):
        coef = np.linalg.lstsq(X, y, rcond=None)[0]
        return ((y - X @ coef) ** 2).sum(), coef

    (rss_r, _), (rss_f, coef) = rss(base), rss(full)
    df_den = len(sub) - full.shape[1]
    f_value = (rss_r - rss_f) / 2 / (rss_f / df_den)
    assert f_row.statistic == pytest.approx(f_value, rel=1e-9)
    assert f_row.p == pytest.approx(stats.f.sf(f_value, 2, df_den), rel=1e-8)
    excluded = ((table.ml_stage != 0) & ~used).sum()
    assert (f_row.n, f_row.n_excluded, f_row.df_den) == (used.sum(), excluded, df_den)

    # Adjusted means at the covariate means: their differences are the subtype coefficients.
    means = result[result.effect == "adjusted_mean"].set_index("subtype").estimate
    assert means[2] - means[1] == pytest.approx(coef[3], rel=1e-9)
    assert means[3] - means[1] == pytest.approx(coef[4], rel=1e-9)
    center = full.mean(axis=0)
    assert means[1] == pytest.approx(center[:3] @ coef[:3], rel=1e-9)
    # Simulated: offset 3 and stage slope -0.2 (subtype 3) vs offset 0 and slope 0.4 (subtype 1).
    assert means[3] - means[1] == pytest.approx(3.0 - 0.6 * sub.ml_stage.mean(), abs=0.6)


def test_stage0_subjects_are_dropped_by_default(rng):
    table = cohort(rng)
    n_stage0 = int((table.ml_stage == 0).sum())
    assert n_stage0 > 0
    default = subtype_differences(table, "edss")
    assert default.loc[default.effect == "subtype", "n"].item() == len(table) - n_stage0
    with pytest.raises(ValueError, match="missing column\\(s\\) 'ml_stage'"):
        subtype_differences(table.drop(columns="ml_stage"), "edss")


def test_subtype_differences_errors(rng):
    table = cohort(rng)
    with pytest.raises(ValueError, match="missing column\\(s\\) 'moca', 'bmi'"):
        subtype_differences(table, ["edss", "moca"], covariates=["bmi"])
    bad = table.astype({"edss": object})
    bad.loc[4, "edss"] = "unknown"
    with pytest.raises(ValueError, match="column 'edss' must be numeric: subject s004 has 'unknown'"):
        subtype_differences(bad, "edss")
    with pytest.raises(ValueError, match="score column 'flat' is constant"):
        subtype_differences(table.assign(flat=2.0), "flat")
    gone = table.copy()
    gone.loc[gone.ml_subtype == 3, "edss"] = np.nan
    with pytest.raises(ValueError, match="score 'edss': no subject of subtype 3 is left after dropping"):
        subtype_differences(gone, "edss")
    with pytest.raises(ValueError, match="has 1 subtype\\(s\\)"):
        subtype_differences(table[table.ml_subtype == 2], "edss")
    with pytest.raises(ValueError, match="constant or collinear with the subtypes"):
        subtype_differences(table.assign(site=table.ml_subtype.astype(str)), "edss", covariates=["site"])


def test_stage_association_recovers_the_slope_per_subtype(rng):
    table = cohort(rng, n=900)
    result = stage_associations(table, "edss", covariates=["age", "sex"])
    assert result.subtype.tolist() == [1, 2, 3, "all"]
    by_subtype = result.set_index("subtype")
    for k, true_slope in ((1, 0.4), (2, 0.1), (3, -0.2)):
        assert by_subtype.beta[k] == pytest.approx(true_slope, abs=0.06)
        assert np.sign(by_subtype.spearman_rho[k]) == np.sign(true_slope)

    # Partial r and standardised beta from their definitions, for subtype 1.
    sub = table[(table.ml_subtype == 1) & (table.ml_stage != 0)]
    Z = np.column_stack([np.ones(len(sub)), sub.age, sub.sex == "M"]).astype(float)

    def residual(v):
        v = np.asarray(v, float)
        return v - Z @ np.linalg.lstsq(Z, v, rcond=None)[0]

    row = by_subtype.loc[1]
    partial = np.corrcoef(residual(sub.edss), residual(sub.ml_stage))[0, 1]
    assert row.partial_r == pytest.approx(partial, rel=1e-9)
    assert row.std_beta == pytest.approx(row.beta * sub.ml_stage.std() / sub.edss.std(), rel=1e-12)
    assert row.n == len(sub) and row.df == len(sub) - 4
    rho = stats.spearmanr(sub.ml_stage, sub.edss)
    assert row.spearman_rho == pytest.approx(rho.statistic) and row.spearman_p == pytest.approx(rho.pvalue)
    assert row.p < 1e-10 and row.t == pytest.approx(row.beta / row.se)


def test_stage_association_notes_degenerate_subtypes_and_errors(rng):
    table = cohort(rng)
    table.loc[table.ml_subtype == 3, "ml_stage"] = 4
    table.loc[2, "sdmt"] = np.nan
    result = stage_associations(table, ["sdmt"], include_stage0=True).set_index("subtype")
    assert np.isnan(result.beta[3]) and result.note[3] == "every subject is at stage 4"
    assert result.n_excluded[table.ml_subtype[2]] == 1
    assert result.beta["all"] == pytest.approx(-1.5, abs=0.25)
    with pytest.raises(ValueError, match="missing column\\(s\\) 'stage'"):
        stage_associations(table, "sdmt", stage_column="stage")
    with pytest.raises(ValueError, match="score column 'flat' is constant"):
        stage_associations(table.assign(flat=1), "flat")
    bad = table.astype({"age": object})
    bad.loc[7, "age"] = "forty"
    with pytest.raises(ValueError, match="column 'age' must be numeric: subject s007 has 'forty'"):
        stage_associations(bad, "sdmt", covariates=["age"])
