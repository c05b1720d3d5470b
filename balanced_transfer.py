"""Class-balanced arbitrary transfer sets for data-free KD (Nayak, Mopuri, Chakraborty, WACV 2021).

Without the teacher's training data, distil on *arbitrary* unlabelled images (random noise,
unrelated synthetic or natural datasets). The teacher's argmax spreads such data very unevenly over
its classes, so Algorithm 1 composes a "target-class balanced" set: go through sources D_1..D_M in
order and keep a sample only while its teacher-predicted class holds fewer than N/C samples. The
student then learns from the teacher's temperature-softened outputs alone, Eq. (2), optionally on
augmented images (Sec. 4.2).

    python balanced_transfer.py --epochs 40 --no-augment --source noise-uniform-normalised
        # quick start
    python balanced_transfer.py --no-augment --max-draws full --epoch-images 60000
        # Table 1, balanced
    python balanced_transfer.py --unbalanced --no-augment  # Table 1's first row
    python balanced_transfer.py --dataset cifar10 --source svhn,tinyimagenet
        # AlexNet -> AlexNet-half

Paper (Table 1, FMNIST, teacher 90.84%): noise unbalanced 33.49 / 38.37, balanced 70.15 / 74.33
(without / with augmentation). By default the composer stops a generated source at --max-draws
(1,000,000 for the MNIST family) or --max-minutes and reports the histogram it reached; --max-draws
full draws until every quota is full, as the paper does, through a bf16 screen and a resumable
composition cache. Measured runs and the numbers to expect: README.md and docs/results.md.
"""

import argparse
import copy
import glob
import itertools
import os
import time

import torch
import torch.nn.functional as F

import data
import models
import pictures
import runtime
from teacher import get_teacher

#### Settings: defaults per dataset family (every value is also a CLI flag; --help shows them) ####
# The paper gives architectures and sources (Sec. 4, Table 1) but no student optimiser, epochs or
# batch size.
# mnist: LeNet-5 -> LeNet-5-half, uniform noise; the MNIST-family teacher recipe
#        (Adam 1e-3, 40 epochs).
#        max_draws 1M: under a minute of composing on a 2-core CPU.
# cifar: AlexNet -> AlexNet-half (Table 1 / Table 2-left), SVHN then TinyImageNet (Sec. 4.1); the
#        CIFAR recipe (SGD 0.05, 240 epochs, /10 at 150/180/210).
# synthetic: tiny settings so that the end-to-end tests take seconds; noise, then style-shifted
#        shapes (two sources, so Algorithm 1 switches source).
SETTINGS = {
    "cifar": dict(
        teacher_arch="alexnet",
        student_arch="alexnet_half",
        source="svhn,tinyimagenet",
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        epochs=240,
        milestones=(150, 180, 210),
        batch_size=128,
        max_draws=1_000_000,
        draw_batch=8192,
    ),
    "mnist": dict(
        teacher_arch="lenet5",
        student_arch="lenet5_half",
        source="noise-uniform",
        optimizer="adam",
        lr=1e-3,
        momentum=0.0,
        weight_decay=0.0,
        epochs=40,
        milestones=(),
        batch_size=256,
        max_draws=1_000_000,
        draw_batch=8192,
    ),
    "synthetic": dict(
        teacher_arch="lenet5",
        student_arch="lenet5_half",
        source="noise-uniform,shifted:synthetic",
        optimizer="adam",
        lr=2e-3,
        momentum=0.0,
        weight_decay=0.0,
        epochs=2,
        milestones=(),
        batch_size=128,
        max_draws=4000,
        draw_batch=2048,
    ),
}

# Generated sources, drawn on the fly by the streaming composer. uniform and gaussian are the
# paper's (Sec. 4: U[0,1] per pixel; N(0.5, 0.1) clipped for CIFAR-100). The others are additions,
# never a default: lowfreq (uniform 8x8 noise upsampled) and brightness (uniform x a per-image
# brightness) reach more teacher classes per draw; uniform-normalised (U[-1, 1]) and
# normal-normalised (N(0, 1)) are drawn in the teacher's normalised input space, mapped back to
# pixels and clipped to [0, 1].
NOISE_SOURCES = {
    "noise-uniform": "uniform",
    "noise-gaussian": "gaussian",
    "noise-lowfreq": "lowfreq",
    "noise-brightness": "brightness",
    "noise-uniform-normalised": "uniform-normalised",
    "noise-normal-normalised": "normal-normalised",
}


def draws_flag(text):
    """--max-draws: a positive number of draws, or 'full' (draw until every quota is full)."""
    if text == "full":
        return text
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a number of draws nor 'full'"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} draws: give at least 1, or 'full'")
    return value


