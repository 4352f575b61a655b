"""Train a ResNet on ImageNet (or on synthetic ImageNet-shaped data) with fused Lookahead.

The defaults are the recipe of the Lookahead paper's ImageNet experiment (Zhang et al. 2019,
§4.1): ResNet-152, batch 256, Lookahead around SGD with lr 0.1, momentum 0.9, weight decay
1e-4, k=5, alpha=0.5, 90 epochs with the learning rate multiplied by 0.1 at epochs 30, 60
and 80. Evaluation uses the slow weights φ, the weights the paper reports.

Switching a torch.optim training script to Lookahead is one line: see `make_optimizer`,
where each Lookahead optimizer sits beside the torch.optim one it replaces.

    python examples/train_resnet.py --data /imagenet              # /imagenet/{train,val}/<class>/*.JPEG
    python examples/train_resnet.py --synthetic --steps-per-epoch 50 --eval-steps 5
    torchrun --nproc_per_node 8 examples/train_resnet.py --data /imagenet --amp --channels-last
    python examples/train_resnet.py --arch resnet18 --width 16 --image-size 32 --num-classes 10 \\
        --batch-size 64 --epochs 3 --steps-per-epoch 20 --device cpu    # a quick CPU run

Without torchvision the script uses its own ResNet (same parameter names and shapes as
torchvision's, so checkpoints are interchangeable) and its own ImageFolder reader (Pillow).
`--batch-size` is the global batch: each of the `torchrun` processes takes an equal share.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from lookahead_fused import LookaheadAdam, LookaheadAdamW, LookaheadSGD
from lookahead_fused.models import ARCHS, ResNet

# Optional dependencies. A torchvision built for another torch version fails at import with
# errors other than ImportError (RuntimeError, AttributeError), hence the broad except.
try:
    import torchvision
except Exception:  # the script then uses its own ResNet and ImageFolder
    torchvision = None
try:
    from PIL import Image
except ImportError:
    Image = None
try:
    from tqdm import tqdm
except ImportError:
    tqdm = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_TRAIN_SIZE, IMAGENET_VAL_SIZE = 1_281_167, 50_000
OPTIMIZERS = ("sgd", "adam", "adamw", "lookahead-sgd", "lookahead-adam", "lookahead-adamw")


# -- model: torchvision's ResNet, or the same architecture built here ----------------------


def build_model(arch: str, num_classes: int, width: int) -> tuple[nn.Module, str]:
    """torchvision's model when torchvision is installed and the width is the standard one,
    else the built-in ResNet. Returns the model and where it came from, for the log."""
    if torchvision is not None and width == 64:
        return getattr(torchvision.models, arch)(num_classes=num_classes), "torchvision"
    return ResNet(arch, num_classes, width), "built-in"


# -- data ----------------------------------------------------------------------------------


class SyntheticImages(Dataset):
    """Random ImageNet-shaped images, identical from run to run: sample i depends only on
    (seed, split, i), so any rank or data-loader worker can make any sample and a resumed run
    sees the data an uninterrupted run would have seen. Each class adds its own coarse 4x4
    pattern to the per-sample noise, so the task can be learnt and the loss falls."""

    def __init__(self, length: int, num_classes: int, image_size: int, seed: int, split: str) -> None:
        self.length, self.num_classes, self.image_size = length, num_classes, image_size
        # Disjoint generator seeds for the train samples, the eval samples and the class patterns.
        self._sample_seed = ((seed * 3 + (split == "val")) << 32) & (2**63 - 1)
        self._pattern_seed = ((seed * 3 + 2) << 32) & (2**63 - 1)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        g = torch.Generator().manual_seed(self._sample_seed + index)
        label = int(torch.randint(self.num_classes, (), generator=g))
        noise = torch.randn(3, self.image_size, self.image_size, generator=g)
        return noise + self._pattern(label), label

    def _pattern(self, label: int) -> Tensor:
        g = torch.Generator().manual_seed(self._pattern_seed + label)
        coarse = torch.randn(1, 3, 4, 4, generator=g)
        return F.interpolate(coarse, size=(self.image_size,) * 2, mode="nearest")[0]


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolder(Dataset):
    """torchvision's ImageFolder layout and label order (root/<class>/**/<image>, classes
    sorted by name), decoded with Pillow: the reader used when torchvision is missing."""

    def __init__(self, root: str | Path, transform: Callable[[Any], Tensor]) -> None:
        root = Path(root)
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise FileNotFoundError(f"No images in {root} (expected {root}/<class>/<image>)")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


class PilTransform:
    """The standard ImageNet transforms without torchvision. Training: a random crop of 8% to
    100% of the area with aspect ratio in [3/4, 4/3], resized to `size`, flipped half of the
    time. Evaluation: the shorter side resized to size / 0.875, then the centre crop. Both
    end with ImageNet's mean/std normalisation. Randomness comes from torch's generator, which
    the data loader seeds per worker, so runs are reproducible."""

    def __init__(self, size: int, train: bool) -> None:
        self.size, self.train = size, train
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, img: Any) -> Tensor:
        size = self.size
        if self.train:
            img = img.resize((size, size), Image.BILINEAR, box=self._random_box(*img.size))
            if torch.rand(()) < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            w, h = img.size
            scale = round(size / 0.875) / min(w, h)
            img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
            left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
            img = img.crop((left, top, left + size, top + size))
        pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
        return (pixels.permute(2, 0, 1).float().div_(255) - self.mean) / self.std

    @staticmethod
    def _random_box(width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the random-resized crop; the whole image when ten
        draws find no box that fits (as torchvision does, short of its ratio clamp)."""
        for _ in range(10):
            area = width * height * _uniform(0.08, 1.0)
            ratio = math.exp(_uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < w <= width and 0 < h <= height:
                left = int(torch.randint(width - w + 1, ()))
                top = int(torch.randint(height - h + 1, ()))
                return left, top, left + w, top + h
        return 0, 0, width, height


def image_folder(root: Path, size: int, train: bool) -> Dataset:
    """An ImageFolder with the ImageNet transforms, from torchvision when it is installed."""
    if torchvision is not None:
        T = torchvision.transforms
        if train:
            crop = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
        else:
            crop = [T.Resize(round(size / 0.875)), T.CenterCrop(size)]
        transform = T.Compose([*crop, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        return torchvision.datasets.ImageFolder(str(root), transform)
    if Image is None:
        raise RuntimeError("--data needs torchvision or Pillow to read images (pip install pillow); or use --synthetic")
    return ImageFolder(root, PilTransform(size, train))


def make_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset | None]:
    """(train, eval) datasets: `--data` in ImageNet's layout (train/ and, optional, val/),
    else synthetic data of ImageNet's size (capped by --synthetic-size)."""
    if args.data is None:
        size, classes = args.image_size, args.num_classes
        train = SyntheticImages(args.synthetic_size, classes, size, args.seed, "train")
        return train, SyntheticImages(args.synthetic_eval_size, classes, size, args.seed, "val")
    root = Path(args.data)
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"--data {root}: expected {root}/train/<class>/<image> (and optionally {root}/val)")
    val = image_folder(root / "val", args.image_size, train=False) if (root / "val").is_dir() else None
    return image_folder(root / "train", args.image_size, train=True), val


# -- distributed ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a `torchrun` job (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Distributed:
    """Join the process group that `torchrun` describes in RANK / WORLD_SIZE / LOCAL_RANK:
    NCCL between GPUs, Gloo between CPU processes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(values: Tensor, ddp: Distributed) -> Tensor:
    if ddp.enabled:
        dist.all_reduce(values)
    return values


def parameter_digest(model: nn.Module) -> str:
    """sha256 of every parameter's bytes, in logical (contiguous) order: equal digests on all
    ranks mean bit-identical models."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gather_digests(digest: str, ddp: Distributed, device: torch.device) -> list[str]:
    """Every rank's parameter digest, in rank order."""
    if not ddp.enabled:
        return [digest]
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=device)
    everyone = [torch.empty_like(mine) for _ in range(ddp.world_size)]
    dist.all_gather(everyone, mine)
    return [bytes(t.tolist()).hex() for t in everyone]


