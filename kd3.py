"""KD3: Knowledge Distillation between Different Distributions (Tang, Chen, Niu, Sugiyama, Gong,
ICCV 2023).

The teacher's training data is unavailable; a large "webly collected" set with a distribution shift
is. Every epoch, KD3 (Stage 1) selects web images whose combined teacher/student prediction is
confident relative to a per-class threshold (Eqs. 3-8), then (Stage 2) trains the student's feature
extractor to match the teacher's features through the teacher's frozen, *shared* classifier,
weighting each image by teacher/student agreement (Eqs. 9-10), plus a contrastive loss between each
image and a MixDistribution copy whose per-channel mean/std are mixed with another image's
(Eqs. 11-17). Objective: L_wfa + alpha L_mdcl (18).

    python kd3.py --epochs 20          # Fashion-MNIST, LeNet-5 -> LeNet-5-half on
                                       # `fashionmnist-web`, ~5 min on 2 cores
    python kd3.py --dataset cifar10    # ResNet34 -> ResNet18 on ImageNet 32x32 (paper: 95.21%)

Ablations of Table 2: --no-cls-share {onehot,soft}, --selection {random,student,teacher}, --no-mdcl,
--no-md. On Fashion-MNIST (teacher 90.26%) the 20-epoch student reaches ~76%, the 5-epoch one ~75%
(docs/kd3.md).
"""

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import models
import pictures
import runtime
from teacher import get_teacher

#### Settings: the paper's defaults per dataset family ####
# (every value is also a CLI flag; --help shows them)
# cifar: Sec. 4 "Implementation Details" (SGD 0.05, momentum 0.9, wd 5e-4, 240 epochs, /10 at
#        150/180/210). The batch size is not given in the paper (the authors' code uses 1024); 128
#        is the CIFAR recipe's.
# mnist: LeNet5 -> LeNet5-half, Adam 1e-3, 40 epochs (Sec. 4, Table 1).
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
    ),
}
# The webly collected data D-bar per dataset (Sec. 4 "Webly Collected Datasets": grayscaled MNIST-M
# + SVHN for MNIST, ImageNet downsampled to the original size otherwise). Fashion-MNIST and KMNIST
# have no web set in the paper; their defaults are the offline shifted proxies of data.py
# (NAMED_MIXES).
WEB = {
    "mnist": "mnistm,svhn",
    "fashionmnist": "fashionmnist-web",
    "kmnist": "kmnist-web",
    "cifar10": "imagenet32",
    "cifar100": "imagenet32",
    "cinic10": "imagenet32",
    "tinyimagenet": "imagenet64",
    "synthetic": "shifted:synthetic:600,noise-uniform:200",
}