def build_parser():
    parser = runtime.method_parser(
        "KD on a class-balanced arbitrary transfer set (WACV 2021).",
        SETTINGS,
        seed="the draws, the student and the augmentation",
        notes={
            "teacher_arch": "Sec. 4 (resnet34 for Table 2-right)",
            "student_arch": "Sec. 4 (resnet18 for resnet34)",
            "epochs": "not given in the paper",
            "checkpoint_dir": "the composition cache (--compose-cache)",
            "resume": "and its transfer_set.pt",
        },
    )
    p = parser.add_argument_group("balanced transfer (Algorithm 1, Eq. 2, Sec. 4)")
    p.add_argument(
        "--source",
        default=None,
        help="arbitrary sources D_1..D_M in order: any data.py source list, or generated noise "
        f"({', '.join(NOISE_SOURCES)}) (Sec. 4.1: noise, Clevr+Mid-Air, SVHN+TinyImageNet); "
        + runtime.family_default(SETTINGS, "source"),
    )
    # Transfer set (Algorithm 1, Sec. 4.1)
    balance = p.add_mutually_exclusive_group()
    balance.add_argument(
        "--balanced",
        dest="balanced",
        action="store_true",
        default=True,
        help="compose with Algorithm 1 (default: on)",
    )
    balance.add_argument(
        "--unbalanced",
        dest="balanced",
        action="store_false",
        help="Table 1 'X' rows: a random composition of the same size N",
    )
    p.add_argument(
        "--transfer-size",
        type=int,
        default=None,
        help="N of Algorithm 1 (Sec. 4.1: the teacher's "
        "training-set size; default: data.DATASETS train_size, 60000 for FMNIST)",
    )
    p.add_argument(
        "--max-draws",
        type=draws_flag,
        default=None,
        help="cap on draws per generated source "
        "(a ':N' suffix overrides it); 'full': until every quota is full, as the paper does; "
        + runtime.family_default(SETTINGS, "max_draws"),
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="time cap on drawing from a generated source (default: none)",
    )
    p.add_argument(
        "--draw-batch",
        type=int,
        default=None,
        help="noise images per teacher forward while composing; "
        + runtime.family_default(SETTINGS, "draw_batch"),
    )
    p.add_argument(
        "--screen",
        default="bf16",
        choices=["bf16", "off"],
        help="pre-screen the draws with a bf16 copy of the teacher and label only the candidates "
        "of unfilled classes with the fp32 teacher (every kept image carries its fp32 label; "
        "docs/balanced_transfer.md); off: fp32 on every draw",
    )
    p.add_argument(
        "--compose-cache",
        default=None,
        metavar="DIR",
        help="where a balanced composition from one generated source is saved every --save-minutes "
        "and at Ctrl-C, continued by the same command and reused once complete ('off': none; "
        "default: CHECKPOINT_DIR/transfer_sets)",
    )
    p.add_argument(
        "--save-minutes",
        type=float,
        default=5.0,
        help="minutes between saves of the composition cache",
    )
    p.add_argument(
        "--strict",
        type=float,
        nargs="?",
        const=0.0,
        default=None,
        metavar="FRACTION",
        help="refuse a transfer set where a class holds no image, or fewer than FRACTION of its "
        "quota N/C (default: off)",
    )
    # Distillation (Eq. 2, Sec. 4.2)
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Sec. 4.2: scaling, rotation, flip, gaussian and salt-and-pepper noise during KD",
    )
    p.add_argument(
        "--aug-labels",
        default="relabel",
        choices=["relabel", "fixed", "with-originals"],
        help="targets of augmented images: the teacher labels each augmented image afresh "
        "(relabel, Sec. 4.2 as written); the teacher's outputs on the composed image (fixed); or "
        "every batch holds the composed images beside their augmented copies, each labelled afresh "
        "(with-originals)",
    )
    p.add_argument(
        "--epoch-images",
        type=int,
        default=None,
        help="images per epoch: a smaller transfer set is cycled (each epoch a fresh random order "
        "of it, repeated), so sets of other sizes get equal optimiser steps (default: one pass "
        "over the transfer set)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=20.0,
        help="tau of Eq. (2); not given in the paper: 20 as in the same group's ZSKD and DeGAN",
    )
    return parser


def resolve_settings(args):
    """The run's settings: every flag left out takes its value from SETTINGS (above), N its default
    |D_o|, the teacher's training-set size (Sec. 4.1; the original data is never read), or all of
    them from the saved config.json under --resume; then `check_settings`."""
    train_sizes = {name: meta["train_size"] for name, meta in data.DATASETS.items()}
    per_dataset = {"transfer_size": train_sizes}
    args = runtime.complete_args(
        args, build_parser(), "balanced_transfer.py", SETTINGS, per_dataset
    )
    return check_settings(args)


def check_settings(args):
    """Refuse a bad value in one line, before anything is composed."""
    runtime.check_training_flags(
        args, SETTINGS, source="the defaults are", checkpoints=args.teacher is None
    )
    check, default = runtime.check_range, build_parser().get_default
    check(
        "--transfer-size",
        args.transfer_size,
        data.DATASETS[args.dataset]["num_classes"],
        fix="the quota N // C must be >= 1",
    )
    check(
        "--temperature",
        args.temperature,
        0,
        open_low=True,
        fix=f"the default is {default('temperature')}, as in ZSKD and DeGAN (the paper gives none)",
    )
    check("--draw-batch", args.draw_batch, 1, fix=runtime.family_default(SETTINGS, "draw_batch"))
    check(
        "--save-minutes",
        args.save_minutes,
        0,
        open_low=True,
        fix=f"the default is {default('save_minutes')}",
    )
    if args.max_minutes is not None:
        check(
            "--max-minutes", args.max_minutes, 0, open_low=True, fix="leave it out for no time cap"
        )
    if args.epoch_images is not None:
        check("--epoch-images", args.epoch_images, 1, fix="leave it out for one pass per epoch")
    if args.strict is not None:
        check(
            "--strict FRACTION",
            args.strict,
            0,
            1,
            fix="e.g. --strict 0.5 refuses classes below half their quota",
        )
    for spec in args.source.split(","):
        data.parse_source(spec.strip())  # a source that asks for 0 images is an error now
    if args.resume:
        check_run_file(
            args.resume,
            "transfer_set.pt",
            "the composed set it trains on",
            "start a new run (it composes the set again)",
        )
    return args


def composition_cache(args):
    """--compose-cache, or its default <checkpoint-dir>/transfer_sets."""
    return args.compose_cache or os.path.join(args.checkpoint_dir, "transfer_sets")


def check_run_file(run_dir, filename, what, fix):
    """--resume RUN_DIR needs RUN_DIR/filename (`what` it holds), a file that is not empty: else one
    line that ends with `fix`."""
    path = os.path.join(run_dir, filename)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        found = "an empty file" if os.path.isfile(path) else "none"
        raise ValueError(
            f"--resume {run_dir}: expected {filename} ({what}) in that folder, found "
            f"{found} — {fix}"
        )


#### Losses and selection ####


def class_fill(labels, counts, quota):
    """Lines 5-10 of Algorithm 1 for one chunk of a source, vectorised: keep labels[k] iff its class
    still holds fewer than `quota` samples when the chunk is taken in order. labels (n,) int64;
    counts (C,) int64 so far. Returns (keep (n,) bool, updated counts (C,))."""
    onehot = F.one_hot(labels, len(counts))  # (n, C)
    rank = (
        onehot.cumsum(0).gather(1, labels[:, None]).squeeze(1)
    )  # (n,) 1-based position within its class
    keep = counts[labels] + rank <= quota  # line 8: c_l < N/C before adding x_k
    return keep, counts + torch.bincount(labels[keep], minlength=len(counts))


