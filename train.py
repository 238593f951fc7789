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
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from torch.optim import lr_scheduler
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import val as validate  # noqa: E402
from models.common import BatchNorm2d  # noqa: E402
from models.yolo import DetectionModel, find_model_yaml  # noqa: E402
from utils.autoanchor import check_anchors  # noqa: E402
from models.loading import build_model, transfer_weights  # noqa: E402
from utils.checkpoint import (  # noqa: E402
    load_checkpoint, make_checkpoint, model_state, rng_state, save_checkpoint, set_rng_state,
    strip_optimizer,
)
from utils.dataloaders import create_dataloader, epoch_seeds  # noqa: E402
from utils.datasets_check import check_dataset  # noqa: E402
from utils.general import (  # noqa: E402
    LOGGER, UserInputError, check_img_size, colorstr, increment_path, print_args, set_logging, yaml_load, yaml_save,
)
from utils.loss import ComputeLoss  # noqa: E402
from utils.metrics import fitness  # noqa: E402
from utils.plots import plot_images, plot_labels, plot_results  # noqa: E402
from utils.torch_utils import (  # noqa: E402
    EarlyStopping, ModelEMA, ShapeCompiledForward, de_parallel, init_seeds, retain_freed_memory, select_device,
    smart_optimizer, torch_distributed_zero_first,
)

LOCAL_RANK = int(os.getenv("LOCAL_RANK", -1))
RANK = int(os.getenv("RANK", -1))
WORLD_SIZE = int(os.getenv("WORLD_SIZE", 1))
TQDM_BAR_FORMAT = "{l_bar}{bar:10}{r_bar}"
AUTO_CHANNELS_LAST = True  # what --memory-format auto picks where channels-last is possible
RESULT_KEYS = ("train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision", "metrics/recall",
               "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "val/box_loss", "val/obj_loss", "val/cls_loss",
               "x/lr0", "x/lr1", "x/lr2")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf."""


def write_results_csv(file: Path, epoch: int, values: list[float]) -> None:
    """Append one epoch to results.csv in upstream's layout (right-aligned 20-wide columns)."""
    header = "" if file.exists() else ("%20s," * (len(values) + 1) % ("epoch", *RESULT_KEYS)).rstrip(",") + "\n"
    with open(file, "a") as f:
        f.write(header + ("%20.5g," * (len(values) + 1) % (epoch, *values)).rstrip(",") + "\n")


def build_train_model(opt, hyp: dict, nc: int, device: torch.device) -> tuple[nn.Module, dict | None]:
    """The model to train: from --cfg, or from --weights (fine-tuning / resuming). Returns (model, checkpoint)."""
    if not str(opt.weights).endswith(".pt"):
        if not opt.cfg:
            raise UserInputError("pass --cfg (a model YAML such as yolov5s.yaml) or --weights (a .pt checkpoint)")
        return DetectionModel(opt.cfg, ch=3, nc=nc, anchors=hyp.get("anchors")).to(device), None
    ckpt = load_checkpoint(opt.weights)
    if opt.resume:
        return build_model(ckpt, use_ema=False).to(device), ckpt
    model = DetectionModel(opt.cfg or ckpt["yaml"], ch=3, nc=nc, anchors=hyp.get("anchors")).to(device)
    exclude = ("anchor",) if (opt.cfg or hyp.get("anchors")) else ()
    transfer_weights(model, ckpt.get("ema") or ckpt["model"], opt.weights, exclude)
    return model, ckpt


def freeze_layers(model: nn.Module, freeze: list[int]) -> None:
    """--freeze 10 freezes layers 0-9; --freeze 0 1 2 freezes those layer indices."""
    prefixes = [f"model.{x}." for x in (freeze if len(freeze) > 1 else range(freeze[0]))]
    for k, v in model.named_parameters():
        v.requires_grad = not any(k.startswith(p) for p in prefixes)
        if not v.requires_grad:
            LOGGER.info(f"freezing {k}")


