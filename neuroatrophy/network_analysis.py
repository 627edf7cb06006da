"""The cohort-level atrophy network analysis (Ji et al.): networks, convergence, specificity, targets.

:func:`analyse_networks` runs it all for a set of patient seeds and one connectome:

1. every patient's seed map and the targets' own time series in one pass over the
   connectome (:func:`neuroatrophy.network.seed_maps`);
2. thresholding into positive and negative networks, and their convergence across
   patients;
3. a null distribution from random seeds matched in size and spatial extent to each
   patient's atrophy map (:mod:`neuroatrophy.nulls`), and each network's specificity
   against it (seed maps are dominated by connectome degree: van den Heuvel et al.,
   Nat Neurosci 2025);
4. connectivity between each patient's atrophy network and each rTMS target.

:class:`NetworkAnalysis` holds the results and writes them to a folder
(``docs/atrophy-network.md`` lists the files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .network import SeedMaps, Networks, convergence_map, seed_maps, threshold_networks, target_connectivity
from .parallel import scaled_progress

__all__ = ["NetworkAnalysis", "analyse_networks", "surface_to_store", "RESULTS_FILE"]

RESULTS_FILE = "network_analysis.json"
SEED_MAPS_FILE = "seed_maps.npz"
SPECIFIC_FILE = "specificity.npz"
TARGET_PREFIX = "target:"


@dataclass(eq=False)
class NetworkAnalysis:
    """Results of :func:`analyse_networks` (all arrays are (n_patients, V) or (V,))."""

    maps: SeedMaps
    networks: Networks
    convergence_positive: np.ndarray
    convergence_negative: np.ndarray
    summary: pd.DataFrame
    target_connectivity: pd.DataFrame
    target_connectivity_roi: pd.DataFrame
    targets: pd.DataFrame
    seeds: np.ndarray
    specific_positive: np.ndarray | None = None
    specific_negative: np.ndarray | None = None
    options: dict = field(default_factory=dict)

    @property
    def patients(self) -> list[str]:
        return list(self.networks.names)

    @property
    def space(self) -> str:
        return self.maps.space

    def convergent_regions(self, fraction=0.75, sign="positive") -> pd.DataFrame:
        """Desikan-Killiany regions shared by at least ``fraction`` of patients (fsaverage5 only)."""
        from .network import convergent_regions
        from .surface import dk_atlas

        if self.space != "fsaverage5":
            raise ValueError("Convergent regions are tabulated on fsaverage5; this analysis is in " + self.space)
        percent = self.convergence_positive if sign == "positive" else self.convergence_negative
        return convergent_regions(percent, dk_atlas(), fraction)

    def specific_convergence(self, sign="positive") -> np.ndarray | None:
        """Percentage of patients whose network includes a node *and* beats the null there."""
        specific = self.specific_positive if sign == "positive" else self.specific_negative
        return None if specific is None else convergence_map(specific)

    # -- writing
    def save(self, folder, grid=None) -> Path:
        """Write maps, tables and a manifest to ``folder`` (each file atomically).

        Surface results are written as ``.mgh`` per hemisphere, volume results as NIfTI
        on ``grid`` (the store's ``(mask, affine)``).
        """
        from .io import atomic_write, safe_file_stem

        folder = Path(folder)
        (folder / "maps").mkdir(parents=True, exist_ok=True)
        self.maps.save(folder / SEED_MAPS_FILE)
        if self.specific_positive is not None:
            from .modelio import save_model_file

            save_model_file(folder / SPECIFIC_FILE, {"positive": self.specific_positive,
                                                     "negative": self.specific_negative},
                            {"model_type": "network-specificity", "patients": self.patients})
        signed = self.networks.signed()
        used_stems = set()
        for k, name in enumerate(self.patients):
            stem = safe_file_stem(name, used_stems, default="patient")
            self._write_map(folder / "maps" / f"{stem}_t", self.maps.t[k], grid)
            self._write_map(folder / "maps" / f"{stem}_network", signed[k].astype(np.float32), grid)
        self._write_map(folder / "convergence_positive", self.convergence_positive, grid)
        self._write_map(folder / "convergence_negative", self.convergence_negative, grid)
        for sign in ("positive", "negative"):
            specific = self.specific_convergence(sign)
            if specific is not None:
                self._write_map(folder / f"specific_convergence_{sign}", specific, grid)
        tables = {"networks.csv": self.summary, "targets.csv": self.targets,
                  "target_connectivity.csv": self.target_connectivity.reset_index(),
                  "target_connectivity_roi.csv": self.target_connectivity_roi.reset_index()}
        if self.space == "fsaverage5":
            tables["convergent_regions.csv"] = self.convergent_regions(self.options.get("convergence_fraction", 0.75))
        for name, table in tables.items():
            with atomic_write(folder / name) as tmp:
                table.to_csv(tmp, index=False)
        manifest = {"space": self.space, "patients": self.patients, "threshold": self.networks.threshold,
                    "n_connectome_subjects": self.maps.n_subjects, "options": self.options,
                    "files": sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))}
        with atomic_write(folder / RESULTS_FILE) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2, default=_json_default))
        return folder

    def _write_map(self, stem: Path, values, grid):
        from .io import atomic_write, write_surface_data

        values = np.asarray(values, dtype=np.float32)
        if self.space == "fsaverage5":
            half = values.size // 2
            write_surface_data(stem.parent / f"lh.{stem.name}.mgh", values[:half])
            write_surface_data(stem.parent / f"rh.{stem.name}.mgh", values[half:])
            return
        import nibabel as nib

        mask, affine = grid
        volume = np.zeros(mask.shape, np.float32)
        volume[mask] = values
        with atomic_write(stem.parent / f"{stem.name}.nii.gz") as tmp:
            nib.save(nib.Nifti1Image(volume, affine), tmp)

    @classmethod
    def load(cls, folder) -> "NetworkAnalysis":
        """Read a saved analysis back (maps from the seed-map file, tables from CSV)."""
        folder = Path(folder)
        manifest_path = folder / RESULTS_FILE
        if not manifest_path.is_file():
            raise FileNotFoundError(f"No network analysis in {folder} (missing {RESULTS_FILE})")
        manifest = json.loads(manifest_path.read_text())
        all_maps = SeedMaps.load(folder / SEED_MAPS_FILE)
        patients = manifest["patients"]
        rows = [all_maps.index(p) for p in patients]
        networks = threshold_networks(all_maps.subset(rows), manifest["threshold"])
        summary = pd.read_csv(folder / "networks.csv", dtype={"subject_id": str})
        fc = pd.read_csv(folder / "target_connectivity.csv", dtype={"subject_id": str}).set_index("subject_id")
        fc_roi = pd.read_csv(folder / "target_connectivity_roi.csv", dtype={"subject_id": str}).set_index("subject_id")
        targets = pd.read_csv(folder / "targets.csv")
        specific = (None, None)
        if (folder / SPECIFIC_FILE).is_file():
            from .modelio import load_model_file

            arrays, _ = load_model_file(folder / SPECIFIC_FILE, expected_type="network-specificity")
            specific = (arrays["positive"], arrays["negative"])
        return cls(all_maps, networks, convergence_map(networks.positive), convergence_map(networks.negative),
                   summary, fc, fc_roi, targets, seeds=np.zeros((0, 0)), specific_positive=specific[0],
                   specific_negative=specific[1], options=manifest.get("options", {}))


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


# --------------------------------------------------------------------------- surface to volume
def surface_to_store(values, store, max_distance_mm=3.0) -> np.ndarray:
    """Carry fsaverage5 vertex values (K, 20484) onto a volume store's voxels (K, V).

    Each grey-matter voxel takes the value of the nearest fsaverage5 mid-thickness
    vertex within ``max_distance_mm`` (0 beyond). fsaverage's space is MNI305, a few mm
    from MNI152: adequate for seeds made of whole atrophic clusters.
    """
    from scipy.spatial import cKDTree

    from .connectome import fsaverage5_coordinates

    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    if store.space == "fsaverage5":
        return values
    vertices = fsaverage5_coordinates()
    if values.shape[1] != len(vertices):
        raise ValueError(f"surface values must have {len(vertices)} fsaverage5 vertices, got {values.shape[1]}")
    distance, nearest = cKDTree(vertices).query(store.coordinates())
    inside = distance <= max_distance_mm
    projected = np.zeros((len(values), store.n_nodes))
    projected[:, inside] = values[:, nearest[inside]]
    return projected


# --------------------------------------------------------------------------- the analysis
def analyse_networks(store, seeds, names, targets=None, threshold="auto", alpha=0.05, n_null=40,
                     null_method="grow", convergence_fraction=0.75, engine="auto", device="cpu", n_jobs=1,
                     backend=None, seed=0, progress=None) -> NetworkAnalysis:
    """Atrophy networks of K patients in a connectome, with convergence, specificity and targets.

    Parameters
    ----------
    store : ConnectomeStore
    seeds : array (K, V_surface or V_store)
        Patient seeds (:func:`neuroatrophy.network.atrophy_seeds`); fsaverage5 seeds are
        projected onto a volume store's voxels.
    names : list of str
        Patient ids.
    targets : list of Target, optional
        rTMS targets (default :func:`neuroatrophy.targets.standard_targets`); ``[]`` for none.
    threshold : "auto" or float
        |t| threshold of the networks (``"auto"``: Bonferroni, see :func:`~neuroatrophy.network.t_threshold`).
    n_null : int
        Random seeds per patient for the specificity null (0 skips it). A vertex is
        specific when fewer than ``alpha`` of the nulls reach its t, which needs at
        more than ``1 / alpha - 1`` nulls (20 for 0.05); the default 40 gives p down to 0.024.
    null_method : {"grow", "spin"}
        Matched random clusters grown on the mesh, or spun maps (surface only).
    convergence_fraction : float
        Fraction of patients that defines a convergent region.
    engine, device, n_jobs, backend :
        See :func:`neuroatrophy.network.seed_maps`.
    seed : int
        Random seed of the null seeds.
    progress : callable(fraction, message), optional
    """
    from .targets import standard_targets, target_rois, targets_table

    targets = standard_targets() if targets is None else list(targets)
    names = [str(n) for n in names]
    if n_null and (1.0 / (1 + n_null)) >= alpha:
        raise ValueError(f"n_null={n_null} random seeds cannot give a vertex p < alpha={alpha}; "
                         f"use n_null >= {int(np.floor(1 / alpha - 1)) + 1} (or 0 to skip the specificity null)")
    patient_seeds = surface_to_store(seeds, store)
    _check_patient_seeds(patient_seeds, names, store)
    valid = store.valid
    rois = target_rois(targets, store.coordinates(), valid) if targets else np.zeros((0, store.n_nodes))
    all_seeds = np.vstack([patient_seeds, rois])
    all_names = names + [TARGET_PREFIX + t.name for t in targets]
    null_share = 0.0 if n_null == 0 else 0.7
    maps = seed_maps(store, all_seeds, all_names, engine=engine, device=device, n_jobs=n_jobs, backend=backend,
                     progress=scaled_progress(progress, 0.0, 1.0 - null_share))
    patient_maps = maps.subset(range(len(names)))
    networks = threshold_networks(patient_maps, threshold, valid=valid, alpha=alpha)
    summary = _summary(patient_maps, networks, patient_seeds)
    specific = (None, None)
    if n_null:
        specific = _specificity(store, patient_maps, networks, patient_seeds, summary, n_null, null_method, seed,
                                engine, device, n_jobs, backend, scaled_progress(progress, 1.0 - null_share, 1.0))
    fc = target_connectivity(maps, names, targets, rois, method="map") if targets else _empty_fc(names)
    fc_roi = target_connectivity(maps, names, targets, rois, method="roi") if targets else _empty_fc(names)
    options = {"threshold": threshold, "alpha": alpha, "n_null": n_null, "null_method": null_method,
               "convergence_fraction": convergence_fraction, "seed": seed, "connectome": str(store.path),
               "connectome_dtype": store.dtype, "engine": maps.metadata.get("engine")}
    if progress is not None:
        progress(1.0, "Atrophy networks done")
    return NetworkAnalysis(maps, networks, convergence_map(networks.positive), convergence_map(networks.negative),
                           summary, fc, fc_roi, targets_table(targets) if targets else pd.DataFrame(),
                           patient_seeds, specific[0], specific[1], options)


def _check_patient_seeds(seeds, names, store):
    if len(seeds) != len(names):
        raise ValueError(f"{len(seeds)} seeds for {len(names)} patient names")
    outside = [n for n, s in zip(names, seeds) if not np.any((s > 0) & store.valid)]
    if outside:
        from .cohort import format_listing

        raise ValueError(f"Seed(s) of {format_listing(outside)} have no nodes with signal in the connectome "
                         f"{store.path} (for a volume connectome: no grey-matter voxel near their atrophy)")


def _empty_fc(names):
    return pd.DataFrame(index=pd.Index(names, name="subject_id"))


def _pearson_rows(a, b):
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))


def _summary(maps, networks, seeds) -> pd.DataFrame:
    t = np.nan_to_num(maps.t.astype(np.float64))
    degree = np.broadcast_to(maps.degree.astype(np.float64), t.shape)
    return pd.DataFrame({
        "subject_id": networks.names,
        "n_seed_nodes": (seeds > 0).sum(axis=1),
        "n_positive": networks.positive.sum(axis=1),
        "n_negative": networks.negative.sum(axis=1),
        "max_t": t.max(axis=1),
        "min_t": t.min(axis=1),
        "degree_similarity": _pearson_rows(t, degree),
    })


def _specificity(store, maps, networks, seeds, summary, n_null, method, seed, engine, device, n_jobs, backend,
                 progress):
    from .nulls import null_seeds_for_patients, specificity_batch

    coordinates = _sphere_coordinates() if method == "spin" else None
    if method == "spin" and store.space != "fsaverage5":
        raise ValueError("null_method='spin' needs a fsaverage5 connectome; use 'grow' for volumes")
    nulls = null_seeds_for_patients(seeds, store.adjacency(), store.valid, n_null=n_null, method=method,
                                    coordinates=coordinates, seed=seed, n_jobs=n_jobs, backend=backend,
                                    progress=scaled_progress(progress, 0.0, 0.05), names=list(maps.names))
    k, _, v = nulls.shape
    null_t = _null_t_maps(store, nulls.reshape(k * n_null, v), engine, device, n_jobs, backend,
                          scaled_progress(progress, 0.05, 1.0)).reshape(k, n_null, v)
    observed = np.nan_to_num(maps.t.astype(np.float64))
    results = {}
    for sign, mask in ((1, networks.positive), (-1, networks.negative)):
        results[sign] = specificity_batch(observed, np.nan_to_num(null_t), mask, sign=sign)
    summary["specificity_positive"] = results[1]["specificity"]
    summary["specificity_negative"] = results[-1]["specificity"]
    summary["null_similarity"] = results[1]["null_similarity"]
    return results[1]["specific_mask"], results[-1]["specific_mask"]


def _null_t_maps(store, null_seeds, engine, device, n_jobs, backend, progress, max_bytes=2 * 2 ** 30):
    """t-maps of many null seeds, in as many passes as memory allows (float64 sums per seed)."""
    per_seed = store.n_nodes * 8 * 4
    batch = max(1, min(len(null_seeds), int(max_bytes // per_seed)))
    out = np.empty((len(null_seeds), store.n_nodes), np.float32)
    for start in range(0, len(null_seeds), batch):
        stop = min(start + batch, len(null_seeds))
        fraction = (start / len(null_seeds), stop / len(null_seeds))
        part = seed_maps(store, null_seeds[start:stop], engine=engine, device=device, n_jobs=n_jobs,
                         backend=backend, progress=scaled_progress(progress, *fraction))
        out[start:stop] = part.t
    return out


def _sphere_coordinates():
    from nilearn import datasets

    mesh = datasets.load_fsaverage("fsaverage5")["sphere"]
    return np.concatenate([np.asarray(mesh.parts[h].coordinates, dtype=np.float64) for h in ("left", "right")])
