"""What every training CLI here shares at run time, so that a method file holds only its paper: the
device and seeds, batched prediction and evaluation, the optimiser and its step schedule, the run
folder (config.json, metrics.jsonl, results.json, state.pt, --resume, Ctrl-C, non-finite stops) and
multi-process training (torchrun + DistributedDataParallel). Nothing here knows about distillation.

A training loop written with it reads like its algorithm box:

    lr_schedule = torch.optim.lr_scheduler.MultiStepLR(opt, args.milestones, gamma=0.1)
    training = runtime.Training(log, args.epochs, save={"student": student, "opt": opt},
                                rngs={"loader": loader}, lr_schedule=lr_schedule)
    for epoch in training.epochs():               # resumes after the last saved epoch
        for x, y in loader:
            training.record(len(x), **train_step(trained, x, y, opt))
        test_acc = runtime.evaluate(student, test_x, test_y, mean, std)
        training.end_epoch(test_acc=test_acc)     # log, step the lr schedule, write state.pt

`training.record` keeps per-epoch sums on the device (no host sync in the batch loop); `end_epoch`
turns them into epoch means with one sync (summed over the processes under torchrun), stops the run
on a non-finite mean, prints the progress line with images/s and ETA, and saves the resumable state.
"""

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import data
import models

#### Device, seeds, precision ####


def get_device(name="auto"):
    """The device of this process; under torchrun (WORLD_SIZE > 1) it also joins the process group
    and is this rank's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda was requested but CUDA is not available — use --device cpu (or auto)"
        )
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return init_distributed(torch.device(name))
    return torch.device(name)


def seed_everything(seed):
    """Seed Python, numpy and torch with this process's seed (`rank_seed`: rank 0 keeps `seed`, so
    one process is the single-process run; under torchrun the initial weights still agree, DDP
    broadcasts rank 0's)."""
    seed = rank_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(seed):
    """A different seed per rank for the draws each rank makes alone (noise, augmentation)."""
    return seed + 1_000_003 * rank()


def autocast(device):
    """bf16 autocast on CUDA; a no-op on CPU (fp32 there keeps CPU results exact and fast
    enough)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def prepare_model(model, device):
    """Move to device; channels_last on CUDA (faster convolutions under bf16)."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


#### Optimisation ####


def make_optimizer(params, args):
    """The recipes' optimiser from args.optimizer, lr, momentum, weight_decay: SGD with momentum
    (CIFAR-like) or Adam (MNIST family)."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
    return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)


#### Prediction ####


@torch.inference_mode()
def predict(model, images, mean, std, batch_size=1024, features=False):
    """Logits (and pooled features if `features`) of uint8 images, in eval mode, as float32 on the
    model's device. `model` has the models.py interface (features, classifier, feat_dim).

    Under torchrun each rank predicts its slice of `images` with rank 0's BatchNorm statistics and
    every rank gets the full result, so decisions taken from it (selection, accuracy) are the same
    on every rank. The slices are whole batches of one process's run, so every image is predicted in
    the same batch, and rounded the same way, as in a single process."""
    device = next(model.parameters()).device
    broadcast_buffers(model)
    batches = -(-len(images) // batch_size)
    lo, hi = (
        min(len(images), batches * r // world_size() * batch_size) for r in (rank(), rank() + 1)
    )
    was_training = model.training
    model.eval()
    logits = [torch.zeros(0, model.classifier.out_features, device=device)]
    feats = [torch.zeros(0, model.feat_dim, device=device)]
    for (x,) in data.DeviceLoader(
        images[lo:hi], batch_size=batch_size, shuffle=False, mean=mean, std=std, device=device
    ):
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


class FeaturesAndLogits(torch.nn.Module):
    """`forward(x) -> (features, logits)` of a models.py-style network: what a feature-alignment
    step needs from one forward, in the one method DistributedDataParallel hooks."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        feat = self.net.features(x)
        return feat, self.net.classifier(feat)


#### The run folder ####


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class NonFiniteLossError(FloatingPointError):
    """An epoch's mean loss term is NaN or infinite (RunLog.check_finite): the run stops, its last
    state kept."""