def build_parser():
    parser = runtime.method_parser(
        "KD3 (ICCV 2023): distillation with webly collected images under distribution shift.",
        SETTINGS,
        seed="the student, the selection and the augmentation",
        notes={
            "teacher_arch": "Table 1",
            "student_arch": "Table 1",
            "epochs": "I of Eq. (4)",
            "batch_size": "not given in the paper (authors' code: 1024)",
        },
    )
    p = parser.add_argument_group("KD3 (Sec. 4 'Implementation Details', Fig. 4, Table 2)")
    p.add_argument(
        "--web",
        default=None,
        help="webly collected data D-bar, any data.py source list; default per "
        "dataset: " + ", ".join(f"{k} {v}" for k, v in WEB.items()),
    )
    # KD3 hyper-parameters (Sec. 4 "Implementation Details", Fig. 4)
    p.add_argument("--v-th", type=float, default=0.95, help="V_th of Eq. (6), the paper's value")
    p.add_argument(
        "--tau", type=float, default=0.3, help="temperature of Eqs. (15)-(16), the paper's value"
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=0.01,
        help="weight of L_mdcl in Eq. (18), the paper's value (authors' code: 0.001)",
    )
    p.add_argument(
        "--mix-delta",
        type=float,
        default=0.1,
        help="lambda ~ Beta(delta, delta) of Eq. (11); not given in the paper, the authors' "
        "code's value",
    )
    p.add_argument(
        "--proj-dim",
        type=int,
        default=128,
        help="projection head output, Eqs. (13)-(14); the authors' code's value",
    )
    p.add_argument(
        "--mdcl-reduction",
        default="mean",
        choices=["mean", "sum"],
        help="Eqs. (15)-(16) sum over "
        "instances (sum); mean over the batch (mean, batch-size independent)",
    )
    # Ablations (Table 2) and the authors' code variants (docs/kd3.md)
    p.add_argument(
        "--selection",
        default="combined",
        choices=["combined", "random", "student", "teacher"],
        help="Table 2 'Instance selection': Eqs. (3)-(8) (combined), as many random images as the "
        "combined rule selects (random), alpha(t)=1 always (student), alpha(t)=0 always (teacher)",
    )
    p.add_argument(
        "--no-cls-share",
        default=None,
        choices=["onehot", "soft"],
        help="Table 2 'No classifier sharing': a fresh student classifier trained by CE on the "
        "teacher's argmax or KL on its soft labels (default: off, the classifier is shared)",
    )
    p.add_argument(
        "--kd-t",
        type=float,
        default=4.0,
        help="KL temperature of --no-cls-share soft (not given in the paper)",
    )
    p.add_argument(
        "--no-cls-share-predictions",
        default="own",
        choices=["own", "shared"],
        help="with --no-cls-share: N_S(x) of the selection (Eq. 3) and the weights (Eq. 9) from "
        "the student's own new classifier (own), or from g_T on the student's features as in full "
        "KD3 (shared: only the classifier that is trained and tested changes)",
    )
    p.add_argument(
        "--no-mdcl", action="store_true", help="Table 2 'No L_mdcl': drop Eq. (17) from Eq. (18)"
    )
    p.add_argument(
        "--no-md",
        action="store_true",
        help="Table 2 'No MD': contrastive views from standard "
        "augmentation (random crop + flip) instead of MixDistribution, Eqs. (11)-(12)",
    )
    p.add_argument(
        "--threshold",
        default="paper",
        choices=["paper", "flexmatch"],
        help="Eqs. (6)-(7) (paper), "
        "or the authors' code: T_k = V_th * b_k / (2 - b_k), b_k = n_k / max_j n_j (flexmatch)",
    )
    p.add_argument(
        "--contrastive",
        default="paper",
        choices=["paper", "ntxent"],
        help="Eqs. (15)-(16) with j != i in the denominator (paper), or the positive kept there "
        "as in the authors' code (ntxent)",
    )
    p.add_argument(
        "--grid-size", type=int, default=64, help="images per selected/rejected PNG grid"
    )
    return parser


def resolve_settings(args):
    """The run's settings: every flag left out takes its value from SETTINGS and WEB (above), or
    from the saved config.json under --resume; then `check_settings`."""
    args = runtime.complete_args(args, build_parser(), "kd3.py", SETTINGS, per_dataset={"web": WEB})
    return check_settings(args)


def check_settings(args):
    """Refuse a bad value in one line, before any work."""
    runtime.check_training_flags(args, SETTINGS, checkpoints=args.teacher is None)
    check, default = runtime.check_range, build_parser().get_default
    check("--v-th", args.v_th, 0, 1, open_low=True, paper="0.95")
    check("--tau", args.tau, 0, open_low=True, paper="0.3")
    check("--alpha", args.alpha, 0, paper="0.01 (the authors' code 0.001)")
    check("--mix-delta", args.mix_delta, 0, open_low=True, fix="the authors' code uses 0.1")
    check("--proj-dim", args.proj_dim, 1, fix="the authors' code uses 128")
    check("--kd-t", args.kd_t, 0, open_low=True, fix=f"the default is {default('kd_t')}")
    check("--grid-size", args.grid_size, 1, fix=f"the default is {default('grid_size')}")
    return args


#### Losses and selection ####


