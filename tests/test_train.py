"""Training and validation end to end: overfitting a few images, train.py/val.py as subprocesses, upstream parity."""

from __future__ import annotations

import copy
import csv
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import val as validate
from models.common import BatchNorm2d
from models.yolo import DetectionModel
from models.memory_format import AUTO_CHANNELS_LAST, channels_last_training
from tests.helpers import ROOT, SHARED
from utils.dataloaders import create_dataloader
from utils.datasets_check import check_dataset
from utils.general import UserInputError
from utils.loss import ComputeLoss
from utils.synthetic import generate_shapes
from utils.torch_utils import ShapeCompiledForward, convs_channels_last, init_seeds

NO_AUGMENT = {"hsv_h": 0, "hsv_s": 0, "hsv_v": 0, "degrees": 0, "translate": 0, "scale": 0, "shear": 0,
              "perspective": 0, "flipud": 0, "fliplr": 0, "mosaic": 0, "mixup": 0, "copy_paste": 0}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """8 train / 4 val synthetic images at 128 px and a data YAML for them."""
    root = tmp_path_factory.mktemp("tiny")
    generate_shapes(root / "shapes", n_train=8, n_val=4, imgsz=128, seed=1)
    names = {0: "circle", 1: "square", 2: "triangle", 3: "star", 4: "ellipse"}
    data = root / "tiny.yaml"
    data.write_text(yaml.safe_dump({"path": str(root / "shapes"), "train": "images/train", "val": "images/val",
                                    "names": names}))
    return data


def run_script(*args: str, timeout: int = 600) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def test_overfits_a_few_images(tiny_data):
    """Training on 4 images without augmentation must fit them: catches bugs in targets, loss and decoding."""
    torch.manual_seed(0)
    data = check_dataset(tiny_data)
    hyp = yaml.safe_load((ROOT / "data/hyps/hyp.scratch-low.yaml").read_text()) | NO_AUGMENT
    loader, dataset = create_dataloader(data["val"], 128, 4, 32, hyp=hyp, augment=False, workers=0, shuffle=True)
    model = DetectionModel("yolov5n.yaml", nc=5, verbose=False)
    hyp.update(box=0.05, cls=0.5 * 5 / 80, obj=1.0 * (128 / 640) ** 2)
    model.hyp, model.names = hyp, data["names"]
    compute_loss = ComputeLoss(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    val_loader = create_dataloader(data["val"], 128, 4, 32, rect=True, pad=0.5, workers=0)[0]
    map50 = 0.0
    for step in range(1, 301):
        model.train()
        for imgs, targets, _, _ in loader:
            loss, _ = compute_loss(model(imgs.float() / 255), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if step % 50 == 0:
            map50 = validate.evaluate(model, val_loader, data["names"]).metrics.map50
            if map50 >= 0.9:
                break
    assert map50 >= 0.9, f"mAP@0.5 {map50:.3f} after {step} steps"


def test_train_and_val_scripts_one_epoch(tiny_data, tmp_path):
    out = run_script("train.py", "--cfg", "yolov5n.yaml", "--data", str(tiny_data), "--img", "64", "--epochs", "1",
                     "--batch-size", "4", "--workers", "0", "--project", str(tmp_path), "--name", "exp",
                     "--memory-format", "channels-last")  # checkpoints of a channels-last run are saved NCHW
    run = tmp_path / "exp"
    assert "Training done: 1 epoch(s)" in out
    for name in ("weights/best.pt", "weights/last.pt", "results.csv", "results.png", "hyp.yaml", "opt.yaml",
                 "labels.jpg", "train_batch0.jpg", "confusion_matrix.png", "val_batch0_pred.jpg"):
        assert (run / name).is_file(), name
    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()  # TensorBoard's own reader
    assert events.Graph() is not None  # the model graph
    curves = {f"Results/{f.stem}" for f in run.glob("*_curve.png")}  # drawn once some prediction is right
    assert {"Mosaics/train_batch0", "Validation/val_batch0_pred", "Results/results", *curves} <= \
        set(events.Tags()["images"]), events.Tags()["images"]
    assert "metrics/mAP_0.5" in events.Tags()["scalars"]
    header = next(csv.reader(open(run / "results.csv")))
    assert [h.strip() for h in header][:8] == ["epoch", "train/box_loss", "train/obj_loss", "train/cls_loss",
                                               "metrics/precision", "metrics/recall", "metrics/mAP_0.5",
                                               "metrics/mAP_0.5:0.95"]
    assert "channels-last training" in out
    ckpt = torch.load(run / "weights/best.pt", weights_only=True)
    assert ckpt["names"][3] == "star" and ckpt["optimizer"] is None  # stripped at the end
    assert all(v.is_contiguous() for v in ckpt["model"].values())  # saved NCHW, as upstream's
    out = run_script("val.py", "--weights", str(run / "weights/best.pt"), "--data", str(tiny_data), "--img", "64",
                     "--project", str(tmp_path), "--name", "val", "--save-txt", "--save-json", "--verbose")
    assert re.search(r"^\s+all\s+4\s+\d+", out, re.M)
    assert (tmp_path / "val" / "best_predictions.json").is_file()


def test_tensorboard_images_and_graph_failure(tmp_path, caplog):
    """The run's curves and mosaics become TensorBoard images; a model that cannot be traced costs one warning."""
    from torch.utils.tensorboard import SummaryWriter

    import train

    for name in ("PR_curve.png", "F1_curve.png", "results.png", "val_batch0_pred.jpg", "notes.png"):
        Image.new("RGB", (32, 24), (200, 30, 30)).save(tmp_path / name)

    class Untraceable(nn.Module):
        def forward(self, x):
            raise RuntimeError("cannot trace this")

    writer = SummaryWriter(str(tmp_path))
    with caplog.at_level("WARNING", logger="yolov5"):
        train.tensorboard_graph(writer, Untraceable(), 32, torch.device("cpu"))
        train.tensorboard_run_images(writer, tmp_path, 3)
    writer.close()
    assert [r.getMessage() for r in caplog.records] == [
        "WARNING TensorBoard: no model graph (RuntimeError: cannot trace this)"]
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0}).Reload()
    assert set(events.Tags()["images"]) == {"Results/PR_curve", "Results/F1_curve", "Results/results",
                                            "Validation/val_batch0_pred"}
    assert events.Images("Results/PR_curve")[0].step == 3 and not events.Tags()["graph"]