class RunLog:
    """runs/<name>-<timestamp>/ with config.json (printed at start), metrics.jsonl (one line per
    epoch, also printed as a progress line with images/s and the ETA of the current loop), state.pt
    (the resumable state of the last completed epoch), results.json and a final RESULT line.

    With `args.resume` set (see `resume_config`) it reopens that folder instead: `self.state` is the
    saved state and metrics.jsonl keeps exactly the lines written up to it. Under torchrun only rank
    0 writes. The newest RunLog of the process is `RunLog.current` (what `cli` reports on Ctrl-C or
    an error)."""

    current = None

    def __init__(self, name, args, runs_dir="runs"):
        self.config = models._plain(vars(args) if hasattr(args, "__dict__") else dict(args))
        self.main = is_main()
        self.state, self.saved_label, self.lines, self.resumed = (
            None,
            None,
            0,
            bool(self.config.get("resume")),
        )
        # the newest epoch record (restored on --resume): what a run reports at its end
        self.last_record = {}
        if self.resumed:
            self.dir = self.config["resume"]
            self.state = load_state(self.path("state.pt"))
            self.saved_label, self.lines = self.state["label"], self.state["metrics_lines"]
            self.last_record = self.state["last"]
            if (
                self.main
            ):  # drop a line logged after the last saved state (interrupted before its save)
                with open(self.path("metrics.jsonl")) as f:
                    kept = f.readlines()[: self.lines]
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
                with reporting_write(os.path.join(self.dir, "config.json")):
                    os.makedirs(self.dir)
                    with open(os.path.join(self.dir, "config.json"), "w") as f:
                        json.dump(self.config, f, indent=2)
            self.dir = broadcast_object(self.dir)
            print("config: " + json.dumps(self.config), flush=True)
            print(f"run folder: {self.dir}", flush=True)
        self.start = time.time()
        RunLog.current = self

    def path(self, filename):
        return os.path.join(self.dir, filename)

    def log_epoch(self, epoch, epochs, metrics, num_images, seconds):
        """Append metrics for `epoch` (0-based) and print a progress line; `num_images` were
        processed in `seconds`."""
        record = {
            "epoch": epoch + 1,
            **{k: _number(v) for k, v in metrics.items()},
            "images": int(num_images),
            "images_per_s": round(num_images / max(seconds, 1e-9), 1),
            "epoch_s": round(seconds, 2),
        }
        if self.main:
            path = self.path("metrics.jsonl")
            with reporting_write(path, self), open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.lines += 1
        self.last_record = record
        now = time.time()
        if epoch == 0 or not hasattr(
            self, "loop_start"
        ):  # a new (or resumed) training loop: the ETA is per loop
            self.loop_start, self.loop_first_epoch = now - seconds, epoch
        elapsed, loop_elapsed = now - self.start, now - self.loop_start
        eta = loop_elapsed / (epoch - self.loop_first_epoch + 1) * (epochs - epoch - 1)
        shown = " ".join(
            f"{k} {_fmt(v)}"
            for k, v in record.items()
            if k not in ("epoch", "epoch_s", "images_per_s") and not isinstance(v, (list, dict))
        )
        print(
            f"epoch {epoch + 1}/{epochs} {shown} | {record['images_per_s']:.0f} img/s | "
            f"{format_seconds(elapsed)} elapsed, ETA {format_seconds(eta)}",
            flush=True,
        )
        return record

    def save_state(self, state, label):
        """Write the resumable state of a just-completed epoch (`label`, e.g. "epoch 3/40") to
        state.pt, atomically. `state["rng"]` is this rank's random state; under torchrun it is
        gathered from every rank."""
        state = {
            **state,
            "rng": gather_object(state["rng"]),
            "label": label,
            "metrics_lines": self.lines,
            "last": self.last_record,
            "world_size": world_size(),
        }
        if self.main:
            with reporting_write(self.path("state.pt"), self):
                models.atomic_save(state, self.path("state.pt"))
        self.saved_label = label

    def check_finite(self, where, values):
        """Stop the run when an epoch mean in `values` ({term: float}) is NaN or infinite; the state
        of the last good epoch stays in state.pt (this epoch's state is not written)."""
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            kept = (
                f"the last good state ({self.saved_label}) is in {self.path('state.pt')}"
                if self.saved_label
                else "no epoch had completed, so no state was saved"
            )
            raise NonFiniteLossError(
                f"non-finite loss at {where}: "
                + ", ".join(f"{k}={v}" for k, v in bad.items())
                + f"; the run stopped without saving this epoch; {kept}"
            )

    def finish(self, method, dataset, results):
        results = {
            "method": method,
            "dataset": dataset,
            "wall_time_s": round(time.time() - self.start, 1),
            **models._plain(results),
        }
        if self.main:
            path = self.path("results.json")
            with reporting_write(path, self), open(path, "w") as f:
                json.dump(results, f, indent=2)
        parts = [
            f"{k}={_fmt(v)}"
            for k, v in results.items()
            if isinstance(v, (int, float, str)) and k not in ("method", "dataset")
        ]
        print(f"RESULT method={method} dataset={dataset} " + " ".join(parts), flush=True)
        return results