def balanced_indices(pred_labels, quota, num_classes):
    """Algorithm 1 on finite sources: pred_labels[i] (n_i,) are the teacher's labels of D_i in
    sampling order. Returns, per source, the LongTensor of kept positions; sources after the quotas
    are full keep nothing."""
    counts = torch.zeros(
        num_classes, dtype=torch.int64, device=pred_labels[0].device if pred_labels else "cpu"
    )
    kept = []
    for labels in pred_labels:  # Algorithm 1, line 3: for i = 1..M
        if bool((counts >= quota).all()):  # line 13: every class is full, stop
            kept.append(torch.zeros(0, dtype=torch.int64, device=labels.device))
            continue
        keep, counts = class_fill(labels.long(), counts, quota)
        kept.append(keep.nonzero().squeeze(1))
    return kept


def algorithm1_literal(sources, teacher, quota, counts, generator):
    """Lines 3-14 of Algorithm 1 as printed, one sample at a time in plain Python: the reference
    beside the vectorised `class_fill` / `balanced_indices`, which the composer runs.

    sources: D_1..D_M, each a sequence of samples; teacher: a sample -> the class T predicts for it;
    quota: N/C; counts: c_0..c_{C-1} (line 2: zeros), updated in place; generator: the random order
    in which line 5 samples each D_i. Returns, per source, the positions in D_i of the kept samples,
    in the order they were kept."""
    kept = [[] for _ in sources]
    for i, D_i in enumerate(sources):  # line 3
        remaining = torch.randperm(len(D_i), generator=generator).tolist()
        while any(c < quota for c in counts) and remaining:  # line 4
            k = remaining.pop(0)  # lines 5-6: sample x_k from D_i and remove it
            label = teacher(D_i[k])  # line 7
            if counts[label] < quota:  # line 8
                kept[i].append(k)  # line 9
                counts[label] += 1  # line 10
        if all(c == quota for c in counts):  # line 13
            break
    return kept


def kd_loss(student_logits, teacher_logits, T):
    """Eq. (2): KL(p_T || p_S) on temperature-softened outputs, batch mean, x T^2. Same gradient as
    the paper's soft cross-entropy -sum p_T log p_S (they differ by the teacher's entropy, a
    constant); no hard labels."""
    # Eq. (2)
    return (
        F.kl_div(
            F.log_softmax(student_logits / T, dim=1),
            F.softmax(teacher_logits / T, dim=1),
            reduction="batchmean",
        )
        * T**2
    )


def random_noise(n, shape, kind, generator, mean=None, std=None):
    """n noise images (n, *shape) in [0, 1] on the generator's device (see NOISE_SOURCES).
    mean/std: the teacher's input normalisation, for the kinds drawn in its normalised space."""
    device = generator.device
    c, h, w = shape
    if kind == "uniform":
        return torch.rand((n, c, h, w), generator=generator, device=device)
    if kind == "gaussian":
        return (0.5 + 0.1 * torch.randn((n, c, h, w), generator=generator, device=device)).clamp(
            0, 1
        )
    if kind == "lowfreq":
        coarse = torch.rand((n, c, min(h, 8), min(w, 8)), generator=generator, device=device)
        return F.interpolate(coarse, size=(h, w), mode="nearest")
    if kind == "brightness":
        return torch.rand((n, c, h, w), generator=generator, device=device) * torch.rand(
            (n, 1, 1, 1), generator=generator, device=device
        )
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
    """Sec. 4.2: scaling, rotation, horizontal flip, gaussian noise and salt-and-pepper noise, each
    applied to an image with probability p independently, so images get random combinations of them.
    x (B, C, H, W) in [0, 1]. The paper names the operations, not their strengths; the keyword
    defaults are ours."""
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
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, torch.zeros_like(cos)], 1),
            torch.stack([sin * flip, cos, torch.zeros_like(cos)], 1),
        ],
        1,
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, (b, c, h, w), align_corners=False)
    # reflection padding: black corners would move noise images into other teacher classes
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    gauss = chosen().view(b, 1, 1, 1)
    x = x + gauss * noise_std * torch.randn(x.shape, generator=generator, device=dev)
    sp = chosen().view(b, 1, 1, 1).bool()
    u = torch.rand(x.shape, generator=generator, device=dev)
    x = torch.where(sp & (u < salt_pepper / 2), 0.0, x)  # pepper
    x = torch.where(sp & (u > 1 - salt_pepper / 2), 1.0, x)  # salt
    return x.clamp(0, 1)


#### One step of Algorithm 1 ####


def to_uint8(x):
    # DEVIATION: noise is quantised to 256 levels — the transfer set is stored as uint8 like every
    # other source (4x less memory on the device); a 1/255 step is far below the noise's own spread.
    return (x * 255).round().to(torch.uint8)


def draw_noise(n, shape, kind, generator, mean=None, std=None):
    """n noise images (n, *shape) as uint8, the format the transfer set is stored in. The paper's
    uniform noise (U[0, 1] per pixel) is drawn directly on the 256 stored levels, each level equally
    likely, which costs a fraction of drawing floats and rounding them; the other kinds are drawn as
    floats and quantised."""
    if kind == "uniform":
        return torch.randint(
            0, 256, (n, *shape), generator=generator, device=generator.device, dtype=torch.uint8
        )
    return to_uint8(random_noise(n, shape, kind, generator, mean, std))


def teacher_labels(teacher, images, mean, std, batch_size):
    return runtime.predict(teacher, images, mean, std, batch_size).argmax(1)


# The screen. Once the large classes are full, Algorithm 1 needs the teacher's exact argmax only for
# the draws that might belong to a class still below its quota; a bf16 copy of the teacher finds
# those several times faster than the fp32 teacher labels everything. Every draw it passes is
# labelled by the fp32 teacher, so every kept image carries the fp32 label. SCREEN_MARGIN / 2 is
# above the largest bf16-vs-fp32 logit error measured on 10^6 uniform draws for the Fashion-MNIST
# LeNet-5 (0.24 on one thread, 0.38 on two), so no kept draw is screened out
# (experiments/compose_speed.py measures it), and the composer keeps measuring: every
# SCREEN_CHECK_EVERY-th batch is labelled in full by the fp32 teacher and counted (agreement,
# misses). While more than SCREEN_FROM_OPEN_SHARE of the draws fall in open classes, the screen
# would pass most of them anyway, and the fp32 teacher labels every draw.
SCREEN_MARGIN = 1.0
SCREEN_CHECK_EVERY = 64
SCREEN_FROM_OPEN_SHARE = 0.25


