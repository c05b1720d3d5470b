"""Throughput of each method's training step: the method files' own step functions against the same step
written the naive way.

The *fast* path calls the step functions of kd3.py, hidfd.py and balanced_transfer.py (the very functions their
training loops call) on synthetic uint8 images of the real shapes, resident on the device and batched by
data.DeviceLoader; the frozen teacher runs without gradients, and on CUDA under bf16 autocast with channels_last.
The *naive* path is the textbook version of the same step: a torch DataLoader over per-sample torchvision
transforms on PIL images, fp32, a teacher that is only put in eval() (no no_grad, outputs .detach()ed) and a
loss.item() per step.

    kd3            kd3.train_step (clean + MixDistribution views through teacher and student, both heads)
    hidfd-gan      hidfd.discriminator_step + hidfd.generator_step (Eq. 13)
    hidfd-distill  hidfd.distill_step (Eq. 14)
    bt-kd          balanced_transfer.kd_step (Sec. 4.2 augmentation, the teacher labels afresh, Eq. 2)
    bt-label       balanced_transfer.compose_generated for one draw batch (Algorithm 1, lines 5-10)

    python bench.py --device cpu --quick                                 # smoke test, ~30 s on 2 cores
    python bench.py --device cpu --arch-pair lenet5:lenet5_half:mnist    # batch 256
    python bench.py --device cuda --compile                              # MFU against --peak-tflops

Timing: warm-up, then --repeats windows of --steps steps per path, fast and naive interleaved (time.perf_counter
on CPU; CUDA events after a synchronize on GPU); the table shows the median. FLOPs: FlopCounterMode's count of
the convolutions and matmuls of one forward per image (2 FLOPs per multiply-add), times 1 for a network run
without gradients, 2 for a frozen network back-propagated to its input, 3 for a trained network; each row's
JSON holds the formula. Measured tables: docs/speed.md.
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
import runtime

#### Settings (every value is also a CLI flag) ####
# A step on a 2-core CPU takes 20 ms (LeNet labelling) to ~2 min (ResNet KD3 and GAN steps), hence few steps
# there; a GPU step takes milliseconds, hence many. --quick: a smoke test.
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
                                "the method files' step functions vs the same step written the naive way.",
                                formatter_class=runtime.HelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to time")
    p.add_argument("--arch-pair", nargs="+", default=DEFAULT_PAIRS, metavar="TEACHER:STUDENT[:DATASET]",
                   help="pairs to time; DATASET (default cifar10) gives channels, classes, mean/std, crop/flip")
    p.add_argument("--only", nargs="+", default=list(STEPS), choices=STEPS, metavar="STEP", help="steps to time")
    p.add_argument("--image-size", type=int, default=None, help="input height = width (default: the dataset's)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 256; --quick on CPU: 8)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per path (default: 1 CPU, 10 CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per window (default: 3 CPU, 50 CUDA)")
    p.add_argument("--repeats", type=int, default=None, help="timed windows per path (default 3; --quick 1)")
    p.add_argument("--pool", type=int, default=None, help="synthetic uint8 images the loaders cycle over "
                   "(default: 2048 CPU, 16384 CUDA)")
    p.add_argument("--quick", action="store_true", help="CI smoke test: SETTINGS['quick-<device>']")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both paths (default: "
                   "torch's, the number of cores)")
    p.add_argument("--workers", type=int, default=0, help="num_workers of the naive DataLoader (0: the same thread "
                   "budget as the fast path)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks' forward of the fast path "
                   "(compiled in the warm-up, untimed)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default on CUDA: "
                   f"{H100_BF16_DENSE_TFLOPS}, H100 SXM bf16 dense; on CPU none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic images and the networks")
    p.add_argument("--out", default=None, help="also write the table as JSON to this path")
    return p


def parse_pair(spec):
    """'resnet34:resnet18[:cifar10]' -> (teacher arch, student arch, dataset), names checked."""
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"--arch-pair {spec!r}: expected TEACHER:STUDENT or TEACHER:STUDENT:DATASET")
    teacher_arch, student_arch, dataset = (parts + ["cifar10"])[:3]
    if dataset not in data.DATASETS:
        raise ValueError(f"--arch-pair {spec!r}: unknown dataset {dataset!r}; valid: {', '.join(sorted(data.DATASETS))}")
    with torch.device("meta"):  # names checked by the registry itself, without allocating weights
        for arch in (teacher_arch, student_arch):
            models.build_model(arch, 10, data.DATASETS[dataset]["channels"])
    return teacher_arch, student_arch, dataset


def resolve_settings(args):
    """Fill every None flag from SETTINGS (visible above) and validate; returns (args, device)."""
    device = runtime.get_device(args.device)
    for key, value in SETTINGS[("quick-" if args.quick else "") + device.type].items():
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
    """FLOPs FlopCounterMode counts for module.method(*inputs), in eval mode and without gradients."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            getattr(module, method)(*inputs)
    finally:
        module.train(was_training)
    return counter.get_total_flops()


