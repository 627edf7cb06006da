"""Null seeds for atrophy network mapping, and the specificity of a network against them.

Seed-based network maps are dominated by the connectome's degree: almost any seed of a
given size yields a similar map (van den Heuvel et al., Nat Neurosci 2025). A patient's
atrophy network therefore means something only where it departs from the maps of random
seeds *matched in size and spatial extent* to the patient's atrophy map. This module
makes such seeds and compares the observed map with the maps they give.

Two kinds of null seed:

``"grow"``
    Every connected cluster of the seed is replaced by a compact random cluster of exactly
    the same number of nodes, grown breadth-first from a random start node over the valid
    nodes (a roughly disc-shaped patch, like a real atrophic cluster); the seed's weights
    move with it, centre to border. Works on any node graph (surface mesh or voxels).
``"spin"``
    The seed is rotated on the sphere (Alexander-Bloch et al., NeuroImage 2018), which
    keeps its shape and the spacing of its clusters; surface data only.

Then :func:`specificity` (one patient) or :func:`specificity_batch` (many) give the
vertex-wise empirical p of the observed map against the null maps, the part of the
network that is specific to the patient's seed, and how much the observed map resembles
the mean null map.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components, dijkstra
from scipy.spatial import cKDTree

from .parallel import parallel_map

__all__ = ["METHODS", "matched_random_seeds", "null_seeds_for_patients", "specificity", "specificity_batch"]

#: Null seed methods.
METHODS = ("grow", "spin")

# Start nodes tried for one cluster, and fresh starts of a whole null, before giving up.
_MAX_CLUSTER_ATTEMPTS = 200
_MAX_NULL_ATTEMPTS = 20
# Spin: node radii may depart this much (relative) from the mean radius of their sphere.
_SPHERE_TOLERANCE = 0.05
# Spin: cells per cube-face side of the grid that starts the nearest-node search.
_GRID_CELLS = 96


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


def matched_random_seeds(
    seed_weights,
    adjacency,
    valid=None,
    n_null: int = 20,
    method: str = "grow",
    coordinates=None,
    seed=0,
    name=None,
) -> np.ndarray:
    """Random seeds matched in size and spatial extent to one patient's seed.

    Parameters
    ----------
    seed_weights : array of shape (V,)
        The patient's seed: a binary (0/1) atrophy mask or weights such as ``|z|``,
        zero outside the atrophic nodes.
    adjacency : scipy.sparse matrix of shape (V, V), or an object with ``.adjacency()``
        Node graph: the fsaverage5 mesh (``neuroatrophy.surface.load_fsaverage5().adjacency()``,
        or the Surface itself) or a 6-neighbour voxel graph. Only its sparsity pattern is
        used; it is symmetrised.
    valid : array of shape (V,), bool, optional
        Nodes where null seeds may lie (e.g. cortex without the medial wall). Default: all.
    n_null : int
        Number of null seeds.
    method : {"grow", "spin"}
        ``"grow"``: split the seed into its connected clusters (on ``adjacency`` restricted
        to its nonzero nodes); for every null, place for each cluster (largest first) a
        random compact cluster of exactly as many nodes, grown breadth-first from a random
        valid start node (ring by ring; within a ring, nodes touching more of the previous
        ring first, then random order, so that the cut last ring fills notches and the
        patch stays round), inside the valid nodes, neither overlapping nor touching the
        clusters already placed for that null. A start whose free area is too small is
        abandoned and its area excluded; after bounded retries a ValueError is raised. The
        cluster's weights are transferred centre to border: sorted by graph distance from
        the cluster's innermost node (the one farthest from its border), larger ``|w|``
        first within a ring, and given to the null cluster's nodes in breadth-first order.
        Each null therefore has exactly the seed's number of nonzero nodes, the same
        cluster sizes and the same multiset of weights.
        ``"spin"``: rotate the seed at random on the sphere; the right hemisphere gets the
        left hemisphere's rotation reflected in x, as in Alexander-Bloch et al. (2018).
        Each node takes the value of the node nearest to its position rotated back.
        Nodes outside ``valid`` (the medial wall) are set to zero, so spin nulls keep the
        seed's shape and cluster layout but are **not exactly size-matched**: a seed
        rotated onto the medial wall loses those nodes, and nearest-neighbour resampling
        changes the count by a few nodes.
    coordinates : array of shape (V, 3), optional
        For ``"spin"`` only: sphere coordinates of every node, e.g.
        ``load_fsaverage5("sphere").vertices``. The hemispheres are the connected components
        of ``adjacency`` (one or two, left first); each is centred on its own mean and
        projected onto the unit sphere, so per-hemisphere offsets do not matter.
    seed : int, numpy SeedSequence or Generator, optional
        Random seed (``numpy.random.default_rng(seed)``).
    name : str, optional
        Name of the seed in error messages (e.g. the subject id).

    Returns
    -------
    ndarray of shape (n_null, V)
        One null seed per row; float32 when ``seed_weights`` is float32, else float64.

    Raises
    ------
    ValueError
        On a seed without nonzero nodes, a seed larger than the valid area, a mismatched
        ``adjacency``, ``valid`` or ``coordinates``, ``n_null < 1`` or an unknown method.

    Notes
    -----
    All nulls of a seed grow together, vectorised over nulls; spin uses an exact
    nearest-node walk on the mesh instead of a k-d tree. On fsaverage5, one core, a seed
    of ~1,800 nodes in ~26 clusters takes about 2-3 ms per null with either method.
    """
    weights = _check_weights(seed_weights, _seed_label(None, name))
    n_nodes = weights.shape[0]
    graph = _prepare_graph(adjacency, n_nodes)
    valid = _check_valid(valid, n_nodes)
    n_null = _check_n_null(n_null)
    method = _check_method(method)
    sphere = _prepare_sphere(coordinates, graph, n_nodes) if method == "spin" else None
    _check_fits(weights, valid, _seed_label(None, name))
    rng = np.random.default_rng(seed)
    return _null_seeds(weights, graph, valid, n_null, method, sphere, rng, _seed_label(None, name))


def null_seeds_for_patients(
    seeds,
    adjacency,
    valid=None,
    n_null: int = 20,
    method: str = "grow",
    coordinates=None,
    seed=0,
    n_jobs=1,
    backend=None,
    progress=None,
    names=None,
) -> np.ndarray:
    """Matched random seeds for every patient (see :func:`matched_random_seeds`).

    Parameters
    ----------
    seeds : array of shape (K, V)
        One seed per patient (binary masks or weights).
    adjacency, valid, n_null, method, coordinates
        As in :func:`matched_random_seeds`.
    seed : int, numpy SeedSequence or Generator, optional
        Root seed. Patient ``k`` uses ``numpy.random.SeedSequence(seed).spawn(K)[k]``, so the
        result does not depend on ``n_jobs`` or ``backend``, and equals
        ``matched_random_seeds(seeds[k], ..., seed=that_child)``.
    n_jobs, backend
        Passed to :func:`neuroatrophy.parallel.parallel_map` (one task per patient).
    progress : callable, optional
        ``progress(fraction, message)`` after each patient; raising
        :class:`neuroatrophy.parallel.Cancelled` stops the work.
    names : sequence of str, optional
        Patient names for error messages (default: the row index).

    Returns
    -------
    ndarray of shape (K, n_null, V)
        float32 when ``seeds`` is float32, else float64.
    """
    seeds = np.asarray(seeds)
    if seeds.ndim != 2:
        raise ValueError(f"seeds must have shape (K, V), got {seeds.shape}")
    n_seeds, n_nodes = seeds.shape
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != n_seeds:
            raise ValueError(f"names has {len(names)} entries for {n_seeds} seeds")
    labels = [_seed_label(k, None if names is None else names[k]) for k in range(n_seeds)]
    weights = [_check_weights(seeds[k], labels[k]) for k in range(n_seeds)]
    graph = _prepare_graph(adjacency, n_nodes)
    valid = _check_valid(valid, n_nodes)
    n_null = _check_n_null(n_null)
    method = _check_method(method)
    sphere = _prepare_sphere(coordinates, graph, n_nodes) if method == "spin" else None
    for k in range(n_seeds):
        _check_fits(weights[k], valid, labels[k])
    children = _seed_sequence(seed).spawn(n_seeds)

    def one_patient(k):
        rng = np.random.default_rng(children[k])
        nulls = _null_seeds(weights[k], graph, valid, n_null, method, sphere, rng, labels[k])
        # Hand back only the nonzero entries: seeds are sparse, the full array is large.
        rows, nodes = np.nonzero(nulls)
        return rows, nodes, nulls[rows, nodes]

    def on_result(index, _result):
        if progress is not None:
            progress((index + 1) / n_seeds, f"Null seeds: patient {index + 1}/{n_seeds}")

    if progress is not None:
        progress(0.0, f"Null seeds ({method}) for {n_seeds} patients")
    results = parallel_map(one_patient, range(n_seeds), n_jobs=n_jobs, backend=backend, on_result=on_result)
    out = np.zeros((n_seeds, n_null, n_nodes), dtype=_output_dtype(seeds.dtype))
    for k, (rows, nodes, values) in enumerate(results):
        out[k, rows, nodes] = values
    return out


def specificity(observed_t, null_t, network_mask, sign: int = 1, alpha: float = 0.05) -> dict:
    """How specific one patient's network map is against the maps of its null seeds.

    Parameters
    ----------
    observed_t : array of shape (V,)
        The patient's seed map (t or mean Fisher z).
    null_t : array of shape (n_null, V)
        The same map for each null seed.
    network_mask : array of shape (V,), bool
        The patient's atrophy network (thresholded ``observed_t``).
    sign : {+1, -1}
        Direction of the network: +1 for positive connectivity (a null is at least as
        extreme when ``null >= observed``), -1 for negative (``null <= observed``).
    alpha : float
        Significance level of the vertex-wise empirical p.

    Returns
    -------
    dict
        ``p_map`` (V,): empirical p, ``(1 + #nulls at least as extreme) / (1 + n_null)``;
        NaN where ``observed_t`` is not finite (NaN nulls count as not extreme).
        ``specific_mask`` (V,) bool: ``network_mask & (p_map < alpha)``.
        ``specificity`` float: fraction of the network's nodes that are specific (NaN for
        an empty network). Note that with ``n_null`` nulls the smallest p is
        ``1 / (1 + n_null)``: 20 nulls are needed for any node to pass ``alpha = 0.05``.
        ``null_similarity`` float: Pearson r between ``observed_t`` and the mean null map
        over the nodes where both are finite; close to 1 means the map is what any seed of
        that size gives (degree-dominated).
        ``n_null`` int.
    """
    observed_t = np.asarray(observed_t, dtype=np.float64)
    if observed_t.ndim != 1:
        raise ValueError(f"observed_t must have shape (V,), got {observed_t.shape}")
    null_t = np.asarray(null_t)
    if null_t.ndim != 2 or null_t.shape[1] != observed_t.shape[0]:
        raise ValueError(f"null_t must have shape (n_null, {observed_t.shape[0]}), got {null_t.shape}")
    network_mask = np.asarray(network_mask)
    if network_mask.shape != observed_t.shape:
        raise ValueError(f"network_mask must have shape {observed_t.shape}, got {network_mask.shape}")
    result = specificity_batch(observed_t[None], null_t[None], network_mask[None], sign=sign, alpha=alpha)
    return {
        "p_map": result["p_map"][0],
        "specific_mask": result["specific_mask"][0],
        "specificity": float(result["specificity"][0]),
        "null_similarity": float(result["null_similarity"][0]),
        "n_null": result["n_null"],
    }


def specificity_batch(observed_t, null_t, networks, sign=1, alpha: float = 0.05) -> dict:
    """:func:`specificity` for ``K`` patients at once.

    Parameters
    ----------
    observed_t : array of shape (K, V)
    null_t : array of shape (K, n_null, V)
    networks : array of shape (K, V), bool
    sign : +1, -1 or array of shape (K,) of them
    alpha : float

    Returns
    -------
    dict
        ``p_map`` (K, V), ``specific_mask`` (K, V) bool, ``specificity`` (K,),
        ``null_similarity`` (K,) and ``n_null`` (int), each row as :func:`specificity`.
    """
    observed_t = np.asarray(observed_t, dtype=np.float64)
    if observed_t.ndim != 2:
        raise ValueError(f"observed_t must have shape (K, V), got {observed_t.shape}")
    n_maps, n_nodes = observed_t.shape
    null_t = np.asarray(null_t)
    if null_t.ndim != 3 or null_t.shape[0] != n_maps or null_t.shape[2] != n_nodes:
        raise ValueError(f"null_t must have shape ({n_maps}, n_null, {n_nodes}), got {null_t.shape}")
    n_null = null_t.shape[1]
    if n_null < 1:
        raise ValueError("null_t has no null maps (n_null = 0)")
    networks = np.asarray(networks)
    if networks.shape != observed_t.shape:
        raise ValueError(f"networks must have shape {observed_t.shape}, got {networks.shape}")
    if networks.dtype != bool:
        if not np.isin(networks, (0, 1)).all():
            raise ValueError("networks must be boolean (or 0/1) masks")
        networks = networks.astype(bool)
    signs = np.broadcast_to(np.asarray(sign), (n_maps,))
    if not np.isin(signs, (1, -1)).all():
        raise ValueError(f"sign must be +1 or -1 (or an array of them), got {sign!r}")
    if not 0 < float(alpha) < 1:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")

    # One patient at a time keeps the temporary (n_null, V) comparison small.
    # NaN compares False: a NaN null is not counted as extreme.
    n_extreme = np.empty((n_maps, n_nodes), dtype=np.int64)
    similarity = np.empty(n_maps)
    for k in range(n_maps):
        if signs[k] > 0:
            n_extreme[k] = np.count_nonzero(null_t[k] >= observed_t[k], axis=0)
        else:
            n_extreme[k] = np.count_nonzero(null_t[k] <= observed_t[k], axis=0)
        similarity[k] = _pearson(observed_t[k], null_t[k].mean(axis=0))
    p_map = (1.0 + n_extreme) / (1.0 + n_null)
    p_map[~np.isfinite(observed_t)] = np.nan
    specific = networks & (p_map < alpha)
    n_network = networks.sum(axis=1)
    fraction = np.full(n_maps, np.nan)
    fraction[n_network > 0] = specific.sum(axis=1)[n_network > 0] / n_network[n_network > 0]
    return {
        "p_map": p_map,
        "specific_mask": specific,
        "specificity": fraction,
        "null_similarity": similarity,
        "n_null": int(n_null),
    }


# ---------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------


def _seed_label(index, name) -> str:
    if name is not None:
        return f"seed {name!r}"
    if index is not None:
        return f"seed {index}"
    return "seed"


def _check_weights(seed_weights, label: str) -> np.ndarray:
    weights = np.asarray(seed_weights)
    if weights.ndim != 1:
        raise ValueError(f"{label} must have shape (V,), got {weights.shape}")
    if weights.dtype == bool:
        weights = weights.astype(np.float64)
    if not np.issubdtype(weights.dtype, np.number):
        raise ValueError(f"{label} must be numeric, got dtype {weights.dtype}")
    if not np.isfinite(weights).all():
        raise ValueError(f"{label} has non-finite weights")
    if not np.any(weights):
        raise ValueError(f"{label} has no nodes (all weights are zero)")
    return weights


def _check_fits(weights: np.ndarray, valid: np.ndarray, label: str) -> None:
    n_seed = int(np.count_nonzero(weights))
    n_valid = int(np.count_nonzero(valid))
    if n_seed > n_valid:
        raise ValueError(f"{label} has {n_seed} nodes, more than the {n_valid} valid nodes where nulls may lie")


def _check_valid(valid, n_nodes: int) -> np.ndarray:
    if valid is None:
        return np.ones(n_nodes, dtype=bool)
    valid = np.asarray(valid)
    if valid.shape != (n_nodes,):
        raise ValueError(f"valid must have shape ({n_nodes},), got {valid.shape}")
    if valid.dtype != bool:
        if not np.isin(valid, (0, 1)).all():
            raise ValueError("valid must be a boolean (or 0/1) mask")
        valid = valid.astype(bool)
    if not valid.any():
        raise ValueError("valid has no True nodes: nowhere to place null seeds")
    return valid


def _check_n_null(n_null) -> int:
    if not isinstance(n_null, (int, np.integer)) or isinstance(n_null, (bool, np.bool_)) or n_null < 1:
        raise ValueError(f"n_null must be a positive integer, got {n_null!r}")
    return int(n_null)


def _check_method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def _seed_sequence(seed) -> np.random.SeedSequence:
    if isinstance(seed, np.random.SeedSequence):
        return seed
    if isinstance(seed, np.random.Generator):
        return np.random.SeedSequence(int(seed.integers(2**63)))
    return np.random.SeedSequence(seed)


def _output_dtype(dtype) -> type:
    return np.float32 if dtype == np.float32 else np.float64


# ---------------------------------------------------------------------------------------
# Graph helpers
# ---------------------------------------------------------------------------------------


class _Graph:
    """Symmetric, unweighted adjacency with a padded neighbour table for the growth loop.

    ``table`` has one row per node plus a sentinel row; missing neighbours point to the
    sentinel node ``n_nodes``, which is never free. Growth runs on flat ids
    ``lane * (n_nodes + 1) + node`` so that all null seeds of a patient grow at once.
    """

    def __init__(self, matrix: sp.csr_matrix):
        self.matrix = matrix
        self.n_nodes = matrix.shape[0]
        self.degree = np.diff(matrix.indptr)
        self.stride = self.n_nodes + 1
        width = max(int(self.degree.max(initial=0)), 1)
        table = np.full((self.stride, width), self.n_nodes, dtype=np.int64)
        rows = np.repeat(np.arange(self.n_nodes), self.degree)
        table[rows, np.arange(rows.size) - matrix.indptr[rows]] = matrix.indices
        self.table = table

    def flat_neighbours(self, flat: np.ndarray) -> np.ndarray:
        """Neighbours (flat ids, sentinels included) of flat ids, ``table.shape[1]`` per id."""
        base = flat - flat % self.stride
        return (base[:, None] + self.table[flat % self.stride]).ravel()


def _prepare_graph(adjacency, n_nodes: int) -> _Graph:
    if hasattr(adjacency, "adjacency"):  # a Surface or a ConnectomeStore
        adjacency = adjacency.adjacency()
    if not sp.issparse(adjacency):
        raise ValueError(f"adjacency must be a scipy.sparse matrix, got {type(adjacency).__name__}")
    if adjacency.shape != (n_nodes, n_nodes):
        raise ValueError(
            f"adjacency has shape {adjacency.shape}; expected ({n_nodes}, {n_nodes}) for seeds of {n_nodes} nodes"
        )
    pattern = sp.csr_matrix(adjacency, dtype=np.float64, copy=True)
    pattern.data[:] = 1.0
    pattern = (pattern + pattern.T).tocsr()
    pattern.setdiag(0)
    pattern.eliminate_zeros()
    pattern.data[:] = 1.0
    pattern.sort_indices()
    return _Graph(pattern)


# ---------------------------------------------------------------------------------------
# Null seeds: grow
# ---------------------------------------------------------------------------------------


def _null_seeds(weights, graph, valid, n_null, method, sphere, rng, label) -> np.ndarray:
    dtype = _output_dtype(weights.dtype)
    if method == "spin":
        out = _spin_nulls(weights, sphere, graph, n_null, rng, dtype)
        out[:, ~valid] = 0
        return out
    clusters = _seed_clusters(weights, graph)
    out = np.zeros((n_null, graph.n_nodes), dtype=dtype)
    todo = np.arange(n_null)
    for _ in range(_MAX_NULL_ATTEMPTS):
        rows, complete = _grow_lanes(clusters, graph, valid, todo.size, rng)
        out[todo[complete]] = rows[complete]
        todo = todo[~complete]
        if todo.size == 0:
            return out
    sizes = [c.size for c in clusters]
    raise ValueError(
        f"Could not place random clusters of sizes {sizes} for {label} within the "
        f"{int(valid.sum())} valid nodes after {_MAX_NULL_ATTEMPTS} attempts; the seed's "
        "clusters are too large for the free area"
    )


def _seed_clusters(weights: np.ndarray, graph: _Graph) -> list[np.ndarray]:
    """The seed's connected clusters, each as its weights ordered centre to border, largest first."""
    nodes = np.flatnonzero(weights)
    sub = graph.matrix[nodes][:, nodes]
    n_clusters, labels = connected_components(sub, directed=False)
    # Border nodes have a neighbour outside the seed; depth = distance to the border.
    border = np.flatnonzero(np.diff(sub.indptr) < graph.degree[nodes])
    if border.size:
        depth = dijkstra(sub, directed=False, indices=border, unweighted=True, min_only=True)
    else:
        depth = np.zeros(nodes.size)
    # A cluster without border (a whole closed surface) has depth inf: any node is central.
    depth = np.where(np.isfinite(depth), depth, 0.0)
    by_cluster = np.lexsort((-depth, labels))
    centres = by_cluster[np.searchsorted(labels[by_cluster], np.arange(n_clusters))]
    distance = dijkstra(sub, directed=False, indices=centres, unweighted=True, min_only=True)

    values = weights[nodes]
    order = np.lexsort((-np.abs(values), distance, labels))
    sizes = np.bincount(labels, minlength=n_clusters)
    clusters = np.split(values[order], np.cumsum(sizes)[:-1])
    # Largest first: they are the hardest to fit, so they go in before space fills up.
    return sorted(clusters, key=len, reverse=True)


