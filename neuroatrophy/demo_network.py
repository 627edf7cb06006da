"""The demo's second half: atrophy networks, convergence, rTMS targets and a simulated outcome.

What is real and what is simulated:

* **Real**: brainspace's resting-state run (sub-010188 of the MPI-Leipzig Mind-Brain-Body
  data on fsaverage5, 652 volumes, with its confounds) becomes a one-subject connectome;
  the group connectivity that the simulated connectome reproduces is the HCP matrix
  between the 68 Desikan-Killiany regions shipped with the ENIGMA Toolbox; target
  coordinates are the published ones (:mod:`neuroatrophy.targets`).
* **Simulated**: the multi-subject normative connectome (subjects whose region-level
  correlation is drawn around that HCP matrix, :mod:`neuroatrophy.demo_connectome`), the
  patients and their atrophy (:mod:`neuroatrophy.demo`), and the treatment outcome:
  improvement after left-DLPFC rTMS that depends on the connectivity between each
  patient's *true* atrophy network and the Beam F3 target with a known correlation
  (``TRUE_OUTCOME_R``). The analysis sees only the *estimated* atrophy maps, so the
  recovered correlation is the true one attenuated by the error of the maps.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .parallel import scaled_progress

__all__ = ["run_network_demo", "simulate_outcome", "OUTCOME_COLUMN", "OUTCOME_TARGET", "TRUE_OUTCOME_R"]

OUTCOME_COLUMN = "rtms_improvement"
OUTCOME_TARGET = "DLPFC_F3"
TRUE_OUTCOME_R = 0.5
# Improvement in % of the baseline negative-symptom score: mean and SD of the simulated response.
_OUTCOME_MEAN, _OUTCOME_SD = 25.0, 12.0
_N_SUBJECTS, _N_TIMEPOINTS = 40, 200
_N_NULL = 20
_N_PERMUTATIONS = 5000


def simulate_outcome(true_connectivity, seed=0, r=TRUE_OUTCOME_R) -> np.ndarray:
    """Outcome correlated with ``true_connectivity`` at exactly the population r given.

    ``outcome = mean + sd * (r * zscore(connectivity) + sqrt(1 - r²) * noise)``: more
    (positive) connectivity between the atrophy network and the target, more improvement.
    """
    x = np.asarray(true_connectivity, dtype=np.float64)
    if x.std() == 0:
        raise ValueError("true connectivity is constant across patients; no outcome can depend on it")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    standardised = (x - x.mean()) / x.std()
    signal = r * standardised + np.sqrt(1 - r ** 2) * rng.standard_normal(len(x))
    return np.round(_OUTCOME_MEAN + _OUTCOME_SD * signal, 2)


def run_network_demo(out_dir, maps, true_atrophy, true_ids, seed=0, report=None, n_subjects=_N_SUBJECTS,
                     n_timepoints=_N_TIMEPOINTS, n_null=_N_NULL, n_permutations=_N_PERMUTATIONS,
                     true_r=TRUE_OUTCOME_R) -> dict:
    """Networks of the demo patients (``maps``: their PatientMaps) and the outcome analysis.

    ``true_atrophy`` (n_patients, V) bool and ``true_ids`` are the ground-truth maps, used
    only to simulate the outcome (correlated ``true_r`` with the true network-to-target
    connectivity). ``n_subjects`` x ``n_timepoints`` is the simulated connectome's size,
    ``n_null`` the random seeds per patient, ``n_permutations`` those of the outcome test. Writes under ``out_dir/results``: ``connectome-real/``,
    ``connectome/`` (the stores), ``networks/`` (:meth:`NetworkAnalysis.save`),
    ``outcome/`` (association table and figure), ``figures/network_*.png`` and
    ``network_demo.json``; adds the outcome column to ``out_dir/cohort.csv``.
    """
    from .network import atrophy_seeds, seed_maps
    from .network_analysis import analyse_networks
    from .targets import get_target, target_rois

    report = report or (lambda fraction, message: None)
    results = _folders(out_dir)
    real = _real_run_check(results / "connectome-real", report)

    report(0.1, f"simulating a normative connectome: {n_subjects} subjects x {n_timepoints} volumes "
                "with the HCP group connectivity")
    store, group_match = _simulated_store(results / "connectome", n_subjects, n_timepoints, seed,
                                          scaled_progress(report, 0.1, 0.35))

    report(0.35, "simulating the rTMS outcome from each patient's true atrophy network")
    target = get_target(OUTCOME_TARGET)
    roi = target_rois([target], store.coordinates(), store.valid)
    order = [list(true_ids).index(pm.subject_id) for pm in maps]
    true_maps = seed_maps(store, np.asarray(true_atrophy, float)[order], names=[pm.subject_id for pm in maps])
    true_fc = true_maps.mean_z.astype(np.float64) @ (roi[0] / roi[0].sum())
    outcome = simulate_outcome(true_fc, seed, r=true_r)
    cohort_path = _add_outcome_column(out_dir, [pm.subject_id for pm in maps], outcome)

    report(0.4, f"atrophy networks of {len(maps)} patients, {n_null} matched random seeds each")
    seeds, names = atrophy_seeds(maps)
    analysis = analyse_networks(store, seeds, names, n_null=n_null, seed=seed,
                                progress=scaled_progress(report, 0.4, 0.9))
    analysis.save(results / "networks", grid=store.mask())

    report(0.9, f"target connectivity against {OUTCOME_COLUMN} ({n_permutations} permutations)")
    association = _outcome_analysis(results / "outcome", analysis, cohort_path, n_permutations)
    figures = _figures(results / "figures", analysis, real)
    headline = _headline(analysis, association, true_fc, outcome, real, group_match, store, true_r)
    _write_json(results / "network_demo.json", headline)
    report(1.0, _message(headline))
    return {**headline, "paths": {"networks": str(results / "networks"), "outcome": str(results / "outcome"),
                                  "connectome": str(results / "connectome"),
                                  "connectome_real": str(results / "connectome-real"),
                                  "figures": {k: str(v) for k, v in figures.items()}}}


def _folders(out_dir):
    from pathlib import Path

    results = Path(out_dir) / "results"
    for name in ("networks", "outcome", "figures"):
        (results / name).mkdir(parents=True, exist_ok=True)
    return results


def _fresh_store(path, **options):
    import shutil

    from .connectome import ConnectomeStore

    # The demo rebuilds its stores from scratch, so a re-run never mixes old and new subjects.
    if path.exists():
        shutil.rmtree(path)
    return ConnectomeStore.create(path, **options)


def _real_run_check(path, report) -> dict:
    """brainspace's real run as a one-subject connectome; a seed at the Fox 2012 DLPFC site."""
    from .demo_connectome import brainspace_run, hcp_dk_connectivity, region_mean_timeseries
    from .network import seed_maps
    from .surface import dk_atlas
    from .targets import get_target, target_rois

    report(0.0, "real data: brainspace's resting-state run (sub-010188, 652 volumes) with its confounds")
    run = brainspace_run()
    store = _fresh_store(path, dtype="float32", tr=run.tr, description="brainspace sub-010188 (real)")
    store.add_subject(run.subject_id, run.timeseries, run.confounds)
    target = get_target("DLPFC_sgACC_Fox2012")
    maps = seed_maps(store, target_rois([target], store.coordinates(), store.valid), names=[target.name])
    r = maps.mean_r[0][store.valid]
    regions = region_mean_timeseries(np.asarray(store.timeseries(0), np.float64), dk_atlas().labels)
    real_fc = np.corrcoef(regions.T)
    hcp = np.tanh(hcp_dk_connectivity().to_numpy())
    upper = np.triu_indices(len(hcp), 1)
    return {"seed": target.name, "r_min": float(r.min()), "r_max": float(r.max()),
            "dk_fc_vs_hcp_r": float(np.corrcoef(real_fc[upper], hcp[upper])[0, 1]),
            "map": maps.mean_r[0], "n_timepoints": int(run.timeseries.shape[0])}


