"""Hyperparameter evolution (train.py --evolve N): a genetic search over the hyp file's values.

Each generation mutates the best previous hyperparameters (fitness-weighted choice among the top five
from evolve.csv), trains once, and appends its results; hyp_evolve.yaml holds the best set found.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch

from utils.general import LOGGER, colorstr, yaml_save
from utils.metrics import fitness

# The evolved hyperparameters, in the hyp files' order (evolve.csv's column order): the range a value is kept in,
# and its relative mutation strength (0: never changed).
SEARCH_TABLE = """
hyperparameter    lower   upper  strength
lr0               1e-5    0.1    1
lrf               0.01    1.0    1
momentum          0.6     0.98   0.3
weight_decay      0.0     0.001  1
warmup_epochs     0.0     5.0    1
warmup_momentum   0.0     0.95   1
warmup_bias_lr    0.0     0.2    1
box               0.02    0.2    1
cls               0.2     4.0    1
cls_pw            0.5     2.0    1
obj               0.2     4.0    1
obj_pw            0.5     2.0    1
iou_t             0.1     0.7    0
anchor_t          2.0     8.0    1
fl_gamma          0.0     2.0    0
hsv_h             0.0     0.1    1
hsv_s             0.0     0.9    1
hsv_v             0.0     0.9    1
degrees           0.0     45.0   1
translate         0.0     0.9    1
scale             0.0     0.9    1
shear             0.0     10.0   1
perspective       0.0     0.001  0
flipud            0.0     1.0    1
fliplr            0.0     1.0    0
mosaic            0.0     1.0    1
mixup             0.0     1.0    1
"""


def read_search_table(text: str) -> dict[str, tuple[float, float, float]]:
    """{name: (lower, upper, strength)} from a whitespace-separated table with one header line."""
    rows = [line.split() for line in text.strip().splitlines()[1:]]
    return {name: (float(lower), float(upper), float(strength)) for name, lower, upper, strength in rows}


SEARCH_SPACE = read_search_table(SEARCH_TABLE)
RESULT_COLUMNS = ("metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
                  "val/box_loss", "val/obj_loss", "val/cls_loss")
N_RESULTS = len(RESULT_COLUMNS)
PARENTS = 5  # a child's parent is drawn from this many of the fittest previous generations
MUTATION_PROBABILITY, MUTATION_SIGMA, FACTOR_RANGE = 0.8, 0.2, (0.3, 3.0)


def pick_parent(history: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The hyperparameter columns of one of the PARENTS fittest rows of ``history``.

    Fitter rows are likelier: each is drawn with probability proportional to its fitness minus the lowest
    fitness among them (plus 1e-6, so that equal or weakest candidates keep a chance).
    """
    scores = fitness(history[:, :N_RESULTS])
    elite = np.argsort(-scores, kind="stable")[:PARENTS]
    lift = scores[elite] - scores[elite].min() + 1e-6
    return history[rng.choice(elite, p=lift / lift.sum()), N_RESULTS:]


def mutation_factors(strength: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative changes, one per hyperparameter: ``1 + MUTATION_SIGMA * strength * z`` (z standard normal)
    for a random MUTATION_PROBABILITY share of them and 1 for the rest, limited to FACTOR_RANGE. Drawn again
    until at least one factor differs from 1 (when any hyperparameter may change at all)."""
    factors = np.ones_like(strength)
    while strength.any() and (factors == 1).all():
        chosen = rng.random(strength.size) < MUTATION_PROBABILITY
        noise = rng.standard_normal(strength.size)
        factors = np.clip(1 + MUTATION_SIGMA * strength * chosen * noise, *FACTOR_RANGE)
    return factors


def mutate(hyp: dict, history: np.ndarray, rng: np.random.Generator, keys: list[str]) -> dict:
    """The next generation's hyperparameters.

    ``keys`` get a mutated copy of a fit parent's values from ``history`` (columns: the results, then ``keys``),
    or ``hyp``'s own values when there is no history yet, clipped to their SEARCH_SPACE range and rounded to
    5 decimals; every other entry is ``hyp``'s.
    """
    if len(history):
        values = pick_parent(history, rng) * mutation_factors(np.array([SEARCH_SPACE[k][2] for k in keys]), rng)
    else:
        values = np.array([float(hyp[k]) for k in keys])
    low, high = np.array([SEARCH_SPACE[k][:2] for k in keys]).reshape(-1, 2).T
    return {**hyp, **dict(zip(keys, np.clip(values, low, high).round(5).tolist()))}


def read_history(csv: Path, n_keys: int) -> np.ndarray:
    """evolve.csv's rows (results, then hyperparameters) as an array; no rows before the first generation."""
    if not csv.exists():
        return np.zeros((0, N_RESULTS + n_keys))
    return np.loadtxt(csv, delimiter=",", skiprows=1, ndmin=2)


def evolve(opt: argparse.Namespace, device: torch.device, hyp: dict, train: Callable) -> dict:
    """Run ``opt.evolve`` generations of train(hyp, opt, device); returns the best hyperparameters."""
    save_dir = Path(opt.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    keys = [k for k in SEARCH_SPACE if k in hyp]
    csv = save_dir / "evolve.csv"
    rng = np.random.default_rng(opt.seed)
    opt.noval, opt.nosave = True, True
    for generation in range(opt.evolve):
        history = read_history(csv, len(keys))
        child = mutate(hyp, history, rng, keys)
        results = train(deepcopy(child), deepcopy(opt), device)
        row = [*map(float, results[:N_RESULTS]), *(child[k] for k in keys)]
        header = "" if csv.exists() else ",".join((*RESULT_COLUMNS, *keys)) + "\n"
        with open(csv, "a") as f:
            f.write(header + ",".join(f"{x:.5g}" for x in row) + "\n")
        LOGGER.info(f"{colorstr('evolve: ')}generation {generation + 1}/{opt.evolve} fitness "
                    f"{float(fitness(np.array(row[:N_RESULTS]).reshape(1, -1))[0]):.4f}")
    history = read_history(csv, len(keys))
    best = history[np.argmax(fitness(history[:, :N_RESULTS]))]
    best_hyp = {**hyp, **{k: float(v) for k, v in zip(keys, best[N_RESULTS:])}}
    yaml_save(save_dir / "hyp_evolve.yaml", best_hyp)
    LOGGER.info(f"{colorstr('evolve: ')}{opt.evolve} generations finished, best hyperparameters saved to "
                f"{save_dir / 'hyp_evolve.yaml'}\nUsage example: python train.py --hyp {save_dir / 'hyp_evolve.yaml'}")
    return best_hyp
