"""KD3: Knowledge Distillation between Different Distributions (Tang, Chen, Niu, Sugiyama, Gong, ICCV 2023).

The teacher's training data is unavailable; a large "webly collected" set with a distribution shift is.
Every epoch, KD3 (1) selects web images whose combined teacher/student prediction is confident relative to
a per-class threshold (Eqs. 3-8), (2) trains the student's feature extractor to match the teacher's
features through the teacher's frozen, *shared* classifier, weighting each image by teacher/student
agreement (Eqs. 9-10), and (3) adds a contrastive loss between each image and a MixDistribution copy of it
whose per-channel mean/std are mixed with another image's (Eqs. 11-17). Objective: L_wfa + alpha L_mdcl (18).

    python kd3.py --dataset cifar10                  # ResNet34 -> ResNet18 on ImageNet32; paper: 95.21%
    python kd3.py --dataset mnist                    # LeNet5 -> LeNet5-half on gray MNIST-M + SVHN; paper: 98.76%
    python kd3.py --dataset fashionmnist --web fashionmnist-web --data-root /usr/share/datasets
    python kd3.py --dataset fashionmnist --web fashionmnist-web --data-root /usr/share/datasets --selection random

Ablations of Table 2: --no-cls-share {onehot,soft}, --selection {random,student,teacher}, --no-mdcl, --no-md.
Fashion-MNIST, LeNet5 (90.26%) -> LeNet5-half on the shifted `fashionmnist-web` set, 20 epochs on a 2-core
CPU, 3 seeds: 77.39 +- 0.73% (random selection 76.48, no classifier sharing one-hot 80.91); every
ablation, and why the paper's ordering does not hold there: README "Results", table 2.
"""

import argparse
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import save_image

import data
import models
import teacher as teacher_lib

#### Settings: paper defaults per dataset family (every value is also a CLI flag) ####
# cifar: Sec. 4 "Implementation Details" (SGD 0.05, momentum 0.9, wd 5e-4, 240 epochs, /10 at 150/180/210)
#        and "Webly Collected Datasets" (ImageNet downsampled to 32x32). The batch size is not given in the
#        paper (the authors' code uses 1024); 128 is the repository's CIFAR batch size.
# mnist: LeNet5 -> LeNet5-half, Adam 1e-3, 40 epochs, web = grayscaled MNIST-M + SVHN (Sec. 4).
# synthetic: tiny settings so that the end-to-end tests take seconds.
SETTINGS = {
    "cifar": dict(teacher_arch="resnet34", student_arch="resnet18", web="imagenet32", optimizer="sgd", lr=0.05,
                  momentum=0.9, weight_decay=5e-4, epochs=240, milestones=(150, 180, 210), batch_size=128),
    "mnist": dict(teacher_arch="lenet5", student_arch="lenet5_half", web="mnistm,svhn", optimizer="adam", lr=1e-3,
                  momentum=0.0, weight_decay=0.0, epochs=40, milestones=(), batch_size=256),
    "synthetic": dict(teacher_arch="lenet5", student_arch="lenet5_half", web="shifted:synthetic:600,noise-uniform:200",
                      optimizer="adam", lr=2e-3, momentum=0.0, weight_decay=0.0, epochs=2, milestones=(),
                      batch_size=128),
}


