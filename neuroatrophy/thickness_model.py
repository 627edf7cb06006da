"""Normative model of cortical thickness on fsaverage5, and personalized atrophy maps.

:class:`CorticalThicknessModel` bundles what an atrophy analysis needs in one
object and one file: a vertex-wise :class:`~neuroatrophy.normative.NormativeModel`
of the cortex (medial wall excluded), a region-wise one of Desikan-Killiany mean
thickness (for centile curves and regional z-scores), and the template.
:meth:`CorticalThicknessModel.patient_map` turns one patient's thickness into
their personalized atrophy map.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import __version__
from .atrophy import AtrophyMap, atrophy_map, regional_summary
from .cohort import validate_covariates
from .modelio import load_model_file, save_model_file
from .normative import ExtrapolationWarning, NormativeModel
from .parallel import scaled_progress
from .surface import TEMPLATE_VERTICES, dk_atlas, load_fsaverage5, match_vertex_count

__all__ = ["CorticalThicknessModel", "PatientMap", "regional_means"]

_MODEL_TYPE = "CorticalThicknessModel"
SUPPORTED_TEMPLATES = ("fsaverage5",)


@dataclass(eq=False)
class PatientMap:
    """One patient's personalized atrophy map.

    Attributes
    ----------
    subject_id, age, sex, site :
        The patient and their covariates.
    z, centile : ndarray of shape (V,)
        Vertex-wise deviation from the normative range (NaN on the medial wall).
    thickness : ndarray of shape (V,)
        The patient's thickness (mm).
    atrophy : AtrophyMap
        Atrophic vertices (``z < threshold``, clusters of at least ``min_cluster_size``).
    regions : DataFrame
        Regional summary: vertex counts and mean z of the map per Desikan-Killiany
        region, plus ``thickness_mm``, ``regional_z`` and ``regional_centile`` from the
        region-wise model of mean thickness.
    """

    subject_id: str
    age: float
    sex: str
    site: str
    z: np.ndarray
    centile: np.ndarray
    thickness: np.ndarray
    atrophy: AtrophyMap
    regions: pd.DataFrame = field(repr=False)

    @property
    def regional_thickness(self) -> dict:
        return dict(zip(self.regions["region"], self.regions["thickness_mm"]))


def regional_means(Y, parcellation) -> np.ndarray:
    """Mean of each subject's values over each region: ``(n_subjects, n_regions)``."""
    Y = np.atleast_2d(np.asarray(Y, dtype=float))
    labels = parcellation.labels
    one_hot = np.zeros((len(labels), parcellation.n_regions + 1))
    one_hot[np.arange(len(labels)), labels] = 1.0
    counts = one_hot.sum(axis=0)
    return (Y @ one_hot)[:, 1:] / counts[1:]


