"""Personalized atrophy maps: z threshold, minimum cluster size on the mesh, regional summary.

An individual's deviation map ``z`` (one value per vertex, negative = thinner than
expected) becomes an atrophy mask: vertices with ``z`` below a threshold, optionally
keeping only clusters (connected components on the cortical mesh) of a minimum
number of vertices, which removes isolated noisy vertices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

__all__ = ["AtrophyMap", "atrophy_map", "atrophy_maps", "regional_summary", "detection_rates"]


@dataclass(eq=False)
class AtrophyMap:
    """One subject's atrophy map.

    Attributes
    ----------
    z : ndarray of shape (V,)
        Deviation scores.
    mask : ndarray of shape (V,), bool
        Atrophic vertices (after cluster-size filtering).
    cluster_labels : ndarray of shape (V,), int
        0 for vertices that are not atrophic, ``1..K`` for the clusters, numbered by
        decreasing size. Without a mesh adjacency all atrophic vertices carry label 1.
    threshold : float
        z threshold (a vertex is atrophic when ``z < threshold``).
    min_cluster_size : int
        Minimum cluster size in vertices (0 = no filtering).
    """

    z: np.ndarray
    mask: np.ndarray
    cluster_labels: np.ndarray
    threshold: float
    min_cluster_size: int

    @property
    def n_atrophic(self) -> int:
        """Number of atrophic vertices."""
        return int(np.count_nonzero(self.mask))

    @property
    def n_clusters(self) -> int:
        """Number of clusters."""
        return int(self.cluster_labels.max(initial=0))

    def clusters(self) -> pd.DataFrame:
        """One row per cluster: ``cluster``, ``n_vertices``, ``mean_z``, ``min_z``, ``peak_vertex``.

        ``peak_vertex`` is the vertex with the lowest z. Rows are ordered by cluster
        label, i.e. by decreasing size.
        """
        labels = self.cluster_labels
        rows = []
        for cluster in range(1, self.n_clusters + 1):
            vertices = np.flatnonzero(labels == cluster)
            values = self.z[vertices]
            rows.append(
                {
                    "cluster": cluster,
                    "n_vertices": len(vertices),
                    "mean_z": float(values.mean()),
                    "min_z": float(values.min()),
                    "peak_vertex": int(vertices[np.argmin(values)]),
                }
            )
        columns = ["cluster", "n_vertices", "mean_z", "min_z", "peak_vertex"]
        return pd.DataFrame(rows, columns=columns)


def atrophy_map(z, threshold: float = -1.96, min_cluster_size: int = 0, adjacency=None, valid=None) -> AtrophyMap:
    """Threshold a deviation map and keep clusters of at least ``min_cluster_size`` vertices.

    Parameters
    ----------
    z : array of shape (V,)
        Deviation scores; NaN vertices are never atrophic.
    threshold : float
        A vertex is atrophic when ``z < threshold`` (default -1.96).
    min_cluster_size : int
        Keep only connected clusters of at least this many vertices (0 keeps all);
        needs ``adjacency``.
    adjacency : scipy.sparse matrix of shape (V, V) or Surface, optional
        Mesh adjacency (e.g. ``Surface.adjacency()``); a Surface is also accepted.
        When given, clusters are labelled even if ``min_cluster_size`` is 0.
    valid : bool array of shape (V,), optional
        Vertices that may be atrophic (e.g. ``~parcellation.medial_wall``).

    Returns
    -------
    AtrophyMap
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 1:
        raise ValueError(f"z must be a 1-D per-vertex array, got shape {z.shape}")
    adjacency, valid = _check_options(z.shape[-1], threshold, min_cluster_size, adjacency, valid)
    mask = _threshold(z, threshold, valid)
    return _make_map(z, mask, threshold, int(min_cluster_size), adjacency)


def atrophy_maps(Z, threshold: float = -1.96, min_cluster_size: int = 0, adjacency=None, valid=None) -> list:
    """:func:`atrophy_map` for each row of ``Z`` (shape ``(n_subjects, V)``); returns a list of AtrophyMap."""
    Z = np.asarray(Z, dtype=np.float64)
    if Z.ndim != 2:
        raise ValueError(f"Z must have shape (n_subjects, n_vertices), got {Z.shape}")
    adjacency, valid = _check_options(Z.shape[1], threshold, min_cluster_size, adjacency, valid)
    masks = _threshold(Z, threshold, valid)
    return [_make_map(z, mask, threshold, int(min_cluster_size), adjacency) for z, mask in zip(Z, masks)]


def _check_options(n_vertices, threshold, min_cluster_size, adjacency, valid):
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if int(min_cluster_size) != min_cluster_size or min_cluster_size < 0:
        raise ValueError(f"min_cluster_size must be a non-negative integer, got {min_cluster_size!r}")
    if hasattr(adjacency, "adjacency"):  # a Surface
        adjacency = adjacency.adjacency()
    if adjacency is None:
        if min_cluster_size > 0:
            raise ValueError("min_cluster_size > 0 needs the mesh adjacency (parameter 'adjacency')")
    else:
        if adjacency.shape != (n_vertices, n_vertices):
            raise ValueError(f"adjacency must have shape ({n_vertices}, {n_vertices}), got {adjacency.shape}")
        adjacency = sp.csr_matrix(adjacency)
    if valid is not None:
        valid = np.asarray(valid)
        if valid.shape != (n_vertices,):
            raise ValueError(f"valid must have shape ({n_vertices},), got {valid.shape}")
        if valid.dtype != bool:
            raise ValueError(f"valid must be a boolean array, got {valid.dtype}")
    return adjacency, valid


def _threshold(z: np.ndarray, threshold: float, valid) -> np.ndarray:
    mask = z < threshold  # NaN compares False
    if valid is not None:
        mask &= valid
    return mask


