"""Property tests of the two parsers that read user files: YOLO label text and model YAML dicts.

The label parser must accept any text without raising and keep only rows that satisfy the label invariants. The
model builder must turn any malformed row into a ModelConfigError (a UserInputError: one line, no traceback), never
another exception. Examples are derandomized, so a run is reproducible.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from models.yolo import DetectionModel
from utils.dataloaders import parse_labels
from utils.general import UserInputError

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------------------ labels

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-3, 2**70).map(str),
    st.sampled_from(["-0", "1.0", "1e-3", "1e39", "-1e39", "nan", "inf", "-inf", "0x1", "1_0", "", "\u0661", "0,5"]),
)
CLASSES = st.one_of(st.integers(-2, 9).map(str), st.integers(-5, 60).map(lambda e: f"1e{e}"), NUMBERS)
IN_RANGE = st.floats(0, 1).map(repr)
COORDINATES = st.one_of(IN_RANGE, IN_RANGE, IN_RANGE, st.floats(-0.01, 1.01).map("{:.3f}".format), NUMBERS)
ROW_LIKE = st.builds(lambda cls, coordinates: " ".join([cls, *coordinates]), CLASSES,
                     st.sampled_from([4, 4, 4, 6, 8, 3, 5, 0]).flatmap(lambda n: st.lists(COORDINATES, min_size=n,
                                                                                          max_size=n)))
LABEL_TEXT = st.one_of(st.text(max_size=200), st.lists(st.one_of(ROW_LIKE, ROW_LIKE, st.text(max_size=20)),
                                                      max_size=8).map("\n".join))


@settings(FUZZ, max_examples=300)
@given(LABEL_TEXT)
@example("1e39 0.5 0.5 0.1 0.1")  # a class id beyond float32
@example("0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n0 0.50000001 0.5 0.2 0.2")  # exact and float32-rounded duplicates
def test_label_parser_accepts_any_text_and_keeps_only_valid_rows(text):
    labels, problems = parse_labels(text)
    assert labels.dtype == np.float32 and labels.ndim == 2 and labels.shape[1] == 5
    assert np.isfinite(labels).all()
    classes, boxes = labels[:, 0], labels[:, 1:]
    assert (classes >= 0).all() and (classes == np.round(classes)).all()
    assert ((boxes >= 0) & (boxes <= 1)).all()
    assert len(np.unique(labels, axis=0)) == len(labels)  # duplicates removed
    assert all(isinstance(p, str) and "\n" not in p for p in problems)  # each problem prints on one line
    rows = sum(1 for line in text.splitlines() if line.split())
    ignored = sum(p.startswith("line ") for p in problems)
    duplicates = sum(int(p.split()[0]) for p in problems if p.endswith("duplicate labels removed"))
    assert len(labels) + ignored + duplicates == rows  # every non-blank line is kept, rejected or a duplicate


# -------------------------------------------------------------------------------------------------- model YAML

TINY_MODEL = {  # two detection levels (P3, P4) at 1/8 width: builds in a few milliseconds
    "nc": 2, "depth_multiple": 0.33, "width_multiple": 0.125,
    "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119]],
    "backbone": [[-1, 1, "Conv", [64, 6, 2, 2]], [-1, 1, "Conv", [128, 3, 2]], [-1, 1, "C3", [128]],
                 [-1, 1, "Conv", [256, 3, 2]], [-1, 1, "C3", [256]], [-1, 1, "Conv", [512, 3, 2]],
                 [-1, 1, "SPPF", [512, 5]]],
    "head": [[-1, 1, "Conv", [256, 1, 1]], [-1, 1, "nn.Upsample", [None, 2, "nearest"]], [[-1, 4], 1, "Concat", [1]],
             [-1, 1, "C3", [256, False]], [[-1, 6], 1, "Detect", ["nc", "anchors"]]],
}
# Light modules only: the registered backbones (RevCol, RepLKNet stages, timm models) are too big to build hundreds
# of times in a test; their argument handling goes through the same checks.
MODULE_NAMES = ["Conv", "DWConv", "GhostConv", "Focus", "Bottleneck", "C3", "C3Ghost", "SPPF", "SPP", "Concat",
                "Contract", "Expand", "Detect", "nn.Upsample", "nn.MaxPool2d", "nn.Identity", "nn.BatchNorm2d",
                "nn.ConvTranspose2d", "RepVGGBlock", "RepGhostModule", "ConvBNAct", "CSPStage", "Unknown", "os.system"]
# Small numbers only, so that no mutation can ask for a huge tensor (channels, kernels, scale factors <= 4).
SCALARS = st.one_of(st.integers(-2, 4), st.sampled_from([0.5, -1.0, math.nan, math.inf]), st.booleans(), st.none(),
                    st.sampled_from(["nc", "anchors", "None", "nearest", "", "x", "nn.ReLU()"]))
ARGS = st.recursive(SCALARS, lambda children: st.lists(children, max_size=3), max_leaves=6)
FROMS = st.one_of(st.integers(-12, 12), st.lists(st.integers(-12, 12), max_size=3), SCALARS)
ROWS = st.one_of(st.tuples(FROMS, st.one_of(st.integers(-1, 3), SCALARS), st.sampled_from(MODULE_NAMES),
                           st.lists(ARGS, max_size=4)).map(list),
                 ARGS)  # not even a row
TOP_LEVEL = st.sampled_from(["nc", "depth_multiple", "width_multiple", "anchors", "activation", "ch", "backbone",
                             "head"])


@st.composite
def mutated_models(draw) -> dict:
    """The tiny model with one or two rows replaced, or a row's field, or a top-level key, set to random data."""
    model = copy.deepcopy(TINY_MODEL)
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["row", "field", "top"]))
        if kind == "top":
            model[draw(TOP_LEVEL)] = draw(ARGS)
            continue
        section = model[draw(st.sampled_from(["backbone", "head"]))]
        if not isinstance(section, list) or not section:
            continue
        k = draw(st.integers(0, len(section) - 1))
        if kind == "row" or not isinstance(section[k], list) or len(section[k]) != 4:
            section[k] = draw(ROWS)
        else:
            field = draw(st.integers(0, 3))
            section[k][field] = draw([FROMS, SCALARS, st.sampled_from(MODULE_NAMES), st.lists(ARGS, max_size=4)][field])
    return model


def with_row(section: str, index: int, row) -> dict:
    model = copy.deepcopy(TINY_MODEL)
    model[section][index] = row
    return model


@FUZZ
@given(mutated_models())
@example(TINY_MODEL | {"anchors": []})
@example(with_row("head", 1, [-1, 1, "Expand", [0]]))  # integer division by zero while building
@example(with_row("head", 0, [[-1, 4], 1, "Conv", [256, 1, 1]]))  # two inputs to a one-input module
def test_model_builder_reports_any_malformed_yaml_as_user_error(cfg):
    try:
        model = DetectionModel(cfg, verbose=False)
    except UserInputError as e:  # ModelConfigError is one
        assert str(e).startswith("model.yaml") and "\n" not in str(e), str(e)
    else:  # the mutation happened to be valid: the model works
        with torch.no_grad():
            pred = model.eval()(torch.zeros(1, model.yaml["ch"], 128, 128))[0]
        assert pred.shape[0] == 1 and pred.shape[2] == model.yaml["nc"] + 5