def _number(v):
    if torch.is_tensor(v):
        v = v.tolist()
    return round(v, 5) if isinstance(v, float) else v


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def load_state(path):
    """A run's state.pt, or a clear error naming what is wrong with it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a torch file at all
        raise ValueError(
            f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}) — the "
            f"file is damaged; start a new run instead of --resume"
        ) from None
    missing = [
        k
        for k in ("label", "metrics_lines", "rng", "epoch", "stage", "last")
        if not isinstance(state, dict) or k not in state
    ]
    if missing:
        raise ValueError(
            f"{path} is not a state.pt written by this project (missing {', '.join(missing)}) — "
            f"start a new run instead of --resume"
        )
    return state


def resume_config(args, parser, script):
    """`--resume RUN_DIR`: the arguments of that run (its config.json) with `resume` set. The saved
    config wins; a flag given now that differs from it (and from its default) is an error, since the
    run would no longer be the one it continues. Checks that RUN_DIR holds config.json and state.pt
    and has not finished."""
    run_dir = getattr(args, "resume", None)
    if run_dir is None:
        return args
    if not os.path.isdir(run_dir):
        raise ValueError(f"--resume {run_dir}: no such run folder — give a folder under --runs-dir")
    for filename, what in (
        ("config.json", "the run's arguments"),
        ("state.pt", "the state of a completed epoch"),
    ):
        if not os.path.isfile(os.path.join(run_dir, filename)):
            raise ValueError(
                f"--resume {run_dir}: expected {filename} ({what}, written by {script}) in that "
                f"folder, found none — "
                + (
                    "the run stopped before its first epoch finished: start it again"
                    if filename == "state.pt"
                    else "give the folder a run wrote"
                )
            )
    if os.path.isfile(os.path.join(run_dir, "results.json")):
        raise ValueError(
            f"--resume {run_dir}: that run has finished (results.json exists) — nothing to resume"
        )
    load_state(
        os.path.join(run_dir, "state.pt")
    )  # damaged: refused now, before a teacher is loaded or trained
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            saved = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"--resume {run_dir}: its config.json is not valid JSON ({e}) — start a new run"
        ) from None
    # the teacher's sha256, which get_teacher adds: the resumed run must find that teacher again
    teacher_sha256 = saved.pop("teacher_sha256", None) if isinstance(saved, dict) else None
    if not isinstance(saved, dict) or set(saved) != set(vars(parser.parse_args([]))):
        raise ValueError(
            f"--resume {run_dir}: its config.json was not written by {script} (other arguments) — "
            f"resume it with the script that started it"
        )
    conflicts = [
        f"--{k.replace('_', '-')} {models._plain(v)} (saved: {saved[k]})"
        for k, v in vars(args).items()
        if k != "resume" and v != parser.get_default(k) and models._plain(v) != saved[k]
    ]
    if conflicts:
        raise ValueError(
            f"--resume {run_dir}: these flags contradict the run's config.json: "
            f"{', '.join(conflicts)} — leave them out (the saved config is used) or start a new run"
        )
    return argparse.Namespace(
        **{**saved, "resume": run_dir},
        **({"teacher_sha256": teacher_sha256} if teacher_sha256 else {}),
    )


#### One training loop: epochs, per-epoch sums, state.pt ####


class Training:
    """The epochs of one training loop of a run (`stage`, e.g. "train", "gan", "distill"; `what`
    names its epochs in the log, e.g. "GAN epoch").

    save: {name: object with state_dict/load_state_dict} (networks, optimisers) stored from rank 0.
    rngs: {name: torch.Generator or data.DeviceLoader} whose random state is stored per rank, with
          the global torch (and CUDA) generator.
    extra: plain values stored with every state (what a later stage needs to rebuild itself on
          --resume).
    lr_schedule: a torch lr scheduler (the methods' MultiStepLR), stepped once at the end of every
          epoch, after the epoch's lr is logged; saved and restored with `save`.

    When the run's state.pt belongs to this stage, everything is restored from it and `epochs()`
    continues after its last saved epoch."""

    def __init__(
        self,
        log,
        total_epochs,
        stage="train",
        what="epoch",
        save=None,
        rngs=None,
        extra=None,
        lr_schedule=None,
    ):
        self.log, self.total, self.stage, self.what = log, total_epochs, stage, what
        self.save, self.extra = dict(save or {}), dict(extra or {})
        self.lr_schedule = lr_schedule
        if lr_schedule is not None:
            self.save["lr_schedule"] = lr_schedule
        self.generators = {}
        for name, rng in (rngs or {}).items():
            for sub, g in (
                rng.generators().items() if isinstance(rng, data.DeviceLoader) else [("", rng)]
            ):
                self.generators[f"{name}.{sub}" if sub else name] = g
        self.first_epoch = 0
        state = log.state
        if state is not None and state["stage"] == stage:
            for name, obj in self.save.items():
                try:
                    obj.load_state_dict(state[name])
                except (KeyError, RuntimeError, ValueError) as e:
                    raise ValueError(
                        f"{log.path('state.pt')} does not fit this run ({name}: "
                        f"{str(e).splitlines()[0][:120]}) — start a new run instead of --resume"
                    ) from None
            restore_rng(state["rng"], self.generators)
            self.first_epoch = state["epoch"]
        self.device = next(
            (
                t.device
                for obj in self.save.values()
                if isinstance(obj, torch.nn.Module)
                for t in obj.parameters()
            ),
            torch.device("cpu"),
        )

    def epochs(self):
        """The epoch indices still to train (0-based); each starts a fresh set of sums."""
        for epoch in range(self.first_epoch, self.total):
            self.epoch, self.start, self.sums, self.seen = epoch, time.time(), {}, 0
            yield epoch

    def record(self, n, **terms):
        """Add one batch of n images: float 0-d tensors are batch means (averaged over the epoch,
        weighted by n), integer tensors are counts (summed). Stays on the device."""
        for name, value in terms.items():
            value = value.detach()
            self.sums[name] = self.sums.get(name, 0) + (
                value * n if value.is_floating_point() else value
            )
        self.seen += n

    def end_epoch(self, **metrics):
        """Close the epoch: epoch means of the recorded terms (one sync, summed over the ranks),
        stop on a non-finite one, log them with `metrics` (and the lr), step the lr schedule, save
        the state. Returns the logged record."""
        names = list(self.sums)
        totals = _sum_over_ranks(
            [self.sums[k] for k in names] + [torch.tensor(float(self.seen))], self.device
        )
        seen = totals.pop()
        means = {
            k: v / seen if self.sums[k].is_floating_point() else _counts(v)
            for k, v in zip(names, totals)
        }
        label = f"{self.what} {self.epoch + 1}"
        self.log.check_finite(label, {k: v for k, v in means.items() if isinstance(v, float)})
        lr = {} if self.lr_schedule is None else {"lr": self.lr_schedule.get_last_lr()[0]}
        record = self.log.log_epoch(
            self.epoch,
            self.total,
            {**({} if self.stage == "train" else {"stage": self.stage}), **means, **metrics, **lr},
            int(seen),
            time.time() - self.start,
        )
        if self.lr_schedule is not None:
            with warnings.catch_warnings():  # an epoch without a batch: the optimiser never stepped
                warnings.filterwarnings(
                    "ignore", "Detected call of `lr_scheduler.step", UserWarning
                )
                self.lr_schedule.step()  # the next epoch's lr, saved with the optimiser
        self.log.save_state(
            {
                "stage": self.stage,
                "epoch": self.epoch + 1,
                **self.extra,
                **{name: obj.state_dict() for name, obj in self.save.items()},
                "rng": rng_state(self.generators),
            },
            f"{label}/{self.total}",
        )
        return record


def _counts(value):
    return [int(v) for v in value] if isinstance(value, list) else int(value)


def _sum_over_ranks(tensors, device):
    """0-d and 1-d tensors summed over the ranks (one all-reduce) and copied to the host with one
    sync -> floats and lists. Called once per epoch, never inside the batch loop."""
    parts = [torch.as_tensor(t, device=device).to(torch.float64).reshape(-1) for t in tensors]
    flat = all_reduce_sum(
        torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    ).tolist()
    out, i = [], 0
    for t, part in zip(tensors, parts):
        out.append(flat[i] if torch.as_tensor(t).dim() == 0 else flat[i : i + len(part)])
        i += len(part)
    return out


def rng_state(generators):
    """This process's random state: the global torch RNG (and CUDA's when initialised) and each
    named generator."""
    state = {
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
        "devices": {name: g.device.type for name, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(states, generators):
    """Restore `rng_state` from a saved state (one entry per rank) into this rank's RNGs and
    `generators`."""
    if len(states) != world_size():
        raise ValueError(
            f"state.pt was written by {len(states)} process(es) and this run has {world_size()} — "
            f"resume with the same number (torchrun --nproc_per_node={len(states)})"
        )
    state = states[rank()]
    for name, g in generators.items():
        if state["devices"].get(name, g.device.type) != g.device.type:
            raise ValueError(
                f"state.pt was written on {state['devices'][name]} and this run is on "
                f"{g.device.type} — resume on {state['devices'][name]} "
                f"(its random generators cannot move)"
            )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])


#### Checks before any work: flag ranges, paths to write, failed writes ####


def check_range(
    flag, value, low=None, high=None, paper=None, open_low=False, open_high=False, fix=None
):
    """Refuse a numeric flag (each element of a list) that is NaN, infinite or outside [low, high]
    (an open end with open_low / open_high), in one line that names the range and the paper's value
    (or `fix`)."""
    for v in value if isinstance(value, (list, tuple)) else [value]:
        above = low is None or (v > low if open_low else v >= low)
        below = high is None or (v < high if open_high else v <= high)
        if not (math.isfinite(v) and above and below):  # NaN fails no comparison, so isfinite
            rule = _range_text(low, high, open_low, open_high)
            fix = fix or f"the paper uses {paper}"
            raise ValueError(f"{flag} must be {rule}, got {v} — {fix}")


def _range_text(low, high, open_low, open_high):
    if high is None:
        return f"{'>' if open_low else '>='} {low}"
    if low is None:
        return f"{'<' if open_high else '<='} {high}"
    return f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"


SEED_MAX = 2**31 - 1  # numpy's seed is unsigned 32-bit; each rank adds its own offset (rank_seed)


def paper_values(table, key):
    """'0.05 (CIFAR-like), 0.001 (MNIST family)': the value of `key` per family of a settings table,
    the tiny test family (synthetic) left out; one value when the families agree."""
    values = {f: _show(v[key]) for f, v in table.items() if f != "synthetic" and key in v}
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return ", ".join(f"{v} ({FAMILY_NAMES.get(f, f)})" for f, v in values.items())


def check_training_flags(args, table, source="the paper uses", checkpoints=True):
    """The flags every training CLI shares, checked before any data is read: --epochs, --batch-size,
    --lr, --momentum, --weight-decay and --milestones against their ranges (the message quotes
    `table`'s values, which `source` names), --seed, and the folders the run writes: --runs-dir, and
    --checkpoint-dir when `checkpoints` (the teacher cache and its lock file)."""

    def quoted(key):
        return f"{source} {paper_values(table, key)}"

    check_range("--epochs", args.epochs, 1, fix=quoted("epochs"))
    check_range("--batch-size", args.batch_size, 1, fix=quoted("batch_size"))
    check_range("--lr", args.lr, 0, open_low=True, fix=quoted("lr"))
    check_range("--momentum", args.momentum, 0, 1, open_high=True, fix=quoted("momentum"))
    check_range("--weight-decay", args.weight_decay, 0, fix=quoted("weight_decay"))
    check_range(
        "--milestones",
        list(args.milestones),
        1,
        fix=quoted("milestones") + " (the lr is divided by 10 after that many epochs)",
    )
    check_range("--seed", args.seed, 0, SEED_MAX, fix=f"give a whole number from 0 to {SEED_MAX}")
    if hasattr(args, "teacher_seed"):  # the method CLIs: the seed of the recipe teacher they load
        check_range(
            "--teacher-seed",
            args.teacher_seed,
            0,
            SEED_MAX,
            fix=f"give a whole number from 0 to {SEED_MAX}",
        )
    check_writable_folder("--runs-dir", args.runs_dir)
    if checkpoints:
        check_writable_folder("--checkpoint-dir", args.checkpoint_dir)


def check_writable_folder(flag, path, folder=None):
    """Refuse a folder the run will write into (`folder`, default `path`) that cannot be written: a
    file where it or a parent should be, or no write permission on it (or, when it does not exist
    yet, on its nearest existing parent). Nothing is created."""
    probe = os.path.abspath(folder or path)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(
            f"{flag} {path}: {probe} is a file, not a folder — give another path (or "
            f"move that file away)"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {probe} is not writable — give a path you can write to")


@contextlib.contextmanager
def reporting_write(path, log=None):
    """Turn a failed write of `path` (a full disk, permissions, torch.save's own errors) into one
    line that says what happened and what of the run `log` is kept."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, OSError):
            reason = e.strerror or str(e)
        else:
            reason = f"torch.save: {str(e).splitlines()[0][:100]}"
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            reason += f"; {free / 2**20:.0f} MiB free there"
        if log is not None and log.saved_label is not None:
            kept = (
                f"the state after {log.saved_label} is kept in {log.path('state.pt')}: make "
                f"room (or fix the permissions) and resume with --resume {log.dir}"
            )
        else:
            kept = (
                "nothing was saved: make room (or fix the permissions, or give another folder) "
                "and start the run again"
            )
        raise ValueError(f"writing {path} failed ({reason}) — {kept}") from None


#### The command line ####


# The flags every CLI here shares, declared once. A flag whose default depends on the dataset family
# is None in the parser; its value is written once, in the calling file's per-family table (SETTINGS
# of a method, RECIPES of teacher.py), which --help shows and `complete_args` reads.


def method_parser(description, settings, seed, notes=None):
    """The parser of a method CLI with the flags the three methods share, with one meaning: the
    teacher's task and checkpoint, both networks, the seeds, the files, the student's optimisation
    and --resume. `seed` says what --seed seeds; `notes` puts the paper's word on a shared flag
    before its help, e.g. {"epochs": "I of Eq. (4)"}. The method adds its own flags, in a group of
    its own, after these."""
    notes = notes or {}
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    task = p.add_argument_group("the teacher, the student and the run (every method)")
    add_dataset_flag(task)
    task.add_argument(
        "--teacher",
        default=None,
        help="teacher checkpoint (default: the recipe teacher of teacher.py: its cache, else the "
        "committed one, else trained with its recipe)",
    )
    family_flag(task, "--teacher-arch", settings, notes, "the teacher's network")
    family_flag(task, "--student-arch", settings, notes, "the student's network")
    task.add_argument("--seed", type=int, default=0, help=f"seed of {seed}")
    task.add_argument(
        "--teacher-seed",
        type=int,
        default=0,
        help="the recipe teacher's seed (one teacher for every --seed, as the tables)",
    )
    add_run_flags(task, notes)
    add_optimisation_flags(p.add_argument_group("the student's optimisation"), settings, notes)
    return p


def add_dataset_flag(p):
    p.add_argument(
        "--dataset",
        default="fashionmnist",
        choices=sorted(data.DATASETS),
        help="the teacher's task",
    )


def add_run_flags(p, notes):
    """--data-root, --download, --device, --runs-dir, --checkpoint-dir and --resume."""
    p.add_argument(
        "--data-root", default="data", help="where the datasets' files are (docs/data.md)"
    )
    p.add_argument(
        "--download", action="store_true", help="fetch the teacher's dataset with torchvision first"
    )
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train"
    )
    p.add_argument("--runs-dir", default="runs", help="where the run folder goes")
    p.add_argument(
        "--checkpoint-dir",
        default="checkpoints",
        help="; ".join(filter(None, ["the teacher cache", notes.get("checkpoint_dir")])),
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue an interrupted run from RUN_DIR/state.pt with its saved config.json (flags "
        "given now must match it)" + (f"; {notes['resume']}" if "resume" in notes else ""),
    )


def add_optimisation_flags(p, settings, notes):
    """--epochs, --batch-size, --optimizer, --lr, --momentum, --weight-decay, --milestones: defaults
    per family from `settings`."""
    family_flag(p, "--epochs", settings, notes, "passes over the training set", type=int)
    family_flag(p, "--batch-size", settings, notes, "images per step", type=int)
    family_flag(p, "--optimizer", settings, notes, None, choices=["sgd", "adam"])
    family_flag(p, "--lr", settings, notes, "learning rate", type=float)
    family_flag(p, "--momentum", settings, notes, "SGD momentum", type=float)
    family_flag(p, "--weight-decay", settings, notes, None, type=float)
    family_flag(p, "--milestones", settings, notes, "lr / 10 at these epochs", type=int, nargs="*")


def family_flag(p, flag, settings, notes, what, **kwargs):
    """A flag whose default is its family's value in `settings`, shown by --help; None until
    `complete_args` fills it."""
    key = flag[2:].replace("-", "_")
    text = "; ".join(filter(None, [notes.get(key), what, family_default(settings, key)]))
    p.add_argument(flag, default=None, help=text, **kwargs)


def complete_args(args, parser, script, settings, per_dataset=None):
    """The settings of a run: under --resume, those saved in its config.json (`resume_config`);
    otherwise every flag left out (None) takes its family's value in `settings` and its dataset's
    value in `per_dataset` ({flag: {dataset: value}}). --teacher brings its own architecture."""
    args = resume_config(args, parser, script)
    if args.resume:
        return args
    family = settings[data.DATASETS[args.dataset]["family"]]
    defaults = {**family, **{k: v[args.dataset] for k, v in (per_dataset or {}).items()}}
    for key, value in defaults.items():
        if getattr(args, key) is None and not (
            key == "teacher_arch" and getattr(args, "teacher", None)
        ):
            setattr(args, key, value)
    return args


def cli(run, parser, script, argv=None):
    """Parse argv and call run(args) for `script` (e.g. "kd3.py"). Bad input ends in one line
    `error: ...` (exit 1); Ctrl-C in one line that says what was kept (exit 130). A new run folder
    that holds no saved epoch (no state.pt) is removed when its run stops, so "nothing was saved"
    and the runs folder agree."""
    args = parser.parse_args(argv)
    RunLog.current = None
    try:
        result = run(args)
        # every process done before the group is torn down (gloo aborts a process otherwise)
        barrier()
        return result
    except (data.DatasetNotFoundError, ValueError, NonFiniteLossError) as e:
        _drop_empty_run_folder()
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        log = RunLog.current
        if log is None or log.saved_label is None:
            _drop_empty_run_folder()
            print(
                "\ninterrupted before the first epoch finished: no run state was saved, nothing to "
                "--resume",
                flush=True,
            )
        else:
            launcher = f"torchrun --nproc_per_node={world_size()}" if world_size() > 1 else "python"
            print(
                f"\ninterrupted: the state after {log.saved_label} is in {log.path('state.pt')}\n"
                f"resume with: {launcher} {script} --resume {log.dir}",
                flush=True,
            )
        raise SystemExit(130) from None
    finally:
        cleanup_distributed()


def _drop_empty_run_folder():
    """Remove the current run's folder when no epoch's state was saved in it: a run refused or
    stopped before its first state.pt, even with a metrics line or pictures written (never a resumed
    run)."""
    log = RunLog.current
    unsaved = log is not None and log.saved_label is None and not log.resumed
    if unsaved and log.main and os.path.isdir(log.dir):
        shutil.rmtree(log.dir)
    RunLog.current = None


class HelpFormatter(argparse.HelpFormatter):
    """--help shows every default: a flag whose help does not already name its default gets
    "(default: ...)"."""

    def _get_help_string(self, action):
        text = action.help or ""
        hidden = (
            action.default is None or action.default is False or action.default == argparse.SUPPRESS
        )
        if action.option_strings and not hidden and "default" not in text:
            text += " (default: %(default)s)"
        return text


def download_if_asked(args):
    """--download: fetch the teacher's dataset (rank 0 only) before anything reads it."""
    if args.download and is_main():
        data.download(args.dataset, args.data_root)
    barrier()


def family_default(table, key, unit=""):
    """'default: 240 (cifar) / 40 (mnist) / 2 (synthetic)' for a per-family settings table
    {family: {key: value}}; one value when every family has the same."""
    values = {family: _show(settings[key]) for family, settings in table.items() if key in settings}
    if len(set(values.values())) == 1:
        return f"default: {next(iter(values.values()))}{unit}"
    return "default: " + " / ".join(
        f"{v}{unit} ({FAMILY_NAMES.get(family, family)})" for family, v in values.items()
    )


FAMILY_NAMES = {
    "cifar": "CIFAR-like",
    "mnist": "MNIST family",
}  # data.DATASETS[...]["family"] as --help says it


def _show(value):
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "none"
    return str(value)


#### Distributed: torchrun + DistributedDataParallel ####
# `torchrun --nproc_per_node=N <script>.py ...` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK
# and MASTER_ADDR/PORT in their environment; `get_device` joins them into one process group (nccl on
# CUDA, one GPU per process; gloo on CPU). Each rank trains on its shard of every batch
# (data.DeviceLoader(rank=..., world_size=...)); what a step trains is wrapped by `distribute` in
# torch's DistributedDataParallel, whose hooks average the gradients during backward, so all ranks
# take the same step. `predict` and the epoch sums are summed over the ranks, so every rank sees the
# same selection, accuracy and losses and takes the same decisions. Only rank 0 prints and writes
# files. Without torchrun every helper here is a no-op.


def init_distributed(device):
    """Join the torchrun process group; returns this rank's device (cuda:LOCAL_RANK on a GPU)."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo"
        )  # env:// from torchrun's variables
        if dist.get_rank() != 0:
            sys.stdout = open(
                os.devnull, "w"
            )  # one progress log (rank 0's); errors still reach stderr
    return device


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def distribute(module):
    """What a step trains, ready for backward: the module itself in one process; under torchrun
    wrapped in DistributedDataParallel (rank 0's weights broadcast now; gradients averaged during
    backward)."""
    if world_size() == 1:
        return module
    device = next(module.parameters()).device
    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None
    )


def all_reduce_sum(tensor):
    """Sum `tensor` over the ranks, in place; returns it."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def broadcast_buffers(module):
    """Rank 0's BatchNorm statistics (and other buffers) on every rank."""
    if world_size() > 1:
        for b in module.buffers():
            dist.broadcast(b, src=0)


def _assemble(local, lo, n):
    """Rows [lo, lo + len(local)) of an (n, ...) result from each rank -> the full result on every
    rank."""
    if world_size() == 1:
        return local
    full = local.new_zeros((n,) + tuple(local.shape[1:]))
    full[lo : lo + len(local)] = local
    return all_reduce_sum(full)


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