def _make_map(z, mask, threshold, min_cluster_size, adjacency) -> AtrophyMap:
    if adjacency is None:
        labels = mask.astype(np.int64)
    else:
        labels = _cluster_labels(mask, adjacency, min_cluster_size)
        mask = labels > 0
    return AtrophyMap(
        z=z, mask=mask, cluster_labels=labels, threshold=float(threshold), min_cluster_size=min_cluster_size
    )


def _cluster_labels(mask: np.ndarray, adjacency: sp.csr_matrix, min_size: int) -> np.ndarray:
    """Connected components of the masked vertices with at least ``min_size`` vertices, numbered 1..K by size."""
    labels = np.zeros(mask.shape, dtype=np.int64)
    vertices = np.flatnonzero(mask)
    if vertices.size == 0:
        return labels
    n_components, component = connected_components(adjacency[vertices][:, vertices], directed=False)
    sizes = np.bincount(component, minlength=n_components)
    _, first_vertex = np.unique(component, return_index=True)  # vertices are sorted: first index = lowest vertex
    order = np.lexsort((first_vertex, -sizes))  # largest first, ties by lowest vertex (deterministic)
    order = order[sizes[order] >= max(min_size, 1)]
    renumber = np.zeros(n_components, dtype=np.int64)
    renumber[order] = np.arange(1, len(order) + 1)
    labels[vertices] = renumber[component]
    return labels


def regional_summary(z, mask, parcellation) -> pd.DataFrame:
    """Per-region summary of an atrophy map.

    Parameters
    ----------
    z : array of shape (V,)
        Deviation scores.
    mask : bool array of shape (V,)
        Atrophic vertices.
    parcellation : Parcellation
        Region labels (0 = medial wall, excluded).

    Returns
    -------
    pandas.DataFrame
        One row per region with ``region``, ``hemisphere`` (``"left"``/``"right"`` from
        the ``L_``/``R_`` name prefix, else ``""``), ``n_vertices``, ``n_atrophic``,
        ``fraction_atrophic``, ``mean_z`` and ``min_z`` (over the region's finite z),
        sorted by ``fraction_atrophic`` (descending) then ``mean_z`` (ascending).
    """
    labels = parcellation.labels
    n_vertices = len(labels)
    z = np.asarray(z, dtype=np.float64)
    mask = np.asarray(mask)
    if z.shape != (n_vertices,):
        raise ValueError(f"z must have shape ({n_vertices},) like the parcellation, got {z.shape}")
    if mask.shape != (n_vertices,) or mask.dtype != bool:
        raise ValueError(f"mask must be a boolean array of shape ({n_vertices},), got {mask.dtype} {mask.shape}")
    n_bins = parcellation.n_regions + 1
    finite = np.isfinite(z)
    size = np.bincount(labels, minlength=n_bins)
    atrophic = np.bincount(labels[mask], minlength=n_bins)
    n_finite = np.bincount(labels[finite], minlength=n_bins)
    total = np.bincount(labels[finite], weights=z[finite], minlength=n_bins)
    lowest = np.full(n_bins, np.inf)
    np.minimum.at(lowest, labels[finite], z[finite])
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(size > 0, atrophic / size, np.nan)
        mean_z = np.where(n_finite > 0, total / n_finite, np.nan)
    lowest[n_finite == 0] = np.nan
    summary = pd.DataFrame(
        {
            "region": parcellation.names,
            "hemisphere": [_hemisphere(name) for name in parcellation.names],
            "n_vertices": size[1:],
            "n_atrophic": atrophic[1:],
            "fraction_atrophic": fraction[1:],
            "mean_z": mean_z[1:],
            "min_z": lowest[1:],
        }
    )
    summary = summary.sort_values(["fraction_atrophic", "mean_z"], ascending=[False, True], kind="mergesort")
    return summary.reset_index(drop=True)


def _hemisphere(name: str) -> str:
    prefix = name[:2].upper()
    return {"L_": "left", "R_": "right"}.get(prefix, "")


def detection_rates(predicted_mask, true_mask, valid=None) -> dict:
    """Agreement between a predicted and a true atrophy mask.

    Parameters
    ----------
    predicted_mask, true_mask : bool arrays of the same shape
        ``(V,)`` for one subject or ``(n, V)`` to pool subjects.
    valid : bool array of shape (V,), optional
        Vertices to count (e.g. outside the medial wall); applied to every subject.

    Returns
    -------
    dict
        ``sensitivity`` TP/(TP+FN), ``specificity`` TN/(TN+FP), ``precision``
        TP/(TP+FP) and ``dice`` 2TP/(2TP+FP+FN); NaN where the denominator is 0.
    """
    predicted = np.asarray(predicted_mask)
    truth = np.asarray(true_mask)
    if predicted.dtype != bool or truth.dtype != bool:
        raise ValueError(f"predicted_mask and true_mask must be boolean, got {predicted.dtype} and {truth.dtype}")
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted_mask {predicted.shape} and true_mask {truth.shape} differ in shape")
    if valid is not None:
        valid = np.asarray(valid)
        if valid.dtype != bool or valid.shape != predicted.shape[-1:]:
            raise ValueError(
                f"valid must be a boolean array of shape {predicted.shape[-1:]}, got {valid.dtype} {valid.shape}"
            )
        predicted, truth = predicted[..., valid], truth[..., valid]
    tp = np.count_nonzero(predicted & truth)
    fp = np.count_nonzero(predicted & ~truth)
    fn = np.count_nonzero(~predicted & truth)
    tn = np.count_nonzero(~predicted & ~truth)
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def _ratio(numerator: int, denominator: int) -> float:
    return float(numerator / denominator) if denominator else float("nan")
