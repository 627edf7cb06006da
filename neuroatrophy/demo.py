"""Synthetic demo cohort on fsaverage5 with known ground truth, and the end-to-end demo.

**The cohort is synthetic.** Its geometry and baseline thickness are real (the
fsaverage5 template meshes and the thickness map of FreeSurfer's ``fsaverage``
subject, shipped with nilearn), its patient effect sizes are real published ones
(ENIGMA-Schizophrenia), and every subject is simulated. Because the generating
model is known, the demo can check what the pipeline recovers: the normative mean
and SD of each subject at each vertex, and each patient's true atrophy map.

Generative model (``t`` = thickness in mm at vertex ``v`` of subject ``i``)::

    t_iv = mu_v(age_i, sex_i, site_i) - e_iv + sd_v(age_i, site_i) * (sqrt(rho) * f_iv + sqrt(1 - rho) * u_iv)

* ``mu_v`` (the normative mean, :attr:`DemoCohort.true_mean`)::

      mu_v = b_v * (1 - r_v * (age - 45) - r_v * a * max(age - 60, 0)**2 / (2 * 15))
             + s_v * [sex == M] + o_kv

  - ``b_v``: template thickness (the thickness of FreeSurfer's ``fsaverage``) taken
    as the mean at age 45;
  - ``r_v``: relative thinning rate, drawn per Desikan-Killiany region from
    U(0.4 %, 0.9 %) per year and smoothed on the mesh (5 averaging steps), i.e.
    about 0.01-0.03 mm per year (5th-95th centile over vertices 0.009-0.024 mm);
    ``a = 0.5``: the rate rises linearly after age 60 and is 1.5 times the adult
    rate at 75 (accelerated thinning in old age);
  - ``s_v``: male minus female offset, drawn per region from -U(0.02, 0.05) mm
    (women have a slightly thicker cortex), smoothed (5 steps);
  - ``o_kv``: offset of site ``k``, ``c_k * (1 + 0.3 g_kv)`` with ``|c_k|`` from
    U(0.03, 0.08) mm, a random sign, and ``g_kv`` a unit-variance smooth field
    (the first site's offset included; only differences between sites matter);
* ``sd_v`` (the normative SD, :attr:`DemoCohort.true_sd`)::

      sd_v = n_v * (1 + 0.003 * (age - 18)) * q_k

  with ``n_v = clip(0.10 + 0.035 b_v, 0.15, 0.22)`` mm (thicker cortex, larger
  spread; smoothed 3 steps), rising by 17 % from age 18 to 75, and a noise scale
  ``q_k`` from U(0.9, 1.1) per site;
* ``f_iv``: a subject-level smooth field (white noise smoothed with
  :func:`~neuroatrophy.surface.smooth_on_surface`, 8 steps, then scaled to unit
  variance at every vertex exactly); ``u_iv``: independent N(0, 1) vertex noise;
  ``rho = 0.5`` of the noise variance is smooth;
* ``e_iv`` (:attr:`DemoCohort.true_effect`, mm of thinning, 0 for controls):
  each patient gets a group shift ``0.3 |d_r| sd_v`` in every DK region ``r``
  (``d_r`` the ENIGMA Cohen's d of that region) plus focal atrophy in ``K``
  regions, ``K`` uniform on 3..8, drawn without replacement with probability
  proportional to ``d_r**2`` (regions more affected in the ENIGMA meta-analysis are
  more likely). An affected region is thinned by ``A sd_v p_v`` with ``A`` from
  U(2.5, 4) and ``p_v`` the region's indicator smoothed by 3 averaging steps and
  rescaled to 1 at its maximum (a taper across the region border);
* the **true atrophy map** (:attr:`DemoCohort.true_atrophy`) is ``e_iv >= 1.5 sd_v``;
  the group shift alone is below 0.17 sd, so the map is the focal atrophy.

The medial wall (Desikan-Killiany label 0, where the template thickness is ~0) is
held at 0.5 mm with noise SD 0.02 mm, no covariate effects and no atrophy, so that
every value is a valid thickness. Thickness values are floored at 0.05 mm (this
touches a negligible fraction of values; the fraction is in ``params``).

Covariates: ages 18-75 (controls ``18 + 57 Beta(1.6, 2.0)``, mean ~43; patients
``18 + 57 Beta(1.5, 2.5)``, mean ~39), sexes balanced, sites unbalanced (sizes in
proportion ``n_sites : n_sites - 1 : ... : 1``; patients spread over the sites in
the same proportion). Each patient also gets a synthetic outcome,
``panss_change`` (% change of the PANSS total score after treatment, negative =
improvement)::

    panss_change = -30 + 8 * standardised(atrophy burden) + N(0, 10)

with the burden the fraction of cortical vertices in the patient's true atrophy
map (expected correlation ~0.6); it exists only to exercise outcome analyses.

Random streams for the ground-truth maps, the covariates, the noise and the
patients' atrophy are spawned separately from ``seed``, so the ground-truth maps
(``params``) do not depend on the cohort size.

References
----------
van Erp TGM, et al. Cortical brain abnormalities in 4474 individuals with
schizophrenia and 5098 control subjects via the Enhancing Neuro Imaging Genetics
Through Meta Analysis (ENIGMA) consortium. Biol Psychiatry 84, 644-654 (2018).

Larivière S, et al. The ENIGMA Toolbox: multiscale neural contextualization of
multisite neuroimaging datasets. Nat Methods 18, 698-700 (2021). (Source of the
vendored table ``data/scz_case-controls_CortThick.csv``, BSD-3-Clause.)
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .surface import DK_NAMES, dk_atlas, load_fsaverage5, smooth_on_surface, template_thickness

__all__ = [
    "DemoCohort",
    "make_demo_cohort",
    "write_demo_cohort",
    "read_ground_truth",
    "run_demo",
    "enigma_schizophrenia_d",
    "normative_mean",
    "normative_sd",
]

# ---------------------------------------------------------------- generative constants
_AGE_RANGE = (18.0, 75.0)
_AGE_CENTRE = 45.0             # the template thickness is taken as the mean at this age
_ACCELERATION_ONSET = 60.0     # thinning accelerates after this age ...
_ACCELERATION = 0.5            # ... reaching (1 + this) x the adult rate ...
_ACCELERATION_SPAN = 15.0      # ... this many years after the onset
_RATE_RANGE = (0.004, 0.009)   # relative thinning per year (per region)
_SEX_RANGE = (0.02, 0.05)      # mm, female minus male (per region)
_SITE_RANGE = (0.03, 0.08)     # mm, |site offset|
_SITE_FIELD = 0.3              # relative spatial modulation of a site offset
_SITE_NOISE_RANGE = (0.9, 1.1)
_NOISE_SD = (0.10, 0.035, 0.15, 0.22)  # intercept, slope on template thickness, clip low, clip high (mm)
_NOISE_AGE_SLOPE = 0.003       # relative increase of the noise SD per year after 18
_SMOOTH_FRACTION = 0.5         # fraction of the noise variance in the subject-level smooth field
_SMOOTH_STEPS = 8              # averaging steps of the subject-level field
_PARAM_SMOOTH_STEPS = 5        # averaging steps of the region-wise parameter maps
_MEDIAL_WALL_MM = 0.5
_MEDIAL_WALL_SD = 0.02
_FLOOR_MM = 0.05

_N_REGIONS_RANGE = (3, 8)      # focal atrophy: number of affected regions per patient
_AMPLITUDE_RANGE = (2.5, 4.0)  # thinning in units of the patient's noise SD
_TAPER_STEPS = 3
_TRUE_MAP_SD = 1.5             # a vertex is truly atrophic when its thinning >= this many SD
_GROUP_SHIFT = 0.3             # all patients: thinning of |d| x SD x this in every region
_REGION_WEIGHT_POWER = 2.0     # affected regions drawn with probability ~ |d| ** this

_OUTCOME = (-30.0, 8.0, 10.0)  # panss_change: intercept, slope on standardised burden, noise SD

_STREAMS = ("params", "covariates", "noise", "patients", "outcome")


@dataclass(eq=False)
class DemoCohort:
    """A synthetic cohort with its ground truth (see :mod:`neuroatrophy.demo`).

    Attributes
    ----------
    covariates : pandas.DataFrame
        ``subject_id``, ``age``, ``sex``, ``site``, ``group`` (``"control"`` or
        ``"patient"``) and ``panss_change`` (patients only, NaN for controls); controls
        first, then patients.
    thickness : ndarray of shape (n_subjects, 20484)
        Simulated cortical thickness (mm), left hemisphere then right.
    true_atrophy : ndarray of shape (n_patients, 20484), bool
        Each patient's true atrophy map (thinning >= 1.5 x the normative SD).
    true_effect : ndarray of shape (n_patients, 20484)
        Thinning applied to each patient (mm, >= 0).
    true_mean, true_sd : ndarray of shape (n_subjects, 20484)
        The generating normative mean and SD of every subject (for patients: what
        their thickness would be without disease).
    params : dict
        Ground-truth maps and constants (see :func:`make_demo_cohort`).
    affected_regions : list of list of str
        Per patient, the Desikan-Killiany regions given focal atrophy.
    """

    covariates: pd.DataFrame
    thickness: np.ndarray
    true_atrophy: np.ndarray
    true_effect: np.ndarray
    true_mean: np.ndarray
    true_sd: np.ndarray
    params: dict
    affected_regions: list = field(default_factory=list)

    @property
    def is_patient(self) -> np.ndarray:
        """Boolean mask of the patient rows of :attr:`covariates` and :attr:`thickness`."""
        return (self.covariates["group"] == "patient").to_numpy()

    @property
    def n_patients(self) -> int:
        """Number of patients."""
        return int(self.is_patient.sum())


def enigma_schizophrenia_d() -> pd.Series:
    """ENIGMA-Schizophrenia case-control Cohen's d of cortical thickness per DK region.

    From van Erp et al., Biol Psychiatry 2018 (ICV-adjusted ``d_icv``), as
    distributed by the ENIGMA Toolbox (Larivière et al., Nat Methods 2021).
    Returns a Series indexed by region name in ENIGMA order (``L_bankssts`` ...
    ``R_insula``); all values are negative (thinner cortex in patients).
    """
    source = resources.files("neuroatrophy") / "data" / "scz_case-controls_CortThick.csv"
    with resources.as_file(source) as path:
        table = pd.read_csv(path)
    d = pd.Series(table["d_icv"].to_numpy(dtype=float), index=table["Structure"].astype(str), name="d")
    if list(d.index) != list(DK_NAMES):
        raise ValueError(f"{source}: regions are not the 68 Desikan-Killiany regions in ENIGMA order")
    return d


# ------------------------------------------------------------------------ generation
def make_demo_cohort(n_controls: int = 600, n_patients: int = 60, n_sites: int = 4, seed: int = 0) -> DemoCohort:
    """Simulate a cohort of controls and schizophrenia-like patients on fsaverage5.

    The generative model is described in :mod:`neuroatrophy.demo`. The cohort is
    synthetic: real template geometry and thickness, real published effect sizes
    (ENIGMA-Schizophrenia, van Erp et al. 2018), simulated subjects.

    Parameters
    ----------
    n_controls, n_patients : int
        Group sizes (controls >= 1, patients >= 0).
    n_sites : int
        Number of acquisition sites (>= 1); sites are unbalanced.
    seed : int
        Seed of every random draw; the same seed gives the same cohort.

    Returns
    -------
    DemoCohort
        ``params`` holds ``baseline``, ``age_rate`` (relative per year), ``age_slope_mm``
        (mm per year at age 45, negative), ``sex_effect`` (male minus female, mm),
        ``site_offsets`` (n_sites, V), ``site_names``, ``site_noise_scale``
        (n_sites,), ``noise_sd`` (V, at age 18 and scale 1), ``enigma_d`` (68,),
        ``group_shift_sd`` (V, group shift in SD units), ``medial_wall`` (V, bool),
        ``fraction_floored``, and the scalar constants of the model.
    """
    for name, value, low in (("n_controls", n_controls, 1), ("n_patients", n_patients, 0), ("n_sites", n_sites, 1)):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    streams = dict(zip(_STREAMS, (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(_STREAMS)))))
    surface = load_fsaverage5("sphere")
    atlas = dk_atlas()
    params = _ground_truth(streams["params"], surface, atlas, int(n_sites))
    covariates = _draw_covariates(streams["covariates"], int(n_controls), int(n_patients), params["site_names"])

    site_index = pd.Index(params["site_names"]).get_indexer(covariates["site"])
    age = covariates["age"].to_numpy()
    male = (covariates["sex"] == "M").to_numpy()
    true_mean = normative_mean(params, age, male, site_index)
    true_sd = normative_sd(params, age, site_index)

    patients = (covariates["group"] == "patient").to_numpy()
    true_effect, affected = _patient_atrophy(streams["patients"], surface, atlas, params, true_sd[patients])
    true_atrophy = true_effect >= _TRUE_MAP_SD * true_sd[patients]

    noise = _noise(streams["noise"], surface, len(covariates))
    thickness = true_mean + true_sd * noise
    thickness[patients] -= true_effect
    floored = thickness < _FLOOR_MM
    params["fraction_floored"] = float(floored.mean())
    thickness[floored] = _FLOOR_MM

    covariates["panss_change"] = np.nan
    covariates.loc[patients, "panss_change"] = _outcome(streams["outcome"], true_atrophy, ~params["medial_wall"])
    return DemoCohort(
        covariates=covariates,
        thickness=thickness,
        true_atrophy=true_atrophy,
        true_effect=true_effect,
        true_mean=true_mean,
        true_sd=true_sd,
        params=params,
        affected_regions=affected,
    )


def _ground_truth(rng, surface, atlas, n_sites) -> dict:
    """Per-vertex ground-truth maps (independent of the cohort size)."""
    medial = atlas.medial_wall
    cortex = ~medial
    baseline = template_thickness()
    baseline[medial] = _MEDIAL_WALL_MM

    def region_map(low, high, steps=_PARAM_SMOOTH_STEPS):
        per_region = np.concatenate([[0.0], rng.uniform(low, high, atlas.n_regions)])
        smooth = smooth_on_surface(per_region[atlas.labels], surface, steps)
        # Smoothing mixes in the medial wall's zeros near its border: renormalise by the
        # smoothed cortex indicator so border vertices keep their region's magnitude.
        weight = smooth_on_surface(cortex.astype(float), surface, steps)
        return np.where(cortex, smooth / np.maximum(weight, 1e-12), 0.0)

    age_rate = region_map(*_RATE_RANGE)
    sex_effect = -region_map(*_SEX_RANGE)
    noise_sd = np.clip(_NOISE_SD[0] + _NOISE_SD[1] * baseline, _NOISE_SD[2], _NOISE_SD[3])
    noise_sd = smooth_on_surface(noise_sd, surface, 3)
    noise_sd[medial] = _MEDIAL_WALL_SD

    magnitude = rng.uniform(*_SITE_RANGE, n_sites) * rng.choice([-1.0, 1.0], n_sites)
    fields = _unit_smooth_fields(rng, surface, n_sites, _SMOOTH_STEPS)
    site_offsets = magnitude[:, None] * (1.0 + _SITE_FIELD * fields) * cortex
    site_noise_scale = rng.uniform(*_SITE_NOISE_RANGE, n_sites)

    d = enigma_schizophrenia_d().to_numpy()
    shift = np.concatenate([[0.0], _GROUP_SHIFT * np.abs(d)])[atlas.labels]

    return {
        "baseline": baseline,
        "age_rate": age_rate,
        "age_slope_mm": -baseline * age_rate,
        "sex_effect": sex_effect,
        "site_names": [f"site{k + 1}" for k in range(n_sites)],
        "site_offsets": site_offsets,
        "site_noise_scale": site_noise_scale,
        "noise_sd": noise_sd,
        "enigma_d": d,
        "group_shift_sd": shift,
        "medial_wall": medial,
        "age_centre": _AGE_CENTRE,
        "acceleration_onset": _ACCELERATION_ONSET,
        "acceleration": _ACCELERATION,
        "acceleration_span": _ACCELERATION_SPAN,
        "noise_age_slope": _NOISE_AGE_SLOPE,
        "smooth_fraction": _SMOOTH_FRACTION,
        "true_map_sd": _TRUE_MAP_SD,
    }


def normative_mean(params: dict, age, male, site_index) -> np.ndarray:
    """The generating normative mean (mm), shape ``(n_subjects, V)``.

    ``age`` (years), ``male`` (bool) and ``site_index`` (int index into
    ``params["site_names"]``) are per-subject arrays.
    """
    age = np.asarray(age, dtype=float)[:, None]
    late = np.maximum(age - params["acceleration_onset"], 0.0)
    relative_age = (age - params["age_centre"]) + params["acceleration"] * late**2 / (2 * params["acceleration_span"])
    mean = params["baseline"] * (1.0 - params["age_rate"] * relative_age)
    mean += np.asarray(male, dtype=float)[:, None] * params["sex_effect"]
    mean += params["site_offsets"][np.asarray(site_index)]
    return mean


def normative_sd(params: dict, age, site_index) -> np.ndarray:
    """The generating normative SD (mm), shape ``(n_subjects, V)``."""
    age = np.asarray(age, dtype=float)[:, None]
    age_scale = 1.0 + params["noise_age_slope"] * (age - _AGE_RANGE[0])
    site_scale = params["site_noise_scale"][np.asarray(site_index)][:, None]
    return age_scale * site_scale * params["noise_sd"]


def _draw_covariates(rng, n_controls, n_patients, site_names) -> pd.DataFrame:
    low, high = _AGE_RANGE
    ages = np.concatenate([
        low + (high - low) * rng.beta(1.6, 2.0, n_controls),
        low + (high - low) * rng.beta(1.5, 2.5, n_patients),
    ])
    n_sites = len(site_names)
    weights = np.arange(n_sites, 0, -1, dtype=float)  # unbalanced: n_sites : ... : 1
    columns = {"sex": [], "site": []}
    for n in (n_controls, n_patients):
        columns["sex"].append(rng.permutation(np.resize(["F", "M"], n)))
        columns["site"].append(rng.permutation(np.asarray(site_names)[_allocate(n, weights)]))
    ids = [f"sub-C{i + 1:04d}" for i in range(n_controls)] + [f"sub-P{i + 1:04d}" for i in range(n_patients)]
    return pd.DataFrame({
        "subject_id": ids,
        "age": np.round(ages, 1),
        "sex": np.concatenate(columns["sex"]),
        "site": np.concatenate(columns["site"]),
        "group": ["control"] * n_controls + ["patient"] * n_patients,
    })


def _allocate(n, weights) -> np.ndarray:
    """Site index of ``n`` subjects, counts in proportion to ``weights`` (largest remainders)."""
    exact = n * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact)[: n - counts.sum()]] += 1
    return np.repeat(np.arange(len(weights)), counts)


@functools.lru_cache(maxsize=4)
def _smoothing_row_norms(surface_name: str, steps: int) -> np.ndarray:
    """Per-vertex variance of smoothed unit white noise, for exact normalisation.

    :func:`smooth_on_surface` applies ``S = D^-1 (A + I)`` ``steps`` times, so a
    smoothed white-noise value has variance ``sum_j (S^steps)_vj^2``.
    """
    surface = load_fsaverage5(surface_name.removeprefix("fsaverage5_"))
    operator = surface.adjacency() + sp.identity(surface.n_vertices, format="csr")
    operator = (sp.diags(1.0 / np.asarray(operator.sum(axis=1)).ravel()) @ operator).tocsr()
    power = sp.identity(surface.n_vertices, format="csr")
    for _ in range(steps):
        power = (power @ operator).tocsr()
    return np.asarray(power.multiply(power).sum(axis=1)).ravel()


def _unit_smooth_fields(rng, surface, n, steps) -> np.ndarray:
    """``n`` smooth Gaussian fields with mean 0 and variance exactly 1 at every vertex."""
    white = rng.standard_normal((n, surface.n_vertices))
    return smooth_on_surface(white, surface, steps) / np.sqrt(_smoothing_row_norms(surface.name, steps))


def _noise(rng, surface, n) -> np.ndarray:
    """Unit-variance noise: a subject-level smooth field plus independent vertex noise."""
    smooth = _unit_smooth_fields(rng, surface, n, _SMOOTH_STEPS)
    smooth *= np.sqrt(_SMOOTH_FRACTION)
    smooth += np.sqrt(1.0 - _SMOOTH_FRACTION) * rng.standard_normal(smooth.shape)
    return smooth


def _patient_atrophy(rng, surface, atlas, params, sd):
    """Thinning (mm) applied to each patient and the regions given focal atrophy."""
    n_patients = len(sd)
    d = params["enigma_d"]
    weights = np.abs(d) ** _REGION_WEIGHT_POWER
    weights /= weights.sum()
    cortex = ~params["medial_wall"]
    effect = params["group_shift_sd"] * sd
    affected = []
    profiles = {}
    for i in range(n_patients):
        k = rng.integers(_N_REGIONS_RANGE[0], _N_REGIONS_RANGE[1] + 1)
        regions = np.sort(rng.choice(atlas.n_regions, size=k, replace=False, p=weights))
        amplitudes = rng.uniform(*_AMPLITUDE_RANGE, k)
        focal = np.zeros(atlas.labels.shape)
        for region, amplitude in zip(regions, amplitudes):
            if region not in profiles:
                profiles[region] = _taper(surface, atlas.labels == region + 1) * cortex
            # Overlapping tapers of neighbouring regions: keep the larger thinning.
            np.maximum(focal, amplitude * profiles[region], out=focal)
        effect[i] += focal * sd[i]
        affected.append([atlas.names[r] for r in regions])
    return effect, affected


def _taper(surface, mask) -> np.ndarray:
    profile = smooth_on_surface(mask.astype(float), surface, _TAPER_STEPS)
    return profile / profile.max()


def _outcome(rng, true_atrophy, cortex) -> np.ndarray:
    if len(true_atrophy) == 0:
        return np.empty(0)
    burden = true_atrophy[:, cortex].mean(axis=1)
    spread = burden.std()
    standardised = (burden - burden.mean()) / spread if spread > 0 else np.zeros_like(burden)
    intercept, slope, noise = _OUTCOME
    return np.round(intercept + slope * standardised + noise * rng.standard_normal(len(burden)), 1)


# --------------------------------------------------------------------------- writing
_GROUND_TRUTH_PARAMS = (
    "baseline", "age_rate", "age_slope_mm", "sex_effect", "site_offsets", "site_noise_scale", "noise_sd",
    "enigma_d", "group_shift_sd", "medial_wall",
)
_GROUND_TRUTH_SCALARS = (
    "age_centre", "acceleration_onset", "acceleration", "acceleration_span", "noise_age_slope",
    "smooth_fraction", "true_map_sd", "fraction_floored",
)


def write_demo_cohort(cohort: DemoCohort, out_dir) -> Path:
    """Write a demo cohort as a FreeSurfer-like subjects folder, a cohort table and the ground truth.

    Files written (each atomically)::

        out_dir/subjects/<subject_id>/surf/lh.thickness.fsaverage5.mgh
        out_dir/subjects/<subject_id>/surf/rh.thickness.fsaverage5.mgh
        out_dir/cohort.csv          subject_id, age, sex, site, group, panss_change
        out_dir/ground_truth.npz    see :func:`read_ground_truth`

    The thickness files hold float32, as FreeSurfer's do. ``true_mean`` and
    ``true_sd`` (one value per subject and vertex) are not stored: they follow from
    the stored parameters and the covariates (:func:`read_ground_truth` recomputes them).

    Returns
    -------
    Path
        ``out_dir``.
    """
    from .io import atomic_write, write_surface_data

    out_dir = Path(out_dir)
    subjects_dir = out_dir / "subjects"
    subjects_dir.mkdir(parents=True, exist_ok=True)
    n_left = cohort.thickness.shape[1] // 2
    for subject_id, row in zip(cohort.covariates["subject_id"], cohort.thickness):
        surf = subjects_dir / subject_id / "surf"
        surf.mkdir(parents=True, exist_ok=True)
        write_surface_data(surf / "lh.thickness.fsaverage5.mgh", row[:n_left])
        write_surface_data(surf / "rh.thickness.fsaverage5.mgh", row[n_left:])

    columns = ["subject_id", "age", "sex", "site", "group", "panss_change"]
    with atomic_write(out_dir / "cohort.csv") as tmp:
        cohort.covariates[columns].to_csv(tmp, index=False, float_format="%.6g")

    is_patient = cohort.is_patient
    region_names = np.asarray(DK_NAMES)
    affected = np.array([[name in regions for name in region_names] for regions in cohort.affected_regions],
                        dtype=bool).reshape(len(cohort.affected_regions), len(region_names))
    arrays = {
        "patient_ids": cohort.covariates["subject_id"].to_numpy()[is_patient].astype(str),
        "true_atrophy": cohort.true_atrophy,
        "true_effect": cohort.true_effect.astype(np.float32),
        "affected_regions": affected,
        "region_names": region_names.astype(str),
        "site_names": np.asarray(cohort.params["site_names"], dtype=str),
    }
    arrays.update({f"param_{key}": np.asarray(cohort.params[key]) for key in _GROUND_TRUTH_PARAMS})
    arrays.update({f"param_{key}": np.asarray(float(cohort.params[key])) for key in _GROUND_TRUTH_SCALARS})
    with atomic_write(out_dir / "ground_truth.npz") as tmp, open(tmp, "wb") as stream:
        np.savez_compressed(stream, **arrays)
    return out_dir


def read_ground_truth(path, covariates: pd.DataFrame | None = None) -> dict:
    """Read ``ground_truth.npz`` written by :func:`write_demo_cohort` (no pickles).

    Parameters
    ----------
    path : str or path-like
        The ``ground_truth.npz`` file.
    covariates : pandas.DataFrame, optional
        Subjects (``age``, ``sex``, ``site``) for which to recompute the generating
        normative mean and SD (``true_mean``, ``true_sd``), e.g. the cohort table.

    Returns
    -------
    dict
        ``patient_ids``, ``true_atrophy``, ``true_effect`` (float32 mm),
        ``affected_regions`` (list of list of str), ``params`` (as in
        :attr:`DemoCohort.params`), and ``true_mean``/``true_sd`` if ``covariates``
        was given.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Ground-truth file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (ValueError, OSError) as exc:
        raise ValueError(f"Could not read ground-truth file '{path}': {exc}") from exc
    missing = [k for k in ("patient_ids", "true_atrophy", "true_effect", "site_names") if k not in arrays]
    if missing:
        raise ValueError(f"Ground-truth file '{path}' lacks {', '.join(missing)}; was it written by write_demo_cohort?")
    params = {key[len("param_"):]: value for key, value in arrays.items() if key.startswith("param_")}
    for key in _GROUND_TRUTH_SCALARS:
        params[key] = float(params[key])
    params["site_names"] = [str(s) for s in arrays["site_names"]]
    names = arrays["region_names"]
    result = {
        "patient_ids": [str(s) for s in arrays["patient_ids"]],
        "true_atrophy": arrays["true_atrophy"],
        "true_effect": arrays["true_effect"],
        "affected_regions": [[str(n) for n in names[row]] for row in arrays["affected_regions"]],
        "params": params,
    }
    if covariates is not None:
        site_index = pd.Index(params["site_names"]).get_indexer(covariates["site"].astype(str))
        if (site_index < 0).any():
            unknown = sorted(set(covariates["site"].astype(str)) - set(params["site_names"]))
            raise ValueError(f"covariates have sites {unknown} that the ground truth '{path}' does not know")
        age = covariates["age"].to_numpy(dtype=float)
        result["true_mean"] = normative_mean(params, age, (covariates["sex"] == "M").to_numpy(), site_index)
        result["true_sd"] = normative_sd(params, age, site_index)
    return result


