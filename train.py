"""Train a YOLOv5 detector (any model YAML in models/, including the re-parameterized backbones) on a dataset.

Usage:
    python train.py --cfg yolov5n.yaml --img 320 --epochs 30            # embedded default dataset (data/shapes.yaml)
    python train.py --cfg yolov5_RepLKNet.yaml --data my_data.yaml       # any model YAML, by name or path
    python train.py --weights runs/train/exp/weights/best.pt --data BCCD.yaml   # fine-tune
    python train.py --resume                                             # continue the latest interrupted run
    torchrun --nproc_per_node 2 train.py --cfg yolov5s.yaml --batch 32   # DistributedDataParallel
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from tqdm import tqdm

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script: make the repository importable
    sys.path.append(str(Path(__file__).resolve().parent))

from models.loading import build_model, transfer_weights  # noqa: E402
from models.memory_format import MEMORY_FORMATS, channels_last_training  # noqa: E402
from models.modules.timm_backbone import without_weights_files  # noqa: E402
from models.yolo import DetectionModel, find_model_yaml  # noqa: E402
from utils.autoanchor import check_anchors  # noqa: E402
from utils.checkpoint import (  # noqa: E402
    load_checkpoint, make_checkpoint, model_state, rng_state, save_checkpoint, set_rng_state, strip_optimizer,
)
from utils.autobatch import autobatch  # noqa: E402
from utils.dataloaders import create_dataloader, epoch_seeds  # noqa: E402
from utils.datasets_check import data_yaml_file, check_dataset  # noqa: E402
from utils.general import (  # noqa: E402
    LOCAL_RANK, LOGGER, RANK, ROOT, TQDM_BAR_FORMAT, WORLD_SIZE, UserInputError, check_img_size, colorstr,
    first_line, increment_path, print_args, set_logging, yaml_load, yaml_save,
)
from utils.loss import ComputeLoss  # noqa: E402
from utils.metrics import fitness  # noqa: E402
from utils.options import (  # noqa: E402
    Combination, OptionParser, between, check_options, device_spec, each, existing_file, found, fraction, not_empty,
    freeze_item, one_of, suffix, whole, whole_or,
)
from utils.plots import plot_images, plot_labels, plot_results  # noqa: E402
from utils.schedule import Schedule, nominal_batch, scaled_weight_decay  # noqa: E402
from utils.torch_utils import (  # noqa: E402
    EarlyStopping, ModelEMA, ShapeCompiledForward, de_parallel, init_seeds, retain_freed_memory, select_device,
    smart_optimizer, torch_distributed_zero_first,
)

import val as validate  # noqa: E402  (after utils: val.py puts the same root on sys.path)

RESULT_KEYS = ("train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision", "metrics/recall",
               "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "val/box_loss", "val/obj_loss", "val/cls_loss",
               "x/lr0", "x/lr1", "x/lr2")
MAX_GRAD_NORM = 10.0


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf."""


# ------------------------------------------------------------------------------------------- files of a run


def write_results_csv(file: Path, epoch: int, values: list[float]) -> None:
    """Append one epoch to results.csv in upstream's layout (right-aligned 20-wide columns)."""
    cells = lambda row: ",".join(f"{x:>20}" for x in row) + "\n"  # noqa: E731
    header = "" if file.exists() else cells(("epoch", *RESULT_KEYS))
    with open(file, "a") as f:
        f.write(header + cells(f"{v:.5g}" for v in (epoch, *values)))


def clean_interrupted_run(save_dir: Path, start_epoch: int) -> None:
    """Before resuming: drop results.csv rows of epochs that were not checkpointed (written just before a crash) and
    temporary files of checkpoint writes that a crash interrupted."""
    for tmp in (save_dir / "weights").glob(".*.pt.*.tmp"):
        tmp.unlink()
    file = save_dir / "results.csv"
    if not file.is_file():
        return
    header, *rows = file.read_text().splitlines(keepends=True)
    kept = [row for row in rows if row.endswith("\n") and float(row.split(",")[0]) < start_epoch]
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(header + "".join(kept))
    os.replace(tmp, file)


def kept_checkpoint(last: Path) -> str:
    """Where the last good checkpoint of a failed run is, for the error message."""
    return f"the last good checkpoint is kept in {last}" if last.is_file() else "no checkpoint was saved"


def check_not_diverged(epoch: int, last: Path, val_losses: tuple, *models: nn.Module) -> None:
    """Stop before a diverged model (NaN/Inf validation losses or weights) can overwrite the last good checkpoint."""
    if not all(math.isfinite(x) for x in val_losses):
        raise NonFiniteLossError(f"validation loss (box, obj, cls) is {[float(x) for x in val_losses]} at epoch "
                                 f"{epoch}; {kept_checkpoint(last)}")
    for model in models:
        for name, value in model.state_dict().items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise NonFiniteLossError(f"weight {name} became NaN/Inf in epoch {epoch}; {kept_checkpoint(last)}")