def test_val_reproduces_upstream_figures_on_bccd():
    """Our val.py on upstream's own BCCD checkpoint matches upstream's val.py figures (fixture) within 0.003."""
    reference = (SHARED / "fixtures" / "upstream_yolov5n_bccd_val.txt").read_text()
    up = re.search(r"^\s+all\s+72\s+945\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", reference, re.M)
    results, _, _ = validate.run(ROOT / "data/BCCD.yaml", weights=SHARED / "fixtures" / "upstream_yolov5n_bccd.pt",
                                 imgsz=320, batch_size=8, device="cpu", plots=False, workers=2,
                                 project=ROOT / "runs/test-val", exist_ok=True)
    mp, mr, map50, map5095 = results[:4]
    assert abs(map50 - float(up[3])) <= 0.003
    assert abs(map5095 - float(up[4])) <= 0.003


def test_evolve_two_generations(tiny_data, tmp_path):
    run_script("train.py", "--cfg", "yolov5n.yaml", "--data", str(tiny_data), "--img", "64", "--epochs", "1",
               "--batch-size", "4", "--workers", "0", "--evolve", "2", "--project", str(tmp_path), "--name", "evo",
               "--noautoanchor")
    rows = (tmp_path / "evo" / "evolve.csv").read_text().splitlines()
    assert len(rows) == 3 and "lr0" in rows[0]
    best = yaml.safe_load((tmp_path / "evo" / "hyp_evolve.yaml").read_text())
    assert 1e-5 <= best["lr0"] <= 0.1 and "mosaic" in best


def test_fine_tune_from_upstream_checkpoint(tiny_data, tmp_path):
    out = run_script("train.py", "--weights", str(SHARED / "fixtures" / "upstream_yolov5n_bccd.pt"), "--data",
                     str(tiny_data), "--img", "64", "--epochs", "1", "--batch-size", "4", "--workers", "0",
                     "--project", str(tmp_path), "--name", "ft", "--noplots")
    # every tensor but the 3 class-dependent head convs (weights + biases) transfers to the 5-class model
    found = re.search(r"weights: (\d+) of the model.s (\d+) tensors taken from", out)
    assert found and int(found[1]) == int(found[2]) - 6
    assert torch.load(tmp_path / "ft" / "weights" / "last.pt", weights_only=True)["nc"] == 5


