"""Hyperparameter evolution (train.py --evolve N): a genetic search over the hyp file's values.

Each generation mutates the best previous hyperparameters (fitness-weighted choice among the top five
from evolve.csv), trains once, and appends its results; hyp_evolve.yaml holds the best set found.
"""

from __future__ import annotations

import argparse
from copy import deepcopy
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from utils.general import LOGGER, colorstr, yaml_save
from utils.metrics import fitness

# key: (mutation scale 0-1, lower bound, upper bound)
SEARCH_SPACE = {
    "lr0": (1, 1e-5, 1e-1), "lrf": (1, 0.01, 1.0), "momentum": (0.3, 0.6, 0.98), "weight_decay": (1, 0.0, 0.001),
    "warmup_epochs": (1, 0.0, 5.0), "warmup_momentum": (1, 0.0, 0.95), "warmup_bias_lr": (1, 0.0, 0.2),
    "box": (1, 0.02, 0.2), "cls": (1, 0.2, 4.0), "cls_pw": (1, 0.5, 2.0), "obj": (1, 0.2, 4.0),
    "obj_pw": (1, 0.5, 2.0), "iou_t": (0, 0.1, 0.7), "anchor_t": (1, 2.0, 8.0), "fl_gamma": (0, 0.0, 2.0),
    "hsv_h": (1, 0.0, 0.1), "hsv_s": (1, 0.0, 0.9), "hsv_v": (1, 0.0, 0.9), "degrees": (1, 0.0, 45.0),
    "translate": (1, 0.0, 0.9), "scale": (1, 0.0, 0.9), "shear": (1, 0.0, 10.0), "perspective": (0, 0.0, 0.001),
    "flipud": (1, 0.0, 1.0), "fliplr": (0, 0.0, 1.0), "mosaic": (1, 0.0, 1.0), "mixup": (1, 0.0, 1.0),
}
RESULT_COLUMNS = ("metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
                  "val/box_loss", "val/obj_loss", "val/cls_loss")


def mutate(hyp: dict, history: np.ndarray, rng: np.random.Generator, keys: list[str]) -> dict:
    """A child of the best rows of ``history`` (columns: 7 results then ``keys``) with Gaussian mutations."""
    hyp = deepcopy(hyp)
    if len(history):
        fit = fitness(history[:, :7])
        top = np.argsort(-fit)[:5]
        weights = fit[top] - fit[top].min() + 1e-6
        parent = history[rng.choice(top, p=weights / weights.sum()), 7:]
        hyp.update({k: float(v) for k, v in zip(keys, parent)})
        scales = np.array([SEARCH_SPACE[k][0] for k in keys])
        gains = np.ones(len(keys))
        while (gains == 1).all():  # mutate until something changes
            gains = (scales * (rng.random(len(keys)) < 0.8) * rng.standard_normal(len(keys)) * 0.2 + 1).clip(0.3, 3.0)
        for k, g in zip(keys, gains):
            hyp[k] = float(hyp[k] * g)
    for k in keys:
        _, low, high = SEARCH_SPACE[k]
        hyp[k] = round(min(max(hyp[k], low), high), 5)
    return hyp


def evolve(opt: argparse.Namespace, device: torch.device, hyp: dict, train: Callable) -> dict:
    """Run ``opt.evolve`` generations of train(hyp, opt, device); returns the best hyperparameters."""
    save_dir = Path(opt.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    keys = [k for k in SEARCH_SPACE if k in hyp]
    csv = save_dir / "evolve.csv"
    rng = np.random.default_rng(opt.seed)
    opt.noval, opt.nosave = True, True
    for generation in range(opt.evolve):
        history = np.loadtxt(csv, delimiter=",", skiprows=1, ndmin=2) if csv.exists() else np.zeros((0, 7 + len(keys)))
        child = mutate(hyp, history, rng, keys)
        results = train(deepcopy(child), deepcopy(opt), device)
        row = [*map(float, results[:7]), *(child[k] for k in keys)]
        header = "" if csv.exists() else ",".join((*RESULT_COLUMNS, *keys)) + "\n"
        with open(csv, "a") as f:
            f.write(header + ",".join(f"{x:.5g}" for x in row) + "\n")
        LOGGER.info(f"{colorstr('evolve: ')}generation {generation + 1}/{opt.evolve} fitness "
                    f"{float(fitness(np.array(row[:7]).reshape(1, -1))[0]):.4f}")
    history = np.loadtxt(csv, delimiter=",", skiprows=1, ndmin=2)
    best = history[np.argmax(fitness(history[:, :7]))]
    best_hyp = {**hyp, **{k: float(v) for k, v in zip(keys, best[7:])}}
    yaml_save(save_dir / "hyp_evolve.yaml", best_hyp)
    LOGGER.info(f"{colorstr('evolve: ')}{opt.evolve} generations finished, best hyperparameters saved to "
                f"{save_dir / 'hyp_evolve.yaml'}\nUsage example: python train.py --hyp {save_dir / 'hyp_evolve.yaml'}")
    return best_hyp
