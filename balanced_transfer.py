"""Class-balanced arbitrary transfer sets for data-free KD (Nayak, Mopuri, Chakraborty, WACV 2021).

Without the teacher's training data, distil on *arbitrary* unlabelled images (random noise, unrelated
synthetic or natural datasets). The teacher's argmax spreads such data very unevenly over its classes, so
Algorithm 1 composes a "target-class balanced" set: go through sources D_1..D_M in order and keep a sample
only while its teacher-predicted class holds fewer than N/C samples. The student then learns from the
teacher's temperature-softened outputs alone, Eq. (2), optionally on augmented images (Sec. 4.2).

    python balanced_transfer.py --epochs 20 --no-augment --source noise-uniform-normalised   # ~2 min, ~45%
    python balanced_transfer.py --no-augment --epoch-images 60000     # Table 1's balanced noise row (40 epochs: ~30%)
    python balanced_transfer.py --unbalanced --no-augment             # Table 1's first row (~17%)
    python balanced_transfer.py --dataset cifar10 --source svhn,tinyimagenet     # AlexNet -> AlexNet-half

Paper (Table 1, FMNIST, teacher 90.84%): noise unbalanced 33.49 / 38.37, balanced 70.15 / 74.33 (without /
with augmentation). Uniform noise cannot fill every class quota of our Fashion-MNIST teacher in a sensible
number of draws, so the composer stops at --max-draws (or --max-minutes) and reports the histogram it reached;
measured runs: docs/balanced_transfer.md.
"""

import argparse
import itertools
import time

import torch
import torch.nn.functional as F

import data
import models
import pictures
import runtime
from teacher import get_teacher

#### Settings: defaults per dataset family (every value is also a CLI flag; --help shows them) ####
# The paper gives architectures and sources (Sec. 4, Table 1) but no student optimiser, epochs or batch size.
# mnist: LeNet-5 -> LeNet-5-half, uniform noise; the MNIST-family teacher recipe (Adam 1e-3, 40 epochs).
#        max_draws 1M: ~1.5 min of teacher forwards on a 2-core CPU.
# cifar: AlexNet -> AlexNet-half (Table 1 / Table 2-left), SVHN then TinyImageNet (Sec. 4.1); the CIFAR recipe
#        (SGD 0.05, 240 epochs, /10 at 150/180/210).
# synthetic: tiny settings so that the end-to-end tests take seconds; noise, then style-shifted shapes (two
#        sources, so Algorithm 1 switches source).
SETTINGS = {
    "cifar": dict(teacher_arch="alexnet", student_arch="alexnet_half", source="svhn,tinyimagenet", optimizer="sgd",
                  lr=0.05, momentum=0.9, weight_decay=5e-4, epochs=240, milestones=(150, 180, 210), batch_size=128,
                  max_draws=1_000_000, draw_batch=8192),
    "mnist": dict(teacher_arch="lenet5", student_arch="lenet5_half", source="noise-uniform", optimizer="adam",
                  lr=1e-3, momentum=0.0, weight_decay=0.0, epochs=40, milestones=(), batch_size=256,
                  max_draws=1_000_000, draw_batch=8192),
    "synthetic": dict(teacher_arch="lenet5", student_arch="lenet5_half", source="noise-uniform,shifted:synthetic",
                      optimizer="adam", lr=2e-3, momentum=0.0, weight_decay=0.0, epochs=2, milestones=(),
                      batch_size=128, max_draws=4000, draw_batch=2048),
}

# Generated sources, drawn on the fly by the streaming composer. uniform and gaussian are the paper's (Sec. 4:
# U[0,1] per pixel; N(0.5, 0.1) clipped for CIFAR-100). The others are additions, never a default: lowfreq
# (uniform 8x8 noise upsampled) and brightness (uniform x a per-image brightness) reach more teacher classes per
# draw; uniform-normalised (U[-1, 1]) and normal-normalised (N(0, 1)) are drawn in the teacher's normalised input
# space, mapped back to pixels and clipped to [0, 1].
NOISE_SOURCES = {"noise-uniform": "uniform", "noise-gaussian": "gaussian", "noise-lowfreq": "lowfreq",
                 "noise-brightness": "brightness", "noise-uniform-normalised": "uniform-normalised",
                 "noise-normal-normalised": "normal-normalised"}


