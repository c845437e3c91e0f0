"""Projections of pooled path points (hidden states, flow states) to 2-D or 3-D for drawing, cached on disk.

* PCA:  coords = (X − mean(X)) · W_k, W_k the top-k right singular vectors (scikit-learn).
* UMAP: umap-learn on X, or on PCA_{pca_dims}(X) first when d > pca_dims ("PCA-then-UMAP": faster, and the
  neighbour graph is less noisy in 50 dims than in 576). With random_state=seed UMAP is reproducible but runs
  single-threaded.
* Explained variance (PCA only): ``Projection.explained_variance[j]`` = var(coords[:, j]) / Σ_f var(X[:, f]), the share
  of the points' total variance along component j (sklearn's ``explained_variance_ratio_``). It is computed
  from the points and the coordinates, so a cache hit reports it too, without a second file.

Results are cached as ``<cache_dir>/<key>.npy`` where key = sha256 of the points (as float32, C order), their
shape and every parameter that changes the answer. Writes are atomic (temp file + os.replace); an unreadable
or inconsistent cache file is recomputed silently.
"""
from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lft_core.atomic import save_npy
from lft_core.errors import LFTError
from lft_core.paths import cache_dir

__all__ = ["ProjectionError", "Projection", "METHODS", "default_cache_dir", "projection_key", "project",
           "explained_variance"]

METHODS: tuple[str, ...] = ("pca", "umap")


class ProjectionError(LFTError):
    """Points that cannot be projected (too many, too few, non-finite) or an unknown method."""


@dataclass(frozen=True)
class Projection:
    """A low-dimensional embedding of n points.

    coords:  shape (n, n_components), float32, row i = point i.
    method:  "pca" or "umap".
    key:     the cache key (sha256 hex) of the input points and parameters.
    cached:  True when read from the disk cache.
    seconds: wall time of this call.
    explained_variance: PCA only, one share of the total variance (0..1) per component, e.g. (0.41, 0.22);
             None for UMAP (its axes have no such meaning).
    """

    coords: np.ndarray
    method: str
    key: str
    cached: bool
    seconds: float
    explained_variance: tuple[float, ...] | None = None


def default_cache_dir() -> Path:
    """Where projections are cached: ``cache/projections`` (or ``$LFT_CACHE_DIR/projections``)."""
    return cache_dir("projections")


def projection_key(points: np.ndarray, method: str, n_components: int, seed: int, pca_dims: int,
                   n_neighbors: int, min_dist: float) -> str:
    """sha256 hex of the points (float32, C order), their shape and the projection parameters."""
    data = np.ascontiguousarray(points, dtype=np.float32)
    h = hashlib.sha256()
    h.update(repr((data.shape, method, int(n_components), int(seed), int(pca_dims), int(n_neighbors),
                   float(min_dist))).encode())
    h.update(memoryview(data).cast("B"))
    return h.hexdigest()


def _check(points: np.ndarray, method: str, n_components: int, max_points: int) -> None:
    if method not in METHODS:
        raise ProjectionError(f"unknown projection method {method!r}; choose one of {', '.join(METHODS)}")
    if n_components not in (2, 3):
        raise ProjectionError(f"n_components must be 2 or 3, got {n_components!r}")
    if points.ndim != 2:
        raise ProjectionError(f"points must have shape (n, d), got {points.shape}")
    n = points.shape[0]
    if n > max_points:
        raise ProjectionError(f"{n} points to project, the limit is {max_points}; pick fewer tokens or fewer "
                              "layers/steps, or raise max_points")
    if n < 3:
        raise ProjectionError(f"a projection needs at least 3 points, got {n}")
    if points.shape[1] < 1:
        raise ProjectionError("points have zero dimensions")
    if not np.isfinite(points).all():
        raise ProjectionError("points contain non-finite values (inf or NaN); cannot project them")


