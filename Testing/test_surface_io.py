"""Tests for neuroatrophy.surface and neuroatrophy.io."""

import gzip
import shutil
from importlib import resources

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nibabel.freesurfer import write_morph_data
from scipy.sparse.csgraph import connected_components

from neuroatrophy.cohort import read_cohort
from neuroatrophy.io import (
    atomic_write,
    find_thickness_files,
    load_cohort_surface_data,
    read_surface_data,
    write_surface_data,
)
from neuroatrophy.surface import (
    DK_NAMES,
    TEMPLATE_VERTICES,
    Parcellation,
    Surface,
    dk_atlas,
    load_fsaverage5,
    smooth_on_surface,
    template_from_n_vertices,
    template_thickness,
)

N_HEMI = 10242
N = 2 * N_HEMI


# --------------------------------------------------------------------------- surface


def test_template_from_n_vertices():
    assert template_from_n_vertices(10242) == "fsaverage5"
    assert template_from_n_vertices(163842) == "fsaverage"
    assert all(template_from_n_vertices(n) == name for name, n in TEMPLATE_VERTICES.items())
    with pytest.raises(ValueError, match="1000 vertices"):
        template_from_n_vertices(1000)


@pytest.mark.parametrize("kind", ["inflated", "pial", "white", "sphere"])
def test_load_fsaverage5_layout(kind):
    surface = load_fsaverage5(kind)
    assert surface.n_vertices == N and surface.n_left == N_HEMI
    assert surface.vertices.shape == (N, 3) and surface.faces.shape == (2 * 20480, 3)
    left, right = surface.faces[:20480], surface.faces[20480:]
    assert left.max() < N_HEMI and right.min() >= N_HEMI  # right faces offset by n_left
    assert surface.hemisphere_slices == {"left": slice(0, N_HEMI), "right": slice(N_HEMI, N)}
    assert surface.name == f"fsaverage5_{kind}"


def test_load_fsaverage5_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        load_fsaverage5("smoothwm")


def test_cached_surface_cannot_be_corrupted():
    surface = load_fsaverage5("pial")
    with pytest.raises(ValueError):
        surface.vertices[0, 0] = 1e6
    with pytest.raises(ValueError):
        surface.faces[0, 0] = 0
    with pytest.raises(AttributeError):
        surface.vertices = np.zeros((N, 3))  # frozen dataclass
    adjacency = surface.adjacency()
    adjacency.data[:] = 0  # a copy: the cached matrix is untouched
    assert surface.adjacency().sum() > 0


@pytest.mark.parametrize("kind", ["inflated", "sphere"])
def test_display_hemispheres_do_not_overlap(kind):
    surface = load_fsaverage5(kind)
    left, right = surface.hemisphere_slices.values()
    left_max, right_min = surface.vertices[left, 0].max(), surface.vertices[right, 0].min()
    assert left_max < 0 < right_min
    assert right_min - left_max == pytest.approx(5.0)


def test_adjacency_is_a_closed_sphere_per_hemisphere(fsaverage5):
    adjacency = fsaverage5.adjacency()
    assert (adjacency != adjacency.T).nnz == 0
    assert adjacency.diagonal().sum() == 0
    assert set(np.unique(adjacency.data)) == {1.0}
    for hemi in fsaverage5.hemisphere_slices.values():
        block = adjacency[hemi][:, hemi]
        n_vertices = block.shape[0]
        n_edges = block.nnz // 2
        inside = (fsaverage5.faces >= hemi.start) & (fsaverage5.faces < hemi.stop)
        n_faces = np.count_nonzero(inside.all(axis=1))
        assert n_vertices - n_edges + n_faces == 2
        assert connected_components(block, directed=False)[0] == 1
    # no edge between the hemispheres
    assert adjacency[:N_HEMI, N_HEMI:].nnz == 0


def test_surface_validates_its_arrays():
    vertices = np.zeros((3, 3))
    with pytest.raises(ValueError, match="faces"):
        Surface(vertices, np.array([[0, 1, 3]]), n_left=3)
    with pytest.raises(ValueError, match="n_left"):
        Surface(vertices, np.array([[0, 1, 2]]), n_left=4)
    with pytest.raises(ValueError, match="vertices"):
        Surface(np.zeros((3, 2)), np.array([[0, 1, 2]]), n_left=3)