# ------------------------------------------------------------------------ the demo
_HOLDOUT_FRACTION = 0.2
_Z_THRESHOLD = -1.96
_MIN_CLUSTER_SIZE = 20
_TOP_REGIONS = 3


def run_demo(out_dir, n_controls: int = 600, n_patients: int = 60, seed: int = 0, progress=None,
             network_options: dict | None = None) -> dict:
    """The end-to-end demo: synthetic cohort, normative model, atrophy maps, checks against the truth.

    Steps: simulate a cohort (:func:`make_demo_cohort`) and write it
    (:func:`write_demo_cohort`); read it back through the ordinary input path
    (:func:`~neuroatrophy.cohort.read_cohort`,
    :func:`~neuroatrophy.io.load_cohort_surface_data`); fit a
    :class:`~neuroatrophy.thickness_model.CorticalThicknessModel` on 80 % of the
    controls (split stratified by site) and evaluate it on the other 20 %; map
    every patient's atrophy (``z < -1.96``, clusters of >= 20 vertices) and compare
    it with the patient's true atrophy map; write figures and a 3D Slicer scene.

    Files written under ``out_dir/results/``: ``summary.csv`` (one row per
    patient: detection rates against the truth, top regions), ``fit_quality.csv``
    (per-vertex metrics on held-out controls), ``calibration.json`` (z calibration
    of held-out controls, agreement with the generating model, detection rates),
    ``model.npz``, ``maps/<subject>.{lh,rh}.z.fsaverage5.mgh`` (0 on the medial
    wall), ``regions/<subject>.csv``, ``figures/*.png`` and
    ``scene/NeuroAtrophyDemo.mrml`` (with its data folder; needs ``slicer-core``
    or 3D Slicer, otherwise skipped with a message).

    Parameters
    ----------
    out_dir : str or path-like
        Output folder (created if needed).
    n_controls, n_patients : int
        Cohort size (at least 50 controls so that the held-out split can fit a model).
    seed : int
        Seed of the cohort and of the train/test split.
    progress : callable, optional
        ``progress(fraction, message)``; by default progress lines are printed.
    network_options : dict, optional
        Options of the atrophy-network half (:func:`neuroatrophy.demo_network.run_network_demo`:
        ``n_subjects``, ``n_timepoints``, ``n_null``, ``n_permutations``, ``true_r``).

    Returns
    -------
    dict
        ``paths`` (every output) and headline numbers: ``n_train``, ``n_test``,
        ``n_patients``, ``calibration`` (held-out z), ``truth_agreement``
        (predicted vs generating mean and SD), ``detection`` (mean and pooled
        sensitivity, specificity, precision, Dice), ``scene_written`` and ``seconds``.
    """
    from .atrophy import detection_rates
    from .cohort import read_cohort, split_groups
    from .demo_network import run_network_demo
    from .io import atomic_write, load_cohort_surface_data
    from .parallel import scaled_progress
    from .thickness_model import CorticalThicknessModel

    if int(n_controls) != n_controls or n_controls < 50:
        raise ValueError(f"n_controls must be an integer >= 50 for the demo, got {n_controls!r}")
    if int(n_patients) != n_patients or n_patients < 1:
        raise ValueError(f"n_patients must be an integer >= 1 for the demo, got {n_patients!r}")
    report_all = progress if progress is not None else _print_progress
    # The normative half reports 0-50 %, the network half (demo_network) 50-100 %.
    report = scaled_progress(report_all, 0.0, 0.5)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    results = out_dir / "results"
    for folder in (results, results / "maps", results / "regions", results / "figures", results / "scene"):
        folder.mkdir(parents=True, exist_ok=True)

    report(0.0, f"simulating {n_controls} controls and {n_patients} patients on fsaverage5 (seed {seed})")
    cohort = make_demo_cohort(n_controls=n_controls, n_patients=n_patients, seed=seed)
    report(0.1, f"writing the synthetic cohort to {out_dir}")
    write_demo_cohort(cohort, out_dir)

    report(0.2, "reading it back: cohort.csv and subjects/*/surf/?h.thickness.fsaverage5.mgh")
    table = read_cohort(out_dir / "cohort.csv")
    Y = load_cohort_surface_data(table, out_dir / "subjects", template="fsaverage5")
    truth = read_ground_truth(out_dir / "ground_truth.npz")
    controls, patients = split_groups(table)
    train, test = _split_by_site(controls, _HOLDOUT_FRACTION, seed)
    Y_train, Y_test = Y[controls.index[train]], Y[controls.index[test]]
    cov_train, cov_test = controls.iloc[train], controls.iloc[test]

    report(0.3, f"fitting the normative model on {len(train)} controls")
    model = CorticalThicknessModel().fit(Y_train, cov_train, progress=scaled_progress(report, 0.3, 0.5))
    model.save(results / "model.npz")

    report(0.5, f"evaluating on {len(test)} held-out controls")
    quality, calibration = model.evaluate(Y_test, cov_test)
    with atomic_write(results / "fit_quality.csv") as tmp:
        quality.to_csv(tmp, float_format="%.6g")
    held_out_z, _ = model.score(Y_test, cov_test)
    agreement = _truth_agreement(model, cov_test, cohort, controls.index[test])

    report(0.6, f"mapping {len(patients)} patients (z < {_Z_THRESHOLD}, clusters >= {_MIN_CLUSTER_SIZE} vertices)")
    Y_patients = Y[patients.index]
    maps = model.patient_maps(Y_patients, patients, threshold=_Z_THRESHOLD, min_cluster_size=_MIN_CLUSTER_SIZE)
    true_rows = {sid: k for k, sid in enumerate(truth["patient_ids"])}
    cortex = model.cortex_
    rows, predicted, true_masks = [], [], []
    for pm, (_, covariate_row) in zip(maps, patients.iterrows()):
        k = true_rows[pm.subject_id]
        true_mask = truth["true_atrophy"][k]
        rates = detection_rates(pm.atrophy.mask, true_mask, valid=cortex)
        rows.append(_summary_row(pm, rates, true_mask, truth["affected_regions"][k], covariate_row))
        predicted.append(pm.atrophy.mask)
        true_masks.append(true_mask)
        _write_patient_outputs(pm, results)
    summary = pd.DataFrame(rows)
    with atomic_write(results / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False, float_format="%.6g")
    pooled = detection_rates(np.array(predicted), np.array(true_masks), valid=cortex)
    detection = {
        "threshold": _Z_THRESHOLD,
        "min_cluster_size": _MIN_CLUSTER_SIZE,
        **{f"mean_{key}": float(summary[key].mean()) for key in ("sensitivity", "specificity", "precision", "dice")},
        **{f"pooled_{key}": value for key, value in pooled.items()},
    }
    _write_json(results / "calibration.json", {
        "held_out_controls": calibration,
        "n_train": len(train),
        "n_test": len(test),
        "truth_agreement": agreement,
        "detection": detection,
        "synthetic": True,
        "seed": seed,
    })

    report(0.75, "drawing figures")
    figures = _demo_figures(model, maps, cohort, truth, held_out_z, results / "figures")

    report(0.9, "building the 3D Slicer scene")
    scene_path, scene_message = _demo_scene(model, maps[0], results / "scene" / "NeuroAtrophyDemo.mrml")
    report(0.95, scene_message)

    networks = run_network_demo(out_dir, maps, truth["true_atrophy"], truth["patient_ids"], seed=seed,
                                report=scaled_progress(report_all, 0.5, 1.0), **(network_options or {}))

    seconds = time.perf_counter() - started
    outcome = {
        "paths": {
            "out_dir": str(out_dir),
            "subjects_dir": str(out_dir / "subjects"),
            "cohort": str(out_dir / "cohort.csv"),
            "ground_truth": str(out_dir / "ground_truth.npz"),
            "summary": str(results / "summary.csv"),
            "fit_quality": str(results / "fit_quality.csv"),
            "calibration": str(results / "calibration.json"),
            "model": str(results / "model.npz"),
            "maps": str(results / "maps"),
            "regions": str(results / "regions"),
            "figures": {name: str(path) for name, path in figures.items()},
            "scene": str(scene_path) if scene_path is not None else None,
        },
        "n_train": len(train),
        "n_test": len(test),
        "n_patients": len(maps),
        "calibration": calibration,
        "truth_agreement": agreement,
        "detection": detection,
        "scene_written": scene_path is not None,
        "networks": networks,
        "seconds": round(seconds, 1),
    }
    report_all(1.0, (
        f"done in {seconds:.0f} s: held-out z mean {calibration['z_mean']:.3f}, SD {calibration['z_sd']:.3f}, "
        f"{100 * calibration['frac_beyond_1.96']:.1f} % beyond 1.96; patients' true atrophy found with mean "
        f"sensitivity {detection['mean_sensitivity']:.2f}, specificity {detection['mean_specificity']:.3f}, "
        f"Dice {detection['mean_dice']:.2f}; rTMS outcome vs {networks['outcome']['target']} connectivity of the "
        f"atrophy networks: r = {networks['outcome']['recovered_r']:+.2f} (simulated with r = "
        f"{networks['outcome']['true_r']:+.2f}), permutation p = {networks['outcome']['p_permutation']:.4f}. "
        f"Results in {results}"
    ))
    return outcome