def time_window(step, n, device):
    """Seconds for n calls of step(): CUDA events around the window (queued kernels included) on GPU,
    time.perf_counter on CPU."""
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
    while True:
        yield from loader


def compile_method(args, module, method):
    """--compile: module.method replaced by its torch.compile'd version (an instance attribute)."""
    if args.compile:
        setattr(module, method, torch.compile(getattr(module, method)))


#### The naive data pipeline: per-sample torchvision transforms on PIL images ####

class NaiveImages(Dataset):
    """uint8 images as numpy (N, H, W, C), one PIL image per __getitem__ (as torchvision's CIFAR10 does), then
    `transform`; extra tensors are indexed alongside."""

    def __init__(self, images, transform, *extras):
        self.images, self.transform, self.extras = images.permute(0, 2, 3, 1).numpy(), transform, extras

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
        return (self.transform(to_pil_image((np.random.rand(h, w, c) * 255).round().astype(np.uint8))),)


def crop_flip_transform(meta, size):
    ops = [T.RandomCrop(size, padding=meta["crop_pad"])] if meta["crop_pad"] else []
    ops += [T.RandomHorizontalFlip()] if meta["flip"] else []
    return T.Compose(ops + [T.ToTensor(), T.Normalize(meta["mean"], meta["std"])])


def bt_transform(meta):
    """balanced_transfer.augment per sample, at its own default strengths (read from its signature)."""
    aug = {k: v.default for k, v in inspect.signature(bt.augment).parameters.items()
           if v.default is not inspect.Parameter.empty}
    p, std, amount = aug["p"], aug["noise_std"], aug["salt_pepper"]
    return T.Compose([
        T.RandomApply([T.RandomAffine(degrees=0, scale=(1 - aug["max_scale"], 1 + aug["max_scale"]))], p=p),
        T.RandomApply([T.RandomRotation(aug["max_degrees"])], p=p),
        T.RandomHorizontalFlip(p), T.ToTensor(),
        T.RandomApply([T.Lambda(lambda x: (x + std * torch.randn_like(x)).clamp(0, 1))], p=p),
        T.RandomApply([T.Lambda(lambda x: torch.where(torch.rand_like(x) < amount, torch.rand_like(x).round(), x))],
                      p=p),
        T.Normalize(meta["mean"], meta["std"]),
    ])


def naive_batches(dataset, args):
    return endless(DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers,
                              persistent_workers=args.workers > 0))


def naive_update(opt, loss, losses):
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())  # the host sync of the textbook loop


#### One builder per step: (fast step, naive step, FLOPs, formula) ####

class Bench:
    def __init__(self, fast, naive, flops, formula):
        self.fast, self.naive, self.flops, self.formula = fast, naive, flops, formula


