"""BrLP's conditioning covariates: encoding, validation and volume normalisation.

BrLP conditions its diffusion UNet on eight numbers, in this order (``CONTEXT_NAMES``): the target
age / 100, sex, diagnosis, and five regional volumes min-max normalised with the training set's
minimum and maximum (BrLP's ``const.CONDITIONING_VARIABLES``; the published values are
``BRLP_MINMAX``).

Sex coding: BrLP's documentation says male 0 / female 1 while its CLI computes ``(sex - 1) / 1``
from the CSV value, so a number is ambiguous. We accept only ``"F"``/``"M"`` (or ``female``/``male``)
and encode female as 1, male as 0, as the data documentation (``REPR-DATA.md``) states.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

REGIONS = ("cerebral_cortex", "hippocampus", "amygdala", "cerebral_white_matter", "lateral_ventricle")
CONTEXT_NAMES = ("age", "sex", "diagnosis") + REGIONS
DIAGNOSES = {"CN": 0.0, "MCI": 0.5, "AD": 1.0}
_SEXES = {"f": 1.0, "female": 1.0, "m": 0.0, "male": 0.0}
AGE_SCALE = 100.0

# BrLP's released inference configuration (examples/confs.example.yaml): training-set minimum and
# maximum of each volume (mm3 in MNI 1 mm space, left + right), and the per-region correction
# x <- (x - q) / m applied to the disease-course model's estimates.
BRLP_MINMAX = {
    "cerebral_cortex": (370876.0, 744801.0),
    "hippocampus": (5006.0, 13955.0),
    "amygdala": (1462.0, 5828.0),
    "cerebral_white_matter": (323328.0, 696723.0),
    "lateral_ventricle": (10404.0, 191374.0),
}
BRLP_MEDIAN_CORRECTIONS = {
    "cerebral_cortex": (0.5114, 0.1825),
    "hippocampus": (0.6227, 0.1667),
    "amygdala": (1.0000, 0.0000),
    "cerebral_white_matter": (0.6461, 0.2016),
    "lateral_ventricle": (0.4650, 0.0817),
}


def encode_sex(sex) -> float:
    """Female 1.0, male 0.0; only ``F``/``M``/``female``/``male`` (any case) are accepted."""
    key = str(sex).strip().lower() if isinstance(sex, str) else None
    if key not in _SEXES:
        raise ValueError(
            f"sex must be 'F' or 'M' (got {sex!r}); numeric codes are ambiguous in BrLP "
            "(0/1 in its data notes, 1/2 in its CLI), so give the letter"
        )
    return _SEXES[key]


def normalise_diagnosis(diagnosis) -> str:
    """``"CN"``, ``"MCI"`` or ``"AD"`` from any case; a clear error otherwise."""
    key = str(diagnosis).strip().upper()
    if key not in DIAGNOSES:
        raise ValueError(f"diagnosis must be one of CN, MCI, AD (got {diagnosis!r})")
    return key


def encode_diagnosis(diagnosis) -> float:
    """CN 0.0, MCI 0.5, AD 1.0 (BrLP's ``(dx - 1) / 2`` with dx 1, 2, 3)."""
    return DIAGNOSES[normalise_diagnosis(diagnosis)]


def encode_age(age, name: str = "age") -> float:
    """Age in years / 100, after checking it is a plausible age in years."""
    try:
        value = float(age)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of years (got {age!r})") from None
    if not math.isfinite(value) or not 0.0 < value < 120.0:
        raise ValueError(f"{name} must be in years, between 0 and 120 (got {age!r})")
    return value / AGE_SCALE


def check_minmax(minmax: Mapping) -> dict:
    """Validated ``{region: (min, max)}`` for every region in ``REGIONS``."""
    missing = [r for r in REGIONS if r not in minmax]
    if missing:
        raise ValueError(f"minmax_params lacks {', '.join(missing)}")
    out = {}
    for region in REGIONS:
        lo, hi = (float(v) for v in minmax[region])
        if not hi > lo:
            raise ValueError(f"minmax_params[{region!r}]: max must exceed min (got {lo}, {hi})")
        out[region] = (lo, hi)
    return out


def normalise_volumes(volumes, minmax: Mapping = BRLP_MINMAX):
    """Min-max normalised volumes; ``volumes`` is a dict, Series or DataFrame keyed by region (mm3)."""
    return _apply_minmax(volumes, check_minmax(minmax), inverse=False)


def denormalise_volumes(volumes, minmax: Mapping = BRLP_MINMAX):
    """The inverse of :func:`normalise_volumes` (normalised values back to mm3)."""
    return _apply_minmax(volumes, check_minmax(minmax), inverse=True)


def _apply_minmax(volumes, minmax: dict, inverse: bool):
    if isinstance(volumes, pd.DataFrame):
        missing = [r for r in REGIONS if r not in volumes.columns]
        if missing:
            raise ValueError(f"volume table lacks column(s) {', '.join(missing)}")
        out = volumes.copy()
        for region in REGIONS:
            out[region] = _scale(volumes[region].astype(float), minmax[region], inverse)
        return out
    missing = [r for r in REGIONS if r not in volumes]
    if missing:
        raise ValueError(f"volumes lack {', '.join(missing)}")
    scaled = {r: _scale(float(volumes[r]), minmax[r], inverse) for r in REGIONS}
    return pd.Series(scaled)[list(REGIONS)] if isinstance(volumes, pd.Series) else scaled


def _scale(value, bounds, inverse):
    lo, hi = bounds
    return value * (hi - lo) + lo if inverse else (value - lo) / (hi - lo)


def encode_context(age, sex, diagnosis, norm_volumes) -> np.ndarray:
    """The 8-value cross-attention context ``[age/100, sex, dx, 5 normalised volumes]``.

    ``norm_volumes`` is a mapping region -> normalised volume or a sequence in ``REGIONS`` order.
    Values far outside BrLP's [-0.2, 1.2] clipping range usually mean raw mm3 were passed.
    """
    if isinstance(norm_volumes, Mapping) or isinstance(norm_volumes, pd.Series):
        missing = [r for r in REGIONS if r not in norm_volumes]
        if missing:
            raise ValueError(f"normalised volumes lack {', '.join(missing)}")
        values = [float(norm_volumes[r]) for r in REGIONS]
    else:
        values = [float(v) for v in norm_volumes]
        if len(values) != len(REGIONS):
            raise ValueError(f"expected {len(REGIONS)} normalised volumes ({', '.join(REGIONS)}), got {len(values)}")
    for region, value in zip(REGIONS, values):
        if not math.isfinite(value) or not -1.0 <= value <= 2.0:
            raise ValueError(
                f"normalised volume of {region} is {value}; expected about 0-1 (were mm3 given "
                "instead of normalised volumes?)"
            )
    head = [encode_age(age), encode_sex(sex), encode_diagnosis(diagnosis)]
    return np.asarray(head + values, dtype=np.float32)