def build_parser():
    p = argparse.ArgumentParser(description="KD3 (ICCV 2023): distillation with webly collected images under "
                                            "distribution shift. Defaults per dataset family: see SETTINGS.")
    p.add_argument("--dataset", default="cifar10", choices=sorted(data.DATASETS), help="the teacher's task (Sec. 4)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: cached/trained by teacher.py)")
    p.add_argument("--teacher-arch", default=None, help="Table 1: resnet34 (CIFAR-like), lenet5 (MNIST family)")
    p.add_argument("--student-arch", default=None, help="Table 1: resnet18 (CIFAR-like), lenet5_half (MNIST family)")
    p.add_argument("--web", default=None, help="webly collected data D-bar, any data.py source list (Sec. 4 "
                   "'Webly Collected Datasets': imagenet32 / mnistm,svhn; e.g. svhn,folder:/path, fashionmnist-web)")
    p.add_argument("--data-root", default="data")
    p.add_argument("--download", action="store_true", help="fetch the teacher's dataset with torchvision first")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--checkpoint-dir", default="checkpoints")
    # Optimisation (Sec. 4 "Implementation Details")
    p.add_argument("--epochs", type=int, default=None, help="I of Eq. (4) (paper: 240; MNIST 40)")
    p.add_argument("--batch-size", type=int, default=None, help="not given in the paper (authors' code: 1024)")
    p.add_argument("--lr", type=float, default=None, help="SGD 0.05 (CIFAR-like) / Adam 1e-3 (MNIST)")
    p.add_argument("--optimizer", default=None, choices=["sgd", "adam"], help="SGD (CIFAR-like) / Adam (MNIST)")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum (paper: 0.9)")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay (paper: 5e-4 with SGD)")
    p.add_argument("--milestones", type=int, nargs="*", default=None, help="lr /10 at these epochs (150 180 210)")
    # KD3 hyper-parameters (Sec. 4 "Implementation Details", Fig. 4)
    p.add_argument("--v-th", type=float, default=0.95, help="V_th of Eq. (6) (paper: 0.95)")
    p.add_argument("--tau", type=float, default=0.3, help="temperature of Eqs. (15)-(16) (paper: 0.3)")
    p.add_argument("--alpha", type=float, default=0.01, help="weight of L_mdcl in Eq. (18) (paper: 0.01; code 0.001)")
    p.add_argument("--mix-delta", type=float, default=0.1, help="lambda ~ Beta(delta, delta) of Eq. (11) "
                   "(not given in the paper; authors' code 0.1)")
    p.add_argument("--proj-dim", type=int, default=128, help="projection head output, Eqs. (13)-(14) (code: 128)")
    p.add_argument("--mdcl-reduction", default="mean", choices=["mean", "sum"], help="Eqs. (15)-(16) sum over "
                   "instances (sum); default mean over the batch (batch-size independent)")
    # Ablations (Table 2) and the authors' code variants (IMPLEMENTATION_NOTES)
    p.add_argument("--selection", default="combined", choices=["combined", "random", "student", "teacher"],
                   help="Table 2 'Instance selection': Eqs. (3)-(8) (combined), as many random images as the "
                        "combined rule selects (random), alpha(t)=1 always (student), alpha(t)=0 always (teacher)")
    p.add_argument("--no-cls-share", default=None, choices=["onehot", "soft"], help="Table 2 'No classifier "
                   "sharing': a fresh student classifier trained by CE on the teacher's argmax or KL on its soft labels")
    p.add_argument("--kd-t", type=float, default=4.0, help="KL temperature of --no-cls-share soft (not given)")
    p.add_argument("--no-mdcl", action="store_true", help="Table 2 'No L_mdcl': drop Eq. (17) from Eq. (18)")
    p.add_argument("--no-md", action="store_true", help="Table 2 'No MD': contrastive views from standard "
                   "augmentation (random crop + flip) instead of MixDistribution, Eqs. (11)-(12)")
    p.add_argument("--threshold", default="paper", choices=["paper", "flexmatch"], help="Eqs. (6)-(7) (paper), "
                   "or the authors' code: T_k = V_th * b_k / (2 - b_k), b_k = n_k / max_j n_j (flexmatch)")
    p.add_argument("--contrastive", default="paper", choices=["paper", "ntxent"], help="Eqs. (15)-(16) with "
                   "j != i in the denominator (paper), or the positive kept there as in the authors' code (ntxent)")
    p.add_argument("--grid-size", type=int, default=64, help="images per selected/rejected PNG grid")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run from "
                   "RUN_DIR/state.pt with its saved config.json (flags given now must match it)")
    return p


