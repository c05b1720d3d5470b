"""Teacher training and the utilities every method file shares: device/seed set-up, evaluation, batched
prediction, run records (config.json, metrics.jsonl, results.json, a final RESULT line) and the teacher
cache.

    python teacher.py --dataset fashionmnist --arch lenet5     # Adam 1e-3, 40 epochs -> ~90% test accuracy
    python teacher.py --dataset cifar10 --arch resnet34        # SGD 0.05, 240 epochs, /10 at 150/180/210

The trained teacher is cached at checkpoints/<dataset>-<arch>-seed<seed>.pt; `get_teacher(...)` (used by
kd3.py, hidfd.py and balanced_transfer.py) loads it, or trains it with the recipe below when it is missing.
"""

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
import models

#### Recipes (the papers' teacher settings; every value is also a CLI flag) ####
# CIFAR-like (KD3 Sec. 4.1, HiDFD, balanced transfer ResNet34): SGD lr 0.05, momentum 0.9, wd 5e-4,
# 240 epochs, lr / 10 at epochs 150, 180, 210. MNIST family (DAFL / KD3 MNIST setting): Adam 1e-3, 40 epochs.
RECIPES = {
    "cifar": dict(arch="resnet34", optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, epochs=240,
                  milestones=(150, 180, 210), batch_size=128),
    "mnist": dict(arch="lenet5", optimizer="adam", lr=1e-3, momentum=0.0, weight_decay=0.0, epochs=40,
                  milestones=(), batch_size=256),
    "synthetic": dict(arch="lenet5", optimizer="adam", lr=2e-3, momentum=0.0, weight_decay=0.0, epochs=8,
                      milestones=(), batch_size=128),
}


def recipe_for(dataset):
    return RECIPES[data.DATASETS[dataset]["family"]]


#### Shared utilities ####

def get_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but CUDA is not available")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device):
    """bf16 autocast on CUDA; a no-op on CPU (fp32 there keeps CPU results exact and fast enough)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def prepare_model(model, device):
    """Move to device; channels_last on CUDA (faster convolutions under bf16)."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