def alpha_schedule(epoch, total_epochs):
    """Eq. (4): alpha(t) = exp(-5 (t / (I/2) - 1)^2) for t <= I/2, else 1; t counted from 0,
    I = total epochs."""
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

    A class nobody predicts gets threshold 0 (and has no instance to select). rule="flexmatch" is
    the authors' code: T_k = V_th * b_k / (2 - b_k) with b_k = n_k / max_j n_j.
    """
    counts = torch.bincount(pred, minlength=num_classes).float()  # (K,) n_k
    # Eq. (7)
    normalized = counts / counts.max().clamp(min=1)
    if rule == "flexmatch":
        # DEVIATION (opt-in, --threshold flexmatch): the authors' code's FlexMatch-style mapping.
        return v_th * normalized / (2 - normalized)
    # Eq. (6)
    return normalized * v_th


def select_instances(combined, v_th, rule="paper"):
    """Eqs. (5)-(8): keep x_i iff p_i > T_{y_i^pred} (strict).
    Returns (mask (N,) bool, pred (N,) long)."""
    # Eq. (5)
    confidence, pred = combined.max(dim=1)
    thresholds = class_thresholds(pred, combined.shape[1], v_th, rule)
    # Eq. (8)
    return confidence > thresholds[pred], pred


def alignment_weights(p_student, p_teacher):
    """Eq. (9): w_i = 1 - sigmoid(||N_S(x_i) - N_T(x_i)||_1) on probabilities, detached;
    (N,) in (0.119, 0.5]."""
    # Eq. (9)
    return (1 - torch.sigmoid((p_student - p_teacher).abs().sum(dim=1))).detach()


def weighted_feature_alignment(feat_s, feat_t, weights):
    """Eq. (10): (1/|D_s|) sum_i w_i MSE(phi_S(x_i), phi_T(x_i)), MSE = mean over feature
    dimensions."""
    # Eq. (10)
    return (weights * (feat_s - feat_t).pow(2).mean(dim=1)).mean()


def mix_distribution(x, lam, perm, eps=1e-6):
    """Eqs. (11)-(12) on images (B, C, H, W): each image's per-channel mean/std (population std over
    H x W, sqrt(var + eps), detached) replaced by lam * own + (1 - lam) * those of image perm[i].
    lam: (B,)."""
    mu = x.mean(dim=(2, 3), keepdim=True).detach()  # (B, C, 1, 1)
    sigma = (x.var(dim=(2, 3), keepdim=True, unbiased=False) + eps).sqrt().detach()  # (B, C, 1, 1)
    lam = lam.view(-1, 1, 1, 1).to(x.dtype)
    # Eq. (11)
    gamma_mix = lam * sigma + (1 - lam) * sigma[perm]
    beta_mix = lam * mu + (1 - lam) * mu[perm]
    # Eq. (12)
    return gamma_mix * (x - mu) / sigma + beta_mix


def mdcl_loss(z, z_hat, tau, reduction="mean", positive_in_denominator=False):
    """Eqs. (15)/(16): -log exp(sim(z_i, z^_i)/tau) / sum_{j != i} exp(sim(z_i, z^_j)/tau), cosine
    similarity.

    z, z_hat: (B, D) embeddings of the unperturbed and perturbed images (normalised here, so cosine
    similarity is their dot product). reduction="sum" is the paper's sum over instances; the default
    "mean" divides by B. positive_in_denominator=True is the authors' code (NT-Xent-style). A batch
    of fewer than two instances has no negative and gives 0.
    """
    # DEVIATION: mean over instances by default instead of the paper's sum — keeps alpha = 0.01
    # meaningful whatever the batch size (the sum grows linearly with it).
    if len(z) < 2:
        return z.new_zeros(())
    z, z_hat = F.normalize(z, dim=1), F.normalize(z_hat, dim=1)
    logits = z @ z_hat.t() / tau  # (B, B) sim(z_i, z^_j) / tau
    positive = logits.diagonal()
    # DEVIATION (opt-in, --contrastive ntxent): the authors' code keeps the positive in the
    # denominator.
    if not positive_in_denominator:
        # the indicator 1[j != i] of Eqs. (15)-(16)
        logits = logits.masked_fill(
            torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf")
        )
    # Eqs. (15)-(16)
    per_instance = torch.logsumexp(logits, dim=1) - positive
    return per_instance.sum() if reduction == "sum" else per_instance.mean()


def contrastive_view(x, no_md, mix_delta):
    """The perturbed copy x^ of a normalised batch: MixDistribution (Eqs. 11-12) with lambda ~
    Beta(delta, delta) and a random partner, or (--no-md) a standard random crop (pad H/8) +
    horizontal flip."""
    if no_md:
        # DEVIATION: Table 2's "No MD" replaces MixDistribution by "data augmentations as in [46]"
        # (mixup); here by standard crop + flip, which keeps each positive pair one image.
        return data.augment_batch(x, crop_pad=max(1, x.shape[-1] // 8), flip=True)
    b = len(x)
    concentration = torch.full((b,), mix_delta, device=x.device)
    lam = torch.distributions.Beta(
        concentration, concentration, validate_args=False
    ).sample()  # no host sync
    return mix_distribution(x, lam, torch.randperm(b, device=x.device))


#### Networks ####


class SharedClassifierStudent(nn.Module):
    """N_S(x) = g_T(phi_S(x)) (Eq. 2, Sec. 3.3): the student's feature extractor, a connector to the
    teacher's feature size, and the teacher's classifier g_T, shared: a frozen copy that training
    never updates.

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