def build_parser():
    p = argparse.ArgumentParser(description="KD on a class-balanced arbitrary transfer set (WACV 2021).",
                                formatter_class=runtime.HelpFormatter)
    p.add_argument("--dataset", default="fashionmnist", choices=sorted(data.DATASETS), help="the teacher's task")
    p.add_argument("--source", default=None, help="arbitrary sources D_1..D_M in order: any data.py source list, or "
                   f"generated noise ({', '.join(NOISE_SOURCES)}) (Sec. 4.1: noise, Clevr+Mid-Air, SVHN+TinyImageNet); "
                   + runtime.family_default(SETTINGS, "source"))
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: the cache of teacher.py, trained "
                   "with its recipe when missing)")
    p.add_argument("--teacher-arch", default=None, help="Sec. 4 (resnet34 for Table 2-right); "
                   + runtime.family_default(SETTINGS, "teacher_arch"))
    p.add_argument("--student-arch", default=None, help="Sec. 4 (resnet18 for resnet34); "
                   + runtime.family_default(SETTINGS, "student_arch"))
    p.add_argument("--data-root", default="data", help="where the datasets' files are (docs/data.md)")
    p.add_argument("--download", action="store_true", help="fetch the teacher's dataset with torchvision first")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws, the student and the augmentation")
    p.add_argument("--runs-dir", default="runs", help="where the run folder goes")
    p.add_argument("--checkpoint-dir", default="checkpoints", help="the teacher cache")
    # Transfer set (Algorithm 1, Sec. 4.1)
    balance = p.add_mutually_exclusive_group()
    balance.add_argument("--balanced", dest="balanced", action="store_true", default=True,
                         help="compose with Algorithm 1 (default: on)")
    balance.add_argument("--unbalanced", dest="balanced", action="store_false",
                         help="Table 1 'X' rows: a random composition of the same size N")
    p.add_argument("--transfer-size", type=int, default=None, help="N of Algorithm 1 (Sec. 4.1: the teacher's "
                   "training-set size; default: data.DATASETS train_size, 60000 for FMNIST)")
    p.add_argument("--max-draws", type=int, default=None, help="cap on draws per generated source (a ':N' suffix "
                   "overrides it); the paper draws until balanced; " + runtime.family_default(SETTINGS, "max_draws"))
    p.add_argument("--max-minutes", type=float, default=None, help="time cap on drawing from a generated source "
                   "(default: none)")
    p.add_argument("--draw-batch", type=int, default=None, help="noise images per teacher forward while composing; "
                   + runtime.family_default(SETTINGS, "draw_batch"))
    p.add_argument("--strict", type=float, nargs="?", const=0.0, default=None, metavar="FRACTION",
                   help="refuse a transfer set where a class holds no image, or fewer than FRACTION of its quota "
                        "N/C (default: off)")
    # Distillation (Eq. 2, Sec. 4.2)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="Sec. 4.2: scaling, rotation, flip, gaussian and salt-and-pepper noise during KD")
    p.add_argument("--aug-labels", default="relabel", choices=["relabel", "fixed", "with-originals"],
                   help="targets of augmented images: the teacher labels each augmented image afresh (relabel, "
                        "Sec. 4.2 as written); the teacher's outputs on the composed image (fixed); or every batch "
                        "holds the composed images beside their augmented copies, each labelled afresh "
                        "(with-originals)")
    p.add_argument("--epoch-images", type=int, default=None, help="images per epoch: a smaller transfer set is "
                   "cycled (each epoch a fresh random order of it, repeated), so sets of other sizes get equal "
                   "optimiser steps (default: one pass over the transfer set)")
    p.add_argument("--temperature", type=float, default=20.0, help="tau of Eq. (2); not given in the paper: 20 as "
                   "in the same group's ZSKD and DeGAN")
    p.add_argument("--epochs", type=int, default=None, help="student epochs (not in the paper); "
                   + runtime.family_default(SETTINGS, "epochs"))
    p.add_argument("--batch-size", type=int, default=None, help="student batch size; "
                   + runtime.family_default(SETTINGS, "batch_size"))
    p.add_argument("--optimizer", default=None, choices=["sgd", "adam"], help="student optimiser; "
                   + runtime.family_default(SETTINGS, "optimizer"))
    p.add_argument("--lr", type=float, default=None, help="student lr; " + runtime.family_default(SETTINGS, "lr"))
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum; "
                   + runtime.family_default(SETTINGS, "momentum"))
    p.add_argument("--weight-decay", type=float, default=None, help=runtime.family_default(SETTINGS, "weight_decay"))
    p.add_argument("--milestones", type=int, nargs="*", default=None, help="lr / 10 at these epochs; "
                   + runtime.family_default(SETTINGS, "milestones"))
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run from "
                   "RUN_DIR/state.pt and transfer_set.pt with its saved config.json (flags given now must match it)")
    return p