def test_template_thickness_is_the_template_map():
    thickness = template_thickness()
    assert thickness.shape == (N,) and thickness.dtype == np.float64
    cortex = ~dk_atlas().medial_wall
    assert 2.0 < thickness[cortex].mean() < 3.0
    assert thickness.min() >= 0.0 and thickness.max() < 6.0
    thickness[:] = -1  # a copy: the next call is unaffected
    assert template_thickness().min() >= 0.0


def test_dk_names_follow_the_enigma_table():
    source = resources.files("neuroatrophy") / "data" / "scz_case-controls_CortThick.csv"
    with resources.as_file(source) as path:
        enigma = pd.read_csv(path)["Structure"].tolist()
    assert list(DK_NAMES) == enigma
    assert dk_atlas().names == enigma


def test_dk_atlas_regions_and_medial_wall():
    atlas = dk_atlas()
    assert atlas.n_regions == 68 and atlas.labels.shape == (N,)
    counts = np.bincount(atlas.labels, minlength=69)
    assert (counts[1:] > 0).all()
    # medial wall = aparc 'unknown' + 'corpuscallosum' of both hemispheres in aparc_fsa5.csv
    assert counts[0] == 840 + 198 + 820 + 200
    left, right = atlas.labels[:N_HEMI], atlas.labels[N_HEMI:]
    assert set(np.unique(left)) == set(range(0, 35)) and set(np.unique(right)) == {0, *range(35, 69)}
    for hemi in ("L", "R"):
        sizes = {name: counts[atlas.label_of(name)] for name in atlas.names if name.startswith(hemi)}
        assert max(sizes, key=sizes.get) == f"{hemi}_superiorfrontal"
        assert sizes[f"{hemi}_frontalpole"] < 30
    assert atlas.region_mask("L_frontalpole").sum() == 18 and atlas.region_mask("R_frontalpole").sum() == 25


def test_dk_atlas_spatial_layout():
    """Region positions on the pial surface match anatomy, so the label order is right."""
    atlas = dk_atlas()
    xyz = load_fsaverage5("pial").vertices

    def centroid(name):
        return xyz[atlas.region_mask(name)].mean(axis=0)

    for hemi, side in (("L", -1), ("R", 1)):
        names = [n for n in atlas.names if n.startswith(hemi)]
        y = {n: centroid(n)[1] for n in names}
        assert max(y, key=y.get) == f"{hemi}_frontalpole"
        assert min(y, key=y.get) == f"{hemi}_lateraloccipital"
        assert y[f"{hemi}_precentral"] > y[f"{hemi}_postcentral"]
        assert y[f"{hemi}_rostralmiddlefrontal"] > y[f"{hemi}_caudalmiddlefrontal"]
        for medial in ("cuneus", "precuneus", "paracentral", "posteriorcingulate", "medialorbitofrontal"):
            assert abs(centroid(f"{hemi}_{medial}")[0]) < 12
        for lateral in ("supramarginal", "superiortemporal", "middletemporal", "insula"):
            assert side * centroid(f"{hemi}_{lateral}")[0] > 30
        assert centroid(f"{hemi}_temporalpole")[2] < centroid(f"{hemi}_superiorfrontal")[2] - 50


def test_parcellation_lookup_errors():
    atlas = dk_atlas()
    assert atlas.label_of("L_bankssts") == 1 and atlas.label_of("R_insula") == 68
    with pytest.raises(ValueError, match="'L_precentrall'.*L_precentral"):
        atlas.region_mask("L_precentrall")
    with pytest.raises(ValueError, match=r"0\.\.2"):
        Parcellation(np.array([0, 1, 3]), ["a", "b"])


def test_smooth_on_surface(fsaverage5, rng):
    adjacency = fsaverage5.adjacency()
    vertex = 1234
    delta = np.zeros(N)
    delta[vertex] = 1.0
    once = smooth_on_surface(delta, fsaverage5, 1)
    neighbours = adjacency[vertex].indices
    assert set(np.flatnonzero(once)) == {vertex, *neighbours}
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    np.testing.assert_allclose(once[neighbours], 1.0 / (degree[neighbours] + 1))

    np.testing.assert_allclose(smooth_on_surface(np.full(N, 2.5), fsaverage5, 4), 2.5)
    noise = rng.normal(size=(3, N))
    smoothed = smooth_on_surface(noise, fsaverage5, 5)
    assert smoothed.shape == (3, N) and smoothed.std() < 0.5 * noise.std()
    np.testing.assert_allclose(smoothed[1], smooth_on_surface(noise[1], fsaverage5, 5))
    np.testing.assert_array_equal(smooth_on_surface(noise, fsaverage5, 0), noise)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        smooth_on_surface(np.zeros(5), fsaverage5, 1)
    with pytest.raises(ValueError, match="iterations"):
        smooth_on_surface(noise, fsaverage5, -1)


