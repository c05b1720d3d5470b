"""HiDFD: Hybrid Data-Free Knowledge Distillation (Tang, Chen, Gong, AAAI 2025).

A teacher's training data is unavailable; only a *small* collected set D_c (rho * |D_o| web images) is.
Stage 1 trains a class-conditional ADCGAN on D_c, guided by the frozen teacher: teacher features are blended
into (Eq. 8) and transferred to (Eq. 9) the discriminator's feature head against overfitting, and a
class-frequency regulariser (Eqs. 10-12) balances the classes the teacher sees in the generated samples.
Stage 2 generates |D_s| synthetic images, repeats D_c N = floor(|D_s| / |D_c|) times and trains the student
to match the teacher's features (Eq. 14) through the teacher's frozen, shared classifier.

    python hidfd.py --dataset cifar10 --rho 0.1      # ResNet34 -> ResNet18, ImageNet32 collection; paper: 94.74%
    python hidfd.py --dataset fashionmnist --collected fashionmnist-web --data-root /usr/share/datasets \
        --stage gan --gan-epochs 20                  # stage 1 only: writes the generator checkpoint
    python hidfd.py --dataset fashionmnist --collected fashionmnist-web --data-root /usr/share/datasets \
        --stage distill                              # stage 2 from that checkpoint (add --no-synthetic for D_c only)

Measured on a 2-core CPU (Fashion-MNIST, LeNet5 90.26% -> LeNet5-half, 3 seeds, a short GAN and 20 student
epochs): README "Results", table 3, against the inflated collection alone (--no-synthetic).

The labels of D_c are the teacher's argmax; no ground-truth label is used anywhere. The generator
outputs tanh images in [-1, 1] (what the discriminator sees); the teacher sees them mapped to [0, 1] and
normalised with its own dataset's mean/std, exactly like stored uint8 images.
"""

import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm
from torchvision.utils import save_image

import data
import models
import teacher as teacher_lib

#### Settings: paper defaults per dataset family (every value is also a CLI flag) ####
# cifar: Sec. "Implementation Details" (student SGD 0.05, 240 epochs, /10 at 150/180/210; GAN Adam
# 1e-4 / 4e-4, 500 epochs) and the authors' code (GAN batch 100, Adam betas (0, 0.999)).
# mnist: LeNet5 -> LeNet5-half with the MNIST-family student recipe (Adam 1e-3, 40 epochs).
# synthetic: tiny settings so that the end-to-end tests take seconds.
SETTINGS = {
    "cifar": dict(teacher_arch="resnet34", student_arch="resnet18", collected="imagenet32", optimizer="sgd",
                  lr=0.05, momentum=0.9, weight_decay=5e-4, epochs=240, milestones=(150, 180, 210), batch_size=128,
                  n_synthetic=50000, gan_epochs=500, gan_batch_size=100, gan_width=128, z_dim=128, sample_every=10),
    "mnist": dict(teacher_arch="lenet5", student_arch="lenet5_half", collected="svhn", optimizer="adam",
                  lr=1e-3, momentum=0.0, weight_decay=0.0, epochs=40, milestones=(), batch_size=256,
                  n_synthetic=50000, gan_epochs=100, gan_batch_size=100, gan_width=64, z_dim=64, sample_every=5),
    "synthetic": dict(teacher_arch="lenet5", student_arch="lenet5_half", collected="shifted:synthetic",
                      optimizer="adam", lr=2e-3, momentum=0.0, weight_decay=0.0, epochs=2, milestones=(),
                      batch_size=128, n_synthetic=500, gan_epochs=2, gan_batch_size=50, gan_width=16, z_dim=32,
                      sample_every=1),
}


