"""fsaverage5 template meshes, template thickness, mesh adjacency and the Desikan-Killiany atlas.

Per-vertex data follow the NeuroAtrophy convention: left hemisphere then right
(fsaverage5: 10,242 + 10,242 = 20,484 vertices). Meshes and maps come from the
files shipped inside the nilearn wheel, so nothing here needs the network.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import scipy.sparse as sp

__all__ = [
    "TEMPLATE_VERTICES",
    "DK_NAMES",
    "template_from_n_vertices",
    "match_vertex_count",
    "Surface",
    "load_fsaverage5",
    "template_thickness",
    "Parcellation",
    "dk_atlas",
    "smooth_on_surface",
]

#: Number of vertices per hemisphere of the FreeSurfer icosahedral templates.
TEMPLATE_VERTICES = {
    "fsaverage3": 642,
    "fsaverage4": 2562,
    "fsaverage5": 10242,
    "fsaverage6": 40962,
    "fsaverage": 163842,
}

_SURFACE_KINDS = {"inflated": "inflated", "pial": "pial", "white": "white_matter", "sphere": "sphere"}
# Gap (mm) left between the hemispheres of the inflated and spherical meshes, which
# nilearn centres both on the origin.
_HEMISPHERE_GAP_MM = 5.0

# Desikan-Killiany cortical regions of one hemisphere, in FreeSurfer aparc colortable
# order without 'unknown' and 'corpuscallosum' (the ENIGMA order).
_DK_REGIONS = (
    "bankssts", "caudalanteriorcingulate", "caudalmiddlefrontal", "cuneus", "entorhinal",
    "fusiform", "inferiorparietal", "inferiortemporal", "isthmuscingulate", "lateraloccipital",
    "lateralorbitofrontal", "lingual", "medialorbitofrontal", "middletemporal", "parahippocampal",
    "paracentral", "parsopercularis", "parsorbitalis", "parstriangularis", "pericalcarine",
    "postcentral", "posteriorcingulate", "precentral", "precuneus", "rostralanteriorcingulate",
    "rostralmiddlefrontal", "superiorfrontal", "superiorparietal", "superiortemporal",
    "supramarginal", "frontalpole", "temporalpole", "transversetemporal", "insula",
)  # fmt: skip

#: The 68 Desikan-Killiany region names in ENIGMA order ("L_bankssts" ... "R_insula").
DK_NAMES = tuple(f"L_{r}" for r in _DK_REGIONS) + tuple(f"R_{r}" for r in _DK_REGIONS)

# aparc_fsa5.csv codes: 0 unknown, 1..35 left aparc (4 = corpuscallosum), 36..70 right
# (39 = corpuscallosum). Unknown and corpus callosum make up the medial wall.
_APARC_MEDIAL_WALL = (0, 4, 39)
_APARC_N_CODES = 71


def template_from_n_vertices(n_per_hemi: int) -> str:
    """Name of the fsaverage template with ``n_per_hemi`` vertices per hemisphere.

    Raises
    ------
    ValueError
        If no template has that many vertices per hemisphere.
    """
    for name, count in TEMPLATE_VERTICES.items():
        if count == n_per_hemi:
            return name
    known = ", ".join(f"{name} ({count})" for name, count in TEMPLATE_VERTICES.items())
    raise ValueError(f"No fsaverage template has {n_per_hemi} vertices per hemisphere; known: {known}")


def match_vertex_count(n: int):
    """Which fsaverage template a vertex count belongs to, for error messages.

    Returns ``(template, "hemisphere")`` when ``n`` is one hemisphere of a template,
    ``(template, "both")`` when it is both hemispheres, else None.
    """
    try:
        return template_from_n_vertices(n), "hemisphere"
    except ValueError:
        pass
    if n % 2 == 0:
        try:
            return template_from_n_vertices(n // 2), "both"
        except ValueError:
            pass
    return None


@dataclass(frozen=True, eq=False)
class Surface:
    """A two-hemisphere triangle mesh.

    Parameters
    ----------
    vertices : ndarray of shape (V, 3)
        Vertex coordinates in mm, left hemisphere first.
    faces : ndarray of shape (F, 3)
        Triangles as vertex indices into the whole mesh (right faces already offset).
    n_left : int
        Number of left-hemisphere vertices.
    name : str
        Descriptive name, e.g. ``"fsaverage5_inflated"``.
    """

    vertices: np.ndarray
    faces: np.ndarray
    n_left: int
    name: str = ""
    _adjacency: sp.csr_matrix | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        vertices = np.asarray(self.vertices, dtype=np.float64)
        faces = np.asarray(self.faces)
        if vertices.ndim != 2 or vertices.shape[1] != 3:
            raise ValueError(f"vertices must have shape (V, 3), got {vertices.shape}")
        if faces.ndim != 2 or faces.shape[1] != 3 or not np.issubdtype(faces.dtype, np.integer):
            raise ValueError(f"faces must be an integer array of shape (F, 3), got {faces.dtype} {faces.shape}")
        if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
            raise ValueError(f"faces index vertices outside 0..{len(vertices) - 1}")
        if not 0 <= int(self.n_left) <= len(vertices):
            raise ValueError(f"n_left must be within 0..{len(vertices)}, got {self.n_left}")
        # frozen dataclass: normalised values are set through object.__setattr__
        object.__setattr__(self, "vertices", vertices)
        object.__setattr__(self, "faces", faces.astype(np.int64, copy=False))
        object.__setattr__(self, "n_left", int(self.n_left))

    @property
    def n_vertices(self) -> int:
        """Total number of vertices (both hemispheres)."""
        return len(self.vertices)

    @property
    def hemisphere_slices(self) -> dict[str, slice]:
        """``{"left": slice, "right": slice}`` selecting each hemisphere's vertices."""
        return {"left": slice(0, self.n_left), "right": slice(self.n_left, self.n_vertices)}

    def adjacency(self) -> sp.csr_matrix:
        """Symmetric vertex adjacency (CSR, 1.0 for every mesh edge, empty diagonal).

        Computed once per surface; each call returns a copy, so callers may modify it.
        """
        if self._adjacency is None:
            object.__setattr__(self, "_adjacency", _adjacency_from_faces(self.faces, self.n_vertices))
        return self._adjacency.copy()


