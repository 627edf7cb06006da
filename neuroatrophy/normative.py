"""Normative models: Bayesian linear regression fitted for all responses at once.

A normative model describes how a measure (cortical thickness at each vertex, or
in each region) varies with age, sex and site in healthy controls, and scores
new subjects by how far they deviate from that range (z-scores, centiles).

The model is the one of PCNtoolkit's BLR (Bishop 2006, ch. 3; Fraza et al. 2021):

* design: intercept, age, a cubic B-spline of age, sex and site fixed effects
  (:class:`~neuroatrophy.basis.DesignSpec`);
* ``y = Phi w + noise`` with prior ``w ~ N(0, 1/alpha I)`` and noise precision
  ``beta`` (homoskedastic) or ``exp(Psi eta)`` (heteroskedastic, ``Psi`` a
  quadratic in age);
* ``alpha``, ``beta`` (or ``eta``) by empirical Bayes (type-II maximum likelihood);
* optionally a SinhArcsinh warp of the response, fitted by the same evidence,
  for skewed or heavy-tailed data.

Every response is standardised and fitted independently, but not one at a time:
the design is shared, so one SVD of it turns the evidence of all responses into
sums over a dozen eigenvalues, and MacKay's fixed-point updates run as array
operations across responses. Heteroskedastic models use batched small linear
algebra across responses (generalised EM). Responses are processed in chunks
through :mod:`neuroatrophy.parallel`, which bounds memory and reports progress.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import ndtr, ndtri

from . import __version__
from .basis import DesignSpec
from .cohort import format_listing, subject_names, validate_covariates
from .metrics import explained_variance, msll, pearson_rho, r2_score, smse, z_calibration
from .modelio import load_model_file, save_model_file
from .parallel import parallel_map
from .warp import sinharcsinh, sinharcsinh_inverse, sinharcsinh_log_jacobian

__all__ = ["NormativeModel", "Prediction", "Deviations", "ExtrapolationWarning", "MIN_CONTROLS"]

MIN_CONTROLS = 20
_MODEL_TYPE = "NormativeModel"
_WARPS = (None, "sinharcsinh")
_TINY = 1e-12


class ExtrapolationWarning(UserWarning):
    """Covariates outside the training range: predictions extrapolate."""


@dataclass
class Prediction:
    """Predictive distribution per subject and response, in the response's units."""

    mean: np.ndarray
    std: np.ndarray
    median: np.ndarray


@dataclass
class Deviations:
    """Deviation of observed values from the normative range."""

    z: np.ndarray
    centile: np.ndarray
    mean: np.ndarray
    std: np.ndarray