def _grow_lanes(clusters, graph: _Graph, valid, n_lanes: int, rng):
    """Grow ``n_lanes`` null seeds at once; returns ``(rows (n_lanes, V), complete (n_lanes,))``.

    A lane is incomplete when one of its clusters found no free area large enough
    (earlier clusters may have fragmented it); such lanes are redone by the caller.
    """
    stride = graph.stride
    free = np.zeros((n_lanes, stride), dtype=bool)
    free[:, : graph.n_nodes] = valid
    free = free.ravel()
    out = np.zeros(n_lanes * stride, dtype=clusters[0].dtype)
    alive = np.ones(n_lanes, dtype=bool)
    for cluster_weights in clusters:
        lanes = np.flatnonzero(alive)
        if lanes.size == 0:
            break
        nodes, placed = _place_cluster(cluster_weights.size, lanes, free, graph, rng)
        alive[lanes[~placed]] = False
        out[nodes.ravel()] = np.tile(cluster_weights, len(nodes))
        free[nodes.ravel()] = False
        # A one-node gap keeps null clusters apart, so they stay separate clusters.
        free[graph.flat_neighbours(nodes.ravel())] = False
    return out.reshape(n_lanes, stride)[:, : graph.n_nodes], alive


def _place_cluster(size: int, lanes: np.ndarray, free: np.ndarray, graph: _Graph, rng):
    """One compact cluster of ``size`` free nodes in each lane.

    Returns ``(nodes (n_placed, size) flat ids in breadth-first order, placed (len(lanes),))``.
    A start whose free area is too small is abandoned and that area excluded from
    later starts, since every start inside it would get stuck the same way.
    """
    placed = np.zeros(lanes.size, dtype=bool)
    nodes = np.empty((lanes.size, size), dtype=np.int64)
    no_start = None
    pending = np.arange(lanes.size)
    for _ in range(_MAX_CLUSTER_ATTEMPTS):
        starts = _random_starts(lanes[pending], free, no_start, graph, rng)
        pending = pending[starts >= 0]
        if pending.size == 0:
            break
        order, counts = _bfs_lanes(starts[starts >= 0], size, free, graph, rng)
        complete = counts == size
        in_complete = np.repeat(complete, counts)
        nodes[pending[complete]] = order[in_complete].reshape(-1, size)
        placed[pending[complete]] = True
        if complete.all():
            break
        stuck = order[~in_complete]
        free[stuck] = True
        if no_start is None:
            no_start = np.zeros(free.size, dtype=bool)
        no_start[stuck] = True
        pending = pending[~complete]
    return nodes[placed], placed


