"""The training schedule against upstream YOLOv5 v7.0's behaviour fixture (shared/fixtures/behaviour/schedule.pt):
learning rate per group, momentum, accumulation and optimizer steps per iteration, the epoch curve, the scaled weight
decay, and the EMA's decay and states."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from tests.helpers import SHARED
from utils.schedule import Schedule, accumulation, scaled_weight_decay
from utils.torch_utils import ModelEMA, ema_decay

FIXTURE = torch.load(SHARED / "fixtures/behaviour/schedule.pt", weights_only=True)
INPUTS, OUTPUTS = FIXTURE["inputs"], FIXTURE["outputs"]


def simulate(schedule: Schedule, iterations: int) -> dict[str, np.ndarray]:
    """What a training loop driven by ``schedule`` does at each iteration (optimizer steps from last step -1)."""
    rows, last_step = [], -1
    for ni in range(iterations):
        settings = schedule.at(ni)
        step = ni - last_step >= settings.accumulate
        last_step = ni if step else last_step
        rows.append((settings.lr, settings.momentum, settings.accumulate, step))
    lr, momentum, accumulate, steps = zip(*rows)
    return {"lr": np.array(lr), "momentum": np.array(momentum), "accumulate": np.array(accumulate),
            "optimizer_step": np.array(steps)}


@pytest.mark.parametrize("kind", ["linear", "cos"])
def test_iteration_schedule_matches_upstream(kind):
    ref, epochs, nb = OUTPUTS[kind], INPUTS["epochs"], INPUTS["nb"]
    schedule = Schedule(INPUTS["hyp"], epochs, nb, INPUTS["batch_size"], cosine=kind == "cos")
    got = simulate(schedule, epochs * nb)
    assert schedule.warmup == ref["nw"] == 100
    np.testing.assert_allclose(got["lr"], ref["lr"].numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.repeat(got["momentum"][:, None], 3, 1), ref["momentum"].numpy(), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(got["accumulate"], ref["accumulate"].numpy())
    np.testing.assert_array_equal(got["optimizer_step"], ref["optimizer_step"].numpy().astype(bool))
    last_of_epoch = np.arange(epochs) * nb + nb - 1
    np.testing.assert_allclose(got["lr"][last_of_epoch], ref["epoch_logged_lr"].numpy(), rtol=0, atol=1e-12)
    starts = [[schedule.curve_lr(e)] * 3 for e in range(epochs)]
    np.testing.assert_allclose(starts, ref["epoch_start_lr"].numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose([schedule.curve(e) for e in range(epochs + 1)], ref["lf"], rtol=0, atol=1e-12)


def test_logged_lr_of_the_bccd_run_length():
    """With 19 batches per epoch (upstream's BCCD run), the lr0..lr2 logged per epoch match the fixture."""
    schedule = Schedule(INPUTS["hyp"], INPUTS["epochs"], INPUTS["nb_bccd_run"], INPUTS["batch_size"])
    got = simulate(schedule, INPUTS["epochs"] * INPUTS["nb_bccd_run"])["lr"]
    logged = got[np.arange(INPUTS["epochs"]) * INPUTS["nb_bccd_run"] + INPUTS["nb_bccd_run"] - 1]
    np.testing.assert_allclose(logged, OUTPUTS["linear_nb19_logged_lr"].numpy(), rtol=0, atol=1e-12)


def test_weight_decay_and_groups():
    for batch_size, accumulate, decay in OUTPUTS["weight_decay_table"]:
        assert accumulation(batch_size) == accumulate
        assert scaled_weight_decay(INPUTS["hyp"]["weight_decay"], batch_size) == pytest.approx(decay, abs=1e-12)
    groups = OUTPUTS["linear"]["groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, scaled_weight_decay(0.0005, INPUTS["batch_size"]), 0.0]
    assert {g["initial_lr"] for g in groups} == {INPUTS["hyp"]["lr0"]}


def test_hyp_nominal_batch_sets_accumulation_and_decay():
    """``nbs`` in a hyperparameter file (ours) replaces the nominal batch of 64: at batch 16 and nbs 16 every batch
    is an optimizer step after warm-up, with the decay per 16 images; without the key nothing changes."""
    hyp, batch_size, nb = {**INPUTS["hyp"], "nbs": 16}, 16, 50
    got = simulate(Schedule(hyp, 4, nb, batch_size), 4 * nb)
    assert set(got["accumulate"]) == {1} and got["optimizer_step"].all()
    default = simulate(Schedule(INPUTS["hyp"], 4, nb, batch_size), 4 * nb)["accumulate"]
    assert set(default[151:]) == {4}  # after the 150 warm-up iterations
    assert scaled_weight_decay(0.0005, batch_size, 16) == 0.0005
    assert scaled_weight_decay(0.0005, 8, 32) == pytest.approx(0.0005 * 8 * 4 / 32)


def test_ema_decay_ramp():
    updates = torch.arange(1, 2001)
    np.testing.assert_allclose([ema_decay(int(u)) for u in updates], OUTPUTS["ema_decay_all"], atol=1e-12)
    np.testing.assert_allclose([ema_decay(u) for u in INPUTS["ema_sample_updates"]],
                               OUTPUTS["ema_decay_sample"], atol=1e-12)


def test_ema_states_follow_upstream():
    """Five model changes, one EMA update after each: floating-point entries averaged, integer ones left alone."""
    seq = OUTPUTS["ema_sequence"]
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    model.load_state_dict(seq["initial"])
    ema = ModelEMA(model)
    for state, expected in zip(seq["model_states"], seq["ema_states"]):
        model.load_state_dict(copy.deepcopy(state))
        ema.update(model)
        got = ema.ema.state_dict()
        for key, value in expected.items():
            torch.testing.assert_close(got[key].double(), value.double(), rtol=0, atol=1e-7, msg=key)
