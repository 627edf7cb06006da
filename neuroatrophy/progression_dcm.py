"""BrLP's auxiliary disease-course model (DCM): regional volumes at a target age.

BrLP (Puglisi et al., MICCAI 2024; MedIA 2025) conditions its diffusion model on five regional
volumes at the target age (``REGIONS``, min-max normalised). They come from a disease-course model
personalised on the subject's past visits:

* :class:`DiseaseCourseModel`: leaspy 2.x multivariate logistic models, one per diagnosis group
  (CN, MCI, AD; a subject belongs to the group of its last diagnosis), fitted with MCMC-SAEM and
  personalised with ``scipy_minimize`` exactly as BrLP's ``train_aux.py`` and ``cli.py`` do.
* :class:`LeaspyV1Logistic`: a standalone evaluator of leaspy **1.x** logistic JSON files, the format
  of BrLP's released ``dcm_cn.json``/``dcm_mci.json``/``dcm_ad.json`` that leaspy 2.x cannot read.
* :class:`RegressionCourse`: the single-visit fallback of the MedIA paper; a per-group linear model
  of the annual rate of change against age.
* :func:`predict_volumes`: one entry point choosing between them and applying BrLP's
  post-processing (undo the feature flip, per-region median correction, clip to [-0.2, 1.2]).

Conventions shared with BrLP: time is the age in years; every feature given to the logistic model
increases with time, so all volumes but the lateral ventricle enter as ``1 - x``; two visits of a
subject at the same age are separated by a tiny offset (BrLP adds ``months_to_screening / 1000``).
Unlike BrLP, observations are clipped to [0, 1] before fitting and personalising, the only values a
logistic curve can approach (a volume beyond the training range otherwise distorts the fit).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import uuid
import warnings
from collections.abc import Mapping
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import expit

from .io import atomic_write, replace_folder
from .progression_covariates import REGIONS, normalise_diagnosis

GROUPS = ("CN", "MCI", "AD")
# Cortex, hippocampus, amygdala and white matter shrink with age: BrLP models 1 - x for them.
FLIPPED_REGIONS = tuple(r for r in REGIONS if r != "lateral_ventricle")
CLIP_RANGE = (-0.2, 1.2)
SAME_AGE_OFFSET = 1e-3  # years added per repeated visit at the same age (BrLP: months / 1000)
FORMAT_VERSION = 1
METADATA_FILE = "dcm_metadata.json"
REGRESSION_KIND = "neuroatrophy.progression_regression"
DCM_KIND = "neuroatrophy.progression_dcm"
SOURCES = ("dcm", "dcm-v1", "regression")
_FLIP = np.array([r in FLIPPED_REGIONS for r in REGIONS])


# --------------------------------------------------------------------------------------------
# Input checks and BrLP's data conventions
# --------------------------------------------------------------------------------------------


def check_visits(visits, *, name: str = "visits", need_subject: bool = True, need_diagnosis: bool = False):
    """Validated copy of a visit table (one row per visit, normalised volumes).

    Parameters
    ----------
    visits : pandas.DataFrame
        Columns ``subject_id`` (unless ``need_subject`` is False), ``age`` (years), ``diagnosis``
        (when ``need_diagnosis``; CN/MCI/AD) and the five ``REGIONS`` (min-max normalised).
    name : str
        What the table is called in error messages.

    Returns
    -------
    pandas.DataFrame
        Rows sorted by subject and age (stable), ``age`` and regions as float, ``subject_id`` as str,
        ``diagnosis`` as ``"CN"``/``"MCI"``/``"AD"``.
    """
    if not isinstance(visits, pd.DataFrame):
        raise ValueError(f"{name} must be a pandas DataFrame (got {type(visits).__name__})")  # noqa: TRY004
    required = (["subject_id"] if need_subject else []) + ["age"]
    required += (["diagnosis"] if need_diagnosis else []) + list(REGIONS)
    missing = [c for c in required if c not in visits.columns]
    if missing:
        raise ValueError(f"{name} lacks column(s) {', '.join(missing)}")
    if len(visits) == 0:
        raise ValueError(f"{name} has no rows")
    out = visits.copy()
    if "subject_id" not in out.columns:
        out["subject_id"] = "subject"
    out["subject_id"] = out["subject_id"].astype(str)
    for column in ["age", *REGIONS]:
        values = pd.to_numeric(out[column], errors="coerce").astype(float)
        bad = ~np.isfinite(values.to_numpy())
        if bad.any():
            row = out.loc[bad].iloc[0]
            raise ValueError(
                f"{name}: column {column!r} has a missing or non-numeric value for subject "
                f"{row['subject_id']!r} (value {row[column]!r})"
            )
        out[column] = values
    young = out["age"] <= 1.5
    if young.any():
        row = out.loc[young].iloc[0]
        raise ValueError(
            f"{name}: age {row['age']} of subject {row['subject_id']!r} is not in years "
            "(BrLP's normalised ages age/100 must be multiplied by 100)"
        )
    far = (out[list(REGIONS)].abs() > 5.0).any(axis=1)
    if far.any():
        row = out.loc[far].iloc[0]
        raise ValueError(
            f"{name}: subject {row['subject_id']!r} has volumes far outside 0-1; give min-max "
            "normalised volumes (progression_covariates.normalise_volumes), not mm3"
        )
    if need_diagnosis:
        codes = []
        for subject, value in zip(out["subject_id"], out["diagnosis"]):
            try:
                codes.append(normalise_diagnosis(value))
            except ValueError:
                raise ValueError(
                    f"{name}: subject {subject!r} has unknown diagnosis {value!r} (expected CN, MCI or AD)"
                ) from None
        out["diagnosis"] = codes
    return out.sort_values(["subject_id", "age"], kind="stable").reset_index(drop=True)


def visit_times(ages) -> np.ndarray:
    """Model times of one subject's visits (sorted ages): repeated ages get +1e-3 years each."""
    ages = np.asarray(ages, dtype=float)
    times = ages.copy()
    for i in range(1, len(ages)):
        if times[i] <= times[i - 1]:
            times[i] = times[i - 1] + SAME_AGE_OFFSET
    return times


