"""HiDFD: Hybrid Data-Free Knowledge Distillation (Tang, Chen, Gong, AAAI 2025).

A teacher's training data is unavailable; only a *small* collected set D_c (rho * |D_o| web images)
is. Module 1 trains a class-conditional ADCGAN on D_c, guided by the frozen teacher: teacher
features are blended into (Eq. 8) and transferred to (Eq. 9) the discriminator's feature head
against overfitting, and a class-frequency regulariser (Eqs. 10-12) balances the classes the teacher
sees in the generated samples. Module 2 generates |D_s| synthetic images, repeats D_c
N = floor(|D_s| / |D_c|) times and trains the student to match the teacher's features (Eq. 14)
through the teacher's frozen, shared classifier.

    python hidfd.py --gan-epochs 20 --epochs 5 --g-lr 1e-3 --d-lr 1e-3 --gan-width 16
                                                    # Fashion-MNIST, ~5 min, ~78%
    python hidfd.py --dataset cifar10 --rho 0.1     # ResNet34 -> ResNet18, ImageNet 32x32
                                                    # collection (paper: 94.74%)
    python hidfd.py --stage gan ...                 # module 1 only (writes the generator);
                                                    # --stage distill: module 2

The labels of D_c are the teacher's argmax; no ground-truth label is used anywhere. The generator
outputs tanh images in [-1, 1] (what the discriminator sees); the teacher sees them mapped to [0, 1]
and normalised with its own dataset's mean/std, exactly like stored uint8 images. The first command
trains on 6,000 images of `fashionmnist-web` (teacher 90.26%), with the learning rates under which a
small GAN learns its labels on a CPU budget; measured runs: docs/hidfd.md.
"""

import copy
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

import data
import models
import pictures
import runtime
from teacher import get_teacher

#### Settings: the paper's defaults per dataset family ####
# (every value is also a CLI flag; --help shows them)
# cifar: Sec. "Implementation Details" (student SGD 0.05, 240 epochs, /10 at 150/180/210; GAN 500
#        epochs) and the authors' code (GAN batch 100, 50,000 synthetic images).
# mnist: LeNet5 -> LeNet5-half with the MNIST-family student recipe (Adam 1e-3, 40 epochs); a
#        smaller GAN.
# synthetic: tiny settings so that the end-to-end tests take seconds.
SETTINGS = {
    "cifar": dict(
        teacher_arch="resnet34",
        student_arch="resnet18",
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        epochs=240,
        milestones=(150, 180, 210),
        batch_size=128,
        n_synthetic=50000,
        gan_epochs=500,
        gan_batch_size=100,
        gan_width=128,
        z_dim=128,
        sample_every=10,
    ),
    "mnist": dict(
        teacher_arch="lenet5",
        student_arch="lenet5_half",
        optimizer="adam",
        lr=1e-3,
        momentum=0.0,
        weight_decay=0.0,
        epochs=40,
        milestones=(),
        batch_size=256,
        n_synthetic=50000,
        gan_epochs=100,
        gan_batch_size=100,
        gan_width=64,
        z_dim=64,
        sample_every=5,
    ),
    "synthetic": dict(
        teacher_arch="lenet5",
        student_arch="lenet5_half",
        optimizer="adam",
        lr=2e-3,
        momentum=0.0,
        weight_decay=0.0,
        epochs=2,
        milestones=(),
        batch_size=128,
        n_synthetic=500,
        gan_epochs=2,
        gan_batch_size=50,
        gan_width=16,
        z_dim=32,
        sample_every=1,
    ),
}
# The web source D_c is drawn from, per dataset (Sec. "Collected Datasets": ImageNet for CIFAR and
# CINIC, WebVision for TinyImageNet, here ImageNet 64x64). The MNIST family is not in the paper;
# Fashion-MNIST and KMNIST default to the offline shifted proxies of data.py (NAMED_MIXES).
COLLECTED = {
    "mnist": "svhn",
    "fashionmnist": "fashionmnist-web",
    "kmnist": "kmnist-web",
    "cifar10": "imagenet32",
    "cifar100": "imagenet32",
    "cinic10": "imagenet32",
    "tinyimagenet": "imagenet64",
    "synthetic": "shifted:synthetic",
}


