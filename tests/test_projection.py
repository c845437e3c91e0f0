"""Projections: PCA keeps a line's order, UMAP runs and separates blobs, the disk cache hits, guards refuse."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lft_core.errors import LFTError
from lft_core.analysis.projection import Projection, ProjectionError, default_cache_dir, project


def _line(n: int = 40, d: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = np.linspace(-3.0, 5.0, n)
    direction = rng.standard_normal(d)
    return s[:, None] * direction + rng.standard_normal(d), s


def test_pca_of_a_line_is_monotonic_along_it(tmp_path):
    points, s = _line()
    proj = project(points, "pca", cache_dir=tmp_path)
    assert isinstance(proj, Projection)
    assert proj.coords.shape == (40, 2) and proj.coords.dtype == np.float32
    assert proj.method == "pca" and not proj.cached and len(proj.key) == 64
    first = proj.coords[:, 0]
    steps = np.diff(first)
    assert np.all(steps > 0) or np.all(steps < 0)
    # distances along the line are preserved (PCA is a rotation + shift here)
    assert abs(first[-1] - first[0]) == pytest.approx(8.0 * np.linalg.norm(points[1] - points[0]) / (s[1] - s[0]), rel=1e-4)
    assert np.abs(proj.coords[:, 1]).max() < 1e-4


def test_pca_pads_when_there_are_fewer_dimensions_than_components(tmp_path):
    points = np.random.default_rng(1).standard_normal((10, 2))
    proj = project(points, "PCA", n_components=3, cache_dir=tmp_path)
    assert proj.coords.shape == (10, 3) and np.all(proj.coords[:, 2] == 0)
    assert proj.method == "pca"


def test_cache_hit_returns_identical_coords(tmp_path):
    points, _ = _line(200, 30)
    first = project(points, "pca", cache_dir=tmp_path)
    second = project(points, "pca", cache_dir=tmp_path)
    assert second.cached and second.key == first.key and second.seconds < 1.0
    np.testing.assert_array_equal(second.coords, first.coords)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{first.key}.npy"]  # no temp files left behind
    # the same points as float32 hash the same (the key is over float32 bytes)
    assert project(points.astype(np.float32), "pca", cache_dir=tmp_path).cached
    # any parameter that changes the answer changes the key
    assert project(points, "pca", n_components=3, cache_dir=tmp_path).key != first.key
    assert project(points, "pca", seed=1, cache_dir=tmp_path).key != first.key
    assert project(points + 1e-3, "pca", cache_dir=tmp_path).key != first.key


def test_corrupt_cache_file_is_recomputed(tmp_path):
    points, _ = _line()
    good = project(points, "pca", cache_dir=tmp_path)
    path = tmp_path / f"{good.key}.npy"
    path.write_bytes(b"not a numpy file")
    again = project(points, "pca", cache_dir=tmp_path)
    assert not again.cached
    np.testing.assert_array_equal(again.coords, good.coords)
    np.save(path, np.zeros((3, 2), dtype=np.float32))  # readable, wrong shape
    assert not project(points, "pca", cache_dir=tmp_path).cached
    assert project(points, "pca", cache_dir=tmp_path).cached


def test_umap_pca_then_umap_separates_blobs_and_caches(tmp_path):
    rng = np.random.default_rng(0)
    # d = 60 > pca_dims = 50: exercises PCA-then-UMAP
    points = np.concatenate([rng.standard_normal((150, 60)), rng.standard_normal((150, 60)) + 6.0])
    proj = project(points, "umap", cache_dir=tmp_path, seed=3)
    assert proj.coords.shape == (300, 2) and np.isfinite(proj.coords).all() and not proj.cached
    a, b = proj.coords[:150], proj.coords[150:]
    gap = np.linalg.norm(a.mean(0) - b.mean(0))
    assert gap > 3 * max(a.std(0).max(), b.std(0).max())
    again = project(points, "umap", cache_dir=tmp_path, seed=3)
    assert again.cached and again.seconds < 1.0
    np.testing.assert_array_equal(again.coords, proj.coords)


def test_umap_handles_tiny_inputs(tmp_path):
    points = np.random.default_rng(2).standard_normal((3, 5))
    proj = project(points, "umap", n_components=3, cache_dir=tmp_path)
    assert proj.coords.shape == (3, 3) and np.isfinite(proj.coords).all()


def test_guards(tmp_path):
    ok = np.random.default_rng(3).standard_normal((10, 4))
    with pytest.raises(ProjectionError, match="10 points to project, the limit is 5; pick fewer tokens"):
        project(ok, cache_dir=tmp_path, max_points=5)
    with pytest.raises(ProjectionError, match="at least 3 points"):
        project(ok[:2], cache_dir=tmp_path)
    bad = ok.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ProjectionError, match="non-finite"):
        project(bad, cache_dir=tmp_path)
    with pytest.raises(ProjectionError, match="unknown projection method 'tsne'"):
        project(ok, "tsne", cache_dir=tmp_path)
    with pytest.raises(ProjectionError, match="n_components"):
        project(ok, n_components=4, cache_dir=tmp_path)
    with pytest.raises(ProjectionError, match=r"shape \(n, d\)"):
        project(ok[None], cache_dir=tmp_path)
    assert issubclass(ProjectionError, LFTError)
    assert list(tmp_path.iterdir()) == []  # nothing cached for refused input


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LFT_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere" / "projections"
    points, _ = _line()
    proj = project(points)
    assert (tmp_path / "elsewhere" / "projections" / f"{proj.key}.npy").is_file()
    assert isinstance(default_cache_dir(), Path)


def test_pca_reports_explained_variance_also_on_a_cache_hit(tmp_path):
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(5)
    a, b = rng.standard_normal(12), rng.standard_normal(12)
    points = (4.0 * rng.standard_normal((80, 1)) * a + 1.5 * rng.standard_normal((80, 1)) * b
              + 0.2 * rng.standard_normal((80, 12)))
    expected = PCA(n_components=3).fit(points).explained_variance_ratio_
    fresh = project(points, "pca", n_components=3, cache_dir=tmp_path)
    assert not fresh.cached and fresh.explained_variance is not None and len(fresh.explained_variance) == 3
    np.testing.assert_allclose(fresh.explained_variance, expected, rtol=1e-4)
    assert fresh.explained_variance[0] > 0.7 > fresh.explained_variance[1] > fresh.explained_variance[2]
    hit = project(points, "pca", n_components=3, cache_dir=tmp_path)
    assert hit.cached and hit.explained_variance == pytest.approx(fresh.explained_variance, rel=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{fresh.key}.npy"]  # nothing stored beside it
    # zero-padded components explain nothing; identical points have no variance to explain
    padded = project(rng.standard_normal((10, 2)), "pca", n_components=3, cache_dir=tmp_path)
    assert padded.explained_variance[2] == 0.0 and sum(padded.explained_variance) == pytest.approx(1.0)
    flat = project(np.ones((5, 4)), "pca", cache_dir=tmp_path)
    assert flat.explained_variance == (0.0, 0.0)


def test_umap_has_no_explained_variance(tmp_path):
    points = np.random.default_rng(6).standard_normal((12, 5))
    assert project(points, "umap", cache_dir=tmp_path).explained_variance is None