def tensorboard_writer(save_dir: Path):
    """A TensorBoard SummaryWriter in save_dir, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        LOGGER.info("TensorBoard is not installed: no event files are written")
        return None
    LOGGER.info(f"TensorBoard: view this run with 'tensorboard --logdir {save_dir.parent}' at http://localhost:6006/")
    return SummaryWriter(str(save_dir))


def tensorboard_graph(tb, model: nn.Module, imgsz: int, device: torch.device) -> None:
    """The model's graph in TensorBoard, traced once in eval mode on a blank image; a model that cannot be traced
    costs one warning."""
    training, im = model.training, torch.zeros(1, 3, imgsz, imgsz, device=device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings: shape checks become constants
            # traced without the re-run check, which fails where the Detect head caches its grids on the first call
            tb.add_graph(torch.jit.trace(model.eval(), im, strict=False, check_trace=False), im)
    except Exception as e:  # tracing fails in many ways (unsupported ops, data-dependent control flow)
        LOGGER.warning(f"WARNING TensorBoard: no model graph ({type(e).__name__}: {first_line(e)})")
    finally:
        model.train(training)


TENSORBOARD_IMAGES = {  # section -> file patterns of a run's folder, logged as images when training ends
    "Results": ("results.png", "confusion_matrix.png", "*_curve.png"),
    "Validation": ("val_batch*_labels.jpg", "val_batch*_pred.jpg"),
}


def tensorboard_run_images(tb, save_dir: Path, step: int) -> None:
    """The run's result plots, metric curves and validation mosaics, as TensorBoard images."""
    from PIL import Image

    for section, patterns in TENSORBOARD_IMAGES.items():
        for file in sorted(f for pattern in patterns for f in save_dir.glob(pattern)):
            with Image.open(file) as im:
                tb.add_image(f"{section}/{file.stem}", np.asarray(im.convert("RGB")), step, dataformats="HWC")


# ------------------------------------------------------------------------------------------------ setup parts


def build_train_model(opt, hyp: dict, nc: int, device: torch.device) -> tuple[nn.Module, dict | None]:
    """The model to train: from --cfg, or from --weights (fine-tuning / resuming). Returns (model, checkpoint)."""
    if not str(opt.weights).endswith(".pt"):
        if not opt.cfg:
            raise UserInputError("pass --cfg (a model YAML such as yolov5s.yaml) or --weights (a .pt checkpoint)")
        model = DetectionModel(opt.cfg, ch=3, nc=nc, anchors=hyp.get("anchors"),
                               backbone_weights=opt.backbone_weights or None)
        return model.to(device), None
    ckpt = load_checkpoint(opt.weights)
    if opt.resume:
        return build_model(ckpt, use_ema=False).to(device), ckpt
    model = DetectionModel(opt.cfg or without_weights_files(ckpt["yaml"]), ch=3, nc=nc, anchors=hyp.get("anchors"))
    exclude = ("anchor",) if (opt.cfg or hyp.get("anchors")) else ()
    transfer_weights(model, ckpt.get("ema") or ckpt["model"], opt.weights, exclude)
    if opt.backbone_weights:  # after the transfer: the published backbone replaces the checkpoint's
        model.load_backbone(opt.backbone_weights)
    return model.to(device), ckpt


def freeze_layers(model: nn.Module, freeze: list[int | str]) -> None:
    """--freeze 10 freezes layers 0-9; --freeze 0 1 2 freezes those layer indices; 'backbone' adds the layers
    --backbone-weights loaded (``model.backbone_rows``)."""
    numbers = [f for f in freeze if f != "backbone"]
    layers = set(numbers if len(numbers) > 1 else range(numbers[0] if numbers else 0))
    if "backbone" in freeze:
        layers.update(getattr(model, "backbone_rows", []))
    if "backbone" in freeze and not getattr(model, "backbone_rows", []):
        LOGGER.warning("--freeze backbone: this model holds no published backbone weights, so no layer is frozen "
                       "for it")
    frozen = {f"model.{i}." for i in layers}
    for name, p in model.named_parameters():
        p.requires_grad = not any(name.startswith(prefix) for prefix in frozen)
        if not p.requires_grad:
            LOGGER.info(f"frozen: {name}")


def loss_gains(hyp: dict, levels: int, nc: int, imgsz: int) -> dict:
    """The hyp file's loss gains are tuned for 3 detection levels, 80 classes and 640 px images; rescale them for
    this model and dataset (box by levels, class by classes and levels, objectness by image area and levels)."""
    per_level = 3 / levels
    return {**hyp, "box": hyp["box"] * per_level, "cls": hyp["cls"] * per_level * nc / 80,
            "obj": hyp["obj"] * per_level * (imgsz / 640) ** 2}


def custom_l2_setup(model: nn.Module) -> tuple[set[int], callable]:
    """RepVGG's custom L2 on equivalent kernels: (ids of weights it replaces weight decay for, penalty function)."""
    from models.modules import repvgg

    return {id(p) for p in repvgg.repvgg_custom_l2_parameters(model)}, repvgg.repvgg_custom_l2


def training_forward(model: nn.Module, compile_model: bool):
    """What runs the training forward: the model itself, or with --compile a ShapeCompiledForward of it."""
    if not compile_model:
        return model
    if RANK != -1:
        LOGGER.warning("WARNING --compile does not work with DDP here; training without it")
        return model
    LOGGER.info(f"{colorstr('compile: ')}torch.compile of the first batch shape (minutes the first time on a "
                "machine, seconds from its cache later); other shapes, such as an epoch's last batch, run eagerly")
    return ShapeCompiledForward(model)