class ProjectionHead(nn.Module):
    """Eqs. (13)-(14): z = Normalization(W_p phi(x) + b_p), a linear map to `out_dim` then L2
    normalisation."""

    def __init__(self, in_dim, out_dim=128):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, feat):
        # Eqs. (13)-(14)
        return F.normalize(self.linear(feat), dim=1)


class KD3Networks(nn.Module):
    """What Stage 2 trains, in one forward: the student and (with L_mdcl) the projection heads of
    both networks. forward(inputs, t_feat) -> (phi_S(inputs), N_S logits, z^S, z^T); the heads'
    outputs are None without L_mdcl. Only the teacher's projection head sees teacher features: phi_T
    itself stays frozen."""

    def __init__(self, student, teacher_feat_dim, proj_dim, with_heads=True):
        super().__init__()
        self.student = student
        self.head_s = ProjectionHead(student.feat_dim, proj_dim) if with_heads else None
        self.head_t = ProjectionHead(teacher_feat_dim, proj_dim) if with_heads else None

    def forward(self, inputs, t_feat):
        s_feat = self.student.features(inputs)  # (2B, D_T) phi_S + connector
        s_logits = self.student.classifier(s_feat)  # (2B, K)
        if self.head_s is None:
            return s_feat, s_logits, None, None
        return s_feat, s_logits, self.head_s(s_feat), self.head_t(t_feat)  # (2B, proj_dim) each


#### One step of Algorithm 1 ####
# Under torchrun a step gets the network it updates wrapped in DistributedDataParallel (`trained`:
# its backward averages the gradients over the processes, so that every process takes the same
# step) and the networks it only reads as they are (the teacher; the student that Stage 1 predicts
# with): they have no gradient to average.