# --------------------------------------------------------------------------- reading and writing


@pytest.fixture
def float32_map(rng):
    # float32-representable, so that float32 formats round-trip exactly
    return rng.normal(2.5, 0.5, N_HEMI).astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("name", ["lh.thickness.fsaverage5.mgh", "x.mgz", "x.gii", "x.npy"])
def test_write_read_round_trip(tmp_path, float32_map, name):
    path = write_surface_data(tmp_path / name, float32_map)
    assert path == tmp_path / name
    back = read_surface_data(path)
    assert back.dtype == np.float64 and back.shape == (N_HEMI,)
    np.testing.assert_array_equal(back, float32_map)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left


def test_npy_keeps_float64_exactly(tmp_path, rng):
    data = rng.normal(size=100)
    write_surface_data(tmp_path / "d.npy", data)
    np.testing.assert_array_equal(read_surface_data(tmp_path / "d.npy"), data)


def test_read_gzipped_gifti_and_curv(tmp_path, float32_map):
    write_surface_data(tmp_path / "m.gii", float32_map)
    with open(tmp_path / "m.gii", "rb") as src, gzip.open(tmp_path / "m.gii.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    np.testing.assert_array_equal(read_surface_data(tmp_path / "m.gii.gz"), float32_map)
    write_morph_data(tmp_path / "lh.thickness", float32_map)
    np.testing.assert_array_equal(read_surface_data(tmp_path / "lh.thickness"), float32_map)
    write_morph_data(tmp_path / "lh.area.pial", float32_map)  # any other extension is curv too
    np.testing.assert_array_equal(read_surface_data(tmp_path / "lh.area.pial"), float32_map)


def test_read_errors_name_the_file(tmp_path, float32_map):
    with pytest.raises(FileNotFoundError, match="nothere.mgh"):
        read_surface_data(tmp_path / "nothere.mgh")
    with pytest.raises(ValueError, match="not a file"):
        read_surface_data(tmp_path)
    (tmp_path / "notes.txt").write_text("subject,thickness\n1,2\n")
    with pytest.raises(ValueError, match="Unknown format.*notes.txt"):
        read_surface_data(tmp_path / "notes.txt")
    (tmp_path / "broken.mgh").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ValueError, match="broken.mgh"):
        read_surface_data(tmp_path / "broken.mgh")
    (tmp_path / "broken.gii").write_text("<not gifti")
    with pytest.raises(ValueError, match="broken.gii"):
        read_surface_data(tmp_path / "broken.gii")
    write_morph_data(tmp_path / "lh.short", float32_map)
    content = (tmp_path / "lh.short").read_bytes()
    (tmp_path / "lh.short").write_bytes(content[:-400])
    with pytest.raises(ValueError, match="lh.short.*truncated"):
        read_surface_data(tmp_path / "lh.short")
    np.save(tmp_path / "two_d.npy", np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"two_d.npy.*\(2, 5\)"):
        read_surface_data(tmp_path / "two_d.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="objects.npy"):
        read_surface_data(tmp_path / "objects.npy")
    frames = nib.MGHImage(np.zeros((10, 1, 1, 3), dtype=np.float32), np.eye(4))
    nib.save(frames, tmp_path / "frames.mgh")
    with pytest.raises(ValueError, match=r"frames.mgh.*\(10, 3\)"):
        read_surface_data(tmp_path / "frames.mgh")


def test_write_errors(tmp_path):
    with pytest.raises(ValueError, match=r"out.csv.*unsupported"):
        write_surface_data(tmp_path / "out.csv", np.zeros(3))
    with pytest.raises(ValueError, match=r"out.npy.*\(2, 2\)"):
        write_surface_data(tmp_path / "out.npy", np.zeros((2, 2)))
    with pytest.raises(FileNotFoundError, match="missing"):
        write_surface_data(tmp_path / "missing" / "out.npy", np.zeros(3))
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_or_leaves_untouched(tmp_path):
    target = tmp_path / "result.lh.mgz"
    target.write_text("old")
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith("result.lh.mgz") and tmp != target
        tmp.write_text("new")
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["result.lh.mgz"]


# --------------------------------------------------------------------------- finding subjects' files


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_find_thickness_files_variants(tmp_path):
    # standard qcache-style names in surf/
    lh = _touch(tmp_path / "s1" / "surf" / "lh.thickness.fsaverage5.mgh")
    rh = _touch(tmp_path / "s1" / "surf" / "rh.thickness.fsaverage5.mgh")
    _touch(tmp_path / "s1" / "surf" / "lh.thickness.fwhm10.fsaverage5.mgh")
    assert find_thickness_files(tmp_path, "s1") == (lh, rh)  # the unsmoothed file wins
    # .mgz
    lh = _touch(tmp_path / "s2" / "surf" / "lh.area.fsaverage4.mgz")
    rh = _touch(tmp_path / "s2" / "surf" / "rh.area.fsaverage4.mgz")
    assert find_thickness_files(tmp_path, "s2", template="fsaverage4", measure="area") == (lh, rh)
    # only smoothed files, one per hemisphere
    lh = _touch(tmp_path / "s3" / "surf" / "lh.thickness.fwhm10.fsaverage5.mgh")
    rh = _touch(tmp_path / "s3" / "surf" / "rh.thickness.fwhm10.fsaverage5.mgh")
    assert find_thickness_files(tmp_path, "s3") == (lh, rh)
    # files directly in the subject folder
    lh = _touch(tmp_path / "s4" / "lh.thickness.fsaverage5.mgh")
    rh = _touch(tmp_path / "s4" / "rh.thickness.fsaverage5.mgh")
    assert find_thickness_files(str(tmp_path), "s4") == (lh, rh)


def test_find_thickness_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="'ghost'.*ghost"):
        find_thickness_files(tmp_path, "ghost")
    _touch(tmp_path / "s1" / "surf" / "lh.thickness.fsaverage5.mgh")
    with pytest.raises(FileNotFoundError, match=r"'s1': no rh thickness file on fsaverage5.*s1[/\\]surf"):
        find_thickness_files(tmp_path, "s1")
    for fwhm in ("5", "10"):
        _touch(tmp_path / "s2" / "surf" / f"lh.thickness.fwhm{fwhm}.fsaverage5.mgh")
    with pytest.raises(ValueError, match="'s2'.*lh.thickness.fwhm10.fsaverage5.mgh, lh.thickness.fwhm5.fsaverage5.mgh"):
        find_thickness_files(tmp_path, "s2")
    _touch(tmp_path / "s3" / "surf" / "lh.thickness.fwhm10.fsaverage5.mgh")
    _touch(tmp_path / "s3" / "surf" / "rh.thickness.fwhm5.fsaverage5.mgh")
    with pytest.raises(ValueError, match="'s3'.*do not match"):
        find_thickness_files(tmp_path, "s3")