def resolve_settings(args):
    """Fill every None flag from SETTINGS[family] (visible above); N defaults to |D_o|, the teacher's
    training-set size (Sec. 4.1), so the original data is never read."""
    for key, value in SETTINGS[data.DATASETS[args.dataset]["family"]].items():
        if getattr(args, key) is None and not (key == "teacher_arch" and args.teacher):  # --teacher: its own arch
            setattr(args, key, value)
    if args.transfer_size is None:
        args.transfer_size = data.DATASETS[args.dataset]["train_size"]
    if args.transfer_size < data.DATASETS[args.dataset]["num_classes"]:
        raise ValueError("--transfer-size must be at least the number of classes — the quota N // C must be >= 1")
    if min(args.epochs, args.batch_size, args.max_draws, args.draw_batch) < 1 or args.temperature <= 0:
        raise ValueError("--epochs, --batch-size, --max-draws and --draw-batch must be >= 1 and --temperature > 0 — give "
                         "positive values")
    if args.epoch_images is not None and args.epoch_images < 1:
        raise ValueError(f"--epoch-images must be >= 1, got {args.epoch_images} — leave it out for one pass per epoch")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise ValueError(f"--max-minutes must be > 0, got {args.max_minutes} — leave it out for no time cap")
    if args.strict is not None and not 0 <= args.strict <= 1:
        raise ValueError(f"--strict FRACTION must be in [0, 1], got {args.strict} — e.g. --strict 0.5 refuses classes "
                         f"below half their quota")
    for spec in args.source.split(","):
        data.parse_source(spec.strip())  # a source that asks for 0 images is an error now
    return args


#### Losses and selection ####

def class_fill(labels, counts, quota):
    """Lines 5-10 of Algorithm 1 for one chunk of a source, vectorised: keep labels[k] iff its class still holds
    fewer than `quota` samples when the chunk is taken in order. labels (n,) int64; counts (C,) int64 so far.
    Returns (keep (n,) bool, updated counts (C,))."""
    onehot = F.one_hot(labels, len(counts))                          # (n, C)
    rank = onehot.cumsum(0).gather(1, labels[:, None]).squeeze(1)    # (n,) 1-based position within its class
    keep = counts[labels] + rank <= quota                            # line 8: c_l < N/C before adding x_k
    return keep, counts + torch.bincount(labels[keep], minlength=len(counts))


def balanced_indices(pred_labels, quota, num_classes):
    """Algorithm 1 on finite sources: pred_labels[i] (n_i,) are the teacher's labels of D_i in sampling order.
    Returns, per source, the LongTensor of kept positions; sources after the quotas are full keep nothing."""
    counts = torch.zeros(num_classes, dtype=torch.int64, device=pred_labels[0].device if pred_labels else "cpu")
    kept = []
    for labels in pred_labels:  # Algorithm 1, line 3: for i = 1..M
        if bool((counts >= quota).all()):  # line 13: every class is full, stop
            kept.append(torch.zeros(0, dtype=torch.int64, device=labels.device))
            continue
        keep, counts = class_fill(labels.long(), counts, quota)
        kept.append(keep.nonzero().squeeze(1))
    return kept


def kd_loss(student_logits, teacher_logits, T):
    """Eq. (2): KL(p_T || p_S) on temperature-softened outputs, batch mean, x T^2. Same gradient as the paper's
    soft cross-entropy -sum p_T log p_S (they differ by the teacher's entropy, a constant); no hard labels."""
    # Eq. (2)
    return F.kl_div(F.log_softmax(student_logits / T, dim=1), F.softmax(teacher_logits / T, dim=1),
                    reduction="batchmean") * T ** 2