def build_parser():
    parser = runtime.method_parser(
        "HiDFD (AAAI 2025): teacher-guided ADCGAN on a small collection, then hybrid distillation.",
        SETTINGS,
        seed="D_c's draw, the GAN, D_s and the student",
        notes={
            "teacher_arch": "Table 1",
            "student_arch": "Table 1",
            "epochs": "student (Sec. 'Implementation Details')",
            "batch_size": "student",
            "checkpoint_dir": "the default generator path",
            "resume": "the GAN stage or the distill stage",
        },
    )
    p = parser.add_argument_group("HiDFD (Sec. 'Implementation Details', Eqs. 1 and 8-14)")
    p.add_argument(
        "--collected",
        default=None,
        help="web source of D_c, any data.py source list; default per "
        "dataset: " + ", ".join(f"{k} {v}" for k, v in COLLECTED.items()),
    )
    p.add_argument(
        "--rho",
        type=float,
        default=0.1,
        help="|D_c| = rho * |D_o| (Sec. Collected Datasets: 0.1, 1.0)",
    )
    p.add_argument(
        "--stage",
        default="all",
        choices=["gan", "distill", "all"],
        help="Algorithm A-1: module 1 (gan), module 2 (distill) or both",
    )
    p.add_argument(
        "--generator",
        default=None,
        help="generator checkpoint written by stage gan and read by stage distill (default: "
        "<checkpoint-dir>/hidfd-generator-<dataset>-<teacher-arch>-seed<seed>.pt)",
    )
    # Teacher-guided generation (Eqs. 1, 8-13)
    p.add_argument(
        "--gan-epochs",
        type=int,
        default=None,
        help="passes over D_c (paper: 500); " + runtime.family_default(SETTINGS, "gan_epochs"),
    )
    p.add_argument(
        "--gan-batch-size",
        type=int,
        default=None,
        help="real and fake batch size (authors: 100); "
        + runtime.family_default(SETTINGS, "gan_batch_size"),
    )
    p.add_argument(
        "--g-lr",
        type=float,
        default=1e-4,
        help="generator Adam lr (Sec. Implementation Details: 1e-4; authors' code 2e-4)",
    )
    p.add_argument(
        "--d-lr",
        type=float,
        default=4e-4,
        help="discriminator Adam lr (Sec. Implementation Details: 4e-4; authors' code 2e-4)",
    )
    p.add_argument(
        "--betas", type=float, nargs=2, default=(0.0, 0.999), help="GAN Adam betas (authors' code)"
    )
    p.add_argument(
        "--gan-loss",
        default="standard",
        choices=["standard", "hinge"],
        help="L_d / L_g of Eq. (1): "
        "standard GAN (non-saturating for G) as printed, or hinge as in the authors' code",
    )
    p.add_argument(
        "--lambda-d", type=float, default=0.1, help="weight of L_blend + L_trans in L_D, Eq. (13)"
    )
    p.add_argument("--lambda-g", type=float, default=0.1, help="weight of L_reg in L_G, Eq. (13)")
    p.add_argument(
        "--q", type=float, default=0.7, help="the q of Eq. (8)'s indicator I(p > q), p ~ U[0, 1]"
    )
    p.add_argument(
        "--blend-reading",
        default="equation",
        choices=["equation", "text"],
        help="Eq. (8) applies L_blend when p > q, i.e. with probability 1 - q (equation); the "
        "text says 'with a probability of q' (text)",
    )
    p.add_argument(
        "--reg-weights",
        default="paper",
        choices=["paper", "normalised"],
        help="Eq. (12)'s weights "
        "1/nhat_c, which average C (paper), or 1/(C nhat_c), so lambda_g means the same at any C",
    )
    p.add_argument(
        "--gamma", type=float, default=0.5, help="EMA weight of the class frequencies, Eq. (10)"
    )
    p.add_argument(
        "--z-dim",
        type=int,
        default=None,
        help="generator noise size; " + runtime.family_default(SETTINGS, "z_dim"),
    )
    p.add_argument(
        "--gan-width",
        type=int,
        default=None,
        help="base channel width of G and D; " + runtime.family_default(SETTINGS, "gan_width"),
    )
    p.add_argument(
        "--sample-every",
        type=int,
        default=None,
        help="write a per-class sample grid every k GAN "
        "epochs; " + runtime.family_default(SETTINGS, "sample_every"),
    )
    # Student distillation (Eq. 14; Sec. Implementation Details)
    p.add_argument(
        "--n-synthetic",
        type=int,
        default=None,
        help="|D_s| generated for module 2 (authors: 50,000); "
        + runtime.family_default(SETTINGS, "n_synthetic"),
    )
    p.add_argument(
        "--no-synthetic",
        action="store_true",
        help="distil on the inflated D_c alone (collection-only "
        "comparison); N is still floor(n_synthetic / |D_c|)",
    )
    return parser


def generator_path(args):
    """--generator, or its default
    <checkpoint-dir>/hidfd-generator-<dataset>-<teacher-arch>-seed<seed>.pt."""
    return args.generator or os.path.join(
        args.checkpoint_dir,
        f"hidfd-generator-{args.dataset}-{args.teacher_arch}-seed{args.seed}.pt",
    )


def resolve_settings(args):
    """The run's settings: every flag left out takes its value from SETTINGS and COLLECTED (above),
    or from the saved config.json under --resume; then `check_settings`."""
    per_dataset = {"collected": COLLECTED}
    args = runtime.complete_args(args, build_parser(), "hidfd.py", SETTINGS, per_dataset)
    return check_settings(args)


def check_settings(args):
    """Refuse a bad value in one line, before any GAN epoch."""
    runtime.check_training_flags(args, SETTINGS, checkpoints=args.teacher is None)
    if args.stage != "distill" and not args.no_synthetic:  # the GAN stage writes the generator file
        runtime.check_writable_folder(
            "--generator" if args.generator else "--checkpoint-dir",
            os.path.dirname(os.path.abspath(generator_path(args))),
        )
    check = runtime.check_range  # Implementation Details, Eqs. (8)-(13): before any GAN epoch
    check("--rho", args.rho, 0, open_low=True, paper="0.1 and 1.0")
    check("--gan-epochs", args.gan_epochs, 1, paper="500")
    check("--gan-batch-size", args.gan_batch_size, 1, fix="the authors' code uses 100")
    check("--g-lr", args.g_lr, 0, open_low=True, paper="1e-4 (the authors' code 2e-4)")
    check("--d-lr", args.d_lr, 0, open_low=True, paper="4e-4 (the authors' code 2e-4)")
    check(
        "--betas",
        list(args.betas),
        0,
        1,
        open_high=True,
        fix="the authors' code uses 0 0.999 (Adam's beta1 beta2)",
    )
    check("--lambda-d", args.lambda_d, 0, paper="0.1 (it weighs L_blend + L_trans in Eq. (13))")
    check("--lambda-g", args.lambda_g, 0, paper="0.1 (it weighs L_reg in Eq. (13))")
    check("--q", args.q, 0, 1, paper="0.7 (Eq. (8)'s indicator I(p > q), p ~ U[0, 1])")
    check("--gamma", args.gamma, 0, 1, paper="0.5 (the EMA weight of Eq. (10))")
    check(
        "--z-dim",
        args.z_dim,
        1,
        fix="the authors' code uses 128; " + runtime.family_default(SETTINGS, "z_dim"),
    )
    check("--gan-width", args.gan_width, 1, fix=runtime.family_default(SETTINGS, "gan_width"))
    check(
        "--sample-every", args.sample_every, 1, fix=runtime.family_default(SETTINGS, "sample_every")
    )
    check("--n-synthetic", args.n_synthetic, 0, fix="the authors generate 50,000")
    if args.no_synthetic and args.stage == "gan":
        raise ValueError(
            "--stage gan trains the generator, which --no-synthetic never uses — drop one of them"
        )
    if args.n_synthetic == 0 and not args.no_synthetic and args.stage != "gan":
        raise ValueError(
            "--n-synthetic 0 leaves no synthetic image for module 2 — give --n-synthetic > 0, or "
            "--no-synthetic to distil on the collection alone"
        )
    return args


#### Losses and selection ####