class CorticalThicknessModel:
    """Vertex-wise and regional normative models of cortical thickness.

    Parameters
    ----------
    heteroskedastic, warp, n_knots, degree, n_jobs, backend :
        Passed to both :class:`~neuroatrophy.normative.NormativeModel` instances.
    template : str
        Surface template of the data; ``"fsaverage5"`` (20,484 vertices).

    Examples
    --------
    >>> tm = CorticalThicknessModel().fit(Y_controls, covariates_controls)   # doctest: +SKIP
    >>> pm = tm.patient_map(y_patient, covariates_patient)                    # doctest: +SKIP
    >>> pm.regions.head()                                                     # doctest: +SKIP
    """

    def __init__(self, heteroskedastic=False, warp=None, n_knots=5, degree=3, template="fsaverage5",
                 n_jobs=None, backend=None):
        self.heteroskedastic = heteroskedastic
        self.warp = warp
        self.n_knots = n_knots
        self.degree = degree
        self.template = template
        self.n_jobs = n_jobs
        self.backend = backend

    def _new_model(self) -> NormativeModel:
        return NormativeModel(
            n_knots=self.n_knots, degree=self.degree, heteroskedastic=self.heteroskedastic, warp=self.warp,
            n_jobs=self.n_jobs, backend=self.backend,
        )

    # ------------------------------------------------------------------ fitting
    def fit(self, Y, covariates, progress=None) -> "CorticalThicknessModel":
        """Fit on healthy controls' thickness ``Y`` (n_subjects, 20,484) and covariates."""
        if self.template not in SUPPORTED_TEMPLATES:
            raise ValueError(f"template must be one of {SUPPORTED_TEMPLATES}, got {self.template!r}")
        covariates = validate_covariates(covariates)
        Y = self._check_thickness(Y, "Y")
        self.parcellation_ = dk_atlas()
        self.cortex_ = ~self.parcellation_.medial_wall
        self.vertex = self._new_model().fit(
            Y[:, self.cortex_], covariates, progress=scaled_progress(progress, 0.0, 0.9),
        )
        self.regional = self._new_model().fit(
            regional_means(Y, self.parcellation_), covariates,
            response_names=self.parcellation_.names, progress=scaled_progress(progress, 0.9, 1.0),
        )
        return self

    def _check_thickness(self, Y, name) -> np.ndarray:
        Y = np.atleast_2d(np.asarray(Y, dtype=float))
        expected = 2 * TEMPLATE_VERTICES[self.template]
        if Y.ndim != 2 or Y.shape[1] != expected:
            found = Y.shape[-1]
            raise ValueError(
                f"{name} has {found} vertices per subject{_template_hint(found)}; the {self.template} template has {expected} "
                "(left then right hemisphere)"
            )
        return Y

    # ---------------------------------------------------------------- scoring
    def _check_fitted(self):
        if not hasattr(self, "vertex"):
            raise RuntimeError("this CorticalThicknessModel is not fitted yet: call fit() or load()")

    def score(self, Y, covariates):
        """Vertex-wise z and centiles, ``(n_subjects, 20,484)`` with NaN on the medial wall."""
        self._check_fitted()
        Y = self._check_thickness(Y, "Y")
        dev = self.vertex.score(Y[:, self.cortex_], covariates)
        z = np.full(Y.shape, np.nan)
        centile = np.full(Y.shape, np.nan)
        z[:, self.cortex_] = dev.z
        centile[:, self.cortex_] = dev.centile
        return z, centile

    def patient_maps(self, Y, covariates, threshold=-1.96, min_cluster_size=0) -> list[PatientMap]:
        """Personalized atrophy maps of several patients (rows of ``Y``)."""
        self._check_fitted()
        covariates = validate_covariates(covariates)
        Y = self._check_thickness(Y, "Y")
        with warnings.catch_warnings():
            # Warn once for the whole batch, not once per model.
            warnings.simplefilter("ignore", ExtrapolationWarning)
            z, centile = self.score(Y, covariates)
            regional = self.regional.score(regional_means(Y, self.parcellation_), covariates)
        self.vertex._warn_extrapolation(covariates)
        adjacency = load_fsaverage5("white").adjacency() if min_cluster_size > 0 else None
        subject_ids = covariates["subject_id"].astype(str).to_numpy() if "subject_id" in covariates else \
            np.asarray([f"subject {i}" for i in range(len(Y))])
        maps = []
        for i in range(len(Y)):
            amap = atrophy_map(z[i], threshold=threshold, min_cluster_size=min_cluster_size,
                               adjacency=adjacency, valid=self.cortex_)
            regions = self._regional_table(z[i], amap, Y[i], regional.z[i], regional.centile[i])
            row = covariates.iloc[i]
            maps.append(PatientMap(
                subject_id=str(subject_ids[i]), age=float(row["age"]), sex=str(row["sex"]), site=str(row["site"]),
                z=z[i], centile=centile[i], thickness=Y[i].copy(), atrophy=amap, regions=regions,
            ))
        return maps

    def patient_map(self, y, covariates, threshold=-1.96, min_cluster_size=0) -> PatientMap:
        """Personalized atrophy map of one patient: ``y`` (20,484,), ``covariates`` one row."""
        covariates = validate_covariates(covariates if isinstance(covariates, pd.DataFrame)
                                         else pd.DataFrame([covariates]))
        if len(covariates) != 1:
            raise ValueError(f"patient_map takes one patient's covariates, got {len(covariates)} rows")
        return self.patient_maps(np.atleast_2d(y), covariates, threshold, min_cluster_size)[0]

    def _regional_table(self, z, amap, thickness, regional_z, regional_centile) -> pd.DataFrame:
        table = regional_summary(z, amap.mask, self.parcellation_)
        order = {name: k for k, name in enumerate(self.parcellation_.names)}
        idx = table["region"].map(order).to_numpy()
        table["thickness_mm"] = regional_means(thickness, self.parcellation_)[0][idx]
        table["regional_z"] = regional_z[idx]
        table["regional_centile"] = regional_centile[idx]
        return table

    def evaluate(self, Y, covariates) -> tuple[pd.DataFrame, dict]:
        """Fit quality on held-out controls: per-vertex metrics (cortex) and z calibration."""
        self._check_fitted()
        Y = self._check_thickness(Y, "Y")
        table, calibration = self.vertex.evaluate(Y[:, self.cortex_], covariates)
        table.index = pd.Index(np.flatnonzero(self.cortex_), name="vertex")
        return table, calibration

    def evaluate_regions(self, Y, covariates) -> tuple[pd.DataFrame, dict]:
        """Fit quality of the region-wise model on held-out controls."""
        self._check_fitted()
        Y = self._check_thickness(Y, "Y")
        return self.regional.evaluate(regional_means(Y, self.parcellation_), covariates)

    def region_centile_curves(self, region, sex="F", site=None, ages=None,
                              centiles=(5, 25, 50, 75, 95)) -> pd.DataFrame:
        """Centile curves of a region's mean thickness vs age (training age range by default)."""
        self._check_fitted()
        if ages is None:
            lo, hi = self.regional.age_range_
            ages = np.linspace(lo, hi, 100)
        return self.regional.centile_curves(ages, region, sex=sex, site=site, centiles=centiles)

    @property
    def sites_(self) -> list[str]:
        self._check_fitted()
        return self.vertex.sites_

    @property
    def region_names(self) -> list[str]:
        self._check_fitted()
        return list(self.parcellation_.names)

    # ---------------------------------------------------------------- transfer
    def adapt(self, Y, covariates) -> "CorticalThicknessModel":
        """A copy of this model that also knows the new site(s) of these controls."""
        import copy

        self._check_fitted()
        covariates = validate_covariates(covariates)
        Y = self._check_thickness(Y, "Y")
        adapted = copy.copy(self)
        adapted.vertex = self.vertex.adapt(Y[:, self.cortex_], covariates)
        adapted.regional = self.regional.adapt(regional_means(Y, self.parcellation_), covariates)
        return adapted

    # ------------------------------------------------------------------ saving
    def save(self, path):
        """Save to one safe file (zip of ``metadata.json`` + ``.npy`` arrays; see :mod:`neuroatrophy.modelio`)."""
        self._check_fitted()
        vertex_arrays, vertex_meta = self.vertex._state(prefix="vertex/")
        regional_arrays, regional_meta = self.regional._state(prefix="regional/")
        metadata = {
            "model_type": _MODEL_TYPE,
            "neuroatrophy_version": __version__,
            "template": self.template,
            "parcellation": "Desikan-Killiany (ENIGMA aparc_fsa5)",
            "measure": "thickness",
            "units": "mm",
            "params": self.get_params(),
            "vertex": vertex_meta,
            "regional": regional_meta,
        }
        arrays = {**vertex_arrays, **regional_arrays, "cortex": self.cortex_}
        return save_model_file(path, arrays, metadata)

    @classmethod
    def load(cls, path) -> "CorticalThicknessModel":
        arrays, metadata = load_model_file(path, expected_type=_MODEL_TYPE)
        model = cls(**metadata["params"])
        model.parcellation_ = dk_atlas()
        model.cortex_ = arrays["cortex"].astype(bool)
        if model.cortex_.shape != model.parcellation_.labels.shape:
            raise ValueError(f"{path}: cortex mask does not match the {model.template} template")
        model.vertex = NormativeModel._from_state(arrays, metadata["vertex"], prefix="vertex/")
        model.regional = NormativeModel._from_state(arrays, metadata["regional"], prefix="regional/")
        return model

    def get_params(self) -> dict:
        return {
            "heteroskedastic": self.heteroskedastic, "warp": self.warp, "n_knots": self.n_knots,
            "degree": self.degree, "template": self.template, "n_jobs": self.n_jobs, "backend": self.backend,
        }


def _template_hint(n: int) -> str:
    """Say which template a vertex count belongs to, if any."""
    match = match_vertex_count(n)
    if match is None:
        return ""
    template, part = match
    if part == "both":
        return f" (both hemispheres of {template})"
    return f" (one hemisphere of {template}: give left then right)"