def build_parser():
    p = argparse.ArgumentParser(description="HiDFD: teacher-guided ADCGAN on a small collection, then hybrid "
                                            "distillation (AAAI 2025). Defaults per family: see SETTINGS.")
    p.add_argument("--dataset", default="cifar10", choices=sorted(data.DATASETS), help="the teacher's task")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: cached/trained by teacher.py)")
    p.add_argument("--teacher-arch", default=None, help="Table 1: resnet34 (CIFAR-like), lenet5 (MNIST family)")
    p.add_argument("--student-arch", default=None, help="Table 1: resnet18 (CIFAR-like), lenet5_half (MNIST)")
    p.add_argument("--data-root", default="data")
    p.add_argument("--download", action="store_true", help="fetch the teacher's dataset with torchvision first")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--checkpoint-dir", default="checkpoints")
    # Data (Sec. "Datasets and Implementation Details", "Collected Datasets")
    p.add_argument("--collected", default=None, help="web source of D_c, any data.py source list "
                   "(paper: ImageNet for CIFAR/CINIC; default imagenet32 / svhn / shifted:synthetic)")
    p.add_argument("--rho", type=float, default=0.1, help="|D_c| = rho * |D_o| (Sec. Collected Datasets: 0.1, 1.0)")
    p.add_argument("--n-synthetic", type=int, default=None, help="|D_s| generated for stage 2 (authors: 50,000)")
    p.add_argument("--no-synthetic", action="store_true", help="distil on the inflated D_c alone (collection-only "
                   "comparison); N is still floor(n_synthetic / |D_c|)")
    p.add_argument("--stage", default="all", choices=["gan", "distill", "all"], help="Algorithm A-1: module 1, 2 or both")
    p.add_argument("--generator", default=None, help="generator checkpoint written by stage gan and read by stage "
                   "distill (default: <checkpoint-dir>/hidfd-generator-<dataset>-<teacher-arch>-seed<seed>.pt)")
    # Teacher-guided generation (Eqs. 1, 8-13)
    p.add_argument("--gan-epochs", type=int, default=None, help="passes over D_c (paper: 500; default 500/100/2)")
    p.add_argument("--gan-batch-size", type=int, default=None, help="real and fake batch size (authors: 100)")
    p.add_argument("--g-lr", type=float, default=1e-4, help="generator Adam lr (Sec. Implementation Details)")
    p.add_argument("--d-lr", type=float, default=4e-4, help="discriminator Adam lr (Sec. Implementation Details)")
    p.add_argument("--betas", type=float, nargs=2, default=(0.0, 0.999), help="GAN Adam betas (authors' code)")
    p.add_argument("--gan-loss", default="standard", choices=["standard", "hinge"], help="L_d / L_g of Eq. (1): "
                   "standard GAN (non-saturating for G) as printed, or hinge as in the authors' code")
    p.add_argument("--lambda-d", type=float, default=0.1, help="weight of L_blend + L_trans in L_D, Eq. (13)")
    p.add_argument("--lambda-g", type=float, default=0.1, help="weight of L_reg in L_G, Eq. (13)")
    p.add_argument("--q", type=float, default=0.7, help="L_blend applied when p > q, p ~ U[0, 1], Eq. (8)")
    p.add_argument("--gamma", type=float, default=0.5, help="EMA weight of the class frequencies, Eq. (10)")
    p.add_argument("--z-dim", type=int, default=None, help="generator noise size (default 128 / 64 / 32)")
    p.add_argument("--gan-width", type=int, default=None, help="base channel width of G and D (128 / 64 / 16)")
    p.add_argument("--sample-every", type=int, default=None, help="write a per-class sample grid every k GAN epochs")
    # Student distillation (Eq. 14; Sec. Implementation Details)
    p.add_argument("--epochs", type=int, default=None, help="student epochs (paper: 240; MNIST family 40)")
    p.add_argument("--batch-size", type=int, default=None, help="student batch size (128 / 256)")
    p.add_argument("--lr", type=float, default=None, help="student lr (SGD 0.05; MNIST family Adam 1e-3)")
    p.add_argument("--optimizer", default=None, choices=["sgd", "adam"], help="student optimizer (SGD in the paper)")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum (paper: 0.9)")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay (paper: 5e-4)")
    p.add_argument("--milestones", type=int, nargs="*", default=None, help="lr /10 at these epochs (150 180 210)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run (GAN or distill "
                   "stage) from RUN_DIR/state.pt with its saved config.json (flags given now must match it)")
    return p


def resolve_settings(args):
    """Fill every None flag from SETTINGS[family] (visible above) and the default generator path."""
    family = SETTINGS[data.DATASETS[args.dataset]["family"]]
    for key, value in family.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.generator is None:
        args.generator = os.path.join(args.checkpoint_dir,
                                      f"hidfd-generator-{args.dataset}-{args.teacher_arch}-seed{args.seed}.pt")
    if args.rho <= 0:
        raise ValueError("--rho must be > 0")
    if min(args.gan_epochs, args.epochs, args.gan_batch_size, args.batch_size) < 1 or args.n_synthetic < 0:
        raise ValueError("epochs and batch sizes must be >= 1 and --n-synthetic >= 0")
    return args


#### Losses and selection ####

def adc_discriminator_loss(adv_real, adv_fake, cls_real, cls_fake, y_real, y_fake, gan_loss="standard"):
    """Eq. (1), discriminator side, as a loss to minimise. Returns (adversarial term -L_d, classifier term).

    adv_*: (B,) real/fake logits of N_D; cls_*: (B, 2C) logits of Psi_D, columns [0, C) are the "real"
    classes y+ and [C, 2C) the "fake" classes y-; y_*: (B,) class indices in [0, C).
    """
    num_classes = cls_real.shape[1] // 2
    if gan_loss == "hinge":  # authors' code
        adversarial = F.relu(1 - adv_real).mean() + F.relu(1 + adv_fake).mean()
    else:
        # L_d = E_P[log sigmoid(a)] + E_Q[log(1 - sigmoid(a))]; -log sigmoid(a) = softplus(-a)
        adversarial = F.softplus(-adv_real).mean() + F.softplus(adv_fake).mean()
    # Eq. (1)
    # DEVIATION: the printed L_adc_d adds +E_P[log Psi(y+|x)] + E_Q[log Psi(y-|x)] to a quantity that is
    # minimised; we minimise their negatives (cross-entropies), i.e. the classifier *maximises* them, as the
    # appendix's optimal-classifier proof and ADCGAN (Hou et al. 2022) state.
    classifier = F.cross_entropy(cls_real, y_real) + F.cross_entropy(cls_fake, y_fake + num_classes)
    return adversarial, classifier