def _simulated_store(path, n_subjects, n_timepoints, seed, report):
    from .demo_connectome import hcp_dk_connectivity, region_mean_timeseries, simulate_connectome_subjects
    from .surface import dk_atlas

    simulation = simulate_connectome_subjects(n_subjects=n_subjects, n_timepoints=n_timepoints, seed=seed)
    # Global signal regression, as in the sgACC-anticorrelation literature: without it every
    # large seed correlates positively with the whole cortex and networks have no negative part.
    store = _fresh_store(path, dtype="float16", tr=simulation.truth.tr, global_signal=True,
                         description="simulated: region-level connectivity drawn around the HCP DK matrix")
    labels = dk_atlas().labels
    simulated, stored = np.zeros((68, 68)), np.zeros((68, 68))
    for k, (subject_id, series) in enumerate(simulation):
        store.add_subject(subject_id, series)
        # Group FC of the simulated data, and of the stored data after global signal regression.
        simulated += _fisher_fc(region_mean_timeseries(series, labels))
        stored += _fisher_fc(region_mean_timeseries(np.asarray(store.timeseries(k), np.float64), labels))
        report((k + 1) / len(simulation), f"connectome subject {k + 1}/{len(simulation)}")
    hcp = hcp_dk_connectivity().to_numpy()
    upper = np.triu_indices(68, 1)
    match = {name: float(np.corrcoef(group[upper], hcp[upper])[0, 1])
             for name, group in (("simulated", simulated), ("after_global_signal_regression", stored))}
    return store, match


def _fisher_fc(regions):
    return np.arctanh(np.clip(np.corrcoef(regions.T), -0.999999, 0.999999))


def _add_outcome_column(out_dir, subject_ids, outcome):
    from pathlib import Path

    from .io import atomic_write

    path = Path(out_dir) / "cohort.csv"
    table = pd.read_csv(path, dtype={"subject_id": str})
    values = pd.Series(outcome, index=subject_ids)
    table[OUTCOME_COLUMN] = table["subject_id"].map(values)
    with atomic_write(path) as tmp:
        table.to_csv(tmp, index=False)
    return path


