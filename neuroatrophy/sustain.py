"""Subtype and Stage Inference (SuStaIn) of regional atrophy.

SuStaIn (Young et al., Nature Communications 2018) explains cross-sectional data as a
mixture of a few *subtypes*, each a sequence of *events*, and places every subject at a
*stage* of one subtype. Two models are provided, with the semantics of pySuStaIn's
``ZscoreSustain`` and ``MixtureSustain`` so that results are comparable:

* :class:`ZScoreSustain`: events "biomarker *b* reaches z-score *z*"; each subtype's
  biomarkers follow piecewise-linear z-score trajectories through its events; the data
  are Gaussian (sd 1) around the trajectory at the subject's stage. Missing values
  (NaN) contribute a constant (uniform) density.
* :class:`MixtureSustain`: event-based; each biomarker has an event / no-event
  likelihood per subject (e.g. from a Gaussian mixture, see
  :func:`neuroatrophy.subtypes_input.mixture_likelihoods`).

Fitting follows the published algorithm: maximum likelihood by E-M from many random
start points, with the hierarchical cluster-splitting initialisation for more
subtypes, then MCMC for the uncertainty, then staging averaged over MCMC samples; the
number of subtypes is chosen by cross-validation (:func:`cross_validate`, CVIC).
What differs from pySuStaIn, on purpose:

* everything is computed in log space with incremental, compiled kernels
  (:mod:`neuroatrophy.sustain_kernels`): no underflow however many regions or how
  extreme the z-scores, and one to two orders of magnitude faster;
* the MCMC is a proper Metropolis-Hastings sampler (pySuStaIn omits the correction
  for its asymmetric proposals), with the same tuned proposals;
* start points, MCMC chains and cross-validation folds run in parallel through
  :func:`neuroatrophy.parallel.parallel_map`; results depend on the seed only;
* staging reports P(stage | subtype) next to the joint probability pySuStaIn calls
  ``prob_ml_stage``, and its joint posterior is weighted by the subtype fractions.

Example
-------
>>> from neuroatrophy.sustain import ZScoreSustain
>>> model = ZScoreSustain(z_levels=[[1, 2, 3]] * 5, z_max=5, max_subtypes=3, seed=0)
>>> model.fit(zscores)                      # DataFrame: subjects x regions   # doctest: +SKIP
>>> staged = model.predict(zscores, n_subtypes=3)                            # doctest: +SKIP
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import sustain_kernels as kernels
from .modelio import load_model_file, save_model_file
from .parallel import parallel_map

__all__ = [
    "ZScoreSustain",
    "MixtureSustain",
    "SustainModel",
    "CVResult",
    "cross_validate",
    "event_spec",
    "reference_loglik",
]

MODEL_TYPE = "sustain"
MODEL_VERSION = 1
_MAX_EM_PASSES = 100
_EM_TOLERANCE = 1e-6
_TUNING_PASSES = 3
_MCMC_CHUNK = 2000


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class EventSpec:
    """The events of a SuStaIn model and the ordering constraints between them.

    Events are listed z-level-major as in pySuStaIn: every biomarker's first z-level,
    then every biomarker's second z-level, and so on.
    """

    biomarkers: tuple
    event_biomarker: np.ndarray  # (N,) int64
    event_z: np.ndarray  # (N,) float64
    z_max: np.ndarray  # (B,) float64
    bio_events: np.ndarray  # (B, max levels) int64, -1 padded, by increasing z
    bio_n: np.ndarray  # (B,) int64
    ev_prev: np.ndarray  # (N,) same biomarker's previous event or -1
    ev_next: np.ndarray  # (N,) same biomarker's next event or -1

    @property
    def n_events(self) -> int:
        return int(self.event_biomarker.size)

    @property
    def n_biomarkers(self) -> int:
        return len(self.biomarkers)

    def labels(self, kind: str = "zscore") -> list[str]:
        if kind == "mixture":
            return [str(self.biomarkers[b]) for b in self.event_biomarker]
        return [f"{self.biomarkers[b]} z={_format_z(z)}" for b, z in zip(self.event_biomarker, self.event_z)]

    def random_sequence(self, rng: np.random.Generator) -> np.ndarray:
        """A random valid order: at each position, uniform among the lowest unplaced
        event of every biomarker that still has one (pySuStaIn's initialisation)."""
        placed = np.zeros(self.n_biomarkers, dtype=np.int64)
        order = np.empty(self.n_events, dtype=np.int64)
        for i in range(self.n_events):
            available = np.flatnonzero(placed < self.bio_n)
            b = available[rng.integers(available.size)]
            order[i] = self.bio_events[b, placed[b]]
            placed[b] += 1
        return order

    def is_valid(self, sequence) -> bool:
        sequence = np.asarray(sequence)
        if sorted(sequence.tolist()) != list(range(self.n_events)):
            return False
        pos = np.empty(self.n_events, dtype=np.int64)
        pos[sequence] = np.arange(self.n_events)
        nxt = self.ev_next >= 0
        return bool(np.all(pos[nxt] < pos[self.ev_next[nxt]]))


def _format_z(z: float) -> str:
    return f"{z:g}"


def event_spec(z_levels, z_max, biomarkers=None) -> EventSpec:
    """Build and check the events of a z-score model.

    Parameters
    ----------
    z_levels : list of sequences or array (B, n_z)
        Increasing positive z-levels per biomarker. In the pySuStaIn array form a 0
        entry means "no event".
    z_max : float or array (B,)
        Z-score every trajectory reaches at the last stage; above every biomarker's
        highest level.
    biomarkers : list of str, optional
        Names (default "Biomarker 1", ...).
    """
    levels = _z_levels_list(z_levels)
    n_bio = len(levels)
    names = tuple(biomarkers) if biomarkers is not None else tuple(f"Biomarker {b + 1}" for b in range(n_bio))
    if len(names) != n_bio:
        raise ValueError(f"z_levels has {n_bio} biomarkers but {len(names)} biomarker names were given")
    z_max = np.broadcast_to(np.asarray(z_max, dtype=float), (n_bio,)).copy() if np.ndim(z_max) == 0 else np.asarray(z_max, dtype=float)
    if z_max.shape != (n_bio,):
        raise ValueError(f"z_max must be a number or have one value per biomarker ({n_bio}), got shape {z_max.shape}")
    for b, (name, lv) in enumerate(zip(names, levels)):
        if not lv:
            raise ValueError(f"biomarker {name!r} has no z-levels: give it at least one (e.g. [1])")
        if any(not np.isfinite(z) or z <= 0 for z in lv):
            raise ValueError(f"z-levels of biomarker {name!r} must be positive and finite, got {lv}")
        if any(b2 <= a for a, b2 in zip(lv, lv[1:])):
            raise ValueError(f"z-levels of biomarker {name!r} must be strictly increasing, got {lv}")
        if not np.isfinite(z_max[b]) or z_max[b] <= lv[-1]:
            raise ValueError(f"z_max of biomarker {name!r} ({z_max[b]:g}) must exceed its highest z-level ({lv[-1]:g})")
    max_levels = max(len(lv) for lv in levels)
    ev_b, ev_z = [], []
    for t in range(max_levels):
        for b, lv in enumerate(levels):
            if t < len(lv):
                ev_b.append(b)
                ev_z.append(float(lv[t]))
    ev_b = np.asarray(ev_b, dtype=np.int64)
    ev_z = np.asarray(ev_z, dtype=float)
    bio_events = np.full((n_bio, max_levels), -1, dtype=np.int64)
    bio_n = np.zeros(n_bio, dtype=np.int64)
    for e, b in enumerate(ev_b):
        bio_events[b, bio_n[b]] = e
        bio_n[b] += 1
    return _spec(names, ev_b, ev_z, z_max, bio_events, bio_n)


def _spec(names, ev_b, ev_z, z_max, bio_events, bio_n) -> EventSpec:
    n = ev_b.size
    ev_prev = np.full(n, -1, dtype=np.int64)
    ev_next = np.full(n, -1, dtype=np.int64)
    for b in range(len(names)):
        events = bio_events[b, : bio_n[b]]
        ev_prev[events[1:]] = events[:-1]
        ev_next[events[:-1]] = events[1:]
    return EventSpec(tuple(str(x) for x in names), ev_b, ev_z, np.asarray(z_max, dtype=float), bio_events, bio_n, ev_prev, ev_next)


def mixture_spec(biomarkers) -> EventSpec:
    """One event per biomarker, no ordering constraints (event-based model)."""
    n = len(biomarkers)
    ev_b = np.arange(n, dtype=np.int64)
    return _spec(biomarkers, ev_b, np.ones(n), np.ones(n) * 2.0, ev_b.reshape(n, 1).copy(), np.ones(n, dtype=np.int64))


def _z_levels_list(z_levels) -> list[list[float]]:
    if isinstance(z_levels, np.ndarray) and z_levels.ndim == 2:
        return [[float(z) for z in row if z != 0] for row in z_levels]
    try:
        return [[float(z) for z in np.atleast_1d(row)] for row in z_levels]
    except (TypeError, ValueError):
        raise ValueError(f"z_levels must be a list of z-level lists (one per biomarker), got {z_levels!r}") from None


# ---------------------------------------------------------------- data


@dataclass
class _Data:
    """Subject data in the layout the kernels want."""

    kind: int
    X: np.ndarray  # (B, M) z-scores (0 where missing); empty for mixtures
    W: np.ndarray  # (B, M) 1 observed / 0 missing
    D: np.ndarray  # (N, M) log L_yes - log L_no; empty for z-scores
    base: np.ndarray  # (M,) sum_b log L_no
    const: np.ndarray  # (M,) per-subject constant incl. the stage prior
    index: pd.Index

    @property
    def n_subjects(self) -> int:
        return int(self.const.size)

    def subset(self, rows) -> "_Data":
        rows = np.asarray(rows)

        def cut(a):
            return np.ascontiguousarray(a[:, rows])

        return _Data(
            self.kind,
            cut(self.X),
            cut(self.W),
            cut(self.D),
            self.base[rows].copy(),
            self.const[rows].copy(),
            self.index[rows],
        )


def _as_frame(X, names, what: str) -> pd.DataFrame:
    if isinstance(X, pd.DataFrame):
        frame = X.rename(columns=str)
    else:
        array = np.asarray(X)
        if array.ndim != 2:
            raise ValueError(f"{what} must be a 2-D table (subjects x biomarkers), got shape {array.shape}")
        frame = pd.DataFrame(array, columns=list(names) if names is not None else None)
    if names is not None:
        missing = [n for n in names if n not in frame.columns]
        if missing:
            if not isinstance(X, pd.DataFrame):
                raise ValueError(f"{what} has {frame.shape[1]} columns, expected {len(names)} ({', '.join(map(str, names))})")
            raise ValueError(f"{what} has no column(s) {', '.join(map(repr, missing))}")
        frame = frame[list(names)]
    return frame


def _numeric(frame: pd.DataFrame, what: str, allow_nan: bool) -> np.ndarray:
    for column in frame.columns:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() & frame[column].notna()
        if bad.any():
            subject = frame.index[np.flatnonzero(bad.to_numpy())[0]]
            raise ValueError(
                f"{what}: column {column!r} has a non-numeric value {frame[column][subject]!r} (subject {subject!r})"
            )
    array = frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    if np.isinf(array).any():
        r, c = np.argwhere(np.isinf(array))[0]
        raise ValueError(f"{what}: column {frame.columns[c]!r} is infinite for subject {frame.index[r]!r}")
    if not allow_nan and np.isnan(array).any():
        r, c = np.argwhere(np.isnan(array))[0]
        raise ValueError(f"{what}: column {frame.columns[c]!r} is missing for subject {frame.index[r]!r}")
    empty = np.isnan(array).all(axis=1)
    if empty.any():
        raise ValueError(f"{what}: subject {frame.index[np.flatnonzero(empty)[0]]!r} has no value for any biomarker")
    return array


def _zscore_data(X, spec: EventSpec) -> _Data:
    frame = _as_frame(X, spec.biomarkers, "z-scores")
    array = _numeric(frame, "z-scores", allow_nan=True)
    if array.shape[1] != spec.n_biomarkers:
        raise ValueError(f"z-scores have {array.shape[1]} biomarkers, the model has {spec.n_biomarkers}")
    observed = ~np.isnan(array)
    n_stages = spec.n_events + 1
    # Gaussian normaliser per observed value; a missing value has the uniform density
    # 1/z_max on [0, z_max] (constant per subject, so posteriors are unaffected).
    const = (
        -0.5 * math.log(2 * math.pi) * observed.sum(axis=1)
        - (np.log(spec.z_max)[None, :] * ~observed).sum(axis=1)
        - math.log(n_stages)
    )
    X_t = np.ascontiguousarray(np.where(observed, array, 0.0).T)
    W_t = np.ascontiguousarray(observed.T.astype(float))
    empty = np.zeros((0, array.shape[0]))
    return _Data(kernels.ZSCORE, X_t, W_t, empty, np.zeros(array.shape[0]), const, frame.index)


def _mixture_data(L_yes, L_no, spec: EventSpec) -> _Data:
    yes = _as_frame(L_yes, spec.biomarkers, "L_yes")
    no = _as_frame(L_no, spec.biomarkers, "L_no")
    if yes.shape != no.shape:
        raise ValueError(f"L_yes has shape {yes.shape} but L_no has shape {no.shape}")
    a = _numeric(yes, "L_yes", allow_nan=True)
    b = _numeric(no, "L_no", allow_nan=True)
    for name, arr, frame in (("L_yes", a, yes), ("L_no", b, no)):
        bad = arr < 0
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ValueError(f"{name}: likelihoods must be >= 0; column {frame.columns[c]!r}, subject {frame.index[r]!r}")
    missing = np.isnan(a) | np.isnan(b)
    a = np.where(missing, 1.0, a)
    b = np.where(missing, 1.0, b)
    with np.errstate(divide="ignore"):
        log_yes, log_no = np.log(a), np.log(b)
    both_zero = np.isinf(log_yes) & np.isinf(log_no)
    if both_zero.any():
        r, c = np.argwhere(both_zero)[0]
        raise ValueError(f"L_yes and L_no are both 0 for column {yes.columns[c]!r}, subject {yes.index[r]!r}")
    # Clip zero likelihoods to the smallest normal double (log ~ -708): log space stays finite.
    floor = math.log(np.finfo(float).tiny)
    log_yes, log_no = np.maximum(log_yes, floor), np.maximum(log_no, floor)
    D = np.ascontiguousarray((log_yes - log_no).T)
    n_stages = spec.n_events + 1
    const = np.full(a.shape[0], -math.log(n_stages))
    empty = np.zeros((0, a.shape[0]))
    return _Data(kernels.MIXTURE, empty, empty, D, log_no.sum(axis=1), const, yes.index)


# ---------------------------------------------------------------- engine


class _Engine:
    """E-M and MCMC for one data set; thin Python around the compiled kernels."""

    def __init__(self, data: _Data, spec: EventSpec):
        self.data = data
        self.spec = spec
        self._n_mu = spec.n_biomarkers if data.kind == kernels.ZSCORE else 1

    # kernel argument bundles
    def _model_args(self):
        d, s = self.data, self.spec
        return (d.kind, d.X, d.W, d.D, d.base, s.event_z, s.z_max, s.bio_events, s.bio_n)

    def state(self, seqs: np.ndarray, f: np.ndarray):
        n_sub, n_events = seqs.shape
        n_stages, M = n_events + 1, self.data.n_subjects
        L = np.empty((n_sub, n_stages, M))
        mus = np.zeros((n_sub, self._n_mu, n_stages))
        pos = np.empty(n_events, dtype=np.int64)
        points = np.empty(n_stages + 1)
        for c in range(n_sub):
            mu = np.zeros((self.spec.n_biomarkers, n_stages)) if self.data.kind == kernels.ZSCORE else np.zeros((1, n_stages))
            kernels.stage_rows(*self._model_args(), seqs[c], pos, points, mu, L[c])
            mus[c] = mu
        E = np.empty_like(L)
        P = np.empty((n_sub, n_stages + 1, M))
        Q = np.empty((n_sub, n_stages + 1, M))
        m = np.empty(M)
        kernels.init_state(L, E, P, Q, m)
        return L, E, P, Q, m, mus

    def loglik(self, seqs, f) -> float:
        seqs = np.ascontiguousarray(seqs, dtype=np.int64)
        L, E, P, Q, m, _ = self.state(seqs, np.asarray(f, dtype=float))
        return float(kernels.current_loglik(L, E, P, m, np.asarray(f, dtype=float), self.data.const))

    def em(self, seqs, f, rng: np.random.Generator):
        """pySuStaIn's ``_perform_em``: passes until the relative change is < 1e-6."""
        seqs = np.array(seqs, dtype=np.int64)
        f = np.array(f, dtype=float)
        n_sub, n_events = seqs.shape
        state = self.state(seqs, f)
        L, E, P, Q, m, mus = state
        current = float(kernels.current_loglik(L, E, P, m, f, self.data.const))
        spec = self.spec
        for _ in range(_MAX_EM_PASSES):
            order_c = rng.permutation(n_sub).astype(np.int64)
            order_e = np.stack([rng.permutation(n_events) for _ in range(n_sub)]).astype(np.int64)
            cand_seqs, cand_f = seqs.copy(), f.copy()
            candidate = float(
                kernels.em_pass(*self._model_args(), spec.ev_prev, spec.ev_next, self.data.const,
                                cand_seqs, cand_f, L, E, P, Q, m, mus, order_c, order_e)
            )
            if abs((candidate - current) / max(candidate, current)) < _EM_TOLERANCE:
                break
            if candidate > current:
                seqs, f, current = cand_seqs, cand_f, candidate
            else:  # the pass made things worse (never seen): restore the state
                L, E, P, Q, m, mus = self.state(seqs, f)
        return seqs, f, current

    def mcmc(self, seqs, f, n_iter: int, seq_sigma, f_sigma, rng: np.random.Generator, on_chunk=None):
        """Run ``n_iter`` Metropolis-Hastings iterations from ``(seqs, f)``."""
        seqs = np.array(seqs, dtype=np.int64)
        f = np.array(f, dtype=float)
        n_sub, n_events = seqs.shape
        L, E, P, Q, m, mus = self.state(seqs, f)
        loglik = float(kernels.current_loglik(L, E, P, m, f, self.data.const))
        out_seq = np.empty((n_iter, n_sub, n_events), dtype=np.int64)
        out_f = np.empty((n_iter, n_sub))
        out_ll = np.empty(n_iter)
        seq_sigma = np.ascontiguousarray(seq_sigma, dtype=float)
        f_sigma = np.ascontiguousarray(np.broadcast_to(f_sigma, (max(n_sub - 1, 1),)), dtype=float)
        spec = self.spec
        accepted = 0
        for start in range(0, n_iter, _MCMC_CHUNK):
            n = min(_MCMC_CHUNK, n_iter - start)
            if start:  # exact state again: incremental updates must not accumulate rounding
                L, E, P, Q, m, mus = self.state(seqs, f)
                loglik = float(kernels.current_loglik(L, E, P, m, f, self.data.const))
            r_pos = rng.random((n, n_sub))
            r_new = rng.random((n, n_sub))
            r_f = rng.standard_normal((n, max(n_sub - 1, 1)))
            r_acc = rng.random(n)
            loglik, acc = kernels.mcmc(*self._model_args(), spec.ev_prev, spec.ev_next, self.data.const,
                                       seqs, f, L, E, P, Q, m, mus, seq_sigma, f_sigma, loglik,
                                       r_pos, r_new, r_f, r_acc, out_seq, out_f, out_ll, start)
            accepted += acc
            if on_chunk is not None:
                on_chunk(n)
        return out_seq, out_f, out_ll, accepted / max(n_iter, 1)

    def subset(self, rows) -> "_Engine":
        return _Engine(self.data.subset(rows), self.spec)


# ---------------------------------------------------------------- progress


class _Progress:
    """Thread-safe progress over a known amount of work (arbitrary units)."""

    def __init__(self, callback, total: float):
        self.callback = callback
        self.total = max(total, 1e-9)
        self.done = 0.0
        self.lock = threading.Lock()

    def add(self, amount: float, message: str) -> None:
        if self.callback is None:
            return
        with self.lock:
            self.done += amount
            fraction = min(self.done / self.total, 1.0)
            self.callback(fraction, message)


# ---------------------------------------------------------------- fitted model


class SustainModel:
    """A fitted SuStaIn model with a given number of subtypes.

    Subtypes are ordered by fraction, largest first (as in pySuStaIn). ``sequences``
    are the maximum-likelihood event orders; ``samples_*`` the MCMC samples.
    """

    def __init__(self, kind, spec: EventSpec, sequences, fractions, loglik, samples_sequence,
                 samples_f, samples_loglik, settings=None):
        self.kind = kind
        self.spec = spec
        self.sequences = np.asarray(sequences, dtype=np.int64)
        self.fractions = np.asarray(fractions, dtype=float)
        self.loglik = float(loglik)
        self.samples_sequence = np.asarray(samples_sequence, dtype=np.int16)
        self.samples_f = np.asarray(samples_f, dtype=float)
        self.samples_loglik = np.asarray(samples_loglik, dtype=float)
        self.settings = dict(settings or {})

    # basic facts ----------------------------------------------------------
    biomarkers = property(lambda self: list(self.spec.biomarkers))
    event_biomarker = property(lambda self: self.spec.event_biomarker)
    event_z = property(lambda self: self.spec.event_z)
    z_max = property(lambda self: self.spec.z_max)
    n_subtypes = property(lambda self: int(self.sequences.shape[0]))
    n_events = property(lambda self: int(self.sequences.shape[1]))
    n_stages = property(lambda self: int(self.sequences.shape[1]) + 1)

    @property
    def event_labels(self) -> list[str]:
        return self.spec.labels(self.kind)

    def __repr__(self) -> str:
        return (f"SustainModel(kind={self.kind!r}, n_subtypes={self.n_subtypes}, n_events={self.n_events}, "
                f"fractions={np.round(self.fractions, 3).tolist()}, loglik={self.loglik:.2f})")

    # staging ----------------------------------------------------------------
    def _data(self, X, L_no=None) -> _Data:
        if self.kind == "mixture":
            if L_no is None:
                raise ValueError("a mixture model stages (L_yes, L_no): use stage_likelihoods(L_yes, L_no)")
            return _mixture_data(X, L_no, self.spec)
        return _zscore_data(X, self.spec)

    def _thinned(self, n_samples):
        n_samples = self.settings.get("n_stage_samples", 1000) if n_samples is None else int(n_samples)
        total = self.samples_sequence.shape[0]
        if total == 0:
            return self.sequences[None].astype(np.int64), self.fractions[None]
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        idx = np.unique(np.round(np.linspace(0, total - 1, min(n_samples, total))).astype(np.int64))
        return np.ascontiguousarray(self.samples_sequence[idx], dtype=np.int64), np.ascontiguousarray(self.samples_f[idx])

    def _posteriors(self, data: _Data, n_samples=None):
        seqs, fs = self._thinned(n_samples)
        out = np.zeros((data.n_subjects, self.n_stages, self.n_subtypes))
        ll = np.empty((seqs.shape[0], data.n_subjects))
        s = self.spec
        kernels.stage_posteriors(data.kind, data.X, data.W, data.D, data.base, s.event_z, s.z_max, s.bio_events,
                                 s.bio_n, data.const, seqs, fs, out, ll)
        return out, ll

    def stage_probabilities(self, X, n_samples=None, L_no=None) -> dict:
        """Posterior probabilities averaged over (thinned) MCMC samples.

        Returns ``prob_subtype`` (M, K), ``prob_stage`` (M, N+1) and
        ``prob_subtype_stage`` (M, N+1, K), the joint posterior P(stage, subtype | x).
        """
        data = self._data(X, L_no)
        joint, _ = self._posteriors(data, n_samples)
        return {
            "prob_subtype": joint.sum(axis=1),
            "prob_stage": joint.sum(axis=2),
            "prob_subtype_stage": joint,
            "index": data.index,
        }

    def stage(self, X, n_samples=None) -> pd.DataFrame:
        """Most likely subtype and stage of every subject, with probabilities.

        Columns: ``ml_subtype`` (1..K), ``prob_ml_subtype``, ``ml_stage`` (0..N; 0 is
        "normal-appearing"), ``prob_ml_stage`` = P(stage | subtype, x),
        ``prob_ml_stage_joint`` = P(stage, subtype | x), ``normal_appearing`` and
        ``prob_subtype_<c>``.
        """
        return self._stage_frame(self.stage_probabilities(X, n_samples))

    def stage_likelihoods(self, L_yes, L_no, n_samples=None) -> pd.DataFrame:
        """:meth:`stage` for a mixture model, from event / no-event likelihoods."""
        return self._stage_frame(self.stage_probabilities(L_yes, n_samples, L_no=L_no))

    def _stage_frame(self, probs: dict) -> pd.DataFrame:
        joint, prob_subtype = probs["prob_subtype_stage"], probs["prob_subtype"]
        rows = np.arange(joint.shape[0])
        ml_subtype = prob_subtype.argmax(axis=1)
        ml_stage = joint[rows, :, ml_subtype].argmax(axis=1)
        p_joint = joint[rows, ml_stage, ml_subtype]
        p_sub = prob_subtype[rows, ml_subtype]
        frame = pd.DataFrame(
            {
                "ml_subtype": ml_subtype + 1,
                "prob_ml_subtype": p_sub,
                "ml_stage": ml_stage,
                "prob_ml_stage": np.divide(p_joint, p_sub, out=np.zeros_like(p_joint), where=p_sub > 0),
                "prob_ml_stage_joint": p_joint,
                "normal_appearing": ml_stage == 0,
            },
            index=probs["index"],
        )
        for c in range(self.n_subtypes):
            frame[f"prob_subtype_{c + 1}"] = prob_subtype[:, c]
        return frame

    def loglik_samples(self, X, n_samples=None, L_no=None) -> np.ndarray:
        """(S, M) log-likelihood of every subject under thinned MCMC samples."""
        return self._posteriors(self._data(X, L_no), n_samples)[1]

    # summaries --------------------------------------------------------------
    def positional_variance(self) -> np.ndarray:
        """(K, N events, N positions): fraction of MCMC samples with event e at position p."""
        samples = self.samples_sequence if self.samples_sequence.shape[0] else self.sequences[None]
        S, K, N = samples.shape
        out = np.zeros((K, N, N))
        positions = np.broadcast_to(np.arange(N), (S, N))
        for c in range(K):
            np.add.at(out[c], (samples[:, c, :].astype(np.int64), positions), 1.0)
        return out / S

    def event_stages(self) -> np.ndarray:
        """(K, N): stage (1..N) at which each event occurs in the ML sequence."""
        out = np.empty_like(self.sequences)
        for c, seq in enumerate(self.sequences):
            out[c, seq] = np.arange(1, self.n_events + 1)
        return out

    def biomarker_onset(self, level: int = 0) -> np.ndarray:
        """(K, B): stage at which biomarker b reaches its ``level``-th event (N+1 if never)."""
        stages = self.event_stages()
        out = np.full((self.n_subtypes, self.spec.n_biomarkers), self.n_events + 1, dtype=np.int64)
        for b in range(self.spec.n_biomarkers):
            if level < self.spec.bio_n[b]:
                out[:, b] = stages[:, self.spec.bio_events[b, level]]
        return out

    def trajectories(self) -> np.ndarray:
        """(K, N+1, B): model mean z of each biomarker at each stage (ML sequences).

        For a mixture model: 1 where the biomarker's event has occurred by that stage.
        """
        K, N, B = self.n_subtypes, self.n_events, self.spec.n_biomarkers
        out = np.zeros((K, N + 1, B))
        for c in range(K):
            seq = self.sequences[c]
            if self.kind == "mixture":
                for k in range(1, N + 1):
                    out[c, k, self.spec.event_biomarker[seq[:k]]] = 1.0
                continue
            pos = np.empty(N, dtype=np.int64)
            kernels.positions_of(seq, pos)
            mu = np.empty((B, N + 1))
            kernels.zscore_means(pos, self.spec.event_z, self.spec.z_max, self.spec.bio_events, self.spec.bio_n,
                                 np.empty(N + 2), mu)
            out[c] = mu.T
        return out

    def sequence_table(self) -> pd.DataFrame:
        """Events in order for every subtype, with their positional certainty."""
        pvd = self.positional_variance()
        labels = self.event_labels
        rows = []
        for c, seq in enumerate(self.sequences):
            for p, e in enumerate(seq):
                rows.append({"subtype": c + 1, "position": p + 1, "event": labels[e],
                             "biomarker": self.spec.biomarkers[self.spec.event_biomarker[e]],
                             "z": float(self.spec.event_z[e]) if self.kind == "zscore" else np.nan,
                             "certainty": float(pvd[c, e, p])})
        return pd.DataFrame(rows)

    # persistence ------------------------------------------------------------
    def save(self, path) -> Path:
        """Write a safe model file (zip of .npy arrays + metadata.json; no pickle)."""
        arrays = {
            "sequences": self.sequences,
            "fractions": self.fractions,
            "samples_sequence": self.samples_sequence,
            "samples_f": self.samples_f,
            "samples_loglik": self.samples_loglik,
            "event_biomarker": self.spec.event_biomarker,
            "event_z": self.spec.event_z,
            "z_max": self.spec.z_max,
        }
        metadata = {
            "model_type": MODEL_TYPE,
            "sustain_version": MODEL_VERSION,
            "kind": self.kind,
            "biomarkers": list(self.spec.biomarkers),
            "loglik": self.loglik,
            "settings": _jsonable(self.settings),
        }
        return save_model_file(path, arrays, metadata)

    @classmethod
    def load(cls, path) -> "SustainModel":
        arrays, meta = load_model_file(path, expected_type=MODEL_TYPE)
        if meta.get("sustain_version", 0) > MODEL_VERSION:
            raise ValueError(f"{path}: SuStaIn model version {meta.get('sustain_version')} is newer than this NeuroAtrophy reads")
        kind = meta.get("kind")
        if kind not in ("zscore", "mixture"):
            raise ValueError(f"{path}: unknown SuStaIn model kind {kind!r}")
        names = meta["biomarkers"]
        try:
            if kind == "mixture":
                spec = mixture_spec(names)
            else:
                ev_b, ev_z = arrays["event_biomarker"], arrays["event_z"]
                levels = [sorted(ev_z[ev_b == b].tolist()) for b in range(len(names))]
                spec = event_spec(levels, arrays["z_max"], names)
                if not (np.array_equal(spec.event_biomarker, ev_b) and np.array_equal(spec.event_z, ev_z)):
                    raise ValueError("event order does not match the z-levels")
            model = cls(kind, spec, arrays["sequences"], arrays["fractions"], meta["loglik"],
                        arrays["samples_sequence"], arrays["samples_f"], arrays["samples_loglik"], meta.get("settings"))
        except KeyError as error:
            raise ValueError(f"{path}: SuStaIn model file lacks {error}") from None
        if model.sequences.shape[1] != spec.n_events or not all(spec.is_valid(s) for s in model.sequences):
            raise ValueError(f"{path}: SuStaIn model file holds invalid event sequences")
        return model


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


# ---------------------------------------------------------------- estimators


class _BaseSustain:
    kind = "zscore"

    def __init__(self, max_subtypes=3, n_startpoints=25, n_mcmc=100_000, n_tune=10_000, n_stage_samples=1000,
                 seed=None, n_jobs=None, backend=None, progress=None):
        self.max_subtypes = max_subtypes
        self.n_startpoints = n_startpoints
        self.n_mcmc = n_mcmc
        self.n_tune = n_tune
        self.n_stage_samples = n_stage_samples
        self.seed = seed
        self.n_jobs = n_jobs
        self.backend = backend
        self.progress = progress

    # public API ------------------------------------------------------------
    def model(self, n_subtypes=None) -> SustainModel:
        if not hasattr(self, "models_"):
            raise ValueError("this SuStaIn estimator is not fitted yet: call fit() first")
        n_subtypes = len(self.models_) if n_subtypes is None else int(n_subtypes)
        if not 1 <= n_subtypes <= len(self.models_):
            raise ValueError(f"n_subtypes must be between 1 and {len(self.models_)}, got {n_subtypes}")
        return self.models_[n_subtypes - 1]

    def get_params(self) -> dict:
        names = ("max_subtypes", "n_startpoints", "n_mcmc", "n_tune", "n_stage_samples", "seed", "n_jobs", "backend", "progress")
        return {n: getattr(self, n) for n in names} | self._extra_params()

    def _extra_params(self) -> dict:
        return {}

    def _check_settings(self, n_subjects: int, spec: EventSpec) -> None:
        for name in ("max_subtypes", "n_startpoints", "n_stage_samples"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("n_mcmc", "n_tune"):
            value = getattr(self, name)
            if int(value) != value or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if n_subjects <= spec.n_events:
            raise ValueError(
                f"SuStaIn needs more subjects than events: {n_subjects} subjects for {spec.n_events} events "
                f"({spec.n_biomarkers} biomarkers); use fewer z-levels or biomarkers"
            )
        if n_subjects < 2 * self.max_subtypes:
            raise ValueError(f"{n_subjects} subjects are too few for max_subtypes={self.max_subtypes}")

    def _fit_engine(self, engine: _Engine) -> "_BaseSustain":
        self._check_settings(engine.data.n_subjects, engine.spec)
        started = time.perf_counter()
        root = np.random.SeedSequence(self.seed)
        em_seeds, mcmc_seeds = root.spawn(2)
        progress = _Progress(self.progress, _work_units(self, engine.spec))
        ml = []
        prev = None
        for n_sub, seed in zip(range(1, self.max_subtypes + 1), em_seeds.spawn(self.max_subtypes)):
            prev = _fit_ml(engine, prev, n_sub, seed, self.n_startpoints, self.n_jobs, self.backend, progress)
            ml.append(prev)
        em_seconds = time.perf_counter() - started

        def run_chain(args):
            (seqs, f, loglik), seed = args
            return _run_mcmc(engine, seqs, f, loglik, self.n_mcmc, self.n_tune, seed, progress)

        chains = parallel_map(run_chain, list(zip(ml, mcmc_seeds.spawn(self.max_subtypes)))[::-1],
                              n_jobs=self.n_jobs, backend=self.backend)[::-1]
        settings = {n: getattr(self, n) for n in ("n_startpoints", "n_mcmc", "n_tune", "n_stage_samples", "seed")}
        self.models_ = [_make_model(self.kind, engine.spec, chain, settings) for chain in chains]
        self.timings_ = {"em": em_seconds, "total": time.perf_counter() - started}
        self.acceptance_ = [chain["acceptance"] for chain in chains]
        self.n_subjects_ = engine.data.n_subjects
        if self.progress is not None:
            self.progress(1.0, "SuStaIn fit done")
        return self


def _work_units(est, spec: EventSpec) -> float:
    # One E-M start of k subtypes costs roughly 50 * N candidate evaluations per
    # subtype; an MCMC iteration one evaluation per subtype.
    em = 0.0
    for k in range(1, est.max_subtypes + 1):
        starts = est.n_startpoints if k == 1 else 2 * est.n_startpoints * (k - 1)
        em += starts * k * 50 * spec.n_events
    mcmc = sum(k * (est.n_mcmc + est.n_tune) for k in range(1, est.max_subtypes + 1))
    return em + mcmc


def _em_from_random(engine: _Engine, seed):
    rng = np.random.default_rng(seed)
    seq = engine.spec.random_sequence(rng)[None]
    return engine.em(seq, np.ones(1), rng)


def _split_run(engine: _Engine, seed):
    """pySuStaIn ``_find_ml_split`` start: random halves, 1-subtype fits, then a 2-subtype fit."""
    rng = np.random.default_rng(seed)
    M = engine.data.n_subjects
    while True:
        assign = np.ceil(2 * rng.random(M)).astype(int)
        if min((assign == 1).sum(), (assign == 2).sum()) > 0:
            break
    seqs = np.empty((2, engine.spec.n_events), dtype=np.int64)
    for s in range(2):
        start = engine.spec.random_sequence(rng)[None]
        seqs[s] = engine.subset(np.flatnonzero(assign == s + 1)).em(start, np.ones(1), rng)[0][0]
    return engine.em(seqs, np.full(2, 0.5), rng)


def _best(results):
    best = int(np.argmax([r[2] for r in results]))
    return results[best]


def _fit_ml(engine: _Engine, prev, n_sub: int, seed: np.random.SeedSequence, n_starts, n_jobs, backend, progress):
    """Maximum-likelihood model with ``n_sub`` subtypes (hierarchical initialisation)."""
    unit = 50 * engine.spec.n_events * n_sub
    message = f"E-M, {n_sub} subtype{'s' if n_sub > 1 else ''}"

    def tick(_i, _r):
        progress.add(unit, message)

    if n_sub == 1:
        return _best(parallel_map(lambda s: _em_from_random(engine, s), seed.spawn(n_starts),
                                  n_jobs=n_jobs, backend=backend, on_result=tick))
    prev_seqs, prev_f, _ = prev
    L, E, P, Q, m, _ = engine.state(prev_seqs, prev_f)
    cluster = (prev_f[:, None] * P[:, -1, :]).argmax(axis=0)
    best = None
    for c, split_seed in zip(range(n_sub - 1), seed.spawn(n_sub - 1)):
        members = np.flatnonzero(cluster == c)
        split_seed, mix_seed = split_seed.spawn(2)
        if members.size <= 1:
            progress.add(unit * 2 * n_starts, message)
            continue
        sub_engine = engine.subset(members)
        split = _best(parallel_map(lambda s: _split_run(sub_engine, s), split_seed.spawn(n_starts),
                                   n_jobs=n_jobs, backend=backend, on_result=tick))
        init = np.vstack([prev_seqs[:c], split[0][:1], prev_seqs[c + 1:], split[0][1:]])
        f_init = np.full(n_sub, 1.0 / n_sub)
        candidate = _best(parallel_map(lambda s: engine.em(init, f_init, np.random.default_rng(s)),
                                       mix_seed.spawn(n_starts), n_jobs=n_jobs, backend=backend, on_result=tick))
        if best is None or candidate[2] > best[2]:
            best = candidate
    if best is None:
        raise ValueError(f"cannot fit {n_sub} subtypes: every subtype of the {n_sub - 1}-subtype model has at most one subject")
    return best


def _run_mcmc(engine: _Engine, seqs, f, ml_loglik, n_mcmc, n_tune, seed, progress):
    """Tuned Metropolis-Hastings from the ML solution (pySuStaIn's 3 tuning passes)."""
    rng = np.random.default_rng(seed)
    n_sub, n_events = seqs.shape
    message = f"MCMC, {n_sub} subtype{'s' if n_sub > 1 else ''}"
    seq_sigma = np.ones((n_sub, n_events))
    f_sigma = np.full(max(n_sub - 1, 1), 0.05)

    def on_chunk(n):
        progress.add(n * n_sub, message)

    per_pass = n_tune // _TUNING_PASSES
    for _ in range(_TUNING_PASSES if per_pass > 0 else 0):
        s_seq, s_f, _, _ = engine.mcmc(seqs, f, per_pass, seq_sigma, f_sigma, rng, on_chunk)
        seq_sigma = _position_spread(s_seq)
        if n_sub > 1:
            alr = np.log(s_f[:, :-1]) - np.log(s_f[:, -1:])
            f_sigma = np.maximum(alr.std(axis=0), 0.01)
    leftover = n_tune - per_pass * _TUNING_PASSES
    if leftover:
        progress.add(leftover * n_sub, message)
    samples_seq, samples_f, samples_ll, acceptance = engine.mcmc(seqs, f, n_mcmc, seq_sigma, f_sigma, rng, on_chunk)
    ml = (seqs, f, ml_loglik)
    if n_mcmc and samples_ll.max() > ml_loglik:
        i = int(samples_ll.argmax())
        ml = (samples_seq[i], samples_f[i], float(samples_ll[i]))
    return {"ml": ml, "samples_sequence": samples_seq, "samples_f": samples_f, "samples_loglik": samples_ll,
            "acceptance": acceptance}


# pySuStaIn floors the tuned proposal width at 0.01, which freezes every event that
# did not move while tuning; 0.5 still proposes a neighbouring position ~20 % of the time.
_MIN_SEQ_SIGMA = 0.5


def _position_spread(samples_seq) -> np.ndarray:
    """Per (subtype, event) standard deviation of the event's position (floored)."""
    S, K, N = samples_seq.shape
    positions = np.empty((S, K, N))
    np.put_along_axis(positions, samples_seq, np.broadcast_to(np.arange(N, dtype=float), (S, K, N)), axis=2)
    return np.maximum(positions.std(axis=0), _MIN_SEQ_SIGMA)


def _make_model(kind, spec, chain, settings) -> SustainModel:
    seqs, f, loglik = chain["ml"]
    order = np.argsort(-np.asarray(f), kind="stable")
    return SustainModel(
        kind, spec, np.asarray(seqs)[order], np.asarray(f)[order], loglik,
        chain["samples_sequence"][:, order, :], chain["samples_f"][:, order], chain["samples_loglik"], settings,
    )


class ZScoreSustain(_BaseSustain):
    """Z-score SuStaIn (Young et al. 2018) with pySuStaIn's ``ZscoreSustain`` model.

    Parameters
    ----------
    z_levels : list of sequences, or array (B, n_z) with 0 meaning "no event"
        Increasing positive z-levels per biomarker (events), e.g. ``[[1, 2, 3]] * B``.
    z_max : float or array (B,)
        Z-score reached at the final stage (above every biomarker's highest level).
    biomarkers : list of str, optional
        Biomarker names; default: the columns of the table passed to :meth:`fit`.
    max_subtypes : int
        Models with 1..max_subtypes subtypes are fitted (hierarchically).
    n_startpoints : int
        Random start points of every E-M stage (pySuStaIn's ``N_startpoints``).
    n_mcmc : int
        MCMC iterations per model after tuning.
    n_tune : int
        MCMC iterations spent tuning the proposals (3 passes).
    n_stage_samples : int
        Equally spaced MCMC samples averaged when staging subjects.
    seed : int, optional
        Everything random derives from it; results do not depend on ``n_jobs``.
    n_jobs, backend
        Parallel start points and chains (see :func:`neuroatrophy.parallel.parallel_map`).
    progress : callable, optional
        ``progress(fraction, message)``; may raise :class:`neuroatrophy.parallel.Cancelled`.

    Attributes
    ----------
    models_ : list of SustainModel
        ``models_[k - 1]`` has k subtypes.
    timings_ : dict
        Seconds spent in E-M and in total.
    """

    kind = "zscore"

    def __init__(self, z_levels, z_max, biomarkers=None, max_subtypes=3, n_startpoints=25, n_mcmc=100_000,
                 n_tune=10_000, n_stage_samples=1000, seed=None, n_jobs=None, backend=None, progress=None):
        super().__init__(max_subtypes, n_startpoints, n_mcmc, n_tune, n_stage_samples, seed, n_jobs, backend, progress)
        self.z_levels = z_levels
        self.z_max = z_max
        self.biomarkers = biomarkers

    def _extra_params(self) -> dict:
        return {"z_levels": self.z_levels, "z_max": self.z_max, "biomarkers": self.biomarkers}

    def _spec_for(self, X) -> EventSpec:
        names = self.biomarkers
        if names is None and isinstance(X, pd.DataFrame):
            names = [str(c) for c in X.columns]
        spec = event_spec(self.z_levels, self.z_max, names)
        if isinstance(X, pd.DataFrame) and self.biomarkers is None and X.shape[1] != spec.n_biomarkers:
            raise ValueError(f"the table has {X.shape[1]} columns but z_levels has {spec.n_biomarkers} biomarkers")
        return spec

    def fit(self, X) -> "ZScoreSustain":
        """Fit models with 1..max_subtypes subtypes to z-scores ``X`` (subjects x biomarkers)."""
        spec = self._spec_for(X)
        self.spec_ = spec
        return self._fit_engine(_Engine(_zscore_data(X, spec), spec))

    def predict(self, X, n_subtypes=None) -> pd.DataFrame:
        """Subtype and stage of every subject (see :meth:`SustainModel.stage`)."""
        return self.model(n_subtypes).stage(X)


class MixtureSustain(_BaseSustain):
    """Event-based (mixture) SuStaIn: pySuStaIn's ``MixtureSustain`` model.

    Each biomarker has one event; the data enter as event / no-event likelihoods
    ``L_yes``, ``L_no`` (subjects x biomarkers), e.g. from
    :func:`neuroatrophy.subtypes_input.mixture_likelihoods`. Same settings as
    :class:`ZScoreSustain`.
    """

    kind = "mixture"

    def __init__(self, biomarkers=None, max_subtypes=3, n_startpoints=25, n_mcmc=100_000, n_tune=10_000,
                 n_stage_samples=1000, seed=None, n_jobs=None, backend=None, progress=None):
        super().__init__(max_subtypes, n_startpoints, n_mcmc, n_tune, n_stage_samples, seed, n_jobs, backend, progress)
        self.biomarkers = biomarkers

    def _extra_params(self) -> dict:
        return {"biomarkers": self.biomarkers}

    def fit(self, L_yes, L_no) -> "MixtureSustain":
        names = self.biomarkers
        if names is None:
            names = [str(c) for c in L_yes.columns] if isinstance(L_yes, pd.DataFrame) else [
                f"Biomarker {b + 1}" for b in range(np.shape(L_yes)[1])]
        spec = mixture_spec(names)
        self.spec_ = spec
        return self._fit_engine(_Engine(_mixture_data(L_yes, L_no, spec), spec))

    def predict(self, L_yes, L_no, n_subtypes=None) -> pd.DataFrame:
        return self.model(n_subtypes).stage_likelihoods(L_yes, L_no)


# ---------------------------------------------------------------- cross-validation


@dataclass
class CVResult:
    """Cross-validation of the number of subtypes.

    ``table`` has one row per (fold, n_subtypes): ``test_loglik`` is the mean over MCMC
    samples of the test subjects' summed log-likelihood (pySuStaIn's
    ``loglike_matrix``). ``cvic[k] = -2 sum_j log mean_samples P(x_j | sample)`` over
    all test subjects (lower is better).

    :attr:`best_n_subtypes` is the *smallest* number of subtypes whose CVIC is within
    ``tolerance`` (default 10, on the deviance scale of AIC) of the lowest: an extra
    subtype that splits a real one in two barely changes CVIC, and the plain minimum
    then picks it about half of the time (pySuStaIn issues #56-#58, #83).
    :attr:`lowest_cvic` is the plain minimum.
    """

    table: pd.DataFrame
    cvic: pd.Series
    mean_test_loglik: pd.Series
    fold_models: list = field(default_factory=list)
    folds: list = field(default_factory=list)

    tolerance: float = 10.0

    @property
    def best_n_subtypes(self) -> int:
        within = self.cvic[self.cvic <= self.cvic.min() + self.tolerance]
        return int(within.index.min())

    @property
    def lowest_cvic(self) -> int:
        return int(self.cvic.idxmin())


def cross_validate(estimator, X, n_folds=5, stratify=None, seed=None, n_jobs=None, progress=None, L_no=None) -> CVResult:
    """Cross-validate models with 1..max_subtypes subtypes (folds in parallel).

    Parameters
    ----------
    estimator : ZScoreSustain or MixtureSustain
        Settings to use; it is not modified.
    X : DataFrame or array
        Z-scores (or L_yes with ``L_no`` for a mixture model).
    n_folds : int
        Number of folds (>= 2).
    stratify : array-like, optional
        Labels (e.g. diagnosis) to balance across folds.
    """
    if int(n_folds) != n_folds or n_folds < 2:
        raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    n = np.shape(X)[0]
    if n < 2 * n_folds:
        raise ValueError(f"{n} subjects are too few for {n_folds}-fold cross-validation")
    folds = _folds(n, int(n_folds), stratify, seed)
    params = estimator.get_params()
    base_seed = np.random.SeedSequence(seed if seed is not None else params.get("seed"))
    fold_seeds = base_seed.spawn(len(folds))
    fold_fraction = [0.0] * len(folds)
    lock = threading.Lock()

    def fold_progress(fold):
        if progress is None:
            return None

        def report(fraction, message):
            # parallel folds each report their own fraction: report the mean over folds
            with lock:
                fold_fraction[fold] = max(fold_fraction[fold], fraction)
                progress(sum(fold_fraction) / len(folds), f"fold {fold + 1}/{len(folds)}: {message}")
        return report

    def run_fold(args):
        i, (train, test), fseed = args
        kwargs = dict(params, n_jobs=1, progress=fold_progress(i), seed=int(fseed.generate_state(1)[0]))
        est = type(estimator)(**kwargs)
        rows = (lambda a, r: a.iloc[r] if isinstance(a, pd.DataFrame) else np.asarray(a)[r])
        if isinstance(est, MixtureSustain):
            est.fit(rows(X, train), rows(L_no, train))
        else:
            est.fit(rows(X, train))
        out = []
        for model in est.models_:
            ll = model.loglik_samples(rows(X, test), L_no=None if L_no is None else rows(L_no, test))
            out.append(ll)
        return est.models_, out

    results = parallel_map(run_fold, [(i, f, s) for i, (f, s) in enumerate(zip(folds, fold_seeds))],
                           n_jobs=n_jobs, backend=params.get("backend"))
    rows_, cvic, mean_ll = [], {}, {}
    for k in range(1, params["max_subtypes"] + 1):
        per_subject = []
        for fold, (_, lls) in enumerate(results):
            ll = lls[k - 1]
            rows_.append({"fold": fold + 1, "n_subtypes": k, "test_loglik": float(ll.sum(axis=1).mean()),
                          "n_test": ll.shape[1]})
            per_subject.append(_logmeanexp(ll, axis=0))
        cvic[k] = -2.0 * float(np.concatenate(per_subject).sum())
    table = pd.DataFrame(rows_)
    mean_ll = table.groupby("n_subtypes")["test_loglik"].mean()
    return CVResult(table, pd.Series(cvic, name="CVIC").rename_axis("n_subtypes"), mean_ll,
                    [r[0] for r in results], folds)


def _logmeanexp(a, axis):
    top = a.max(axis=axis, keepdims=True)
    return (top + np.log(np.mean(np.exp(a - top), axis=axis, keepdims=True))).squeeze(axis)


def _folds(n: int, n_folds: int, stratify, seed):
    rng = np.random.default_rng(seed)
    if stratify is None:
        order = rng.permutation(n)
        test_sets = np.array_split(order, n_folds)
    else:
        labels = np.asarray(stratify)
        if labels.shape[0] != n:
            raise ValueError(f"stratify has {labels.shape[0]} labels for {n} subjects")
        test_sets = [[] for _ in range(n_folds)]
        offset = 0
        for label in pd.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            for i, member in enumerate(members):
                test_sets[(i + offset) % n_folds].append(member)
            offset += members.size
        test_sets = [np.sort(np.asarray(t, dtype=np.int64)) for t in test_sets]
    all_idx = np.arange(n)
    return [(np.setdiff1d(all_idx, test), np.sort(test)) for test in test_sets]


# ---------------------------------------------------------------- reference


def reference_loglik(X, sequences, fractions, spec: EventSpec, linear: bool = False, L_no=None):
    """Log-likelihood straight from the model equations (numpy; tests and checks).

    ``linear=True`` evaluates the mixture in linear space as pySuStaIn does (and
    underflows where pySuStaIn does); otherwise log-sum-exp.
    """
    data = _zscore_data(X, spec) if L_no is None else _mixture_data(X, L_no, spec)
    N = spec.n_events
    K = len(sequences)
    M = data.n_subjects
    log_p = np.empty((M, N + 1, K))
    for c, seq in enumerate(np.asarray(sequences)):
        if L_no is None:
            mu = _reference_means(seq, spec)  # (B, N+1)
            resid = (data.X[:, :, None] - mu[:, None, :]) * data.W[:, :, None]
            log_p[:, :, c] = -0.5 * (resid**2).sum(axis=0)
        else:
            cum = np.concatenate([np.zeros((1, M)), np.cumsum(data.D[seq], axis=0)], axis=0)
            log_p[:, :, c] = (data.base[None, :] + cum).T
    log_p += data.const[:, None, None] + np.log(np.asarray(fractions, dtype=float))[None, None, :]
    if linear:
        return float(np.sum(np.log(np.exp(log_p).sum(axis=(1, 2)) + 1e-250)))
    top = log_p.max(axis=(1, 2))
    return float(np.sum(top + np.log(np.exp(log_p - top[:, None, None]).sum(axis=(1, 2)))))


def _reference_means(seq, spec: EventSpec) -> np.ndarray:
    """Trajectory means by direct interpolation (independent of the kernels)."""
    N = spec.n_events
    pos = np.empty(N, dtype=np.int64)
    pos[np.asarray(seq)] = np.arange(N)
    grid = np.arange(N + 2)
    mu = np.empty((spec.n_biomarkers, N + 1))
    for b in range(spec.n_biomarkers):
        events = spec.bio_events[b, : spec.bio_n[b]]
        xs = np.concatenate([[0], pos[events] + 1, [N + 1]])
        ys = np.concatenate([[0.0], spec.event_z[events], [spec.z_max[b]]])
        points = np.interp(grid, xs, ys)
        mu[b] = 0.5 * points[:-1] + 0.5 * points[1:]
    return mu