def test_compiled_forward_matches_eager_and_compiles_one_shape():
    """--compile's forward: gradients and BatchNorm statistics as eager; a second shape runs eagerly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 4, 1)).train()
    eager = copy.deepcopy(model)
    forward = ShapeCompiledForward(model)
    x = torch.rand(4, 3, 32, 32)
    forward(x).square().mean().backward()
    eager(x).square().mean().backward()
    for a, b in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, eager[1].running_var)
    forward(torch.rand(2, 3, 32, 32))  # an epoch's smaller last batch
    assert forward.calls == {"compiled": 1, "eager": 1}


def test_compiled_forward_falls_back_to_eager(monkeypatch, caplog):
    """A compiler failure is one warning, then training goes on eagerly with the same results."""
    def broken_compile(model, **kwargs):
        def run(x):
            raise RuntimeError("InductorError: no working C++ compiler\ntraceback lines")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = nn.Conv2d(3, 4, 1)
    forward = ShapeCompiledForward(model)
    x = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(forward(x), model(x))
    forward(x)
    assert forward.calls == {"compiled": 0, "eager": 2}
    assert "torch.compile failed (InductorError: no working C++ compiler); training without it" in caplog.text


def test_train_script_with_compile(tiny_data, tmp_path):
    """train.py --compile end to end on a small model (compiling yolov5n takes minutes on 2 cores)."""
    cfg = tmp_path / "tiny_model.yaml"
    cfg.write_text(yaml.safe_dump({
        "nc": 5, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": [[10, 13, 16, 30, 33, 23]],
        "backbone": [[-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [16, 3, 2]]],
        "head": [[[2], 1, "Detect", ["nc", "anchors"]]]}))
    out = run_script("train.py", "--cfg", str(cfg), "--data", str(tiny_data), "--img", "64", "--epochs", "1",
                     "--batch-size", "3", "--workers", "0", "--project", str(tmp_path), "--name", "exp", "--compile",
                     "--noplots")
    assert "compile: torch.compile of the first batch shape" in out and "Training done: 1 epoch(s)" in out
    assert "torch.compile failed" not in out
    assert (tmp_path / "exp/weights/best.pt").is_file()


def test_deterministic_mode_without_nan_fill_gives_identical_gradients():
    """init_seeds(deterministic=True) switches off the NaN fill of new tensors: the gradients are bit-identical."""
    init_seeds(0, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory is False
    model = DetectionModel("yolov5n.yaml", nc=5, verbose=False).train()
    model.hyp = yaml.safe_load((ROOT / "data/hyps/hyp.scratch-low.yaml").read_text())
    x, targets = torch.rand(2, 3, 64, 64), torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.3], [1, 2, 0.3, 0.6, 0.2, 0.2]])
    grads = []
    try:
        for fill in (True, False):
            torch.utils.deterministic.fill_uninitialized_memory = fill
            model.zero_grad(set_to_none=True)
            ComputeLoss(model)(model(x), targets)[0].backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.equal(grads[0], grads[1])


RETAIN_PROBE = """
import hashlib, resource, sys, torch
from models.yolo import DetectionModel
from utils.torch_utils import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
torch.manual_seed(0)
model = DetectionModel("yolov5n.yaml", nc=5, verbose=False).train()
x = torch.rand(8, 3, 640, 640)  # the largest activations (50 MiB) are above any mmap threshold glibc adapts to
for i in range(6):
    if i == 4:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    sum(y.sum() for y in model(x)).backward()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
