"""Design matrices for normative models: B-spline age basis, sex and site effects."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.interpolate import BSpline

__all__ = ["bspline_basis", "DesignSpec"]


def bspline_basis(x, lower: float, upper: float, n_knots: int = 5, degree: int = 3) -> np.ndarray:
    """B-spline basis with ``n_knots`` uniform knots on ``[lower, upper]``.

    Values outside the range are clipped to it, so the spline part is constant
    beyond the training range and extrapolation is carried by the linear age term
    of the design (cubic extrapolation of a spline is wild).

    Returns an array of shape ``(len(x), n_knots + degree - 1)``.
    """
    if n_knots < 2:
        raise ValueError(f"n_knots must be >= 2, got {n_knots}")
    if degree < 1:
        raise ValueError(f"degree must be >= 1, got {degree}")
    if not upper > lower:
        raise ValueError(f"spline range must have upper > lower, got [{lower}, {upper}]")
    inner = np.linspace(lower, upper, n_knots)
    knots = np.concatenate([[lower] * degree, inner, [upper] * degree])
    x = np.clip(np.asarray(x, dtype=float), lower, upper)
    return BSpline.design_matrix(x, knots, degree, extrapolate=False).toarray()


@dataclass
class DesignSpec:
    """How covariates become design-matrix columns; fitted on the training covariates.

    Columns: intercept, standardised age, B-spline of age, one indicator per sex
    (if ``sex_effect``) and one per training site (if ``site_effect``): sex and site
    are fixed batch effects under the shared prior, coded as PCNtoolkit codes them.
    The indicators overlap the intercept; the prior resolves the split, and the
    model works in the design's row space. A site unknown at training is
    predicted as "the average site" (``1 / n_sites`` in every site column, see
    :meth:`average_site`) until :meth:`NormativeModel.adapt` learns its offset.
    """

    n_knots: int = 5
    degree: int = 3
    sex_effect: bool = True
    site_effect: bool = True
    age_mean: float = 0.0
    age_sd: float = 1.0
    age_min: float = 0.0
    age_max: float = 1.0
    spline_lower: float = 0.0
    spline_upper: float = 1.0
    sites: list = field(default_factory=list)

    def fit(self, covariates: pd.DataFrame) -> "DesignSpec":
        age = covariates["age"].to_numpy(dtype=float)
        self.age_mean = float(age.mean())
        self.age_sd = float(age.std()) or 1.0
        self.age_min, self.age_max = float(age.min()), float(age.max())
        span = max(self.age_max - self.age_min, 1e-6)
        # The knot range is widened by 5 % on each side, as in PCNtoolkit's BsplineBasisFunction.
        self.spline_lower = self.age_min - 0.05 * span
        self.spline_upper = self.age_max + 0.05 * span
        self.sites = sorted(covariates["site"].astype(str).unique().tolist())
        return self

    @property
    def column_names(self) -> list[str]:
        names = ["intercept", "age"]
        names += [f"age_spline_{i}" for i in range(self.n_knots + self.degree - 1)]
        if self.sex_effect:
            names += ["sex_F", "sex_M"]
        if self.site_effect:
            names += [f"site_{s}" for s in self.sites]
        return names

    def transform(self, covariates: pd.DataFrame) -> np.ndarray:
        """Design matrix ``(n_subjects, n_columns)`` for validated covariates."""
        age = covariates["age"].to_numpy(dtype=float)
        blocks = [
            np.ones((len(age), 1)),
            ((age - self.age_mean) / self.age_sd)[:, None],
            bspline_basis(age, self.spline_lower, self.spline_upper, self.n_knots, self.degree),
        ]
        if self.sex_effect:
            male = (covariates["sex"].to_numpy() == "M").astype(float)[:, None]
            blocks.append(np.hstack([1.0 - male, male]))
        if self.site_effect:
            site = covariates["site"].astype(str).to_numpy()
            blocks.append((site[:, None] == np.asarray(self.sites, dtype=object)[None, :]).astype(float))
        return np.hstack(blocks)

    def site_columns(self) -> list[int]:
        """Indices of the site indicator columns."""
        return [i for i, name in enumerate(self.column_names) if name.startswith("site_")]

    def average_site(self, design: np.ndarray, rows) -> np.ndarray:
        """Set ``rows`` of a design matrix to the average training site (in place; returned)."""
        columns = self.site_columns()
        if columns:
            design[np.ix_(np.asarray(rows, bool), columns)] = 1.0 / len(columns)
        return design

    def variance_design(self, covariates: pd.DataFrame) -> np.ndarray:
        """Low-order basis of the noise log-precision: 1, age, age^2 (age clipped to the training range)."""
        age = np.clip(covariates["age"].to_numpy(dtype=float), self.age_min, self.age_max)
        a = (age - self.age_mean) / self.age_sd
        return np.column_stack([np.ones_like(a), a, a**2])

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, values: dict) -> "DesignSpec":
        return cls(**values)