# -- optimizer -----------------------------------------------------------------------------


def make_optimizer(args: argparse.Namespace, params: Any) -> torch.optim.Optimizer:
    """The optimizer named by --optimizer. Each Lookahead optimizer is the torch.optim line
    above it plus k, alpha (and the optional inner_state, backend): nothing else changes."""
    lr, wd = args.lr, args.weight_decay
    lookahead = dict(k=args.k, alpha=args.alpha, inner_state=args.inner_state, backend=args.backend)
    match args.optimizer:
        case "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=wd)
        case "lookahead-sgd":
            # >>> The one line that changes: torch.optim.SGD(...) becomes LookaheadSGD(..., k=5, alpha=0.5).
            return LookaheadSGD(params, lr=lr, momentum=args.momentum, weight_decay=wd, **lookahead)
        case "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=wd)
        case "lookahead-adam":
            return LookaheadAdam(params, lr=lr, weight_decay=wd, **lookahead)
        case "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
        case "lookahead-adamw":
            return LookaheadAdamW(params, lr=lr, weight_decay=wd, **lookahead)
    raise ValueError(f"Unknown optimizer {args.optimizer!r}")


def slow_weights(optimizer: torch.optim.Optimizer) -> AbstractContextManager[None]:
    """The slow weights φ for the body of a `with` when the optimizer is a Lookahead one (the
    paper evaluates φ), the parameters as they are otherwise."""
    swap = getattr(optimizer, "slow_weights", None)
    return swap() if swap is not None else contextlib.nullcontext()


