"""utils/evolve.py: the search table, parent selection and mutation of train.py --evolve."""

from __future__ import annotations

from collections import Counter

import numpy as np
import yaml

from tests.helpers import ROOT
from utils.evolve import N_RESULTS, PARENTS, SEARCH_SPACE, mutate, mutation_factors, pick_parent

HYP = yaml.safe_load((ROOT / "data/hyps/hyp.scratch-low.yaml").read_text())
KEYS = [k for k in SEARCH_SPACE if k in HYP]


def history_rows(maps: list[float]) -> np.ndarray:
    """One evolve.csv row per mAP@0.5:0.95 value (fitness rises with it); hyperparameter columns = row index."""
    results = np.zeros((len(maps), N_RESULTS))
    results[:, 3] = maps
    return np.hstack([results, np.arange(len(maps))[:, None] * np.ones((1, len(KEYS)))])


def test_search_table():
    assert len(SEARCH_SPACE) == 27 and list(SEARCH_SPACE)[:3] == ["lr0", "lrf", "momentum"]
    assert SEARCH_SPACE["lr0"] == (1e-5, 0.1, 1.0) and SEARCH_SPACE["momentum"] == (0.6, 0.98, 0.3)
    assert all(SEARCH_SPACE[k][2] == 0 for k in ("iou_t", "fl_gamma", "perspective", "fliplr"))
    assert all(low <= HYP[k] <= high for k, (low, high, _) in SEARCH_SPACE.items() if k in HYP)


def test_first_generation_is_the_given_hyperparameters():
    child = mutate(HYP, np.zeros((0, N_RESULTS + len(KEYS))), np.random.default_rng(0), KEYS)
    assert child == {**HYP, **{k: round(float(HYP[k]), 5) for k in KEYS}}


def test_parent_is_one_of_the_fittest_weighted_by_fitness():
    maps = [0.10, 0.50, 0.20, 0.45, 0.05, 0.40, 0.30, 0.35]  # top 5: rows 1, 3, 5, 7, 6
    history = history_rows(maps)
    rng = np.random.default_rng(0)
    counts = Counter(int(pick_parent(history, rng)[0]) for _ in range(4000))
    assert set(counts) <= {1, 3, 5, 7, 6} and PARENTS == 5
    assert counts[1] > counts[3] > counts[5] > counts[7] > counts[6]  # weights fitness - min + 1e-6: row 6 ~never


def test_mutation_factors():
    rng = np.random.default_rng(0)
    strength = np.array([SEARCH_SPACE[k][2] for k in KEYS])
    for _ in range(200):
        f = mutation_factors(strength, rng)
        assert (f != 1).any() and ((f >= 0.3) & (f <= 3.0)).all() and (f[strength == 0] == 1).all()
    assert (mutation_factors(np.zeros(3), rng) == 1).all()  # nothing may change: no endless redraw


def test_child_stays_in_bounds_and_keeps_frozen_keys():
    rng = np.random.default_rng(1)
    history = history_rows([0.3, 0.2])
    history[:, N_RESULTS:] = [HYP[k] for k in KEYS]
    for _ in range(50):
        child = mutate(HYP, history, rng, KEYS)
        assert all(SEARCH_SPACE[k][0] <= child[k] <= SEARCH_SPACE[k][1] for k in KEYS)
        assert all(child[k] == HYP[k] for k in KEYS if SEARCH_SPACE[k][2] == 0)
        assert any(child[k] != HYP[k] for k in KEYS) and child["copy_paste"] == HYP["copy_paste"]
        assert all(child[k] == round(child[k], 5) for k in KEYS)