def _random_starts(lanes, free, no_start, graph: _Graph, rng) -> np.ndarray:
    """A uniformly drawn free start node (flat id) per lane, -1 where there is none."""
    starts = np.full(lanes.size, -1, dtype=np.int64)
    todo = np.arange(lanes.size)
    # Rejection sampling: cheap while free nodes are plentiful.
    for _ in range(32):
        candidates = lanes[todo] * graph.stride + rng.integers(graph.n_nodes, size=todo.size)
        ok = free[candidates] if no_start is None else free[candidates] & ~no_start[candidates]
        starts[todo[ok]] = candidates[ok]
        todo = todo[~ok]
        if todo.size == 0:
            return starts
    for index in todo:
        offset = lanes[index] * graph.stride
        row = slice(offset, offset + graph.n_nodes)
        allowed = free[row] if no_start is None else free[row] & ~no_start[row]
        candidates = np.flatnonzero(allowed)
        if candidates.size:
            starts[index] = offset + candidates[rng.integers(candidates.size)]
    return starts


def _bfs_lanes(starts: np.ndarray, size: int, free: np.ndarray, graph: _Graph, rng):
    """Breadth-first growth from each start (one per lane) up to ``size`` free nodes.

    Ring by ring; within a ring, nodes touching more of the previous ring come first
    (this fills notches, so the patch stays round) and ties are broken at random; the
    last ring is cut to the number still needed. Taken nodes are marked in ``free``.

    Returns ``(order, counts)``: the nodes of every lane, lane after lane, each in
    breadth-first order, and the number of nodes per lane (``< size`` where stuck).
    """
    n_lanes = starts.size
    free[starts] = False
    counts = np.ones(n_lanes, dtype=np.int64)
    ring, ring_lane = starts, np.arange(n_lanes)
    taken, taken_lane = [ring], [ring_lane]
    while True:
        growing = counts < size
        keep = growing[ring_lane]
        ring, ring_lane = ring[keep], ring_lane[keep]
        if ring.size == 0:
            break
        reached = graph.flat_neighbours(ring)
        reached_lane = np.repeat(ring_lane, graph.table.shape[1])
        is_free = free[reached]
        reached, reached_lane = reached[is_free], reached_lane[is_free]
        candidates, first, touching = np.unique(reached, return_index=True, return_counts=True)
        lane = reached_lane[first]
        priority = touching + rng.random(candidates.size)
        order = np.lexsort((-priority, lane))
        candidates, lane = candidates[order], lane[order]
        rank = np.arange(lane.size) - np.searchsorted(lane, lane)
        keep = rank < (size - counts)[lane]
        ring, ring_lane = candidates[keep], lane[keep]
        free[ring] = False
        counts += np.bincount(ring_lane, minlength=n_lanes)
        taken.append(ring)
        taken_lane.append(ring_lane)
    nodes = np.concatenate(taken)
    order = np.argsort(np.concatenate(taken_lane), kind="stable")
    return nodes[order], counts