# -- training ------------------------------------------------------------------------------


class Progress:
    """A progress bar over one epoch: tqdm when installed, else a line every tenth of the
    epoch; silent when disabled. The loss shown costs a device sync, so it is read only
    every `every` steps."""

    def __init__(self, total: int, desc: str, enabled: bool, every: int = 20) -> None:
        self.total, self.desc, self.enabled, self.every, self.done = total, desc, enabled, every, 0
        self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True) if enabled and tqdm else None

    def update(self, loss: Tensor) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update()
            if self.done % self.every == 0:
                self.bar.set_postfix(loss=f"{loss.item():.4f}")
        elif self.done % max(1, self.total // 10) == 0 or self.done == self.total:
            print(f"  {self.desc} {self.done}/{self.total} loss {loss.item():.4f}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Setup:
    """What one training step needs besides the batch."""

    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None without --amp
    memory_format: torch.memory_format
    ddp: Distributed
    progress: bool

    def to_device(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        return images, labels.to(self.device, non_blocking=True)

    def autocast(self) -> AbstractContextManager[Any]:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


def batches(loader: DataLoader, limit: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    for step, batch in enumerate(loader):
        if limit is not None and step >= limit:
            return
        yield batch


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    setup: Setup,
    steps: int,
    desc: str,
) -> tuple[float, float, int]:
    """One pass over the loader (at most `steps` batches). Returns the mean training loss and
    accuracy over all ranks (measured on the fast weights, as they train) and the number of
    images seen by all ranks. Sums stay on the device: no sync per step."""
    model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=setup.device)  # loss sum, correct, images
    progress = Progress(steps, desc, setup.progress)
    for images, labels in batches(loader, steps):
        images, labels = setup.to_device(images, labels)
        with setup.autocast():
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # a Lookahead optimizer unscales inside its fused step
        scaler.update()
        loss = loss.detach()
        totals[0] += loss * len(labels)
        totals[1] += (logits.argmax(1) == labels).sum()
        totals[2] += len(labels)
        progress.update(loss)
    progress.close()
    loss_sum, correct, count = all_reduce_sum(totals, setup.ddp).tolist()
    return loss_sum / max(count, 1), correct / max(count, 1), int(count)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, setup: Setup, steps: int | None) -> tuple[float, float]:
    """Mean loss and accuracy over this rank's shard of the eval set, summed over all ranks."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=setup.device)
    for images, labels in batches(loader, steps):
        images, labels = setup.to_device(images, labels)
        with setup.autocast():
            logits = model(images)
        totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum")
        totals[1] += (logits.argmax(1) == labels).sum()
        totals[2] += len(labels)
    loss_sum, correct, count = all_reduce_sum(totals, setup.ddp).tolist()
    return loss_sum / max(count, 1), correct / max(count, 1)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of torch's generator at the start of an epoch: data augmentation (and the
    loader workers' seeds, drawn from it) then depends on (seed, epoch, rank) only, so a run
    resumed at an epoch boundary continues exactly."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


def run(args: argparse.Namespace, ddp: Distributed, device: torch.device) -> dict[str, Any]:
    say = print if ddp.is_main else lambda *a, **k: None
    torch.manual_seed(args.seed)  # the same initial model on every rank
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    amp_dtype = None
    if args.amp:
        amp_dtype = getattr(torch, args.amp_dtype or ("float16" if device.type == "cuda" else "bfloat16"))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    setup = Setup(device, amp_dtype, memory_format, ddp, args.progress and ddp.is_main)

    model, source = build_model(args.arch, args.num_classes, args.width)
    model = model.to(device, memory_format=memory_format)
    optimizer = make_optimizer(args, model.parameters())
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_steps, gamma=args.lr_gamma)
    # Loss scaling is needed for fp16 only; a disabled scaler passes everything through.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    train_model = model  # what the training step calls: DDP all-reduces the gradients
    if ddp.enabled:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    start_epoch, global_step = 0, 0
    if args.resume:
        ckpt = torch.load(args.resume, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, global_step = ckpt["epoch"], ckpt["step"]
        say(f"resumed from {args.resume} at epoch {start_epoch}, step {global_step}")

    train_set, eval_set = make_datasets(args)
    if args.batch_size % ddp.world_size:
        raise ValueError(f"--batch-size {args.batch_size} must divide evenly among {ddp.world_size} processes")
    per_rank = args.batch_size // ddp.world_size
    sampler = DistributedSampler(train_set, ddp.world_size, ddp.rank, shuffle=True, seed=args.seed, drop_last=True)
    loader_options = dict(batch_size=per_rank, num_workers=args.workers, pin_memory=device.type == "cuda")
    train_loader = DataLoader(train_set, sampler=sampler, drop_last=True, **loader_options)
    eval_loader = None
    if eval_set is not None:  # a strided shard per rank: every image counted exactly once
        eval_loader = DataLoader(Subset(eval_set, range(ddp.rank, len(eval_set), ddp.world_size)), **loader_options)
    steps = len(train_loader) if args.steps_per_epoch is None else min(args.steps_per_epoch, len(train_loader))
    if steps == 0:
        raise ValueError(f"{len(train_set)} training images make no batch of {args.batch_size}")

    n_params = sum(p.numel() for p in model.parameters())
    say(
        f"{args.arch} ({source}, width {args.width}, {n_params:,} parameters), {args.optimizer} "
        f"(backend {getattr(optimizer, 'backend', 'torch.optim')}), data {args.data or 'synthetic'}, "
        f"{ddp.world_size} process(es) on {device.type}, batch {args.batch_size}, {steps} steps/epoch, "
        f"amp {amp_dtype}, {'channels_last' if args.channels_last else 'contiguous'}",
        flush=True,
    )

    metrics: dict[str, Any] = {"epoch": start_epoch, "step": global_step}
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        torch.manual_seed(epoch_seed(args.seed, epoch, ddp.rank))
        lr = optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        desc = f"epoch {epoch + 1}/{args.epochs}"
        train_loss, train_acc, images = train_one_epoch(
            train_model, train_loader, optimizer, scaler, setup, steps, desc
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        images_per_s = images / (time.perf_counter() - start)
        global_step += steps
        scheduler.step()

        eval_loss = eval_acc = None
        if eval_loader is not None:
            with slow_weights(optimizer):  # evaluate φ, then put the fast weights θ back
                eval_loss, eval_acc = evaluate(model, eval_loader, setup, args.eval_steps)

        if args.checkpoint and ddp.is_main:
            state = {
                "model": model.state_dict(),  # fast weights θ; φ is in the optimizer's state
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch + 1,
                "step": global_step,
                "args": vars(args),
            }
            save_checkpoint(Path(args.checkpoint), state)

        metrics = dict(
            epoch=epoch + 1, step=global_step, train_loss=train_loss, train_acc=train_acc, eval_loss=eval_loss,
            eval_acc=eval_acc, lr=lr, images_per_s=images_per_s, backend=getattr(optimizer, "backend", "torch.optim"),
        )  # fmt: skip
        evaluation = "eval(slow) -" if eval_loss is None else f"eval(slow) loss {eval_loss:.4f} acc {eval_acc:6.2%}"
        say(
            f"epoch {epoch + 1:3d}/{args.epochs}  train loss {train_loss:.4f} acc {train_acc:6.2%}  {evaluation}  "
            f"lr {lr:.4g}  {images_per_s:,.0f} img/s  backend {metrics['backend']}",
            flush=True,
        )

    digests = gather_digests(parameter_digest(model), ddp, device)
    if len(set(digests)) != 1:
        raise RuntimeError(f"The ranks' parameters differ: {digests}")
    metrics.update(world_size=ddp.world_size, param_digests=digests)
    if args.metrics_json and ddp.is_main:
        Path(args.metrics_json).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# -- command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument_group("model")
    a.add_argument("--arch", choices=tuple(ARCHS), default="resnet152")
    a.add_argument("--width", type=int, default=64, help="channels of the stem and first stage (64: the paper's)")
    a.add_argument("--num-classes", type=int, default=1000)
    a.add_argument("--image-size", type=int, default=224)
    d = p.add_argument_group("data")
    d.add_argument("--data", help="ImageNet layout: DATA/train/<class>/<image>, optional DATA/val/...")
    d.add_argument("--synthetic", action="store_true", help="random images (the default without --data)")
    d.add_argument("--synthetic-size", type=int, default=IMAGENET_TRAIN_SIZE, help="synthetic training images")
    d.add_argument("--synthetic-eval-size", type=int, default=IMAGENET_VAL_SIZE, help="synthetic eval images")
    d.add_argument("--workers", type=int, default=8, help="data-loader processes per rank")
    o = p.add_argument_group("optimizer (defaults: the paper's ImageNet recipe)")
    o.add_argument("--optimizer", choices=OPTIMIZERS, default="lookahead-sgd")
    o.add_argument("--lr", type=float, help="default 0.1 for SGD, 1e-3 for Adam/AdamW")
    o.add_argument("--momentum", type=float, default=0.9, help="SGD only")
    o.add_argument("--weight-decay", type=float, default=1e-4)
    o.add_argument("--k", type=int, default=5, help="Lookahead: inner steps per sync")
    o.add_argument("--alpha", type=float, default=0.5, help="Lookahead: slow weights step size")
    o.add_argument("--inner-state", choices=("maintain", "reset", "pullback"), default="maintain")
    o.add_argument("--backend", default="auto", help="Lookahead backend: auto, cuda, triton, cpu, foreach, eager")
    o.add_argument("--lr-steps", type=int, nargs="*", default=[30, 60, 80], help="epochs where lr *= --lr-gamma")
    o.add_argument("--lr-gamma", type=float, default=0.1)
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=90)
    t.add_argument("--batch-size", type=int, default=256, help="global batch, split among the processes")
    t.add_argument("--steps-per-epoch", type=int, help="cap on training steps per epoch (quick runs)")
    t.add_argument("--eval-steps", type=int, help="cap on eval batches per epoch (default: the whole eval set)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    t.add_argument("--amp", action="store_true", help="autocast (fp16 + GradScaler on CUDA, bf16 on CPU)")
    t.add_argument("--amp-dtype", choices=("float16", "bfloat16"), help="override the autocast dtype")
    t.add_argument("--channels-last", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint", help="save model, optimizer, scheduler and scaler here after every epoch")
    t.add_argument("--resume", help="continue exactly from this checkpoint")
    t.add_argument("--metrics-json", help="write the final metrics here (rank 0)")
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = p.parse_args(argv)
    if args.synthetic and args.data:
        p.error("--synthetic and --data exclude each other")
    if args.lr is None:
        args.lr = 0.1 if args.optimizer.endswith("sgd") else 1e-3
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train and return the last epoch's metrics (train loss/acc on the fast weights, eval
    loss/acc on the slow weights, lr, images/s, backend) and every rank's parameter digest."""
    args = parse_args(argv)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    ddp = init_distributed("cuda" if use_cuda else "cpu")
    device = torch.device("cuda", ddp.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    try:
        metrics = run(args, ddp, device)
        if ddp.enabled:
            dist.barrier()  # Gloo wants every rank to arrive before the group goes away
    finally:
        if ddp.enabled:
            dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
