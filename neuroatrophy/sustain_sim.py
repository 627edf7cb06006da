"""Simulated SuStaIn cohorts with known ground truth, and recovery metrics.

The z-score simulation follows the SuStaIn papers (Young et al., Nat Commun 2018) and
pySuStaIn's ``sim/simfuncs.py``: each subtype is a random valid event sequence, cases
are spread uniformly over stages 1..N, controls sit at stage 0, and a subject's
noiseless z-score of biomarker ``b`` is the subtype's piecewise-linear trajectory at the
subject's stage, through the knots ``(0, 0)``, ``(pos(E(b, z)) + 1, z)`` for each of its
z-levels and ``(N + 1, z_max[b])``; Gaussian noise is added on top.

Events are ordered z-level-major, as in pySuStaIn and :mod:`neuroatrophy.sustain`: all
biomarkers' first z-level, then all second z-levels, and so on (a biomarker with fewer
z-levels is skipped at the levels it lacks).

:func:`recovery` compares a fitted model's subject table (``ml_subtype``, ``ml_stage``)
and sequences with the truth: adjusted Rand index, Hungarian-matched accuracy, rank
correlations of stages and Kendall's tau of the event orders.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "SimulatedCohort",
    "SimulatedMixture",
    "event_order",
    "random_sequence",
    "trajectory_points",
    "simulate_zscore_sustain",
    "simulate_mixture_sustain",
    "recovery",
]

# Redraws allowed when a subtype's random sequence repeats an earlier subtype's.
_MAX_REDRAWS = 100


class _Truth:
    """What both simulated cohorts share: names, event count, cases and the true subject table."""

    @property
    def biomarkers(self) -> list[str]:
        return [str(c) for c in self.data.columns]

    @property
    def n_events(self) -> int:
        return len(self.event_biomarker)

    @property
    def is_case(self) -> np.ndarray:
        """(M,) bool, true stage > 0."""
        return self.stage > 0

    def truth(self) -> pd.DataFrame:
        """The true ``ml_subtype`` (0 for controls) and ``ml_stage`` as a subject table."""
        return pd.DataFrame({"ml_subtype": self.subtype, "ml_stage": self.stage}, index=self.data.index)


@dataclass
class SimulatedCohort(_Truth):
    """A simulated z-score SuStaIn cohort and its ground truth.

    Attributes
    ----------
    data : pandas.DataFrame
        (M, B) z-scores (larger = more abnormal); index ``sub-0001``..., one column per biomarker.
    noiseless : numpy.ndarray
        (M, B) the trajectory values before noise.
    subtype : numpy.ndarray
        (M,) int, true subtype 1..K of cases; 0 for controls.
    stage : numpy.ndarray
        (M,) int, true stage 0..N (0 for controls).
    sequences : numpy.ndarray
        (K, N) int, event order of each subtype (event indices into ``event_biomarker``).
    fractions : numpy.ndarray
        (K,) subtype fractions the cases were drawn with.
    event_biomarker, event_z : numpy.ndarray
        (N,) biomarker index and z-level of each event, z-level-major.
    z_levels : list of list of float
        Z-levels of each biomarker.
    z_max : numpy.ndarray
        (B,) z-score each trajectory reaches after the last stage.
    """

    data: pd.DataFrame
    noiseless: np.ndarray
    subtype: np.ndarray
    stage: np.ndarray
    sequences: np.ndarray
    fractions: np.ndarray
    event_biomarker: np.ndarray
    event_z: np.ndarray
    z_levels: list
    z_max: np.ndarray

    def z_vals(self) -> np.ndarray:
        """pySuStaIn's ``Z_vals``: (B, max number of z-levels), 0 where a biomarker has no event."""
        width = max(len(levels) for levels in self.z_levels)
        out = np.zeros((len(self.z_levels), width))
        for b, levels in enumerate(self.z_levels):
            out[b, : len(levels)] = levels
        return out



