"""Throughput of each method's training step: the repository's fast path against the same step written the naive way.

For every (teacher, student) pair and every step below, the *fast* path calls the method files' own public
functions on synthetic uint8 tensors of the real shapes, resident on the device and batched by
data.DeviceLoader (crop/flip/normalise on whole batches); the frozen teacher runs under no_grad /
inference_mode, and on CUDA under bf16 autocast with channels_last (teacher.autocast / prepare_model). The
*naive* path, written here, is the textbook version of the same step: torch.utils.data.DataLoader over a
Dataset with per-sample torchvision transforms on PIL images, fp32, contiguous tensors, a teacher that is
only put in eval() (parameters trainable, no no_grad, outputs .detach()ed) and a loss.item() per step.

    kd3            KD3 (kd3.kd3_losses): teacher features of the clean + MixDistribution views (2B images),
                   student forward/backward through the shared classifier, both projection heads
    hidfd-gan      HiDFD stage 1: one discriminator step and one generator step (Eq. 13)
    hidfd-distill  HiDFD stage 2: feature alignment (Eq. 14) through the shared classifier
    bt-kd          balanced transfer: Sec. 4.2 augmentation, teacher labels afresh, KD loss (Eq. 2)
    bt-label       balanced transfer: one draw batch of the teacher's labelling pass (Algorithm 1)

Each step is warmed up, then timed over --steps steps, --repeats times, the fast and naive windows
interleaved unless the naive DataLoader has worker processes (time.perf_counter on CPU; CUDA events after a
synchronize on GPU). Both paths get the same torch.set_num_threads budget; the naive DataLoader has
--workers worker processes (default 0, i.e. no extra cores). Printed: images/s, ms/step
(median [min-max] over the repeats), fast/naive, the model FLOPs of a step, the achieved TFLOP/s and, on
CUDA, the MFU against --peak-tflops.

FLOP convention: FlopCounterMode counts the convolutions and matmuls of one forward per image, 2 FLOPs per
multiply-add (BatchNorm, activations, losses and augmentation are not counted). A step costs
  1x forward for a network run without gradients (the frozen teacher, the generator inside the D step),
  2x for a frozen network back-propagated to its input (the teacher inside the G step),
  3x for a trained network (forward, input gradient, weight gradient),
times the images that go through it; each row's JSON holds the formula.

    python bench.py --device cpu --quick           # smoke test: batch 8, one timed step per path; ~45 s, 2 CPU cores
    python bench.py --device cpu --arch-pair lenet5:lenet5_half:mnist     # the issue's shapes (batch 256), 5 min
    python bench.py --device cpu --arch-pair resnet34:resnet18 --image-size 32 --batch 256 --steps 1 --repeats 2
    python bench.py --device cuda --compile        # on a GPU; MFU against H100 bf16 dense (989.4 TFLOP/s)

Expected on a 2-core CPU, 2 threads (README, "Speed"): for the LeNet pair the fast path is 2.3-2.9x the
naive one for the HiDFD distillation step, 3.5-4.2x for the balanced-transfer KD step and 4.3-5.4x for its
labelling pass (the per-sample PIL pipeline dominates), 1.6-1.7x for KD3 (two forward images per loaded one)
and ~1.0x for the HiDFD GAN step (611 GFLOP of generator/discriminator per step). The ResNet pair is compute
bound on a CPU (0.95-1.2x, 2.5-25 images/s). On an H100 the ResNet34 -> ResNet18 KD3 step should reach >= 30% MFU;
not measured here (no GPU was available).
"""

import argparse
import copy
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms.functional import to_pil_image

import balanced_transfer as bt
import data
import hidfd
import kd3
import models
import teacher as teacher_lib

#### Settings (every value is also a CLI flag) ####
# The shapes: batch 256, ResNet34 -> ResNet18 on 3x32x32 (CIFAR-10 statistics and augmentation) and
# LeNet5 -> LeNet5-half on 1x32x32 (MNIST). A step on a 2-core CPU takes 20 ms (LeNet labelling) to ~2 min
# (ResNet KD3 and GAN steps), hence few steps there; a GPU step takes milliseconds, hence many. --quick: a
# smoke test.
SETTINGS = {
    "cpu": dict(batch=256, warmup=1, steps=3, repeats=3, pool=2048),
    "cuda": dict(batch=256, warmup=10, steps=50, repeats=3, pool=16384),
    "quick-cpu": dict(batch=8, warmup=1, steps=1, repeats=1, pool=64),
    "quick-cuda": dict(batch=256, warmup=3, steps=10, repeats=1, pool=2048),
}
DEFAULT_PAIRS = ["resnet34:resnet18:cifar10", "lenet5:lenet5_half:mnist"]
STEPS = ("kd3", "hidfd-gan", "hidfd-distill", "bt-kd", "bt-label")
H100_BF16_DENSE_TFLOPS = 989.4  # H100 SXM5, dense bf16 tensor cores (1979 is with 2:4 sparsity)