def adc_discriminator_loss(
    adv_real, adv_fake, cls_real, cls_fake, y_real, y_fake, gan_loss="standard"
):
    """Eq. (1), discriminator side, as a loss to minimise. Returns (adversarial term -L_d,
    classifier term).

    adv_*: (B,) real/fake logits of N_D; cls_*: (B, 2C) logits of Psi_D, columns [0, C) are the
    "real" classes y+ and [C, 2C) the "fake" classes y-; y_*: (B,) class indices in [0, C).
    """
    num_classes = cls_real.shape[1] // 2
    if gan_loss == "hinge":  # authors' code
        adversarial = F.relu(1 - adv_real).mean() + F.relu(1 + adv_fake).mean()
    else:
        # L_d = E_P[log sigmoid(a)] + E_Q[log(1 - sigmoid(a))]; -log sigmoid(a) = softplus(-a)
        adversarial = F.softplus(-adv_real).mean() + F.softplus(adv_fake).mean()
    # Eq. (1)
    # DEVIATION: the printed L_adc_d adds +E_P[log Psi(y+|x)] + E_Q[log Psi(y-|x)] to a quantity
    # that is minimised; we minimise their negatives (cross-entropies), i.e. the classifier
    # *maximises* them, as the appendix's optimal-classifier proof and ADCGAN (Hou et al. 2022)
    # state.
    classifier = F.cross_entropy(cls_real, y_real) + F.cross_entropy(cls_fake, y_fake + num_classes)
    return adversarial, classifier


def adc_generator_loss(adv_fake, cls_fake, y_fake, gan_loss="standard"):
    """Eq. (1), generator side, as a loss to minimise. Returns (adversarial term L_g, classifier
    term)."""
    num_classes = cls_fake.shape[1] // 2
    if gan_loss == "hinge":
        adversarial = -adv_fake.mean()
    else:
        # DEVIATION: non-saturating -E_Q[log sigmoid(a)] instead of the printed
        # E_Q[log(1 - sigmoid(a))], whose gradient vanishes when D wins (the paper's own Eq. (6));
        # the usual GAN practice.
        adversarial = F.softplus(-adv_fake).mean()
    # Eq. (1): -E_Q[log Psi(y+|x)] + E_Q[log Psi(y-|x)] (sign as printed: G moves samples to
    # "real, class y")
    classifier = F.cross_entropy(cls_fake, y_fake) - F.cross_entropy(cls_fake, y_fake + num_classes)
    return adversarial, classifier


def blend_indicator(p, q, reading="equation"):
    """Eq. (8)'s I(p > q) for p ~ U[0, 1] (a tensor): 1.0 when L_blend applies. reading="text"
    applies it when p < q instead, i.e. with probability q, as the sentence under Eq. (8) says."""
    # DEVIATION (open reading, --blend-reading): the equation's I(p > q) is on with probability
    # 1 - q = 0.3; the text says "applied with a probability of q" (0.7). The equation is the
    # default.
    return (p > q).float() if reading == "equation" else (p < q).float()


def blend_loss(t_real, t_fake, d_real, d_fake):
    """Eq. (8) without the indicator: E[||Phi_T(x) - Phi_D(x^)||_2 + ||Phi_T(x^) - Phi_D(x)||_2].
    All (B, D)."""
    # Eq. (8)
    return ((t_real - d_fake).norm(dim=1) + (t_fake - d_real).norm(dim=1)).mean()


def trans_loss(t_real, t_fake, d_real, d_fake):
    """Eq. (9): E[||Phi_T(x) - Phi_D(x)||_2 + ||Phi_T(x^) - Phi_D(x^)||_2]. All (B, D)."""
    # Eq. (9)
    return ((t_real - d_real).norm(dim=1) + (t_fake - d_fake).norm(dim=1)).mean()


def update_class_frequency(n_prev, counts, gamma):
    """Eq. (10): n^t = (1 - gamma) n^{t-1} + gamma * nbar^{t-1}; counts nbar = teacher-argmax
    histogram (C,)."""
    # Eq. (10)
    return (1 - gamma) * n_prev + gamma * counts.to(n_prev.dtype)


def reg_loss(teacher_logits_fake, class_freq, min_share=0.1, weights="paper"):
    """Eqs. (11)-(12): sum_c p_T^c log(p_T^c) / nhat_c, p_T = batch-mean teacher softmax
    (B, C) -> (C,). weights="normalised" divides by C: the weights 1/nhat_c average C, so the
    paper's lambda_g acts C times stronger at C classes."""
    p_t = teacher_logits_fake.float().softmax(dim=1).mean(dim=0)  # (C,)
    # Eq. (11)
    # DEVIATION: nhat is floored at min_share / C (a tenth of the uniform share) — a class the
    # generator never hits decays geometrically under Eq. (10) (x0.5 per iteration), so 1/nhat would
    # grow without bound and overflow within ~150 iterations; the floor caps a missing class's
    # weight at 10x a balanced class's.
    n_hat = (class_freq / class_freq.sum()).clamp_min(min_share / len(class_freq))
    # Eq. (12)
    loss = (p_t * p_t.clamp_min(1e-12).log() / n_hat).sum()
    # DEVIATION (opt-in, --reg-weights normalised): the same loss divided by C.
    return loss / len(class_freq) if weights == "normalised" else loss