def random_rescale(imgs: torch.Tensor, imgsz: int, gs: int) -> torch.Tensor:
    """--multi-scale: resize the batch so its longer side is a random stride multiple between 0.5x and 1.5x --img
    (uniform over those multiples); the other side follows, rounded up to a stride multiple."""
    longest = gs * random.randint(math.ceil(imgsz / 2 / gs), int(imgsz * 3 / 2 // gs))
    height, width = imgs.shape[2:]
    if longest == max(height, width):
        return imgs
    stride_multiple = lambda side: gs * math.ceil(side * longest / max(height, width) / gs)  # noqa: E731
    return nn.functional.interpolate(imgs, size=(stride_multiple(height), stride_multiple(width)), mode="bilinear",
                                     align_corners=False)


def labels_to_class_weights(labels: list[np.ndarray], nc: int = 80) -> torch.Tensor:
    """Inverse-frequency class weights (normalised to sum 1) from the training labels."""
    if not labels or not any(len(x) for x in labels):
        return torch.ones(nc) / nc
    counts = np.bincount(np.concatenate(labels, 0)[:, 0].astype(int), minlength=nc).astype(float)
    weights = 1 / np.maximum(counts, 1)
    return torch.from_numpy(weights / weights.sum()).float()


def labels_to_image_weights(labels: list[np.ndarray], nc: int = 80, class_weights: np.ndarray | None = None):
    """Per-image sampling weight: sum of its labels' class weights (--image-weights)."""
    class_weights = np.ones(nc) if class_weights is None else class_weights
    return np.array([class_weights[x[:, 0].astype(int)].sum() for x in labels])


def seed_epoch(seed: int, epoch: int) -> None:
    """Seed the global RNGs (main-process draws: --multi-scale, --image-weights) from (seed, epoch, rank) alone, so a
    resumed run draws what an uninterrupted one does; the loader's shuffles and augmentation draws are seeded per
    epoch by its own sampler (``SeededBatchSampler``, started at the run's first epoch)."""
    init_seeds(epoch_seeds(seed, epoch, RANK)[0])


# -------------------------------------------------------------------------------------------------- the trainer


class Trainer:
    """One training run: set up in ``__init__``, then ``fit()`` runs the epochs and the final evaluation."""

    def __init__(self, hyp: dict, opt: argparse.Namespace, device: torch.device):
        self.opt, self.device, self.cuda = opt, device, device.type == "cuda"
        self.main = RANK in {-1, 0}
        self.save_dir = Path(opt.save_dir)
        self.last, self.best = self.save_dir / "weights/last.pt", self.save_dir / "weights/best.pt"
        self.plots = not opt.evolve and not opt.noplots
        self.record_settings(hyp)
        init_seeds(opt.seed + 1 + RANK, deterministic=True)
        with torch_distributed_zero_first(LOCAL_RANK):
            self.data = check_dataset(opt.data)
        self.nc = 1 if opt.single_cls else int(self.data["nc"])
        single_name = opt.single_cls and len(self.data["names"]) != 1
        self.names = {0: "item"} if single_name else self.data["names"]
        ckpt = self.setup_model(hyp)
        self.resolve_batch_size()
        self.setup_optimization(hyp, ckpt)
        self.setup_data()
        self.setup_loss(hyp)

    def record_settings(self, hyp: dict) -> None:
        """hyp.yaml and opt.yaml of the run; the checkpoints keep the hyperparameters as given (``opt.hyp``)."""
        if self.main:
            (self.save_dir / "weights").mkdir(parents=True, exist_ok=True)
            LOGGER.info(colorstr("hyperparameters: ") + ", ".join(f"{k}={v}" for k, v in hyp.items()))
            yaml_save(self.save_dir / "hyp.yaml", hyp)
            yaml_save(self.save_dir / "opt.yaml", vars(self.opt))
        self.opt.hyp = hyp.copy()

    def setup_model(self, hyp: dict) -> dict | None:
        opt = self.opt
        self.model, ckpt = build_train_model(opt, hyp, self.nc, self.device)
        freeze_layers(self.model, opt.freeze)
        channels_last_training(self.model, self.device, getattr(opt, "compile", False),
                               getattr(opt, "memory_format", "auto"), distributed=RANK != -1)
        self.gs = max(int(self.model.stride.max()), 32)
        self.imgsz = check_img_size(opt.imgsz, self.gs, floor=self.gs * 2)
        return ckpt

    def resolve_batch_size(self) -> None:
        """--batch-size -1: AutoBatch's batch size (16 on the CPU), also written to opt.yaml and the checkpoints."""
        if self.opt.batch_size != -1:
            return
        self.opt.batch_size = autobatch(self.model, self.imgsz, self.device)
        if self.main:
            saved = yaml_load(self.save_dir / "opt.yaml")
            yaml_save(self.save_dir / "opt.yaml", {**saved, "batch_size": self.opt.batch_size})

    def setup_optimization(self, hyp: dict, ckpt: dict | None) -> None:
        """Optimizer (weight decay per step of ``batch_size * accumulation`` images), EMA, AMP scaler, early stopping,
        and on --resume their saved states."""
        opt = self.opt
        hyp["weight_decay"] = scaled_weight_decay(hyp["weight_decay"], opt.batch_size, nominal_batch(hyp))
        l2_ids, self.l2_penalty = custom_l2_setup(self.model) if opt.custom_l2 else (set(), None)
        self.optimizer = smart_optimizer(self.model, opt.optimizer, hyp["lr0"], hyp["momentum"], hyp["weight_decay"],
                                         l2_ids)
        self.ema = ModelEMA(self.model) if self.main else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.cuda)
        self.stopper, self.best_fitness, self.start_epoch, self.last_opt_step = EarlyStopping(opt.patience), 0.0, 0, -1
        if opt.resume:
            self.restore(ckpt)
        if opt.sync_bn and RANK != -1 and self.cuda:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model).to(self.device)
            LOGGER.info("SyncBatchNorm: batch statistics are shared across the DDP processes")
        elif opt.sync_bn:
            LOGGER.warning("WARNING --sync-bn needs DDP training on CUDA devices; ignored")

    def restore(self, ckpt: dict) -> None:
        """--resume: optimizer, scaler, EMA, RNG and progress states of the checkpoint."""
        if ckpt.get("optimizer") is None:
            raise UserInputError(f"{self.opt.weights}: training state was stripped (finished run); nothing to resume")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
            self.ema.updates = int(ckpt["updates"])
        if ckpt.get("rng"):
            set_rng_state(ckpt["rng"])
        self.start_epoch = ckpt["epoch"] + 1
        if self.start_epoch >= self.opt.epochs:
            raise UserInputError(f"{self.opt.weights}: all {self.opt.epochs} epochs are done; nothing to resume")
        self.best_fitness = float(ckpt.get("best_fitness", 0.0))
        self.stopper.best_fitness = self.best_fitness
        self.stopper.best_epoch = ckpt.get("best_epoch", self.start_epoch - 1)
        self.last_opt_step = ckpt.get("last_opt_step", -1)
        LOGGER.info(f"Resuming {self.opt.weights}: epochs {self.start_epoch} to {self.opt.epochs - 1} of "
                    f"{self.opt.epochs} remain")
        if self.main:
            clean_interrupted_run(self.save_dir, self.start_epoch)

    def setup_data(self) -> None:
        """Training loader (every rank) and validation loader (rank 0); label checks, anchors and label plots."""
        opt, batch = self.opt, self.opt.batch_size // WORLD_SIZE
        with torch_distributed_zero_first(LOCAL_RANK):  # rank 0 scans and caches the labels first
            self.train_loader, self.dataset = create_dataloader(
                self.data["train"], self.imgsz, batch, self.gs, opt.single_cls, hyp=self.opt.hyp, augment=True,
                cache=opt.cache, rect=opt.rect, rank=LOCAL_RANK, workers=opt.workers, image_weights=opt.image_weights,
                quad=opt.quad, prefix=colorstr("train: "), shuffle=True, seed=opt.seed, nc=self.nc,
                start_epoch=self.start_epoch)
        labels = np.concatenate(self.dataset.labels, 0) if self.dataset.labels else np.zeros((0, 5))
        if len(labels) and int(labels[:, 0].max()) >= self.nc:
            raise UserInputError(f"label class {int(labels[:, 0].max())} exceeds nc={self.nc} in {opt.data}")
        self.val_loader = None
        if self.main:
            self.val_loader = create_dataloader(
                self.data["val"], self.imgsz, batch * 2, self.gs, opt.single_cls, hyp=self.opt.hyp,
                cache=None if opt.noval else opt.cache, rect=True, rank=-1, workers=opt.workers * 2, pad=0.5,
                prefix=colorstr("val: "), nc=self.nc)[0]
            if not opt.resume:
                self.prepare_anchors(labels)
        if RANK != -1:
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=[LOCAL_RANK] if self.cuda else None,
                                                             output_device=LOCAL_RANK if self.cuda else None)
        self.schedule = Schedule(self.opt.hyp, opt.epochs, len(self.train_loader), opt.batch_size, opt.cos_lr)

    def prepare_anchors(self, labels: np.ndarray) -> None:
        """AutoAnchor (unless --noautoanchor) and the label plots, on a new run."""
        if not self.opt.noautoanchor:
            check_anchors(self.dataset, model=self.model, thr=self.opt.hyp["anchor_t"], imgsz=self.imgsz,
                          seed=self.opt.seed)
            if self.ema:
                self.ema.module.model[-1].anchors.copy_(self.model.model[-1].anchors)
        self.model.half().float()  # anchors (and weights) rounded through float16, as upstream's runs are
        if self.plots:
            plot_labels(labels, self.names, self.save_dir)

    def setup_loss(self, hyp: dict) -> None:
        """Loss gains for this model and dataset, the model attributes the loss and checkpoints read, the forward."""
        bare = self.bare = de_parallel(self.model)
        hyp.update(loss_gains(hyp, bare.model[-1].nl, self.nc, self.imgsz), label_smoothing=self.opt.label_smoothing)
        bare.nc, bare.hyp, bare.names = self.nc, hyp, self.names
        bare.class_weights = labels_to_class_weights(self.dataset.labels, self.nc).to(self.device) * self.nc
        if self.ema:
            self.ema.module.names = self.names
        self.compute_loss = ComputeLoss(self.model)
        self.forward = training_forward(self.model, getattr(self.opt, "compile", False))
        self.maps, self.results = np.zeros(self.nc), (0.0,) * 7
        self.tb = tensorboard_writer(self.save_dir) if self.main and not self.opt.evolve else None
        if self.tb:
            tensorboard_graph(self.tb, self.bare, self.imgsz, self.device)

    # ------------------------------------------------------------------------------------------------ training

    def fit(self) -> tuple:
        """Train the remaining epochs, then finish the run; returns the last evaluation's results."""
        self.t0, epoch, stop = time.time(), self.start_epoch, False
        LOGGER.info(f"Training at {self.imgsz} px, validating at {self.imgsz} px, "
                    f"{self.train_loader.num_workers * WORLD_SIZE} loader workers\n"
                    f"Run folder: {colorstr('bold', self.save_dir)}\n"
                    f"{self.opt.epochs - self.start_epoch} epochs to go...")
        for epoch in range(self.start_epoch, self.opt.epochs):
            mean_loss, lrs = self.train_epoch(epoch)
            if self.main:
                stop = self.end_epoch(epoch, mean_loss, lrs)
            if RANK != -1:  # every rank stops together
                flag = [stop]
                dist.broadcast_object_list(flag, 0)
                stop = flag[0]
            if stop:
                break
        if self.main:
            self.finish(epoch)
        torch.cuda.empty_cache()
        return self.results

    def train_epoch(self, epoch: int) -> tuple[torch.Tensor, list[float]]:
        """One pass over the training loader; returns the mean (box, obj, cls) loss and the groups' last rates."""
        self.model.train()
        seed_epoch(self.opt.seed, epoch)
        if self.opt.image_weights:
            self.resample_images()
        batches = len(self.train_loader)
        mean_loss = torch.zeros(3, device=self.device)
        LOGGER.info("\n" + "".join(f"{c:>11}" for c in ("Epoch", "GPU_mem", "box_loss", "obj_loss", "cls_loss",
                                                        "Instances", "Size")))
        bar = enumerate(self.train_loader)
        if self.main:
            bar = tqdm(bar, total=batches, bar_format=TQDM_BAR_FORMAT)
        self.optimizer.zero_grad()
        for i, (imgs, targets, paths, _) in bar:
            ni = i + batches * epoch
            settings = self.schedule.at(ni)
            self.apply(settings)
            imgs, items = self.backward(imgs, targets, settings.accumulate, f"epoch {epoch}, batch {i}")
            if ni - self.last_opt_step >= settings.accumulate:
                self.optimizer_step()
                self.last_opt_step = ni
            if self.main:
                mean_loss += (items - mean_loss) / (i + 1)
                self.show_progress(bar, epoch, mean_loss, targets, imgs)
                if self.plots and ni < 3:
                    mosaic = plot_images(imgs, targets, paths, self.save_dir / f"train_batch{ni}.jpg", self.names)
                    if self.tb:
                        self.tb.add_image(f"Mosaics/train_batch{ni}", mosaic, ni, dataformats="HWC")
        return mean_loss, [group["lr"] for group in self.optimizer.param_groups]

    def resample_images(self) -> None:
        """--image-weights: draw this epoch's images with weights from their classes' weights and current mAPs."""
        weights = self.bare.class_weights.cpu().numpy() * (1 - self.maps) ** 2 / self.nc
        per_image = labels_to_image_weights(self.dataset.labels, nc=self.nc, class_weights=weights)
        self.dataset.indices = random.choices(range(self.dataset.n), weights=per_image, k=self.dataset.n)

    def apply(self, settings) -> None:
        """Set the schedule's learning rate (and momentum, where the optimizer has one) on every group."""
        for group, lr in zip(self.optimizer.param_groups, settings.lr):
            group["lr"] = lr
            if "momentum" in group:
                group["momentum"] = settings.momentum

    def backward(self, imgs: torch.Tensor, targets: torch.Tensor, accumulate: int, where: str):
        """Forward, loss and backward of one batch; returns the (rescaled) images and the detached loss terms."""
        imgs = imgs.to(self.device, non_blocking=True).float() / 255
        if self.opt.multi_scale:
            imgs = random_rescale(imgs, self.imgsz, self.gs)
        with torch.autocast(self.device.type, enabled=self.cuda):
            loss, items = self.compute_loss(self.forward(imgs), targets.to(self.device))
            if self.l2_penalty is not None:  # replaces the optimizer's weight decay on the covered kernels
                loss = loss + 0.5 * self.bare.hyp["weight_decay"] * self.l2_penalty(self.bare) / accumulate
            loss = loss * WORLD_SIZE * (4.0 if self.opt.quad else 1.0)  # DDP averages gradients over the ranks
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss.item()} at {where} "
                                     f"(box, obj, cls = {items.tolist()}); {kept_checkpoint(self.last)}")
        self.scaler.scale(loss).backward()
        return imgs, items

    def optimizer_step(self) -> None:
        """Apply the accumulated gradients (unscaled, norm clipped at 10), reset them and update the EMA."""
        self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=MAX_GRAD_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.ema:
            self.ema.update(self.model)

    def show_progress(self, bar, epoch: int, mean_loss: torch.Tensor, targets: torch.Tensor, imgs: torch.Tensor):
        memory = f"{torch.cuda.memory_reserved() / 1e9 if self.cuda else 0:.3g}G"
        cells = [f"{epoch}/{self.opt.epochs - 1}", memory, *(f"{x:.4g}" for x in mean_loss.tolist()),
                 f"{targets.shape[0]:.4g}", f"{imgs.shape[-1]:.4g}"]
        bar.set_description("".join(f"{c:>11}" for c in cells))

    # ----------------------------------------------------------------------------------------- end of an epoch

    def end_epoch(self, epoch: int, mean_loss: torch.Tensor, lrs: list[float]) -> bool:
        """Evaluate the EMA model, log the epoch, save checkpoints; returns whether to stop early."""
        final = epoch + 1 == self.opt.epochs or self.stopper.possible_stop
        if not self.opt.noval or final:
            evaluation = validate.evaluate(self.ema.ema, self.val_loader, self.names, self.nc,
                                           single_cls=self.opt.single_cls, half=self.cuda,
                                           compute_loss=self.compute_loss, out=validate.Outputs(self.save_dir))
            self.results, self.maps = evaluation.results, evaluation.maps
        fit = float(fitness(np.array(self.results).reshape(1, -1))[0])
        stop = self.stopper(epoch=epoch, fitness=fit)
        self.best_fitness = max(self.best_fitness, fit)
        values = [float(x) for x in (*mean_loss.tolist(), *self.results, *lrs)]
        write_results_csv(self.save_dir / "results.csv", epoch, values)
        if self.tb:
            for key, value in zip(RESULT_KEYS, values):
                self.tb.add_scalar(key, value, epoch)
        check_not_diverged(epoch, self.last, self.results[4:], self.bare, self.ema.ema)
        if not self.opt.nosave or (final and not self.opt.evolve):
            self.save(epoch, is_best=self.best_fitness == fit)
        return stop

    def save(self, epoch: int, is_best: bool) -> None:
        """last.pt every epoch, best.pt when the fitness is the best so far, epochN.pt every --save-period."""
        ckpt = make_checkpoint(
            self.bare, ema=model_state(self.ema.ema), updates=self.ema.updates, optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict(), epoch=epoch, best_fitness=self.best_fitness,
            best_epoch=self.stopper.best_epoch, last_opt_step=self.last_opt_step, train_args=vars(self.opt),
            hyp=self.opt.hyp, rng=rng_state())
        targets = [self.last] + [self.best] * is_best
        if self.opt.save_period > 0 and epoch % self.opt.save_period == 0:
            targets.append(self.last.with_name(f"epoch{epoch}.pt"))
        for path in targets:
            save_checkpoint(ckpt, path)

    def finish(self, epoch: int) -> None:
        """Strip the optimizer from the checkpoints, plot the results, and evaluate best.pt with val.py."""
        hours = (time.time() - self.t0) / 3600
        LOGGER.info(f"\nTraining done: {epoch - self.start_epoch + 1} epoch(s) in {hours:.3f} hours")
        for path in (self.last, self.best):
            if path.exists():
                strip_optimizer(path)
        if self.plots:
            plot_results(file=self.save_dir / "results.csv")
        if not self.best.exists() or self.opt.evolve:
            LOGGER.info(f"Results saved to {colorstr('bold', self.save_dir)}")
        else:
            LOGGER.info(f"\nEvaluating {self.best} ...")  # val.py ends with "Results saved to <save_dir>"
            self.results, _, _ = validate.run(
                self.data, weights=self.best, batch_size=self.opt.batch_size // WORLD_SIZE * 2, imgsz=self.imgsz,
                iou_thres=0.6, single_cls=self.opt.single_cls, verbose=True, plots=self.plots,
                project=self.save_dir.parent, name=self.save_dir.name, exist_ok=True,
                device=str(self.device.index if self.cuda else "cpu"))
        if self.tb:
            tensorboard_run_images(self.tb, self.save_dir, epoch)
            self.tb.close()