def build_parser():
    p = argparse.ArgumentParser(description="Images/s, ms/step, TFLOP/s and MFU of each method's training step: "
                                            "the repository's fast path vs the same step written the naive way.")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--arch-pair", nargs="+", default=DEFAULT_PAIRS, metavar="TEACHER:STUDENT[:DATASET]",
                   help="pairs to time; DATASET (a data.py dataset, default cifar10) gives channels, classes, "
                        "mean/std and crop/flip augmentation (default: %(default)s)")
    p.add_argument("--only", nargs="+", default=list(STEPS), choices=STEPS, metavar="STEP",
                   help=f"time only these method steps (default: all of {', '.join(STEPS)})")
    p.add_argument("--image-size", type=int, default=None, help="input height = width (default: the dataset's, 32)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 256; --quick on CPU: 8)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per path (default: 1 CPU, 10 CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per window (default: 3 CPU, 50 CUDA)")
    p.add_argument("--repeats", type=int, default=None, help="timed windows per path, fast and naive interleaved; "
                                                             "the table shows the median (default 3; --quick 1)")
    p.add_argument("--pool", type=int, default=None, help="synthetic uint8 images the loaders cycle over")
    p.add_argument("--quick", action="store_true", help="CI smoke test: SETTINGS['quick-<device>']")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both paths "
                                                              "(default: torch's default, the number of cores)")
    p.add_argument("--workers", type=int, default=0, help="num_workers of the naive DataLoader (default 0: the "
                                                          "same thread budget as the fast path)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks' forward of the fast path "
                   "(compilation happens in the warm-up, untimed; works on CPU but takes minutes there)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default on CUDA: "
                   f"{H100_BF16_DENSE_TFLOPS}, H100 SXM bf16 dense; on CPU no MFU unless given)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the table as JSON to this path")
    return p


def parse_pair(spec):
    """'resnet34:resnet18[:cifar10]' -> (teacher arch, student arch, dataset), names checked."""
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"--arch-pair {spec!r}: expected TEACHER:STUDENT or TEACHER:STUDENT:DATASET")
    teacher_arch, student_arch, dataset = (parts + ["cifar10"])[:3]
    if dataset not in data.DATASETS:
        raise ValueError(f"--arch-pair {spec!r}: unknown dataset {dataset!r}; "
                         f"valid: {', '.join(sorted(data.DATASETS))}")
    channels = data.DATASETS[dataset]["channels"]
    with torch.device("meta"):  # names checked by the registry itself, without allocating weights
        models.build_model(teacher_arch, 10, channels)
        models.build_model(student_arch, 10, channels)
    return teacher_arch, student_arch, dataset