def inflation_factor(n_collected, n_synthetic):
    """Sec. Student Distillation: N = floor(|D_s| / |D_c|), at least 1 (D_c is always used once)."""
    return max(1, n_synthetic // n_collected)


def align_loss(feat_s, feat_t):
    """Eq. (14): E_x ||Phi_S(x) - Phi_T(x)||_2 over the batch; feat_* (B, D)."""
    # Eq. (14)
    return (feat_s - feat_t).norm(dim=1).mean()


#### Networks ####


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose per-channel gain and bias are looked up from the class label
    (BigGAN-style)."""

    def __init__(self, channels, num_classes):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x, y):
        return self.bn(x) * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


# DEVIATION: small SNGAN/DCGAN-style CNNs (conditional BN in G, spectral norm in D) instead of the
# authors' BigGAN ResNets — readable and trainable on a CPU; the paper does not specify the
# architecture.


class Generator(nn.Module):
    """N_G(z, y): noise + label -> image in [-1, 1] (B, channels, size, size); size 32 or 64.

    4x4 seed, then log2(size) - 2 blocks of (conditional BN, ReLU, 2x nearest upsample, 3x3 conv),
    halving the width each time down to `width`.
    """

    def __init__(self, num_classes, channels, size, z_dim=128, width=64):
        super().__init__()
        if size not in (32, 64):
            raise ValueError(f"the HiDFD generator makes 32x32 or 64x64 images, not {size}x{size}")
        self.num_classes, self.channels, self.size, self.z_dim, self.width = (
            num_classes,
            channels,
            size,
            z_dim,
            width,
        )
        n_up = int(math.log2(size)) - 2
        widths = [
            width * 2 ** max(n_up - 1 - i, 0) for i in range(n_up + 1)
        ]  # 32x32: [4w, 2w, w, w]
        self.fc = nn.Linear(z_dim, 4 * 4 * widths[0])
        self.norms = nn.ModuleList(ConditionalBatchNorm2d(c, num_classes) for c in widths[:-1])
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout, 3, padding=1) for cin, cout in zip(widths[:-1], widths[1:])
        )
        self.out_norm = ConditionalBatchNorm2d(widths[-1], num_classes)
        self.out = nn.Conv2d(widths[-1], channels, 3, padding=1)
        self.seed_width = widths[0]

    def forward(self, z, y):
        h = self.fc(z).view(len(z), self.seed_width, 4, 4)  # (B, W0, 4, 4)
        for norm, conv in zip(self.norms, self.convs):
            h = conv(F.interpolate(F.relu(norm(h, y)), scale_factor=2))  # (B, W_i, 2H, 2W)
        return torch.tanh(self.out(F.relu(self.out_norm(h, y))))  # (B, channels, size, size)


class Discriminator(nn.Module):
    """N_D with ADCGAN's classifier Psi_D and a feature head Phi_D, all spectrally normalised.

    Shared extractor: 3x3 conv, then log2(size) - 2 downsamplings (4x4 stride-2 conv + 3x3 conv,
    LeakyReLU), global sum pooling to h (B, 4w). Heads on h: adversarial logit (B,), 2C class logits
    (B, 2C), and a 2-layer MLP to the teacher's feature size (B, feat_dim) for Eqs. (8)-(9)
    (authors: 256 -> 1024 -> 512).
    """

    def __init__(self, num_classes, channels, size, feat_dim, width=64):
        super().__init__()
        if size not in (32, 64):
            raise ValueError(
                f"the HiDFD discriminator takes 32x32 or 64x64 images, not {size}x{size}"
            )
        n_down = int(math.log2(size)) - 2
        layers, c = (
            [spectral_norm(nn.Conv2d(channels, width, 3, padding=1)), nn.LeakyReLU(0.1)],
            width,
        )
        for i in range(n_down):
            c_out = width * 2 ** min(i + 1, 2)
            layers += [
                spectral_norm(nn.Conv2d(c, c, 4, stride=2, padding=1)),
                nn.LeakyReLU(0.1),
                spectral_norm(nn.Conv2d(c, c_out, 3, padding=1)),
                nn.LeakyReLU(0.1),
            ]
            c = c_out
        self.body = nn.Sequential(*layers)
        self.adv = spectral_norm(nn.Linear(c, 1))
        self.cls = spectral_norm(nn.Linear(c, 2 * num_classes))
        # DEVIATION: Phi_D of Eqs. (8)-(9) is a feature head on the shared extractor (as in the
        # authors' code), sized to the teacher's features; Eq. (1) writes Phi_D for the extractor
        # under Psi_D itself, whose size (4w) need not match the teacher's.
        self.feat_head = nn.Sequential(
            spectral_norm(nn.Linear(c, 4 * c)),
            nn.LeakyReLU(0.1),
            spectral_norm(nn.Linear(4 * c, feat_dim)),
        )

    def forward(self, x):
        h = self.body(x).sum(dim=(2, 3))  # (B, 4w)
        return (
            self.adv(h).squeeze(1),
            self.cls(h),
            self.feat_head(h),
        )  # (B,), (B, 2C), (B, feat_dim)


class GanRangeTeacher(nn.Module):
    """The frozen teacher N_T seeing generator-range images ([-1, 1]) as its own normalised input:
    x -> ((x + 1) / 2 - mean) / std, then the teacher's features / logits."""

    def __init__(self, teacher, mean, std):
        super().__init__()
        self.teacher = teacher
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def normalise(self, x):
        return (to_unit_range(x) - self.mean) / self.std

    def features(self, x):
        return self.teacher.features(self.normalise(x))

    def forward(self, x):
        return self.teacher(self.normalise(x))


class ClassFrequency(nn.Module):
    """n^t of Eq. (10): the running count of generated samples per teacher class (a buffer, so it is
    saved and restored with the run). n^0 is a constant: the uniform share of one batch."""

    def __init__(self, num_classes, batch_size, gamma):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("n", torch.full((num_classes,), batch_size / num_classes))

    def update(self, counts):
        # Eq. (10)
        self.n = update_class_frequency(self.n, counts, self.gamma)


class SharedClassifierStudent(nn.Module):
    """N_S(x) = g_T(phi_S(x)) (Sec. Student Distillation): the student's feature extractor, a
    connector to the teacher's feature size, and the teacher's classifier g_T, shared: a frozen copy
    that training never updates.

    Exposes the models.py interface (features, classifier, feat_dim), so runtime.predict/evaluate
    work on it; `folded()` is the plain student network whose own classifier is g_T o connector
    (identical logits).
    """

    def __init__(self, backbone, teacher_classifier):
        super().__init__()
        self.backbone = backbone
        self.backbone.classifier.requires_grad_(False)  # unused in training; `folded` overwrites it
        self.feat_dim = teacher_classifier.in_features
        # DEVIATION: a learnable linear connector (part of phi_S) when the feature sizes differ
        # (lenet5_half 42-d -> lenet5 84-d); the paper's pairs have equal sizes, the authors' code
        # uses a conv connector.
        self.connector = (
            nn.Identity()
            if backbone.feat_dim == self.feat_dim
            else nn.Linear(backbone.feat_dim, self.feat_dim)
        )
        # DEVIATION: He initialisation of the backbone and the connector (the paper does not say).
        # With PyTorch's default initialisation the connector's output barely varies across images,
        # L_wfa first fits the mean teacher feature, and g_T calls every test image one class after
        # the first epoch (10%).
        models.he_init(self.backbone)
        models.he_init(self.connector)
        self.classifier = copy.deepcopy(teacher_classifier).requires_grad_(False)

    def features(self, x):
        return self.connector(self.backbone.features(x))

    def forward(self, x):
        return self.classifier(self.features(x))

    @torch.no_grad()
    def folded(self):
        """A standalone copy of the backbone whose own classifier is classifier o connector (same
        logits)."""
        backbone = copy.deepcopy(self.backbone)
        weight, bias = self.classifier.weight, self.classifier.bias
        if isinstance(self.connector, nn.Linear):
            weight, bias = weight @ self.connector.weight, weight @ self.connector.bias + bias
        backbone.classifier.weight.copy_(weight)
        backbone.classifier.bias.copy_(bias)
        return backbone


#### One step of Algorithm A-1 ####
# Under torchrun a step gets the network it updates wrapped in DistributedDataParallel (D_trained,
# G_trained, trained: its backward averages the gradients over the processes, so that every process
# takes the same step) and the networks it only reads as they are (G in the discriminator step, D in
# the generator step, the teacher): their gradients are not averaged, their optimiser does not step.


def sample_noise_and_labels(n, num_classes, z_dim, noise):
    """Line 4: the noise-label pairs (z, y) of one batch, drawn from the `noise` generator."""
    y = torch.randint(0, num_classes, (n,), device=noise.device, generator=noise)
    return torch.randn(n, z_dim, device=noise.device, generator=noise), y


def discriminator_step(
    D_trained,
    G,
    teacher,
    x_real,
    y_real,
    t_real,
    opt_d,
    noise,
    *,
    z_dim,
    lambda_d,
    q,
    blend_reading="equation",
    gan_loss="standard",
):
    """Line 5: one update of N_D with L_D = L_adc_d + lambda_d (I(p > q) L_blend + L_trans),
    Eq. (13). x_real (B, C, H, W) in [-1, 1], y_real (B,) teacher labels, t_real (B, D_T) teacher
    features of D_c; teacher: GanRangeTeacher; noise: the generator of z, y and p. blend_reading:
    "equation" or "text" (blend_indicator); gan_loss: "standard" or "hinge"
    (adc_discriminator_loss). Returns the batch's terms."""
    b = len(x_real)
    z, y_fake = sample_noise_and_labels(b, G.num_classes, z_dim, noise)
    with torch.no_grad(), runtime.autocast(x_real.device):
        x_fake = G(z, y_fake)  # (B, C, H, W), no path to G
        t_fake = teacher.features(x_fake).float()  # (B, D_T) Phi_T(x^)
    with runtime.autocast(x_real.device):
        adv, cls, feat = D_trained(torch.cat([x_real, x_fake]))  # real and fake in one pass
    (adv_r, adv_f), (cls_r, cls_f), (d_real, d_fake) = (
        t.float().split(b) for t in (adv, cls, feat)
    )
    adv_d, cls_d = adc_discriminator_loss(adv_r, adv_f, cls_r, cls_f, y_real, y_fake, gan_loss)
    blend, trans = (
        blend_loss(t_real, t_fake, d_real, d_fake),
        trans_loss(t_real, t_fake, d_real, d_fake),
    )
    p = torch.rand((), device=noise.device, generator=noise)
    blend_on = blend_indicator(p, q, blend_reading)  # I(p > q), Eq. (8)
    # Eq. (13)
    d_loss = adv_d + cls_d + lambda_d * (blend_on * blend + trans)
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    return {
        "d_loss": d_loss,
        "adv_d": adv_d,
        "cls_d": cls_d,
        "blend": blend,
        "trans": trans,
        "blend_on": blend_on,
    }


def generator_step(
    G_trained,
    D,
    teacher,
    class_freq,
    opt_g,
    n,
    noise,
    *,
    z_dim,
    lambda_g,
    reg_weights="paper",
    gan_loss="standard",
):
    """Lines 6-8: one update of N_G with L_G = L_adc_g + lambda_g L_reg, Eq. (13), then the class
    frequencies of Eq. (10) from the teacher's labels of this batch. Gradients reach G through D and
    the frozen teacher (whose parameters do not train). reg_weights: "paper" or "normalised"
    (reg_loss); gan_loss: "standard" or "hinge" (adc_generator_loss). Returns the batch's terms,
    with the teacher-label histogram of G's samples."""
    num_classes = class_freq.n.numel()
    z, y_fake = sample_noise_and_labels(n, num_classes, z_dim, noise)
    with runtime.autocast(noise.device):
        x_fake = G_trained(z, y_fake)
        adv_f, cls_f, _ = D(x_fake)
        t_logits = teacher(x_fake).float()  # (B, C) N_T(x^)
    adv_g, cls_g = adc_generator_loss(adv_f.float(), cls_f.float(), y_fake, gan_loss)
    reg = reg_loss(t_logits, class_freq.n, weights=reg_weights)
    # Eq. (13)
    g_loss = adv_g + cls_g + lambda_g * reg
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    predicted = t_logits.detach().argmax(1)
    counts = F.one_hot(predicted, num_classes).sum(0)  # bincount would sync with the host on a GPU
    # line 6, Eq. (10): this iteration's counts give n^{t+1} (under torchrun: of the whole batch,
    # all ranks)
    class_freq.update(runtime.all_reduce_sum(counts.clone()))
    return {
        "g_loss": g_loss,
        "adv_g": adv_g,
        "cls_g": cls_g,
        "reg": reg,
        "teacher_agree": (predicted == y_fake).float().mean() * 100,
        "teacher_hist": counts,
    }


def distill_step(trained, teacher, x, opt):
    """Lines 13-15: one update of N_S on a batch x (B, C, H, W) of the hybrid data, L_align of
    Eq. (14) through the shared classifier. trained: the student's (features, logits). Returns the
    batch's terms."""
    with torch.no_grad(), runtime.autocast(x.device):
        t_feat = teacher.features(x).float()  # (B, D_T) Phi_T(x)
    with runtime.autocast(x.device):
        s_feat, s_logits = trained(x)  # (B, D_T) after the connector
    loss = align_loss(s_feat.float(), t_feat)  # Eq. (14)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {
        "align": loss,
        "teacher_agree": (s_logits.argmax(1) == teacher.classifier(t_feat).argmax(1)).float().mean()
        * 100,
    }