def _pca(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Top-k principal components of x (n, d); zero-padded when min(n, d) < k. Returns (n, k) float64."""
    from sklearn.decomposition import PCA

    k_fit = min(k, x.shape[0], x.shape[1])
    out = np.zeros((x.shape[0], k))
    with np.errstate(divide="ignore", invalid="ignore"):  # identical points: sklearn's variance ratio is 0/0
        out[:, :k_fit] = PCA(n_components=k_fit, random_state=seed).fit_transform(x)
    return out


def _umap(x: np.ndarray, k: int, seed: int, pca_dims: int, n_neighbors: int, min_dist: float) -> np.ndarray:
    """UMAP of x (n, d), after PCA to pca_dims when d > pca_dims. Returns (n, k)."""
    if x.shape[1] > pca_dims:
        x = _pca(x, pca_dims, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba / "n_jobs overridden by random_state" chatter
        import umap

        n = x.shape[0]
        # The spectral initialisation needs more than k + 1 points; tiny inputs start from random positions.
        reducer = umap.UMAP(n_components=k, n_neighbors=max(2, min(n_neighbors, n - 1)), min_dist=min_dist,
                            init="spectral" if n > k + 1 else "random", random_state=seed, n_jobs=1)
        try:
            return reducer.fit_transform(x)
        except (ValueError, TypeError) as e:
            raise ProjectionError(f"UMAP failed on {n} points ({e}); try PCA or more points") from e


def explained_variance(points: np.ndarray, coords: np.ndarray, chunk: int = 4096) -> tuple[float, ...]:
    """The share of the total variance of ``points`` (n, d) along each column of PCA ``coords`` (n, k).

    Both variances with ddof = 0 (the ratio equals sklearn's ``explained_variance_ratio_``); the points are
    read in row chunks, so no float64 copy of a large input is made. Zero-variance input gives zeros."""
    points = np.asarray(points)
    mean = points.mean(axis=0, dtype=np.float64)
    total = 0.0
    for start in range(0, points.shape[0], chunk):
        block = points[start:start + chunk].astype(np.float64) - mean
        total += float(np.einsum("ij,ij->", block, block))
    total /= points.shape[0]
    spread = np.asarray(coords, dtype=np.float64).var(axis=0)
    if not total > 0:
        return tuple(0.0 for _ in spread)
    return tuple(float(min(1.0, v / total)) for v in spread)


def _read_cache(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The cached coords if the file is a readable, finite float32 array of the expected shape."""
    try:
        coords = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if coords.shape != shape or coords.dtype != np.float32 or not np.isfinite(coords).all():
        return None
    return coords


def project(
    points: np.ndarray,
    method: str = "pca",
    n_components: int = 2,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    max_points: int = 50_000,
    pca_dims: int = 50,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
) -> Projection:
    """Project points (n, d) to (n, n_components) with PCA or UMAP, using the disk cache.

    points: shape (n, d), 3 ≤ n ≤ max_points, finite. method: "pca" or "umap" (case-insensitive).
    UMAP uses random_state=seed (reproducible, single-threaded), PCA to pca_dims first when d > pca_dims,
    n_neighbors clamped to n − 1. cache_dir defaults to default_cache_dir().
    PCA results carry ``explained_variance`` (cache hits included). Raises ProjectionError for bad input.
    """
    start = time.perf_counter()
    method = str(method).lower()
    points = np.asarray(points)
    _check(points, method, n_components, max_points)
    key = projection_key(points, method, n_components, seed, pca_dims, n_neighbors, min_dist)
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{key}.npy"
    shape = (points.shape[0], n_components)

    coords = _read_cache(path, shape) if path.exists() else None
    if coords is not None:
        variance = explained_variance(points, coords) if method == "pca" else None
        return Projection(coords=coords, method=method, key=key, cached=True, seconds=time.perf_counter() - start,
                          explained_variance=variance)

    x = np.asarray(points, dtype=np.float64)
    if method == "pca":
        raw = _pca(x, n_components, seed)
    else:
        raw = _umap(x, n_components, seed, pca_dims, n_neighbors, min_dist)
    coords = np.ascontiguousarray(raw, dtype=np.float32)
    if coords.shape != shape or not np.isfinite(coords).all():
        raise ProjectionError(f"{method} produced {'non-finite' if coords.shape == shape else 'misshaped'} coordinates")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npy(path, coords)
    variance = explained_variance(points, coords) if method == "pca" else None
    return Projection(coords=coords, method=method, key=key, cached=False, seconds=time.perf_counter() - start,
                      explained_variance=variance)