def resolve_settings(args):
    """Fill every None flag from SETTINGS (visible above) and validate; returns (args, device)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available (use --device cpu)")
    device = teacher_lib.get_device(args.device)
    defaults = SETTINGS[("quick-" if args.quick else "") + device.type]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.pairs = [parse_pair(s) for s in args.arch_pair]
    if min(args.batch, args.warmup, args.steps, args.repeats) < 1 or args.workers < 0:
        raise ValueError("--batch, --warmup, --steps and --repeats must be >= 1 and --workers >= 0")
    if args.pool < args.batch:
        raise ValueError(f"--pool ({args.pool}) must hold at least one batch ({args.batch})")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1")
    if args.peak_tflops is None and device.type == "cuda":
        args.peak_tflops = H100_BF16_DENSE_TFLOPS
    return args, device


#### FLOP counting and timing ####

def forward_flops(module, method, *inputs):
    """FLOPs (2 per multiply-add, convolutions and matmuls) FlopCounterMode counts for module.method(*inputs),
    in eval mode (BatchNorm on a one-image batch) and without gradients."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            getattr(module, method)(*inputs)
    finally:
        module.train(was_training)
    return counter.get_total_flops()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_window(step, n, device):
    """Seconds for n calls of step(): CUDA events around the window (after a synchronize) on GPU, so the
    queued kernels are included; time.perf_counter on CPU, where every op has finished when it returns."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    start = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - start


def endless(loader):
    """Batches of a loader, epoch after epoch (each pass draws a new order)."""
    while True:
        yield from loader


def compile_method(args, module, method):
    """--compile: replace module.method by its torch.compile'd version (an instance attribute, so that
    calls through the class, e.g. Network.forward -> self.features, use it too)."""
    if args.compile:
        setattr(module, method, torch.compile(getattr(module, method)))


#### The naive data pipeline: per-sample torchvision transforms on PIL images ####

class NaiveImages(Dataset):
    """uint8 images stored as a numpy (N, H, W, C) array, one PIL image per __getitem__ (as torchvision's
    CIFAR10 dataset does), then `transform`; extra tensors are indexed alongside."""

    def __init__(self, images, transform, *extras):
        self.images = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
        self.transform, self.extras = transform, extras

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return (self.transform(to_pil_image(self.images[i])), *(t[i] for t in self.extras))


class NaiveNoise(Dataset):
    """Uniform noise drawn one image at a time with numpy, quantised to uint8, then `transform`."""

    def __init__(self, n, shape, transform):
        self.n, self.shape, self.transform = n, shape, transform

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        c, h, w = self.shape
        image = (np.random.rand(h, w, c) * 255).round().astype(np.uint8)
        return (self.transform(to_pil_image(image)),)


class GaussianNoise:
    """Per-sample tensor transform: x + std * N(0, 1), clamped to [0, 1]."""

    def __init__(self, std):
        self.std = std

    def __call__(self, x):
        return (x + self.std * torch.randn_like(x)).clamp(0, 1)


class SaltAndPepper:
    """Per-sample tensor transform: a fraction `amount` of the values set to 0 or 1 (half each)."""

    def __init__(self, amount):
        self.amount = amount

    def __call__(self, x):
        u = torch.rand_like(x)
        return torch.where(u < self.amount / 2, 0.0, torch.where(u > 1 - self.amount / 2, 1.0, x))


def crop_flip_transform(meta, size):
    """The textbook pipeline for the dataset's augmentation: RandomCrop(padding) / RandomHorizontalFlip when
    the dataset uses them (data.DATASETS), then ToTensor and Normalize."""
    ops = [T.RandomCrop(size, padding=meta["crop_pad"])] if meta["crop_pad"] else []
    ops += [T.RandomHorizontalFlip()] if meta["flip"] else []
    return T.Compose(ops + [T.ToTensor(), T.Normalize(meta["mean"], meta["std"])])


def bt_transform(meta):
    """balanced_transfer.augment written per sample: scaling, rotation, flip, gaussian and salt-and-pepper
    noise, each with probability p, at bt.augment's own default strengths (read from its signature). PIL
    fills the borders with black where bt.augment reflects; the cost is about the same."""
    aug = {k: v.default for k, v in inspect.signature(bt.augment).parameters.items()
           if v.default is not inspect.Parameter.empty}
    p = aug["p"]
    return T.Compose([
        T.RandomApply([T.RandomAffine(degrees=0, scale=(1 - aug["max_scale"], 1 + aug["max_scale"]))], p=p),
        T.RandomApply([T.RandomRotation(aug["max_degrees"])], p=p),
        T.RandomHorizontalFlip(p),
        T.ToTensor(),
        T.RandomApply([GaussianNoise(aug["noise_std"])], p=p),
        T.RandomApply([SaltAndPepper(aug["salt_pepper"])], p=p),
        T.Normalize(meta["mean"], meta["std"]),
    ])


def naive_loader(dataset, args):
    return DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers,
                      persistent_workers=args.workers > 0)


#### Steps: one builder per method step, each returning the fast step, the naive step and the FLOPs ####

class Bench:
    """fast() / naive(): one training step each (the batch is fetched inside); flops: model FLOPs of one step."""

    def __init__(self, fast, naive, flops, formula):
        self.fast, self.naive, self.flops, self.formula = fast, naive, flops, formula


def pair_setup(pair, args, device):
    """Synthetic uint8 pool, dataset metadata, and the teacher twice: fast (what teacher.get_teacher returns:
    prepared, eval, frozen) and naive (eval() only: parameters trainable, fp32, contiguous)."""
    teacher_arch, student_arch, dataset = pair
    meta = dict(data.DATASETS[dataset])
    meta["size"] = args.image_size or meta["size"]
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (args.pool, meta["channels"], meta["size"], meta["size"]), dtype=torch.uint8,
                           generator=gen)                                                   # (N, C, H, W)
    teacher = models.build_model(teacher_arch, meta["num_classes"], meta["channels"])
    naive_teacher = copy.deepcopy(teacher).to(device).eval()
    teacher = teacher_lib.prepare_model(teacher, device).eval()
    teacher.requires_grad_(False)
    one = torch.zeros(1, meta["channels"], meta["size"], meta["size"], device=device)
    return meta, images, teacher, naive_teacher, one


def build_kd3(pair, args, device):
    meta, images, teacher, naive_teacher, one = pair_setup(pair, args, device)
    dataset = pair[2]
    margs = kd3.resolve_settings(kd3.build_parser().parse_args(
        ["--dataset", dataset, "--teacher-arch", pair[0], "--student-arch", pair[1]]))
    backbone = models.build_model(pair[1], meta["num_classes"], meta["channels"])
    naive_backbone = copy.deepcopy(backbone)
    model = teacher_lib.prepare_model(kd3.KD3Student(backbone, teacher.classifier), device)
    head_s = kd3.ProjectionHead(model.feat_dim, margs.proj_dim)
    head_t = kd3.ProjectionHead(teacher.feat_dim, margs.proj_dim)
    naive_heads = copy.deepcopy(head_s).to(device), copy.deepcopy(head_t).to(device)
    head_s, head_t = head_s.to(device), head_t.to(device)
    opt = teacher_lib.make_optimizer([p for m in (model, head_s, head_t) for p in m.parameters() if p.requires_grad],
                                     margs)

    b = args.batch
    f_t = forward_flops(teacher, "features", one)
    f_s = forward_flops(model, "features", one)
    f_heads = forward_flops(head_s, "forward", one.new_zeros(1, model.feat_dim)) + \
        forward_flops(head_t, "forward", one.new_zeros(1, teacher.feat_dim))
    flops = 2 * b * (f_t + 3 * (f_s + f_heads))
    formula = f"2B (F_T + 3 (F_S + F_heads)); B={b}, F_T={f_t}, F_S={f_s}, F_heads={f_heads}"
    compile_method(args, teacher, "features")
    compile_method(args, model, "features")

    loader = data.DeviceLoader(images, batch_size=b, shuffle=True, drop_last=True, crop_pad=meta["crop_pad"],
                               flip=meta["flip"], mean=meta["mean"], std=meta["std"], device=device, seed=args.seed)
    batches = endless(loader)
    sums = {}

    def fast():  # the body of kd3.run's training loop
        (x,) = next(batches)                                                        # (B, C, H, W)
        loss, terms = kd3.kd3_losses(model, teacher, head_s, head_t, x, margs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0) + value * len(x)

    naive_model = kd3.KD3Student(naive_backbone, naive_teacher.classifier).to(device)
    teacher_ids = {id(p) for p in naive_teacher.parameters()}
    naive_opt = teacher_lib.make_optimizer([p for m in (naive_model, *naive_heads) for p in m.parameters()
                                            if p.requires_grad and id(p) not in teacher_ids], margs)
    naive_batches = endless(naive_loader(NaiveImages(images, crop_flip_transform(meta, meta["size"])), args))
    kw = dict(tau=margs.tau, reduction=margs.mdcl_reduction, positive_in_denominator=margs.contrastive == "ntxent")
    losses = []

    def naive():
        (x,) = next(naive_batches)
        x = x.to(device)
        inputs = torch.cat([x, kd3.contrastive_view(x, margs.no_md, margs.mix_delta)])
        t_feat = naive_teacher.features(inputs).detach()
        t_logits = naive_teacher.classifier(t_feat[:b]).detach()
        s_feat = naive_model.features(inputs)
        s_logits = naive_model.classifier(s_feat[:b])
        weights = kd3.alignment_weights(F.softmax(s_logits, dim=1), F.softmax(t_logits, dim=1))
        z_s, z_t = naive_heads[0](s_feat), naive_heads[1](t_feat)
        loss = kd3.weighted_feature_alignment(s_feat[:b], t_feat[:b], weights) + margs.alpha * (
            kd3.mdcl_loss(z_s[:b], z_s[b:], **kw) + kd3.mdcl_loss(z_t[:b], z_t[b:], **kw))
        naive_opt.zero_grad()
        loss.backward()
        naive_opt.step()
        losses.append(loss.item())

    return Bench(fast, naive, flops, formula)


def build_hidfd_gan(pair, args, device):
    meta, images, teacher, naive_teacher, one = pair_setup(pair, args, device)
    margs = hidfd.resolve_settings(hidfd.build_parser().parse_args(
        ["--dataset", pair[2], "--teacher-arch", pair[0], "--student-arch", pair[1]]))
    num_classes, b = meta["num_classes"], args.batch
    G = hidfd.Generator(num_classes, meta["channels"], meta["size"], margs.z_dim, margs.gan_width)
    D = hidfd.Discriminator(num_classes, meta["channels"], meta["size"], teacher.feat_dim, margs.gan_width)
    naive_G, naive_D = copy.deepcopy(G).to(device), copy.deepcopy(D).to(device)
    G, D = teacher_lib.prepare_model(G, device), teacher_lib.prepare_model(D, device)
    opt_g = torch.optim.Adam(G.parameters(), lr=margs.g_lr, betas=tuple(margs.betas))
    opt_d = torch.optim.Adam(D.parameters(), lr=margs.d_lr, betas=tuple(margs.betas))

    f_g = forward_flops(G, "forward", one.new_zeros(1, margs.z_dim), torch.zeros(1, dtype=torch.long, device=device))
    f_d = forward_flops(D, "forward", one)
    f_tf = forward_flops(teacher, "features", one)
    f_t = forward_flops(teacher, "forward", one)
    # D step: G 1x, teacher features 1x, D 3x on real + fake; G step: G 3x, D 3x (its weight gradients are
    # computed too), teacher 2x (back-propagated to its input)
    flops = b * (4 * f_g + 9 * f_d + f_tf + 2 * f_t)
    formula = f"B (4 F_G + 9 F_D + F_T,features + 2 F_T); B={b}, F_G={f_g}, F_D={f_d}, F_T,features={f_tf}, F_T={f_t}"
    for net, method in ((teacher, "features"), (G, "forward"), (D, "forward")):
        compile_method(args, net, method)

    labels = torch.randint(0, num_classes, (args.pool,), generator=torch.Generator().manual_seed(args.seed))
    t_feats = torch.randn(args.pool, teacher.feat_dim, generator=torch.Generator().manual_seed(args.seed))
    half = (0.5,) * meta["channels"]  # uint8 -> [-1, 1], the generator's range
    loader = data.DeviceLoader(images, labels, t_feats, batch_size=b, shuffle=True, drop_last=True, mean=half,
                               std=half, device=device, seed=args.seed)
    batches = endless(loader)
    mean = torch.tensor(meta["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], device=device).view(1, -1, 1, 1)

    def teacher_view(x):  # [-1, 1] -> the teacher's normalised input, as in hidfd.train_gan
        return (hidfd.to_unit_range(x) - mean) / std

    gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    state = {"class_freq": torch.full((num_classes,), b / num_classes, device=device)}
    names = ("d_loss", "g_loss", "adv_d", "cls_d", "blend", "trans", "blend_on", "adv_g", "cls_g", "reg")
    sums = {k: torch.zeros((), device=device) for k in names}
    hist = torch.zeros(num_classes, dtype=torch.long, device=device)
    agree = torch.zeros((), device=device)

    def fast():  # the body of hidfd.train_gan's loop
        x_real, y_real, t_real = next(batches)                                    # (B, C, H, W), (B,), (B, D_T)
        y_fake = torch.randint(0, num_classes, (b,), device=device, generator=gen)
        z = torch.randn(b, margs.z_dim, device=device, generator=gen)
        with torch.no_grad(), teacher_lib.autocast(device):
            x_fake = G(z, y_fake)
            t_fake = teacher.features(teacher_view(x_fake)).float()
        with teacher_lib.autocast(device):
            adv_r, cls_r, d_real = D(x_real)
            adv_f, cls_f, d_fake = D(x_fake)
        adv_d, cls_d = hidfd.adc_discriminator_loss(adv_r.float(), adv_f.float(), cls_r.float(), cls_f.float(),
                                                    y_real, y_fake, margs.gan_loss)
        blend = hidfd.blend_loss(t_real, t_fake, d_real.float(), d_fake.float())
        trans = hidfd.trans_loss(t_real, t_fake, d_real.float(), d_fake.float())
        blend_on = (torch.rand((), device=device, generator=gen) > margs.q).float()
        d_loss = adv_d + cls_d + margs.lambda_d * (blend_on * blend + trans)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

        y_fake = torch.randint(0, num_classes, (b,), device=device, generator=gen)
        z = torch.randn(b, margs.z_dim, device=device, generator=gen)
        with teacher_lib.autocast(device):
            x_fake = G(z, y_fake)
            adv_f, cls_f, _ = D(x_fake)
            t_logits = teacher(teacher_view(x_fake)).float()
        adv_g, cls_g = hidfd.adc_generator_loss(adv_f.float(), cls_f.float(), y_fake, margs.gan_loss)
        reg = hidfd.reg_loss(t_logits, state["class_freq"])
        g_loss = adv_g + cls_g + margs.lambda_g * reg
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()

        predicted = t_logits.detach().argmax(1)
        counts = torch.bincount(predicted, minlength=num_classes)
        state["class_freq"] = hidfd.update_class_frequency(state["class_freq"], counts, margs.gamma)
        hist.add_(counts)
        agree.add_((predicted == y_fake).sum())
        for k, v in zip(names, (d_loss, g_loss, adv_d, cls_d, blend, trans, blend_on, adv_g, cls_g, reg)):
            sums[k].add_(v.detach())

    naive_opt_g = torch.optim.Adam(naive_G.parameters(), lr=margs.g_lr, betas=tuple(margs.betas))
    naive_opt_d = torch.optim.Adam(naive_D.parameters(), lr=margs.d_lr, betas=tuple(margs.betas))
    to_gan_range = T.Compose([T.ToTensor(), T.Normalize(half, half)])
    naive_batches = endless(naive_loader(NaiveImages(images, to_gan_range, labels, t_feats), args))
    naive_state = {"class_freq": torch.full((num_classes,), b / num_classes, device=device)}
    losses = []

    def naive():
        x_real, y_real, t_real = (t.to(device) for t in next(naive_batches))
        y_fake = torch.randint(0, num_classes, (b,), device=device)
        x_fake = naive_G(torch.randn(b, margs.z_dim, device=device), y_fake).detach()  # generated with a graph
        t_fake = naive_teacher.features(teacher_view(x_fake)).detach()
        adv_r, cls_r, d_real = naive_D(x_real)
        adv_f, cls_f, d_fake = naive_D(x_fake)
        adv_d, cls_d = hidfd.adc_discriminator_loss(adv_r, adv_f, cls_r, cls_f, y_real, y_fake, margs.gan_loss)
        blend_on = float(torch.rand(()) > margs.q)
        d_loss = adv_d + cls_d + margs.lambda_d * (blend_on * hidfd.blend_loss(t_real, t_fake, d_real, d_fake)
                                                   + hidfd.trans_loss(t_real, t_fake, d_real, d_fake))
        naive_opt_d.zero_grad()
        d_loss.backward()
        naive_opt_d.step()

        y_fake = torch.randint(0, num_classes, (b,), device=device)
        x_fake = naive_G(torch.randn(b, margs.z_dim, device=device), y_fake)
        adv_f, cls_f, _ = naive_D(x_fake)
        t_logits = naive_teacher(teacher_view(x_fake))
        adv_g, cls_g = hidfd.adc_generator_loss(adv_f, cls_f, y_fake, margs.gan_loss)
        g_loss = adv_g + cls_g + margs.lambda_g * hidfd.reg_loss(t_logits, naive_state["class_freq"])
        naive_opt_g.zero_grad()
        g_loss.backward()
        naive_opt_g.step()
        counts = torch.bincount(t_logits.argmax(1), minlength=num_classes)
        naive_state["class_freq"] = hidfd.update_class_frequency(naive_state["class_freq"], counts, margs.gamma)
        losses.append((d_loss.item(), g_loss.item()))

    return Bench(fast, naive, flops, formula)


def build_hidfd_distill(pair, args, device):
    meta, images, teacher, naive_teacher, one = pair_setup(pair, args, device)
    margs = hidfd.resolve_settings(hidfd.build_parser().parse_args(
        ["--dataset", pair[2], "--teacher-arch", pair[0], "--student-arch", pair[1]]))
    student = models.build_model(pair[1], meta["num_classes"], meta["channels"])
    naive_student = copy.deepcopy(student)
    model = teacher_lib.prepare_model(hidfd.SharedClassifierStudent(student, teacher.classifier), device)
    opt = teacher_lib.make_optimizer([p for p in model.parameters() if p.requires_grad], margs)

    b = args.batch
    f_t = forward_flops(teacher, "features", one)
    f_s = forward_flops(model, "features", one)
    flops = b * (f_t + 3 * f_s)
    formula = f"B (F_T,features + 3 F_S,features); B={b}, F_T,features={f_t}, F_S,features={f_s}"
    compile_method(args, teacher, "features")
    compile_method(args, model, "features")

    loader = data.DeviceLoader(images, batch_size=b, shuffle=True, drop_last=True, crop_pad=meta["crop_pad"],
                               flip=meta["flip"], mean=meta["mean"], std=meta["std"], device=device, seed=args.seed)
    batches = endless(loader)
    stats = {"loss": torch.zeros((), device=device), "agree": torch.zeros((), device=device)}

    def fast():  # the body of hidfd.distill's loop
        (x,) = next(batches)
        with torch.no_grad(), teacher_lib.autocast(device):
            t_feat = teacher.features(x).float()                                  # (B, D_T)
        with teacher_lib.autocast(device):
            s_feat = model.features(x).float()                                    # (B, D_T)
        loss = hidfd.align_loss(s_feat, t_feat)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stats["loss"].add_(loss.detach() * len(x))
        stats["agree"].add_((model.classifier(s_feat.detach()).argmax(1) ==
                             teacher.classifier(t_feat).argmax(1)).sum())

    naive_model = hidfd.SharedClassifierStudent(naive_student, naive_teacher.classifier).to(device)
    naive_opt = teacher_lib.make_optimizer([p for p in naive_model.parameters() if p.requires_grad], margs)
    naive_batches = endless(naive_loader(NaiveImages(images, crop_flip_transform(meta, meta["size"])), args))
    losses = []

    def naive():
        (x,) = next(naive_batches)
        x = x.to(device)
        t_feat = naive_teacher.features(x).detach()
        loss = hidfd.align_loss(naive_model.features(x), t_feat)
        naive_opt.zero_grad()
        loss.backward()
        naive_opt.step()
        losses.append(loss.item())

    return Bench(fast, naive, flops, formula)


def bt_settings(pair):
    return bt.resolve_settings(bt.build_parser().parse_args(
        ["--dataset", pair[2], "--teacher-arch", pair[0], "--student-arch", pair[1]]))


def build_bt_kd(pair, args, device):
    meta, images, teacher, naive_teacher, one = pair_setup(pair, args, device)
    margs = bt_settings(pair)
    num_classes, channels, b = meta["num_classes"], meta["channels"], args.batch
    student = models.build_model(pair[1], num_classes, channels)
    naive_student = copy.deepcopy(student).to(device)
    student = teacher_lib.prepare_model(student, device)
    opt = teacher_lib.make_optimizer(student.parameters(), margs)

    f_t = forward_flops(teacher, "forward", one)
    f_s = forward_flops(student, "forward", one)
    flops = b * (f_t + 3 * f_s)
    formula = f"B (F_T + 3 F_S); B={b}, F_T={f_t}, F_S={f_s}"
    compile_method(args, teacher, "features")
    compile_method(args, student, "features")

    loader = data.DeviceLoader(images, batch_size=b, shuffle=True, drop_last=True, mean=(0.0,) * channels,
                               std=(1.0,) * channels, device=device, seed=args.seed)                # x in [0, 1]
    batches = endless(loader)
    aug_gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    mean = torch.tensor(meta["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], device=device).view(1, -1, 1, 1)
    stats = {"loss": torch.zeros((), device=device), "hist": torch.zeros(num_classes, dtype=torch.long, device=device)}

    def fast():  # the body of balanced_transfer.run's loop, with augmentation (the default)
        (x,) = next(batches)
        x = bt.augment(x, aug_gen)
        x = (x - mean) / std
        with torch.inference_mode(), teacher_lib.autocast(device):
            t_logits = teacher(x).float()
        t_logits = t_logits.clone()
        with teacher_lib.autocast(device):
            loss = bt.kd_loss(student(x).float(), t_logits, margs.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stats["loss"].add_(loss.detach() * len(x))
        stats["hist"].add_(torch.bincount(t_logits.argmax(1), minlength=num_classes))

    naive_opt = teacher_lib.make_optimizer(naive_student.parameters(), margs)
    naive_batches = endless(naive_loader(NaiveImages(images, bt_transform(meta)), args))
    losses = []

    def naive():
        (x,) = next(naive_batches)
        x = x.to(device)
        t_logits = naive_teacher(x).detach()
        loss = bt.kd_loss(naive_student(x), t_logits, margs.temperature)
        naive_opt.zero_grad()
        loss.backward()
        naive_opt.step()
        losses.append(loss.item())

    return Bench(fast, naive, flops, formula)


def build_bt_label(pair, args, device):
    meta, _, teacher, naive_teacher, one = pair_setup(pair, args, device)
    margs = bt_settings(pair)
    num_classes, b = meta["num_classes"], args.batch
    shape = (meta["channels"], meta["size"], meta["size"])
    f_t = forward_flops(teacher, "forward", one)
    flops = b * f_t
    formula = f"B F_T; B={b}, F_T={f_t}"
    compile_method(args, teacher, "features")

    # quotas that never fill: every step is a draw batch of the composer's filling phase
    quota = 2 ** 62
    draw_args = argparse.Namespace(draw_batch=b)  # one teacher forward per draw batch, as with --draw-batch
    gen = torch.Generator(device=device).manual_seed(args.seed)
    state = {"counts": torch.zeros(num_classes, dtype=torch.int64, device=device)}
    kind = bt.NOISE_SOURCES["noise-uniform"]  # the paper's U[0, 1] per-pixel noise

    def fast():  # balanced_transfer.compose_generated for one draw batch: draw, label, Algorithm 1 lines 5-10
        _, _, state["counts"], _, _ = bt.compose_generated(teacher, kind, shape, state["counts"], quota, b, draw_args,
                                                           meta["mean"], meta["std"], gen, margs.balanced)

    to_input = T.Compose([T.ToTensor(), T.Normalize(meta["mean"], meta["std"])])
    naive_batches = endless(naive_loader(NaiveNoise(args.pool, shape, to_input), args))
    naive_counts = [0] * num_classes

    def naive():  # Algorithm 1 as printed: one sample at a time
        (x,) = next(naive_batches)
        x = x.to(device)
        labels = naive_teacher(x).argmax(1)
        kept = []
        for k, label in enumerate(labels.tolist()):
            if naive_counts[label] < quota:
                naive_counts[label] += 1
                kept.append(x[k])
        return torch.stack(kept)

    return Bench(fast, naive, flops, formula)


BUILDERS = {"kd3": build_kd3, "hidfd-gan": build_hidfd_gan, "hidfd-distill": build_hidfd_distill,
            "bt-kd": build_bt_kd, "bt-label": build_bt_label}


#### Benchmark ####

def measure(bench, args, device):
    """Warm up, then time `repeats` windows of `steps` steps per path. Returns (fast, naive) seconds per step,
    per window. With --workers 0 the fast and naive windows alternate, so that load from other processes hits
    both alike; with worker processes they do not: the workers would prefetch in the background while the
    fast path is timed, taking its cores and filling their queue for free."""
    def warm_up(step):
        for _ in range(args.warmup):
            step()
        synchronize(device)

    def window(step):
        return time_window(step, args.steps, device) / args.steps

    if args.workers == 0:
        warm_up(bench.fast)
        warm_up(bench.naive)
        pairs = [(window(bench.fast), window(bench.naive)) for _ in range(args.repeats)]
        return [f for f, _ in pairs], [n for _, n in pairs]
    warm_up(bench.fast)
    fast_s = [window(bench.fast) for _ in range(args.repeats)]
    warm_up(bench.naive)
    return fast_s, [window(bench.naive) for _ in range(args.repeats)]


def row_result(step_name, pair, meta_shape, args, bench, fast_s, naive_s):
    fast, naive = statistics.median(fast_s), statistics.median(naive_s)
    tflops = bench.flops / fast / 1e12
    return {"step": step_name, "pair": f"{pair[0]}->{pair[1]}", "dataset": pair[2], "input": meta_shape,
            "batch": args.batch, "fast_img_s": args.batch / fast, "fast_ms": fast * 1e3,
            "fast_ms_runs": [s * 1e3 for s in fast_s], "naive_img_s": args.batch / naive, "naive_ms": naive * 1e3,
            "naive_ms_runs": [s * 1e3 for s in naive_s], "fast_over_naive": naive / fast,
            "gflop_per_step": bench.flops / 1e9, "flops_formula": bench.formula, "fast_tflop_s": tflops,
            "mfu": tflops / args.peak_tflops if args.peak_tflops else None}


def format_table(rows):
    """Fixed-width text table; ms/step as median [min-max] over the repeats."""
    def ms(row, path):
        runs = row[f"{path}_ms_runs"]
        spread = f" [{min(runs):.1f}-{max(runs):.1f}]" if len(runs) > 1 else ""
        return f"{row[f'{path}_ms']:.1f}{spread}"

    def rate(img_s):
        return f"{img_s:.0f}" if img_s >= 100 else f"{img_s:.2f}"

    header = ["step", "pair", "input", "batch", "fast img/s", "fast ms/step", "naive img/s", "naive ms/step",
              "fast/naive", "GFLOP/step", "TFLOP/s", "MFU"]

    lines = [[r["step"], r["pair"], r["input"], str(r["batch"]), rate(r["fast_img_s"]), ms(r, "fast"),
              rate(r["naive_img_s"]), ms(r, "naive"), f"{r['fast_over_naive']:.2f}x", f"{r['gflop_per_step']:.2f}",
              f"{r['fast_tflop_s']:.3f}", "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]

    def fmt(cells):  # text columns left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def describe_device(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"CPU {name}, {os.cpu_count()} cores"


def run(args):
    """Time every (pair, step); print the table; return the results dict (also written to --out)."""
    args, device = resolve_settings(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    teacher_lib.seed_everything(args.seed)
    config = {k: v for k, v in vars(args).items() if k != "pairs"}
    print("config: " + json.dumps(config), flush=True)
    print(f"device: {describe_device(device)}; torch {torch.__version__}; {args.threads} torch threads; naive "
          f"DataLoader num_workers={args.workers}; peak for MFU: "
          f"{'none' if args.peak_tflops is None else f'{args.peak_tflops} TFLOP/s'}", flush=True)
    start = time.time()
    rows = []
    for pair in args.pairs:
        for step_name in args.only:
            teacher_lib.seed_everything(args.seed)
            bench = BUILDERS[step_name](pair, args, device)
            fast_s, naive_s = measure(bench, args, device)
            meta = data.DATASETS[pair[2]]
            shape = f"{meta['channels']}x{args.image_size or meta['size']}x{args.image_size or meta['size']}"
            row = row_result(step_name, pair, shape, args, bench, fast_s, naive_s)
            rows.append(row)
            print(f"  {step_name} {row['pair']}: fast {row['fast_ms']:.1f} ms/step, naive {row['naive_ms']:.1f} "
                  f"ms/step ({row['fast_over_naive']:.2f}x)", flush=True)
            del bench  # and with it the naive DataLoader's worker processes
            gc.collect()
    print(format_table(rows), flush=True)
    wall = time.time() - start
    print(f"wall time {wall:.1f} s", flush=True)
    results = {"device": describe_device(device), "device_type": device.type, "torch": torch.__version__,
               "threads": args.threads, "naive_workers": args.workers, "peak_tflops": args.peak_tflops,
               "flop_convention": "FlopCounterMode forward FLOPs per image (2 per multiply-add, conv + matmul); "
                                  "1x no-grad forward, 2x frozen network back-propagated to its input, "
                                  "3x trained network",
               "config": config, "wall_time_s": round(wall, 1), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}", flush=True)
    return results


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