@torch.no_grad()
def select_web_instances(
    epoch,
    p_teacher_web,
    student,
    web_x,
    meta,
    generator,
    *,
    total_epochs,
    v_th,
    selection="combined",
    threshold="paper",
    shared_classifier=None,
):
    """Stage 1 (lines 4-8) over the whole web set D-bar.
    Returns (alpha(t), indices of D_s (k,), y_pred (N,)).

    p_teacher_web: N_T(x) of every web image (N, K), computed once; total_epochs: I of Eq. (4);
    v_th: V_th of Eq. (6); selection: "combined" (Eqs. 3-8), or Table 2's "random", "student",
    "teacher"; threshold: "paper" or "flexmatch" (class_thresholds); generator: the draws of
    selection "random"; shared_classifier: g_T, when N_S(x) must come from it rather than from the
    student's own classifier."""
    # line 5, Eq. (4); Table 2's "teacher only" / "student only" fix alpha(t) at 0 / 1
    alpha_t = {"teacher": 0.0, "student": 1.0}.get(selection, alpha_schedule(epoch, total_epochs))
    p_student_web = p_teacher_web
    if alpha_t > 0:
        # Eq. (2): N_S(x) = g_T(phi_S(x)) with the shared classifier
        logits, feats = runtime.predict(student, web_x, meta["mean"], meta["std"], features=True)
        p_student_web = F.softmax(
            logits if shared_classifier is None else shared_classifier(feats), dim=1
        )
    # line 6, Eq. (3)
    combined = combine_predictions(p_teacher_web, p_student_web, alpha_t)
    # lines 7-8, Eqs. (5)-(8)
    mask, pred = select_instances(combined, v_th, threshold)
    if selection == "random":
        # Table 2 "random": as many images as the combined rule selects, drawn uniformly from the
        # whole web set
        k = int(mask.sum())
        return alpha_t, torch.randperm(len(web_x), generator=generator)[:k].to(web_x.device), pred
    return alpha_t, mask.nonzero().squeeze(1), pred


def train_step(
    trained,
    teacher,
    x,
    opt,
    *,
    tau,
    alpha,
    mix_delta,
    mdcl=True,
    md=True,
    mdcl_reduction="mean",
    contrastive="paper",
    cls_share="shared",
    shared_predictions=False,
    kd_t=None,
):
    """Stage 2 (lines 9-15) on one batch x (B, C, H, W) of D_s: one update of N_S and the projection
    heads. trained: KD3Networks (under torchrun inside DistributedDataParallel). Returns the batch's
    terms.

    tau: the temperature of Eqs. (15)-(16); alpha: the weight of L_mdcl in Eq. (18); mix_delta: the
    delta of lambda ~ Beta(delta, delta), Eq. (11). The variants of Table 2 and the authors' code:
    mdcl=False drops L_mdcl ("No L_mdcl"); md=False makes the contrastive view by crop + flip ("No
    MD"); mdcl_reduction "mean" or "sum" and contrastive "paper" or "ntxent" (mdcl_loss); cls_share
    "onehot" or "soft" trains the student's own classifier by CE on the teacher's argmax or by KL at
    temperature kd_t ("No classifier sharing"), with N_S(x) of Eq. (9) from g_T on the student's
    features when shared_predictions."""
    b = len(x)
    # line 12, Eq. (12): the perturbed copy x^ of every image, fed through both networks with x
    inputs = torch.cat([x, contrastive_view(x, not md, mix_delta)]) if mdcl else x  # (2B or B, ...)
    with torch.no_grad(), runtime.autocast(x.device):
        t_feat = teacher.features(inputs).float()  # (2B, D_T) phi_T
        t_logits = teacher.classifier(t_feat[:b]).float()  # (B, K) N_T(x)
    with runtime.autocast(x.device):
        s_feat, s_logits, z_s, z_t = trained(inputs, t_feat)
    s_feat, s_logits = s_feat.float(), s_logits[:b].float()
    # N_S(x) of Eq. (9): the student's predictions, or (shared_predictions) g_T on its features
    n_s = teacher.classifier(s_feat[:b].detach()) if shared_predictions else s_logits
    # line 10, Eq. (9)
    weights = alignment_weights(F.softmax(n_s, dim=1), F.softmax(t_logits, dim=1))
    # line 11, Eq. (10)
    terms = {"wfa": weighted_feature_alignment(s_feat[:b], t_feat[:b], weights)}
    loss = terms["wfa"]
    if mdcl:
        kw = dict(
            tau=tau, reduction=mdcl_reduction, positive_in_denominator=contrastive == "ntxent"
        )
        # line 13, Eqs. (15)-(17)
        terms["mdcl_s"] = mdcl_loss(z_s[:b].float(), z_s[b:].float(), **kw)
        terms["mdcl_t"] = mdcl_loss(
            z_t[:b].float(), z_t[b:].float(), **kw
        )  # trains the teacher's head only
        # line 14, Eq. (18)
        loss = loss + alpha * (terms["mdcl_s"] + terms["mdcl_t"])
    if cls_share == "onehot":  # Table 2 "No classifier sharing": the student's own head trains
        terms["cls"] = F.cross_entropy(s_logits, t_logits.argmax(dim=1))
        loss = loss + terms["cls"]
    elif cls_share == "soft":
        T = kd_t
        terms["cls"] = (
            F.kl_div(
                F.log_softmax(s_logits / T, dim=1),
                F.softmax(t_logits / T, dim=1),
                reduction="batchmean",
            )
            * T**2
        )
        loss = loss + terms["cls"]
    # line 15
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    terms["weight"] = weights.mean()
    terms["agree"] = (s_logits.argmax(dim=1) == t_logits.argmax(dim=1)).float().mean() * 100
    return terms