def pair_setup(pair, args, device, parser):
    """The method's settings for the pair, dataset metadata, a synthetic uint8 pool, and the teacher twice: as the
    method files hold it (prepared, eval, frozen) and the naive way (eval() only, fp32)."""
    margs = parser.parse_args(["--dataset", pair[2], "--teacher-arch", pair[0], "--student-arch", pair[1]])
    meta = dict(data.DATASETS[pair[2]], size=args.image_size or data.DATASETS[pair[2]]["size"])
    images = torch.randint(0, 256, (args.pool, meta["channels"], meta["size"], meta["size"]), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(args.seed))
    teacher = models.build_model(pair[0], meta["num_classes"], meta["channels"])
    naive_teacher = copy.deepcopy(teacher).to(device).eval()
    teacher = runtime.prepare_model(teacher, device).eval().requires_grad_(False)
    one = torch.zeros(1, meta["channels"], meta["size"], meta["size"], device=device)
    return margs, meta, images, teacher, naive_teacher, one


def device_batches(images, meta, args, device, *extras, **kw):
    kw = {"crop_pad": meta["crop_pad"], "flip": meta["flip"], "mean": meta["mean"], "std": meta["std"], **kw}
    return endless(data.DeviceLoader(images, *extras, batch_size=args.batch, shuffle=True, drop_last=True,
                                     device=device, seed=args.seed, **kw))


def build_kd3(pair, args, device):
    margs, meta, images, teacher, naive_teacher, one = pair_setup(pair, args, device, kd3.build_parser())
    margs = kd3.resolve_settings(margs)
    student = kd3.SharedClassifierStudent(models.build_model(pair[1], meta["num_classes"], meta["channels"]),
                                          teacher.classifier)
    nets = kd3.KD3Networks(student, teacher.feat_dim, margs.proj_dim)
    naive_nets = copy.deepcopy(nets).to(device)
    nets = runtime.prepare_model(nets, device)
    opt = runtime.make_optimizer([p for p in nets.parameters() if p.requires_grad], margs)
    b = args.batch
    f_t, f_s = forward_flops(teacher, "features", one), forward_flops(student, "forward", one)
    f_heads = forward_flops(nets.head_s, "forward", one.new_zeros(1, student.feat_dim)) + \
        forward_flops(nets.head_t, "forward", one.new_zeros(1, teacher.feat_dim))
    formula = f"2B (F_T + 3 (F_S + F_heads)); B={b}, F_T={f_t}, F_S={f_s}, F_heads={f_heads}"
    compile_method(args, teacher, "features")
    compile_method(args, student, "features")
    batches = device_batches(images, meta, args, device)

    def fast():
        kd3.train_step(nets, teacher, next(batches)[0], opt, margs)

    naive_opt = runtime.make_optimizer([p for p in naive_nets.parameters() if p.requires_grad], margs)
    naive = naive_batches(NaiveImages(images, crop_flip_transform(meta, meta["size"])), args)
    kw = dict(tau=margs.tau, reduction=margs.mdcl_reduction)
    losses = []

    def naive_step():
        x = next(naive)[0].to(device)
        inputs = torch.cat([x, kd3.contrastive_view(x, False, margs.mix_delta)])
        t_feat = naive_teacher.features(inputs).detach()
        s_feat, s_logits, z_s, z_t = naive_nets(inputs, t_feat)
        w = kd3.alignment_weights(F.softmax(s_logits[:b], 1), F.softmax(naive_teacher.classifier(t_feat[:b]), 1))
        loss = kd3.weighted_feature_alignment(s_feat[:b], t_feat[:b], w) + margs.alpha * (
            kd3.mdcl_loss(z_s[:b], z_s[b:], **kw) + kd3.mdcl_loss(z_t[:b], z_t[b:], **kw))
        naive_update(naive_opt, loss, losses)

    return Bench(fast, naive_step, 2 * b * (f_t + 3 * (f_s + f_heads)), formula)