# ---------------------------------------------------------------------------------------
# Spin
# ---------------------------------------------------------------------------------------


class _Sphere:
    """Per-hemisphere unit-sphere coordinates and a fast exact nearest-node search.

    Nearest nodes are found by a greedy walk on the mesh (move to the neighbour closest
    to the point until none is closer; exact on a Delaunay triangulation such as the
    fsaverage icosphere), started from a precomputed cube-map grid of nearest nodes.
    Most points start on their nearest node and are recognised as settled at once, which
    makes this about three times faster than a k-d tree query.
    """

    def __init__(self, unit: np.ndarray, hemispheres: list[np.ndarray], graph: _Graph):
        # Row n_nodes is the sentinel of the neighbour table: the zero vector, whose dot
        # product with any point (0) loses to a real node near it (close to 1).
        self.unit = np.vstack([unit, np.zeros((1, 3))])
        self.hemispheres = hemispheres
        self.table = graph.table
        # Neighbour coordinates side by side: one contiguous gather per step of the walk.
        self.neighbour_unit = self.unit[graph.table]
        # A point closer to a node than half the distance to that node's nearest neighbour
        # (on a Delaunay mesh, its nearest node overall) has found its nearest node: no
        # need to look at the neighbours. Stored as the cosine of that half angle.
        closest = np.einsum("vdk,vk->vd", self.neighbour_unit, self.unit).max(axis=1)
        self.settled = np.cos(np.arccos(np.clip(closest, -1.0, 1.0)) / 2)
        self.settled[graph.n_nodes] = 2.0  # the sentinel never settles
        self.grids = [self._grid(nodes) for nodes in hemispheres]

    def _grid(self, nodes: np.ndarray) -> np.ndarray:
        centres = (np.arange(_GRID_CELLS) + 0.5) / _GRID_CELLS * 2 - 1
        u, v = (grid.ravel() for grid in np.meshgrid(centres, centres, indexing="ij"))
        faces = []
        for face in range(6):
            axis, sign = divmod(face, 2)
            points = np.empty((u.size, 3))
            points[:, axis] = -1.0 if sign else 1.0
            points[:, (axis + 1) % 3] = u
            points[:, (axis + 2) % 3] = v
            faces.append(points)
        points = np.concatenate(faces)
        _, nearest = cKDTree(self.unit[nodes]).query(points / np.linalg.norm(points, axis=1)[:, None])
        return nodes[nearest]

    def nearest(self, points: np.ndarray, hemisphere: int) -> np.ndarray:
        """Node (global index) of ``hemisphere`` nearest each unit-sphere point."""
        best = self._grid_lookup(points, hemisphere)
        # On the unit sphere the nearest node is the one with the largest dot product.
        score = np.einsum("ak,ak->a", self.unit[best], points)
        active = np.flatnonzero(score <= self.settled[best])
        while active.size:
            scores = np.einsum("adk,ak->ad", self.neighbour_unit[best[active]], points[active])
            column = scores.argmax(axis=1)
            top = scores[np.arange(active.size), column]
            better = top > score[active]
            active, column = active[better], column[better]
            best[active] = self.table[best[active], column]
            score[active] = top[better]
            active = active[score[active] <= self.settled[best[active]]]
        return best

    def _grid_lookup(self, points: np.ndarray, hemisphere: int) -> np.ndarray:
        magnitude = np.abs(points)
        axis = magnitude.argmax(axis=1)
        rows = np.arange(points.shape[0])
        major = magnitude[rows, axis]
        face = 2 * axis + (points[rows, axis] < 0)
        u = points[rows, (axis + 1) % 3] / major
        v = points[rows, (axis + 2) % 3] / major
        i = np.clip(((u + 1) / 2 * _GRID_CELLS).astype(np.int64), 0, _GRID_CELLS - 1)
        j = np.clip(((v + 1) / 2 * _GRID_CELLS).astype(np.int64), 0, _GRID_CELLS - 1)
        return self.grids[hemisphere][(face * _GRID_CELLS + i) * _GRID_CELLS + j]