def _adjacency_from_faces(faces: np.ndarray, n_vertices: int) -> sp.csr_matrix:
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    rows = np.concatenate([edges[:, 0], edges[:, 1]])
    cols = np.concatenate([edges[:, 1], edges[:, 0]])
    adjacency = sp.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_vertices, n_vertices)).tocsr()
    # Every interior edge is shared by two faces, so duplicates summed to 2: reset to 1.
    adjacency.data[:] = 1.0
    adjacency.setdiag(0)
    adjacency.eliminate_zeros()
    return adjacency


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def load_fsaverage5(kind: str = "inflated") -> Surface:
    """The fsaverage5 mesh, both hemispheres (10,242 vertices each, left first).

    Parameters
    ----------
    kind : {"inflated", "pial", "white", "sphere"}
        Which surface. The inflated and spherical meshes are centred on the origin
        per hemisphere in the template files; here they are moved apart along x
        (left to negative x, right to positive x, 5 mm gap) so that they can be
        shown together. Pial and white surfaces keep their anatomical coordinates.

    Returns
    -------
    Surface
        A shared, cached instance whose arrays are read-only.
    """
    if kind not in _SURFACE_KINDS:
        raise ValueError(f"kind must be one of {sorted(_SURFACE_KINDS)}, got {kind!r}")
    return _load_fsaverage5_cached(kind)


@functools.lru_cache(maxsize=None)
def _load_fsaverage5_cached(kind: str) -> Surface:
    from nilearn import datasets

    mesh = datasets.load_fsaverage("fsaverage5")[_SURFACE_KINDS[kind]]
    left, right = mesh.parts["left"], mesh.parts["right"]
    lv = np.asarray(left.coordinates, dtype=np.float64)
    rv = np.asarray(right.coordinates, dtype=np.float64)
    if kind in ("inflated", "sphere"):
        half_gap = _HEMISPHERE_GAP_MM / 2
        lv[:, 0] -= lv[:, 0].max() + half_gap
        rv[:, 0] -= rv[:, 0].min() - half_gap
    faces = np.concatenate([np.asarray(left.faces), np.asarray(right.faces) + len(lv)])
    surface = Surface(np.concatenate([lv, rv]), faces, n_left=len(lv), name=f"fsaverage5_{kind}")
    _readonly(surface.vertices)
    _readonly(surface.faces)
    return surface


def template_thickness() -> np.ndarray:
    """Cortical thickness (mm) of the fsaverage5 template itself, shape ``(20484,)``.

    This is the thickness map of the FreeSurfer ``fsaverage`` subject (computed on the
    average surfaces), shipped with nilearn. It is a plausible spatial pattern, not
    population data: it carries no age, sex or site effects and no between-subject
    variance. Six medial-wall vertices carry tiny negative values (down to -0.003 mm,
    interpolation residue); they are set to 0 so that the map is a valid thickness.
    Returns a new writable array on each call.
    """
    return _template_thickness_cached().copy()