def random_noise(n, shape, kind, generator, mean=None, std=None):
    """n noise images (n, *shape) in [0, 1] on the generator's device (see NOISE_SOURCES).
    mean/std: the teacher's input normalisation, for the kinds drawn in its normalised space."""
    device = generator.device
    c, h, w = shape
    if kind == "uniform":
        return torch.rand((n, c, h, w), generator=generator, device=device)
    if kind == "gaussian":
        return (0.5 + 0.1 * torch.randn((n, c, h, w), generator=generator, device=device)).clamp(0, 1)
    if kind == "lowfreq":
        coarse = torch.rand((n, c, min(h, 8), min(w, 8)), generator=generator, device=device)
        return F.interpolate(coarse, size=(h, w), mode="nearest")
    if kind == "brightness":
        return torch.rand((n, c, h, w), generator=generator, device=device) * \
            torch.rand((n, 1, 1, 1), generator=generator, device=device)
    if kind in ("uniform-normalised", "normal-normalised"):
        if kind == "uniform-normalised":
            z = 2 * torch.rand((n, c, h, w), generator=generator, device=device) - 1
        else:
            z = torch.randn((n, c, h, w), generator=generator, device=device)
        m = torch.as_tensor(mean, dtype=z.dtype, device=device).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=z.dtype, device=device).view(1, -1, 1, 1)
        return (z * s + m).clamp(0, 1)
    raise ValueError(f"unknown noise kind {kind!r} ({', '.join(NOISE_SOURCES.values())})")


def augment(x, generator, p=0.5, max_scale=0.2, max_degrees=15.0, noise_std=0.05, salt_pepper=0.05):
    """Sec. 4.2: scaling, rotation, horizontal flip, gaussian noise and salt-and-pepper noise, each applied to an
    image with probability p independently, so images get random combinations of them. x (B, C, H, W) in [0, 1].
    The paper names the operations, not their strengths; the keyword defaults are ours."""
    b, c, h, w = x.shape
    dev = x.device

    def chosen():  # (B,) float 0/1: which images get this operation
        return (torch.rand(b, generator=generator, device=dev) < p).float()

    def uniform(low, high):
        return low + (high - low) * torch.rand(b, generator=generator, device=dev)

    scale = 1 + chosen() * uniform(-max_scale, max_scale)
    angle = chosen() * uniform(-max_degrees, max_degrees) * torch.pi / 180
    flip = 1 - 2 * chosen()  # -1 mirrors the x axis
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin * flip, cos, torch.zeros_like(cos)], 1)], 1)    # (B, 2, 3)
    grid = F.affine_grid(theta, (b, c, h, w), align_corners=False)
    # reflection padding: black corners would move noise images into other teacher classes
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    gauss = chosen().view(b, 1, 1, 1)
    x = x + gauss * noise_std * torch.randn(x.shape, generator=generator, device=dev)
    sp = chosen().view(b, 1, 1, 1).bool()
    u = torch.rand(x.shape, generator=generator, device=dev)
    x = torch.where(sp & (u < salt_pepper / 2), 0.0, x)          # pepper
    x = torch.where(sp & (u > 1 - salt_pepper / 2), 1.0, x)      # salt
    return x.clamp(0, 1)


#### One step of Algorithm 1 ####

def to_uint8(x):
    # DEVIATION: noise is quantised to 256 levels — the transfer set is stored as uint8 like every other source
    # (4x less memory on the device); a 1/255 step is far below the noise's own spread.
    return (x * 255).round().to(torch.uint8)


def teacher_labels(teacher, images, mean, std, batch_size):
    return runtime.predict(teacher, images, mean, std, batch_size).argmax(1)


def compose_generated(teacher, kind, shape, counts, quota, draws, args, mean, std, generator, balanced,
                      progress=None):
    """Lines 3-14 of Algorithm 1 for a generated source, streaming: draw batches, label them with the teacher, keep
    what fills the quotas (balanced) or everything (unbalanced); stop when every class is full, after `draws`
    draws, or after --max-minutes. progress(made, counts): called after every batch (prints a line now and then).
    Returns (kept uint8 images, their teacher labels, updated counts, draws made, histogram of all draws)."""
    kept_x, kept_y = [], []
    raw_hist = torch.zeros_like(counts)
    made, start = 0, time.time()
    deadline = start + 60 * args.max_minutes if args.max_minutes else float("inf")
    while made < draws and time.time() < deadline:
        x = to_uint8(random_noise(min(args.draw_batch, draws - made), shape, kind, generator, mean, std))
        labels = teacher_labels(teacher, x, mean, std, args.draw_batch)                     # line 7
        made += len(x)
        raw_hist += torch.bincount(labels, minlength=len(counts))
        if balanced:
            keep, counts = class_fill(labels, counts, quota)                                # lines 8-10
        else:
            keep = torch.ones_like(labels, dtype=torch.bool)
        kept_x.append(x[keep])
        kept_y.append(labels[keep])
        if progress:
            progress(made, counts if balanced else raw_hist)
        if balanced and bool((counts >= quota).all()):                                      # line 13
            break
    return torch.cat(kept_x), torch.cat(kept_y), counts, made, raw_hist