def build_hidfd_gan(pair, args, device):
    margs, meta, images, teacher, naive_teacher, one = pair_setup(pair, args, device, hidfd.build_parser())
    margs = hidfd.resolve_settings(margs)
    c, b = meta["num_classes"], args.batch
    G = hidfd.Generator(c, meta["channels"], meta["size"], margs.z_dim, margs.gan_width)
    D = hidfd.Discriminator(c, meta["channels"], meta["size"], teacher.feat_dim, margs.gan_width)
    naive_G, naive_D = copy.deepcopy(G).to(device), copy.deepcopy(D).to(device)
    G, D = runtime.prepare_model(G, device), runtime.prepare_model(D, device)
    gan_teacher = hidfd.GanRangeTeacher(teacher, meta["mean"], meta["std"]).to(device)
    naive_gan_teacher = hidfd.GanRangeTeacher(naive_teacher, meta["mean"], meta["std"]).to(device)
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=lr, betas=tuple(margs.betas))
                    for m, lr in ((G, margs.g_lr), (D, margs.d_lr)))
    class_freq = hidfd.ClassFrequency(c, b, margs.gamma).to(device)
    f_g = forward_flops(G, "forward", one.new_zeros(1, margs.z_dim), torch.zeros(1, dtype=torch.long, device=device))
    f_d, f_tf, f_t = (forward_flops(D, "forward", one), forward_flops(teacher, "features", one),
                      forward_flops(teacher, "forward", one))
    # D step: G 1x, teacher features 1x, D 3x on real + fake; G step: G 3x, D 3x, teacher 2x (to its input)
    formula = f"B (4 F_G + 9 F_D + F_T,features + 2 F_T); B={b}, F_G={f_g}, F_D={f_d}, F_T,features={f_tf}, F_T={f_t}"
    for net, method in ((teacher, "features"), (G, "forward"), (D, "forward")):
        compile_method(args, net, method)
    labels = torch.randint(0, c, (args.pool,), generator=torch.Generator().manual_seed(args.seed))
    t_feats = torch.randn(args.pool, teacher.feat_dim, generator=torch.Generator().manual_seed(args.seed))
    half = (0.5,) * meta["channels"]  # uint8 -> [-1, 1], the generator's range
    batches = device_batches(images, meta, args, device, labels, t_feats, crop_pad=0, flip=False, mean=half, std=half)
    noise = torch.Generator(device=device).manual_seed(args.seed + 2)

    def fast():
        x_real, y_real, t_real = next(batches)
        hidfd.discriminator_step(D, G, gan_teacher, x_real, y_real, t_real, opt_d, noise, margs)
        hidfd.generator_step(G, D, gan_teacher, class_freq, opt_g, b, noise, margs)

    naive_opt_g = torch.optim.Adam(naive_G.parameters(), lr=margs.g_lr, betas=tuple(margs.betas))
    naive_opt_d = torch.optim.Adam(naive_D.parameters(), lr=margs.d_lr, betas=tuple(margs.betas))
    naive = naive_batches(NaiveImages(images, T.Compose([T.ToTensor(), T.Normalize(half, half)]), labels, t_feats),
                          args)
    naive_freq = hidfd.ClassFrequency(c, b, margs.gamma).to(device)
    losses = []

    def naive_step():  # the textbook loop: two D forwards, a generator graph kept in the D step, .item()
        x_real, y_real, t_real = (t.to(device) for t in next(naive))
        y_fake = torch.randint(0, c, (b,), device=device)
        x_fake = naive_G(torch.randn(b, margs.z_dim, device=device), y_fake).detach()
        t_fake = naive_gan_teacher.features(x_fake).detach()
        (adv_r, cls_r, d_real), (adv_f, cls_f, d_fake) = naive_D(x_real), naive_D(x_fake)
        d_loss = sum(hidfd.adc_discriminator_loss(adv_r, adv_f, cls_r, cls_f, y_real, y_fake, margs.gan_loss)) + \
            margs.lambda_d * (hidfd.blend_loss(t_real, t_fake, d_real, d_fake)
                              + hidfd.trans_loss(t_real, t_fake, d_real, d_fake))
        naive_update(naive_opt_d, d_loss, losses)
        y_fake = torch.randint(0, c, (b,), device=device)
        x_fake = naive_G(torch.randn(b, margs.z_dim, device=device), y_fake)
        adv_f, cls_f, _ = naive_D(x_fake)
        t_logits = naive_gan_teacher(x_fake)
        g_loss = sum(hidfd.adc_generator_loss(adv_f, cls_f, y_fake, margs.gan_loss)) + \
            margs.lambda_g * hidfd.reg_loss(t_logits, naive_freq.n)
        naive_update(naive_opt_g, g_loss, losses)
        naive_freq.update(torch.bincount(t_logits.argmax(1), minlength=c))

    return Bench(fast, naive_step, b * (4 * f_g + 9 * f_d + f_tf + 2 * f_t), formula)