@dataclass
class SimulatedMixture(_Truth):
    """A simulated event-based (mixture) SuStaIn cohort and its ground truth.

    Attributes
    ----------
    data : pandas.DataFrame
        (M, B) raw biomarker values: N(0, 1) before the biomarker's event, N(shift, 1) after.
    L_yes, L_no : pandas.DataFrame
        (M, B) true Gaussian densities of each value under "event occurred" / "not occurred".
    subtype, stage : numpy.ndarray
        (M,) int; subtype 1..K of cases, 0 for controls; stage 0..B.
    sequences : numpy.ndarray
        (K, B) int, order of the biomarkers' events in each subtype.
    fractions : numpy.ndarray
        (K,) subtype fractions.
    event_biomarker, event_z : numpy.ndarray
        (B,) event ``i`` is biomarker ``i`` becoming abnormal; ``event_z`` is all ones.
    shift : float
        Mean of the abnormal distribution.
    """

    data: pd.DataFrame
    L_yes: pd.DataFrame
    L_no: pd.DataFrame
    subtype: np.ndarray
    stage: np.ndarray
    sequences: np.ndarray
    fractions: np.ndarray
    event_biomarker: np.ndarray
    event_z: np.ndarray
    shift: float



# --------------------------------------------------------------------------- events
def _normalise_z_levels(z_levels, n_biomarkers: int) -> list[list[float]]:
    """One increasing list of positive z-levels per biomarker (a flat sequence is shared by all)."""
    items = list(z_levels)
    if not items:
        raise ValueError("z_levels: at least one z-level is needed")
    if all(np.ndim(item) == 0 for item in items):
        per_biomarker = [[float(z) for z in items] for _ in range(n_biomarkers)]
    else:
        if len(items) != n_biomarkers:
            raise ValueError(f"z_levels: {len(items)} lists given for n_biomarkers={n_biomarkers}")
        per_biomarker = [[float(z) for z in np.ravel(item)] for item in items]
    for b, levels in enumerate(per_biomarker):
        if not levels:
            raise ValueError(f"z_levels: biomarker {b} has no z-level")
        if not all(np.isfinite(levels)) or min(levels) <= 0:
            raise ValueError(f"z_levels: biomarker {b} has a z-level <= 0 or not finite: {levels}")
        if np.any(np.diff(levels) <= 0):
            raise ValueError(f"z_levels: biomarker {b}'s z-levels are not increasing: {levels}")
    return per_biomarker


def event_order(z_levels) -> tuple[np.ndarray, np.ndarray]:
    """Events of per-biomarker z-levels in z-level-major order.

    Parameters
    ----------
    z_levels : list of list of float
        Increasing z-levels of each biomarker.

    Returns
    -------
    event_biomarker : numpy.ndarray
        (N,) int biomarker index of each event.
    event_z : numpy.ndarray
        (N,) float z-level of each event.
    """
    biomarker, z = [], []
    for level in range(max(len(levels) for levels in z_levels)):
        for b, levels in enumerate(z_levels):
            if level < len(levels):
                biomarker.append(b)
                z.append(float(levels[level]))
    return np.array(biomarker, dtype=int), np.array(z, dtype=float)


