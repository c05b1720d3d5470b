"""Teacher training and the utilities every method file shares: device/seed set-up, evaluation, batched
prediction, run records (config.json, metrics.jsonl, results.json, a final RESULT line) and the teacher
cache.

    python teacher.py --dataset fashionmnist --arch lenet5     # Adam 1e-3, 40 epochs -> ~90% test accuracy
    python teacher.py --dataset cifar10 --arch resnet34        # SGD 0.05, 240 epochs, /10 at 150/180/210

The trained teacher is cached at checkpoints/<dataset>-<arch>-seed<seed>.pt; `get_teacher(...)` (used by
kd3.py, hidfd.py and balanced_transfer.py) loads it, or trains it with the recipe below when it is missing.

Long runs (every CLI here): each epoch ends with a resumable runs/<run>/state.pt; Ctrl-C stops with the command
that continues (`--resume runs/<run>`); a non-finite loss stops the run naming the term. Multi-GPU:
`torchrun --nproc_per_node=N teacher.py ...` (see `#### Distributed ####`).
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
import torch.distributed as dist
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
    """The device of this process; under torchrun (WORLD_SIZE > 1) it also joins the process group and is
    this rank's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but CUDA is not available")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return init_distributed(torch.device(name))
    return torch.device(name)


def make_optimizer(params, args):
    """The recipes' optimiser: SGD with momentum (CIFAR-like) or Adam (MNIST family), from args.optimizer, lr,
    momentum and weight_decay."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)


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
    """Logits (and pooled features if `features`) of uint8 images, in eval mode, as float32 on the model's device.

    Under torchrun each rank predicts its slice of `images` and every rank gets the full result (one all-reduce),
    so decisions taken from it (selection, accuracy) are the same on every rank."""
    device = next(model.parameters()).device
    lo, hi = len(images) * rank() // world_size(), len(images) * (rank() + 1) // world_size()
    was_training = model.training
    model.eval()
    logits = [torch.zeros(0, model.classifier.out_features, device=device)]
    feats = [torch.zeros(0, model.feat_dim, device=device)]
    for (x,) in data.DeviceLoader(images[lo:hi], batch_size=batch_size, shuffle=False, mean=mean, std=std,
                                  device=device):
        with autocast(device):
            f = model.features(x)
            logits.append(model.classifier(f).float())
            if features:
                feats.append(f.float())
    model.train(was_training)
    out = _assemble(torch.cat(logits), lo, len(images))
    return (out, _assemble(torch.cat(feats), lo, len(images))) if features else out


def evaluate(model, images, labels, mean, std, batch_size=1024):
    """Top-1 accuracy in percent of `model` on uint8 `images` with int64 `labels`."""
    logits = predict(model, images, mean, std, batch_size)
    return (logits.argmax(1).cpu() == labels.cpu()).float().mean().item() * 100


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class RunLog:
    """runs/<name>-<timestamp>/ with config.json (printed at start), metrics.jsonl (one line per epoch,
    also printed as a progress line with images/s and the ETA of the current loop), state.pt (the resumable
    state of the last completed epoch), results.json and a final RESULT line.

    With `args.resume` set (see `resume_config`) it reopens that folder instead: `self.state` is the saved
    state and metrics.jsonl keeps exactly the lines written up to it. Under torchrun only rank 0 writes."""

    def __init__(self, name, args, runs_dir="runs"):
        self.config = models._plain(vars(args) if hasattr(args, "__dict__") else dict(args))
        self.main = is_main()
        self.state, self.saved_label, self.lines = None, None, 0
        if self.config.get("resume"):
            self.dir = self.config["resume"]
            self.state = torch.load(self.path("state.pt"), map_location="cpu", weights_only=True)
            self.saved_label, self.lines = self.state["label"], self.state["metrics_lines"]
            if self.main:  # drop a line logged after the last saved state (interrupted before its save)
                with open(self.path("metrics.jsonl")) as f:
                    kept = f.readlines()[:self.lines]
                with open(self.path("metrics.jsonl"), "w") as f:
                    f.writelines(kept)
            print("config: " + json.dumps(self.config), flush=True)
            print(f"run folder: {self.dir} (resuming after {self.saved_label})", flush=True)
        else:
            self.dir = None
            if self.main:
                stamp = time.strftime("%Y%m%d-%H%M%S")
                self.dir = os.path.join(runs_dir, f"{name}-{stamp}")
                suffix = 1
                while os.path.exists(self.dir):
                    suffix += 1
                    self.dir = os.path.join(runs_dir, f"{name}-{stamp}-{suffix}")
                os.makedirs(self.dir)
                with open(os.path.join(self.dir, "config.json"), "w") as f:
                    json.dump(self.config, f, indent=2)
            self.dir = broadcast_object(self.dir)
            print("config: " + json.dumps(self.config), flush=True)
            print(f"run folder: {self.dir}", flush=True)
        self.start = time.time()

    def path(self, filename):
        return os.path.join(self.dir, filename)

    def log_epoch(self, epoch, epochs, metrics, num_images, seconds):
        """Append metrics for `epoch` (0-based) and print a progress line; `num_images` were processed in `seconds`."""
        record = {"epoch": epoch + 1, **{k: _number(v) for k, v in metrics.items()},
                  "images_per_s": round(num_images / max(seconds, 1e-9), 1), "epoch_s": round(seconds, 2)}
        if self.main:
            with open(self.path("metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        self.lines += 1
        now = time.time()
        if epoch == 0 or not hasattr(self, "loop_start"):  # a new (or resumed) training loop: the ETA is per loop
            self.loop_start, self.loop_first_epoch = now - seconds, epoch
        elapsed, loop_elapsed = now - self.start, now - self.loop_start
        eta = loop_elapsed / (epoch - self.loop_first_epoch + 1) * (epochs - epoch - 1)
        shown = " ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k not in ("epoch", "epoch_s", "images_per_s")
                         and not isinstance(v, (list, dict)))
        print(f"epoch {epoch + 1}/{epochs} {shown} | {record['images_per_s']:.0f} img/s | "
              f"{format_seconds(elapsed)} elapsed, ETA {format_seconds(eta)}", flush=True)
        return record

    def save_state(self, state, label):
        """Write the resumable state of a just-completed epoch (`label`, e.g. "epoch 3/40") to state.pt, atomically.
        `state["rng"]` is this rank's `rng_state(...)`; under torchrun it is gathered from every rank."""
        state = {**state, "rng": gather_object(state["rng"]), "label": label, "metrics_lines": self.lines,
                 "world_size": world_size()}
        if self.main:
            models.atomic_save(state, self.path("state.pt"))
        self.saved_label = label

    def check_finite(self, where, values):
        """Stop the run when an epoch mean in `values` ({term: float}) is NaN or infinite; the state of the last
        good epoch stays in state.pt (this epoch's state is not written)."""
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            kept = (f"the last good state ({self.saved_label}) is in {self.path('state.pt')}" if self.saved_label
                    else "no epoch had completed, so no state was saved")
            raise NonFiniteLossError(f"non-finite loss at {where}: " + ", ".join(f"{k}={v}" for k, v in bad.items())
                                     + f"; the run stopped without saving this epoch; {kept}")

    @contextlib.contextmanager
    def stop_cleanly(self, script):
        """Ctrl-C inside the block stops the run, keeps state.pt (the last completed epoch) and prints the command
        that continues it."""
        try:
            yield
        except KeyboardInterrupt:
            if self.saved_label is None:
                print(f"\ninterrupted before the first epoch finished: no state saved, nothing to resume in {self.dir}",
                      flush=True)
            else:
                launcher = f"torchrun --nproc_per_node={world_size()}" if world_size() > 1 else "python"
                print(f"\ninterrupted: the state after {self.saved_label} is in {self.path('state.pt')}\n"
                      f"resume with: {launcher} {script} --resume {self.dir}", flush=True)
            raise SystemExit(130) from None

    def finish(self, method, dataset, results):
        results = {"method": method, "dataset": dataset, "wall_time_s": round(time.time() - self.start, 1),
                   **models._plain(results)}
        if self.main:
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