#### Training ####


def train_gan(args, teacher, collected, log):
    """Module 1 (Algorithm A-1, lines 2-9): per batch of D_c, one discriminator step and one
    generator step. Returns the generator."""
    meta, bs = collected.meta, args.gan_batch_size
    device = collected.x.device
    if len(collected.x) < bs:
        raise ValueError(
            f"|D_c| = {len(collected.x)} is smaller than --gan-batch-size {bs} — raise --rho or "
            f"lower --gan-batch-size"
        )
    num_classes = meta["num_classes"]
    G = runtime.prepare_model(
        Generator(num_classes, meta["channels"], meta["size"], args.z_dim, args.gan_width), device
    )
    D = runtime.prepare_model(
        Discriminator(
            num_classes, meta["channels"], meta["size"], teacher.feat_dim, args.gan_width
        ),
        device,
    )
    gan_teacher = GanRangeTeacher(teacher, meta["mean"], meta["std"]).to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.g_lr, betas=tuple(args.betas))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.d_lr, betas=tuple(args.betas))
    class_freq = ClassFrequency(num_classes, bs, args.gamma).to(device)
    loader = collected.gan_batches(bs)
    noise = torch.Generator(device=device).manual_seed(
        runtime.rank_seed(args.seed + 2)
    )  # each rank its own
    d_step = dict(
        z_dim=args.z_dim,
        lambda_d=args.lambda_d,
        q=args.q,
        blend_reading=args.blend_reading,
        gan_loss=args.gan_loss,
    )
    g_step = dict(
        z_dim=args.z_dim,
        lambda_g=args.lambda_g,
        reg_weights=args.reg_weights,
        gan_loss=args.gan_loss,
    )
    probe = ConditioningProbe(args, collected, gan_teacher)
    training = runtime.Training(
        log,
        args.gan_epochs,
        stage="gan",
        what="GAN epoch",
        save={"G": G, "D": D, "opt_g": opt_g, "opt_d": opt_d, "class_freq": class_freq},
        rngs={"noise": noise, "loader": loader},
    )
    G_trained, D_trained = runtime.distribute(G), runtime.distribute(D)
    for epoch in training.epochs():
        for x_real, y_real, t_real in loader:  # (B, C, H, W), (B,), (B, D_T)
            terms = discriminator_step(
                D_trained, G, gan_teacher, x_real, y_real, t_real, opt_d, noise, **d_step
            )
            terms.update(
                generator_step(
                    G_trained, D, gan_teacher, class_freq, opt_g, len(x_real), noise, **g_step
                )
            )
            training.record(len(x_real), **terms)
        metrics = probe.measure(G, D)
        last = epoch + 1 == args.gan_epochs
        if ((epoch + 1) % args.sample_every == 0 or last) and runtime.is_main():
            save_sample_grid(
                G,
                meta,
                log.path(f"samples-gan-epoch{epoch + 1:03d}.png"),
                args.seed,
                f"GAN epoch {epoch + 1}: row = the class G is asked for",
            )
        training.end_epoch(**metrics)
    probe.warn_if_unconditioned()
    return G