def flip_features(values) -> np.ndarray:
    """Volumes (..., 5) in ``REGIONS`` order to increasing model features, and back (an involution)."""
    values = np.array(values, dtype=float)
    values[..., _FLIP] = 1.0 - values[..., _FLIP]
    return values


def model_features(volumes) -> np.ndarray:
    """Logistic-model observations from normalised volumes: flipped and clipped to [0, 1].

    A logistic curve never leaves (0, 1); a volume outside the training range (normalised value
    below 0 or above 1) cannot be fitted and would drive the subject's sources to extremes.
    """
    return np.clip(flip_features(volumes), 0.0, 1.0)


def last_diagnosis(visits: pd.DataFrame) -> pd.Series:
    """Each subject's diagnosis at its last visit (BrLP's grouping), indexed by ``subject_id``."""
    return visits.sort_values(["subject_id", "age"], kind="stable").groupby("subject_id")["diagnosis"].last()


def _group_key(diagnosis) -> str:
    try:
        return normalise_diagnosis(diagnosis)
    except ValueError:
        raise ValueError(f"diagnosis must be one of CN, MCI, AD (got {diagnosis!r})") from None


def _target_ages(target_ages) -> np.ndarray:
    ages = np.atleast_1d(np.asarray(target_ages, dtype=float))
    if ages.ndim != 1 or len(ages) == 0:
        raise ValueError("target_ages must be a non-empty sequence of ages in years")
    if not np.all(np.isfinite(ages)) or np.any(ages <= 1.5) or np.any(ages >= 130):
        raise ValueError(f"target_ages must be ages in years (got {ages.tolist()})")
    return ages


def _one_subject(visits, name="visits of the subject") -> pd.DataFrame:
    table = check_visits(visits, name=name, need_subject=False)
    if table["subject_id"].nunique() > 1:
        raise ValueError(
            f"{name} must hold one subject (found {table['subject_id'].nunique()}: "
            f"{', '.join(table['subject_id'].unique()[:5])})"
        )
    return table


def _volume_frame(values, ages, source: str | None = None) -> pd.DataFrame:
    index = pd.Index(ages, name="target_age")
    frame = pd.DataFrame(np.asarray(values, dtype=float), columns=list(REGIONS), index=index)
    if source is not None:
        frame["source"] = source
    return frame


# --------------------------------------------------------------------------------------------
# leaspy 1.x logistic model files (BrLP's released DCMs)
# --------------------------------------------------------------------------------------------