def train(hyp: dict, opt: argparse.Namespace, device: torch.device) -> tuple:
    """One training run with these hyperparameters and options; returns its last evaluation (7 values)."""
    return Trainer(hyp, opt, device).fit()


# ------------------------------------------------------------------------------------------------- command line


def parse_opt(argv: list[str] | None = None, check: bool = True) -> argparse.Namespace:
    """The command line's options, completed from the data YAML's ``train_defaults`` and checked
    (``check_train_options``) unless ``check`` is False."""
    parser = train_parser()
    opt = parser.parse_args(argv)
    spelled = parser.spelled(argv)
    apply_data_defaults(opt, set(spelled))
    if check:
        check_train_options(opt, spelled)
    return opt


def train_parser() -> OptionParser:
    """train.py's options with upstream's flags and defaults."""
    parser = OptionParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=str, default="", help="starting weights: our .pt or an upstream YOLOv5 .pt")
    parser.add_argument("--cfg", type=str, default="", help="model YAML: a path, or a file name in models/")
    parser.add_argument("--data", type=str, default=ROOT / "data/shapes.yaml", help="data YAML (path or name)")
    parser.add_argument("--hyp", type=str, default=ROOT / "data/hyps/hyp.scratch-low.yaml",
                        help="hyperparameter YAML (path or name in data/hyps)")
    parser.add_argument("--epochs", type=int, default=100, help="epochs to train")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch, over all devices together")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=640,
                        help="training and validation image size in pixels")
    parser.add_argument("--rect", action="store_true", help="rectangular batches (no mosaic) instead of squares")
    parser.add_argument("--resume", nargs="?", const=True, default=False,
                        help="continue an interrupted run: its last.pt, or the newest one under runs/")
    parser.add_argument("--nosave", action="store_true", help="write a checkpoint at the end only")
    parser.add_argument("--noval", action="store_true", help="evaluate after the last epoch only")
    parser.add_argument("--noautoanchor", action="store_true", help="keep the model's anchors as they are")
    parser.add_argument("--noplots", action="store_true", help="write no plots or image mosaics")
    parser.add_argument("--evolve", type=int, nargs="?", const=300,
                        help="search hyperparameters: this many generations of mutated trainings")
    parser.add_argument("--cache", type=str, nargs="?", const="ram", help="keep decoded images in 'ram' or on 'disk'")
    parser.add_argument("--image-weights", action="store_true",
                        help="sample images by how poorly their classes score (instead of uniformly)")
    parser.add_argument("--device", default="", help="'cpu', or CUDA device indices such as 0 or 0,1")
    parser.add_argument("--multi-scale", action="store_true", help="train each batch at a random size, 0.5-1.5x --img")
    parser.add_argument("--single-cls", action="store_true", help="train every class as one")
    parser.add_argument("--optimizer", type=str, choices=["SGD", "Adam", "AdamW", "RMSProp"], default="SGD",
                        help="optimizer")
    parser.add_argument("--sync-bn", action="store_true", help="synchronised batch norm across DDP processes (CUDA)")
    parser.add_argument("--workers", type=int, default=8, help="dataloader worker processes at most (per DDP rank)")
    parser.add_argument("--project", default=ROOT / "runs/train", help="parent folder of the run folder")
    parser.add_argument("--name", default="exp", help="run folder name (exp, exp2, ... when taken)")
    parser.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of numbering a new one")
    parser.add_argument("--quad", action="store_true", help="collate batches as 2x2 image quads (for large --img)")
    parser.add_argument("--cos-lr", action="store_true", help="half-cosine learning-rate curve instead of linear")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing epsilon of the class loss")
    parser.add_argument("--patience", type=int, default=100,
                        help="stop after this many epochs without a better fitness (0: never)")
    parser.add_argument("--freeze", nargs="+", type=freeze_item, default=[0],
                        help="layers to freeze: one number N freezes layers 0..N-1 (10: a YOLOv5 backbone), "
                             "several numbers freeze those layers; 'backbone' freezes the layers "
                             "--backbone-weights loaded")
    parser.add_argument("--backbone-weights", type=str, default="",
                        help="published checkpoint to start the backbone (or DAMO-YOLO neck) from: an official "
                             "RepLKNet, RevCol, RepVGG, RepGhostNet or DAMO-YOLO file, or a timm checkpoint; "
                             "loaded into the model rows it fits (see the README, Transfer learning)")
    parser.add_argument("--save-period", type=int, default=-1, help="also keep epochN.pt every N epochs (N >= 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random in the run")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the DDP launcher; leave it alone")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the training forward, in NCHW (compiling takes minutes on a CPU; see "
                             "docs/BENCHMARKS.md for what it gains)")
    parser.add_argument("--memory-format", choices=MEMORY_FORMATS, default="auto",
                        help="memory layout of CPU training: 'channels-last' (NHWC), 'nchw', or 'auto' (the default "
                             "layout the README's speed section gives, with its reason)")
    parser.add_argument("--custom-l2", action="store_true",
                        help="RepVGG custom L2 on equivalent kernels instead of weight decay on RepVGG blocks")
    return parser