def random_sequence(event_biomarker: np.ndarray, event_z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random valid event sequence, drawn like pySuStaIn's ``_initialise_sequence``.

    At each position the next event is chosen uniformly among the lowest not yet placed
    z-level event of every biomarker, so that each biomarker's events come in increasing z.

    Returns
    -------
    numpy.ndarray
        (N,) int permutation of the event indices.
    """
    event_biomarker = np.asarray(event_biomarker)
    event_z = np.asarray(event_z, dtype=float)
    n_events = len(event_biomarker)
    placed = np.zeros(n_events, dtype=bool)
    sequence = np.empty(n_events, dtype=int)
    for position in range(n_events):
        candidates = []
        for b in np.unique(event_biomarker[~placed]):
            remaining = np.flatnonzero((event_biomarker == b) & ~placed)
            candidates.append(remaining[np.argmin(event_z[remaining])])
        event = candidates[int(rng.integers(len(candidates)))]
        sequence[position] = event
        placed[event] = True
    return sequence


def trajectory_points(sequence: np.ndarray, event_biomarker: np.ndarray, event_z: np.ndarray,
                      z_max: np.ndarray) -> np.ndarray:
    """Piecewise-linear z-score of every biomarker at the points 0..N+1 of a sequence.

    The curve of biomarker ``b`` runs through ``(0, 0)``, ``(pos(e) + 1, z_e)`` for each of
    its events ``e`` (``pos`` 0-based in ``sequence``) and ``(N + 1, z_max[b])``; a subject at
    stage ``k`` has the value at point ``k`` (pySuStaIn's simulation uses this "point" curve;
    its model uses the mean of points ``k`` and ``k + 1``).

    Returns
    -------
    numpy.ndarray
        (N + 2, B) values.
    """
    sequence = np.asarray(sequence, dtype=int)
    n_events = len(sequence)
    z_max = np.asarray(z_max, dtype=float)
    position = np.empty(n_events, dtype=int)
    position[sequence] = np.arange(n_events)
    points = np.arange(n_events + 2)
    out = np.empty((n_events + 2, len(z_max)))
    for b in range(len(z_max)):
        events = np.flatnonzero(event_biomarker == b)
        events = events[np.argsort(event_z[events])]
        knots_x = np.concatenate([[0], position[events] + 1, [n_events + 1]])
        knots_y = np.concatenate([[0.0], event_z[events], [z_max[b]]])
        out[:, b] = np.interp(points, knots_x, knots_y)
    return out


# ----------------------------------------------------------------------- simulation
def _check_design(n_subjects, n_subtypes, fractions, control_fraction) -> np.ndarray:
    if int(n_subjects) != n_subjects or n_subjects < 1:
        raise ValueError(f"n_subjects must be a positive integer, got {n_subjects!r}")
    if int(n_subtypes) != n_subtypes or n_subtypes < 1:
        raise ValueError(f"n_subtypes must be a positive integer, got {n_subtypes!r}")
    fractions = np.asarray(fractions, dtype=float).ravel()
    if len(fractions) != n_subtypes:
        raise ValueError(f"fractions: {len(fractions)} values given for n_subtypes={n_subtypes}")
    if np.any(~np.isfinite(fractions)) or np.any(fractions <= 0) or abs(fractions.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must be positive and sum to 1, got {fractions.tolist()}")
    if not 0.0 <= control_fraction < 1.0:
        raise ValueError(f"control_fraction must be in [0, 1), got {control_fraction!r}")
    return fractions / fractions.sum()


def _biomarker_names(biomarkers, n_biomarkers: int) -> list[str]:
    if biomarkers is None:
        return [f"Biomarker {b + 1}" for b in range(n_biomarkers)]
    names = [str(name) for name in biomarkers]
    if len(names) != n_biomarkers or len(set(names)) != len(names):
        raise ValueError(f"biomarkers: {n_biomarkers} distinct names needed, got {names}")
    return names


def _distinct_sequences(n_subtypes: int, draw) -> np.ndarray:
    """``n_subtypes`` sequences from ``draw()``, redrawing one that repeats an earlier subtype's."""
    sequences = []
    for _ in range(n_subtypes):
        for _attempt in range(_MAX_REDRAWS):
            candidate = draw()
            if not any(np.array_equal(candidate, other) for other in sequences):
                break
        sequences.append(candidate)  # tiny problems may run out of distinct sequences: keep the last draw
    return np.array(sequences, dtype=int)


def _subjects(n_subjects, n_events, n_subtypes, fractions, control_fraction, rng):
    """True subtype (0 = control) and stage (0 for controls, uniform 1..n_events for cases)."""
    n_controls = int(round(n_subjects * control_fraction))
    is_control = np.zeros(n_subjects, dtype=bool)
    is_control[rng.choice(n_subjects, size=n_controls, replace=False)] = True
    subtype = rng.choice(n_subtypes, size=n_subjects, p=fractions) + 1
    stage = rng.integers(1, n_events + 1, size=n_subjects)
    subtype[is_control] = 0
    stage[is_control] = 0
    return subtype.astype(int), stage.astype(int)


def _subject_ids(n_subjects: int) -> pd.Index:
    width = max(4, len(str(n_subjects)))
    return pd.Index([f"sub-{i + 1:0{width}d}" for i in range(n_subjects)], name="subject_id")


def simulate_zscore_sustain(n_subjects=500, n_biomarkers=5, z_levels=(1, 2, 3), z_max=5.0, n_subtypes=3,
                            fractions=(0.5, 0.3, 0.2), control_fraction=0.25, noise_sd=1.0, seed=0,
                            biomarkers=None) -> SimulatedCohort:
    """Simulate a z-score SuStaIn cohort with known subtypes, sequences and stages.

    Parameters
    ----------
    n_subjects : int
        Subjects M, controls included.
    n_biomarkers : int
        Biomarkers (regions) B.
    z_levels : sequence of float, or list of sequences
        Z-levels shared by all biomarkers, e.g. ``(1, 2, 3)``, or one increasing list per biomarker.
    z_max : float or sequence of float
        Z-score of each trajectory after the last stage; must exceed the biomarker's top z-level.
    n_subtypes : int
        Subtypes K.
    fractions : sequence of float
        (K,) probabilities of the subtypes among cases (sum to 1).
    control_fraction : float
        Fraction of subjects at stage 0 (rounded to a whole number of subjects); they get subtype 0.
    noise_sd : float
        SD of the Gaussian noise added to the trajectories (0 gives noiseless data).
    seed : int or None
        Seed of ``numpy.random.default_rng``; equal seeds give equal cohorts.
    biomarkers : list of str, optional
        Column names (default ``"Biomarker 1"``...).

    Returns
    -------
    SimulatedCohort
    """
    fractions = _check_design(n_subjects, n_subtypes, fractions, control_fraction)
    if int(n_biomarkers) != n_biomarkers or n_biomarkers < 1:
        raise ValueError(f"n_biomarkers must be a positive integer, got {n_biomarkers!r}")
    if not np.isfinite(noise_sd) or noise_sd < 0:
        raise ValueError(f"noise_sd must be >= 0, got {noise_sd!r}")
    names = _biomarker_names(biomarkers, n_biomarkers)
    levels = _normalise_z_levels(z_levels, n_biomarkers)
    z_max = np.broadcast_to(np.asarray(z_max, dtype=float), (n_biomarkers,)).copy() if np.ndim(z_max) == 0 \
        else np.asarray(z_max, dtype=float).ravel()
    if len(z_max) != n_biomarkers:
        raise ValueError(f"z_max: {len(z_max)} values given for n_biomarkers={n_biomarkers}")
    for b in range(n_biomarkers):
        if not z_max[b] > levels[b][-1]:
            raise ValueError(f"z_max of biomarker {b} ({z_max[b]}) must exceed its top z-level ({levels[b][-1]})")

    rng = np.random.default_rng(seed)
    event_biomarker, event_z = event_order(levels)
    n_events = len(event_biomarker)
    sequences = _distinct_sequences(n_subtypes, lambda: random_sequence(event_biomarker, event_z, rng))
    subtype, stage = _subjects(n_subjects, n_events, n_subtypes, fractions, control_fraction, rng)

    curves = np.stack([trajectory_points(s, event_biomarker, event_z, z_max) for s in sequences])  # (K, N+2, B)
    # Controls follow subtype 1's curve at stage 0, which is 0 for every subtype.
    noiseless = curves[np.maximum(subtype - 1, 0), stage]
    values = noiseless + noise_sd * rng.standard_normal(noiseless.shape)
    return SimulatedCohort(
        data=pd.DataFrame(values, index=_subject_ids(n_subjects), columns=names),
        noiseless=noiseless, subtype=subtype, stage=stage, sequences=sequences, fractions=fractions,
        event_biomarker=event_biomarker, event_z=event_z, z_levels=levels, z_max=z_max,
    )


def _normal_pdf(x: np.ndarray, mean: float) -> np.ndarray:
    return np.exp(-0.5 * (x - mean) ** 2) / np.sqrt(2.0 * np.pi)


def simulate_mixture_sustain(n_subjects=500, n_biomarkers=5, n_subtypes=3, fractions=(0.5, 0.3, 0.2),
                             control_fraction=0.25, shift=3.0, seed=0, biomarkers=None) -> SimulatedMixture:
    """Simulate an event-based (mixture) SuStaIn cohort with known subtypes, sequences and stages.

    Each subtype orders the B biomarker events by a random permutation; a subject at stage
    ``k`` (0..B; cases uniform over 1..B) has the first ``k`` events of its subtype's
    sequence. A biomarker is drawn from N(0, 1) before its event and N(``shift``, 1) after,
    and ``L_yes``/``L_no`` are the exact densities of the two distributions at the value.

    Parameters
    ----------
    n_subjects, n_biomarkers, n_subtypes, fractions, control_fraction, seed, biomarkers
        As in :func:`simulate_zscore_sustain`.
    shift : float
        Mean of the abnormal distribution (the normal one is N(0, 1)).

    Returns
    -------
    SimulatedMixture
    """
    fractions = _check_design(n_subjects, n_subtypes, fractions, control_fraction)
    if int(n_biomarkers) != n_biomarkers or n_biomarkers < 1:
        raise ValueError(f"n_biomarkers must be a positive integer, got {n_biomarkers!r}")
    if not np.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a positive number, got {shift!r}")
    names = _biomarker_names(biomarkers, n_biomarkers)

    rng = np.random.default_rng(seed)
    sequences = _distinct_sequences(n_subtypes, lambda: rng.permutation(n_biomarkers))
    subtype, stage = _subjects(n_subjects, n_biomarkers, n_subtypes, fractions, control_fraction, rng)

    position = np.empty_like(sequences)
    for k, sequence in enumerate(sequences):
        position[k, sequence] = np.arange(n_biomarkers)
    # Event of biomarker b occurred when its position in the subject's subtype is below the stage.
    abnormal = position[np.maximum(subtype - 1, 0)] < stage[:, None]
    values = rng.standard_normal((n_subjects, n_biomarkers)) + shift * abnormal
    index = _subject_ids(n_subjects)
    return SimulatedMixture(
        data=pd.DataFrame(values, index=index, columns=names),
        L_yes=pd.DataFrame(_normal_pdf(values, shift), index=index, columns=names),
        L_no=pd.DataFrame(_normal_pdf(values, 0.0), index=index, columns=names),
        subtype=subtype, stage=stage, sequences=sequences, fractions=fractions,
        event_biomarker=np.arange(n_biomarkers), event_z=np.ones(n_biomarkers), shift=float(shift),
    )


# ------------------------------------------------------------------------- recovery
def _staged_arrays(cohort, staged: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``ml_subtype`` and ``ml_stage`` aligned with the cohort's subjects."""
    missing = [c for c in ("ml_subtype", "ml_stage") if c not in staged.columns]
    if missing:
        raise ValueError(f"staged: missing column(s) {missing}")
    index = cohort.data.index
    if staged.index.equals(index):
        aligned = staged
    elif set(index).issubset(set(staged.index)):
        aligned = staged.loc[index]
    elif len(staged) == len(index):
        aligned = staged  # positional (e.g. a table indexed 0..M-1)
    else:
        raise ValueError(f"staged: {len(staged)} rows do not match the cohort's {len(index)} subjects")
    subtype, stage = aligned["ml_subtype"].to_numpy(), aligned["ml_stage"].to_numpy()
    for name, column in (("ml_subtype", subtype), ("ml_stage", stage)):
        if not np.issubdtype(column.dtype, np.number) or np.any(~np.isfinite(column.astype(float))):
            raise ValueError(f"staged: column {name} must be numeric without missing values")
    return subtype.astype(int), stage.astype(int)


def _confusion(true: np.ndarray, estimated: np.ndarray, n_true: int, n_estimated: int) -> np.ndarray:
    """(n_true, n_estimated) counts; labels are 1-based."""
    table = np.zeros((n_true, n_estimated), dtype=int)
    np.add.at(table, (true - 1, estimated - 1), 1)
    return table


def _positions(sequence: np.ndarray) -> np.ndarray:
    sequence = np.asarray(sequence, dtype=int)
    out = np.empty(len(sequence), dtype=int)
    out[sequence] = np.arange(len(sequence))
    return out


def _model_sequences(cohort, model) -> np.ndarray:
    sequences = np.asarray(getattr(model, "sequences", model))
    if sequences.ndim != 2 or sequences.shape[1] != cohort.n_events:
        raise ValueError(f"model: sequences of shape (K, {cohort.n_events}) expected, got {sequences.shape}")
    for name in ("event_biomarker", "event_z"):
        theirs = getattr(model, name, None)
        if theirs is not None and not np.array_equal(np.asarray(theirs, dtype=float),
                                                     np.asarray(getattr(cohort, name), dtype=float)):
            raise ValueError(f"model: {name} differs from the cohort's (events in another order)")
    return sequences.astype(int)


def recovery(cohort, staged: pd.DataFrame, model=None) -> dict:
    """How well a fit recovers a simulated cohort's subtypes, stages and sequences.

    Parameters
    ----------
    cohort : SimulatedCohort or SimulatedMixture
        The truth.
    staged : pandas.DataFrame
        Columns ``ml_subtype`` (1..K, any labelling) and ``ml_stage``; indexed by the cohort's
        subjects, or in the cohort's order.
    model : SustainModel or array-like, optional
        An object with ``sequences`` (K', N) whose row ``j`` is estimated subtype ``j + 1``
        (or that array itself); ``event_biomarker``/``event_z`` are checked when present.

    Returns
    -------
    dict
        ``ari_all``, ``ari_cases``: adjusted Rand index of subtypes over all subjects (controls
        are class 0 in the truth) and over cases (true stage > 0);
        ``matched_accuracy_cases``: fraction of cases whose estimated subtype is the one matched
        to their true subtype (Hungarian matching on the cases' confusion matrix);
        ``subtype_match``: estimated subtype matched to true subtype 1..K (0 if none);
        ``confusion_cases``: (K, K') counts, rows true subtypes;
        ``stage_spearman_all/_cases``, ``stage_kendall_all/_cases``: Spearman rho and Kendall
        tau-b between true and estimated stages; ``n_subjects``, ``n_cases``; with ``model``,
        ``sequence_kendall``: per true subtype, Kendall tau between true and matched estimated
        event positions (NaN if unmatched), and ``sequence_kendall_mean``.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.stats import kendalltau, spearmanr
    from sklearn.metrics import adjusted_rand_score

    est_subtype, est_stage = _staged_arrays(cohort, staged)
    true_subtype, true_stage = np.asarray(cohort.subtype, dtype=int), np.asarray(cohort.stage, dtype=int)
    cases = true_stage > 0
    n_true = len(cohort.sequences)
    if np.any(est_subtype[cases] < 1):
        raise ValueError("staged: ml_subtype must be 1..K for cases")
    estimated = _model_sequences(cohort, model) if model is not None else None
    n_estimated = max(int(est_subtype.max()) if len(est_subtype) else 0,
                      len(estimated) if estimated is not None else 0, 1)

    confusion = _confusion(true_subtype[cases], est_subtype[cases], n_true, n_estimated)
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    match = np.zeros(n_true, dtype=int)
    match[rows] = cols + 1
    n_cases = int(cases.sum())

    def rank_correlations(mask):
        if mask.sum() < 2 or np.ptp(true_stage[mask]) == 0 or np.ptp(est_stage[mask]) == 0:
            return float("nan"), float("nan")
        return (float(spearmanr(true_stage[mask], est_stage[mask]).statistic),
                float(kendalltau(true_stage[mask], est_stage[mask]).statistic))

    everyone = np.ones(len(true_stage), dtype=bool)
    rho_all, tau_all = rank_correlations(everyone)
    rho_cases, tau_cases = rank_correlations(cases)
    out = {
        "n_subjects": int(len(true_stage)),
        "n_cases": n_cases,
        "ari_all": float(adjusted_rand_score(true_subtype, est_subtype)),
        "ari_cases": float(adjusted_rand_score(true_subtype[cases], est_subtype[cases])) if n_cases else float("nan"),
        "matched_accuracy_cases": float(confusion[rows, cols].sum() / n_cases) if n_cases else float("nan"),
        "subtype_match": match.tolist(),
        "confusion_cases": confusion.tolist(),
        "stage_spearman_all": rho_all,
        "stage_spearman_cases": rho_cases,
        "stage_kendall_all": tau_all,
        "stage_kendall_cases": tau_cases,
    }
    if estimated is not None:
        taus = []
        for k in range(n_true):
            j = match[k] - 1
            if j < 0 or j >= len(estimated):
                taus.append(float("nan"))
                continue
            taus.append(float(kendalltau(_positions(cohort.sequences[k]), _positions(estimated[j])).statistic))
        out["sequence_kendall"] = taus
        out["sequence_kendall_mean"] = float(np.nanmean(taus)) if np.any(np.isfinite(taus)) else float("nan")
    return out