#### Training ####


def train(args, teacher, student, web, test, log):
    """Algorithm 1: every epoch, Stage 1 selects D_s from the web set, Stage 2 trains the student on
    it. Returns why training stopped early, or None."""
    trained = KD3Networks(student, teacher.feat_dim, args.proj_dim, with_heads=not args.no_mdcl).to(
        web.x.device
    )
    opt = runtime.make_optimizer([p for p in trained.parameters() if p.requires_grad], args)
    lr_schedule = torch.optim.lr_scheduler.MultiStepLR(opt, args.milestones, gamma=0.1)  # lr / 10
    select_gen = torch.Generator().manual_seed(
        args.seed
    )  # the same on every rank: the same random selection
    shared = uses_shared_predictions(args)
    select = dict(
        total_epochs=args.epochs,
        v_th=args.v_th,
        selection=args.selection,
        threshold=args.threshold,
        shared_classifier=teacher.classifier if shared else None,
    )
    step = dict(
        tau=args.tau,
        alpha=args.alpha,
        mix_delta=args.mix_delta,
        mdcl=not args.no_mdcl,
        md=not args.no_md,
        mdcl_reduction=args.mdcl_reduction,
        contrastive=args.contrastive,
        cls_share=args.no_cls_share or "shared",
        shared_predictions=shared,
        kd_t=args.kd_t,
    )
    training = runtime.Training(
        log,
        args.epochs,
        save={"networks": trained, "opt": opt},
        rngs={"select": select_gen},
        lr_schedule=lr_schedule,
    )
    trained = runtime.distribute(trained)
    for epoch in training.epochs():
        alpha_t, selected, pred = select_web_instances(  # Stage 1
            epoch, web.p_teacher, student, web.x, web.meta, select_gen, **select
        )
        for x in web.batches(selected, epoch):  # Stage 2
            training.record(len(x), **train_step(trained, teacher, x, opt, **step))
        test_acc = runtime.evaluate(student, *test, web.meta["mean"], web.meta["std"])
        if epoch in (0, args.epochs - 1):
            web.save_pictures(epoch, selected, pred, log)
        training.end_epoch(test_acc=test_acc, alpha_t=alpha_t, **web.report(selected, pred))
        if len(selected) == 0 and alpha_t == 1:  # N_S no longer moves, so the selection stays empty
            return (
                f"no web image was selected at epoch {epoch + 1} with alpha(t) = 1: the student "
                f"did not change, so no later epoch can select one"
            )
    return None


def uses_shared_predictions(args):
    """Whether N_S(x) of Eqs. (3) and (9) is g_T(phi_S(x)) while the student trains a classifier of
    its own."""
    return bool(args.no_cls_share) and args.no_cls_share_predictions == "shared"