def _prepare_sphere(coordinates, graph: _Graph, n_nodes: int) -> _Sphere:
    if coordinates is None:
        raise ValueError("method='spin' needs coordinates: the sphere coordinates (V, 3) of the surface")
    coordinates = np.asarray(coordinates, dtype=np.float64)
    if coordinates.shape != (n_nodes, 3):
        raise ValueError(f"coordinates must have shape ({n_nodes}, 3), got {coordinates.shape}")
    n_parts, labels = connected_components(graph.matrix, directed=False)
    if n_parts > 2:
        raise ValueError(
            f"method='spin' needs a spherical surface mesh of one or two hemispheres; adjacency has "
            f"{n_parts} connected components (use method='grow' for volumes)"
        )
    # Components are numbered from node 0, so the left hemisphere (first nodes) comes first.
    unit = np.empty_like(coordinates)
    hemispheres = []
    for part in range(n_parts):
        nodes = np.flatnonzero(labels == part)
        centred = coordinates[nodes] - coordinates[nodes].mean(axis=0)
        radius = np.linalg.norm(centred, axis=1)
        if radius.mean() == 0 or np.abs(radius / radius.mean() - 1).max() > _SPHERE_TOLERANCE:
            raise ValueError(
                "coordinates are not sphere coordinates: the nodes of each hemisphere must lie "
                "on a sphere (e.g. load_fsaverage5('sphere').vertices)"
            )
        unit[nodes] = centred / radius[:, None]
        hemispheres.append(nodes)
    return _Sphere(unit, hemispheres, graph)