class PairwiseMaxPool(torch.nn.Module):
    """nn.MaxPool2d(2) written as two elementwise maxima: the same values, and several times faster
    on a CPU."""

    def forward(self, x):  # (B, C, H, W)
        x = x[:, :, : x.shape[2] // 2 * 2, : x.shape[3] // 2 * 2]  # MaxPool2d drops an odd last row
        x = torch.maximum(x[:, :, 0::2], x[:, :, 1::2])  # (B, C, H/2, W)
        return torch.maximum(x[:, :, :, 0::2], x[:, :, :, 1::2])  # (B, C, H/2, W/2)


def screen_network(teacher, mean, std):
    """A bf16, channels_last copy of the frozen teacher that reads uint8 pixel values: the input
    normalisation (x / 255 - mean) / std folded into its first convolution when that has no padding
    (else `folded` is False and the caller normalises), its 2x2 max-pools as PairwiseMaxPool, taken
    before the ReLU that precedes them (max and ReLU commute: the same values, a quarter of the
    ReLUs). Returns (network, folded)."""
    net = copy.deepcopy(teacher).eval()
    first = next((m for m in net.modules() if isinstance(m, torch.nn.Conv2d)), None)
    folded = first is not None and first.padding in (0, (0, 0)) and first.bias is not None
    if folded:  # conv(W, (x / 255 - m) / s) + b = conv(W / (255 s), x) + b - sum W m / s
        scale = torch.tensor(std, device=first.weight.device).view(1, -1, 1, 1)
        shift = torch.tensor(mean, device=first.weight.device).view(1, -1, 1, 1) / scale
        with torch.no_grad():
            first.bias -= (first.weight * shift).sum((1, 2, 3))
            first.weight /= 255 * scale
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if (
                isinstance(child, torch.nn.MaxPool2d)
                and child.kernel_size in (2, (2, 2))
                and child.stride in (2, (2, 2))
                and child.padding in (0, (0, 0))
                and child.dilation in (1, (1, 1))
                and not child.ceil_mode
            ):
                setattr(module, name, PairwiseMaxPool())
    for seq in [m for m in net.modules() if isinstance(m, torch.nn.Sequential)]:
        layers = list(seq)
        for i in range(len(layers) - 1):
            if isinstance(layers[i], torch.nn.ReLU) and isinstance(layers[i + 1], PairwiseMaxPool):
                layers[i], layers[i + 1] = layers[i + 1], layers[i]
        for i, layer in enumerate(layers):
            seq[i] = layer
    return net.to(torch.bfloat16).to(memory_format=torch.channels_last), folded


def screen_candidates(screen_logits, open_classes, margin):
    """Draws whose exact argmax may be a class that still takes images: some open class's screened
    logit lies within `margin` of the screened maximum. screen_logits (n, C) float; open_classes
    (C,) bool. If no screened logit is off by more than margin / 2, every draw Algorithm 1 keeps is
    among them."""
    top = screen_logits.amax(1, keepdim=True)  # (n, 1)
    return ((screen_logits >= top - margin) & open_classes).any(1)  # (n,) bool


class Labeller:
    """The teacher's labels of uint8 draws: exact (the fp32 teacher through runtime.predict) and,
    for the streaming composer, screened (the bf16 screen_network; None when screening is off)."""

    def __init__(self, teacher, mean, std, batch_size, screen=True):
        self.teacher, self.mean, self.std, self.batch_size = teacher, mean, std, batch_size
        self.screen, self.folded = screen_network(teacher, mean, std) if screen else (None, False)
        device = next(teacher.parameters()).device
        self.m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.s = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def exact(self, x):  # (n, C, H, W) uint8 -> (n,)
        if not len(x):
            return torch.zeros(0, dtype=torch.int64, device=x.device)
        return teacher_labels(self.teacher, x, self.mean, self.std, self.batch_size)

    @torch.inference_mode()
    def screened_logits(self, x):  # (n, C, H, W) uint8 -> (n, C)
        z = (
            x.to(torch.bfloat16)
            if self.folded
            else ((x.float() / 255 - self.m) / self.s).to(torch.bfloat16)
        )
        return self.screen(z.contiguous(memory_format=torch.channels_last)).float()


class NoiseStream:
    """Algorithm 1's progress on one generated source, drawn in whole batches from one seeded
    generator: what the composition cache holds, so that a run continues where the last one stopped.
    kept_at[k] is the draw index of kept image k; batch_hist[b] the teacher's class histogram of
    batch b."""

    def __init__(self, generator, num_classes):
        self.generator, self.num_classes = generator, num_classes
        self.made, self.seconds, self.complete = 0, 0.0, False
        self.images, self.labels, self.kept_at, self.batch_hist = [], [], [], []
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=generator.device)
        # batches: those that went through the screen, every SCREEN_CHECK_EVERY-th of them a check
        # batch; checked: draws of the check batches (agree, misses: the screen against fp32 there);
        # screened: draws of the other screened batches, of which labelled_exactly were passed on to
        # the fp32 teacher
        self.screen = {
            "batches": 0,
            "checked": 0,
            "agree": 0,
            "misses": 0,
            "screened": 0,
            "labelled_exactly": 0,
        }

    def state_dict(self):
        def cat(parts, dtype):
            return torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=dtype)

        return {
            "made": self.made,
            "seconds": self.seconds,
            "complete": self.complete,
            "images": cat(self.images, torch.uint8),
            "labels": cat(self.labels, torch.int64),
            "kept_at": cat(self.kept_at, torch.int64),
            "counts": self.counts.cpu(),
            "batch_hist": torch.stack(self.batch_hist).cpu()
            if self.batch_hist
            else torch.zeros(0, self.num_classes, dtype=torch.int64),
            "generator": self.generator.get_state(),
            "screen": dict(self.screen),
        }

    def load_state_dict(self, state):
        device = self.generator.device
        self.made, self.seconds, self.complete = state["made"], state["seconds"], state["complete"]
        self.images, self.labels = [state["images"].to(device)], [state["labels"].to(device)]
        self.kept_at, self.counts = [state["kept_at"].to(device)], state["counts"].to(device)
        self.batch_hist = list(state["batch_hist"].to(device))
        self.generator.set_state(state["generator"])
        self.screen.update(state["screen"])

    def histogram(self):
        return sum(
            self.batch_hist,
            torch.zeros(self.num_classes, dtype=torch.int64, device=self.counts.device),
        )