def _print_progress(fraction: float, message: str) -> None:
    print(f"[demo {100 * fraction:3.0f} %] {message}", flush=True)


def _split_by_site(controls: pd.DataFrame, fraction: float, seed: int):
    """Positions of training and held-out controls; each site keeps the same held-out fraction."""
    rng = np.random.default_rng([seed, 1])
    train, test = [], []
    for site in sorted(controls["site"].unique()):
        members = rng.permutation(np.flatnonzero((controls["site"] == site).to_numpy()))
        n_test = int(round(fraction * len(members)))
        test.extend(members[:n_test])
        train.extend(members[n_test:])
    return np.sort(train), np.sort(test)


def _truth_agreement(model, covariates, cohort: DemoCohort, rows) -> dict:
    """How close the fitted model is to the generating one, on held-out controls (cortex)."""
    cortex = model.cortex_
    prediction = model.vertex.predict(covariates)
    true_mean = cohort.true_mean[rows][:, cortex]
    true_sd = cohort.true_sd[rows][:, cortex]
    return {
        "mean_correlation": float(np.corrcoef(prediction.mean.ravel(), true_mean.ravel())[0, 1]),
        "mean_abs_error_mm": float(np.mean(np.abs(prediction.mean - true_mean))),
        "sd_ratio_median": float(np.median(prediction.std / true_sd)),
    }