class WebSet:
    """The webly collected data D-bar on the device: images (N, C, H, W) uint8, the index of the
    source each came from, the teacher's softmax N_T(x) of every image (`label_with`), and how an
    epoch's selection is batched and reported."""

    def __init__(self, args, device):
        self.args, self.meta = args, data.DATASETS[args.dataset]
        x, labels, source = data.load_source(
            args.web, "train", args.data_root, self.meta["channels"], self.meta["size"], args.seed
        )
        if not len(x):
            raise ValueError(f"--web {args.web!r} holds no image — give a source with images")
        self.x, self.source = x.to(device), source.to(device)
        self.sources = [
            s.strip()
            for s in ",".join(
                data.NAMED_MIXES.get(s.strip(), s.strip()) for s in args.web.split(",")
            ).split(",")
            if s.strip()
        ]
        self.source_sizes = torch.bincount(self.source, minlength=len(self.sources))
        # Images whose labels are the teacher's own classes (the teacher's dataset itself, or
        # style-shifted): there the truth is known, so the selection's preference for
        # in-distribution images can be measured.
        truth = [
            data.parse_source(s)[0].removeprefix("shifted:") == args.dataset for s in self.sources
        ]
        self.in_distribution = torch.tensor(truth, device=device)[self.source]
        self.labels = labels.to(device)

    def label_with(self, teacher):
        """N_T(x) of every web image (computed once: the teacher never changes) and what it says of
        them."""
        self.p_teacher = F.softmax(
            runtime.predict(teacher, self.x, self.meta["mean"], self.meta["std"]), dim=1
        )
        self.teacher_hist = torch.bincount(
            self.p_teacher.argmax(1), minlength=self.meta["num_classes"]
        ).tolist()
        self.teacher_correct = self.p_teacher.argmax(1) == self.labels
        self.teacher_acc_in_distribution = _percent(self.teacher_correct, self.in_distribution)

    def batches(self, selected, epoch):
        """D_s in shuffled batches with the teacher recipe's crop/flip; a new order every epoch."""
        return (
            x
            for (x,) in data.DeviceLoader(
                self.x,
                batch_size=self.args.batch_size,
                shuffle=True,
                crop_pad=self.meta["crop_pad"],
                flip=self.meta["flip"],
                mean=self.meta["mean"],
                std=self.meta["std"],
                device=self.x.device,
                seed=self.args.seed + epoch,
                indices=selected,
                rank=runtime.rank(),
                world_size=runtime.world_size(),
            )
        )

    def save_pictures(self, epoch, selected, pred, log):
        """epoch<k>-selected.png and epoch<k>-rejected.png: up to --grid-size random kept / dropped
        images, each captioned with its predicted class and the source it came from."""
        if not runtime.is_main():
            return
        short = [data.parse_source(s)[0].replace("shifted:", "s-") for s in self.sources]  # width
        kept = torch.zeros(len(self.x), dtype=torch.bool)
        kept[selected.cpu()] = True
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.args.seed))
        pred, source = pred.cpu(), self.source.cpu()
        names = self.meta["classes"] or [str(c) for c in range(self.meta["num_classes"])]
        for name, mask in (("selected", kept[order]), ("rejected", ~kept[order])):
            chosen = order[mask][: self.args.grid_size]
            if len(chosen):
                captions = [
                    f"{names[int(pred[i])]}\n{short[int(source[i])]}" for i in chosen.tolist()
                ]
                path = log.path(f"epoch{epoch + 1}-{name}.png")
                pictures.captioned_grid(self.x[chosen.to(self.x.device)], captions, path)

    def report(self, selected, pred):
        """What the selection kept: its size, per predicted class, per source (and the kept fraction
        of each), the teacher's accuracy on the kept in-distribution images (vs on all of them:
        teacher_acc_in_distribution)."""
        kept = torch.zeros(len(self.x), dtype=torch.bool, device=self.x.device)
        kept[selected] = True
        per_source = torch.bincount(self.source[selected], minlength=len(self.sources))
        return {
            "selected": len(selected),
            "selected_per_class": torch.bincount(
                pred[selected], minlength=self.meta["num_classes"]
            ).tolist(),
            "selected_per_source": per_source.tolist(),
            "kept_frac_per_source": [
                round(v, 4) for v in (per_source / self.source_sizes.clamp(min=1)).tolist()
            ],
            "teacher_acc_kept_in_distribution": _percent(
                self.teacher_correct, self.in_distribution & kept
            ),
        }


