"""AutoAnchor: measure how well a model's anchors cover a dataset's box sizes, and search for better ones.

An anchor can be assigned a box when neither side differs from the anchor's by more than a factor ``thr``
(the loss's ``anchor_t``). The fit of a box to an anchor is the side ratio furthest from 1, written <= 1 as
smaller / larger; a box is recallable when its best fit exceeds 1 / thr.

The search: k-means on the box sizes (each axis divided by its standard deviation), then a genetic refinement
that keeps random multiplicative mutations of the anchors while they raise the mean fit of the boxes.

This module reaches the Detect head as ``model.model[-1]`` and uses only its ``anchors_px()`` and
``set_anchors_px()`` methods; it does not import the models package.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from utils.general import LOGGER
from utils.torch_utils import de_parallel

PREFIX = "AutoAnchor: "
GOOD_BPR = 0.98  # keep the current anchors above this best possible recall


# ---- metric ---------------------------------------------------------------------------------------------------------
def side_fit(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """(n, k) fit of every box ``wh`` (n, 2) to every anchor (k, 2): min over width and height of smaller / larger.

    float32 numpy: the evolution evaluates this thousands of times on small arrays, where numpy is cheapest.
    """
    boxes = np.asarray(wh, dtype=np.float32)[:, None, :]
    sizes = np.asarray(anchors, dtype=np.float32)[None, :, :]
    return (np.minimum(boxes, sizes) / np.maximum(boxes, sizes)).min(-1)


def best_possible_recall(wh: np.ndarray, anchors: np.ndarray, thr: float = 4.0) -> tuple[float, float]:
    """(BPR, anchors above threshold) of boxes ``wh`` (n, 2) against ``anchors`` (k, 2), both in pixels.

    BPR is the share of boxes that at least one anchor fits within ``thr``; the second number is the mean count
    of such anchors per box. Both tests are strict (a ratio of exactly ``thr`` does not fit).
    """
    fits_within = side_fit(wh, anchors) > 1 / thr
    per_box = fits_within.sum(1)
    return float((per_box > 0).mean()), float(per_box.mean())


def anchor_fitness(wh: np.ndarray, anchors: np.ndarray, thr: float = 4.0) -> float:
    """What the evolution maximises: each box's best fit, counted as 0 when no anchor fits it within ``thr``."""
    best = side_fit(wh, anchors).max(1)
    return float(np.where(best > 1 / thr, best, 0.0).mean())


def label_sizes(dataset, img_size: int, scale: np.ndarray | None = None) -> np.ndarray:
    """Every label's (w, h) in pixels (n, 2), images in dataset order, as seen by a model of input ``img_size``.

    ``dataset.shapes`` (images, 2) holds each image's (w, h) and ``dataset.labels`` its (class, x, y, w, h) rows,
    normalised. Each image is resized so its longer side is ``img_size``, then multiplied by its ``scale`` factor
    (images, 1), if given.
    """
    shapes = np.asarray(dataset.shapes, dtype=np.float64)
    resized = shapes * (img_size / shapes.max(1, keepdims=True))
    if scale is not None:
        resized = resized * np.asarray(scale, dtype=np.float64).reshape(-1, 1)
    rows = [np.asarray(lb, dtype=np.float32).reshape(-1, 5) for lb in dataset.labels]
    if not rows:
        return np.zeros((0, 2), dtype=np.float32)
    per_label = np.repeat(resized, [len(r) for r in rows], axis=0)
    return (np.concatenate(rows)[:, 3:5] * per_label).astype(np.float32)


# ---- check ----------------------------------------------------------------------------------------------------------
def check_anchors(dataset, model, thr: float = 4.0, imgsz: int = 640, seed: int = 0,
                  scale: np.ndarray | None = None) -> None:
    """Log the fit of the model's anchors to ``dataset``; below a BPR of 0.98 evolve new ones and keep the better.

    The box sizes are measured with one random scale in [0.9, 1.1] per image (drawn from ``seed``), as the
    scale augmentation varies them in training; ``scale`` (images, 1) gives those factors instead. New anchors go
    into the Detect head through its ``set_anchors_px``, which puts them in stride order and grid units.
    """
    head = de_parallel(model).model[-1]
    if scale is None:
        scale = np.random.default_rng(seed).uniform(0.9, 1.1, size=(len(dataset.shapes), 1))
    wh = label_sizes(dataset, imgsz, scale)
    current = head.anchors_px().detach().cpu().reshape(-1, 2).numpy()
    bpr, aat = best_possible_recall(wh, current, thr)
    fit = f"{PREFIX}best possible recall {bpr:.3f} with {aat:.2f} anchors per label within the size ratio"
    if bpr > GOOD_BPR:
        LOGGER.info(f"{fit}; the anchors suit this dataset and stay as they are")
        return
    LOGGER.info(f"{fit}; too low, searching for anchors that cover the labels better")
    proposal = kmean_anchors(dataset, n=len(current), img_size=imgsz, thr=thr, gen=1000, verbose=False, seed=seed)
    new_bpr, _ = best_possible_recall(wh, proposal, thr)
    if new_bpr <= bpr:
        LOGGER.info(f"{PREFIX}the search found nothing better (recall {new_bpr:.3f}); training with the old anchors")
        return
    head.set_anchors_px(proposal)
    LOGGER.info(f"{PREFIX}new anchors in use (recall {new_bpr:.3f}); copy them into the model YAML to reuse them")


