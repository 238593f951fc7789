"""AutoAnchor: check how well a model's anchors fit a dataset's boxes and evolve better ones (k-means + GA)."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from utils.torch_utils import de_parallel

LOGGER = logging.getLogger("yolov5")
PREFIX = "AutoAnchor: "


def anchor_ratio_metric(wh: np.ndarray, anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fit (n, k) of boxes ``wh`` (n, 2) to ``anchors`` (k, 2), and each box's best fit (n,).

    The fit of a box to an anchor is the worse of its width and height ratios, taken <= 1.
    Computed in numpy: thousands of tiny evaluations, where torch's per-op threading costs dearly.
    """
    r = np.asarray(wh, dtype=np.float32)[:, None] / np.asarray(anchors, dtype=np.float32)[None]
    fit = np.minimum(r, 1 / r).min(2)
    return fit, fit.max(1)


def best_possible_recall(wh: np.ndarray, anchors: np.ndarray, thr: float = 4.0) -> tuple[float, float]:
    """(BPR, anchors above threshold per target) for boxes ``wh`` (n, 2) and ``anchors`` (k, 2) in pixels.

    A box can be recalled when some anchor's w and h ratios both lie within [1/thr, thr] of it
    (the loss's anchor matching rule).
    """
    fit, best = anchor_ratio_metric(wh, anchors)
    bpr = (best > 1 / thr).mean()
    anchors_per_target = (fit > 1 / thr).sum(1).mean()
    return float(bpr), float(anchors_per_target)


def check_anchor_order(m: nn.Module) -> None:
    """Flip ``m.anchors`` (nl, na, 2) in place when their size order disagrees with the stride order.

    Anchors on the meta device (shape-only models) are left alone.
    """
    area = m.anchors.prod(-1).mean(-1).view(-1)
    da, ds = area[-1] - area[0], m.stride[-1] - m.stride[0]
    if da.device.type != "meta" and da and da.sign() != ds.sign():
        LOGGER.info(f"{PREFIX}Reversing anchor order")
        m.anchors[:] = m.anchors.flip(0)


def dataset_wh(dataset, img_size: int, scale: np.ndarray | None = None) -> np.ndarray:
    """Label widths/heights (n, 2) in pixels of images resized to long side ``img_size`` (times ``scale``)."""
    shapes = img_size * dataset.shapes / dataset.shapes.max(1, keepdims=True)
    if scale is not None:
        shapes = shapes * scale
    return np.concatenate([labels[:, 3:5] * s for s, labels in zip(shapes, dataset.labels)], 0)