def _percent(flags, mask):
    """100 * mean of boolean `flags` where `mask` holds; None where it holds nowhere."""
    return round(flags[mask].float().mean().item() * 100, 3) if bool(mask.any()) else None


def variant_name(args):
    parts = []
    if args.selection != "combined":
        parts.append(args.selection)
    if args.no_cls_share:
        shared = "-shared-predictions" if uses_shared_predictions(args) else ""
        parts.append(f"no-cls-share-{args.no_cls_share}{shared}")
    if args.no_mdcl:
        parts.append("no-mdcl")
    if args.no_md:
        parts.append("no-md")
    if args.threshold != "paper":
        parts.append(args.threshold)
    if args.contrastive != "paper":
        parts.append(args.contrastive)
    return "-".join(parts) or "kd3"


def build_student(args, teacher, meta):
    """N_S: the student network with the shared classifier (Sec. 3.3), or its own (Table 2 'No
    classifier sharing': the same student whose classifier is a fresh linear layer, trained)."""
    student = SharedClassifierStudent(
        models.build_model(args.student_arch, meta["num_classes"], meta["channels"]),
        teacher.classifier,
    )
    if args.no_cls_share:
        student.classifier = nn.Linear(student.feat_dim, meta["num_classes"])
    return student


def run(args):
    args = resolve_settings(args)
    device = runtime.get_device(args.device)
    runtime.seed_everything(args.seed)
    meta = data.DATASETS[args.dataset]
    runtime.download_if_asked(args)
    # a --teacher that does not fit is refused before any data is read
    teacher, teacher_ckpt = get_teacher(args, device)
    test_x, test_y = data.load_dataset(args.dataset, "test", args.data_root)
    web = WebSet(args, device)
    web.label_with(teacher)
    variant = variant_name(args)
    log = runtime.RunLog(
        f"kd3-{args.dataset}" + ("" if variant == "kd3" else f"-{variant}"), args, args.runs_dir
    )
    test = (test_x.to(device), test_y.to(device))
    teacher_acc = runtime.evaluate(teacher, *test, meta["mean"], meta["std"])
    print(
        f"teacher {args.teacher_arch}: {teacher_acc:.2f}% test accuracy; web {args.web}: "
        f"{len(web.x)} images {tuple(web.x.shape[1:])}, teacher-predicted classes "
        f"{web.teacher_hist}; device {device}",
        flush=True,
    )

    student = runtime.prepare_model(build_student(args, teacher, meta), device)
    stopped = train(args, teacher, student, web, test, log)

    last = log.last_record  # the final epoch
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
                last["test_acc"],
                dataset=args.dataset,
                image_size=meta["size"],
            )
    print(
        f"saved student to {path} (connector and shared classifier folded into its classifier)",
        flush=True,
    )
    results = log.finish(
        "kd3",
        args.dataset,
        {
            "variant": variant,
            "teacher_acc": teacher_acc,
            "student_acc": last["test_acc"],
            "web": args.web,
            "teacher_sha256": teacher_ckpt["sha256"],
            "web_size": len(web.x),
            "web_sources": web.sources,
            "teacher_web_hist": web.teacher_hist,
            "selected": last["selected"],
            "selected_frac": last["selected"] / len(web.x),
            "selected_per_class": last["selected_per_class"],
            "selected_per_source": last["selected_per_source"],
            "kept_frac_per_source": last["kept_frac_per_source"],
            "teacher_acc_in_distribution": web.teacher_acc_in_distribution,
            "teacher_acc_kept_in_distribution": last["teacher_acc_kept_in_distribution"],
            "epochs_trained": last["epoch"],
            "stopped_early": stopped,
            "student_checkpoint": path,
        },
    )
    if stopped:
        raise ValueError(
            f"{stopped} — the run stopped at that epoch (marked in {log.path('results.json')}); "
            f"--selection combined or teacher keeps a selection"
        )
    return results


def main(argv=None):
    runtime.cli(run, build_parser(), "kd3.py", argv)


if __name__ == "__main__":
    main()