def _summary_row(pm, rates, true_mask, affected_regions, covariate_row) -> dict:
    regions = pm.regions
    top = regions[regions["n_atrophic"] > 0].head(_TOP_REGIONS)["region"].tolist()
    return {
        "subject_id": pm.subject_id,
        "age": pm.age,
        "sex": pm.sex,
        "site": pm.site,
        "n_atrophic": pm.atrophy.n_atrophic,
        "n_clusters": pm.atrophy.n_clusters,
        "n_true_atrophic": int(true_mask.sum()),
        "sensitivity": rates["sensitivity"],
        "specificity": rates["specificity"],
        "precision": rates["precision"],
        "dice": rates["dice"],
        "top_regions": ";".join(top),
        "true_regions": ";".join(affected_regions),
        "lowest_regional_z_region": _most_atrophic_region(pm),
        "lowest_regional_z": float(regions["regional_z"].min()),
        "panss_change": float(covariate_row.get("panss_change", np.nan)),
    }


def _write_patient_outputs(pm, results: Path) -> None:
    from .io import atomic_write, write_surface_data

    z = np.nan_to_num(pm.z, nan=0.0)
    n_left = len(z) // 2
    write_surface_data(results / "maps" / f"{pm.subject_id}.lh.z.fsaverage5.mgh", z[:n_left])
    write_surface_data(results / "maps" / f"{pm.subject_id}.rh.z.fsaverage5.mgh", z[n_left:])
    with atomic_write(results / "regions" / f"{pm.subject_id}.csv") as tmp:
        pm.regions.to_csv(tmp, index=False, float_format="%.6g")