class ConditioningProbe:
    """Whether G learns its labels, measured after every GAN epoch (no effect on training, no random
    draw): the teacher's agreement with y on a fixed set of (z, y) generated in eval mode (as
    module 2 generates), the teacher-class histogram of those samples, and D's classifier (its
    "real" columns) on held-out real images of the source (not in D_c) against the teacher's
    labels."""

    def __init__(self, args, collected, gan_teacher, n=1000):
        self.collected, self.teacher = collected, gan_teacher
        device, num_classes = collected.x.device, collected.meta["num_classes"]
        g = torch.Generator().manual_seed(args.seed + 5)
        self.z = torch.randn(n, args.z_dim, generator=g).to(device)
        self.y = (torch.arange(n) % num_classes).to(device)
        self.agreement = None

    @torch.no_grad()
    def measure(self, G, D):
        runtime.broadcast_buffers(G)
        was_training = G.training
        G.eval()
        with runtime.autocast(self.z.device):
            x = torch.cat(
                [
                    G(self.z[i : i + 500], self.y[i : i + 500]).float()
                    for i in range(0, len(self.z), 500)
                ]
            )
            predicted = self.teacher(x).float().argmax(1)
        G.train(was_training)
        self.agreement = (predicted == self.y).float().mean().item() * 100
        num_classes = self.collected.meta["num_classes"]
        report = {
            "probe_agree": self.agreement,
            "probe_hist": torch.bincount(predicted, minlength=num_classes).tolist(),
        }
        heldout_x, heldout_y = self.collected.heldout
        if len(heldout_x):
            with runtime.autocast(self.z.device):
                cls = D(heldout_x)[1].float()[:, :num_classes]
            report["d_heldout_acc"] = (cls.argmax(1) == heldout_y).float().mean().item() * 100
        return report

    def warn_if_unconditioned(self):
        chance = 100 / self.collected.meta["num_classes"]
        if self.agreement is not None and self.agreement < 2 * chance:
            print(
                f"warning: the teacher agrees with G's label on only {self.agreement:.1f}% of the "
                f"probe samples (chance {chance:.0f}%): the generator has not learnt class "
                f"conditioning — more GAN iterations or higher --g-lr/--d-lr help (docs/hidfd.md)",
                flush=True,
            )


class CollectedSet:
    """D_c on the device: a seeded random rho * |D_o| images of the web source, the teacher's labels
    (argmax) and features of each (`label_with`), and up to 1,000 held-out images of the source
    outside D_c (for the probe)."""

    def __init__(self, args, device):
        self.args, self.meta = args, data.DATASETS[args.dataset]
        images, _, source = data.load_source(
            args.collected,
            "train",
            args.data_root,
            self.meta["channels"],
            self.meta["size"],
            seed=args.seed,
        )
        n = int(round(args.rho * self.meta["train_size"]))
        if not 1 <= n <= len(images):
            raise ValueError(
                f"--rho {args.rho} asks for {n} collected images but {args.collected!r} has "
                f"{len(images)} — lower --rho or give a larger source"
            )
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
        keep, rest = order[:n], order[n : n + 1000]
        self.x, self.source, self.heldout_x = (
            images[keep].to(device),
            source[keep],
            images[rest].to(device),
        )

    def label_with(self, teacher):
        """The teacher's labels (argmax) and features of D_c, and its labels of the held-out
        images."""
        # DEVIATION: the labels y of D_c are the teacher's argmax (the paper trains the conditional
        # GAN on labelled D_c without saying where the labels come from; a data-free setting has
        # only the teacher's).
        logits, feats = runtime.predict(
            teacher, self.x, self.meta["mean"], self.meta["std"], features=True
        )
        self.y, self.t_feat = logits.argmax(1), feats.clone()
        self.hist = torch.bincount(self.y, minlength=self.meta["num_classes"]).tolist()
        heldout_y = runtime.predict(
            teacher, self.heldout_x, self.meta["mean"], self.meta["std"]
        ).argmax(1)
        half = (0.5,) * self.meta["channels"]  # uint8 -> [-1, 1], what D sees
        self.heldout = (data.normalize(self.heldout_x, half, half), heldout_y)
        print(
            f"D_c: {len(self.x)} images of {self.args.collected} (per source "
            f"{self.source.bincount().tolist()}); teacher-predicted classes {self.hist}; "
            f"{len(self.heldout_x)} held-out images for the probe",
            flush=True,
        )

    def gan_batches(self, batch_size):
        """(x in [-1, 1], teacher label, teacher feature) batches of D_c for module 1."""
        half = (0.5,) * self.meta["channels"]  # uint8 -> [-1, 1], the generator's range
        return data.DeviceLoader(
            self.x,
            self.y,
            self.t_feat,
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            mean=half,
            std=half,
            device=self.x.device,
            seed=self.args.seed,
            rank=runtime.rank(),
            world_size=runtime.world_size(),
        )