@torch.inference_mode()
def predict(model, images, mean, std, batch_size=1024, features=False):
    """Logits (and pooled features if `features`) of uint8 images, in eval mode, as float32 on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits, feats = [], []
    for (x,) in data.DeviceLoader(images, batch_size=batch_size, shuffle=False, mean=mean, std=std, device=device):
        with autocast(device):
            f = model.features(x)
            logits.append(model.classifier(f).float())
            if features:
                feats.append(f.float())
    model.train(was_training)
    out = torch.cat(logits) if logits else torch.zeros(0, device=device)
    return (out, torch.cat(feats)) if features else out


def evaluate(model, images, labels, mean, std, batch_size=1024):
    """Top-1 accuracy in percent of `model` on uint8 `images` with int64 `labels`."""
    logits = predict(model, images, mean, std, batch_size)
    return (logits.argmax(1).cpu() == labels.cpu()).float().mean().item() * 100


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class RunLog:
    """runs/<name>-<timestamp>/ with config.json (printed at start), metrics.jsonl (one line per epoch,
    also printed as a progress line with images/s and the ETA of the current loop), results.json and a final RESULT line."""

    def __init__(self, name, args, runs_dir="runs"):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.dir = os.path.join(runs_dir, f"{name}-{stamp}")
        suffix = 1
        while os.path.exists(self.dir):
            suffix += 1
            self.dir = os.path.join(runs_dir, f"{name}-{stamp}-{suffix}")
        os.makedirs(self.dir)
        self.config = models._plain(vars(args) if hasattr(args, "__dict__") else dict(args))
        with open(os.path.join(self.dir, "config.json"), "w") as f:
            json.dump(self.config, f, indent=2)
        print("config: " + json.dumps(self.config), flush=True)
        print(f"run folder: {self.dir}", flush=True)
        self.start = time.time()

    def path(self, filename):
        return os.path.join(self.dir, filename)

    def log_epoch(self, epoch, epochs, metrics, num_images, seconds):
        """Append metrics for `epoch` (0-based) and print a progress line; `num_images` were processed in `seconds`."""
        record = {"epoch": epoch + 1, **{k: _number(v) for k, v in metrics.items()},
                  "images_per_s": round(num_images / max(seconds, 1e-9), 1), "epoch_s": round(seconds, 2)}
        with open(self.path("metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        now = time.time()
        if epoch == 0:  # a new training loop (e.g. HiDFD's GAN, then its student): the ETA is per loop
            self.loop_start = now - seconds
        elapsed, loop_elapsed = now - self.start, now - getattr(self, "loop_start", self.start)
        eta = loop_elapsed / (epoch + 1) * (epochs - epoch - 1)
        shown = " ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k not in ("epoch", "epoch_s", "images_per_s")
                         and not isinstance(v, (list, dict)))
        print(f"epoch {epoch + 1}/{epochs} {shown} | {record['images_per_s']:.0f} img/s | "
              f"{format_seconds(elapsed)} elapsed, ETA {format_seconds(eta)}", flush=True)
        return record

    def finish(self, method, dataset, results):
        results = {"method": method, "dataset": dataset, "wall_time_s": round(time.time() - self.start, 1),
                   **models._plain(results)}
        with open(self.path("results.json"), "w") as f:
            json.dump(results, f, indent=2)
        parts = [f"{k}={_fmt(v)}" for k, v in results.items() if isinstance(v, (int, float, str)) and k not in ("method", "dataset")]
        print(f"RESULT method={method} dataset={dataset} " + " ".join(parts), flush=True)
        return results


def _number(v):
    if torch.is_tensor(v):
        v = v.tolist()
    return round(v, 5) if isinstance(v, float) else v


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def check_teacher(ckpt, dataset, source="teacher"):
    """Clear error before any training when a checkpoint does not fit the dataset."""
    meta = data.DATASETS[dataset]
    if ckpt["num_classes"] != meta["num_classes"] or ckpt["in_channels"] != meta["channels"]:
        raise ValueError(f"{source} has {ckpt['num_classes']} classes and {ckpt['in_channels']} input channels, but "
                         f"{dataset} has {meta['num_classes']} classes and {meta['channels']} channels")
    if ckpt.get("image_size") not in (None, meta["size"]):
        raise ValueError(f"{source} was trained on {ckpt['image_size']}x{ckpt['image_size']} images, {dataset} "
                         f"uses {meta['size']}x{meta['size']}")


def teacher_path(dataset, arch, seed, checkpoint_dir="checkpoints"):
    return os.path.join(checkpoint_dir, f"{dataset}-{arch}-seed{seed}.pt")


def get_teacher(dataset, arch=None, seed=0, data_root="data", device="cpu", path=None, checkpoint_dir="checkpoints",
                download=False):
    """The frozen teacher for `dataset`: from `path` if given, else the cached checkpoint, else trained now
    with the recipe defaults (and cached). Returns (model in eval mode on device, checkpoint dict)."""
    arch = arch or recipe_for(dataset)["arch"]
    if path is None:
        path = teacher_path(dataset, arch, seed, checkpoint_dir)
        if not os.path.isfile(path):
            print(f"no cached teacher at {path}: training one with the {data.DATASETS[dataset]['family']} recipe "
                  f"(python teacher.py --dataset {dataset} --arch {arch} --seed {seed})", flush=True)
            args = build_parser().parse_args(["--dataset", dataset, "--arch", arch, "--seed", str(seed),
                                              "--data-root", data_root, "--device", device.type,
                                              "--checkpoint-dir", checkpoint_dir] + (["--download"] if download else []))
            train_teacher(args)
        else:
            print(f"loading cached teacher {path}", flush=True)
    else:
        print(f"loading teacher {path}", flush=True)
    model, ckpt = models.load_checkpoint(path)
    check_teacher(ckpt, dataset, source=f"teacher {path}")
    model = prepare_model(model, device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, ckpt


#### Teacher training ####

def build_parser():
    p = argparse.ArgumentParser(description="Train (and cache) a teacher with the papers' recipe.")
    p.add_argument("--dataset", default="cifar10", choices=sorted(data.DATASETS))
    p.add_argument("--arch", default=None, help="network (default: resnet34 CIFAR-like, lenet5 MNIST family)")
    p.add_argument("--epochs", type=int, default=None, help="default: 240 CIFAR-like, 40 MNIST family")
    p.add_argument("--optimizer", default=None, choices=["sgd", "adam"], help="default: sgd CIFAR-like, adam MNIST")
    p.add_argument("--lr", type=float, default=None, help="default: 0.05 (SGD) / 1e-3 (Adam)")
    p.add_argument("--momentum", type=float, default=None, help="default: 0.9 (SGD)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: 5e-4 (SGD) / 0 (Adam)")
    p.add_argument("--milestones", type=int, nargs="*", default=None, help="lr /10 epochs; default 150 180 210 (SGD)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 128 CIFAR-like, 256 MNIST family")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default="data")
    p.add_argument("--download", action="store_true", help="fetch the dataset with torchvision first")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--checkpoint-dir", default="checkpoints")
    p.add_argument("--runs-dir", default="runs")
    return p


def train_teacher(args):
    recipe = recipe_for(args.dataset)
    for key in ("arch", "epochs", "optimizer", "lr", "momentum", "weight_decay", "milestones", "batch_size"):
        if getattr(args, key) is None:
            setattr(args, key, recipe[key])
    if args.epochs < 1:
        raise ValueError("--epochs must be >= 1")
    device = get_device(args.device)
    seed_everything(args.seed)
    meta = data.DATASETS[args.dataset]
    if args.download:
        data.download(args.dataset, args.data_root)
    train_x, train_y = data.load_dataset(args.dataset, "train", args.data_root)
    test_x, test_y = data.load_dataset(args.dataset, "test", args.data_root)
    log = RunLog(f"teacher-{args.dataset}-{args.arch}", args, args.runs_dir)
    print(f"train {tuple(train_x.shape)}, test {tuple(test_x.shape)}, device {device}", flush=True)

    model = prepare_model(models.build_model(args.arch, meta["num_classes"], meta["channels"]), device)
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(args.milestones), gamma=0.1)
    loader = data.DeviceLoader(train_x, train_y, batch_size=args.batch_size, shuffle=True, crop_pad=meta["crop_pad"],
                               flip=meta["flip"], mean=meta["mean"], std=meta["std"], device=device, seed=args.seed)
    test_x, test_y = test_x.to(device), test_y.to(device)
    for epoch in range(args.epochs):
        model.train()
        start = time.time()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        for x, y in loader:
            with autocast(device):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
        sched.step()
        n = loader.num_samples
        train_loss, train_acc = (loss_sum / n).item(), (correct / n).item() * 100
        seconds = time.time() - start
        test_acc = evaluate(model, test_x, test_y, meta["mean"], meta["std"])
        if not math.isfinite(train_loss):
            raise RuntimeError(f"teacher training diverged: non-finite cross-entropy at epoch {epoch + 1}")
        log.log_epoch(epoch, args.epochs, {"loss": train_loss, "train_acc": train_acc, "test_acc": test_acc,
                                           "lr": sched.get_last_lr()[0]}, n, seconds)
    path = teacher_path(args.dataset, args.arch, args.seed, args.checkpoint_dir)
    models.save_checkpoint(path, model, args.arch, meta["num_classes"], meta["channels"], args, test_acc,
                           dataset=args.dataset, image_size=meta["size"])
    print(f"saved teacher to {path}", flush=True)
    return log.finish("teacher", args.dataset, {"arch": args.arch, "teacher_acc": test_acc, "checkpoint": path})


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        train_teacher(args)
    except (data.DatasetNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