class LeaspyV1Logistic:
    """Evaluator of a leaspy 1.x multivariate logistic model (``"name": "logistic"`` JSON file).

    For subject parameters (tau, xi, sources) the model value of feature k at time t is::

        g_k = exp(G_k)        v_k = exp(V_k)        b_k = (1 + g_k)^2 / g_k
        w = A s               r(t) = exp(xi) (t - tau)
        y_k(t) = 1 / (1 + g_k exp(-b_k (v_k r(t) + w_k)))

    where ``G`` and ``V`` are the file's ``g`` and ``v0`` (log scale) and the mixing matrix ``A`` is
    ``Q @ betas``; ``Q`` is the Householder basis, all columns but the first, of the orthogonal
    complement of ``M v`` with the metric ``M_k = (1 + g_k)^4 / g_k^2`` (leaspy 1.x
    ``LogisticAttributes``). Subject parameters have Gaussian priors (``tau_mean``, ``tau_std``,
    ``xi_mean``, ``xi_std``, ``sources_mean``, ``sources_std``) and observations Gaussian noise
    ``noise_std`` (one value, or one per feature).

    Build it with :meth:`from_json` (or :meth:`from_dict`).
    """

    REQUIRED = ("g", "v0", "tau_mean", "tau_std", "xi_mean", "xi_std", "noise_std")

    def __init__(self, features, log_g, log_v0, betas, tau_mean, tau_std, xi_mean, xi_std,
                 noise_std, sources_mean=0.0, sources_std=1.0, source=None):
        self.source = source
        self.features = tuple(str(f) for f in features)
        self.log_g = np.asarray(log_g, dtype=float).reshape(-1)
        self.log_v0 = np.asarray(log_v0, dtype=float).reshape(-1)
        d = len(self.features)
        self.betas = np.asarray(betas, dtype=float).reshape(d - 1, -1) if betas is not None else np.zeros((d - 1, 0))
        self.tau_mean, self.tau_std = float(tau_mean), float(tau_std)
        self.xi_mean, self.xi_std = float(xi_mean), float(xi_std)
        self.sources_mean, self.sources_std = float(sources_mean), float(sources_std)
        self.noise_std = np.broadcast_to(np.asarray(noise_std, dtype=float), (d,)).copy()
        self._check()
        self.mixing_matrix = self._orthonormal_basis() @ self.betas

    @property
    def dimension(self) -> int:
        return len(self.features)

    @property
    def source_dimension(self) -> int:
        return self.betas.shape[1]

    def _where(self) -> str:
        return f" in {self.source}" if self.source else ""

    def _check(self):
        d = self.dimension
        if d < 2:
            raise ValueError(f"a multivariate logistic model needs at least 2 features{self._where()}")
        for name, array in (("g", self.log_g), ("v0", self.log_v0)):
            if array.shape != (d,) or not np.all(np.isfinite(array)):
                raise ValueError(f"parameter {name!r}{self._where()} must be {d} finite numbers (one per feature)")
        for name in ("tau_std", "xi_std", "sources_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"parameter {name!r}{self._where()} must be positive")
        if not np.all(self.noise_std > 0):
            raise ValueError(f"parameter 'noise_std'{self._where()} must be positive")

    def _orthonormal_basis(self) -> np.ndarray:
        # Householder reflection sending e_0 to the direction of M v; its other columns span the
        # complement (leaspy 1.x ``_compute_Q`` with ``strip_col=0``).
        g = np.exp(self.log_g)
        direction = (1.0 + g) ** 4 / g**2 * np.exp(self.log_v0)
        alpha = -np.sign(direction[0]) * np.linalg.norm(direction)
        u = direction.copy()
        u[0] -= alpha
        u /= np.linalg.norm(u)
        q = np.eye(self.dimension) - 2.0 * np.outer(u, u)
        return q[:, 1:]

    @classmethod
    def from_json(cls, path) -> LeaspyV1Logistic:
        """Read a leaspy 1.x logistic model file (e.g. BrLP's ``dcm_mci.json``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"leaspy model file not found: {path}")
        try:
            settings = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a readable JSON model file: {error}") from None
        return cls.from_dict(settings, source=str(path))

    @classmethod
    def from_dict(cls, settings: Mapping, source: str | None = None) -> LeaspyV1Logistic:
        """Build from the content of a leaspy 1.x model file."""
        where = source or "the leaspy model settings"
        if not isinstance(settings, Mapping) or "parameters" not in settings or "name" not in settings:
            raise ValueError(f"{where} is not a leaspy model file (needs 'name' and 'parameters')")
        version = str(settings.get("leaspy_version", ""))
        if not version:
            raise ValueError(f"{where} has no 'leaspy_version'; files from leaspy < 1.1 are not supported")
        if not version.startswith("1."):
            raise ValueError(
                f"{where} was written by leaspy {version}; this evaluator reads leaspy 1.x files "
                "(load leaspy 2.x models with DiseaseCourseModel.load)"
            )
        name = str(settings["name"]).lower()
        if name != "logistic":
            raise ValueError(
                f"{where} holds a leaspy {name!r} model; only the multivariate 'logistic' model is supported"
            )
        noise = str(settings.get("noise_model", settings.get("loss", "gaussian_diagonal")))
        if noise not in ("gaussian_scalar", "gaussian_diagonal", "MSE", "MSE_diag_noise"):
            raise ValueError(f"{where}: noise model {noise!r} is not supported (Gaussian noise only)")
        params = settings["parameters"]
        missing = [k for k in cls.REQUIRED if params.get(k) is None]
        source_dimension = int(settings.get("source_dimension", 0) or 0)
        if source_dimension > 0 and params.get("betas") is None:
            missing.append("betas")
        if missing:
            raise ValueError(f"{where} lacks model parameter(s) {', '.join(missing)}")
        dimension = len(np.atleast_1d(params["g"]))
        features = settings.get("features") or [f"feature_{k}" for k in range(dimension)]
        if len(features) != dimension or int(settings.get("dimension", dimension)) != dimension:
            raise ValueError(f"{where}: 'features'/'dimension' do not match the {dimension} values of 'g'")
        betas = np.asarray(params["betas"], dtype=float) if source_dimension > 0 else None
        if betas is not None and betas.shape != (dimension - 1, source_dimension):
            raise ValueError(
                f"{where}: 'betas' has shape {betas.shape}, expected {(dimension - 1, source_dimension)} "
                "(dimension - 1, source_dimension)"
            )
        try:
            model = cls(
                features, params["g"], params["v0"], betas, params["tau_mean"], params["tau_std"],
                params["xi_mean"], params["xi_std"], params["noise_std"],
                params.get("sources_mean", 0.0), params.get("sources_std", 1.0), source=source,
            )
        except (TypeError, ValueError) as error:
            message = str(error)
            raise ValueError(message if source and source in message else f"{where}: {message}") from None
        stored = params.get("mixing_matrix")
        if stored is not None and source_dimension > 0:
            stored = np.asarray(stored, dtype=float)
            same = stored.shape == model.mixing_matrix.shape and np.allclose(
                stored, model.mixing_matrix, atol=1e-4, rtol=1e-3)
            if not same:
                warnings.warn(
                    f"{where}: the stored mixing_matrix differs from the one leaspy 1.x derives from "
                    "g, v0 and betas (leaspy ignores the stored one; so does this evaluator)",
                    stacklevel=2,
                )
        return model

    # -- model values ------------------------------------------------------------------------

    def _sources(self, sources) -> np.ndarray:
        s = np.zeros(self.source_dimension) if sources is None else np.asarray(sources, dtype=float).reshape(-1)
        if s.shape != (self.source_dimension,):
            raise ValueError(f"sources must have {self.source_dimension} values (got {s.size}){self._where()}")
        return s

    def _terms(self, times, tau, xi, sources):
        times = np.atleast_1d(np.asarray(times, dtype=float))
        g = np.exp(self.log_g)
        v = np.exp(self.log_v0)
        b = (1.0 + g) ** 2 / g
        w = self.mixing_matrix @ self._sources(sources)
        r = math.exp(xi) * (times - tau)
        y = expit(b * (np.outer(r, v) + w) - self.log_g)  # = 1 / (1 + g exp(-b (v r + w)))
        return times, g, v, b, r, y

    def estimate(self, times, tau: float, xi: float, sources=None) -> np.ndarray:
        """Model values ``(n_times, n_features)`` of one subject at ``times``."""
        return self._terms(times, float(tau), float(xi), sources)[-1]

    def mean_trajectory(self, times) -> np.ndarray:
        """Values of the average subject (tau_mean, xi_mean, sources at their mean)."""
        sources = np.full(self.source_dimension, self.sources_mean)
        return self.estimate(times, self.tau_mean, self.xi_mean, sources)

    # -- personalisation (leaspy 1.x ``scipy_minimize``) ---------------------------------------

    def _objective(self, z, times, values, observed):
        xi, tau = z[0] * self.xi_std, z[1] * self.tau_std
        s = z[2:] * self.sources_std
        _, _, v, b, r, y = self._terms(times, tau, xi, s)
        diff = np.where(observed, y - values, 0.0)
        weights = 1.0 / self.noise_std**2
        # Negative log posterior without constants: attachment + Gaussian priors (leaspy 1.x).
        attachment = 0.5 * np.sum(weights * diff**2)
        prior = 0.5 * (((xi - self.xi_mean) / self.xi_std) ** 2 + ((tau - self.tau_mean) / self.tau_std) ** 2)
        prior += 0.5 * np.sum(((s - self.sources_mean) / self.sources_std) ** 2)
        c = weights * diff * y * (1.0 - y) * b  # d(attachment)/d(exponent argument)
        alpha = math.exp(xi)
        grad_xi = np.sum(c * np.outer(r, v))
        grad_tau = np.sum(c * (-alpha * v)[None, :])
        grad_s = self.mixing_matrix.T @ c.sum(axis=0)
        gradient = np.concatenate([
            [(grad_xi + (xi - self.xi_mean) / self.xi_std**2) * self.xi_std,
             (grad_tau + (tau - self.tau_mean) / self.tau_std**2) * self.tau_std],
            (grad_s + (s - self.sources_mean) / self.sources_std**2) * self.sources_std,
        ])
        return attachment + prior, gradient

    def personalize(self, times, values) -> dict:
        """Maximum a posteriori subject parameters from one subject's observations.

        Minimises the Gaussian negative log-likelihood plus the Gaussian priors of tau, xi and the
        sources over the standardised parameters, starting from the population means, with BFGS
        (gtol 1e-2, 200 iterations) and the exact gradient: leaspy 1.x ``scipy_minimize``.

        Parameters
        ----------
        times : array-like (n_visits,)
            Visit times (years).
        values : array-like (n_visits, n_features)
            Observed model features; NaN marks a missing value.

        Returns
        -------
        dict
            ``tau`` (float), ``xi`` (float), ``sources`` (ndarray (source_dimension,)).
        """
        times = np.atleast_1d(np.asarray(times, dtype=float))
        values = np.asarray(values, dtype=float).reshape(len(times), -1)
        if values.shape[1] != self.dimension:
            raise ValueError(f"values must have {self.dimension} columns ({', '.join(self.features)}){self._where()}")
        if not np.all(np.isfinite(times)):
            raise ValueError("times must be finite")
        observed = np.isfinite(values)
        if not observed.any():
            raise ValueError("no observed value to personalise the model on")
        values = np.where(observed, values, 0.0)
        z0 = np.concatenate([[self.xi_mean / self.xi_std, self.tau_mean / self.tau_std],
                             np.zeros(self.source_dimension)])
        result = minimize(self._objective, z0, args=(times, values, observed), jac=True,
                          method="BFGS", options={"gtol": 1e-2, "maxiter": 200})
        z = result.x
        return {"tau": float(z[1] * self.tau_std), "xi": float(z[0] * self.xi_std),
                "sources": np.asarray(z[2:] * self.sources_std, dtype=float)}


def load_brlp_dcms(paths: Mapping) -> dict:
    """BrLP's released DCMs, ``{"cn": path, "mci": path, "ad": path}`` -> ``{"CN": LeaspyV1Logistic, ...}``.

    Each file must model the five ``REGIONS`` (BrLP's ``CONDITIONING_REGIONS``) in BrLP's order.
    """
    models = {}
    for key, path in paths.items():
        group = _group_key(key)
        if path is None:
            continue
        model = LeaspyV1Logistic.from_json(path)
        if model.features != REGIONS:
            raise ValueError(
                f"{path}: features {list(model.features)} are not BrLP's regions {list(REGIONS)}"
            )
        models[group] = model
    if not models:
        raise ValueError("no DCM file given (expected keys cn, mci, ad)")
    return models


# --------------------------------------------------------------------------------------------
# leaspy 2.x disease-course models
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_leaspy():
    """Silence leaspy's prints and warnings and keep the caller's random states.

    leaspy prints timings and reseeds ``random``, ``numpy`` and ``torch`` globally.
    """
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        with contextlib.redirect_stdout(StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _leaspy_frame(table: pd.DataFrame) -> pd.DataFrame:
    """BrLP's leaspy input: (ID, TIME) index, flipped features named after ``REGIONS``."""
    parts = []
    for subject, rows in table.groupby("subject_id", sort=True):
        features = model_features(rows[list(REGIONS)].to_numpy())
        times = visit_times(rows["age"].to_numpy())
        index = pd.MultiIndex.from_arrays([[subject] * len(rows), times], names=["ID", "TIME"])
        parts.append(pd.DataFrame(features, index=index, columns=list(REGIONS)))
    return pd.concat(parts)


def _reloaded(model):
    """The model as its saved file defines it.

    Right after a leaspy 2.1 fit, some derived quantities still come from the last MCMC state, so
    personalising the fitted model and the same model reloaded from its file differ slightly
    (~1e-4); rebuilding it from its own file makes fit-then-predict equal save-load-predict.
    """
    import tempfile

    from leaspy.models import LogisticModel

    with tempfile.TemporaryDirectory(prefix="neuroatrophy-dcm-") as folder:
        path = str(Path(folder) / "model.json")
        model.save(path)
        return LogisticModel.load(path)


class DiseaseCourseModel:
    """BrLP's disease-course models on leaspy 2.x: one logistic model per diagnosis group.

    Examples
    --------
    >>> dcm = DiseaseCourseModel().fit(visits, n_iter=5000, seed=64)   # doctest: +SKIP
    >>> dcm.predict(subject_visits, [72, 74], "MCI")                   # doctest: +SKIP
    """

    def __init__(self):
        self.models_: dict = {}
        self.groups_: dict = {}
        self.settings_: dict = {}

    @property
    def groups(self) -> tuple:
        return tuple(g for g in GROUPS if g in self.models_)

    def fit(self, visits: pd.DataFrame, n_iter: int = 5000, seed: int = 64, source_dimension: int = 4,
            progress=None, min_subjects: int = 5) -> DiseaseCourseModel:
        """Fit one leaspy logistic model (MCMC-SAEM) per diagnosis group present in ``visits``.

        Parameters
        ----------
        visits : pandas.DataFrame
            ``subject_id``, ``age`` (years), ``diagnosis`` (CN/MCI/AD) and the ``REGIONS``
            (min-max normalised). A subject is fitted in the group of its last diagnosis.
        n_iter, seed : int
            MCMC-SAEM iterations and seed (BrLP: 5000, 64).
        source_dimension : int
            Number of sources (BrLP: 4; at most 4 with five features).
        progress : callable(fraction, message) or None
            Called after each group; raising ``neuroatrophy.parallel.Cancelled`` stops the fit.
        min_subjects : int
            Fewest subjects a group may have.
        """
        from leaspy.io.data import Data
        from leaspy.models import LogisticModel

        if not 0 <= int(source_dimension) < len(REGIONS):
            raise ValueError(f"source_dimension must be in 0..{len(REGIONS) - 1} (got {source_dimension})")
        if int(n_iter) < 1:
            raise ValueError(f"n_iter must be positive (got {n_iter})")
        table = check_visits(visits, need_diagnosis=True)
        groups = last_diagnosis(table)
        present = [g for g in GROUPS if (groups == g).any()]
        for group in present:
            n = int((groups == group).sum())
            if n < min_subjects:
                raise ValueError(
                    f"diagnosis group {group} has {n} subject(s) (by last diagnosis); at least "
                    f"{min_subjects} are needed to fit its disease-course model"
                )
        models, info = {}, {}
        for k, group in enumerate(present):
            subjects = groups.index[groups == group]
            rows = table[table["subject_id"].isin(subjects)]
            model = LogisticModel(name=f"dcm_{group.lower()}", source_dimension=int(source_dimension))
            with _quiet_leaspy():
                model.fit(Data.from_dataframe(_leaspy_frame(rows)), "mcmc_saem", n_iter=int(n_iter),
                          seed=int(seed), progress_bar=False)
                models[group] = _reloaded(model)
            info[group] = {"n_subjects": len(subjects), "n_visits": len(rows),
                           "age_range": [float(rows["age"].min()), float(rows["age"].max())]}
            if progress is not None:
                progress((k + 1) / len(present), f"fitted the {group} disease-course model")
        self.models_, self.groups_ = models, info
        self.settings_ = {"n_iter": int(n_iter), "seed": int(seed), "source_dimension": int(source_dimension)}
        return self

    def _model(self, diagnosis):
        group = _group_key(diagnosis)
        if group not in self.models_:
            available = ", ".join(self.groups) or "none (fit or load first)"
            raise ValueError(f"no disease-course model for diagnosis {group} (available: {available})")
        return self.models_[group]

    def _personalised(self, visits, diagnosis):
        """The group model and leaspy's individual parameters of the subject (id ``"subject"``)."""
        from leaspy.io.data import Data

        model = self._model(diagnosis)
        frame = _leaspy_frame(_one_subject(visits).assign(subject_id="subject"))
        with _quiet_leaspy():
            ip = model.personalize(Data.from_dataframe(frame), "scipy_minimize", seed=0, progress_bar=False)
        return model, ip

    def personalize(self, visits: pd.DataFrame, diagnosis) -> dict:
        """Subject parameters (tau, xi, sources) of the ``diagnosis`` model from one subject's visits."""
        _, ip = self._personalised(visits, diagnosis)
        params = ip["subject"]
        return {"tau": float(np.ravel(params["tau"])[0]), "xi": float(np.ravel(params["xi"])[0]),
                "sources": np.asarray(params.get("sources", []), dtype=float).reshape(-1)}

    def predict(self, visits: pd.DataFrame, target_ages, diagnosis) -> pd.DataFrame:
        """Normalised volumes at ``target_ages`` from the ``diagnosis`` model personalised on ``visits``.

        Returns a DataFrame indexed by target age with the ``REGIONS`` columns, the flip undone and no
        other correction (:func:`predict_volumes` adds BrLP's median correction and clipping).
        """
        ages = _target_ages(target_ages)
        model, ip = self._personalised(visits, diagnosis)
        with _quiet_leaspy():
            estimates = model.estimate({"subject": ages.tolist()}, ip)["subject"]
        return _volume_frame(flip_features(estimates), ages)

    def save(self, folder) -> Path:
        """Write one leaspy JSON per group plus ``dcm_metadata.json`` into ``folder`` (replaced whole)."""
        if not self.models_:
            raise ValueError("the disease-course model is not fitted")
        import leaspy

        folder = Path(folder)
        if not folder.parent.is_dir():
            raise FileNotFoundError(f"Output folder does not exist: {folder.parent} (for {folder.name})")
        staging = folder.parent / f".{folder.name}-tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            files = {}
            for group, model in self.models_.items():
                files[group] = f"dcm_{group.lower()}.json"
                model.save(str(staging / files[group]))
            metadata = {
                "format_version": FORMAT_VERSION, "kind": DCM_KIND, "leaspy_version": leaspy.__version__,
                "regions": list(REGIONS), "flipped_regions": list(FLIPPED_REGIONS), "time": "age in years",
                "same_age_offset": SAME_AGE_OFFSET, "settings": self.settings_,
                "groups": {g: {"file": files[g], **self.groups_.get(g, {})} for g in self.groups},
            }
            (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
            replace_folder(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return folder

    @classmethod
    def load(cls, folder) -> DiseaseCourseModel:
        """Read a folder written by :meth:`save`."""
        from leaspy.models import LogisticModel

        folder = Path(folder)
        meta_path = folder / METADATA_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"not a disease-course model folder (no {METADATA_FILE}): {folder}")
        try:
            metadata = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{meta_path} is not readable JSON: {error}") from None
        if metadata.get("kind") != DCM_KIND or metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: unsupported disease-course model (kind {metadata.get('kind')!r}, "
                f"format_version {metadata.get('format_version')!r}; expected {DCM_KIND!r} {FORMAT_VERSION})"
            )
        if metadata.get("regions") != list(REGIONS):
            raise ValueError(f"{meta_path}: regions {metadata.get('regions')} are not {list(REGIONS)}")
        out = cls()
        for group, info in metadata.get("groups", {}).items():
            path = folder / str(info.get("file", ""))
            if not path.is_file():
                raise FileNotFoundError(f"disease-course model file of group {group} is missing: {path}")
            try:
                with _quiet_leaspy():
                    model = LogisticModel.load(str(path))
            except Exception as error:  # noqa: BLE001 - leaspy raises many types of its own
                raise ValueError(f"{path}: cannot load the leaspy logistic model: {error}") from None
            if list(model.features) != list(REGIONS):
                raise ValueError(f"{path}: features {list(model.features)} are not {list(REGIONS)}")
            out.models_[_group_key(group)] = model
            out.groups_[_group_key(group)] = {k: v for k, v in info.items() if k != "file"}
        if not out.models_:
            raise ValueError(f"{meta_path} lists no diagnosis group")
        out.settings_ = dict(metadata.get("settings", {}))
        return out


# --------------------------------------------------------------------------------------------
# Single-visit fallback: regression of the annual rate of change on age
# --------------------------------------------------------------------------------------------


class RegressionCourse:
    """Per diagnosis group and region, the annual rate of change as a linear function of age.

    Fitted on subjects with at least two visits at distinct ages: each subject's least-squares slope
    of the normalised volume against age (per year) is regressed on the subject's mean age. A
    subject's volume at age T is its last value plus the integral of the rate from its last age
    ``a`` to ``T``: ``x(T) = x(a) + c0 (T - a) + c1 (T^2 - a^2) / 2``.
    """

    def __init__(self):
        self.coefficients_: dict = {}  # group -> {region: (c0, c1)}
        self.residual_sd_: dict = {}   # group -> {region: SD of the subjects' rates around the line}
        self.groups_: dict = {}

    @property
    def groups(self) -> tuple:
        return tuple(g for g in GROUPS if g in self.coefficients_)

    def fit(self, visits: pd.DataFrame, min_subjects: int = 3) -> RegressionCourse:
        """Fit the rate models of every diagnosis group (subjects grouped by last diagnosis)."""
        table = check_visits(visits, need_diagnosis=True)
        groups = last_diagnosis(table)
        slopes = {}
        for subject, rows in table.groupby("subject_id", sort=True):
            ages = rows["age"].to_numpy()
            if np.ptp(ages) <= 0:
                continue
            values = rows[list(REGIONS)].to_numpy()
            centred = ages - ages.mean()  # least-squares slope of each region against age
            slopes[subject] = (ages.mean(), centred @ (values - values.mean(axis=0)) / (centred @ centred))
        present = [g for g in GROUPS if (groups == g).any()]
        coefficients, residual_sd, info = {}, {}, {}
        for group in present:
            members = [s for s in groups.index[groups == group] if s in slopes]
            if len(members) < min_subjects:
                raise ValueError(
                    f"diagnosis group {group} has {len(members)} subject(s) with two or more visits at "
                    f"different ages; at least {min_subjects} are needed to fit the regression fallback"
                )
            mean_age = np.array([slopes[s][0] for s in members])
            rates = np.array([slopes[s][1] for s in members])  # (n, regions)
            design = np.column_stack([np.ones_like(mean_age), mean_age])
            coef, *_ = np.linalg.lstsq(design, rates, rcond=None)  # (2, regions)
            dof = max(len(members) - 2, 1)
            sd = np.sqrt(np.sum((rates - design @ coef) ** 2, axis=0) / dof)
            coefficients[group] = {r: (float(coef[0, j]), float(coef[1, j])) for j, r in enumerate(REGIONS)}
            residual_sd[group] = {r: float(sd[j]) for j, r in enumerate(REGIONS)}
            info[group] = {"n_subjects": len(members), "age_range": [float(mean_age.min()), float(mean_age.max())]}
        if not coefficients:
            raise ValueError("visits hold no diagnosis group to fit")
        self.coefficients_, self.residual_sd_, self.groups_ = coefficients, residual_sd, info
        return self

    def rate(self, ages, diagnosis) -> pd.DataFrame:
        """Annual rate of change of each normalised volume at ``ages`` (DataFrame, ages x REGIONS)."""
        coef = self._coefficients(diagnosis)
        ages = np.atleast_1d(np.asarray(ages, dtype=float))
        values = np.column_stack([coef[r][0] + coef[r][1] * ages for r in REGIONS])
        return pd.DataFrame(values, index=pd.Index(ages, name="age"), columns=list(REGIONS))

    def _coefficients(self, diagnosis) -> dict:
        group = _group_key(diagnosis)
        if group not in self.coefficients_:
            available = ", ".join(self.groups) or "none (fit or load first)"
            raise ValueError(f"no regression model for diagnosis {group} (available: {available})")
        return self.coefficients_[group]

    def predict(self, visits: pd.DataFrame, target_ages, diagnosis) -> pd.DataFrame:
        """Normalised volumes at ``target_ages`` from the subject's last visit (DataFrame, ages x REGIONS)."""
        coef = self._coefficients(diagnosis)
        ages = _target_ages(target_ages)
        last = _one_subject(visits).iloc[-1]
        a = float(last["age"])
        values = np.column_stack([
            float(last[r]) + coef[r][0] * (ages - a) + coef[r][1] * (ages**2 - a**2) / 2.0 for r in REGIONS
        ])
        return _volume_frame(values, ages)

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION, "kind": REGRESSION_KIND, "regions": list(REGIONS),
            "groups": {g: {"intercept": {r: c[0] for r, c in self.coefficients_[g].items()},
                           "age_slope": {r: c[1] for r, c in self.coefficients_[g].items()},
                           "residual_sd": self.residual_sd_[g], **self.groups_.get(g, {})}
                       for g in self.groups},
        }

    def save(self, path) -> Path:
        """Write the model as JSON (atomically)."""
        if not self.coefficients_:
            raise ValueError("the regression model is not fitted")
        path = Path(path)
        with atomic_write(path) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path) -> RegressionCourse:
        """Read a JSON file written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"regression model file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not readable JSON: {error}") from None
        if data.get("kind") != REGRESSION_KIND or data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a regression course model (format_version {FORMAT_VERSION})")
        out = cls()
        try:
            for group, entry in data["groups"].items():
                key = _group_key(group)
                out.coefficients_[key] = {
                    r: (float(entry["intercept"][r]), float(entry["age_slope"][r])) for r in REGIONS
                }
                out.residual_sd_[key] = {r: float(entry["residual_sd"][r]) for r in REGIONS}
                fitted = ("intercept", "age_slope", "residual_sd")
                out.groups_[key] = {k: v for k, v in entry.items() if k not in fitted}
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: incomplete regression model ({error!r})") from None
        if not out.coefficients_:
            raise ValueError(f"{path} lists no diagnosis group")
        return out


# --------------------------------------------------------------------------------------------
# One entry point
# --------------------------------------------------------------------------------------------


def correct_and_clip(volumes: pd.DataFrame, median_corrections: Mapping | None = None,
                     clip=CLIP_RANGE) -> pd.DataFrame:
    """BrLP's post-processing of DCM estimates: ``x <- (x - q) / m`` per region, then clip.

    ``median_corrections`` maps region -> ``(m, q)`` (BrLP's ``confs.yaml``); None skips it.
    """
    out = volumes.copy()
    if median_corrections:
        missing = [r for r in REGIONS if r not in median_corrections]
        if missing:
            raise ValueError(f"median_corrections lacks {', '.join(missing)}")
        for region in REGIONS:
            m, q = (float(v) for v in median_corrections[region])
            if m == 0 or not math.isfinite(m) or not math.isfinite(q):
                raise ValueError(f"median_corrections[{region!r}] must be finite (m, q) with m != 0 (got {(m, q)})")
            out[region] = (out[region] - q) / m
    if clip is not None:
        out[list(REGIONS)] = out[list(REGIONS)].clip(clip[0], clip[1])
    return out


def _v1_predict(models: Mapping, visits: pd.DataFrame, ages: np.ndarray, diagnosis) -> pd.DataFrame:
    group = _group_key(diagnosis)
    keyed = {_group_key(k): m for k, m in models.items()}
    if group not in keyed:
        raise ValueError(f"no disease-course model for diagnosis {group} (available: {', '.join(keyed) or 'none'})")
    model = keyed[group]
    if model.features != REGIONS:
        raise ValueError(f"the {group} DCM models {list(model.features)}, not {list(REGIONS)}")
    table = _one_subject(visits)
    params = model.personalize(visit_times(table["age"].to_numpy()), model_features(table[list(REGIONS)].to_numpy()))
    return _volume_frame(flip_features(model.estimate(ages, **params)), ages)


def predict_volumes(visits: pd.DataFrame, target_ages, diagnosis, dcm=None, regression=None,
                    median_corrections: Mapping | None = None, method: str = "auto") -> pd.DataFrame:
    """Normalised regional volumes of one subject at ``target_ages``.

    Parameters
    ----------
    visits : pandas.DataFrame
        The subject's visits: ``age`` (years) and the ``REGIONS`` (min-max normalised).
    target_ages : sequence of float
    diagnosis : str
        Picks the group model (BrLP's ``--target_diagnosis``): CN, MCI or AD.
    dcm : DiseaseCourseModel or mapping {diagnosis: LeaspyV1Logistic}, optional
        leaspy 2.x models or BrLP's released 1.x models (:func:`load_brlp_dcms`).
    regression : RegressionCourse, optional
    median_corrections : mapping region -> (m, q), optional
        Applied to DCM estimates only (they calibrate the DCM), before clipping.
    method : {"auto", "dcm", "regression"}
        ``auto``: the DCM for two or more visits, the regression for one visit, the DCM personalised
        on the single visit when there is no regression model (what BrLP's CLI always does).

    Returns
    -------
    pandas.DataFrame
        Indexed by target age; ``REGIONS`` columns clipped to [-0.2, 1.2] and ``source``
        (``"dcm"``, ``"dcm-v1"`` or ``"regression"``).
    """
    if method not in ("auto", "dcm", "regression"):
        raise ValueError(f"method must be 'auto', 'dcm' or 'regression' (got {method!r})")
    if dcm is not None and not isinstance(dcm, (DiseaseCourseModel, Mapping)):
        raise ValueError(f"dcm must be a DiseaseCourseModel or a dict of LeaspyV1Logistic (got {type(dcm).__name__})")
    table = _one_subject(visits)
    ages = _target_ages(target_ages)
    _group_key(diagnosis)
    n_visits = table["age"].nunique()
    if method == "auto":
        if dcm is not None and (n_visits >= 2 or regression is None):
            method = "dcm"
        elif regression is not None:
            method = "regression"
        else:
            raise ValueError("predict_volumes needs a disease-course model (dcm) or a regression model")
    if method == "regression":
        if regression is None:
            raise ValueError("method 'regression' needs a RegressionCourse (regression=...)")
        return correct_and_clip(regression.predict(table, ages, diagnosis)).assign(source="regression")
    if dcm is None:
        raise ValueError("method 'dcm' needs a disease-course model (dcm=...)")
    if isinstance(dcm, DiseaseCourseModel):
        raw, source = dcm.predict(table, ages, diagnosis), "dcm"
    else:
        raw, source = _v1_predict(dcm, table, ages, diagnosis), "dcm-v1"
    return correct_and_clip(raw, median_corrections).assign(source=source)