def build_hidfd_distill(pair, args, device):
    margs, meta, images, teacher, naive_teacher, one = pair_setup(pair, args, device, hidfd.build_parser())
    margs = hidfd.resolve_settings(margs)
    student = hidfd.SharedClassifierStudent(models.build_model(pair[1], meta["num_classes"], meta["channels"]),
                                            teacher.classifier)
    naive_student = copy.deepcopy(student).to(device)
    student = runtime.prepare_model(student, device)
    trained = runtime.FeaturesAndLogits(student)
    opt = runtime.make_optimizer([p for p in student.parameters() if p.requires_grad], margs)
    b = args.batch
    f_t, f_s = forward_flops(teacher, "features", one), forward_flops(student, "features", one)
    formula = f"B (F_T,features + 3 F_S,features); B={b}, F_T,features={f_t}, F_S,features={f_s}"
    compile_method(args, teacher, "features")
    compile_method(args, student, "features")
    batches = device_batches(images, meta, args, device)

    def fast():
        hidfd.distill_step(trained, teacher, next(batches)[0], opt)

    naive_opt = runtime.make_optimizer([p for p in naive_student.parameters() if p.requires_grad], margs)
    naive = naive_batches(NaiveImages(images, crop_flip_transform(meta, meta["size"])), args)
    losses = []

    def naive_step():
        x = next(naive)[0].to(device)
        naive_update(naive_opt, hidfd.align_loss(naive_student.features(x), naive_teacher.features(x).detach()),
                     losses)

    return Bench(fast, naive_step, b * (f_t + 3 * f_s), formula)


def build_bt_kd(pair, args, device):
    margs, meta, images, teacher, naive_teacher, one = pair_setup(pair, args, device, bt.build_parser())
    margs = bt.resolve_settings(margs)
    student = models.build_model(pair[1], meta["num_classes"], meta["channels"])
    naive_student = copy.deepcopy(student).to(device)
    student = runtime.prepare_model(student, device)
    opt = runtime.make_optimizer(student.parameters(), margs)
    b = args.batch
    f_t, f_s = forward_flops(teacher, "forward", one), forward_flops(student, "forward", one)
    formula = f"B (F_T + 3 F_S); B={b}, F_T={f_t}, F_S={f_s}"
    compile_method(args, teacher, "features")
    compile_method(args, student, "features")
    zeros, ones = (0.0,) * meta["channels"], (1.0,) * meta["channels"]
    batches = device_batches(images, meta, args, device, crop_pad=0, flip=False, mean=zeros, std=ones)  # [0, 1]
    aug_gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (meta["mean"], meta["std"]))

    def fast():
        bt.kd_step(student, teacher, next(batches)[0], None, opt, aug_gen, lambda v: (v - mean) / std, margs)

    naive_opt = runtime.make_optimizer(naive_student.parameters(), margs)
    naive = naive_batches(NaiveImages(images, bt_transform(meta)), args)
    losses = []

    def naive_step():
        x = next(naive)[0].to(device)
        naive_update(naive_opt, bt.kd_loss(naive_student(x), naive_teacher(x).detach(), margs.temperature), losses)

    return Bench(fast, naive_step, b * (f_t + 3 * f_s), formula)