def resolve_settings(args):
    """Fill every None flag from SETTINGS[family] (visible above) and validate."""
    family = SETTINGS[data.DATASETS[args.dataset]["family"]]
    for key, value in family.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.epochs < 1 or args.batch_size < 1:
        raise ValueError("--epochs and --batch-size must be >= 1")
    if not 0 < args.v_th <= 1:
        raise ValueError(f"--v-th must be in (0, 1], got {args.v_th}")
    if args.tau <= 0 or args.mix_delta <= 0 or args.alpha < 0 or args.kd_t <= 0:
        raise ValueError("--tau, --mix-delta and --kd-t must be > 0 and --alpha >= 0")
    return args


#### Losses and selection ####

def alpha_schedule(epoch, total_epochs):
    """Eq. (4): alpha(t) = exp(-5 (t / (I/2) - 1)^2) for t <= I/2, else 1; t counted from 0, I = total epochs."""
    half = total_epochs / 2
    if epoch > half:
        return 1.0
    # Eq. (4)
    return math.exp(-5 * (epoch / half - 1) ** 2)


def combine_predictions(p_teacher, p_student, alpha):
    """Eq. (3) on probabilities (N, K): (1 - alpha) N_T(x) + alpha N_S(x)."""
    # Eq. (3)
    return (1 - alpha) * p_teacher + alpha * p_student


def class_thresholds(pred, num_classes, v_th, rule="paper"):
    """Eqs. (6)-(7): T_k = n_k / max_j n_j * V_th, n_k = number of instances predicted as k; (K,).

    A class nobody predicts gets threshold 0 (and has no instance to select). rule="flexmatch" is the
    authors' code: T_k = V_th * b_k / (2 - b_k) with b_k = n_k / max_j n_j.
    """
    counts = torch.bincount(pred, minlength=num_classes).float()                   # (K,) n_k
    # Eq. (7)
    normalized = counts / counts.max().clamp(min=1)
    if rule == "flexmatch":
        # DEVIATION (opt-in, --threshold flexmatch): the authors' code's FlexMatch-style mapping.
        return v_th * normalized / (2 - normalized)
    # Eq. (6)
    return normalized * v_th


def select_instances(combined, v_th, rule="paper"):
    """Eqs. (5)-(8): keep x_i iff p_i > T_{y_i^pred} (strict). Returns (mask (N,) bool, pred (N,) long)."""
    # Eq. (5)
    confidence, pred = combined.max(dim=1)
    thresholds = class_thresholds(pred, combined.shape[1], v_th, rule)
    # Eq. (8)
    return confidence > thresholds[pred], pred


def alignment_weights(p_student, p_teacher):
    """Eq. (9): w_i = 1 - sigmoid(||N_S(x_i) - N_T(x_i)||_1) on probabilities, detached; (N,) in (0.119, 0.5]."""
    # Eq. (9)
    return (1 - torch.sigmoid((p_student - p_teacher).abs().sum(dim=1))).detach()


def weighted_feature_alignment(feat_s, feat_t, weights):
    """Eq. (10): (1/|D_s|) sum_i w_i MSE(phi_S(x_i), phi_T(x_i)), MSE = mean over feature dimensions."""
    # Eq. (10)
    return (weights * (feat_s - feat_t).pow(2).mean(dim=1)).mean()


def mix_distribution(x, lam, perm, eps=1e-6):
    """Eqs. (11)-(12) on images (B, C, H, W): each image's per-channel mean/std (population std over H x W,
    sqrt(var + eps), detached) replaced by lam * own + (1 - lam) * those of image perm[i]. lam: (B,)."""
    mu = x.mean(dim=(2, 3), keepdim=True).detach()                                  # (B, C, 1, 1)
    sigma = (x.var(dim=(2, 3), keepdim=True, unbiased=False) + eps).sqrt().detach()  # (B, C, 1, 1)
    lam = lam.view(-1, 1, 1, 1).to(x.dtype)
    # Eq. (11)
    gamma_mix = lam * sigma + (1 - lam) * sigma[perm]
    beta_mix = lam * mu + (1 - lam) * mu[perm]
    # Eq. (12)
    return gamma_mix * (x - mu) / sigma + beta_mix