DATA_DEFAULT_KEYS = ("cfg", "hyp", "imgsz", "epochs", "batch_size")


def apply_data_defaults(opt: argparse.Namespace, given: set[str]) -> None:
    """Options the user did not give take the values under the data YAML's ``train_defaults`` (ours; upstream's
    readers ignore the key), so that a bare ``python train.py`` trains the embedded dataset as the README does. The
    model (``cfg``) is taken only when no --cfg, --weights or --resume was given; nothing is taken when resuming."""
    if opt.resume:
        return
    try:
        data = yaml_load(data_yaml_file(opt.data))
    except (UserInputError, OSError, yaml.YAMLError):
        return  # the option checks and the dataset check report the data YAML itself
    recommended = (data.get("train_defaults") if isinstance(data, dict) else None) or {}
    if not isinstance(recommended, dict):
        raise UserInputError(f"{opt.data}: 'train_defaults' must be a mapping of train.py options")
    if unknown := sorted(set(recommended) - set(DATA_DEFAULT_KEYS)):
        raise UserInputError(f"{opt.data}: train_defaults: unknown key '{unknown[0]}' "
                             f"(expected {', '.join(DATA_DEFAULT_KEYS)})")
    taken = {k: v for k, v in recommended.items() if k not in given and (k != "cfg" or not (opt.cfg or opt.weights))}
    for k, v in taken.items():
        setattr(opt, k, v)
    if taken:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in taken.items())
        LOGGER.info(f"{colorstr('defaults: ')}{Path(str(opt.data)).name} recommends {flags} (options not given)")