def adc_generator_loss(adv_fake, cls_fake, y_fake, gan_loss="standard"):
    """Eq. (1), generator side, as a loss to minimise. Returns (adversarial term L_g, classifier term)."""
    num_classes = cls_fake.shape[1] // 2
    if gan_loss == "hinge":
        adversarial = -adv_fake.mean()
    else:
        # DEVIATION: non-saturating -E_Q[log sigmoid(a)] instead of the printed E_Q[log(1 - sigmoid(a))], whose
        # gradient vanishes when D wins (the paper's own Eq. (6)); the usual GAN practice.
        adversarial = F.softplus(-adv_fake).mean()
    # Eq. (1): -E_Q[log Psi(y+|x)] + E_Q[log Psi(y-|x)] (sign as printed: G moves samples to "real, class y")
    classifier = F.cross_entropy(cls_fake, y_fake) - F.cross_entropy(cls_fake, y_fake + num_classes)
    return adversarial, classifier


def blend_loss(t_real, t_fake, d_real, d_fake):
    """Eq. (8) without the indicator: E[||Phi_T(x) - Phi_D(x^)||_2 + ||Phi_T(x^) - Phi_D(x)||_2]. All (B, D)."""
    # Eq. (8)
    return ((t_real - d_fake).norm(dim=1) + (t_fake - d_real).norm(dim=1)).mean()


def trans_loss(t_real, t_fake, d_real, d_fake):
    """Eq. (9): E[||Phi_T(x) - Phi_D(x)||_2 + ||Phi_T(x^) - Phi_D(x^)||_2]. All (B, D)."""
    # Eq. (9)
    return ((t_real - d_real).norm(dim=1) + (t_fake - d_fake).norm(dim=1)).mean()


def update_class_frequency(n_prev, counts, gamma=0.5):
    """Eq. (10): n^t = (1 - gamma) n^{t-1} + gamma * nbar^{t-1}; counts nbar = teacher-argmax histogram (C,)."""
    # Eq. (10)
    return (1 - gamma) * n_prev + gamma * counts.to(n_prev.dtype)


def reg_loss(teacher_logits_fake, class_freq, min_share=0.1):
    """Eqs. (11)-(12): sum_c p_T^c log(p_T^c) / nhat_c, p_T = batch-mean teacher softmax (B, C) -> (C,)."""
    p_t = teacher_logits_fake.float().softmax(dim=1).mean(dim=0)  # (C,)
    # Eq. (11)
    # DEVIATION: nhat is floored at min_share / C (a tenth of the uniform share) — a class the generator never
    # hits decays geometrically under Eq. (10) (x0.5 per iteration), so 1/nhat would grow without bound and
    # overflow within ~150 iterations; the floor caps a missing class's weight at 10x a balanced class's.
    n_hat = (class_freq / class_freq.sum()).clamp_min(min_share / len(class_freq))
    # Eq. (12)
    return (p_t * p_t.clamp_min(1e-12).log() / n_hat).sum()