# --------------------------------------------------------------------------- loading a cohort


def _write_subject(subjects_dir, subject_id, lh, rh, ext=".mgh"):
    surf = subjects_dir / subject_id / "surf"
    surf.mkdir(parents=True)
    write_surface_data(surf / f"lh.thickness.fsaverage5{ext}", lh)
    write_surface_data(surf / f"rh.thickness.fsaverage5{ext}", rh)


def _cohort(ids):
    return pd.DataFrame({"subject_id": ids, "age": 30.0, "sex": "F", "site": "A"})


@pytest.fixture
def subjects(tmp_path, rng):
    """Three subjects in a FreeSurfer-style subjects folder; returns (folder, data)."""
    data = rng.uniform(1.0, 4.0, size=(3, N)).astype(np.float32).astype(np.float64)
    data[:, :50] = 0.0  # zero thickness on the medial wall is normal
    for i, subject_id in enumerate(["sub-01", "sub-02", "sub-03"]):
        _write_subject(tmp_path / "subjects", subject_id, data[i, :N_HEMI], data[i, N_HEMI:])
    return tmp_path / "subjects", data


@pytest.mark.parametrize("executor", ["sequential", "joblib"])
def test_load_cohort_from_subjects_dir(subjects, executor):
    subjects_dir, data = subjects
    order = ["sub-03", "sub-01", "sub-02"]
    Y = load_cohort_surface_data(_cohort(order), subjects_dir, executor=executor, n_jobs=2)
    assert Y.shape == (3, N) and Y.dtype == np.float64
    np.testing.assert_array_equal(Y, data[[2, 0, 1]])