gradients = torch.cat([p.grad.flatten() for p in model.parameters()])
print(applied, faults, hashlib.sha256(gradients.numpy().tobytes()).hexdigest())
"""


def test_retained_memory_removes_the_page_faults_of_training_steps():
    """retain_freed_memory() (train.py's process): after four warm-up steps, forward + backward reuse freed memory
    (usually no page faults; always under a fifth of the default's), where glibc's default unmaps and maps the 50 MiB
    activations again (over 100,000 faults of 4 KiB pages in two steps); the gradients are bit-identical. Smaller
    activations would not show it: glibc raises its mmap threshold up to 32 MiB as blocks are freed."""
    runs = {}
    for mode in ("default", "retain"):
        out = subprocess.run([sys.executable, "-c", RETAIN_PROBE, mode], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        applied, faults, gradient_hash = out.stdout.split()[-3:]
        runs[mode] = applied == "True", int(faults), gradient_hash
    assert runs["retain"][0] and not runs["default"][0]
    assert runs["default"][1] > 20_000 and runs["retain"][1] < runs["default"][1] / 5, runs
    assert runs["default"][2] == runs["retain"][2]  # every gradient bit


def test_channels_last_training_is_as_accurate_as_nchw():
    """train.py trains channels-last on the CPU: a yolov5n step on BCCD images has gradients as close to a float64
    NCHW step as NCHW's own (within 2x), where PyTorch's NHWC batch norm in place of ours makes them 10x+ worse."""
    torch.manual_seed(0)
    base = DetectionModel("yolov5n.yaml", nc=3, verbose=False).train()
    base.hyp = yaml.safe_load((ROOT / "data/hyps/hyp.scratch-low.yaml").read_text())
    loader = create_dataloader(check_dataset(ROOT / "data/BCCD.yaml")["val"], 256, 4, 32, workers=0)[0]
    x, targets, _, _ = next(iter(loader))  # real images: their statistics are what PyTorch's NHWC kernel mishandles
    x = x.float() / 255

    def step_gradients(model: nn.Module, dtype=torch.float32) -> torch.Tensor:
        ComputeLoss(model)(model(x.to(dtype)), targets.to(dtype))[0].backward()
        return torch.cat([p.grad.double().flatten() for p in model.parameters()])

    reference = step_gradients(copy.deepcopy(base).double(), torch.float64)
    errors = {}
    for name in ("nchw", "channels-last", "channels-last, PyTorch's batch norm"):
        model = copy.deepcopy(base)
        if name.endswith("batch norm"):
            for m in model.modules():
                if isinstance(m, BatchNorm2d):
                    m.__class__ = nn.BatchNorm2d
            convs_channels_last(model)  # yolov5n has no convolution oneDNN's NHWC gradient mishandles
        elif name == "channels-last":
            assert channels_last_training(model, torch.device("cpu"), memory_format="channels-last")
            assert model.model[1].conv.weight.is_contiguous(memory_format=torch.channels_last)
        errors[name] = float((step_gradients(model) - reference).norm() / reference.norm())
    assert errors["channels-last"] < 2 * errors["nchw"], errors
    assert errors["channels-last, PyTorch's batch norm"] > 10 * errors["channels-last"], errors


def test_channels_last_training_only_where_accurate_and_safe():
    """--memory-format channels-last converts where it is accurate and safe and otherwise stops with the reason:
    --compile, CUDA, timm's batch norms and strided 1x1 convolutions of under 16 channels past the image (oneDNN's NHWC
    weight gradient corrupts memory there); RepVGG's 1x1 stem branch on the image stays NCHW. 'nchw' never converts,
    and 'auto' follows AUTO_CHANNELS_LAST without ever raising."""
    cpu = torch.device("cpu")
    model = DetectionModel("yolov5s_RepVGG.yaml", nc=3, verbose=False)
    for kwargs, reason in (({"compile_model": True}, "--compile"), ({"distributed": True}, "DDP")):
        with pytest.raises(UserInputError, match=f"--memory-format channels-last: .*{reason}"):
            channels_last_training(model, cpu, memory_format="channels-last", **kwargs)
        assert not channels_last_training(model, cpu, memory_format="auto", **kwargs)
    with pytest.raises(UserInputError, match="CPU training path"):
        channels_last_training(model, torch.device("meta"), memory_format="channels-last")
    assert not channels_last_training(model, cpu, memory_format="nchw")
    assert not model.model[1].dense.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert channels_last_training(model, cpu, memory_format="channels-last")
    assert model.model[0].pointwise.conv.weight.is_contiguous()  # reads the image: kept NCHW
    assert model.model[0].dense.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.model[1].pointwise.conv.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(UserInputError, match="timm backbone"):
        channels_last_training(DetectionModel("yolov5s_timm-repvgg_a0.yaml", nc=3, verbose=False), cpu,
                               memory_format="channels-last")
    model = DetectionModel("yolov5n.yaml", nc=3, verbose=False)
    model.model[3].conv = nn.Conv2d(8, 64, 1, 2, bias=False)
    with pytest.raises(UserInputError, match="strided 1x1"):
        channels_last_training(model, cpu, memory_format="channels-last")
    assert not model.model[1].conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert channels_last_training(DetectionModel("yolov5n.yaml", nc=3, verbose=False), cpu) == AUTO_CHANNELS_LAST


MAIN_PROBE = """
import runpy, sys
import utils.torch_utils as torch_utils
calls = []
torch_utils.retain_freed_memory = lambda: calls.append("retain")
sys.argv = ["train.py", "--data", "no_such_data.yaml", "--cfg", "yolov5n.yaml"]
try:
    runpy.run_path("train.py", run_name="__main__")
except SystemExit as e:
    print(calls, e.code)
"""


def test_train_script_keeps_freed_memory():
    """python train.py calls retain_freed_memory() in its own process (before the bad --data fails cleanly)."""
    out = subprocess.run([sys.executable, "-c", MAIN_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.stdout.split()[-2:] == ["['retain']", "2"], out.stdout[-1000:] + out.stderr[-2000:]