def mdcl_loss(z, z_hat, tau, reduction="mean", positive_in_denominator=False):
    """Eqs. (15)/(16): -log exp(sim(z_i, z^_i)/tau) / sum_{j != i} exp(sim(z_i, z^_j)/tau), cosine similarity.

    z, z_hat: (B, D) embeddings of the unperturbed and perturbed images (normalised here, so cosine
    similarity is their dot product). reduction="sum" is the paper's sum over instances; the default "mean"
    divides by B (a DEVIATION, so that the loss does not grow with the batch size). positive_in_denominator=True is the authors' code (NT-Xent-style). A batch of fewer than
    two instances has no negative and gives 0.
    """
    # DEVIATION: mean over instances by default instead of the paper's sum — keeps alpha = 0.01 meaningful
    # whatever the batch size (the sum grows linearly with it).
    if len(z) < 2:
        return z.new_zeros(())
    z, z_hat = F.normalize(z, dim=1), F.normalize(z_hat, dim=1)
    logits = z @ z_hat.t() / tau                                                    # (B, B) sim(z_i, z^_j) / tau
    positive = logits.diagonal()
    # DEVIATION (opt-in, --contrastive ntxent): the authors' code keeps the positive in the denominator.
    if not positive_in_denominator:
        # the indicator 1[j != i] of Eqs. (15)-(16)
        logits = logits.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    # Eqs. (15)-(16)
    per_instance = torch.logsumexp(logits, dim=1) - positive
    return per_instance.sum() if reduction == "sum" else per_instance.mean()


class ProjectionHead(nn.Module):
    """Eqs. (13)-(14): z = Normalization(W_p phi(x) + b_p), a linear map to `out_dim` then L2 normalisation."""

    def __init__(self, in_dim, out_dim=128):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, feat):
        # Eqs. (13)-(14)
        return F.normalize(self.linear(feat), dim=1)


class KD3Student(nn.Module):
    """N_S(x) = g_T(phi_S(x)) (Eq. 2): the student backbone's features, then the teacher's classifier module
    itself (shared and frozen, Sec. 3.3) or, for --no-cls-share, a fresh trainable classifier.

    Exposes the models.py interface (features, classifier, feat_dim), so teacher.predict/evaluate work on it.
    """

    def __init__(self, backbone, teacher_classifier, share=True):
        super().__init__()
        self.backbone = backbone
        self.backbone.classifier.requires_grad_(False)  # unused in training; `folded` overwrites it
        self.feat_dim = teacher_classifier.in_features
        # DEVIATION: a learnable linear connector (part of phi_S) when the feature sizes differ (lenet5_half
        # 42-d -> lenet5 84-d); the paper's pairs have equal sizes, the authors' code uses a conv connector.
        self.connector = (nn.Identity() if backbone.feat_dim == self.feat_dim
                          else nn.Linear(backbone.feat_dim, self.feat_dim))
        if share:
            self.classifier = teacher_classifier  # the same module: g_T, frozen by teacher.get_teacher
        else:
            self.classifier = nn.Linear(self.feat_dim, teacher_classifier.out_features)

    def features(self, x):
        return self.connector(self.backbone.features(x))

    def forward(self, x):
        return self.classifier(self.features(x))

    @torch.no_grad()
    def folded(self):
        """A standalone copy of the backbone whose own classifier is classifier o connector (same logits)."""
        weight, bias = self.classifier.weight, self.classifier.bias
        if isinstance(self.connector, nn.Linear):
            weight, bias = weight @ self.connector.weight, weight @ self.connector.bias + bias
        self.backbone.classifier.weight.copy_(weight)
        self.backbone.classifier.bias.copy_(bias)
        return self.backbone