def custom_l2_setup(model: nn.Module) -> tuple[set[int], callable]:
    """RepVGG's custom L2 on equivalent kernels: (ids of weights it replaces weight decay for, penalty function)."""
    from models.modules import repvgg

    return {id(p) for p in repvgg.repvgg_custom_l2_parameters(model)}, repvgg.repvgg_custom_l2


def train(hyp: dict, opt: argparse.Namespace, device: torch.device) -> tuple:
    save_dir, epochs, batch_size = Path(opt.save_dir), opt.epochs, opt.batch_size
    weights_dir = save_dir / "weights"
    last, best = weights_dir / "last.pt", weights_dir / "best.pt"
    plots = not opt.evolve and not opt.noplots
    main_process = RANK in {-1, 0}
    if main_process:
        weights_dir.mkdir(parents=True, exist_ok=True)
        LOGGER.info(colorstr("hyperparameters: ") + ", ".join(f"{k}={v}" for k, v in hyp.items()))
        yaml_save(save_dir / "hyp.yaml", hyp)
        yaml_save(save_dir / "opt.yaml", vars(opt))
    opt.hyp = hyp.copy()
    init_seeds(opt.seed + 1 + RANK, deterministic=True)

    with torch_distributed_zero_first(LOCAL_RANK):
        data_dict = check_dataset(opt.data)
    train_path, val_path = data_dict["train"], data_dict["val"]
    nc = 1 if opt.single_cls else int(data_dict["nc"])
    names = {0: "item"} if opt.single_cls and len(data_dict["names"]) != 1 else data_dict["names"]

    model, ckpt = build_train_model(opt, hyp, nc, device)
    freeze_layers(model, opt.freeze)
    channels_last_training(model, device, getattr(opt, "compile", False), getattr(opt, "memory_format", "auto"))
    gs = max(int(model.stride.max()), 32)
    imgsz = check_img_size(opt.imgsz, gs, floor=gs * 2)

    nbs = 64  # nominal batch size
    accumulate = max(round(nbs / batch_size), 1)
    hyp["weight_decay"] *= batch_size * accumulate / nbs
    l2_ids, l2_penalty = custom_l2_setup(model) if opt.custom_l2 else (set(), None)
    optimizer = smart_optimizer(model, opt.optimizer, hyp["lr0"], hyp["momentum"], hyp["weight_decay"], l2_ids)

    if opt.cos_lr:
        def lf(x):
            return ((1 - math.cos(x * math.pi / epochs)) / 2) * (hyp["lrf"] - 1) + 1
    else:
        def lf(x):
            return (1 - x / epochs) * (1.0 - hyp["lrf"]) + hyp["lrf"]
    scheduler = lr_scheduler.LambdaLR(optimizer, lr_lambda=lf)
    ema = ModelEMA(model) if main_process else None

    best_fitness, start_epoch = 0.0, 0
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    stopper, stop = EarlyStopping(patience=opt.patience), False
    last_opt_step = -1
    if opt.resume:
        best_fitness, start_epoch = resume_state(ckpt, optimizer, scheduler, scaler, ema, epochs, opt.weights)
        stopper.best_fitness, stopper.best_epoch = best_fitness, ckpt.get("best_epoch", start_epoch - 1)
        last_opt_step = ckpt.get("last_opt_step", -1)
        if main_process:
            clean_interrupted_run(save_dir, start_epoch)
    del ckpt

    cuda = device.type == "cuda"
    if opt.sync_bn and RANK != -1 and cuda:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model).to(device)
        LOGGER.info("Using SyncBatchNorm()")
    elif opt.sync_bn:
        LOGGER.warning("WARNING --sync-bn ignored: SyncBatchNorm needs DDP training on CUDA devices")

    with torch_distributed_zero_first(LOCAL_RANK):  # rank 0 scans and caches the labels first
        train_loader, dataset = create_dataloader(
            train_path, imgsz, batch_size // WORLD_SIZE, gs, opt.single_cls, hyp=hyp, augment=True, cache=opt.cache,
            rect=opt.rect, rank=LOCAL_RANK, workers=opt.workers, image_weights=opt.image_weights, quad=opt.quad,
            prefix=colorstr("train: "), shuffle=True, seed=opt.seed, nc=nc, start_epoch=start_epoch)
    labels = np.concatenate(dataset.labels, 0) if dataset.labels else np.zeros((0, 5))
    if len(labels) and int(labels[:, 0].max()) >= nc:
        raise UserInputError(f"label class {int(labels[:, 0].max())} exceeds nc={nc} in {opt.data}")

    val_loader = None
    if main_process:
        val_loader = create_dataloader(
            val_path, imgsz, batch_size // WORLD_SIZE * 2, gs, opt.single_cls, hyp=hyp,
            cache=None if opt.noval else opt.cache, rect=True, rank=-1, workers=opt.workers * 2, pad=0.5,
            prefix=colorstr("val: "), nc=nc)[0]
        if not opt.resume:
            if not opt.noautoanchor:
                check_anchors(dataset, model=model, thr=hyp["anchor_t"], imgsz=imgsz, seed=opt.seed)
                if ema:
                    ema.module.model[-1].anchors.copy_(model.model[-1].anchors)
            model.half().float()  # pre-reduce anchor precision as upstream
            if plots:
                plot_labels(labels, names, save_dir)

    if RANK != -1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[LOCAL_RANK] if cuda else None,
                                                    output_device=LOCAL_RANK if cuda else None)

    nl = de_parallel(model).model[-1].nl
    hyp["box"] *= 3 / nl
    hyp["cls"] *= nc / 80 * 3 / nl
    hyp["obj"] *= (imgsz / 640) ** 2 * 3 / nl
    hyp["label_smoothing"] = opt.label_smoothing
    bare = de_parallel(model)
    bare.nc, bare.hyp, bare.names = nc, hyp, names
    bare.class_weights = labels_to_class_weights(dataset.labels, nc).to(device) * nc
    if ema:
        ema.module.names = names

    t0 = time.time()
    nb = len(train_loader)
    nw = max(round(hyp["warmup_epochs"] * nb), 100)
    maps = np.zeros(nc)
    results = (0, 0, 0, 0, 0, 0, 0)
    scheduler.last_epoch = start_epoch - 1
    compute_loss = ComputeLoss(model)
    forward = training_forward(model, getattr(opt, "compile", False))  # older checkpoints' options lack it
    LOGGER.info(f"Image sizes {imgsz} train, {imgsz} val\n"
                f"Using {train_loader.num_workers * WORLD_SIZE} dataloader workers\n"
                f"Logging results to {colorstr('bold', save_dir)}\n"
                f"Starting training for {epochs} epochs...")
    tb = tensorboard_writer(save_dir) if main_process and not opt.evolve else None
    epoch = start_epoch
    for epoch in range(start_epoch, epochs):
        model.train()
        seed_epoch(opt.seed, epoch)
        if opt.image_weights:
            cw = bare.class_weights.cpu().numpy() * (1 - maps) ** 2 / nc
            iw = labels_to_image_weights(dataset.labels, nc=nc, class_weights=cw)
            dataset.indices = random.choices(range(dataset.n), weights=iw, k=dataset.n)
        mloss = torch.zeros(3, device=device)
        pbar = enumerate(train_loader)
        LOGGER.info(("\n" + "%11s" * 7) % ("Epoch", "GPU_mem", "box_loss", "obj_loss", "cls_loss", "Instances", "Size"))
        if main_process:
            pbar = tqdm(pbar, total=nb, bar_format=TQDM_BAR_FORMAT)
        optimizer.zero_grad()
        for i, (imgs, targets, paths, _) in pbar:
            ni = i + nb * epoch
            imgs = imgs.to(device, non_blocking=True).float() / 255
            if ni <= nw:  # warmup: bias lr falls from warmup_bias_lr to lr0, the others rise from 0
                accumulate = max(1, int(np.interp(ni, [0, nw], [1, nbs / batch_size]).round()))
                for j, group in enumerate(optimizer.param_groups):
                    group["lr"] = float(np.interp(ni, [0, nw], [hyp["warmup_bias_lr"] if j == 0 else 0.0,
                                                                group["initial_lr"] * lf(epoch)]))
                    if "momentum" in group:
                        group["momentum"] = float(np.interp(ni, [0, nw], [hyp["warmup_momentum"], hyp["momentum"]]))
            if opt.multi_scale:
                imgs = random_rescale(imgs, imgsz, gs)
            with torch.autocast(device.type, enabled=amp):
                pred = forward(imgs)
                loss, loss_items = compute_loss(pred, targets.to(device))
                if l2_penalty is not None:  # replaces the optimizer's weight decay on the covered kernels
                    loss = loss + 0.5 * hyp["weight_decay"] * l2_penalty(bare) / accumulate
                if RANK != -1:
                    loss *= WORLD_SIZE
                if opt.quad:
                    loss *= 4.0
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss is {loss.item()} at epoch {epoch}, batch {i} "
                                         f"(box, obj, cls = {loss_items.tolist()}); {kept_checkpoint(last)}")
            scaler.scale(loss).backward()
            if ni - last_opt_step >= accumulate:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad()
                if ema:
                    ema.update(model)
                last_opt_step = ni
            if main_process:
                mloss = (mloss * i + loss_items) / (i + 1)
                mem = f"{torch.cuda.memory_reserved() / 1e9 if cuda else 0:.3g}G"
                pbar.set_description(("%11s" * 2 + "%11.4g" * 5) % (
                    f"{epoch}/{epochs - 1}", mem, *mloss, targets.shape[0], imgs.shape[-1]))
                if plots and ni < 3:
                    plot_images(imgs, targets, paths, save_dir / f"train_batch{ni}.jpg", names)

        lr = [x["lr"] for x in optimizer.param_groups]
        scheduler.step()
        if main_process:
            final_epoch = epoch + 1 == epochs or stopper.possible_stop
            if not opt.noval or final_epoch:
                results, maps, _ = validate.run(data_dict, batch_size=batch_size // WORLD_SIZE * 2, imgsz=imgsz,
                                                half=amp, model=ema.ema, single_cls=opt.single_cls,
                                                dataloader=val_loader, save_dir=save_dir, plots=False,
                                                compute_loss=compute_loss)
            fi = float(fitness(np.array(results).reshape(1, -1))[0])
            stop = stopper(epoch=epoch, fitness=fi)
            best_fitness = max(best_fitness, fi)
            values = [float(x) for x in (*mloss.tolist(), *results, *lr)]
            write_results_csv(save_dir / "results.csv", epoch, values)
            if tb:
                for k, v in zip(RESULT_KEYS, values):
                    tb.add_scalar(k, v, epoch)
            check_not_diverged(epoch, last, results[4:], bare, ema.ema)
            if not opt.nosave or (final_epoch and not opt.evolve):
                ckpt = make_checkpoint(
                    bare, ema=model_state(ema.ema), updates=ema.updates, optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), epoch=epoch,
                    best_fitness=best_fitness, best_epoch=stopper.best_epoch, last_opt_step=last_opt_step,
                    train_args=vars(opt), hyp=opt.hyp, rng=rng_state())
                save_checkpoint(ckpt, last)
                if best_fitness == fi:
                    save_checkpoint(ckpt, best)
                if opt.save_period > 0 and epoch % opt.save_period == 0:
                    save_checkpoint(ckpt, weights_dir / f"epoch{epoch}.pt")
                del ckpt
        if RANK != -1:  # every rank stops together
            flag = [stop]
            dist.broadcast_object_list(flag, 0)
            stop = flag[0]
        if stop:
            break

    if main_process:
        LOGGER.info(f"\n{epoch - start_epoch + 1} epochs completed in {(time.time() - t0) / 3600:.3f} hours.")
        for f in (last, best):
            if f.exists():
                strip_optimizer(f)
        if plots:
            plot_results(file=save_dir / "results.csv")
        if tb:
            tb.close()
        if best.exists() and not opt.evolve:  # val.py ends with "Results saved to <save_dir>"
            LOGGER.info(f"\nValidating {best}...")
            results, _, _ = validate.run(data_dict, weights=best, batch_size=batch_size // WORLD_SIZE * 2,
                                         imgsz=imgsz, iou_thres=0.6, single_cls=opt.single_cls, verbose=True,
                                         plots=plots, project=save_dir.parent, name=save_dir.name, exist_ok=True,
                                         device=str(device.index if cuda else "cpu"))
        else:
            LOGGER.info(f"Results saved to {colorstr('bold', save_dir)}")
    torch.cuda.empty_cache()
    return results