# ---- search ---------------------------------------------------------------------------------------------------------
def _seed_anchors(wh: np.ndarray, n: int, img_size: int, rng: np.random.Generator) -> np.ndarray:
    """n starting anchors: k-means centres of the sizes whitened per axis, or uniform random sizes in
    [2, img_size] when there are fewer boxes than anchors or k-means leaves clusters empty."""
    if len(wh) >= n:
        from scipy.cluster.vq import kmeans  # imported only when a search runs, keeping scipy out of start-up

        spread = wh.std(0)
        spread[spread == 0] = 1.0  # a constant axis stays as it is
        LOGGER.info(f"{PREFIX}k-means: {n} clusters of {len(wh)} box sizes")
        centres, _ = kmeans(wh / spread, n, iter=30, rng=rng)
        if len(centres) == n:
            return centres * spread
    LOGGER.warning(f"{PREFIX}k-means cannot give {n} anchors for {len(wh)} boxes; starting from random sizes")
    return rng.uniform(2.0, max(img_size, 2.0), size=(n, 2))


def _by_area(anchors: np.ndarray) -> np.ndarray:
    return anchors[np.argsort(anchors.prod(1))]


def _mutation_factors(shape: tuple[int, int], trials: int, rng: np.random.Generator) -> np.ndarray:
    """(trials, *shape) multiplicative mutations, each different from all ones.

    Each entry changes with probability 0.9, by a normal step of standard deviation 0.1 times a per-trial strength
    drawn uniformly from [0, 1); factors are clipped to [0.3, 3].
    """
    factors = np.ones((trials, *shape))
    redo = np.ones(trials, dtype=bool)
    while redo.any():
        k = int(redo.sum())
        mask = rng.random((k, *shape)) < 0.9
        strength = rng.random((k, 1, 1))
        step = rng.standard_normal((k, *shape)) * 0.1
        factors[redo] = np.clip(1.0 + mask * strength * step, 0.3, 3.0)
        redo = (factors == 1.0).reshape(trials, -1).all(1)
    return factors


def _evolve(anchors: np.ndarray, wh: np.ndarray, thr: float, gen: int, rng: np.random.Generator,
            verbose: bool, img_size: int) -> np.ndarray:
    """Hill-climb ``gen`` mutations of ``anchors``, each kept when it raises :func:`anchor_fitness`."""
    best, score = anchors, anchor_fitness(wh, anchors, thr)
    trials = tqdm(_mutation_factors(anchors.shape, gen, rng), bar_format="{l_bar}{bar:10}{r_bar}")
    for factors in trials:
        candidate = np.maximum(best * factors, 2.0)  # anchors under 2 px make no sense
        candidate_score = anchor_fitness(wh, candidate, thr)
        if candidate_score > score:
            best, score = candidate, candidate_score
            trials.set_description(f"{PREFIX}evolving the anchors, mean best fit now {score:.4f}")
            if verbose:
                LOGGER.info(anchor_summary(best, wh, thr, img_size))
    return best


def anchor_summary(anchors: np.ndarray, wh: np.ndarray, thr: float, img_size: int) -> str:
    """Two log lines on ``anchors`` (k, 2) for boxes ``wh``: recall figures, mean fits, and the sizes themselves."""
    fit = side_fit(wh, anchors)
    best = fit.max(1)
    bpr, aat = best_possible_recall(wh, anchors, thr)
    within = fit[fit > 1 / thr]
    sizes = ", ".join(f"{round(w)},{round(h)}" for w, h in anchors)
    return (f"{PREFIX}ratio limit {thr:g}: best possible recall {bpr:.4f}, {aat:.2f} anchors per label\n"
            f"{PREFIX}{len(anchors)} anchors for img_size={img_size}: mean fit {fit.mean():.3f} (best anchor "
            f"{best.mean():.3f}, fitting pairs {within.mean() if within.size else 0.0:.3f}); sizes {sizes}")


def kmean_anchors(dataset, n: int = 9, img_size: int = 640, thr: float = 4.0, gen: int = 1000,
                  verbose: bool = True, seed: int = 0) -> np.ndarray:
    """n anchors (n, 2) in pixels, float32, smallest area first, fitted to ``dataset``'s label sizes.

    k-means seeds a genetic refinement of ``gen`` mutations (:func:`anchor_fitness`, ``thr`` being the loss's
    ``anchor_t``). Boxes under 2 px on both sides take no part. ``seed`` makes the result reproducible.
    """
    rng = np.random.default_rng(seed)
    wh_all = label_sizes(dataset, img_size)
    tiny = int((wh_all < 3.0).any(1).sum())
    if tiny:
        LOGGER.warning(f"{PREFIX}{tiny} of {len(wh_all)} labels have a side under 3 pixels at img_size={img_size}")
    wh = wh_all[(wh_all >= 2.0).any(1)]
    anchors = _by_area(_seed_anchors(wh, n, img_size, rng))
    anchors = _by_area(_evolve(anchors, wh, thr, gen, rng, verbose, img_size))
    LOGGER.info(anchor_summary(anchors, wh_all, thr, img_size))
    return anchors.astype(np.float32)