def _outcome_analysis(folder, analysis, cohort_path, n_permutations) -> pd.DataFrame:
    from .cohort import read_cohort
    from .io import atomic_write
    from .outcome import target_outcome_analysis
    from .plotting import target_outcome_figure

    cohort = read_cohort(cohort_path)
    fc = analysis.target_connectivity
    results = target_outcome_analysis(fc, cohort, OUTCOME_COLUMN, covariates=["age", "sex"],
                                      n_permutations=n_permutations, seed=0)
    with atomic_write(folder / "target_outcome.csv") as tmp:
        results.to_csv(tmp, index=False)
    row = results.set_index("target").loc[OUTCOME_TARGET]
    outcome = cohort.set_index("subject_id").loc[fc.index, OUTCOME_COLUMN].to_numpy(float)
    target_outcome_figure(fc[OUTCOME_TARGET].to_numpy(), outcome, row.to_dict(),
                          folder / f"outcome_{OUTCOME_TARGET}.png", target_name=OUTCOME_TARGET,
                          outcome_name="negative-symptom improvement after rTMS (%)")
    return results


def _figures(folder, analysis, real) -> dict:
    from . import plotting
    from .surface import load_fsaverage5

    inflated = load_fsaverage5("inflated")
    first = analysis.patients[0]
    t = np.where(analysis.networks.signed()[0] != 0, analysis.maps.t[0], np.nan)
    real_map = np.where(real["map"] != 0, real["map"], np.nan)  # 0 only where the run has no signal
    return {
        "network_patient": plotting.plot_surface_map(
            inflated, t, folder / f"network_{first}.png", threshold=analysis.networks.threshold,
            title=f"{first}: atrophy network (|t| > {analysis.networks.threshold:.1f}, simulated connectome)",
            label="t"),
        "network_convergence": plotting.plot_group_overlap(
            analysis.convergence_positive / 100.0, inflated, folder / "network_convergence.png",
            title=f"Convergence of {len(analysis.patients)} positive atrophy networks (fraction of patients)"),
        "real_seed_map": plotting.plot_surface_map(
            inflated, real_map, folder / "network_real_run_dlpfc_seed.png", threshold=0.0,
            title="Real run (brainspace sub-010188): correlation with the Fox 2012 left DLPFC site", label="r"),
    }


def _headline(analysis, association, true_fc, outcome, real, group_match, store, true_r) -> dict:
    row = association.set_index("target").loc[OUTCOME_TARGET]
    summary = analysis.summary
    estimated = analysis.target_connectivity[OUTCOME_TARGET].to_numpy()
    return {
        "synthetic": True,
        "real_run": {k: v for k, v in real.items() if k != "map"},
        "connectome": {"n_subjects": len(store), "n_timepoints": store.n_timepoints[0], "dtype": store.dtype,
                       "global_signal_regression": True,
                       "group_fc_vs_hcp_r": group_match},
        "networks": {
            "n_patients": len(analysis.patients),
            "t_threshold": analysis.networks.threshold,
            "mean_positive_size": float(summary["n_positive"].mean()),
            "mean_negative_size": float(summary["n_negative"].mean()),
            "peak_convergence_percent": float(analysis.convergence_positive.max()),
            "median_specificity_positive": float(summary["specificity_positive"].median()),
            "median_degree_similarity": float(summary["degree_similarity"].median()),
        },
        "outcome": {
            "column": OUTCOME_COLUMN,
            "target": OUTCOME_TARGET,
            "true_r": true_r,
            "sample_r_with_true_connectivity": float(np.corrcoef(true_fc, outcome)[0, 1]),
            "estimated_vs_true_connectivity_r": float(np.corrcoef(estimated, true_fc)[0, 1]),
            "recovered_r": float(row["r"]),
            "p_permutation": float(row["p_permutation"]),
            "p_fwe_over_targets": float(row["p_fwe"]),
            "adjusted_beta": float(row.get("beta", np.nan)),
            "p_permutation_adjusted": float(row.get("p_permutation_adjusted", np.nan)),
        },
    }


def _message(headline) -> str:
    o, n, real = headline["outcome"], headline["networks"], headline["real_run"]
    return (f"networks: mean {n['mean_positive_size']:.0f} positive / {n['mean_negative_size']:.0f} negative vertices "
            f"at |t| > {n['t_threshold']:.1f}, peak convergence {n['peak_convergence_percent']:.0f} %; "
            f"outcome vs {o['target']} connectivity: r = {o['recovered_r']:+.2f} (true {o['true_r']:+.2f}), "
            f"permutation p = {o['p_permutation']:.4f}; real run DLPFC seed r in "
            f"[{real['r_min']:.2f}, {real['r_max']:.2f}]")


def _write_json(path, content) -> None:
    from .demo import _write_json as write_json  # the demo's one JSON writer (atomic)

    write_json(path, content)