def distill(args, teacher, collected_x, synthetic_x, test, log, extra):
    """Module 2 (Algorithm A-1, lines 10-16): hybrid data D = N x D_c + D_s, L_align of Eq. (14).
    `extra`: saved with every epoch's state (what `run` needs to rebuild D_s and its results on
    --resume). Returns (the student, a dict describing the hybrid data)."""
    meta, device = data.DATASETS[args.dataset], test[0].device
    n_c, n_s = len(collected_x), len(synthetic_x)
    N = inflation_factor(n_c, args.n_synthetic)
    images = torch.cat([collected_x.to(device), synthetic_x.to(device)])
    indices = torch.cat(
        [torch.arange(n_c).repeat(N), n_c + torch.arange(n_s)]
    )  # line 11: inflation by repetition
    alpha = N * n_c / len(indices)
    print(
        f"hybrid data: {N} x {n_c} collected + {n_s} synthetic = {len(indices)} per epoch "
        f"(alpha {alpha:.3f})",
        flush=True,
    )
    loader = data.DeviceLoader(
        images,
        batch_size=args.batch_size,
        shuffle=True,
        crop_pad=meta["crop_pad"],
        flip=meta["flip"],
        mean=meta["mean"],
        std=meta["std"],
        device=device,
        seed=args.seed,
        indices=indices,
        rank=runtime.rank(),
        world_size=runtime.world_size(),
    )
    student = runtime.prepare_model(
        SharedClassifierStudent(
            models.build_model(args.student_arch, meta["num_classes"], meta["channels"]),
            teacher.classifier,
        ),
        device,
    )
    opt = runtime.make_optimizer([p for p in student.parameters() if p.requires_grad], args)
    lr_schedule = torch.optim.lr_scheduler.MultiStepLR(opt, args.milestones, gamma=0.1)  # lr / 10
    training = runtime.Training(
        log,
        args.epochs,
        stage="distill",
        what="distill epoch",
        save={"student": student, "opt": opt},
        rngs={"loader": loader},
        extra=extra,
        lr_schedule=lr_schedule,
    )
    trained = runtime.distribute(runtime.FeaturesAndLogits(student))
    for epoch in training.epochs():
        for (x,) in loader:
            training.record(len(x), **distill_step(trained, teacher, x, opt))
        training.end_epoch(test_acc=runtime.evaluate(student, *test, meta["mean"], meta["std"]))
    return student, {"inflation_factor": N, "hybrid_size": len(indices), "alpha": alpha}


#### Generation and checkpoints ####


def to_unit_range(x):
    """Generator/discriminator space [-1, 1] -> [0, 1] (what the teacher's normalisation
    expects)."""
    return (x + 1) / 2


def to_uint8(x):
    return (to_unit_range(x) * 255).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def generate(G, n, num_classes, z_dim, seed, device, batch_size=1000):
    """D_s (line 11): n images with balanced labels (y = i mod C), in eval mode, as uint8 so they
    share D_c's loader path."""
    was_training = G.training
    G.eval()
    gen = torch.Generator(device=device).manual_seed(seed + 3)
    labels = torch.arange(n, device=device) % num_classes
    images = torch.empty(n, G.channels, G.size, G.size, dtype=torch.uint8, device=device)
    for i in range(0, n, batch_size):
        y = labels[i : i + batch_size]
        with runtime.autocast(device):
            images[i : i + batch_size] = to_uint8(
                G(torch.randn(len(y), z_dim, device=device, generator=gen), y).float()
            )
    G.train(was_training)
    return images, labels


def save_sample_grid(G, meta, path, seed, title, per_class=10):
    """One labelled row per class (up to 10 classes): the images G makes when asked for that class,
    fixed noise."""
    classes = list(range(min(meta["num_classes"], 10)))
    device = next(G.parameters()).device
    y = torch.tensor(classes, device=device).repeat_interleave(per_class)
    z = torch.randn(len(y), G.z_dim, generator=torch.Generator().manual_seed(seed + 7)).to(device)
    was_training = G.training
    G.eval()
    with torch.no_grad():
        images = to_uint8(G(z, y).float())
    G.train(was_training)
    pictures.class_rows(images, classes, meta["classes"], path, title=title)


def save_generator(args, G, collected, probe_agree):
    models.save_checkpoint(
        generator_path(args),
        G,
        "hidfd-generator",
        G.num_classes,
        G.channels,
        args,
        None,
        image_size=G.size,
        z_dim=G.z_dim,
        width=G.width,
        dataset=args.dataset,
        collected=args.collected,
        rho=args.rho,
        n_collected=len(collected.x),
        probe_agree=probe_agree,
    )


def load_generator(path, meta, device):
    if not os.path.isfile(path):
        raise ValueError(
            f"no generator checkpoint at {path} — run --stage gan first or pass --generator PATH"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"generator {path} cannot be read ({type(e).__name__}) — the file is damaged; train it "
            f"again with --stage gan"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("arch") != "hidfd-generator":
        raise ValueError(
            f"{path} is not a HiDFD generator checkpoint — pass the file --stage gan wrote"
        )
    if (ckpt["num_classes"], ckpt["in_channels"], ckpt["image_size"]) != (
        meta["num_classes"],
        meta["channels"],
        meta["size"],
    ):
        raise ValueError(
            f"generator {path} makes {ckpt['num_classes']} classes of {ckpt['in_channels']}x"
            f"{ckpt['image_size']}^2 images; the teacher needs {meta['num_classes']} of "
            f"{meta['channels']}x{meta['size']}^2"
        )
    G = Generator(
        ckpt["num_classes"], ckpt["in_channels"], ckpt["image_size"], ckpt["z_dim"], ckpt["width"]
    )
    try:
        G.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError) as e:
        raise ValueError(
            f"generator {path} does not hold the weights its header describes ({str(e)[:100]}) — "
            f"train it again with --stage gan"
        ) from None
    print(
        f"loaded generator {path} (trained {ckpt['args'].get('gan_epochs')} GAN epochs on "
        f"{ckpt['args'].get('collected')}, rho {ckpt['args'].get('rho')})",
        flush=True,
    )
    return runtime.prepare_model(G, device), ckpt


