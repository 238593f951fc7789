"""Letterbox geometry and pixels against upstream v7.0's numbers (../shared/fixtures/behaviour/letterbox.pt,
README section 4): the scale rule, half-to-even rounding of the resized size, ``auto`` over ``scaleFill``,
``scaleup``, half-pixel borders (top = round(dh - 0.1), bottom = round(dh + 0.1)), bilinear resize, grey 114."""

import numpy as np
import pytest
import torch

from tests.helpers import ROOT
from utils.augmentations import letterbox, letterbox_geometry

FIXTURE = ROOT.parent / "shared/fixtures/behaviour/letterbox.pt"
ARGS = ("new_shape", "auto", "scaleFill", "scaleup", "stride")


@pytest.fixture(scope="module")
def fixture() -> dict:
    assert FIXTURE.is_file(), f"behaviour fixture missing: {FIXTURE}"  # a missing fixture fails, never skips
    return torch.load(FIXTURE, weights_only=True)


def _kwargs(case: dict) -> dict:
    kwargs = {k: case[k] for k in ARGS}
    kwargs["new_shape"] = kwargs["new_shape"] if isinstance(kwargs["new_shape"], int) else tuple(kwargs["new_shape"])
    return kwargs


def test_geometry_of_every_combination(fixture: dict):
    combos = zip(fixture["inputs"]["combos"], fixture["outputs"]["combos"], strict=True)
    for k, (case, want) in enumerate(combos):
        h, w = case["shape"]
        image = np.zeros((h, w, 3), np.uint8)
        out, ratio, pad = letterbox(image, **_kwargs(case))
        assert list(out.shape[:2]) == want["out_shape"], k
        assert list(ratio) == want["ratio"] and list(pad) == want["pad"], k  # exact
        (rw, rh), (dw, dh) = letterbox_geometry((h, w), case["new_shape"], case["auto"], case["scaleFill"],
                                                case["scaleup"], case["stride"])[1:]
        assert [rw, rh] == want["ratio"] and [dw, dh] == want["pad"], k


def test_auto_takes_precedence_over_scale_fill(fixture: dict):
    both = [(c, o) for c, o in zip(fixture["inputs"]["combos"], fixture["outputs"]["combos"])
            if c["auto"] and c["scaleFill"]]
    assert both
    for case, want in both:
        out, ratio, _ = letterbox(np.zeros((*case["shape"], 3), np.uint8), **_kwargs(case))
        assert ratio[0] == ratio[1] and list(out.shape[:2]) == want["out_shape"]


def test_pixels_exact(fixture: dict):
    cases = zip(fixture["inputs"]["pixel_cases"], fixture["outputs"]["pixel_cases"], strict=True)
    for case, want in cases:
        out, ratio, pad = letterbox(case["image"].numpy(), **_kwargs(case))
        assert list(ratio) == want["ratio"] and list(pad) == want["pad"]
        np.testing.assert_array_equal(out, want["image"].numpy())  # OpenCV's bilinear resize: exact


def test_half_pixel_borders_are_grey(fixture: dict):
    """Odd spare room puts the extra row/column at the bottom/right: top = round(dh - 0.1), bottom = round(dh + 0.1)."""
    case = next(c for c, o in zip(fixture["inputs"]["pixel_cases"], fixture["outputs"]["pixel_cases"])
                if o["pad"][1] % 1)  # 37x53 to 64: dh = 9.5
    out, _, (_, dh) = letterbox(case["image"].numpy(), **_kwargs(case))
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    assert (top, bottom) == (9, 10)
    assert (out[:top] == 114).all() and (out[out.shape[0] - bottom:] == 114).all()
    assert not (out[top] == 114).all() and not (out[out.shape[0] - bottom - 1] == 114).all()