def compose_generated(stream, draw, labeller, quota, max_draws, balanced=True, on_batch=None):
    """Lines 3-14 of Algorithm 1 for a generated source, streaming: draw a batch, label it with the
    teacher (line 7), keep what fills the quotas (lines 8-10; balanced) or everything (unbalanced);
    stop when every class is full (line 13), after `max_draws` draws, or when on_batch(stream)
    returns True. draw() -> one batch of uint8 draws; labeller: a Labeller. Continues `stream` in
    place."""
    while stream.made < max_draws and not stream.complete:
        start = time.time()
        x = draw()  # (B, C, H, W) uint8
        if stream.made + len(x) > max_draws:  # the cap ends inside this batch
            x = x[: int(max_draws - stream.made)]
        # the screen pays off once most draws fall in full classes; until then the fp32 teacher
        # labels all
        exact_all = (
            labeller.screen is None
            or not balanced
            or open_share(stream, quota) > SCREEN_FROM_OPEN_SHARE
        )
        check = not exact_all and stream.screen["batches"] % SCREEN_CHECK_EVERY == 0
        if exact_all or check:
            labels = labeller.exact(x)  # line 7, every draw
            hist = torch.bincount(labels, minlength=stream.num_classes)
            passed = torch.ones_like(labels, dtype=torch.bool)
        if not exact_all:
            stream.screen["batches"] += 1
            screened = labeller.screened_logits(x)  # (B, C)
            passed_screen = screen_candidates(screened, stream.counts < quota, SCREEN_MARGIN)
            if check:  # measure the screen against the exact labels of this batch
                stream.screen["checked"] += len(x)
                stream.screen["agree"] += int((screened.argmax(1) == labels).sum())
                stream.screen["misses"] += int(
                    (~passed_screen & (stream.counts[labels] < quota)).sum()
                )
            else:
                passed = passed_screen
                labels = screened.argmax(1)
                labels[passed] = labeller.exact(x[passed])  # line 7 for the candidates
                stream.screen["screened"] += len(x)
                stream.screen["labelled_exactly"] += int(passed.sum())
                hist = torch.bincount(labels, minlength=stream.num_classes)
        index = stream.made + torch.arange(len(x), device=x.device)
        x, labels, index = x[passed], labels[passed], index[passed]
        if balanced:
            keep, stream.counts = class_fill(labels, stream.counts, quota)  # lines 8-10
        else:
            keep = torch.ones_like(labels, dtype=torch.bool)
            stream.counts = stream.counts + torch.bincount(labels, minlength=stream.num_classes)
        stream.images.append(x[keep])
        stream.labels.append(labels[keep])
        stream.kept_at.append(index[keep])
        stream.batch_hist.append(hist)
        stream.made += len(passed)
        stream.complete = balanced and bool((stream.counts >= quota).all())  # line 13
        stream.seconds += time.time() - start
        if on_batch and on_batch(stream):
            break
    return stream


# Under torchrun kd_step gets the student wrapped in DistributedDataParallel (`trained`: its
# backward averages the gradients over the processes, so that every process takes the same step)
# and the teacher, which it only reads, as it is: there is no gradient of the teacher to average.
def kd_step(
    trained,
    teacher,
    x,
    cached_logits,
    opt,
    aug_gen,
    normalize,
    *,
    tau,
    augmentation=True,
    aug_labels="relabel",
):
    """Line 15, Eq. (2), on one batch x (B, C, H, W) in [0, 1] of the transfer set: augment
    (Sec. 4.2), the teacher's soft outputs as targets, one update of the student.

    cached_logits: the teacher's logits of the composed images (B, C), or None; tau: the
    temperature of Eq. (2). augmentation=False trains on the composed images as they are;
    aug_labels: the targets of augmented images, "relabel" (the teacher labels each afresh),
    "fixed" (cached_logits) or "with-originals" (the composed images beside their augmented
    copies). Returns the batch's terms, with the histogram of the targets' argmax."""
    if augmentation:
        augmented = augment(x, aug_gen)  # a fresh augmentation each time
        if aug_labels == "with-originals":
            x, cached_logits = torch.cat([x, augmented]), None
        else:
            x = augmented
    x = normalize(x)
    if (
        cached_logits is not None
    ):  # no augmentation, or --aug-labels fixed: the composed images' outputs
        t_logits = cached_logits
    else:
        with torch.inference_mode(), runtime.autocast(x.device):
            t_logits = teacher(x).float()
        t_logits = t_logits.clone()  # a normal tensor, usable by autograd
    with runtime.autocast(x.device):
        loss = kd_loss(trained(x).float(), t_logits, tau)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    num_classes = t_logits.shape[1]
    return {
        "kd_loss": loss,
        "teacher_hist": F.one_hot(t_logits.argmax(1), num_classes).sum(0),
    }  # no host sync


#### Composing the transfer set: cache, progress, every source (around compose_generated) ####


def open_share(stream, quota):
    """The share of the last batch's draws that fell in classes still below their quota (1 before
    any batch)."""
    if not stream.batch_hist:
        return 1.0
    last = stream.batch_hist[-1]
    return float(last[stream.counts < quota].sum()) / max(float(last.sum()), 1.0)