class NonFiniteLossError(FloatingPointError):
    """An epoch's mean loss term is NaN or infinite (RunLog.check_finite): the run stops, its last state kept."""


def resume_config(args, parser, script):
    """`--resume RUN_DIR`: the arguments of that run (its config.json) with `resume` set. The saved config wins;
    a flag given now that differs from it (and from its default) is an error, since the run would no longer be
    the one it continues. Checks that RUN_DIR holds config.json and state.pt and has not finished."""
    run_dir = getattr(args, "resume", None)
    if run_dir is None:
        return args
    if not os.path.isdir(run_dir):
        raise ValueError(f"--resume {run_dir}: no such run folder")
    for filename, what in (("config.json", "the run's arguments"), ("state.pt", "the state of a completed epoch")):
        if not os.path.isfile(os.path.join(run_dir, filename)):
            raise ValueError(f"--resume {run_dir}: expected {filename} ({what}, written by {script}) in that folder, "
                             f"found none" + (" (interrupted before its first epoch finished?)"
                                              if filename == "state.pt" else ""))
    if os.path.isfile(os.path.join(run_dir, "results.json")):
        raise ValueError(f"--resume {run_dir}: that run has finished (results.json exists); nothing to resume")
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    if set(saved) != set(vars(parser.parse_args([]))):
        raise ValueError(f"--resume {run_dir}: its config.json was not written by {script} (other arguments)")
    conflicts = [f"--{k.replace('_', '-')} {models._plain(v)} (saved: {saved[k]})" for k, v in vars(args).items()
                 if k != "resume" and v != parser.get_default(k) and models._plain(v) != saved[k]]
    if conflicts:
        raise ValueError(f"--resume {run_dir}: these flags contradict the run's config.json: {', '.join(conflicts)}; "
                         f"leave them out (the saved config is used) or start a new run")
    return argparse.Namespace(**{**saved, "resume": run_dir})