class Progress:
    """One line every `every` seconds while a source is drawn: draws, draws/s, per-class fill, ETA to the cap."""

    def __init__(self, name, cap, quota, every=5.0):
        self.name, self.cap, self.quota, self.every = name, cap, quota, every
        self.start = self.shown = time.time()

    def __call__(self, made, counts):
        now = time.time()
        if now - self.shown < self.every:
            return
        self.shown = now
        rate = made / max(now - self.start, 1e-9)
        print(f"  {self.name}: {made:,} of {self.cap:,} draws, {rate:,.0f} draws/s, per-class fill "
              f"{counts.tolist()} of {self.quota} | ETA to the draw cap {runtime.format_seconds((self.cap - made) / rate)}",
              flush=True)


def compose_transfer_set(teacher, args, device):
    """The transfer set D-bar: Algorithm 1 over args.source in order (balanced) or a random composition of N
    samples (unbalanced). Returns (uint8 images, teacher labels, report dict)."""
    meta = data.DATASETS[args.dataset]
    num_classes, shape = meta["num_classes"], (meta["channels"], meta["size"], meta["size"])
    n_total = args.transfer_size
    quota = n_total // num_classes  # N/C of Algorithm 1
    generator = torch.Generator(device=device).manual_seed(args.seed)
    counts = torch.zeros(num_classes, dtype=torch.int64, device=device)
    raw_hist = torch.zeros_like(counts)
    parts_x, parts_y, per_source = [], [], []
    for i, spec in enumerate(s.strip() for s in args.source.split(",") if s.strip()):  # line 3
        if args.balanced and bool((counts >= quota).all()):  # line 13: later sources are not needed
            per_source.append({"source": spec, "examined": 0, "kept": 0})
            continue
        name, count = data.parse_source(spec)
        if name in NOISE_SOURCES:
            # DEVIATION: at most --max-draws draws (and --max-minutes) per generated source, then we train on what
            # was found — the paper draws until balanced, which for uniform noise on FMNIST takes ~10^8 draws.
            draws = count or (args.max_draws if args.balanced else n_total)
            x, y, counts, examined, hist = compose_generated(
                teacher, NOISE_SOURCES[name], shape, counts, quota, draws, args, meta["mean"], meta["std"], generator,
                args.balanced, Progress(spec, draws, quota if args.balanced else n_total))
        else:
            x = data.load_source(spec, "train", args.data_root, shape[0], shape[1], args.seed + i)[0].to(device)
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed + i))
            x = x[order.to(device)]  # line 5: sample x_k from D_i at random
            y = teacher_labels(teacher, x, meta["mean"], meta["std"], args.draw_batch)
            examined, hist = len(x), torch.bincount(y, minlength=num_classes)
            if args.balanced:
                keep, counts = class_fill(y, counts, quota)  # lines 4-12, vectorised as in balanced_indices
                x, y = x[keep], y[keep]
        raw_hist += hist
        parts_x.append(x)
        parts_y.append(y)
        per_source.append({"source": spec, "examined": examined, "kept": len(x)})
    images, labels = torch.cat(parts_x), torch.cat(parts_y)
    if not args.balanced and len(images) > n_total:  # random composition of N from the pooled sources
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[:n_total].to(device)
        images, labels = images[pick], labels[pick]
        for s in per_source:
            s["kept"] = None  # a random subset of the pool: per-source counts are not tracked
    histogram = torch.bincount(labels, minlength=num_classes).tolist()
    short = {c: quota - h for c, h in enumerate(histogram) if h < quota}
    report = {"transfer_size": len(images), "quota": quota, "histogram": histogram,
              "draws": sum(s["examined"] for s in per_source if data.parse_source(s["source"])[0] in NOISE_SOURCES),
              "raw_histogram": raw_hist.tolist(), "per_source": per_source, "short": short}
    return images, labels, report