def stream_prefix(state, quota=None, max_draws=None):
    """The set Algorithm 1 gives on the first draws of a cached stream: with a smaller quota (the
    first `quota` kept images of each class, in draw order) and/or fewer draws (whole batches).
    Returns (images, labels, draws, histogram of those draws)."""
    labels, kept_at, batch_hist = state["labels"], state["kept_at"], state["batch_hist"]
    per_batch = state["made"] // max(len(batch_hist), 1)
    keep = torch.ones_like(labels, dtype=torch.bool)
    batches = len(batch_hist)
    if max_draws is not None:
        batches = min(batches, -(-max_draws // per_batch))
        keep &= kept_at < batches * per_batch
    if quota is not None:
        onehot = F.one_hot(labels, batch_hist.shape[1]) * keep[:, None]  # (n, C)
        rank = (
            onehot.cumsum(0).gather(1, labels[:, None]).squeeze(1)
        )  # 1-based rank within its class
        keep &= rank <= quota
        full = torch.bincount(labels[keep], minlength=batch_hist.shape[1]) >= quota
        if bool(
            full.all()
        ):  # the quota filled before these batches ended: stop at the batch that filled it
            batches = min(batches, int(kept_at[keep].max()) // per_batch + 1)
    return (
        state["images"][keep],
        labels[keep],
        batches * per_batch,
        batch_hist[:batches].sum(0)
        if batches
        else torch.zeros(batch_hist.shape[1], dtype=torch.int64),
    )


class Progress:
    """One line every `every` seconds while a source is drawn: draws, draws/s, per-class fill and
    the ETA to full balance (each class's remaining quota over its measured rate per draw), and to
    the draw cap."""

    def __init__(self, name, cap, quota, balanced, every=10.0):
        self.name, self.cap, self.quota, self.balanced, self.every = (
            name,
            cap,
            quota,
            balanced,
            every,
        )
        self.shown, self.start_made, self.start = time.time(), None, time.time()

    def __call__(self, stream):
        now = time.time()
        if self.start_made is None:
            self.start_made = stream.made - int(
                stream.batch_hist[-1].sum()
            )  # draws before this run
        if now - self.shown < self.every:
            return False
        self.shown = now
        rate = (stream.made - self.start_made) / max(now - self.start, 1e-9)
        cap = "no draw cap" if self.cap == float("inf") else f"of {self.cap:,}"
        line = (
            f"  {self.name}: {stream.made:,} draws ({cap}), {rate:,.0f} draws/s, "
            f"per-class fill {stream.counts.tolist()} of {self.quota}"
        )
        if self.balanced:
            need = draws_to_balance(stream.counts, stream.histogram(), stream.made, self.quota)
            line += " | ETA to full balance " + (
                "unknown (a class not seen yet)"
                if need == float("inf")
                else f"{runtime.format_seconds(need / rate)} ({need:,.0f} more draws)"
            )
        if self.cap != float("inf"):
            line += f" | to the draw cap {runtime.format_seconds((self.cap - stream.made) / rate)}"
        print(line, flush=True)
        return False


def draws_to_balance(counts, histogram, made, quota):
    """Expected further draws until every class holds `quota`: the slowest class's remaining quota
    over its share of the draws so far (inf for a class not drawn yet)."""
    missing = (quota - counts).clamp(min=0).double()
    share = histogram.double() / max(made, 1)
    need = torch.where(missing > 0, missing / share, torch.zeros_like(missing))
    return float(need.max())


def cache_name(args, spec, teacher_sha, quota, device):
    """The file of a composition in the cache: everything that decides its draws and labels."""
    return (
        f"{args.dataset}-{spec}-seed{args.seed}-draws{args.draw_batch}-{device.type}"
        f"-teacher{teacher_sha[:16]}-quota{quota}.pt"
    )


def find_in_cache(folder, name, quota):
    """(path, state) of the cached stream to read: the one of this quota, or a stream of a larger
    quota that has already filled this one (its first `quota` per class are this quota's set).
    (path, None) when none."""
    path = os.path.join(folder, name)
    if os.path.isfile(path):
        return path, read_cached_stream(path)
    stem = name.rsplit("-quota", 1)[0]
    for other in sorted(glob.glob(os.path.join(folder, glob.escape(stem) + "-quota*.pt"))):
        state = read_cached_stream(other)
        if state["complete"] or bool((state["counts"] >= quota).all()):
            if int(other.rsplit("-quota", 1)[1][:-3]) > quota:
                return other, state
    return path, None


def read_cached_stream(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"the composition cache {path} cannot be read ({type(e).__name__}) — delete it to "
            f"compose that set again from the first draw"
        ) from None


def compose_cached(spec, kind, labeller, meta, quota, args, device, teacher_sha):
    """One balanced generated source through the composition cache (--compose-cache): continue its
    stream (saved every --save-minutes and at Ctrl-C), or reuse a finished one; a finished set is
    never redrawn. Returns (images, labels, draws, histogram of the draws, the cached state's screen
    counts, seconds)."""
    folder = composition_cache(args)
    path, state = find_in_cache(folder, cache_name(args, spec, teacher_sha, quota, device), quota)
    own = path.endswith(f"-quota{quota}.pt")
    # a cached stream is drawn in whole batches, so that a later run continues it exactly
    cap = (
        float("inf")
        if args.max_draws == "full"
        else -(-args.max_draws // args.draw_batch) * args.draw_batch
    )
    if state is not None and (not own or state["complete"] or state["made"] >= cap):
        images, labels, draws, hist = stream_prefix(
            state, None if own else quota, None if cap == float("inf") else cap
        )
        print(
            f"  {spec}: read from the composition cache {path} ({state['made']:,} draws"
            f"{'' if own else f', quota {quota} of its larger quota'})",
            flush=True,
        )
        return images.to(device), labels.to(device), draws, hist, state["screen"], state["seconds"]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    stream = NoiseStream(generator, meta["num_classes"])
    if state is not None:
        stream.load_state_dict(state)
        print(
            f"  {spec}: continuing the composition cached in {path} from {stream.made:,} draws",
            flush=True,
        )
    shape = (meta["channels"], meta["size"], meta["size"])
    progress = Progress(spec, cap, quota, balanced=True)
    saved, deadline = [time.time()], time.time() + 60 * (args.max_minutes or float("inf"))

    def save():  # every process draws the same stream; one writes it. Returns what was saved.
        state = stream.state_dict()
        if runtime.is_main():
            models.atomic_save(state, path)
        saved[0] = time.time()
        return state

    def on_batch(stream):
        progress(stream)
        if time.time() - saved[0] > 60 * args.save_minutes:
            save()
        return time.time() > deadline

    try:
        compose_generated(
            stream,
            lambda: draw_noise(args.draw_batch, shape, kind, generator, meta["mean"], meta["std"]),
            labeller,
            quota,
            cap,
            balanced=True,
            on_batch=on_batch,
        )
    except KeyboardInterrupt:
        save()
        print(
            f"\nthe composition so far ({stream.made:,} draws) is saved in {path}: the same "
            f"command continues it",
            flush=True,
        )
        raise
    state = save()  # the finished (or capped) stream, gathered once for the file and for the run
    return (
        state["images"].to(device),
        state["labels"].to(device),
        stream.made,
        stream.histogram(),
        state["screen"],
        stream.seconds,
    )


def compose_transfer_set(teacher, args, device, teacher_sha=None):
    """The transfer set D-bar: Algorithm 1 over args.source in order (balanced) or a random
    composition of N samples (unbalanced). teacher_sha: the teacher file's sha256, which keys the
    composition cache (no cache without it). Returns (uint8 images, teacher labels, report dict)."""
    meta = data.DATASETS[args.dataset]
    num_classes, shape = meta["num_classes"], (meta["channels"], meta["size"], meta["size"])
    n_total = args.transfer_size
    quota = n_total // num_classes  # N/C of Algorithm 1
    labeller = Labeller(
        teacher, meta["mean"], meta["std"], args.draw_batch, screen=args.screen == "bf16"
    )
    specs = [s.strip() for s in args.source.split(",") if s.strip()]
    cached = (
        teacher_sha is not None
        and args.balanced
        and args.compose_cache != "off"
        and len(specs) == 1
        and data.parse_source(specs[0])[0] in NOISE_SOURCES
        and data.parse_source(specs[0])[1] is None
    )
    counts = torch.zeros(num_classes, dtype=torch.int64, device=device)
    raw_hist = torch.zeros_like(counts)
    parts_x, parts_y, per_source, screen, seconds = [], [], [], None, 0.0
    for i, spec in enumerate(specs):  # line 3
        if args.balanced and bool((counts >= quota).all()):  # line 13: later sources are not needed
            per_source.append({"source": spec, "examined": 0, "kept": 0})
            continue
        name, count = data.parse_source(spec)
        if name in NOISE_SOURCES and cached:
            x, y, examined, hist, screen, seconds = compose_cached(
                spec, NOISE_SOURCES[name], labeller, meta, quota, args, device, teacher_sha
            )
            counts = torch.bincount(y, minlength=num_classes)
        elif name in NOISE_SOURCES:
            # DEVIATION: at most --max-draws draws (and --max-minutes) per generated source by
            # default, then we train on what was found — the paper draws until balanced (--max-draws
            # full).
            draws = count or (args.max_draws if args.balanced else n_total)
            draws = float("inf") if draws == "full" else draws
            generator = torch.Generator(device=device).manual_seed(args.seed + i)
            stream = NoiseStream(generator, num_classes)
            stream.counts = counts
            deadline = time.time() + 60 * (args.max_minutes or float("inf"))
            progress = Progress(spec, draws, quota if args.balanced else n_total, args.balanced)
            compose_generated(
                stream,
                lambda: draw_noise(
                    args.draw_batch,
                    shape,
                    NOISE_SOURCES[name],
                    generator,
                    meta["mean"],
                    meta["std"],
                ),
                labeller,
                quota,
                draws,
                args.balanced,
                on_batch=lambda s: progress(s) or time.time() > deadline,
            )
            state = stream.state_dict()
            x, y, examined, hist = (
                state["images"].to(device),
                state["labels"].to(device),
                stream.made,
                stream.histogram(),
            )
            counts, screen, seconds = stream.counts, state["screen"], stream.seconds
        else:
            x = data.load_source(spec, "train", args.data_root, shape[0], shape[1], args.seed + i)[
                0
            ].to(device)
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed + i))
            x = x[order.to(device)]  # line 5: sample x_k from D_i at random
            y = labeller.exact(x)
            examined, hist = len(x), torch.bincount(y, minlength=num_classes)
            if args.balanced:
                keep, counts = class_fill(
                    y, counts, quota
                )  # lines 4-12, vectorised as in balanced_indices
                x, y = x[keep], y[keep]
        raw_hist += hist.to(device)
        parts_x.append(x)
        parts_y.append(y)
        per_source.append({"source": spec, "examined": examined, "kept": len(x)})
    images, labels = torch.cat(parts_x), torch.cat(parts_y)
    if (
        not args.balanced and len(images) > n_total
    ):  # random composition of N from the pooled sources
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[
            :n_total
        ].to(device)
        images, labels = images[pick], labels[pick]
        for s in per_source:
            s["kept"] = None  # a random subset of the pool: per-source counts are not tracked
    histogram = torch.bincount(labels, minlength=num_classes).tolist()
    short = {c: quota - h for c, h in enumerate(histogram) if h < quota}
    report = {
        "transfer_size": len(images),
        "quota": quota,
        "histogram": histogram,
        "draws": sum(
            s["examined"] for s in per_source if data.parse_source(s["source"])[0] in NOISE_SOURCES
        ),
        "raw_histogram": raw_hist.tolist(),
        "per_source": per_source,
        "short": short,
        "screen": screen,
        "draw_seconds": round(seconds, 1),
        "teacher_sha256": teacher_sha,
    }
    return images, labels, report


#### Training ####


def train(args, teacher, student, transfer_x, transfer_logits, test, log):
    """Line 15 of Algorithm 1: distil on the composed transfer set for args.epochs epochs."""
    meta, device = data.DATASETS[args.dataset], transfer_x.device
    n = len(transfer_x)
    per_epoch = args.epoch_images or n
    cycled = torch.arange(n).repeat(
        -(-per_epoch // n)
    )  # --epoch-images: the set repeated, shuffled each epoch
    loader = data.DeviceLoader(
        transfer_x,
        *transfer_logits,
        batch_size=args.batch_size,
        shuffle=True,
        mean=(0.0,) * meta["channels"],
        std=(1.0,) * meta["channels"],  # x in [0, 1]
        device=device,
        seed=args.seed,
        indices=cycled,
        rank=runtime.rank(),
        world_size=runtime.world_size(),
    )
    steps = -(-per_epoch // args.batch_size)
    aug_gen = torch.Generator(device=device).manual_seed(runtime.rank_seed(args.seed + 2))
    mean = torch.tensor(meta["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], device=device).view(1, -1, 1, 1)

    def normalize(v):
        return (v - mean) / std

    opt = runtime.make_optimizer(student.parameters(), args)
    lr_schedule = torch.optim.lr_scheduler.MultiStepLR(opt, args.milestones, gamma=0.1)  # lr / 10
    training = runtime.Training(
        log,
        args.epochs,
        save={"student": student, "opt": opt},
        rngs={"aug": aug_gen, "loader": loader},
        lr_schedule=lr_schedule,
    )
    trained = runtime.distribute(student)
    for epoch in training.epochs():
        for x, *cached in itertools.islice(loader, steps):
            training.record(
                len(x),
                **kd_step(
                    trained,
                    teacher,
                    x,
                    cached[0] if cached else None,
                    opt,
                    aug_gen,
                    normalize,
                    tau=args.temperature,
                    augmentation=args.augment,
                    aug_labels=args.aug_labels,
                ),
            )
        training.end_epoch(test_acc=runtime.evaluate(student, *test, meta["mean"], meta["std"]))


def print_composition(report, class_names):
    print(
        f"transfer set: {report['transfer_size']} images, quota N/C = {report['quota']}, "
        f"{report['draws']} noise draws; per source: {report['per_source']}",
        flush=True,
    )
    for c, (h, raw) in enumerate(zip(report["histogram"], report["raw_histogram"])):
        name = class_names[c] if class_names else str(c)
        note = f"  SHORT by {report['short'][c]}" if c in report["short"] else ""
        print(
            f"  class {c:3d} {name:>12s}: kept {h:6d} (teacher labelled {raw:8d} of all "
            f"examined){note}",
            flush=True,
        )
    if report["short"]:
        print(
            "short of their quota: "
            + ", ".join(
                f"{class_names[c] if class_names else c} by {s} ({100 * s / report['quota']:.0f}%)"
                for c, s in report["short"].items()
            ),
            flush=True,
        )


def check_composition(report, args, class_names):
    """Refuse a transfer set that cannot be trained on (empty) or that --strict does not accept."""
    if not report["transfer_size"]:
        raise ValueError(
            f"the sources {args.source!r} gave no transfer image at all — "
            f"add a source or more draws"
        )
    if args.strict is None:
        return
    low = [
        c for c, h in enumerate(report["histogram"]) if h == 0 or h < args.strict * report["quota"]
    ]
    if low:
        names = ", ".join(
            f"{class_names[c] if class_names else c} ({report['histogram'][c]})" for c in low
        )
        raise ValueError(
            f"--strict {args.strict}: classes below {args.strict:.0%} of the quota "
            f"{report['quota']} (or empty): {names} — raise --max-draws/--max-minutes or "
            f"add a source"
        )


def save_composition_pictures(images, labels, report, meta, log, per_class=10):
    """A grid of the composed set (a labelled row per teacher class: up to `per_class` random
    images, padded with white cells) and, with matplotlib, its histogram."""
    g = torch.Generator().manual_seed(0)
    labels = labels.cpu()
    blank = torch.full(tuple(images.shape[1:]), 255, dtype=torch.uint8)
    rows = []
    for c in range(meta["num_classes"]):
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)[:per_class]]
        rows += [images[i].cpu() for i in idx.tolist()] + [blank] * (per_class - len(idx))
    pictures.class_rows(
        torch.stack(rows),
        list(range(meta["num_classes"])),
        meta["classes"],
        log.path("transfer_set.png"),
        title="transfer set: row = the teacher's class (blank: no image)",
    )
    pictures.histogram_plot(
        report["histogram"],
        meta["classes"],
        log.path("transfer_histogram.png"),
        f"teacher-predicted classes of the transfer set (quota {report['quota']})",
    )


def run(args):
    args = resolve_settings(args)
    device = runtime.get_device(args.device)
    runtime.seed_everything(args.seed)
    meta = data.DATASETS[args.dataset]
    runtime.download_if_asked(args)
    teacher, teacher_ckpt = get_teacher(
        args, device
    )  # a --teacher that does not fit is refused before any data is read
    test_x, test_y = data.load_dataset(args.dataset, "test", args.data_root)
    log = runtime.RunLog(f"balanced_transfer-{args.dataset}", args, args.runs_dir)
    test = (test_x.to(device), test_y.to(device))
    teacher_acc = runtime.evaluate(teacher, *test, meta["mean"], meta["std"])
    print(f"teacher {args.teacher_arch}: {teacher_acc:.2f}% test accuracy", flush=True)

    # The composed set is saved once in the run folder and read back by --resume: composing can take
    # minutes of teacher forwards, and on a GPU the teacher's argmax is not guaranteed to repeat bit
    # for bit.
    if log.state:
        try:  # damaged (a full disk, a copy cut short): one line, before any training
            saved = torch.load(log.path("transfer_set.pt"), map_location="cpu", weights_only=True)
            images, labels = saved["images"].to(device), saved["labels"].to(device)
            report, compose_s = saved["report"], saved["compose_s"]
        except Exception as e:
            raise ValueError(
                f"--resume {log.dir}: its transfer_set.pt cannot be read "
                f"({type(e).__name__}) — the composed set is damaged: start a new "
                f"run (it composes the set again)"
            ) from None
        print(f"transfer set read from {log.path('transfer_set.pt')}", flush=True)
    else:
        start = time.time()
        images, labels, report = compose_transfer_set(teacher, args, device, teacher_ckpt["sha256"])
        compose_s = time.time() - start
        if runtime.is_main():
            with runtime.reporting_write(log.path("transfer_set.pt"), log):
                models.atomic_save(
                    {
                        "images": images.cpu(),
                        "labels": labels.cpu(),
                        "report": report,
                        "compose_s": compose_s,
                    },
                    log.path("transfer_set.pt"),
                )
    print_composition(report, meta["classes"])
    print(f"composition took {runtime.format_seconds(compose_s)}", flush=True)
    check_composition(report, args, meta["classes"])
    if runtime.is_main():
        save_composition_pictures(images, labels, report, meta, log)

    # The composed images' teacher logits, computed once: the targets without augmentation or with
    # fixed labels.
    fixed = not args.augment or args.aug_labels == "fixed"
    transfer_logits = (
        [runtime.predict(teacher, images, meta["mean"], meta["std"], args.draw_batch)]
        if fixed
        else []
    )
    student = runtime.prepare_model(
        models.build_model(args.student_arch, meta["num_classes"], meta["channels"]), device
    )
    train(args, teacher, student, images, transfer_logits, test, log)

    last = log.last_record
    path = log.path("student.pt")
    if runtime.is_main():
        with runtime.reporting_write(path, log):
            models.save_checkpoint(
                path,
                student,
                args.student_arch,
                meta["num_classes"],
                meta["channels"],
                args,
                last["test_acc"],
                dataset=args.dataset,
                image_size=meta["size"],
            )
    print(f"saved student to {path}", flush=True)
    return log.finish(
        "balanced_transfer",
        args.dataset,
        {
            "teacher_acc": teacher_acc,
            "student_acc": last["test_acc"],
            "balanced": args.balanced,
            "augment": args.augment,
            "aug_labels": args.aug_labels,
            "source": args.source,
            **report,
            "trained_histogram": last["teacher_hist"],
            "images_seen": sum(last["teacher_hist"]) * args.epochs,
            "epoch_images": args.epoch_images or report["transfer_size"],
            "compose_s": round(compose_s, 1),
            "student_checkpoint": path,
        },
    )


def main(argv=None):
    runtime.cli(run, build_parser(), "balanced_transfer.py", argv)


if __name__ == "__main__":
    main()