def resume_state(ckpt: dict, optimizer, scheduler, scaler, ema, epochs: int, weights) -> tuple[float, int]:
    """Restore optimizer, scheduler, scaler, EMA and RNG states; returns (best fitness, first epoch to run)."""
    if ckpt.get("optimizer") is None:
        raise UserInputError(f"{weights}: training state was stripped (finished run); nothing to resume")
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and ckpt.get("ema") is not None:
        ema.module.load_state_dict(ckpt["ema"])
        ema.n_averaged.fill_(ckpt["updates"])
    if ckpt.get("rng"):
        set_rng_state(ckpt["rng"])
    start_epoch = ckpt["epoch"] + 1
    if start_epoch >= epochs:
        raise UserInputError(f"{weights}: training to {epochs} epochs is finished, nothing to resume")
    LOGGER.info(f"Resuming training from {weights} from epoch {start_epoch} to {epochs} total epochs")
    return float(ckpt.get("best_fitness", 0.0)), start_epoch


def seed_epoch(seed: int, epoch: int) -> None:
    """Seed the global RNGs (main-process draws: --multi-scale, --image-weights) from (seed, epoch, rank) alone, so a
    resumed run draws what an uninterrupted one does; the loader's shuffles and augmentation draws are seeded per
    epoch by its own sampler (``SeededBatchSampler``, started at the run's first epoch)."""
    init_seeds(epoch_seeds(seed, epoch, RANK)[0])


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