def kd_step(trained, teacher, x, cached_logits, opt, aug_gen, normalize, args):
    """Line 15, Eq. (2), on one batch x (B, C, H, W) in [0, 1] of the transfer set: augment (Sec. 4.2), the
    teacher's soft outputs as targets, one update of the student. cached_logits: the teacher's logits of the
    composed images (B, C), or None. Returns the batch's terms, with the histogram of the targets' argmax."""
    if args.augment:
        augmented = augment(x, aug_gen)  # a fresh augmentation each time
        if args.aug_labels == "with-originals":
            x, cached_logits = torch.cat([x, augmented]), None
        else:
            x = augmented
    x = normalize(x)
    if cached_logits is not None:  # no augmentation, or --aug-labels fixed: the composed images' outputs
        t_logits = cached_logits
    else:
        with torch.inference_mode(), runtime.autocast(x.device):
            t_logits = teacher(x).float()
        t_logits = t_logits.clone()  # a normal tensor, usable by autograd
    with runtime.autocast(x.device):
        loss = kd_loss(trained(x).float(), t_logits, args.temperature)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    num_classes = t_logits.shape[1]
    return {"kd_loss": loss, "teacher_hist": F.one_hot(t_logits.argmax(1), num_classes).sum(0)}  # no host sync


#### Training ####