def inflation_factor(n_collected, n_synthetic):
    """Sec. Student Distillation: N = floor(|D_s| / |D_c|), at least 1 (D_c is always used once)."""
    return max(1, n_synthetic // n_collected)


def align_loss(feat_s, feat_t):
    """Eq. (14): E_x ||Phi_S(x) - Phi_T(x)||_2 over the batch; feat_* (B, D)."""
    # Eq. (14)
    return (feat_s - feat_t).norm(dim=1).mean()


#### Networks ####

class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose per-channel gain and bias are looked up from the class label (BigGAN-style)."""

    def __init__(self, channels, num_classes):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x, y):
        return self.bn(x) * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


# DEVIATION: small SNGAN/DCGAN-style CNNs (conditional BN in G, spectral norm in D) instead of the authors'
# BigGAN ResNets — readable and trainable on a CPU; the paper does not specify the architecture.

class Generator(nn.Module):
    """N_G(z, y): noise + label -> image in [-1, 1] (B, channels, size, size); size 32 or 64.

    4x4 seed, then log2(size) - 2 blocks of (conditional BN, ReLU, 2x nearest upsample, 3x3 conv), halving
    the width each time down to `width`.
    """

    def __init__(self, num_classes, channels, size, z_dim=128, width=64):
        super().__init__()
        if size not in (32, 64):
            raise ValueError(f"the HiDFD generator makes 32x32 or 64x64 images, not {size}x{size}")
        self.num_classes, self.channels, self.size, self.z_dim, self.width = num_classes, channels, size, z_dim, width
        n_up = int(math.log2(size)) - 2
        widths = [width * 2 ** max(n_up - 1 - i, 0) for i in range(n_up + 1)]  # 32x32: [4w, 2w, w, w]
        self.fc = nn.Linear(z_dim, 4 * 4 * widths[0])
        self.norms = nn.ModuleList(ConditionalBatchNorm2d(c, num_classes) for c in widths[:-1])
        self.convs = nn.ModuleList(nn.Conv2d(cin, cout, 3, padding=1) for cin, cout in zip(widths[:-1], widths[1:]))
        self.out_norm = ConditionalBatchNorm2d(widths[-1], num_classes)
        self.out = nn.Conv2d(widths[-1], channels, 3, padding=1)
        self.seed_width = widths[0]

    def forward(self, z, y):
        h = self.fc(z).view(len(z), self.seed_width, 4, 4)                        # (B, W0, 4, 4)
        for norm, conv in zip(self.norms, self.convs):
            h = conv(F.interpolate(F.relu(norm(h, y)), scale_factor=2))          # (B, W_i, 2H, 2W)
        return torch.tanh(self.out(F.relu(self.out_norm(h, y))))                  # (B, channels, size, size)


class Discriminator(nn.Module):
    """N_D with ADCGAN's classifier Psi_D and a feature head Phi_D, all spectrally normalised.

    Shared extractor: 3x3 conv, then log2(size) - 2 downsamplings (4x4 stride-2 conv + 3x3 conv, LeakyReLU),
    global sum pooling to h (B, 4w). Heads on h: adversarial logit (B,), 2C class logits (B, 2C), and a
    2-layer MLP to the teacher's feature size (B, feat_dim) for Eqs. (8)-(9) (authors: 256 -> 1024 -> 512).
    """

    def __init__(self, num_classes, channels, size, feat_dim, width=64):
        super().__init__()
        if size not in (32, 64):
            raise ValueError(f"the HiDFD discriminator takes 32x32 or 64x64 images, not {size}x{size}")
        n_down = int(math.log2(size)) - 2
        layers, c = [spectral_norm(nn.Conv2d(channels, width, 3, padding=1)), nn.LeakyReLU(0.1)], width
        for i in range(n_down):
            c_out = width * 2 ** min(i + 1, 2)
            layers += [spectral_norm(nn.Conv2d(c, c, 4, stride=2, padding=1)), nn.LeakyReLU(0.1),
                       spectral_norm(nn.Conv2d(c, c_out, 3, padding=1)), nn.LeakyReLU(0.1)]
            c = c_out
        self.body = nn.Sequential(*layers)
        self.adv = spectral_norm(nn.Linear(c, 1))
        self.cls = spectral_norm(nn.Linear(c, 2 * num_classes))
        self.feat_head = nn.Sequential(spectral_norm(nn.Linear(c, 4 * c)), nn.LeakyReLU(0.1),
                                       spectral_norm(nn.Linear(4 * c, feat_dim)))

    def forward(self, x):
        h = self.body(x).sum(dim=(2, 3))                                        # (B, 4w)
        return self.adv(h).squeeze(1), self.cls(h), self.feat_head(h)         # (B,), (B, 2C), (B, feat_dim)


class SharedClassifierStudent(nn.Module):
    """Sec. Student Distillation: student features -> connector -> the teacher's frozen classifier.

    Exposes the models.py interface (features, classifier, feat_dim) so teacher.evaluate works on it.
    """

    def __init__(self, student, teacher_classifier):
        super().__init__()
        self.student = student
        self.feat_dim = teacher_classifier.in_features
        # DEVIATION: a learnable linear connector when the feature sizes differ (lenet5_half 42-d -> lenet5 84-d);
        # the paper has none (equal sizes in its pairs), the authors' code uses a conv connector on feature maps.
        self.connector = (nn.Identity() if student.feat_dim == self.feat_dim
                          else nn.Linear(student.feat_dim, self.feat_dim))
        self.classifier = nn.Linear(self.feat_dim, teacher_classifier.out_features)
        self.classifier.load_state_dict(teacher_classifier.state_dict())
        self.classifier.requires_grad_(False)

    def features(self, x):
        return self.connector(self.student.features(x))

    def forward(self, x):
        return self.classifier(self.features(x))

    @torch.no_grad()
    def folded(self):
        """The plain student network with classifier := shared classifier o connector (identical logits)."""
        weight, bias = self.classifier.weight, self.classifier.bias
        if isinstance(self.connector, nn.Linear):
            weight, bias = weight @ self.connector.weight, weight @ self.connector.bias + bias
        self.student.classifier.weight.copy_(weight)
        self.student.classifier.bias.copy_(bias)
        return self.student


#### Training ####

def to_unit_range(x):
    """Generator/discriminator space [-1, 1] -> [0, 1] (what the teacher's normalisation expects)."""
    return (x + 1) / 2


def to_uint8(x):
    return (to_unit_range(x) * 255).round().clamp(0, 255).to(torch.uint8)


def load_collected(args, meta, teacher_model):
    """D_c: a seeded random subset of rho * |D_o| images of the web source, labelled by the teacher's argmax.
    Returns (images uint8, teacher labels, teacher features, info dict)."""
    images, _, source = data.load_source(args.collected, "train", args.data_root, meta["channels"], meta["size"],
                                         seed=args.seed)
    n_collected = int(round(args.rho * data.DATASETS[args.dataset]["train_size"]))
    if not 1 <= n_collected <= len(images):
        raise ValueError(f"rho={args.rho} asks for {n_collected} collected images but {args.collected!r} has "
                         f"{len(images)}")
    keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[:n_collected]
    images, source = images[keep], source[keep]
    logits, feats = teacher_lib.predict(teacher_model, images, meta["mean"], meta["std"], features=True)
    labels = logits.argmax(1)
    hist = torch.bincount(labels, minlength=meta["num_classes"]).tolist()
    print(f"D_c: {n_collected} images of {args.collected} (per source {source.bincount().tolist()}); "
          f"teacher-predicted classes {hist}", flush=True)
    return images, labels, feats.clone(), {"n_collected": n_collected, "collected_teacher_hist": hist}


@torch.no_grad()
def save_sample_grid(generator, z, y, path):
    """One row per class (up to 10 classes), fixed noise; the generator in eval mode, as in stage 2."""
    was_training = generator.training
    generator.eval()
    images = to_unit_range(generator(z, y).float()).clamp(0, 1).cpu()
    generator.train(was_training)
    save_image(images, path, nrow=int((y == y[0]).sum()), padding=2, pad_value=1.0)


def train_gan(args, meta, teacher_model, real_x, real_y, real_t_feat, device, log, state=None):
    """Module 1 (Algorithm A-1, lines 3-9): L_D and L_G of Eq. (13), one D step and one G step per batch.
    `state`: a GAN-stage state.pt to continue from."""
    num_classes, bs = meta["num_classes"], args.gan_batch_size
    if len(real_x) < bs:
        raise ValueError(f"|D_c| = {len(real_x)} is smaller than --gan-batch-size {bs}")
    G = teacher_lib.prepare_model(Generator(num_classes, meta["channels"], meta["size"], args.z_dim, args.gan_width), device)
    D = teacher_lib.prepare_model(Discriminator(num_classes, meta["channels"], meta["size"], teacher_model.feat_dim,
                                                args.gan_width), device)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.g_lr, betas=tuple(args.betas))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.d_lr, betas=tuple(args.betas))
    half = (0.5,) * meta["channels"]  # uint8 -> [-1, 1], the generator's range
    loader = data.DeviceLoader(real_x, real_y, real_t_feat, batch_size=bs, shuffle=True, drop_last=True,
                               mean=half, std=half, device=device, seed=args.seed, rank=teacher_lib.rank(),
                               world_size=teacher_lib.world_size())
    fake_bs = loader.local_batch_size  # under torchrun each rank makes its share of the fake batch
    mean = torch.tensor(meta["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], device=device).view(1, -1, 1, 1)

    def teacher_view(x):  # [-1, 1] -> the teacher's normalised input
        return (to_unit_range(x) - mean) / std

    # each rank draws its own noise and labels (and its own p of Eq. (8)); rank 0's are the single-process ones
    gen = torch.Generator(device=device).manual_seed(teacher_lib.rank_seed(args.seed + 2))
    grid_y = torch.arange(min(num_classes, 10), device=device).repeat_interleave(10)
    grid_z = torch.randn(len(grid_y), args.z_dim, device=device, generator=gen)
    # Eq. (10): n_c^0 is a constant, here the uniform share of one batch
    class_freq = torch.full((num_classes,), bs / num_classes, device=device)
    names = ("d_loss", "g_loss", "adv_d", "cls_d", "blend", "trans", "blend_on", "adv_g", "cls_g", "reg")
    first_epoch = 0
    if state:
        for name, module in (("G", G), ("D", D), ("opt_g", opt_g), ("opt_d", opt_d)):
            module.load_state_dict(state[name])
        class_freq = state["class_freq"].to(device)
        teacher_lib.set_rng_state(state["rng"], device, gen=gen, loader_order=loader.order_gen,
                                  loader_aug=loader.aug_gen)
        first_epoch, metrics = state["epoch"], state["metrics"]
    for epoch in range(first_epoch, args.gan_epochs):
        start = time.time()
        sums = {k: torch.zeros((), device=device) for k in names}
        hist = torch.zeros(num_classes, dtype=torch.long, device=device)
        agree = torch.zeros((), device=device)
        steps = 0
        for x_real, y_real, t_real in loader:                                    # (B, C, H, W), (B,), (B, D_T)
            # Discriminator step: L_D = L_adc_d + lambda_d (I(p > q) L_blend + L_trans), Eq. (13)
            y_fake = torch.randint(0, num_classes, (fake_bs,), device=device, generator=gen)
            z = torch.randn(fake_bs, args.z_dim, device=device, generator=gen)
            with torch.no_grad(), teacher_lib.autocast(device):
                x_fake = G(z, y_fake)
                t_fake = teacher_model.features(teacher_view(x_fake)).float()    # no path to G through L_D
            with teacher_lib.autocast(device):
                adv_r, cls_r, d_real = D(x_real)
                adv_f, cls_f, d_fake = D(x_fake)
            adv_d, cls_d = adc_discriminator_loss(adv_r.float(), adv_f.float(), cls_r.float(), cls_f.float(),
                                                  y_real, y_fake, args.gan_loss)
            blend = blend_loss(t_real, t_fake, d_real.float(), d_fake.float())
            trans = trans_loss(t_real, t_fake, d_real.float(), d_fake.float())
            blend_on = (torch.rand((), device=device, generator=gen) > args.q).float()  # I(p > q), Eq. (8)
            # Eq. (13)
            d_loss = adv_d + cls_d + args.lambda_d * (blend_on * blend + trans)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            teacher_lib.average_gradients(D.parameters())
            opt_d.step()

            # Generator step: L_G = L_adc_g + lambda_g L_reg, Eq. (13); gradients reach G through D and the
            # frozen teacher (its parameters have requires_grad=False, so it is not updated)
            y_fake = torch.randint(0, num_classes, (fake_bs,), device=device, generator=gen)
            z = torch.randn(fake_bs, args.z_dim, device=device, generator=gen)
            with teacher_lib.autocast(device):
                x_fake = G(z, y_fake)
                adv_f, cls_f, _ = D(x_fake)
                t_logits = teacher_model(teacher_view(x_fake)).float()
            adv_g, cls_g = adc_generator_loss(adv_f.float(), cls_f.float(), y_fake, args.gan_loss)
            reg = reg_loss(t_logits, class_freq)
            # Eq. (13)
            g_loss = adv_g + cls_g + args.lambda_g * reg
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            teacher_lib.average_gradients(G.parameters())
            opt_g.step()

            predicted = t_logits.detach().argmax(1)
            counts = F.one_hot(predicted, num_classes).sum(0)  # bincount would sync with the host on a GPU
            hist += counts
            # Eq. (10): the counts of this iteration give n^{t+1} (under torchrun: of the whole batch, all ranks)
            class_freq = update_class_frequency(class_freq, teacher_lib.all_reduce_sum(counts), args.gamma)
            agree += (predicted == y_fake).sum()
            for k, v in zip(names, (d_loss, g_loss, adv_d, cls_d, blend, trans, blend_on, adv_g, cls_g, reg)):
                sums[k] += v.detach()
            steps += 1
        seconds = time.time() - start
        totals = teacher_lib.epoch_sums({**sums, "agree": agree, "hist": hist, "steps": steps})  # the one sync
        metrics = {"stage": "gan", **{k: totals[k] / totals["steps"] for k in names},
                   "teacher_agree": totals["agree"] / (steps * bs) * 100,
                   "teacher_hist": [int(v) for v in totals["hist"]]}
        log.check_finite(f"GAN epoch {epoch + 1}", {k: metrics[k] for k in names})
        teacher_lib.average_buffers(G)
        teacher_lib.average_buffers(D)
        log.log_epoch(epoch, args.gan_epochs, metrics, 3 * steps * bs, seconds)  # D: real + fake, G: fake
        print(f"  generated, teacher-predicted classes: {metrics['teacher_hist']}", flush=True)
        if ((epoch + 1) % args.sample_every == 0 or epoch + 1 == args.gan_epochs) and teacher_lib.is_main():
            save_sample_grid(G, grid_z, grid_y, log.path(f"samples-gan-epoch{epoch + 1:03d}.png"))
        log.save_state({"stage": "gan", "epoch": epoch + 1, "G": G.state_dict(), "D": D.state_dict(),
                        "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "class_freq": class_freq,
                        "metrics": metrics, "rng": teacher_lib.rng_state(device, gen=gen, loader_order=loader.order_gen,
                                                                         loader_aug=loader.aug_gen)},
                       f"GAN epoch {epoch + 1}/{args.gan_epochs}")
    if teacher_lib.is_main():
        models.save_checkpoint(args.generator, G, "hidfd-generator", num_classes, meta["channels"], args, None,
                               image_size=meta["size"], z_dim=args.z_dim, width=args.gan_width, dataset=args.dataset,
                               teacher_agree=metrics["teacher_agree"])
    print(f"saved generator to {args.generator} (samples in {log.dir})", flush=True)
    return G, {"gan_epochs": args.gan_epochs, "gan_teacher_agree": metrics["teacher_agree"],
               "gan_teacher_hist": metrics["teacher_hist"]}


def load_generator(path, meta, device):
    if not os.path.isfile(path):
        raise ValueError(f"no generator checkpoint at {path}: run --stage gan first or pass --generator PATH")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("arch") != "hidfd-generator":
        raise ValueError(f"{path} is not a HiDFD generator checkpoint (arch {ckpt.get('arch')!r})")
    if (ckpt["num_classes"], ckpt["in_channels"], ckpt["image_size"]) != (meta["num_classes"], meta["channels"], meta["size"]):
        raise ValueError(f"generator {path} makes {ckpt['num_classes']} classes of {ckpt['in_channels']}x"
                         f"{ckpt['image_size']}^2 images; the teacher needs {meta['num_classes']} of "
                         f"{meta['channels']}x{meta['size']}^2")
    G = Generator(ckpt["num_classes"], ckpt["in_channels"], ckpt["image_size"], ckpt["z_dim"], ckpt["width"])
    G.load_state_dict(ckpt["state_dict"])
    print(f"loaded generator {path} (trained {ckpt['args'].get('gan_epochs')} GAN epochs on "
          f"{ckpt['args'].get('collected')}, rho {ckpt['args'].get('rho')})", flush=True)
    return teacher_lib.prepare_model(G, device), ckpt


@torch.no_grad()
def generate(G, n, num_classes, z_dim, seed, device, batch_size=1000):
    """D_s: n images with balanced labels (y = i mod C), as uint8 so they share D_c's loader path."""
    G.eval()
    gen = torch.Generator(device=device).manual_seed(seed + 3)
    labels = torch.arange(n, device=device) % num_classes
    images = torch.empty(n, G.channels, G.size, G.size, dtype=torch.uint8, device=device)
    for i in range(0, n, batch_size):
        y = labels[i:i + batch_size]
        with teacher_lib.autocast(device):
            images[i:i + batch_size] = to_uint8(G(torch.randn(len(y), z_dim, device=device, generator=gen), y).float())
    return images, labels


def distill(args, meta, teacher_model, collected_x, synthetic_x, device, log, test_x, test_y, resume_with):
    """Module 2 (Algorithm A-1, lines 10-16): hybrid data D = N x D_c + D_s, L_align of Eq. (14).
    `resume_with`: saved with every epoch's state (what `run` needs to rebuild D_s and its results)."""
    n_c, n_s = len(collected_x), len(synthetic_x)
    N = inflation_factor(n_c, args.n_synthetic)
    images = torch.cat([collected_x.to(device), synthetic_x.to(device)])
    indices = torch.cat([torch.arange(n_c).repeat(N), n_c + torch.arange(n_s)])  # inflation by repetition
    alpha = N * n_c / len(indices)
    print(f"hybrid data: {N} x {n_c} collected + {n_s} synthetic = {len(indices)} per epoch (alpha {alpha:.3f})",
          flush=True)
    loader = data.DeviceLoader(images, batch_size=args.batch_size, shuffle=True, crop_pad=meta["crop_pad"],
                               flip=meta["flip"], mean=meta["mean"], std=meta["std"], device=device, seed=args.seed,
                               indices=indices, rank=teacher_lib.rank(), world_size=teacher_lib.world_size())
    student = models.build_model(args.student_arch, meta["num_classes"], meta["channels"])
    model = teacher_lib.prepare_model(SharedClassifierStudent(student, teacher_model.classifier), device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = teacher_lib.make_optimizer(params, args)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(args.milestones), gamma=0.1)
    first_epoch = 0
    if log.state and log.state["stage"] == "distill":
        for name, module in (("model", model), ("opt", opt), ("sched", sched)):
            module.load_state_dict(log.state[name])
        teacher_lib.set_rng_state(log.state["rng"], device, loader_order=loader.order_gen, loader_aug=loader.aug_gen)
        first_epoch, test_acc = log.state["epoch"], log.state["test_acc"]
    for epoch in range(first_epoch, args.epochs):
        model.train()
        start = time.time()
        loss_sum = torch.zeros((), device=device)
        agree = torch.zeros((), device=device)
        seen = 0
        for (x,) in loader:
            with torch.no_grad(), teacher_lib.autocast(device):
                t_feat = teacher_model.features(x).float()                        # (B, D_T)
            with teacher_lib.autocast(device):
                s_feat = model.features(x).float()                                # (B, D_T) after the connector
            loss = align_loss(s_feat, t_feat)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            teacher_lib.average_gradients(params)
            opt.step()
            loss_sum += loss.detach() * len(x)
            agree += (model.classifier(s_feat.detach()).argmax(1) == teacher_model.classifier(t_feat).argmax(1)).sum()
            seen += len(x)
        sched.step()
        seconds = time.time() - start
        totals = teacher_lib.epoch_sums({"align": loss_sum, "agree": agree, "seen": seen})  # the one sync
        log.check_finite(f"distill epoch {epoch + 1}", {"align": totals["align"] / totals["seen"]})
        teacher_lib.average_buffers(model)
        test_acc = teacher_lib.evaluate(model, test_x, test_y, meta["mean"], meta["std"])
        log.log_epoch(epoch, args.epochs, {"stage": "distill", "align": totals["align"] / totals["seen"],
                                           "teacher_agree": totals["agree"] / totals["seen"] * 100,
                                           "test_acc": test_acc, "lr": sched.get_last_lr()[0]}, totals["seen"], seconds)
        log.save_state({"stage": "distill", "epoch": epoch + 1, "test_acc": test_acc, "model": model.state_dict(),
                        "opt": opt.state_dict(), "sched": sched.state_dict(), **resume_with,
                        "rng": teacher_lib.rng_state(device, loader_order=loader.order_gen, loader_aug=loader.aug_gen)},
                       f"distill epoch {epoch + 1}/{args.epochs}")
    path = log.path("student.pt")
    if teacher_lib.is_main():
        models.save_checkpoint(path, model.folded(), args.student_arch, meta["num_classes"], meta["channels"], args,
                               test_acc, dataset=args.dataset, image_size=meta["size"])
    print(f"saved student to {path}", flush=True)
    return test_acc, {"inflation_factor": N, "hybrid_size": len(indices), "alpha": alpha, "student_checkpoint": path}


def run(args):
    args = resolve_settings(teacher_lib.resume_config(args, build_parser(), "hidfd.py"))
    device = teacher_lib.get_device(args.device)
    teacher_lib.seed_everything(args.seed)
    meta = data.DATASETS[args.dataset]
    if args.download and teacher_lib.is_main():
        data.download(args.dataset, args.data_root)
    teacher_lib.barrier()
    variant = "collected-only" if args.no_synthetic else "hidfd"
    teacher_model, _ = teacher_lib.get_teacher(args.dataset, args.teacher_arch, args.seed, args.data_root, device,
                                               args.teacher, args.checkpoint_dir, args.download)
    log = teacher_lib.RunLog(f"hidfd-{args.dataset}" + ("-collected-only" if args.no_synthetic else ""), args,
                             args.runs_dir)
    test_x, test_y = data.load_dataset(args.dataset, "test", args.data_root)
    test_x, test_y = test_x.to(device), test_y.to(device)
    teacher_acc = teacher_lib.evaluate(teacher_model, test_x, test_y, meta["mean"], meta["std"])
    print(f"teacher {args.teacher_arch}: {teacher_acc:.2f}% test accuracy; device {device}", flush=True)
    collected_x, collected_y, collected_feat, info = load_collected(args, meta, teacher_model)
    results = {"variant": variant, "teacher_acc": teacher_acc, "student_acc": None, "collected": args.collected,
               "rho": args.rho, **info}
    # a run resumed in its distill stage rebuilds G from its state.pt (not from the --generator file, which a
    # later run may have overwritten) and regenerates the same D_s from it
    in_distill = log.state is not None and log.state["stage"] == "distill"

    G = None
    with log.stop_cleanly("hidfd.py"):
        if args.stage in ("gan", "all") and not args.no_synthetic and not in_distill:
            G, gan_info = train_gan(args, meta, teacher_model, collected_x, collected_y, collected_feat, device, log,
                                    log.state)
            results.update(gan_info, generator=args.generator)
        if args.stage in ("distill", "all"):
            synthetic_x = torch.zeros((0,) + tuple(collected_x.shape[1:]), dtype=torch.uint8)
            if in_distill:
                results = log.state["results"]
                if not args.no_synthetic:
                    G = Generator(meta["num_classes"], meta["channels"], meta["size"], **log.state["generator_shape"])
                    G.load_state_dict(log.state["generator"])
                    G = teacher_lib.prepare_model(G, device)
            if not args.no_synthetic:
                if G is None:
                    G, ckpt = load_generator(args.generator, meta, device)
                    results.update(generator=args.generator, gan_epochs=ckpt["args"].get("gan_epochs"))
                synthetic_x, synthetic_y = generate(G, args.n_synthetic, meta["num_classes"], G.z_dim, args.seed,
                                                    device)
                predicted = teacher_lib.predict(teacher_model, synthetic_x, meta["mean"], meta["std"]).argmax(1)
                results["synthetic_teacher_agree"] = (predicted == synthetic_y).float().mean().item() * 100
                results["synthetic_teacher_hist"] = torch.bincount(predicted, minlength=meta["num_classes"]).tolist()
                print(f"D_s: {len(synthetic_x)} images; teacher agrees with the conditioning label on "
                      f"{results['synthetic_teacher_agree']:.1f}%; teacher-predicted classes "
                      f"{results['synthetic_teacher_hist']}", flush=True)
            resume_with = {"results": results}
            if G is not None:
                resume_with.update(generator=G.state_dict(), generator_shape={"z_dim": G.z_dim, "width": G.width})
            student_acc, distill_info = distill(args, meta, teacher_model, collected_x, synthetic_x, device, log,
                                                test_x, test_y, resume_with)
            results.update(distill_info, student_acc=student_acc, n_synthetic=len(synthetic_x))
            if args.no_synthetic:
                results["collected_only_acc"] = student_acc
    return log.finish("hidfd", args.dataset, results)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (data.DatasetNotFoundError, ValueError, teacher_lib.NonFiniteLossError) as e:
        sys.exit(f"error: {e}")
    finally:
        teacher_lib.cleanup_distributed()


if __name__ == "__main__":
    main()
