"""rTMS target library: standard targets with citations, user targets and target ROIs.

A :class:`Target` is a sphere in MNI space (centre in mm, radius in mm). The ROI of a
target in a connectome is the set of valid nodes (fsaverage5 vertices or MNI voxels,
from ``ConnectomeStore.coordinates()`` and ``ConnectomeStore.valid``) within the
sphere.

Coordinates are MNI152 millimetres as published. fsaverage5 node coordinates are in
FreeSurfer's MNI305 space, which differs from MNI152 by a few millimetres; with 10 mm
spheres this is below the precision of the targets themselves (Fox et al. 2012 report
centimetre-scale differences between targeting rules).

Sphere radius. Every standard target uses 10 mm: the sgACC seed of Fox et al. 2012 is a
10 mm sphere, and a 10 mm sphere around each standard target holds 10 to 60 valid
fsaverage5 midthickness vertices (checked in the tests), enough for a stable mean. The
``contarg`` package draws the DLPFC group sites as 20 mm spheres, but those are search
regions for individual targeting, not stimulation sites; 20 mm spheres around the 5-cm,
F3 and BA9 sites (centres 12 to 26 mm apart) would overlap heavily.

Slicer markups (RAS) are MNI coordinates in our template space:
``neuroatrophy.mrml.points_from_markups(node)`` followed by :func:`targets_from_points`
turns a point list into user targets.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "Target",
    "STANDARD_TARGETS",
    "DEFAULT_RADIUS_MM",
    "standard_targets",
    "get_target",
    "user_target",
    "targets_from_points",
    "targets_from_table",
    "targets_table",
    "target_roi",
    "target_rois",
]

#: Default sphere radius (mm) of standard and user targets.
DEFAULT_RADIUS_MM = 10.0
_KINDS = ("standard", "user")
_TABLE_COLUMNS = ("name", "x", "y", "z", "radius_mm", "indication", "kind", "citation", "note")
_TEXT_COLUMNS = ("indication", "kind", "citation", "note")


@dataclass(frozen=True)
class Target:
    """A stimulation target: a sphere in MNI space.

    Parameters
    ----------
    name : str
        Short unique name, used as a column name in connectivity tables.
    mni : tuple of 3 float
        Centre, MNI152 coordinates in mm (RAS).
    radius_mm : float
        Sphere radius in mm.
    indication : str
        Clinical use (e.g. ``"depression"``).
    citation : str
        Source of the coordinate (short reference with doi where known).
    note : str
        How far the coordinate has been checked, derivation, caveats.
    kind : {"standard", "user"}
        Built-in library target or one defined by the user.
    """

    name: str
    mni: tuple
    radius_mm: float = DEFAULT_RADIUS_MM
    indication: str = ""
    citation: str = ""
    note: str = ""
    kind: str = "user"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"Target name must be a non-empty string, got {self.name!r}")
        name = self.name.strip()
        try:
            mni = tuple(float(value) for value in self.mni)
        except (TypeError, ValueError):
            raise ValueError(f"Target '{name}': coordinates must be 3 numbers, got {self.mni!r}") from None
        if len(mni) != 3 or not all(math.isfinite(value) for value in mni):
            raise ValueError(f"Target '{name}': coordinates must be 3 finite numbers (x, y, z in mm), got {self.mni!r}")
        try:
            radius = float(self.radius_mm)
        except (TypeError, ValueError):
            raise ValueError(f"Target '{name}': radius_mm must be a number, got {self.radius_mm!r}") from None
        if not math.isfinite(radius) or radius <= 0:
            raise ValueError(f"Target '{name}': radius_mm must be a positive number of mm, got {self.radius_mm!r}")
        if self.kind not in _KINDS:
            raise ValueError(f"Target '{name}': kind must be one of {', '.join(_KINDS)}, got {self.kind!r}")
        # frozen dataclass: normalised values are set through object.__setattr__
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "mni", mni)
        object.__setattr__(self, "radius_mm", radius)
        for field_name in ("indication", "citation", "note"):
            object.__setattr__(self, field_name, str(getattr(self, field_name) or ""))

    def describe(self) -> str:
        """``"name (x, y, z)"`` for messages and labels."""
        x, y, z = self.mni
        return f"'{self.name}' at MNI ({x:g}, {y:g}, {z:g})"


# ---------------------------------------------------------------- references
_FOX_2012 = (
    "Fox MD, Buckner RL, White MP, Greicius MD, Pascual-Leone A. Efficacy of transcranial magnetic "
    "stimulation targets for depression is related to intrinsic functional connectivity with the "
    "subgenual cingulate. Biol Psychiatry 2012;72(7):595-603. doi:10.1016/j.biopsych.2012.04.028"
)
_HERBSMAN_2009 = (
    "Herbsman T, Avery D, Ramsey D, et al. More lateral and anterior prefrontal coil location is "
    "associated with better repetitive transcranial magnetic stimulation antidepressant response. "
    "Biol Psychiatry 2009;66(5):509-515. doi:10.1016/j.biopsych.2009.04.034"
)
_BEAM_2009 = (
    "Beam W, Borckardt JJ, Reeves ST, George MS. An efficient and accurate new method for locating the "
    "F3 position for prefrontal TMS applications. Brain Stimul 2009;2(1):50-54. doi:10.1016/j.brs.2008.09.006"
)
_WEIGAND_2018 = (
    "Weigand A, Horn A, Caballero R, et al. Prospective validation that subgenual connectivity predicts "
    "antidepressant efficacy of transcranial magnetic stimulation sites. Biol Psychiatry 2018;84(1):28-37. "
    "doi:10.1016/j.biopsych.2017.10.028"
)
_CASH_2021 = (
    "Cash RFH, Weigand A, Zalesky A, et al. Using brain imaging to improve spatial targeting of transcranial "
    "magnetic stimulation for depression. Biol Psychiatry 2021;90(10):689-700"
)
_HOFFMAN_2005 = (
    "Hoffman RE, Gueorguieva R, Hawkins KA, et al. Temporoparietal transcranial magnetic stimulation for "
    "auditory hallucinations: safety, efficacy and moderators in a fifty patient sample. "
    "Biol Psychiatry 2005;58(2):97-104. doi:10.1016/j.biopsych.2005.03.041"
)
_JURAK_2007 = (
    "10-10 positions in MNI space: Jurak P, et al. 2007, as shipped by SimNIBS "
    "(simnibs/resources/ElectrodeCaps_MNI/EEG10-10_UI_Jurak_2007.csv)"
)
_CONTARG = "centre of mass of the contarg 0.0.4 ROI mask (github nih-fmrif/contarg), which tabulates Fox et al. 2012"
_DOI_FROM_MEMORY = "doi not checked against the publisher"


def _standard(name, mni, indication, citation, note):
    return Target(name, mni, DEFAULT_RADIUS_MM, indication, citation, note, kind="standard")


#: The built-in targets, in display order.
STANDARD_TARGETS = (
    _standard(
        "DLPFC_5cm", (-41, 16, 54), "depression (left DLPFC, high frequency); schizophrenia negative symptoms",
        f"{_FOX_2012}; group site of the 5-cm rule: {_HERBSMAN_2009}",
        f"Group-average '5-cm rule' site as tabulated by Fox et al. 2012; coordinate verified as the {_CONTARG}. "
        f"Often premotor/BA8 rather than DLPFC. Herbsman {_DOI_FROM_MEMORY}.",
    ),
    _standard(
        "DLPFC_F3", (-37, 26, 49), "depression (left DLPFC, high frequency); schizophrenia negative symptoms",
        f"{_FOX_2012}; F3 method: {_BEAM_2009}",
        f"Average Beam F3 site as tabulated by Fox et al. 2012; coordinate verified as the {_CONTARG}. "
        f"Beam {_DOI_FROM_MEMORY}.",
    ),
    _standard(
        "DLPFC_BA9", (-36, 39, 43), "depression (left DLPFC, high frequency)", _FOX_2012,
        f"BA9 site as tabulated by Fox et al. 2012; coordinate verified as the {_CONTARG}.",
    ),
    _standard(
        "DLPFC_BA46", (-44, 40, 29), "depression (left DLPFC, high frequency)", _FOX_2012,
        f"BA46 site as tabulated by Fox et al. 2012; coordinate verified as the {_CONTARG}.",
    ),
    _standard(
        "DLPFC_sgACC_Fox2012", (-38, 44, 26), "depression (left DLPFC, sgACC-anticorrelation optimum)", _FOX_2012,
        "Connectivity-optimised left DLPFC site (most anticorrelated with the sgACC). Unverified: coordinate "
        "from third-party code, not checked against the paper.",
    ),
    _standard(
        "DLPFC_sgACC_Weigand2018", (-42, 44, 30), "depression (left DLPFC, sgACC-anticorrelation optimum)",
        f"{_WEIGAND_2018}; reviewed in {_CASH_2021}",
        "Refined group optimum of the sgACC-anticorrelation approach. Unverified: coordinate from third-party "
        "code, not checked against the paper. No group coordinate of Cash et al. 2021 (who personalise the "
        f"target) could be checked offline, so none is listed for it. Weigand and Cash {_DOI_FROM_MEMORY}.",
    ),
    _standard(
        "sgACC", (6, 16, -10), "depression (seed of connectivity-guided DLPFC targeting)", _FOX_2012,
        "Subgenual cingulate seed (10 mm sphere in Fox et al. 2012); coordinate verified as the centre of "
        "mass of contarg's SGCsphere mask. Deep medial target: on fsaverage5 the nearest non-medial-wall "
        "vertex lies ~6 mm away and the 10 mm sphere holds ~19 valid vertices (right medial orbitofrontal, "
        "rostral anterior cingulate and lateral orbitofrontal cortex), so its surface ROI is the cortex "
        "bordering the sgACC.",
    ),
    _standard(
        "TPJ_T3P3", (-63, -50, 19), "schizophrenia, auditory verbal hallucinations (left temporoparietal, 1 Hz)",
        f"{_HOFFMAN_2005}; {_JURAK_2007}",
        "Cortical proxy of Hoffman's T3P3 site (midway between 10-20 positions T3 = T7 and P3), derived here, "
        "not a published coordinate: the fsaverage5 midthickness vertex nearest to the midpoint of the MNI "
        "positions of T7 (-82.4, -16.9, -9.3) and P3 (-55.9, -81.6, 54.0), at the border of left "
        f"supramarginal and posterior superior temporal cortex. Unverified against imaging studies. "
        f"Hoffman {_DOI_FROM_MEMORY}.",
    ),
)


def standard_targets() -> list[Target]:
    """The built-in targets (see :data:`STANDARD_TARGETS` and the module docstring)."""
    return list(STANDARD_TARGETS)


def get_target(name: str) -> Target:
    """The standard target called ``name`` (case-insensitive).

    Raises
    ------
    ValueError
        If no standard target has that name; the message lists the names.
    """
    key = str(name).strip().lower()
    for target in STANDARD_TARGETS:
        if target.name.lower() == key:
            return target
    names = ", ".join(target.name for target in STANDARD_TARGETS)
    raise ValueError(f"No standard target named {name!r}; standard targets: {names}")


def user_target(name, xyz, radius_mm=DEFAULT_RADIUS_MM, indication="", citation="", note="") -> Target:
    """A user-defined target.

    Parameters
    ----------
    name : str
        Target name.
    xyz : sequence of 3 float
        Centre in MNI mm.
    radius_mm : float
        Sphere radius in mm (positive).
    indication, citation, note : str
        Free text shown in tables.

    Raises
    ------
    ValueError
        If the name is empty, the coordinates are not 3 finite numbers or the radius
        is not positive (the message names the target).
    """
    return Target(name, xyz, radius_mm, indication, citation, note, kind="user")


def targets_from_points(points_ras, labels=None, radius_mm=DEFAULT_RADIUS_MM) -> list[Target]:
    """User targets from markup control points (e.g. from ``mrml.points_from_markups``).

    Parameters
    ----------
    points_ras : array_like of shape (n_points, 3)
        RAS positions in mm; RAS of our template space is MNI.
    labels : sequence of str, optional
        One name per point; None or empty labels become ``"point-<i>"``.
    radius_mm : float
        Sphere radius of every target.

    Raises
    ------
    ValueError
        If there are no points, the array is not (n, 3) finite, labels do not match
        the points, or two points share a name.
    """
    points = np.asarray(points_ras, dtype=float)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points_ras must have shape (n_points, 3), got {points.shape}")
    if len(points) == 0:
        raise ValueError("The markups contain no points; place at least one point to define a target")
    if labels is None:
        labels = [None] * len(points)
    labels = list(labels)
    if len(labels) != len(points):
        raise ValueError(f"Got {len(labels)} labels for {len(points)} points")
    names = [str(label).strip() if label is not None and str(label).strip() else f"point-{i + 1}"
             for i, label in enumerate(labels)]
    _check_unique(names, "markup labels")
    bad = [name for name, point in zip(names, points) if not np.all(np.isfinite(point))]
    if bad:
        raise ValueError(f"Markup points have non-finite coordinates: {', '.join(bad)}")
    return [user_target(name, point, radius_mm, note="from markups") for name, point in zip(names, points)]


def _check_unique(names, what):
    counts = Counter(name.lower() for name in names)
    duplicated = list(dict.fromkeys(name for name in names if counts[name.lower()] > 1))
    if duplicated:
        raise ValueError(f"Duplicate target names in {what} (names are case-insensitive): {', '.join(duplicated)}")


# -------------------------------------------------------------------- tables
def targets_table(targets) -> pd.DataFrame:
    """Targets as a table for display or CSV.

    Columns: ``name, x, y, z, radius_mm, indication, kind, citation, note``.
    """
    targets = _as_target_list(targets)
    rows = [
        {"name": t.name, "x": t.mni[0], "y": t.mni[1], "z": t.mni[2], "radius_mm": t.radius_mm,
         "indication": t.indication, "kind": t.kind, "citation": t.citation, "note": t.note}
        for t in targets
    ]
    return pd.DataFrame(rows, columns=list(_TABLE_COLUMNS))


def targets_from_table(table) -> list[Target]:
    """Targets from a CSV/TSV file or a DataFrame.

    Parameters
    ----------
    table : str, path-like or pandas.DataFrame
        Columns ``name, x, y, z`` (MNI mm), optional ``radius_mm`` (default 10),
        ``indication``, ``kind`` (default ``"user"``), ``citation``, ``note``.
        Column names are case-insensitive. ``.tsv``/``.txt`` files are tab-separated.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        Missing column (lists the available ones), empty table, or a bad value; the
        message names the file, the row (1-based, as in a spreadsheet without header)
        and the column.
    """
    if isinstance(table, pd.DataFrame):
        data, where = table.copy(), "Target table"
    else:
        path = Path(table)
        if not path.is_file():
            raise FileNotFoundError(f"Target table not found: {path}")
        sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
        try:
            data = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        except pd.errors.EmptyDataError:
            raise ValueError(f"Target table '{path}' is empty") from None
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise ValueError(f"Could not parse target table '{path}': {exc}") from exc
        where = f"Target table '{path}'"
    data.columns = [str(column).strip().lower() for column in data.columns]
    missing = [column for column in ("name", "x", "y", "z") if column not in data.columns]
    if missing:
        raise ValueError(
            f"{where}: missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"available columns: {', '.join(repr(c) for c in data.columns) or 'none'}"
        )
    if len(data) == 0:
        raise ValueError(f"{where} has no rows")
    targets = [_target_from_row(row, i + 1, where) for i, (_, row) in enumerate(data.iterrows())]
    _check_unique([t.name for t in targets], where)
    return targets


def _target_from_row(row, number, where) -> Target:
    name = _text(row.get("name"))
    if not name:
        raise ValueError(f"{where}, row {number}: column 'name' is empty")
    at = f"{where}, row {number} ('{name}')"
    xyz = [_number(row[column], at, column) for column in ("x", "y", "z")]
    radius = _text(row.get("radius_mm"))
    radius = DEFAULT_RADIUS_MM if not radius else _number(radius, at, "radius_mm")
    if radius <= 0:
        raise ValueError(f"{at}: column 'radius_mm' must be positive, got {radius:g}")
    kind = _text(row.get("kind")).lower() or "user"
    if kind not in _KINDS:
        raise ValueError(f"{at}: column 'kind' must be one of {', '.join(_KINDS)}, got {kind!r}")
    text = {column: _text(row.get(column)) for column in ("indication", "citation", "note")}
    return Target(name, xyz, radius, kind=kind, **text)


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _number(value, at, column) -> float:
    text = _text(value)
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{at}: column '{column}' must be a finite number, got {text!r}")
    return number


# ---------------------------------------------------------------------- ROIs
def target_roi(target: Target, coordinates, valid=None) -> np.ndarray:
    """Connectome nodes inside a target's sphere.

    Parameters
    ----------
    target : Target
    coordinates : array_like of shape (V, 3)
        MNI mm of every node (``ConnectomeStore.coordinates()``).
    valid : array_like of bool, shape (V,), optional
        Nodes with signal (``ConnectomeStore.valid``); default all.

    Returns
    -------
    ndarray of bool, shape (V,)
        Valid nodes within ``target.radius_mm`` of the centre.

    Raises
    ------
    ValueError
        If no valid node lies in the sphere (the target is outside the brain or
        outside the connectome's nodes); the message gives the distance to the
        nearest valid node.
    """
    if not isinstance(target, Target):
        raise ValueError(f"target must be a Target, got {type(target).__name__}")
    coordinates, valid = _check_nodes(coordinates, valid)
    distance = np.linalg.norm(coordinates - np.asarray(target.mni), axis=1)
    inside = (distance <= target.radius_mm) & valid
    if not inside.any():
        nearest = float(distance[valid].min())
        raise ValueError(
            f"Target {target.describe()} is outside the brain / outside the connectome: no valid node "
            f"within its {target.radius_mm:g} mm radius; the nearest valid node is {nearest:.1f} mm away"
        )
    return inside


def target_rois(targets, coordinates, valid=None) -> np.ndarray:
    """ROI weights of several targets: array (n_targets, V), 1.0 inside each sphere, else 0.

    Suitable as seed weights (``network.seed_maps``) or for averaging a map inside
    each target. Raises like :func:`target_roi`, naming the first target outside.
    """
    targets = _as_target_list(targets)
    coordinates, valid = _check_nodes(coordinates, valid)
    return np.stack([target_roi(t, coordinates, valid) for t in targets]).astype(np.float64)


def _check_nodes(coordinates, valid):
    coordinates = np.asarray(coordinates, dtype=np.float64)
    if coordinates.ndim != 2 or coordinates.shape[1] != 3 or len(coordinates) == 0:
        raise ValueError(f"coordinates must have shape (V, 3) in MNI mm, got {coordinates.shape}")
    if valid is None:
        valid = np.ones(len(coordinates), dtype=bool)
    valid = np.asarray(valid)
    if valid.shape != (len(coordinates),) or valid.dtype != bool:
        raise ValueError(
            f"valid must be a boolean array of shape ({len(coordinates)},), got {valid.dtype} {valid.shape}"
        )
    valid = valid & np.all(np.isfinite(coordinates), axis=1)
    if not valid.any():
        raise ValueError("The connectome has no valid node (valid is all False)")
    return coordinates, valid


def _as_target_list(targets) -> list[Target]:
    if isinstance(targets, Target):
        return [targets]
    targets = list(targets)
    bad = [type(t).__name__ for t in targets if not isinstance(t, Target)]
    if bad:
        raise ValueError(f"targets must be Target objects, got {', '.join(sorted(set(bad)))}")
    if not targets:
        raise ValueError("No targets given")
    return targets