@functools.lru_cache(maxsize=None)
def _template_thickness_cached() -> np.ndarray:
    from nilearn import datasets

    image = datasets.load_fsaverage_data("fsaverage5", data_type="thickness")
    parts = image.data.parts
    thickness = np.concatenate([np.asarray(parts[hemi], dtype=np.float64) for hemi in ("left", "right")])
    return np.clip(thickness, 0.0, None)


@dataclass(eq=False)
class Parcellation:
    """Per-vertex region labels.

    Parameters
    ----------
    labels : ndarray of shape (V,), int
        0 for vertices outside every region (e.g. the medial wall), ``k`` in
        ``1..len(names)`` for region ``names[k - 1]``.
    names : list of str
        Region names; unique.
    """

    labels: np.ndarray
    names: list[str]

    def __post_init__(self):
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        self.names = [str(name) for name in self.names]
        if len(set(self.names)) != len(self.names):
            raise ValueError("names must be unique")
        if labels.size and (labels.min() < 0 or labels.max() > len(self.names)):
            raise ValueError(f"labels must lie in 0..{len(self.names)} (0 = no region)")
        self.labels = labels.astype(np.int64, copy=False)

    @property
    def n_regions(self) -> int:
        """Number of regions (medial wall not counted)."""
        return len(self.names)

    def label_of(self, name: str) -> int:
        """Label value (1-based) of region ``name``."""
        try:
            return self.names.index(name) + 1
        except ValueError:
            import difflib

            close = difflib.get_close_matches(str(name), self.names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"Unknown region name {name!r}{hint}") from None

    def region_mask(self, name: str) -> np.ndarray:
        """Boolean mask ``(V,)`` of the vertices of region ``name``."""
        return self.labels == self.label_of(name)

    @property
    def medial_wall(self) -> np.ndarray:
        """Boolean mask ``(V,)`` of the vertices in no region."""
        return self.labels == 0


def dk_atlas() -> Parcellation:
    """Desikan-Killiany parcellation of fsaverage5 (20,484 vertices, 68 regions).

    Labels are 0 on the medial wall ('unknown' and 'corpuscallosum' of FreeSurfer's
    aparc) and ``k`` = 1..68 for region ``DK_NAMES[k - 1]``, the ENIGMA order
    ("L_bankssts" ... "R_insula"). Built from the ENIGMA toolbox's
    ``aparc_fsa5.csv`` (BSD-3, see ``data/LICENSE-ENIGMA``). Returns a new object
    on each call.
    """
    return Parcellation(_dk_labels_cached().copy(), list(DK_NAMES))


@functools.lru_cache(maxsize=None)
def _dk_labels_cached() -> np.ndarray:
    source = resources.files("neuroatrophy") / "data" / "aparc_fsa5.csv"
    with resources.as_file(source) as path:
        codes = np.loadtxt(path, dtype=np.int64)
    expected = 2 * TEMPLATE_VERTICES["fsaverage5"]
    if codes.shape != (expected,) or codes.min() < 0 or codes.max() >= _APARC_N_CODES:
        raise ValueError(f"{source} is not an fsaverage5 aparc labelling (shape {codes.shape})")
    lookup = np.zeros(_APARC_N_CODES, dtype=np.int64)
    regions = np.setdiff1d(np.arange(_APARC_N_CODES), _APARC_MEDIAL_WALL)
    lookup[regions] = np.arange(1, len(regions) + 1)
    return lookup[codes]


def smooth_on_surface(data, surface: Surface, iterations: int = 1) -> np.ndarray:
    """Smooth per-vertex data by repeated averaging over each vertex and its neighbours.

    Each iteration replaces a value by the mean of itself and its mesh neighbours;
    ``k`` iterations spread a value over about ``k`` edges. NaN values propagate.

    Parameters
    ----------
    data : array of shape (V,) or (n, V)
        One map or ``n`` maps.
    surface : Surface
        Mesh with ``V`` vertices.
    iterations : int
        Number of averaging steps (0 returns a copy).

    Returns
    -------
    ndarray
        Smoothed float64 data, same shape as ``data``.
    """
    values = np.asarray(data, dtype=np.float64)
    if values.ndim not in (1, 2) or values.shape[-1] != surface.n_vertices:
        raise ValueError(
            f"data must have shape ({surface.n_vertices},) or (n, {surface.n_vertices}) "
            f"for {surface.name or 'the surface'}, got {values.shape}"
        )
    if int(iterations) != iterations or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
    # Row-normalised (A + I): one sparse product per iteration for all maps at once.
    operator = surface.adjacency() + sp.identity(surface.n_vertices, format="csr")
    operator = sp.diags(1.0 / np.asarray(operator.sum(axis=1)).ravel()) @ operator
    columns = values.T.copy()
    for _ in range(int(iterations)):
        columns = operator @ columns
    return np.ascontiguousarray(columns.T)