def train(args, teacher, student, transfer_x, transfer_logits, test, log):
    """Line 15 of Algorithm 1: distil on the composed transfer set for args.epochs epochs."""
    meta, device = data.DATASETS[args.dataset], transfer_x.device
    n = len(transfer_x)
    per_epoch = args.epoch_images or n
    cycled = torch.arange(n).repeat(-(-per_epoch // n))  # --epoch-images: the set repeated, shuffled each epoch
    loader = data.DeviceLoader(transfer_x, *transfer_logits, batch_size=args.batch_size, shuffle=True,
                               mean=(0.0,) * meta["channels"], std=(1.0,) * meta["channels"],  # x in [0, 1]
                               device=device, seed=args.seed, indices=cycled, rank=runtime.rank(),
                               world_size=runtime.world_size())
    steps = -(-per_epoch // args.batch_size)
    aug_gen = torch.Generator(device=device).manual_seed(runtime.rank_seed(args.seed + 2))
    mean = torch.tensor(meta["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], device=device).view(1, -1, 1, 1)
    opt = runtime.make_optimizer(student.parameters(), args)
    training = runtime.Training(log, args.epochs, save={"student": student, "opt": opt},
                                rngs={"aug": aug_gen, "loader": loader}, optimizer=opt, lr=args.lr,
                                milestones=args.milestones)
    trained = runtime.distribute(student)
    for epoch in training.epochs():
        for x, *cached in itertools.islice(loader, steps):
            training.record(len(x), **kd_step(trained, teacher, x, cached[0] if cached else None, opt, aug_gen,
                                              lambda v: (v - mean) / std, args))
        training.end_epoch(test_acc=runtime.evaluate(student, *test, meta["mean"], meta["std"]))


def print_composition(report, class_names):
    print(f"transfer set: {report['transfer_size']} images, quota N/C = {report['quota']}, "
          f"{report['draws']} noise draws; per source: {report['per_source']}", flush=True)
    for c, (h, raw) in enumerate(zip(report["histogram"], report["raw_histogram"])):
        name = class_names[c] if class_names else str(c)
        note = f"  SHORT by {report['short'][c]}" if c in report["short"] else ""
        print(f"  class {c:3d} {name:>12s}: kept {h:6d} (teacher labelled {raw:8d} of all examined){note}", flush=True)
    if report["short"]:
        print("short of their quota: " + ", ".join(
            f"{class_names[c] if class_names else c} by {s} ({100 * s / report['quota']:.0f}%)"
            for c, s in report["short"].items()), flush=True)


def check_composition(report, args, class_names):
    """Refuse a transfer set that cannot be trained on (empty) or that --strict does not accept."""
    if not report["transfer_size"]:
        raise ValueError(f"the sources {args.source!r} gave no transfer image at all — add a source or more draws")
    if args.strict is None:
        return
    low = [c for c, h in enumerate(report["histogram"]) if h == 0 or h < args.strict * report["quota"]]
    if low:
        names = ", ".join(f"{class_names[c] if class_names else c} ({report['histogram'][c]})" for c in low)
        raise ValueError(f"--strict {args.strict}: classes below {args.strict:.0%} of the quota {report['quota']} "
                         f"(or empty): {names} — raise --max-draws/--max-minutes or add a source")


def save_composition_pictures(images, labels, report, meta, log):
    """A grid of the composed set (a labelled row per teacher class) and, with matplotlib, its histogram."""
    rows, row_labels = pictures.per_class_examples(images, labels, meta["num_classes"], per_class=10)
    pictures.class_rows(rows, row_labels, meta["classes"], log.path("transfer_set.png"),
                        title="transfer set: row = the teacher's class (blank: no image)")
    pictures.histogram_plot(report["histogram"], meta["classes"], log.path("transfer_histogram.png"),
                            f"teacher-predicted classes of the transfer set (quota {report['quota']})")


def run(args):
    args = resolve_settings(runtime.resume_config(args, build_parser(), "balanced_transfer.py"))
    device = runtime.get_device(args.device)
    runtime.seed_everything(args.seed)
    meta = data.DATASETS[args.dataset]
    runtime.download_if_asked(args)
    teacher, _ = get_teacher(args, device)  # a --teacher that does not fit is refused before any data is read
    test_x, test_y = data.load_dataset(args.dataset, "test", args.data_root)
    log = runtime.RunLog(f"balanced_transfer-{args.dataset}", args, args.runs_dir)
    test = (test_x.to(device), test_y.to(device))
    teacher_acc = runtime.evaluate(teacher, *test, meta["mean"], meta["std"])
    print(f"teacher {args.teacher_arch}: {teacher_acc:.2f}% test accuracy", flush=True)

    # The composed set is saved once in the run folder and read back by --resume: composing can take minutes
    # of teacher forwards, and on a GPU the teacher's argmax is not guaranteed to repeat bit for bit.
    if log.state:
        saved = torch.load(log.path("transfer_set.pt"), map_location="cpu", weights_only=True)
        images, labels, report, compose_s = (saved["images"].to(device), saved["labels"].to(device), saved["report"],
                                             saved["compose_s"])
        print(f"transfer set read from {log.path('transfer_set.pt')}", flush=True)
    else:
        start = time.time()
        images, labels, report = compose_transfer_set(teacher, args, device)
        compose_s = time.time() - start
        if runtime.is_main():
            models.atomic_save({"images": images.cpu(), "labels": labels.cpu(), "report": report,
                                "compose_s": compose_s}, log.path("transfer_set.pt"))
    print_composition(report, meta["classes"])
    print(f"composition took {runtime.format_seconds(compose_s)}", flush=True)
    check_composition(report, args, meta["classes"])
    if runtime.is_main():
        save_composition_pictures(images, labels, report, meta, log)

    # The composed images' teacher logits, computed once: the targets without augmentation or with fixed labels.
    fixed = not args.augment or args.aug_labels == "fixed"
    transfer_logits = [runtime.predict(teacher, images, meta["mean"], meta["std"], args.draw_batch)] if fixed else []
    student = runtime.prepare_model(models.build_model(args.student_arch, meta["num_classes"], meta["channels"]),
                                    device)
    train(args, teacher, student, images, transfer_logits, test, log)

    last = log.last_record
    path = log.path("student.pt")
    if runtime.is_main():
        models.save_checkpoint(path, student, args.student_arch, meta["num_classes"], meta["channels"], args,
                               last["test_acc"], dataset=args.dataset, image_size=meta["size"])
    print(f"saved student to {path}", flush=True)
    return log.finish("balanced_transfer", args.dataset, {
        "teacher_acc": teacher_acc, "student_acc": last["test_acc"], "balanced": args.balanced,
        "augment": args.augment, "aug_labels": args.aug_labels, "source": args.source, **report,
        "trained_histogram": last["teacher_hist"], "images_seen": sum(last["teacher_hist"]) * args.epochs,
        "epoch_images": args.epoch_images or report["transfer_size"],
        "compose_s": round(compose_s, 1), "student_checkpoint": path})


def main(argv=None):
    runtime.cli(run, build_parser(), "balanced_transfer.py", argv)


if __name__ == "__main__":
    main()