def contrastive_view(x, no_md, mix_delta):
    """The perturbed copy x^ of a normalised batch: MixDistribution (Eqs. 11-12) with lambda ~ Beta(delta,
    delta) and a random partner, or (--no-md) a standard random crop (pad H/8) + horizontal flip."""
    if no_md:
        # DEVIATION: Table 2's "No MD" replaces MixDistribution by "data augmentations as in [46]" (mixup);
        # here, as the issue asks, by standard crop + flip, which keeps each positive pair one image.
        return data.augment_batch(x, crop_pad=max(1, x.shape[-1] // 8), flip=True)
    b = len(x)
    concentration = torch.full((b,), mix_delta, device=x.device)
    lam = torch.distributions.Beta(concentration, concentration, validate_args=False).sample()  # no host sync
    return mix_distribution(x, lam, torch.randperm(b, device=x.device))


def kd3_losses(model, teacher_model, head_s, head_t, x, args):
    """Stage 2 of Algorithm 1 on one batch x (B, C, H, W). Returns (objective, dict of detached terms)."""
    b = len(x)
    use_mdcl = not args.no_mdcl
    inputs = torch.cat([x, contrastive_view(x, args.no_md, args.mix_delta)]) if use_mdcl else x  # (2B or B, ...)
    with torch.no_grad(), teacher_lib.autocast(x.device):
        t_feat = teacher_model.features(inputs).float()                             # (2B, D_T) phi_T
    t_logits = teacher_model.classifier(t_feat[:b])
    with teacher_lib.autocast(x.device):
        s_feat = model.features(inputs).float()                                     # (2B, D_T) phi_S (+ connector)
    s_logits = model.classifier(s_feat[:b]).float()
    weights = alignment_weights(F.softmax(s_logits, dim=1), F.softmax(t_logits, dim=1))
    terms = {"wfa": weighted_feature_alignment(s_feat[:b], t_feat[:b], weights)}
    loss = terms["wfa"]
    if use_mdcl:
        z_s, z_t = head_s(s_feat), head_t(t_feat)                                   # (2B, proj_dim) each
        kw = dict(tau=args.tau, reduction=args.mdcl_reduction, positive_in_denominator=args.contrastive == "ntxent")
        terms["mdcl_s"] = mdcl_loss(z_s[:b], z_s[b:], **kw)
        terms["mdcl_t"] = mdcl_loss(z_t[:b], z_t[b:], **kw)  # only trains the teacher's head: phi_T is frozen
        # Eqs. (17)-(18)
        loss = loss + args.alpha * (terms["mdcl_s"] + terms["mdcl_t"])
    if args.no_cls_share == "onehot":
        terms["cls"] = F.cross_entropy(s_logits, t_logits.argmax(dim=1))
        loss = loss + terms["cls"]
    elif args.no_cls_share == "soft":
        T = args.kd_t
        terms["cls"] = F.kl_div(F.log_softmax(s_logits / T, dim=1), F.softmax(t_logits / T, dim=1),
                                reduction="batchmean") * T ** 2
        loss = loss + terms["cls"]
    terms["weight"] = weights.mean()
    terms["agree"] = (s_logits.argmax(dim=1) == t_logits.argmax(dim=1)).float().mean() * 100
    return loss, {k: v.detach() for k, v in terms.items()}


#### Training ####

def select_epoch(epoch, args, p_teacher_web, model, web_x, meta, generator):
    """Stage 1 of Algorithm 1 over the whole web set. Returns (alpha_t, selected indices (k,), pred (N,))."""
    alpha_t = {"teacher": 0.0, "student": 1.0}.get(args.selection, alpha_schedule(epoch, args.epochs))
    if alpha_t > 0:
        p_student_web = F.softmax(teacher_lib.predict(model, web_x, meta["mean"], meta["std"]), dim=1)
    else:
        p_student_web = p_teacher_web
    combined = combine_predictions(p_teacher_web, p_student_web, alpha_t)
    mask, pred = select_instances(combined, args.v_th, args.threshold)
    if args.selection == "random":
        # as many images as the combined rule selects this epoch, drawn uniformly from the whole web set
        k = int(mask.sum())
        idx = torch.randperm(len(web_x), generator=generator)[:k].to(web_x.device)
    else:
        idx = mask.nonzero().squeeze(1)
    return alpha_t, idx, pred


def save_selection_grids(web_x, idx, path_prefix, grid_size, generator):
    """PNG grids of (up to grid_size) random selected and rejected web images. Every rank draws the order (the
    generator stays the same on all ranks); only rank 0 writes."""
    selected = torch.zeros(len(web_x), dtype=torch.bool)
    selected[idx.cpu()] = True
    order = torch.randperm(len(web_x), generator=generator)
    for name, keep in (("selected", selected[order]), ("rejected", ~selected[order])):
        chosen = order[keep][:grid_size]
        if len(chosen) and teacher_lib.is_main():
            save_image(web_x[chosen.to(web_x.device)].float().cpu() / 255, f"{path_prefix}-{name}.png", nrow=8)


def variant_name(args):
    parts = []
    if args.selection != "combined":
        parts.append(args.selection)
    if args.no_cls_share:
        parts.append(f"no-cls-share-{args.no_cls_share}")
    if args.no_mdcl:
        parts.append("no-mdcl")
    if args.no_md:
        parts.append("no-md")
    if args.threshold != "paper":
        parts.append(args.threshold)
    if args.contrastive != "paper":
        parts.append(args.contrastive)
    return "-".join(parts) or "kd3"


def run(args):
    args = resolve_settings(teacher_lib.resume_config(args, build_parser(), "kd3.py"))
    device = teacher_lib.get_device(args.device)
    teacher_lib.seed_everything(args.seed)
    meta = data.DATASETS[args.dataset]
    num_classes = meta["num_classes"]
    if args.download and teacher_lib.is_main():
        data.download(args.dataset, args.data_root)
    teacher_lib.barrier()
    teacher_model, _ = teacher_lib.get_teacher(args.dataset, args.teacher_arch, args.seed, args.data_root, device,
                                               args.teacher, args.checkpoint_dir, args.download)
    student = models.build_model(args.student_arch, num_classes, meta["channels"])
    test_x, test_y = data.load_dataset(args.dataset, "test", args.data_root)
    web_x, _, web_source = data.load_source(args.web, "train", args.data_root, meta["channels"],
                                                     meta["size"], args.seed)
    variant = variant_name(args)
    log = teacher_lib.RunLog(f"kd3-{args.dataset}" + ("" if variant == "kd3" else f"-{variant}"), args, args.runs_dir)
    test_x, test_y, web_x, web_source = test_x.to(device), test_y.to(device), web_x.to(device), web_source.to(device)
    teacher_acc = teacher_lib.evaluate(teacher_model, test_x, test_y, meta["mean"], meta["std"])
    # N_T(x) over the web set never changes: computed once
    p_teacher_web = F.softmax(teacher_lib.predict(teacher_model, web_x, meta["mean"], meta["std"]), dim=1)
    teacher_web_hist = torch.bincount(p_teacher_web.argmax(1), minlength=num_classes).tolist()
    num_sources = int(web_source.max()) + 1
    print(f"teacher {args.teacher_arch}: {teacher_acc:.2f}% test accuracy; web {args.web}: {len(web_x)} images "
          f"{tuple(web_x.shape[1:])}, teacher-predicted classes {teacher_web_hist}; device {device}", flush=True)

    model = teacher_lib.prepare_model(KD3Student(student, teacher_model.classifier, share=not args.no_cls_share),
                                      device)
    head_s = ProjectionHead(model.feat_dim, args.proj_dim).to(device)
    head_t = ProjectionHead(teacher_model.feat_dim, args.proj_dim).to(device)
    params = [p for m in (model, head_s, head_t) for p in m.parameters() if p.requires_grad]
    opt = teacher_lib.make_optimizer(params, args)
    if teacher_lib.rank() > 0:  # same initial weights on every rank (above); its own MixDistribution draws below
        torch.manual_seed(teacher_lib.rank_seed(args.seed))
    select_gen = torch.Generator().manual_seed(args.seed)  # the same on every rank: the same random selection
    empty_epochs, first_epoch, last = 0, 0, {}
    if log.state:
        for name, module in (("model", model), ("head_s", head_s), ("head_t", head_t), ("opt", opt)):
            module.load_state_dict(log.state[name])
        teacher_lib.set_rng_state(log.state["rng"], device, select=select_gen)
        empty_epochs, first_epoch, last = log.state["empty_epochs"], log.state["epoch"], log.state["last"]
    with log.stop_cleanly("kd3.py"):
        for epoch in range(first_epoch, args.epochs):
            lr = args.lr * 0.1 ** sum(epoch >= m for m in args.milestones)  # /10 at each milestone (Sec. 4)
            for group in opt.param_groups:
                group["lr"] = lr
            start = time.time()
            alpha_t, idx, pred = select_epoch(epoch, args, p_teacher_web, model, web_x, meta, select_gen)
            k = len(idx)
            per_class = torch.bincount(pred[idx], minlength=num_classes).tolist()
            per_source = torch.bincount(web_source[idx], minlength=num_sources).tolist()
            if epoch in (0, args.epochs - 1):
                save_selection_grids(web_x, idx, log.path(f"epoch{epoch + 1}"), args.grid_size, select_gen)
            select_s = time.time() - start
            model.train()
            head_s.train()
            head_t.train()
            sums, seen = {}, 0
            start = time.time()
            if k == 0:
                empty_epochs += 1
                print(f"epoch {epoch + 1}: no web instance selected (alpha(t) {alpha_t:.3f}, V_th {args.v_th}); "
                      f"skipping the update, training continues", flush=True)
            loader = data.DeviceLoader(web_x, batch_size=args.batch_size, shuffle=True, crop_pad=meta["crop_pad"],
                                       flip=meta["flip"], mean=meta["mean"], std=meta["std"], device=device,
                                       seed=args.seed + epoch, indices=idx, rank=teacher_lib.rank(),
                                       world_size=teacher_lib.world_size())
            for (x,) in loader:
                loss, terms = kd3_losses(model, teacher_model, head_s, head_t, x, args)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                teacher_lib.average_gradients(params)
                opt.step()
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0) + value * len(x)
                seen += len(x)
            seconds = time.time() - start
            totals = teacher_lib.epoch_sums({**sums, "seen": seen}) if k else {}  # the one sync of the epoch
            means = {name: totals[name] / totals["seen"] for name in sums}
            log.check_finite(f"epoch {epoch + 1}", means)
            teacher_lib.average_buffers(model)
            test_acc = teacher_lib.evaluate(model, test_x, test_y, meta["mean"], meta["std"])
            log.log_epoch(epoch, args.epochs, {"alpha_t": alpha_t, "selected": k, **means, "test_acc": test_acc,
                                               "lr": lr, "select_s": round(select_s, 2),
                                               "selected_per_class": per_class, "selected_per_source": per_source},
                          k, seconds)
            last = {"selected": k, "test_acc": test_acc, "selected_per_class": per_class,
                    "selected_per_source": per_source}
            log.save_state({"epoch": epoch + 1, "model": model.state_dict(), "head_s": head_s.state_dict(),
                            "head_t": head_t.state_dict(), "opt": opt.state_dict(), "empty_epochs": empty_epochs,
                            "last": last, "rng": teacher_lib.rng_state(device, select=select_gen)},
                           f"epoch {epoch + 1}/{args.epochs}")

    path = log.path("student.pt")
    if teacher_lib.is_main():
        models.save_checkpoint(path, model.folded(), args.student_arch, num_classes, meta["channels"], args,
                               last["test_acc"], dataset=args.dataset, image_size=meta["size"])
    print(f"saved student to {path} (connector and shared classifier folded into its classifier)", flush=True)
    return log.finish("kd3", args.dataset, {
        "variant": variant, "teacher_acc": teacher_acc, "student_acc": last["test_acc"], "web": args.web,
        "web_size": len(web_x), "teacher_web_hist": teacher_web_hist, "selected": last["selected"],
        "selected_frac": last["selected"] / len(web_x), "selected_per_class": last["selected_per_class"],
        "selected_per_source": last["selected_per_source"], "epochs_without_selection": empty_epochs,
        "student_checkpoint": path})


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