def latest_run(search_dir: Path = ROOT / "runs") -> Path:
    """The most recently written last.pt under runs/."""
    candidates = list(Path(search_dir).rglob("last*.pt"))
    if not candidates:
        raise UserInputError(f"--resume: no last.pt found under {search_dir}; pass the checkpoint path")
    return max(candidates, key=os.path.getmtime)


def prepare_resume(opt: argparse.Namespace) -> argparse.Namespace:
    """--resume [path]: restore the run's options from its checkpoint and point --weights at it."""
    last = Path(opt.resume) if isinstance(opt.resume, str) else latest_run()
    ckpt = load_checkpoint(last)
    if not ckpt.get("train_args"):
        raise UserInputError(f"{last}: this checkpoint holds no training options; cannot resume it")
    args = argparse.Namespace(**ckpt["train_args"])
    args.weights, args.resume, args.cfg, args.hyp = str(last), True, "", ckpt.get("hyp") or args.hyp
    args.save_dir = str(last.parent.parent)
    LOGGER.info(f"Continuing the run of {last}")
    return args


def load_hyp(hyp) -> dict:
    hyp = dict(hyp) if isinstance(hyp, dict) else yaml_load(find_hyp(hyp))
    missing = [k for k in ("lr0", "lrf", "momentum", "weight_decay", "box", "cls", "obj", "anchor_t") if k not in hyp]
    if missing:
        raise UserInputError(f"hyperparameters: missing key '{missing[0]}'")
    nominal_batch(hyp)  # an invalid nbs stops here, before anything is built
    return hyp