MEMORY_FORMATS = ("auto", "channels-last", "nchw")


def channels_last_blocker(model: nn.Module, device: torch.device, compile_model: bool) -> str:
    """Why ``model`` cannot train channels-last here ('' when it can).

    Channels-last training is a CPU eager path (no DDP, no --compile) that needs every batch norm to be a
    ``models.common.BatchNorm2d`` (PyTorch's own NHWC kernel loses precision; timm backbones keep theirs). Strided 1x1
    convolutions with under 16 input channels must stay NCHW (oneDNN's NHWC weight gradient of such a convolution
    corrupts memory in torch 2.14.1), which only those that read the (NCHW) image can.
    """
    if device.type != "cpu":
        return f"it is a CPU training path (device is {device.type})"
    if RANK != -1:
        return "it is not supported with DDP"
    if compile_model:
        return "--compile trains NCHW"
    if not all(isinstance(m, BatchNorm2d) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        return "the model has batch norms other than models.common.BatchNorm2d (e.g. a timm backbone)"
    first_layer, image_channels = set(model.model[0].modules()), model.yaml["ch"]
    for m in model.modules():
        if (isinstance(m, nn.Conv2d) and m.in_channels < 16 and m.kernel_size == (1, 1) and m.stride != (1, 1)
                and (m not in first_layer or m.in_channels != image_channels)):
            return "the model has a strided 1x1 convolution of under 16 input channels past its input layer"
    return ""


def channels_last_training(model: nn.Module, device: torch.device, compile_model: bool,
                           memory_format: str = "auto") -> bool:
    """Apply --memory-format: convert the convolution weights to channels-last (NHWC) in place where chosen and
    possible; returns whether it did. 'auto' is the CPU default (see the README's speed section), 'nchw' never
    converts, 'channels-last' converts or stops with the reason it cannot."""
    if memory_format not in MEMORY_FORMATS:
        raise UserInputError(f"--memory-format {memory_format}: expected one of {', '.join(MEMORY_FORMATS)}")
    if memory_format == "nchw" or (memory_format == "auto" and not AUTO_CHANNELS_LAST):
        return False
    reason = channels_last_blocker(model, device, compile_model)
    if reason:
        if memory_format == "channels-last":
            raise UserInputError(f"--memory-format channels-last: not possible for this run: {reason}")
        return False
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and not (m.in_channels < 16 and m.kernel_size == (1, 1) and m.stride != (1, 1)):
            m.to(memory_format=torch.channels_last)
    LOGGER.info(f"{colorstr('memory format: ')}channels-last training (NHWC)")
    return True


def training_forward(model: nn.Module, compile_model: bool):
    """What runs the training forward: the model itself, or with --compile a ShapeCompiledForward of it."""
    if not compile_model:
        return model
    if RANK != -1:
        LOGGER.warning("WARNING --compile is not supported with DDP; training without it")
        return model
    LOGGER.info(f"{colorstr('compile: ')}torch.compile on the first batch (on a 2-core CPU 2-5 min the first time on a "
                "machine, seconds once cached); an epoch's last, smaller batch runs eagerly")
    return ShapeCompiledForward(model)


def random_rescale(imgs: torch.Tensor, imgsz: int, gs: int) -> torch.Tensor:
    """--multi-scale: resize the batch to a random size in [0.5, 1.5] x imgsz, a multiple of the stride."""
    size = random.randrange(int(imgsz * 0.5), int(imgsz * 1.5) + gs) // gs * gs
    factor = size / max(imgs.shape[2:])
    if factor == 1:
        return imgs
    shape = [math.ceil(x * factor / gs) * gs for x in imgs.shape[2:]]
    return nn.functional.interpolate(imgs, size=shape, mode="bilinear", align_corners=False)


def labels_to_class_weights(labels: list[np.ndarray], nc: int = 80) -> torch.Tensor:
    """Inverse-frequency class weights (normalised to sum 1) from the training labels."""
    if not labels or not any(len(x) for x in labels):
        return torch.ones(nc) / nc
    classes = np.concatenate(labels, 0)[:, 0].astype(int)
    counts = np.bincount(classes, minlength=nc).astype(float)
    counts[counts == 0] = 1
    weights = 1 / counts
    return torch.from_numpy(weights / weights.sum()).float()


def labels_to_image_weights(labels: list[np.ndarray], nc: int = 80, class_weights: np.ndarray | None = None):
    """Per-image sampling weight: sum of its labels' class weights (--image-weights)."""
    class_weights = np.ones(nc) if class_weights is None else class_weights
    counts = np.array([np.bincount(x[:, 0].astype(int), minlength=nc) for x in labels])
    return (class_weights.reshape(1, nc) * counts).sum(1)


def tensorboard_writer(save_dir: Path):
    """A TensorBoard SummaryWriter in save_dir, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        LOGGER.info("TensorBoard not installed: no event files written")
        return None
    LOGGER.info(f"TensorBoard: Start with 'tensorboard --logdir {save_dir.parent}', view at http://localhost:6006/")
    return SummaryWriter(str(save_dir))


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=str, default="", help="initial weights path (our .pt or upstream's)")
    parser.add_argument("--cfg", type=str, default="", help="model.yaml path or name in models/")
    parser.add_argument("--data", type=str, default=ROOT / "data/shapes.yaml", help="dataset.yaml path")
    parser.add_argument("--hyp", type=str, default=ROOT / "data/hyps/hyp.scratch-low.yaml", help="hyperparameters path")
    parser.add_argument("--epochs", type=int, default=100, help="total training epochs")
    parser.add_argument("--batch-size", type=int, default=16, help="total batch size for all GPUs")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="train, val image size (pixels)")
    parser.add_argument("--rect", action="store_true", help="rectangular training")
    parser.add_argument("--resume", nargs="?", const=True, default=False, help="resume most recent training")
    parser.add_argument("--nosave", action="store_true", help="only save final checkpoint")
    parser.add_argument("--noval", action="store_true", help="only validate final epoch")
    parser.add_argument("--noautoanchor", action="store_true", help="disable AutoAnchor")
    parser.add_argument("--noplots", action="store_true", help="save no plot files")
    parser.add_argument("--evolve", type=int, nargs="?", const=300, help="evolve hyperparameters for x generations")
    parser.add_argument("--cache", type=str, nargs="?", const="ram", help="image --cache ram/disk")
    parser.add_argument("--image-weights", action="store_true", help="use weighted image selection for training")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--multi-scale", action="store_true", help="vary img-size +/- 50%%")
    parser.add_argument("--single-cls", action="store_true", help="train multi-class data as single-class")
    parser.add_argument("--optimizer", type=str, choices=["SGD", "Adam", "AdamW", "RMSProp"], default="SGD",
                        help="optimizer")
    parser.add_argument("--sync-bn", action="store_true", help="use SyncBatchNorm, only available in DDP mode")
    parser.add_argument("--workers", type=int, default=8, help="max dataloader workers (per RANK in DDP mode)")
    parser.add_argument("--project", default=ROOT / "runs/train", help="save to project/name")
    parser.add_argument("--name", default="exp", help="save to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    parser.add_argument("--quad", action="store_true", help="quad dataloader")
    parser.add_argument("--cos-lr", action="store_true", help="cosine LR scheduler")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="Label smoothing epsilon")
    parser.add_argument("--patience", type=int, default=100, help="EarlyStopping patience (epochs without improvement)")
    parser.add_argument("--freeze", nargs="+", type=int, default=[0], help="Freeze layers: backbone=10, first3=0 1 2")
    parser.add_argument("--save-period", type=int, default=-1, help="Save checkpoint every x epochs (disabled if < 1)")
    parser.add_argument("--seed", type=int, default=0, help="Global training seed")
    parser.add_argument("--local_rank", type=int, default=-1, help="Automatic DDP Multi-GPU argument, do not modify")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the training forward, in NCHW (a one-off compile of minutes on a CPU; "
                             "on the CPU measured no faster than eager channels-last training, see docs/BENCHMARKS.md)")
    parser.add_argument("--memory-format", choices=MEMORY_FORMATS, default="auto",
                        help="memory layout of CPU training: 'channels-last' (NHWC), 'nchw', or 'auto' (the default "
                             "layout the README's speed section gives, with its reason)")
    parser.add_argument("--custom-l2", action="store_true",
                        help="RepVGG custom L2 on equivalent kernels instead of weight decay on RepVGG blocks")
    return parser.parse_args(argv)


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
    LOGGER.info(f"Resuming training from {last}")
    return args


def load_hyp(hyp) -> dict:
    hyp = dict(hyp) if isinstance(hyp, dict) else yaml_load(find_hyp(hyp))
    missing = [k for k in ("lr0", "lrf", "momentum", "weight_decay", "box", "cls", "obj", "anchor_t") if k not in hyp]
    if missing:
        raise UserInputError(f"hyperparameters: missing key '{missing[0]}'")
    return hyp


def find_hyp(path) -> Path:
    p = Path(path)
    for c in (p, ROOT / "data/hyps" / p.name):
        if c.is_file():
            return c
    raise UserInputError(f"{path}: hyperparameter file not found")


def init_distributed(opt: argparse.Namespace, device: torch.device) -> torch.device:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPU); returns this rank's device."""
    if opt.evolve or opt.image_weights:
        raise UserInputError("--evolve and --image-weights are not compatible with DDP training")
    if opt.batch_size % WORLD_SIZE:
        raise UserInputError(f"--batch-size {opt.batch_size} must be a multiple of WORLD_SIZE {WORLD_SIZE}")
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
    resuming = opt.resume and not opt.evolve
    if resuming:
        opt = prepare_resume(opt)
    elif opt.cfg:
        opt.cfg = str(find_model_yaml(opt.cfg))
    if LOCAL_RANK == -1 and "," in str(opt.device):
        n = len(str(opt.device).split(","))
        raise UserInputError(f"--device {opt.device}: several devices need one process each; launch with "
                             f"torchrun --nproc_per_node {n} train.py --device {opt.device} ...")
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


def run(**kwargs) -> argparse.Namespace:
    """Programmatic entry: train.run(data='shapes.yaml', cfg='yolov5n.yaml', imgsz=320, epochs=3)."""
    opt = parse_opt([])
    for k, v in kwargs.items():
        setattr(opt, k, v)
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