def _random_rotation(rng) -> np.ndarray:
    """A rotation drawn uniformly from SO(3) (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


_REFLECT_X = np.diag([-1.0, 1.0, 1.0])


def _spin_nulls(weights, sphere: _Sphere, graph: _Graph, n_null: int, rng, dtype) -> np.ndarray:
    out = np.zeros((n_null, graph.n_nodes), dtype=dtype)
    seed_nodes = [nodes[weights[nodes] != 0] for nodes in sphere.hemispheres]
    near = np.zeros(graph.stride, dtype=bool)
    for row in out:
        rotation = _random_rotation(rng)
        for hemisphere, nodes in enumerate(seed_nodes):
            if nodes.size == 0:
                continue
            # The right hemisphere turns as the mirror image of the left (Alexander-Bloch 2018).
            r = _REFLECT_X @ rotation @ _REFLECT_X if hemisphere == 1 else rotation
            # Where the seed lands (push), widened by one ring: only these nodes can take a
            # nonzero value, so the pull below visits a few thousand nodes, not all.
            landed = sphere.nearest(sphere.unit[nodes] @ r.T, hemisphere)
            near[:] = False
            near[landed] = True
            near[graph.table[landed]] = True
            near[graph.n_nodes] = False
            candidates = np.flatnonzero(near)
            # Each node takes the value of the node nearest its position rotated back.
            source = sphere.nearest(sphere.unit[candidates] @ r, hemisphere)
            row[candidates] = weights[source]
    return out


# ---------------------------------------------------------------------------------------


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    both = np.isfinite(x) & np.isfinite(y)
    if both.sum() < 2:
        return float("nan")
    x = x[both] - x[both].mean()
    y = y[both] - y[both].mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denominator) if denominator > 0 else float("nan")