def test_load_cohort_from_file_columns(tmp_path, rng, in_tmp_path):
    data = rng.uniform(1.0, 4.0, size=(2, N)).astype(np.float32).astype(np.float64)
    study = tmp_path / "study"
    (study / "maps").mkdir(parents=True)
    for i, s in enumerate(["a", "b"]):
        write_surface_data(study / "maps" / f"{s}_lh.npy", data[i, :N_HEMI])
        write_surface_data(study / "maps" / f"{s}_rh.gii", data[i, N_HEMI:])
    table = study / "cohort.csv"
    table.write_text(
        "subject_id,age,sex,site,lh_file,rh_file\n"
        "a,30,F,X,maps/a_lh.npy,maps/a_rh.gii\n"
        f"b,40,M,X,{study / 'maps' / 'b_lh.npy'},maps/b_rh.gii\n"
    )
    cohort = read_cohort(table)
    np.testing.assert_array_equal(load_cohort_surface_data(cohort), data)  # relative to the table's folder
    in_code = cohort.copy()
    in_code.attrs = {}
    in_code["lh_file"] = ["study/maps/a_lh.npy", "study/maps/b_lh.npy"]
    in_code["rh_file"] = ["study/maps/a_rh.gii", "study/maps/b_rh.gii"]
    np.testing.assert_array_equal(load_cohort_surface_data(in_code), data)  # relative to cwd


def test_load_cohort_validation_names_subject_and_file(tmp_path, subjects, rng):
    subjects_dir, data = subjects
    bad_dir = tmp_path / "bad"
    good = data[0, :N_HEMI]

    _write_subject(bad_dir, "fsa4", rng.uniform(1, 3, 2562), rng.uniform(1, 3, 2562))
    message = r"'fsa4'.*lh.thickness.fsaverage5.mgh has 2562 values; fsaverage5 expects 10242.*fsaverage4"
    with pytest.raises(ValueError, match=message):
        load_cohort_surface_data(_cohort(["fsa4"]), bad_dir)

    _write_subject(bad_dir, "both", np.ones(N), np.ones(N))
    with pytest.raises(ValueError, match="'both'.*both hemispheres of fsaverage5"):
        load_cohort_surface_data(_cohort(["both"]), bad_dir)

    with_nan = good.copy()
    with_nan[[7, 9]] = np.nan
    _write_subject(bad_dir, "nan", good, with_nan)
    message = r"'nan'.*rh.thickness.fsaverage5.mgh has 2 NaN or infinite values \(first at vertex 7\)"
    with pytest.raises(ValueError, match=message):
        load_cohort_surface_data(_cohort(["nan"]), bad_dir)

    negative = good.copy()
    negative[3] = -0.5
    _write_subject(bad_dir, "neg", negative, good)
    with pytest.raises(ValueError, match=r"'neg'.*lh.thickness.fsaverage5.mgh has 1 negative thickness"):
        load_cohort_surface_data(_cohort(["neg"]), bad_dir)
    # negative values are fine for signed measures such as curvature
    for hemi, values in (("lh", negative), ("rh", good)):
        write_surface_data(bad_dir / "neg" / "surf" / f"{hemi}.curv.fsaverage5.mgh", values)
    Y = load_cohort_surface_data(_cohort(["neg"]), bad_dir, measure="curv")
    assert Y[0, 3] == -0.5

    with pytest.raises(FileNotFoundError, match="'sub-99'"):
        load_cohort_surface_data(_cohort(["sub-01", "sub-99"]), subjects_dir)
    with pytest.raises(ValueError, match="'sub-01'.*subjects_dir"):
        load_cohort_surface_data(_cohort(["sub-01"]))
    with pytest.raises(ValueError, match="template"):
        load_cohort_surface_data(_cohort(["sub-01"]), subjects_dir, template="fsaverage7")

    listed = _cohort(["x"]).assign(lh_file="nowhere_lh.mgh", rh_file="nowhere_rh.mgh")
    listed.attrs["source"] = str(tmp_path / "cohort.csv")
    with pytest.raises(FileNotFoundError, match="'x'.*nowhere_lh.mgh"):
        load_cohort_surface_data(listed)