def rng_state(device, **generators):
    """This process's random state: the global torch RNG (and CUDA's on a GPU) and each named torch.Generator."""
    state = {"device": device.type, "torch": torch.get_rng_state(),
             "generators": {name: g.get_state() for name, g in generators.items()}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(states, device, **generators):
    """Restore `rng_state` from a saved state (one entry per rank) into this rank's RNGs and `generators`."""
    if len(states) != world_size():
        raise ValueError(f"state.pt was written by {len(states)} process(es) and this run has {world_size()}; "
                         f"resume with the same number (torchrun --nproc_per_node={len(states)})")
    state = states[rank()]
    if state["device"] != device.type:
        raise ValueError(f"state.pt was written on {state['device']} and this run is on {device.type}; "
                         f"resume on {state['device']} (its random generators cannot move)")
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    for name, g in generators.items():
        g.set_state(state["generators"][name])


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
            barrier()  # under torchrun rank 0 wrote the checkpoint that every rank loads next
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


#### Distributed ####
# `torchrun --nproc_per_node=N <script>.py ...` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK and
# MASTER_ADDR/PORT in their environment; `get_device` then joins them into one process group (nccl on CUDA, one
# GPU per process; gloo on CPU). Each rank trains on its shard of every batch (data.DeviceLoader(rank=...,
# world_size=...)) and `average_gradients` averages the gradients after backward, so all ranks take the same
# step, as DistributedDataParallel does; `predict` and the epoch sums are all-reduced, so every rank sees the
# same selection, accuracy and losses and takes the same decisions. Only rank 0 prints and writes files.
# Without torchrun every helper below is a no-op and the code is the single-process path.

def init_distributed(device):
    """Join the torchrun process group; returns this rank's device (cuda:LOCAL_RANK on a GPU)."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # env:// from torchrun's variables
        if dist.get_rank() != 0:
            sys.stdout = open(os.devnull, "w")  # one progress log (rank 0's); errors still reach stderr
    return device


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def rank_seed(seed):
    """A different seed per rank for the random draws each rank makes alone (noise, augmentation); rank 0 keeps
    `seed`, so a single-process run is unchanged."""
    return seed + 1_000_003 * rank()


def all_reduce_sum(tensor):
    """Sum `tensor` over the ranks, in place; returns it."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def _assemble(local, lo, n):
    """Rows [lo, lo + len(local)) of an (n, ...) result from each rank -> the full result on every rank."""
    if world_size() == 1:
        return local
    full = local.new_zeros((n,) + tuple(local.shape[1:]))
    full[lo:lo + len(local)] = local
    return all_reduce_sum(full)


def average_gradients(params):
    """After backward: every gradient averaged over the ranks (one all-reduce of all of them flattened), the
    gradient synchronisation of DistributedDataParallel, written out so that it works however the losses call
    the networks (features(), separate heads, a GAN's two networks)."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def average_buffers(module):
    """BatchNorm running statistics (and other float buffers) averaged over the ranks, before evaluation/saving."""
    if world_size() == 1:
        return
    for b in module.buffers():
        if b.is_floating_point():
            b.copy_(all_reduce_sum(b.clone()) / world_size())


def epoch_sums(tensors):
    """{name: tensor (0-d or 1-d)} summed over the ranks (one all-reduce) and copied to the host with one sync ->
    {name: float or list}. Called once per epoch, never inside the batch loop."""
    names = list(tensors)
    device = next(t.device for t in tensors.values() if torch.is_tensor(t))
    parts = [torch.as_tensor(tensors[k], dtype=torch.float64, device=device).reshape(-1) for k in names]
    flat = all_reduce_sum(torch.cat(parts)).tolist()
    out, i = {}, 0
    for name, part in zip(names, parts):
        out[name] = flat[i] if torch.as_tensor(tensors[name]).dim() == 0 else flat[i:i + len(part)]
        i += len(part)
    return out


def gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier():
    if world_size() > 1:
        dist.barrier()


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


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
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run from "
                   "RUN_DIR/state.pt with its saved config.json (flags given now must match it)")
    return p


def train_teacher(args):
    args = resume_config(args, build_parser(), "teacher.py")
    recipe = recipe_for(args.dataset)
    for key in ("arch", "epochs", "optimizer", "lr", "momentum", "weight_decay", "milestones", "batch_size"):
        if getattr(args, key) is None:
            setattr(args, key, recipe[key])
    if args.epochs < 1:
        raise ValueError("--epochs must be >= 1")
    device = get_device(args.device)
    seed_everything(args.seed)
    meta = data.DATASETS[args.dataset]
    if args.download and is_main():
        data.download(args.dataset, args.data_root)
    barrier()
    train_x, train_y = data.load_dataset(args.dataset, "train", args.data_root)
    test_x, test_y = data.load_dataset(args.dataset, "test", args.data_root)
    log = RunLog(f"teacher-{args.dataset}-{args.arch}", args, args.runs_dir)
    print(f"train {tuple(train_x.shape)}, test {tuple(test_x.shape)}, device {device}"
          + (f", {world_size()} processes" if world_size() > 1 else ""), flush=True)

    model = prepare_model(models.build_model(args.arch, meta["num_classes"], meta["channels"]), device)
    opt = make_optimizer(model.parameters(), args)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(args.milestones), gamma=0.1)
    loader = data.DeviceLoader(train_x, train_y, batch_size=args.batch_size, shuffle=True, crop_pad=meta["crop_pad"],
                               flip=meta["flip"], mean=meta["mean"], std=meta["std"], device=device, seed=args.seed,
                               rank=rank(), world_size=world_size())
    test_x, test_y = test_x.to(device), test_y.to(device)
    first_epoch = 0
    if log.state:
        model.load_state_dict(log.state["model"])
        opt.load_state_dict(log.state["opt"])
        sched.load_state_dict(log.state["sched"])
        set_rng_state(log.state["rng"], device, loader_order=loader.order_gen, loader_aug=loader.aug_gen)
        first_epoch, test_acc = log.state["epoch"], log.state["test_acc"]
    with log.stop_cleanly("teacher.py"):
        for epoch in range(first_epoch, args.epochs):
            model.train()
            start = time.time()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
            seen = 0
            for x, y in loader:
                with autocast(device):
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                average_gradients(model.parameters())
                opt.step()
                loss_sum += loss.detach() * len(y)
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
            sched.step()
            sums = epoch_sums({"loss": loss_sum, "correct": correct, "seen": seen})  # the one sync of the epoch
            log.check_finite(f"epoch {epoch + 1}", {"cross_entropy": sums["loss"]})
            seconds = time.time() - start
            average_buffers(model)
            test_acc = evaluate(model, test_x, test_y, meta["mean"], meta["std"])
            log.log_epoch(epoch, args.epochs, {"loss": sums["loss"] / sums["seen"],
                                               "train_acc": sums["correct"] / sums["seen"] * 100, "test_acc": test_acc,
                                               "lr": sched.get_last_lr()[0]}, sums["seen"], seconds)
            log.save_state({"epoch": epoch + 1, "test_acc": test_acc, "model": model.state_dict(),
                            "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "rng": rng_state(device, loader_order=loader.order_gen, loader_aug=loader.aug_gen)},
                           f"epoch {epoch + 1}/{args.epochs}")
    path = teacher_path(args.dataset, args.arch, args.seed, args.checkpoint_dir)
    if is_main():
        models.save_checkpoint(path, model, args.arch, meta["num_classes"], meta["channels"], args, test_acc,
                               dataset=args.dataset, image_size=meta["size"])
    print(f"saved teacher to {path}", flush=True)
    return log.finish("teacher", args.dataset, {"arch": args.arch, "teacher_acc": test_acc, "checkpoint": path})


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        train_teacher(args)
    except (data.DatasetNotFoundError, ValueError, NonFiniteLossError) as e:
        sys.exit(f"error: {e}")
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