class NormativeModel:
    """Bayesian linear regression normative model, vectorised across responses.

    Parameters
    ----------
    n_knots, degree : int
        Knots (uniform over the training age range widened by 5 % each side) and
        degree of the age B-spline.
    heteroskedastic : bool
        Let the noise variance change with age (log-precision quadratic in age).
    warp : {None, "sinharcsinh"}
        Fit a SinhArcsinh warp per response for non-Gaussian data.
    sex_effect, site_effect : bool
        Include sex and site fixed effects.
    chunk_size : int
        Responses processed per chunk (bounds memory; the unit of progress and parallelism).
    n_jobs, backend :
        Passed to :func:`neuroatrophy.parallel.parallel_map`.
    max_iter, tol :
        Evidence-optimisation iterations and relative tolerance.

    Examples
    --------
    >>> model = NormativeModel().fit(Y_controls, covariates_controls)  # doctest: +SKIP
    >>> dev = model.score(Y_patients, covariates_patients)             # doctest: +SKIP
    >>> dev.z.shape                                                     # doctest: +SKIP
    (100, 20484)
    """

    def __init__(
        self,
        n_knots: int = 5,
        degree: int = 3,
        heteroskedastic: bool = False,
        warp: str | None = None,
        sex_effect: bool = True,
        site_effect: bool = True,
        chunk_size: int = 4096,
        n_jobs: int | None = None,
        backend: str | None = None,
        max_iter: int = 200,
        tol: float = 1e-6,
    ):
        self.n_knots = n_knots
        self.degree = degree
        self.heteroskedastic = heteroskedastic
        self.warp = warp
        self.sex_effect = sex_effect
        self.site_effect = site_effect
        self.chunk_size = chunk_size
        self.n_jobs = n_jobs
        self.backend = backend
        self.max_iter = max_iter
        self.tol = tol

    # ------------------------------------------------------------------ fitting
    def fit(self, Y, covariates: pd.DataFrame, response_names=None, progress=None) -> "NormativeModel":
        """Fit the model on healthy controls.

        Parameters
        ----------
        Y : array of shape (n_subjects, n_responses)
            Observed values (e.g. thickness per vertex), one row per subject.
        covariates : DataFrame
            Columns ``age``, ``sex``, ``site`` (rows aligned with ``Y``).
        response_names : list of str, optional
            Names of the responses (e.g. region names).
        progress : callable, optional
            ``progress(fraction, message)``; may raise
            :class:`~neuroatrophy.parallel.Cancelled` to stop the fit.
        """
        self._check_params()
        covariates = validate_covariates(covariates)
        Y = _as_response_matrix(Y, "Y", len(covariates), covariates)
        n_subjects, n_responses = Y.shape

        design = DesignSpec(self.n_knots, self.degree, self.sex_effect, self.site_effect).fit(covariates)
        Phi = design.transform(covariates)
        svd = _design_svd(Phi)
        # Two controls per free design direction (indicators overlap the intercept, so rank < columns).
        min_n = max(MIN_CONTROLS, 2 * len(svd[1]))
        if n_subjects < min_n:
            raise ValueError(
                f"too few controls to fit a normative model: {n_subjects} given, at least {min_n} needed "
                f"for {len(svd[1])} free design parameters (age spline, sex, {len(design.sites)} site(s))"
            )
        _warn_small_sites(covariates)

        self.design_ = design
        self.y_mean_, self.y_sd_ = _column_mean_sd(Y, self.chunk_size)
        constant = self.y_sd_ <= _TINY * np.maximum(1.0, np.abs(self.y_mean_))
        if constant.any():
            names = format_listing(np.asarray(response_names or range(n_responses), dtype=object)[constant])
            raise ValueError(f"Y has no variance across controls for response(s) {names}; nothing to model")
        Psi = design.variance_design(covariates) if self.heteroskedastic else None

        chunks = _chunks(n_responses, self.chunk_size)

        def fit_chunk(columns):
            ys = (Y[:, columns] - self.y_mean_[columns]) / self.y_sd_[columns]
            return _fit_chunk(Phi, Psi, svd, ys, self.warp, self.max_iter, self.tol)

        results = parallel_map(
            fit_chunk, chunks, n_jobs=self.n_jobs, backend=self.backend,
            on_result=_progress_reporter(progress, len(chunks), "fitting normative model"),
        )
        self._store_fit(results, svd, n_responses)
        self.n_train_ = n_subjects
        self.response_names_ = None if response_names is None else [str(n) for n in response_names]
        if self.response_names_ is not None and len(self.response_names_) != n_responses:
            raise ValueError(
                f"response_names has {len(self.response_names_)} names but Y has {n_responses} columns"
            )
        self.adapted_sites_ = {}
        return self

    def _check_params(self):
        if self.warp not in _WARPS:
            raise ValueError(f"warp must be one of {_WARPS}, got {self.warp!r}")
        if int(self.chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    def _store_fit(self, results, svd, n_responses):
        def stack(key, axis=-1):
            if results[0].get(key) is None:
                return None
            return np.concatenate([r[key] for r in results], axis=axis)

        self.weights_ = stack("weights")                  # (D, V)
        self.alpha_ = stack("alpha")                      # (V,)
        self.beta_ = stack("beta")                        # (V,) homoskedastic noise precision
        self.eta_ = stack("eta")                          # (P, V) heteroskedastic log-precision coefs
        self.cov_ = stack("cov", axis=0)                  # (V, r, r) heteroskedastic posterior covariance,
                                                          # in the design's row space (eig_vecs_)
        self.log_evidence_ = stack("log_evidence")        # (V,)
        self.warp_a_ = stack("warp_a")
        self.warp_b_ = stack("warp_b")
        self.eig_vecs_, self.eig_vals_ = svd[2], svd[1] ** 2
        self.n_responses_ = n_responses

    # --------------------------------------------------------------- prediction
    @property
    def sites_(self) -> list[str]:
        """Sites the model can predict for: training sites, then adapted ones."""
        self._check_fitted()
        return list(self.design_.sites) + list(self.adapted_sites_)

    @property
    def age_range_(self) -> tuple[float, float]:
        self._check_fitted()
        return self.design_.age_min, self.design_.age_max

    @property
    def n_vertices_(self) -> int:
        self._check_fitted()
        return self.n_responses_

    def predict(self, covariates: pd.DataFrame, responses=None) -> Prediction:
        """Predictive mean, SD and median per subject and response (response units)."""
        mu, sd, cols = self._predict_warped(covariates, responses)
        return self._prediction_from_warped(mu, sd, cols)

    def score(self, Y, covariates: pd.DataFrame, responses=None) -> Deviations:
        """Deviation z-scores and centiles of observed values ``Y``."""
        _, z, _, _, pred = self._deviations(Y, covariates, responses)
        return Deviations(z=z, centile=100.0 * ndtr(z), mean=pred.mean, std=pred.std)

    def evaluate(self, Y, covariates: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
        """Per-response metrics on (held-out) data and the calibration of z.

        Returns a DataFrame with ``EV``, ``SMSE``, ``MSLL``, ``Rho``, ``R2`` (one row per
        response) and a dict with ``z_mean``, ``z_sd``, ``frac_beyond_1.96``.
        """
        Y, z, sd, cols, pred = self._deviations(Y, covariates, None)
        nll = 0.5 * np.log(2 * np.pi * sd**2) + 0.5 * z**2 + np.log(self.y_sd_)
        if self.warp is not None:
            ys = (Y - self.y_mean_) / self.y_sd_
            nll -= sinharcsinh_log_jacobian(ys, self.warp_a_, self.warp_b_)
        table = pd.DataFrame(
            {
                "EV": explained_variance(Y, pred.mean),
                "SMSE": smse(Y, pred.mean),
                "MSLL": msll(nll, Y, self.y_mean_, self.y_sd_),
                "Rho": pearson_rho(Y, pred.mean),
                "R2": r2_score(Y, pred.mean),
                "z_mean": z.mean(axis=0),
                "z_sd": z.std(axis=0),
            },
            index=pd.Index(self._names(), name="response"),
        )
        return table, z_calibration(z)

    def centile_curves(self, ages, response, sex="F", site=None, centiles=(5, 25, 50, 75, 95)) -> pd.DataFrame:
        """Centiles of one response as a function of age, for one sex and site.

        ``response`` is an index or a response name; ``site`` defaults to the first
        training site. Returns a DataFrame with column ``age`` and one ``p<c>`` column per centile.
        """
        self._check_fitted()
        col = self._response_index(response)
        ages = np.asarray(ages, dtype=float)
        site = self.sites_[0] if site is None else site
        cov = pd.DataFrame({"age": ages, "sex": sex, "site": site})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExtrapolationWarning)
            mu, sd, _ = self._predict_warped(cov, [col])
        out = {"age": ages}
        for c in centiles:
            if not 0 < c < 100:
                raise ValueError(f"centiles must be in (0, 100), got {c}")
            w = mu[:, 0] + sd[:, 0] * ndtri(c / 100.0)
            out[f"p{c:g}"] = self._from_warped(w, col)
        return pd.DataFrame(out)

    # ---------------------------------------------------------------- transfer
    def adapt(self, Y, covariates: pd.DataFrame, prior_sites: float = 10.0) -> "NormativeModel":
        """Adapt the model to new site(s) from a small set of their controls.

        The fitted model is kept; each new site gets an offset of the mean and a
        scale of the noise, estimated per response by empirical Bayes: the offset's
        prior variance is the larger of the spread of the training sites' effects and
        the new site's own offsets pooled across responses (so a site unlike the
        training sites is not shrunk towards them), and the noise scale is shrunk
        towards the site's median scale across responses with ``prior_sites``
        pseudo-subjects. Returns a new model;
        this one is unchanged.
        """
        import copy

        self._check_fitted()
        covariates = validate_covariates(covariates)
        Y = _as_response_matrix(Y, "Y", len(covariates), covariates, n_columns=self.n_responses_)
        known = set(self.sites_)
        old = sorted(set(covariates["site"]) & known)
        if old:
            raise ValueError(
                f"site(s) {old} are already known to the model; adapt() takes controls of new sites only"
            )
        adapted = copy.deepcopy(self)
        tau2 = self._site_effect_variance()
        site_of = covariates["site"].astype(str).to_numpy()
        for site in sorted(set(site_of)):
            idx = np.flatnonzero(site_of == site)
            if len(idx) < 2:
                raise ValueError(f"site {site!r}: at least 2 controls are needed to adapt, got {len(idx)}")
            cov_site = covariates.iloc[idx].assign(site=self.design_.sites[0])
            mu, sd = self._predict_average_site(cov_site)
            resid = self._to_warped(Y[idx], slice(None)) - mu
            precision = 1.0 / sd**2
            prior_var = np.maximum(tau2, _pooled_offset_variance(resid, precision))
            offset_var = 1.0 / (1.0 / prior_var + precision.sum(axis=0))
            offset = offset_var * (resid * precision).sum(axis=0)
            scaled = ((resid - offset) ** 2 * precision).sum(axis=0)
            # Shrink each response's noise scale towards the site's pooled scale.
            pooled = float(np.median(scaled / len(idx)))
            scale2 = (scaled + prior_sites * pooled) / (len(idx) + prior_sites)
            adapted.adapted_sites_[str(site)] = {
                "offset": offset, "offset_var": offset_var, "scale": np.sqrt(scale2), "n": len(idx),
            }
        return adapted

    def _site_effect_variance(self) -> np.ndarray:
        """Prior variance of a new site's offset: spread of the training sites' effects."""
        sites = self.design_.sites
        if not self.site_effect or len(sites) < 2:
            return np.full(self.n_responses_, 0.1)  # standardised units; no sites to learn it from
        effects = self.weights_[self.design_.site_columns()]   # (n_sites, V); the mean is the intercept's
        per_response = effects.var(axis=0, ddof=1)
        # Few sites make a noisy per-response variance: pool half of it with the median.
        return np.maximum(0.5 * per_response + 0.5 * np.median(per_response), 1e-4)

    # ------------------------------------------------------------------ saving
    def save(self, path):
        """Save to a single safe file (see :mod:`neuroatrophy.modelio`)."""
        arrays, metadata = self._state()
        return save_model_file(path, arrays, metadata)

    @classmethod
    def load(cls, path) -> "NormativeModel":
        arrays, metadata = load_model_file(path, expected_type=_MODEL_TYPE)
        return cls._from_state(arrays, metadata)

    def _state(self, prefix: str = "") -> tuple[dict, dict]:
        self._check_fitted()
        arrays = {}
        for key in ("weights", "alpha", "beta", "eta", "cov", "log_evidence", "warp_a", "warp_b",
                    "eig_vecs", "eig_vals", "y_mean", "y_sd"):
            value = getattr(self, key + "_")
            if value is not None:
                arrays[prefix + key] = value
        for i, values in enumerate(self.adapted_sites_.values()):
            for key in ("offset", "offset_var", "scale"):
                arrays[f"{prefix}adapted_{i}_{key}"] = values[key]
        metadata = {
            "model_type": _MODEL_TYPE,
            "neuroatrophy_version": __version__,
            "params": self.get_params(),
            "design": self.design_.to_dict(),
            "n_train": self.n_train_,
            "n_responses": self.n_responses_,
            "response_names": self.response_names_,
            "adapted_sites": [{"site": s, "n": v["n"]} for s, v in self.adapted_sites_.items()],
        }
        return arrays, metadata

    @classmethod
    def _from_state(cls, arrays: dict, metadata: dict, prefix: str = "") -> "NormativeModel":
        model = cls(**metadata["params"])
        model.design_ = DesignSpec.from_dict(metadata["design"])
        for key in ("weights", "alpha", "beta", "eta", "cov", "log_evidence", "warp_a", "warp_b",
                    "eig_vecs", "eig_vals", "y_mean", "y_sd"):
            setattr(model, key + "_", arrays.get(prefix + key))
        model.n_train_ = metadata["n_train"]
        model.n_responses_ = metadata["n_responses"]
        model.response_names_ = metadata["response_names"]
        model.adapted_sites_ = {}
        for i, entry in enumerate(metadata["adapted_sites"]):
            model.adapted_sites_[entry["site"]] = {
                key: arrays[f"{prefix}adapted_{i}_{key}"] for key in ("offset", "offset_var", "scale")
            } | {"n": entry["n"]}
        missing = [k for k in ("weights", "alpha", "y_mean", "y_sd", "eig_vecs") if getattr(model, k + "_") is None]
        if missing:
            raise ValueError(f"model file is missing arrays {missing}")
        return model

    def get_params(self) -> dict:
        return {
            "n_knots": self.n_knots, "degree": self.degree, "heteroskedastic": self.heteroskedastic,
            "warp": self.warp, "sex_effect": self.sex_effect, "site_effect": self.site_effect,
            "chunk_size": self.chunk_size, "n_jobs": self.n_jobs, "backend": self.backend,
            "max_iter": self.max_iter, "tol": self.tol,
        }

    # ---------------------------------------------------------------- internals
    def _check_fitted(self):
        if not hasattr(self, "weights_"):
            raise RuntimeError("this NormativeModel is not fitted yet: call fit() or load()")

    def _names(self) -> list[str]:
        if self.response_names_ is not None:
            return self.response_names_
        return [str(i) for i in range(self.n_responses_)]

    def _response_index(self, response) -> int:
        if isinstance(response, (int, np.integer)):
            if not 0 <= response < self.n_responses_:
                raise ValueError(f"response index {response} out of range [0, {self.n_responses_})")
            return int(response)
        names = self._names()
        if response not in names:
            raise ValueError(f"unknown response {response!r}; the model has {len(names)} responses, e.g. {names[:5]}")
        return names.index(response)

    def _columns(self, responses):
        if responses is None:
            return slice(None)
        return np.asarray([self._response_index(r) for r in responses], dtype=int)

    def _deviations(self, Y, covariates, responses):
        """Observed values, their z, predictive SD (warped space), columns and prediction."""
        covariates = validate_covariates(covariates)
        mu, sd, cols = self._predict_warped(covariates, responses)
        Y = _as_response_matrix(Y, "Y", len(covariates), covariates, n_columns=mu.shape[1])
        z = (self._to_warped(Y, cols) - mu) / sd
        return Y, z, sd, cols, self._prediction_from_warped(mu, sd, cols)

    def _predict_warped(self, covariates, responses):
        """Predictive mean and SD in the standardised (and warped) space."""
        self._check_fitted()
        covariates = validate_covariates(covariates)
        self._check_sites(covariates)
        self._warn_extrapolation(covariates)
        cols = self._columns(responses)
        site = covariates["site"].astype(str).to_numpy()
        new = np.isin(site, list(self.adapted_sites_))
        # Subjects of adapted sites are predicted as the average training site, then shifted.
        cov = covariates.assign(site=np.where(new, self.design_.sites[0], site))
        mu, var = self._gaussian_prediction(cov, cols, average_site=new)
        for name, values in self.adapted_sites_.items():
            rows = site == name
            if rows.any():
                mu[rows] += values["offset"][cols]
                noise = self._noise_variance(cov[rows], cols)
                var[rows] += (values["scale"][cols] ** 2 - 1.0) * noise + values["offset_var"][cols]
        return mu, np.sqrt(var), cols

    def _predict_average_site(self, covariates):
        mu, var = self._gaussian_prediction(covariates, slice(None), average_site=np.ones(len(covariates), bool))
        return mu, np.sqrt(var)

    def _gaussian_prediction(self, covariates, cols, average_site):
        Phi = self.design_.average_site(self.design_.transform(covariates), average_site)
        weights = self.weights_[:, cols]
        mu = Phi @ weights
        var = self._noise_variance(covariates, cols) + self._parameter_variance(Phi, cols)
        return mu, var

    def _noise_variance(self, covariates, cols):
        if self.eta_ is not None:
            Psi = self.design_.variance_design(covariates)
            return np.exp(-(Psi @ self.eta_[:, cols]))
        return np.broadcast_to(1.0 / self.beta_[cols], (len(covariates), np.size(self.beta_[cols]))).copy()

    def _parameter_variance(self, Phi, cols):
        """phi^T A^-1 phi for every subject and response."""
        alpha = self.alpha_[cols]
        q = Phi @ self.eig_vecs_.T                                   # (n, r) design in its row space
        null = np.maximum(np.sum(Phi**2, axis=1) - np.sum(q**2, axis=1), 0.0)[:, None] / alpha[None, :]
        if self.cov_ is not None:                                    # heteroskedastic: (V, r, r) posterior
            cov = self.cov_[cols]
            r = q.shape[1]
            outer = (q[:, :, None] * q[:, None, :]).reshape(len(q), r * r)
            return outer @ cov.reshape(len(cov), r * r).T + null
        inv_eig = 1.0 / (alpha[None, :] + self.beta_[cols][None, :] * self.eig_vals_[:, None])  # (r, V)
        return (q**2) @ inv_eig + null

    def _to_warped(self, Y, cols):
        ys = (Y - self.y_mean_[cols]) / self.y_sd_[cols]
        if self.warp is None:
            return ys
        return sinharcsinh(ys, self.warp_a_[cols], self.warp_b_[cols])

    def _from_warped(self, w, col):
        if self.warp is not None:
            w = sinharcsinh_inverse(w, self.warp_a_[col], self.warp_b_[col])
        return self.y_mean_[col] + self.y_sd_[col] * w

    def _prediction_from_warped(self, mu, sd, cols):
        if self.warp is None:
            mean = self.y_mean_[cols] + self.y_sd_[cols] * mu
            return Prediction(mean=mean, std=self.y_sd_[cols] * sd, median=mean)
        a, b = self.warp_a_[cols], self.warp_b_[cols]
        mean, std = _warped_moments(mu, sd, a, b)
        scale = self.y_sd_[cols]
        return Prediction(
            mean=self.y_mean_[cols] + scale * mean, std=scale * std,
            median=self.y_mean_[cols] + scale * sinharcsinh_inverse(mu, a, b),
        )

    def _check_sites(self, covariates):
        unknown = sorted(set(covariates["site"].astype(str)) - set(self.sites_))
        if unknown:
            rows = covariates["site"].astype(str).isin(unknown).to_numpy()
            raise ValueError(
                f"site(s) {unknown} (subjects {_subjects_where(covariates, rows)}) "
                f"are unknown to the model, which knows sites {self.sites_}; adapt the model to the new site "
                "with some of its controls (NormativeModel.adapt, or `neuroatrophy adapt`)"
            )

    def _warn_extrapolation(self, covariates):
        lo, hi = self.design_.age_min, self.design_.age_max
        age = covariates["age"].to_numpy(dtype=float)
        outside = (age < lo) | (age > hi)
        if outside.any():
            warnings.warn(
                f"{outside.sum()} subject(s) ({_subjects_where(covariates, outside)}) "
                f"have ages outside the training range [{lo:.1f}, {hi:.1f}] years: predictions extrapolate",
                ExtrapolationWarning,
                stacklevel=3,
            )


# ---------------------------------------------------------------------- kernels
def _design_svd(Phi):
    """Thin SVD of the design, dropping numerically null directions."""
    U, s, Vt = np.linalg.svd(Phi, full_matrices=False)
    keep = s > s[0] * 1e-10
    return U[:, keep], s[keep], Vt[keep]


def _fit_chunk(Phi, Psi, svd, ys, warp, max_iter, tol) -> dict:
    U, s, Vt = svd
    out = {}
    if warp == "sinharcsinh":
        a, b = _fit_sinharcsinh(U, s, Phi.shape[1], ys, max_iter, tol)
        ys = sinharcsinh(ys, a, b)
        out.update(warp_a=a, warp_b=b)
    c = U.T @ ys
    alpha, beta, m_eig, log_ev = _mackay(c, np.sum(ys**2, axis=0), s**2, ys.shape[0], Phi.shape[1], max_iter, tol)
    out.update(weights=Vt.T @ m_eig, alpha=alpha, log_evidence=log_ev)
    if Psi is None:
        out["beta"] = beta
    else:
        out.update(_fit_heteroskedastic(U * s, Vt, Psi, ys, alpha, beta, max_iter=min(max_iter, 50), tol=1e-4))
    return out


def _mackay(c, yy, s2, n, d, max_iter, tol, alpha=None, beta=None):
    """Evidence maximisation for all responses at once, in the design's eigenbasis.

    ``c = U^T y`` (r, V), ``yy = |y|^2`` (V,), ``s2`` the squared singular values.
    Returns alpha, beta, the posterior mean in the eigenbasis, and the log evidence.
    """
    c2 = c**2
    resid_out = np.maximum(yy - c2.sum(axis=0), 0.0)   # part of y outside the design's span
    s2 = s2[:, None]
    alpha = np.ones(c.shape[1]) if alpha is None else alpha
    beta = np.ones(c.shape[1]) if beta is None else beta
    active = np.ones(c.shape[1], dtype=bool)
    for _ in range(max_iter):
        lam = beta * s2
        denom = alpha + lam
        gamma = np.sum(lam / denom, axis=0)
        m2 = np.sum(beta**2 * s2 * c2 / denom**2, axis=0)
        ed = resid_out + np.sum(c2 * (alpha / denom) ** 2, axis=0)
        new_alpha = np.clip(gamma / np.maximum(m2, _TINY), 1e-10, 1e10)
        new_beta = np.clip((n - gamma) / np.maximum(ed, _TINY), 1e-10, 1e10)
        change = np.maximum(np.abs(np.log(new_alpha / alpha)), np.abs(np.log(new_beta / beta)))
        # Each response stops on its own, so results do not depend on how responses are chunked.
        alpha = np.where(active, new_alpha, alpha)
        beta = np.where(active, new_beta, beta)
        active &= change >= tol
        if not active.any():
            break
    lam = beta * s2
    denom = alpha + lam
    m_eig = beta * np.sqrt(s2) * c / denom
    m2 = np.sum(m_eig**2, axis=0)
    ed = resid_out + np.sum(c2 * (alpha / denom) ** 2, axis=0)
    r = s2.shape[0]
    log_ev = (
        0.5 * r * np.log(alpha) + 0.5 * n * np.log(beta) - 0.5 * beta * ed - 0.5 * alpha * m2
        - 0.5 * np.sum(np.log(denom), axis=0) - 0.5 * n * np.log(2 * np.pi)
    )
    return alpha, beta, m_eig, log_ev


def _fit_heteroskedastic(basis, Vt, Psi, y, alpha, beta, max_iter, tol) -> dict:
    """Generalised EM for noise log-precision ``Psi @ eta``, batched across responses.

    Works in the design's row space, ``basis = Phi @ Vt.T`` (n, r): the prior is isotropic,
    so rotating into it changes nothing but drops the design's null directions. Symmetric
    r x r products are formed from their upper triangles only.
    """
    n, r = basis.shape
    p = Psi.shape[1]
    rows, cols = np.triu_indices(r)
    outer = basis[:, rows] * basis[:, cols]                             # (n, T) upper triangle
    twice = np.where(rows == cols, 1.0, 2.0)                            # off-diagonal terms count twice
    psi_outer = (Psi[:, :, None] * Psi[:, None, :]).reshape(n, p * p)
    eta = np.zeros((p, y.shape[1]))
    eta[0] = np.log(beta)

    def posterior(prec, alpha):
        A = np.empty((y.shape[1], r, r))
        A[:, rows, cols] = (outer.T @ prec).T
        A[:, cols, rows] = A[:, rows, cols]
        A[:, np.arange(r), np.arange(r)] += alpha[:, None]
        cov = np.linalg.inv(A)
        m = np.einsum("vde,vd->ve", cov, (basis.T @ (prec * y)).T)      # (V, r)
        return m, cov

    for _ in range(max_iter):
        prec = np.exp(Psi @ eta)                                        # (n, V)
        m, cov = posterior(prec, alpha)
        resid = y - basis @ m.T
        expected_sq = resid**2 + outer @ (cov[:, rows, cols] * twice).T
        gamma = r - alpha * np.trace(cov, axis1=1, axis2=2)
        alpha = np.clip(gamma / np.maximum(np.sum(m**2, axis=1), _TINY), 1e-10, 1e10)
        weighted = prec * expected_sq
        grad = 0.5 * Psi.T @ (1.0 - weighted)                           # (P, V)
        hess = 0.5 * (psi_outer.T @ weighted).T.reshape(-1, p, p)       # negative Hessian
        step = np.linalg.solve(hess + 1e-9 * np.eye(p), grad.T[..., None])[..., 0].T
        # Damp large Newton steps: the first ones can overshoot on outlying responses.
        step *= np.minimum(1.0, 2.0 / np.maximum(np.abs(step).max(axis=0), _TINY))
        eta += step
        if np.max(np.abs(step)) < tol:
            break
    m, cov = posterior(np.exp(Psi @ eta), alpha)
    return {"weights": Vt.T @ m.T, "alpha": alpha, "eta": eta, "cov": cov}


def _fit_sinharcsinh(U, s, d, ys, max_iter, tol):
    """Per-response SinhArcsinh parameters maximising the marginal likelihood of ``ys``.

    A coarse grid over skew ``a`` and log tail weight ``log b``, then finer 3 x 3
    grids around each response's best point: robust (no divergence on odd
    responses) and vectorised across responses.
    """
    n = ys.shape[0]
    asinh_y = np.arcsinh(ys)
    log1p_y2 = 0.5 * np.sum(np.log1p(ys**2), axis=0)
    s2 = s**2
    state = {}

    def objective(a, log_b):
        inner = np.exp(log_b) * asinh_y - a
        e = np.exp(inner)
        w = 0.5 * (e - 1.0 / e)
        log_cosh = np.log(0.5 * (e + 1.0 / e))
        c = U.T @ w
        alpha, beta, _, log_ev = _mackay(
            c, np.sum(w**2, axis=0), s2, n, d, max_iter=40, tol=1e-3,
            alpha=state.get("alpha"), beta=state.get("beta"),
        )
        log_jac = n * log_b + np.sum(log_cosh, axis=0) - log1p_y2
        return log_ev + log_jac, alpha, beta

    best_a = np.zeros(ys.shape[1])
    best_lb = np.zeros(ys.shape[1])
    best, state["alpha"], state["beta"] = objective(best_a, best_lb)
    grids = [(np.linspace(-1.0, 1.0, 5), np.linspace(-0.6, 0.6, 5))]
    grids += [(np.array([-h, 0.0, h]), np.array([-0.6 * h, 0.0, 0.6 * h])) for h in (0.25, 0.12, 0.06, 0.03)]
    for offsets_a, offsets_lb in grids:
        center_a, center_lb = best_a.copy(), best_lb.copy()
        coarse = len(offsets_a) > 3
        for da in offsets_a:
            for dlb in offsets_lb:
                if da == 0.0 and dlb == 0.0:
                    continue
                a = da + (0.0 if coarse else center_a)
                lb = np.clip(dlb + (0.0 if coarse else center_lb), -1.5, 1.5)
                value, *_ = objective(np.broadcast_to(a, best_a.shape), np.broadcast_to(lb, best_lb.shape))
                better = value > best
                best = np.where(better, value, best)
                best_a = np.where(better, a, best_a)
                best_lb = np.where(better, lb, best_lb)
    return best_a, np.exp(best_lb)


_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(24)
_GH_WEIGHTS = _GH_WEIGHTS / _GH_WEIGHTS.sum()


def _warped_moments(mu, sd, a, b):
    """Mean and SD of ``f^-1(N(mu, sd^2))`` by Gauss-Hermite quadrature."""
    first = np.zeros_like(mu)
    second = np.zeros_like(mu)
    for x, weight in zip(_GH_NODES, _GH_WEIGHTS):
        value = sinharcsinh_inverse(mu + sd * x, a, b)
        first += weight * value
        second += weight * value**2
    return first, np.sqrt(np.maximum(second - first**2, 0.0))


# -------------------------------------------------------------------- helpers
def _chunks(n, size):
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _progress_reporter(progress, n_chunks, message):
    if progress is None:
        return None

    def report(index, _result):
        progress((index + 1) / n_chunks, f"{message}: {index + 1}/{n_chunks} chunks")

    return report


def _subjects_where(covariates, rows) -> str:
    """The subjects of the selected rows, listed for a message."""
    return format_listing([name for name, keep in zip(subject_names(covariates), rows) if keep])


def _column_mean_sd(Y, chunk_size):
    """Per-column mean and SD, a block of columns at a time (no full-size temporary)."""
    mean = np.empty(Y.shape[1])
    sd = np.empty(Y.shape[1])
    for columns in _chunks(Y.shape[1], chunk_size):
        block = Y[:, columns].astype(np.float64)
        mean[columns] = block.mean(axis=0)
        sd[columns] = block.std(axis=0)
    return mean, sd


def _as_response_matrix(Y, name, n_rows, covariates, n_columns=None) -> np.ndarray:
    Y = np.asarray(Y)
    if not np.issubdtype(Y.dtype, np.floating):
        Y = Y.astype(np.float64)   # float32 data stay float32: chunks are promoted as they are fitted
    if Y.ndim == 1:
        Y = Y[None, :] if n_rows == 1 else Y[:, None]
    if Y.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (subjects x responses), got shape {Y.shape}")
    if Y.shape[0] != n_rows:
        raise ValueError(f"{name} has {Y.shape[0]} rows but the covariates have {n_rows} subjects")
    if n_columns is not None and Y.shape[1] != n_columns:
        raise ValueError(
            f"{name} has {Y.shape[1]} responses (vertices) per subject but the model was fitted on {n_columns}"
        )
    bad = ~np.isfinite(Y).all(axis=1)
    if bad.any():
        raise ValueError(f"{name} has NaN or infinite values for subject(s) {_subjects_where(covariates, bad)}")
    return Y


def _pooled_offset_variance(resid, precision) -> float:
    """Method-of-moments variance of a new site's offsets, pooled across responses."""
    weight = precision.sum(axis=0)
    raw = (resid * precision).sum(axis=0) / weight        # per-response offset estimate
    return float(max(np.mean(raw**2 - 1.0 / weight), 0.0))


def _warn_small_sites(covariates):
    counts = covariates["site"].value_counts()
    small = counts[counts < 5]
    if len(small):
        warnings.warn(
            f"site(s) {sorted(small.index.astype(str))} have fewer than 5 controls; their site effect "
            "is poorly estimated",
            UserWarning,
            stacklevel=3,
        )