def build_bt_label(pair, args, device):
    margs, meta, _, teacher, naive_teacher, one = pair_setup(pair, args, device, bt.build_parser())
    margs = bt.resolve_settings(margs)
    c, b = meta["num_classes"], args.batch
    shape = (meta["channels"], meta["size"], meta["size"])
    f_t = forward_flops(teacher, "forward", one)
    compile_method(args, teacher, "features")
    quota = 2 ** 62  # quotas that never fill: every step is a draw batch of the composer's filling phase
    draw_args = argparse.Namespace(draw_batch=b, max_minutes=None)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    counts = [torch.zeros(c, dtype=torch.int64, device=device)]

    def fast():
        counts[0] = bt.compose_generated(teacher, "uniform", shape, counts[0], quota, b, draw_args, meta["mean"],
                                         meta["std"], gen, True)[2]

    naive = naive_batches(NaiveNoise(args.pool, shape, T.Compose([T.ToTensor(), T.Normalize(meta["mean"],
                                                                                             meta["std"])])), args)
    naive_counts = [0] * c

    def naive_step():  # Algorithm 1 as printed: one sample at a time
        x = next(naive)[0].to(device)
        kept = []
        for k, label in enumerate(naive_teacher(x).argmax(1).tolist()):
            if naive_counts[label] < quota:
                naive_counts[label] += 1
                kept.append(x[k])
        return torch.stack(kept)

    return Bench(fast, naive_step, b * f_t, f"B F_T; B={b}, F_T={f_t}")


BUILDERS = {"kd3": build_kd3, "hidfd-gan": build_hidfd_gan, "hidfd-distill": build_hidfd_distill,
            "bt-kd": build_bt_kd, "bt-label": build_bt_label}


#### Benchmark ####

def measure(bench, args, device):
    """Warm up, then `repeats` windows of `steps` steps per path: (fast, naive) seconds per step, per window.
    Without DataLoader workers the windows alternate, so that other load hits both alike; with workers they
    do not (the workers would prefetch in the background while the fast path is timed)."""
    def warm_up(step):
        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

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


def row_result(step_name, pair, shape, args, bench, fast_s, naive_s):
    fast, naive = statistics.median(fast_s), statistics.median(naive_s)
    tflops = bench.flops / fast / 1e12
    return {"step": step_name, "pair": f"{pair[0]}->{pair[1]}", "dataset": pair[2], "input": shape,
            "batch": args.batch, "fast_img_s": args.batch / fast, "fast_ms": fast * 1e3,
            "fast_ms_runs": [s * 1e3 for s in fast_s], "naive_img_s": args.batch / naive, "naive_ms": naive * 1e3,
            "naive_ms_runs": [s * 1e3 for s in naive_s], "fast_over_naive": naive / fast,
            "gflop_per_step": bench.flops / 1e9, "flops_formula": bench.formula, "fast_tflop_s": tflops,
            "mfu": tflops / args.peak_tflops if args.peak_tflops else None}


def format_table(rows):
    """Fixed-width text table; ms/step as median [min-max] over the repeats."""
    def ms(row, path):
        runs = row[f"{path}_ms_runs"]
        return f"{row[f'{path}_ms']:.1f}" + (f" [{min(runs):.1f}-{max(runs):.1f}]" if len(runs) > 1 else "")

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
    config = {k: v for k, v in vars(args).items() if k != "pairs"}
    print("config: " + json.dumps(config), flush=True)
    print(f"device: {describe_device(device)}; torch {torch.__version__}; {args.threads} torch threads; naive "
          f"DataLoader num_workers={args.workers}; peak for MFU: {args.peak_tflops or 'none'}", flush=True)
    start, rows = time.time(), []
    for pair in args.pairs:
        for step_name in args.only:
            runtime.seed_everything(args.seed)
            bench = BUILDERS[step_name](pair, args, device)
            fast_s, naive_s = measure(bench, args, device)
            size = args.image_size or data.DATASETS[pair[2]]["size"]
            row = row_result(step_name, pair, f"{data.DATASETS[pair[2]]['channels']}x{size}x{size}", args, bench,
                             fast_s, naive_s)
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