GENERATOR_SETTINGS = (
    "dataset",
    "collected",
    "rho",
    "teacher_arch",
)  # what makes a generator this run's


def check_generator(args, meta):
    """--stage distill: the generator must exist, be readable and come from this run's setting. From
    another setting (collection, rho, teacher) it is refused at the default path, and used with a
    note when --generator names it."""
    path = generator_path(args)
    _, ckpt = load_generator(path, meta, torch.device("cpu"))
    trained = {k: ckpt.get(k, ckpt["args"].get(k)) for k in GENERATOR_SETTINGS}
    mismatch = {k: (v, getattr(args, k)) for k, v in trained.items() if v != getattr(args, k)}
    if not mismatch:
        return
    said = ", ".join(f"{k} {v!r} (this run: {now!r})" for k, (v, now) in mismatch.items())
    if args.generator is None:
        raise ValueError(
            f"the generator at {path} was trained with {said} — train one for this setting with "
            f"--stage gan, or pass --generator {path} to use it anyway"
        )
    print(f"note: --generator {path} was trained with {said}", flush=True)


def synthetic_set(args, G, teacher, meta, device):
    """D_s and what the teacher thinks of it: (uint8 images, {agreement with G's labels, teacher
    histogram})."""
    synthetic_x, synthetic_y = generate(
        G, args.n_synthetic, meta["num_classes"], G.z_dim, args.seed, device
    )
    predicted = runtime.predict(teacher, synthetic_x, meta["mean"], meta["std"]).argmax(1)
    info = {
        "synthetic_teacher_agree": (predicted == synthetic_y).float().mean().item() * 100,
        "synthetic_teacher_hist": torch.bincount(predicted, minlength=meta["num_classes"]).tolist(),
    }
    print(
        f"D_s: {len(synthetic_x)} images; teacher agrees with the conditioning label on "
        f"{info['synthetic_teacher_agree']:.1f}%; teacher-predicted classes "
        f"{info['synthetic_teacher_hist']}",
        flush=True,
    )
    return synthetic_x, info


def run(args):
    args = resolve_settings(args)
    device = runtime.get_device(args.device)
    runtime.seed_everything(args.seed)
    meta = data.DATASETS[args.dataset]
    runtime.download_if_asked(args)
    variant = "collected-only" if args.no_synthetic else "hidfd"
    # a --teacher that does not fit is refused before any data is read
    teacher, teacher_ckpt = get_teacher(args, device)
    if args.stage == "distill" and not args.no_synthetic:
        check_generator(args, meta)  # refused now, before anything is trained
    test_x, test_y = data.load_dataset(args.dataset, "test", args.data_root)
    collected = CollectedSet(args, device)
    collected.label_with(teacher)
    log = runtime.RunLog(
        f"hidfd-{args.dataset}" + ("-collected-only" if args.no_synthetic else ""),
        args,
        args.runs_dir,
    )
    test = (test_x.to(device), test_y.to(device))
    teacher_acc = runtime.evaluate(teacher, *test, meta["mean"], meta["std"])
    print(
        f"teacher {args.teacher_arch}: {teacher_acc:.2f}% test accuracy; device {device}",
        flush=True,
    )
    results = {
        "variant": variant,
        "teacher_acc": teacher_acc,
        "teacher_sha256": teacher_ckpt["sha256"],
        "student_acc": None,
        "collected": args.collected,
        "rho": args.rho,
        "n_collected": len(collected.x),
        "collected_teacher_hist": collected.hist,
    }
    # a run resumed in its distill stage rebuilds G from its state.pt (not from the --generator
    # file, which a later run may have overwritten) and regenerates the same D_s from it
    in_distill = log.state is not None and log.state["stage"] == "distill"

    G = None
    if args.stage in ("gan", "all") and not args.no_synthetic and not in_distill:
        G = train_gan(args, teacher, collected, log)
        gan = log.last_record
        if runtime.is_main():
            with runtime.reporting_write(generator_path(args), log):
                save_generator(args, G, collected, gan["probe_agree"])
        print(f"saved generator to {generator_path(args)} (samples in {log.dir})", flush=True)
        results.update(
            gan_epochs=args.gan_epochs,
            gan_probe_agree=gan["probe_agree"],
            gan_probe_hist=gan["probe_hist"],
            gan_teacher_agree=gan["teacher_agree"],
            gan_d_heldout_acc=gan.get("d_heldout_acc"),
            generator=generator_path(args),
        )
    if args.stage in ("distill", "all"):
        synthetic_x = torch.zeros((0,) + tuple(collected.x.shape[1:]), dtype=torch.uint8)
        if in_distill:
            results = log.state["results"]
            if not args.no_synthetic:
                G = Generator(
                    meta["num_classes"],
                    meta["channels"],
                    meta["size"],
                    **log.state["generator_shape"],
                )
                G.load_state_dict(log.state["generator"])
                G = runtime.prepare_model(G, device)
        if not args.no_synthetic:
            if G is None:
                G, ckpt = load_generator(generator_path(args), meta, device)
                results.update(
                    generator=generator_path(args), gan_epochs=ckpt["args"].get("gan_epochs")
                )
            synthetic_x, info = synthetic_set(args, G, teacher, meta, device)
            results.update(info)
        extra = {"results": results}
        if G is not None:
            extra.update(
                generator=G.state_dict(), generator_shape={"z_dim": G.z_dim, "width": G.width}
            )
        student, hybrid = distill(args, teacher, collected.x, synthetic_x, test, log, extra)
        student_acc = log.last_record["test_acc"]
        path = log.path("student.pt")
        if runtime.is_main():
            with runtime.reporting_write(path, log):
                models.save_checkpoint(
                    path,
                    student.folded(),
                    args.student_arch,
                    meta["num_classes"],
                    meta["channels"],
                    args,
                    student_acc,
                    dataset=args.dataset,
                    image_size=meta["size"],
                )
        print(f"saved student to {path}", flush=True)
        results.update(
            hybrid, student_acc=student_acc, n_synthetic=len(synthetic_x), student_checkpoint=path
        )
        if args.no_synthetic:
            results["collected_only_acc"] = student_acc
    return log.finish("hidfd", args.dataset, results)


def main(argv=None):
    runtime.cli(run, build_parser(), "hidfd.py", argv)


if __name__ == "__main__":
    main()