def find_hyp(path) -> Path:
    p = Path(path)
    for c in (p, ROOT / "data/hyps" / p.name):
        if c.is_file():
            return c
    raise UserInputError(f"{path}: hyperparameter file not found")


# ------------------------------------------------------------------------------------------------- option checks

TRAIN_RULES = {  # flag -> rule; checked in this order, before anything is read or built
    "--weights": suffix(".pt", what="a .pt checkpoint, or nothing to train from --cfg"),
    "--cfg": found(find_model_yaml, "model YAML not found (a path, or a file name in models/)"),
    "--data": found(data_yaml_file, "data YAML not found (a path, or a file name in data/)"),
    "--hyp": found(find_hyp, "hyperparameter YAML not found (a path, or a file name in data/hyps/)"),
    "--epochs": whole(1),
    "--batch-size": whole(1, also=(-1,), hint=", or -1 for AutoBatch"),
    "--imgsz": whole(1),
    "--resume": existing_file,
    "--evolve": whole(1, hint=" (generations)"),
    "--cache": one_of("ram", "disk"),
    "--device": device_spec,
    "--workers": whole(0),
    "--name": not_empty,
    "--label-smoothing": fraction(open_high=True),
    "--patience": whole(0, hint=" (0: never stop early)"),
    "--freeze": each(whole_or("backbone")),
    "--backbone-weights": existing_file,
    "--save-period": whole(1, also=(-1,), hint=", or -1 for none"),
    "--seed": between(0, 2**31 - 1),
    "--local_rank": whole(-1),
}
TRAIN_COMBINATIONS = (
    Combination(("--freeze",), lambda o: "backbone" in o.freeze and not (o.backbone_weights or o.resume or o.weights),
                "'backbone' freezes the layers --backbone-weights loads; give --backbone-weights FILE"),
    Combination(("--backbone-weights", "--resume"), lambda o: o.backbone_weights and o.resume,
                "a resumed run continues from its own last.pt; start a new run to load a backbone"),
    Combination(("--cfg", "--weights"), lambda o: not (o.cfg or o.weights or o.resume),
                "give a model: --cfg (a model YAML such as yolov5s.yaml) or --weights (a .pt checkpoint)"),
    Combination(("--rect", "--image-weights"), lambda o: o.rect and o.image_weights,
                "image weights draw images at random, rectangular batches need them in aspect-ratio order"),
    Combination(("--save-period", "--nosave"), lambda o: o.nosave and o.save_period > 0,
                "--nosave writes the final checkpoint only, so no epochN.pt would be kept"),
    Combination(("--quad", "--batch-size"), lambda o: o.quad and 0 < o.batch_size < 4 * WORLD_SIZE,
                "every 4 images of a batch become one, so a batch needs at least 4 images (per process)"),
    Combination(("--device",), lambda o: LOCAL_RANK == -1 and "," in str(o.device),
                lambda o: f"several devices need one process each; launch with torchrun --nproc_per_node "
                          f"{len(str(o.device).split(','))} train.py --device {o.device} ..."),
    Combination(("--batch-size",), lambda o: WORLD_SIZE > 1 and o.batch_size == -1,
                "AutoBatch sizes a single process's batch; give DDP training a batch size"),
    Combination(("--batch-size",), lambda o: WORLD_SIZE > 1 and o.batch_size % WORLD_SIZE != 0,
                f"must be a multiple of the {WORLD_SIZE} DDP processes"),
    Combination(("--evolve",), lambda o: WORLD_SIZE > 1 and bool(o.evolve), "not available with DDP training"),
    Combination(("--image-weights",), lambda o: WORLD_SIZE > 1 and o.image_weights, "not available with DDP training"),
)