def check_anchors(dataset, model: nn.Module, thr: float = 4.0, imgsz: int = 640, seed: int = 0) -> None:
    """Log the anchors' best possible recall on ``dataset``; below 0.98, evolve new anchors and keep them if better.

    Box sizes are jittered by a random scale in [0.9, 1.1] per image (seeded) as training augments them.
    New anchors are written into ``model.model[-1].anchors`` in grid units, ordered like the strides.
    """
    m = de_parallel(model).model[-1]
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.9, 1.1, size=(dataset.shapes.shape[0], 1))
    wh = dataset_wh(dataset, imgsz, scale)
    stride = m.stride.to(m.anchors.device).view(-1, 1, 1)
    anchors = (m.anchors * stride).detach().cpu().view(-1, 2).numpy()  # pixels
    bpr, aat = best_possible_recall(wh, anchors, thr)
    summary = f"{PREFIX}{aat:.2f} anchors/target, {bpr:.3f} Best Possible Recall (BPR). "
    if bpr > 0.98:
        LOGGER.info(f"{summary}Current anchors are a good fit to dataset ✅")
        return
    LOGGER.info(f"{summary}Anchors are a poor fit to dataset ⚠️, attempting to improve...")
    new = kmean_anchors(dataset, n=m.anchors.numel() // 2, img_size=imgsz, thr=thr, gen=1000, verbose=False, seed=seed)
    new_bpr, _ = best_possible_recall(wh, new, thr)
    if new_bpr > bpr:
        m.anchors[:] = torch.tensor(new, device=m.anchors.device).type_as(m.anchors).view_as(m.anchors)
        check_anchor_order(m)
        m.anchors /= stride
        LOGGER.info(f"{PREFIX}Done ✅ (optional: update model *.yaml to use these anchors in the future)")
    else:
        LOGGER.info(f"{PREFIX}Done ⚠️ (original anchors better than new anchors, proceeding with original anchors)")


def _anchor_report(k: np.ndarray, wh: np.ndarray, thr: float, img_size: int) -> str:
    """Summary of anchors ``k`` (n, 2) on boxes ``wh``; ``thr`` is the ratio fit threshold (< 1)."""
    fit, best = anchor_ratio_metric(wh, k)
    bpr, aat = (best > thr).mean(), (fit > thr).mean() * len(k)
    anchors = ", ".join(f"{round(w)},{round(h)}" for w, h in k)
    return (
        f"{PREFIX}thr={thr:.2f}: {bpr:.4f} best possible recall, {aat:.2f} anchors past thr\n"
        f"{PREFIX}n={len(k)}, img_size={img_size}, metric_all={fit.mean():.3f}/{best.mean():.3f}-mean/best, "
        f"past_thr={fit[fit > thr].mean():.3f}-mean: {anchors}"
    )


def anchor_fitness(k: np.ndarray, wh: np.ndarray, thr: float) -> float:
    """Mean best-anchor fit of the boxes, counting only fits above ``thr`` (< 1)."""
    _, best = anchor_ratio_metric(wh, k)
    return float((best * (best > thr)).mean())


def _initial_anchors(wh: np.ndarray, n: int, img_size: int, rng: np.random.Generator) -> np.ndarray:
    """k-means centres (n, 2) of whitened ``wh``, or random sizes when k-means cannot give n of them."""
    if n <= len(wh):
        LOGGER.info(f"{PREFIX}Running kmeans for {n} anchors on {len(wh)} points...")
        sigma = wh.std(0)
        from scipy.cluster.vq import kmeans  # only when anchors are recomputed: keeps scipy out of start-up

        k = kmeans(wh / sigma, n, iter=30, rng=rng)[0] * sigma
        if len(k) == n:
            return k
    LOGGER.warning(f"{PREFIX}WARNING ⚠️ switching strategies from kmeans to random init")
    return np.sort(rng.random(n * 2)).reshape(n, 2) * img_size


def _evolve(k: np.ndarray, wh: np.ndarray, thr: float, gen: int, rng: np.random.Generator, verbose: bool,
            img_size: int) -> np.ndarray:
    """Genetic refinement: mutate anchors multiplicatively ``gen`` times, keeping improvements."""
    fitness, mutation_prob, sigma = anchor_fitness(k, wh, thr), 0.9, 0.1
    pbar = tqdm(range(gen), bar_format="{l_bar}{bar:10}{r_bar}")
    for _ in pbar:
        v = np.ones(k.shape)
        while (v == 1).all():  # mutate until something changes
            mutate = rng.random(k.shape) < mutation_prob
            v = (mutate * rng.random() * rng.standard_normal(k.shape) * sigma + 1).clip(0.3, 3.0)
        candidate = (k * v).clip(min=2.0)
        candidate_fitness = anchor_fitness(candidate, wh, thr)
        if candidate_fitness > fitness:
            fitness, k = candidate_fitness, candidate
            pbar.desc = f"{PREFIX}Evolving anchors with Genetic Algorithm: fitness = {fitness:.4f}"
            if verbose:
                LOGGER.info(_anchor_report(k, wh, thr, img_size))
    return k


def kmean_anchors(dataset, n: int = 9, img_size: int = 640, thr: float = 4.0, gen: int = 1000,
                  verbose: bool = True, seed: int = 0) -> np.ndarray:
    """Anchors (n, 2) in pixels, sorted by area, evolved for ``dataset`` (``.shapes``, ``.labels``).

    k-means on the whitened label sizes (boxes under 2 px ignored) seeds a genetic algorithm that
    maximises :func:`anchor_fitness`. ``thr`` is the loss's anchor_t; ``seed`` makes it deterministic.
    """
    rng = np.random.default_rng(seed)
    thr = 1 / thr
    wh0 = dataset_wh(dataset, img_size)
    tiny = (wh0 < 3.0).any(1).sum()
    if tiny:
        LOGGER.info(
            f"{PREFIX}WARNING ⚠️ Extremely small objects found: {tiny} of {len(wh0)} labels are <3 pixels in size"
        )
    wh = wh0[(wh0 >= 2.0).any(1)].astype(np.float32)
    k = _initial_anchors(wh, n, img_size, rng)
    k = k[np.argsort(k.prod(1))]
    k = _evolve(k, wh, thr, gen, rng, verbose, img_size)
    k = k[np.argsort(k.prod(1))]
    LOGGER.info(_anchor_report(k, wh0, thr, img_size))
    return k.astype(np.float32)