def _write_json(path: Path, content: dict) -> None:
    from .io import atomic_write

    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2, default=float) + "\n", encoding="utf-8")


def _most_atrophic_region(pm) -> str:
    return str(pm.regions.loc[pm.regions["regional_z"].idxmin(), "region"])


def _demo_figures(model, maps, cohort: DemoCohort, truth: dict, held_out_z, folder: Path) -> dict:
    from . import plotting

    inflated = load_fsaverage5("inflated")
    first = maps[0]
    k = truth["patient_ids"].index(first.subject_id)
    patient_rows = np.flatnonzero(cohort.is_patient)
    true_sd = cohort.true_sd[patient_rows[k]]
    true_thinning = np.where(~cohort.params["medial_wall"], -cohort.true_effect[k] / true_sd, np.nan)
    region = _most_atrophic_region(first)
    curves = model.region_centile_curves(region, sex=first.sex, site=first.site)
    overlap = np.mean([pm.atrophy.mask for pm in maps], axis=0)
    overlap[~model.cortex_] = np.nan
    return {
        "calibration": plotting.plot_calibration(held_out_z, folder / "calibration.png",
                                                 title="Held-out controls: calibration of vertex-wise z-scores"),
        "patient_z": plotting.plot_surface_map(
            inflated, np.where(first.atrophy.mask, first.z, np.nan), folder / f"{first.subject_id}_z.png",
            threshold=_Z_THRESHOLD,
            title=f"{first.subject_id} ({first.age:.0f} y, {first.sex}, {first.site}): atrophy map "
                  f"(z < {_Z_THRESHOLD}, clusters of >= {_MIN_CLUSTER_SIZE} vertices)",
        ),
        "patient_truth": plotting.plot_surface_map(
            inflated, true_thinning, folder / f"{first.subject_id}_truth.png", threshold=-cohort.params["true_map_sd"],
            title=f"{first.subject_id}: simulated thinning (true atrophy map: >= {cohort.params['true_map_sd']:g} SD)",
            label="simulated thinning (normative SD units)",
        ),
        "patient_regions": plotting.plot_regional_bars(
            first.regions, folder / f"{first.subject_id}_regions.png",
            title=f"{first.subject_id}: most atrophic Desikan-Killiany regions",
        ),
        "patient_centiles": plotting.plot_centile_curves(
            curves, folder / f"{first.subject_id}_centiles.png", patient_age=first.age,
            patient_value=float(first.regional_thickness[region]),
            title=f"{region} mean thickness ({first.sex}, {first.site}) and {first.subject_id}",
        ),
        "group_overlap": plotting.plot_group_overlap(
            overlap, inflated, folder / "group_overlap.png",
            title=f"Overlap of {len(maps)} individual atrophy maps (synthetic patients)",
        ),
    }


def _demo_scene(model, pm, path: Path):
    """Write the Slicer scene of the first patient; returns (path or None, message)."""
    from . import mrml
    from . import scene as scene_views

    try:
        scene = mrml.new_scene()
    except ImportError:
        return None, (
            "slicer-core is not installed, so no 3D Slicer scene was written "
            "(pip install slicer-core, or run the demo inside 3D Slicer); every other output is complete"
        )
    # The fsaverage5 inflated surface coloured by the atrophic z (white elsewhere, so the whole
    # cortex stays visible), with z, centile, mask and clusters as further arrays; the regional table.
    scene_views.show_patient_map(scene, pm, surface_kind="inflated")
    scene_views.show_centile_curves(scene, model, _most_atrophic_region(pm), patient_map=pm)
    mrml.save_scene(scene, path)
    return path, f"wrote the 3D Slicer scene {path}"