def check_train_options(opt: argparse.Namespace, spelled: dict[str, str] | None = None) -> None:
    """TRAIN_RULES and TRAIN_COMBINATIONS; a failure raises UserInputError naming the flag."""
    check_options(opt, TRAIN_RULES, TRAIN_COMBINATIONS, spelled)


def init_distributed(opt: argparse.Namespace, device: torch.device) -> torch.device:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPU); returns this rank's device."""
    if device.type == "cuda":
        torch.cuda.set_device(LOCAL_RANK)
        device = torch.device("cuda", LOCAL_RANK)
    backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=10800))
    LOGGER.info(f"DDP: {WORLD_SIZE} processes, {backend} backend, {opt.batch_size // WORLD_SIZE} images per batch each")
    return device


def new_run_dir(opt: argparse.Namespace) -> str:
    """project/name, incremented (exp, exp2, ...) by rank 0 and shared with the other ranks."""
    if opt.evolve:
        opt.project = str(ROOT / "runs/evolve") if str(opt.project) == str(ROOT / "runs/train") else opt.project
        opt.exist_ok, opt.resume = opt.resume, False
    save_dir = [str(increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok)) if RANK in {-1, 0} else None]
    if RANK != -1:
        dist.broadcast_object_list(save_dir, 0)
    return save_dir[0]


def main(opt: argparse.Namespace) -> None:
    check_train_options(opt)
    resuming = opt.resume and not opt.evolve
    if resuming:
        opt = prepare_resume(opt)
        check_train_options(opt)  # the options restored from the checkpoint
    elif opt.cfg:
        opt.cfg = str(find_model_yaml(opt.cfg))
    device = select_device(opt.device, batch_size=opt.batch_size)
    try:
        if LOCAL_RANK != -1:
            device = init_distributed(opt, device)
        if not resuming:
            opt.save_dir = new_run_dir(opt)
        if RANK in {-1, 0}:
            print_args(vars(opt), "train")
        if not opt.evolve:
            train(load_hyp(opt.hyp), opt, device)
        else:
            from utils.evolve import evolve

            evolve(opt, device, load_hyp(opt.hyp), train)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_options(**kwargs) -> argparse.Namespace:
    """The options of ``run(**kwargs)``: upstream's defaults, then ``kwargs``, then the ``train_defaults`` of the data
    YAML those name, for the options ``kwargs`` leave out."""
    opt = train_parser().parse_args([])
    if unknown := sorted(set(kwargs) - set(vars(opt))):
        raise UserInputError(f"train.run: unknown option {unknown[0]!r}")
    for k, v in kwargs.items():
        setattr(opt, k, v)
    apply_data_defaults(opt, set(kwargs))
    return opt


def run(**kwargs) -> argparse.Namespace:
    """Programmatic entry: train.run(data='shapes.yaml', cfg='yolov5n.yaml', imgsz=320, epochs=3)."""
    opt = run_options(**kwargs)
    main(opt)
    return opt


if __name__ == "__main__":
    set_logging()
    retain_freed_memory()  # this process only trains: keep activations' memory between steps (no page faults)
    try:
        main(parse_opt())
    except (UserInputError, yaml.YAMLError) as e:
        LOGGER.error(f"ERROR: {e}")
        sys.exit(2)
    except NonFiniteLossError as e:
        LOGGER.error(f"ERROR: training stopped: {e}. Try a lower --hyp lr0, or check the labels.")
        sys.exit(3)
