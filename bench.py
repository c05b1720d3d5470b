"""Throughput of each method's training step: the step functions of kd3.py, hidfd.py and
balanced_transfer.py (the fast path: the very functions their training loops call) against the same
step written the naive way in this file. docs/speed.md describes the steps, both paths, the timing
and the FLOP convention.

    # smoke test, ~30 s on 2 cores
    python bench.py --device cpu --quick
    # batch 256
    python bench.py --device cpu --arch-pair lenet5:lenet5_half:mnist
    # MFU against --peak-tflops
    python bench.py --device cuda --compile
"""

import argparse
import collections
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
# A step on a 2-core CPU takes 20 ms (LeNet labelling) to ~2 min (ResNet KD3 and GAN steps), hence
# few steps there; a GPU step takes milliseconds, hence many. --quick: a smoke test.
SETTINGS = {
    "cpu": dict(batch=256, warmup=1, steps=3, repeats=3, pool=2048),
    "cuda": dict(batch=256, warmup=10, steps=50, repeats=3, pool=16384),
    "quick-cpu": dict(batch=8, warmup=1, steps=1, repeats=1, pool=64),
    "quick-cuda": dict(batch=256, warmup=3, steps=10, repeats=1, pool=2048),
}
DEFAULT_PAIRS = ["resnet34:resnet18:cifar10", "lenet5:lenet5_half:mnist"]
STEPS = ("kd3", "hidfd-gan", "hidfd-distill", "bt-kd", "bt-label")
H100_BF16_DENSE_TFLOPS = 989.4  # H100 SXM5, dense bf16 tensor cores (1979 is with 2:4 sparsity)
FLOP_CONVENTION = (
    "FlopCounterMode forward FLOPs per image (2 per multiply-add, conv + matmul); "
    "1x no-grad forward, 2x frozen network back-propagated to its input, 3x trained network"
)


def build_parser():
    p = argparse.ArgumentParser(
        description="Images/s, ms/step, TFLOP/s and MFU of each method's training step: the "
        "method files' step functions vs the naive way.",
        formatter_class=runtime.HelpFormatter,
    )
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to time"
    )
    p.add_argument(
        "--arch-pair",
        nargs="+",
        default=DEFAULT_PAIRS,
        metavar="TEACHER:STUDENT[:DATASET]",
        help="pairs to time; DATASET (default cifar10) gives channels, classes, mean/std, "
        "crop/flip",
    )
    p.add_argument(
        "--only",
        nargs="+",
        default=list(STEPS),
        choices=STEPS,
        metavar="STEP",
        help="steps to time",
    )
    p.add_argument(
        "--image-size", type=int, default=None, help="input height = width (default: the dataset's)"
    )
    for key, text in (
        ("batch", "images per step"),
        ("warmup", "untimed steps per path"),
        ("steps", "timed steps per window"),
        ("repeats", "timed windows per path"),
        ("pool", "synthetic uint8 images the loaders cycle over"),
    ):
        defaults = ", ".join(f"{name} {values[key]}" for name, values in SETTINGS.items())
        p.add_argument(f"--{key}", type=int, default=None, help=f"{text} (default: {defaults})")
    p.add_argument("--quick", action="store_true", help="CI smoke test: SETTINGS['quick-<device>']")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of both paths (default: one per core)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="naive DataLoader num_workers (0: the fast path's threads)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the fast path's networks (in the warm-up)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak for MFU (default on CUDA: "
        f"{H100_BF16_DENSE_TFLOPS}, H100 SXM bf16 dense; on CPU none)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the synthetic images and the networks"
    )
    p.add_argument("--out", default=None, help="also write the table as JSON to this path")
    return p


def parse_pair(spec):
    """'resnet34:resnet18[:cifar10]' -> (teacher arch, student arch, dataset), names checked."""
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(
            f"--arch-pair {spec!r}: expected TEACHER:STUDENT or TEACHER:STUDENT:DATASET"
        )
    teacher_arch, student_arch, dataset = (parts + ["cifar10"])[:3]
    if dataset not in data.DATASETS:
        raise ValueError(
            f"--arch-pair {spec!r}: unknown dataset {dataset!r}; "
            f"valid: {', '.join(sorted(data.DATASETS))}"
        )
    with torch.device("meta"):  # names checked by the registry itself, without allocating weights
        for arch in (teacher_arch, student_arch):
            models.build_model(arch, 10, data.DATASETS[dataset]["channels"])
    return teacher_arch, student_arch, dataset


def check_input_size(pair, size):
    """Refuse an --image-size the pair's networks cannot take, before anything is timed."""
    meta = data.DATASETS[pair[2]]
    for arch in pair[:2]:
        try:
            with torch.no_grad():
                models.build_model(arch, meta["num_classes"], meta["channels"]).eval()(
                    torch.zeros(1, meta["channels"], size, size)
                )
        except RuntimeError:
            raise ValueError(
                f"--image-size {size}: {arch} cannot take {size}x{size} inputs (the {pair[2]} pair "
                f"runs at {meta['size']}x{meta['size']}) — give a larger size"
            ) from None


def resolve_settings(args):
    """Fill every None flag from SETTINGS (visible above) and validate; returns (args, device)."""
    device = runtime.get_device(args.device)
    for key, value in SETTINGS[("quick-" if args.quick else "") + device.type].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch", "warmup", "steps", "repeats", "pool"):  # before anything is built or timed
        full, quick = SETTINGS[device.type][key], SETTINGS["quick-" + device.type][key]
        runtime.check_range(
            f"--{key}",
            getattr(args, key),
            1,
            fix=f"the default is {full} on {device.type} ({quick} with --quick)",
        )
    runtime.check_range("--workers", args.workers, 0, fix="0 loads in the timing process")
    if args.threads is not None:
        runtime.check_range("--threads", args.threads, 1, fix="leave it out for one per core")
    if args.image_size is not None:
        runtime.check_range(
            "--image-size", args.image_size, 1, fix="leave it out for each dataset's own size"
        )
    if args.peak_tflops is not None:
        runtime.check_range(
            "--peak-tflops",
            args.peak_tflops,
            0,
            open_low=True,
            fix=f"e.g. {H100_BF16_DENSE_TFLOPS} for an H100 SXM (bf16 dense)",
        )
    runtime.check_range(
        "--seed",
        args.seed,
        0,
        runtime.SEED_MAX,
        fix=f"give a whole number from 0 to {runtime.SEED_MAX}",
    )
    if args.out:  # a file path; its folder is made when the file is written
        if os.path.isdir(args.out):
            raise ValueError(
                f"--out {args.out} is a folder — give a file path, e.g. "
                f"{os.path.join(args.out, 'out.json')}"
            )
        folder = os.path.dirname(os.path.abspath(args.out))
        runtime.check_writable_folder("--out", args.out, folder)
    args.pairs = [parse_pair(s) for s in args.arch_pair]
    for pair in args.pairs if args.image_size else ():  # each dataset's own size fits its pair
        check_input_size(pair, args.image_size)
    if args.pool < args.batch:
        raise ValueError(
            f"--pool ({args.pool}) must hold at least one batch ({args.batch}) — give "
            f"a larger --pool or a smaller --batch"
        )
    if args.peak_tflops is None and device.type == "cuda":
        args.peak_tflops = H100_BF16_DENSE_TFLOPS
    return args, device


def forward_flops(module, method, *inputs):
    """FLOPs FlopCounterMode counts for module.method(*inputs), in eval mode and without
    gradients."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            getattr(module, method)(*inputs)
    finally:
        module.train(was_training)
    return counter.get_total_flops()


def endless(loader):
    while True:
        yield from loader


#### The naive data pipeline: per-sample torchvision transforms on PIL images ####


class NaiveImages(Dataset):
    """uint8 images as numpy (N, H, W, C), one PIL image per __getitem__ (as torchvision's CIFAR10
    does), then `transform`; extra tensors are indexed alongside."""

    def __init__(self, images, transform, *extras):
        self.images, self.transform, self.extras = (
            images.permute(0, 2, 3, 1).numpy(),
            transform,
            extras,
        )

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return (self.transform(to_pil_image(self.images[i])), *(t[i] for t in self.extras))


class NaiveNoise(NaiveImages):
    """As many images as the pool, of its shape, but uniform noise drawn one at a time with numpy,
    quantised to uint8, then `transform`."""

    def __getitem__(self, i):
        h, w, c = self.images.shape[1:]
        return (
            self.transform(to_pil_image((np.random.rand(h, w, c) * 255).round().astype(np.uint8))),
        )


def normalize_transform(mean, std, augmentations=()):
    return T.Compose([*augmentations, T.ToTensor(), T.Normalize(mean, std)])


def crop_flip_transform(meta):
    ops = [T.RandomCrop(meta["size"], padding=meta["crop_pad"])] if meta["crop_pad"] else []
    ops += [T.RandomHorizontalFlip()] if meta["flip"] else []
    return normalize_transform(meta["mean"], meta["std"], ops)


def bt_transform(meta):
    """balanced_transfer.augment per sample, at its own default strengths (read from its
    signature)."""
    aug = {
        k: v.default
        for k, v in inspect.signature(bt.augment).parameters.items()
        if v.default is not inspect.Parameter.empty
    }
    p, std, amount = aug["p"], aug["noise_std"], aug["salt_pepper"]
    return T.Compose(
        [
            T.RandomApply(
                [T.RandomAffine(degrees=0, scale=(1 - aug["max_scale"], 1 + aug["max_scale"]))], p=p
            ),
            T.RandomApply([T.RandomRotation(aug["max_degrees"])], p=p),
            T.RandomHorizontalFlip(p),
            T.ToTensor(),
            T.RandomApply([T.Lambda(lambda x: (x + std * torch.randn_like(x)).clamp(0, 1))], p=p),
            T.RandomApply(
                [
                    T.Lambda(
                        lambda x: torch.where(
                            torch.rand_like(x) < amount, torch.rand_like(x).round(), x
                        )
                    )
                ],
                p=p,
            ),
            T.Normalize(meta["mean"], meta["std"]),
        ]
    )


def naive_update(opt, loss):
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()  # the host sync of the textbook loop


#### One builder per step: (fast step, naive step, FLOPs, formula) ####

Bench = collections.namedtuple("Bench", "fast naive flops formula")


class PairSetup:
    """What every builder starts from: the method's settings for the pair (its own parser and
    resolve_settings), the dataset's metadata, a synthetic uint8 pool, and the teacher twice: as the
    method files hold it (prepared, eval, frozen) and the naive way (eval() only, fp32)."""

    def __init__(self, method, pair, args, device):
        self.args, self.device, self.student_arch = args, device, pair[1]
        self.margs = method.resolve_settings(
            method.build_parser().parse_args(
                ["--dataset", pair[2], "--teacher-arch", pair[0], "--student-arch", pair[1]]
            )
        )
        self.meta = dict(
            data.DATASETS[pair[2]], size=args.image_size or data.DATASETS[pair[2]]["size"]
        )
        self.classes, self.channels = self.meta["num_classes"], self.meta["channels"]
        self.shape = (self.channels, self.meta["size"], self.meta["size"])
        self.images = torch.randint(
            0,
            256,
            (args.pool, *self.shape),
            dtype=torch.uint8,
            generator=torch.Generator().manual_seed(args.seed),
        )
        teacher = models.build_model(pair[0], self.classes, self.channels)
        self.naive_teacher = copy.deepcopy(teacher).to(device).eval()
        self.teacher = runtime.prepare_model(teacher, device).eval().requires_grad_(False)
        self.one = torch.zeros(
            1, *self.shape, device=device
        )  # the input of the per-image FLOP counts

    def student(self):
        return models.build_model(self.student_arch, self.classes, self.channels)

    def twins(self, net):
        """net prepared for the fast path, and an fp32 copy for the naive one (copied before
        channels_last)."""
        naive = copy.deepcopy(net).to(self.device)
        return runtime.prepare_model(net, self.device), naive

    def compile(self, *net_methods):
        """--compile: each (net, method) replaced by its torch.compile'd version (an instance
        attribute)."""
        if self.args.compile:
            for net, method in net_methods:
                setattr(net, method, torch.compile(getattr(net, method)))

    def device_batches(self, *extras, **loader_kw):
        """The fast path's batches: data.DeviceLoader with the dataset's crop/flip/normalisation by
        default."""
        loader_kw = {key: self.meta[key] for key in ("crop_pad", "flip", "mean", "std")} | loader_kw
        return endless(
            data.DeviceLoader(
                self.images,
                *extras,
                batch_size=self.args.batch,
                shuffle=True,
                drop_last=True,
                device=self.device,
                seed=self.args.seed,
                **loader_kw,
            )
        )

    def naive_batches(self, dataset):
        """The naive path's batches: a torch DataLoader over a per-sample Dataset."""
        workers = self.args.workers
        return endless(
            DataLoader(
                dataset,
                batch_size=self.args.batch,
                shuffle=True,
                drop_last=True,
                num_workers=workers,
                persistent_workers=workers > 0,
            )
        )

    def student_bench(
        self,
        trained,
        naive_trained,
        fast_step,
        naive_loss,
        naive_transform,
        flops,
        formula,
        student=None,
        **loader_kw,
    ):
        """A step that trains a student on pool batches (kd3, hidfd-distill, bt-kd):
        fast_step(x, opt) on DeviceLoader batches, naive_loss(x) on DataLoader batches through
        naive_transform; each path with the method's optimiser over the trainable parameters of
        `trained` / `naive_trained`. --compile compiles the features of the teacher and of
        `student` (default: `trained`)."""
        opt, naive_opt = (
            runtime.make_optimizer([p for p in net.parameters() if p.requires_grad], self.margs)
            for net in (trained, naive_trained)
        )
        self.compile((self.teacher, "features"), (student or trained, "features"))
        batches = self.device_batches(**loader_kw)
        naive = self.naive_batches(NaiveImages(self.images, naive_transform))

        def fast():
            fast_step(next(batches)[0], opt)

        def naive_step():
            naive_update(naive_opt, naive_loss(next(naive)[0].to(self.device)))

        return Bench(fast, naive_step, flops, formula)


def build_kd3(pair, args, device):
    setup = PairSetup(kd3, pair, args, device)
    margs, b, teacher, naive_teacher, one = (
        setup.margs,
        args.batch,
        setup.teacher,
        setup.naive_teacher,
        setup.one,
    )
    student = kd3.SharedClassifierStudent(setup.student(), teacher.classifier)
    nets, naive_nets = setup.twins(kd3.KD3Networks(student, teacher.feat_dim, margs.proj_dim))
    f_t, f_s = forward_flops(teacher, "features", one), forward_flops(student, "forward", one)
    f_heads = forward_flops(
        nets.head_s, "forward", one.new_zeros(1, student.feat_dim)
    ) + forward_flops(nets.head_t, "forward", one.new_zeros(1, teacher.feat_dim))
    kw = dict(tau=margs.tau, reduction=margs.mdcl_reduction)

    def naive_loss(x):
        inputs = torch.cat([x, kd3.contrastive_view(x, False, margs.mix_delta)])
        t_feat = naive_teacher.features(inputs).detach()
        s_feat, s_logits, z_s, z_t = naive_nets(inputs, t_feat)
        w = kd3.alignment_weights(
            F.softmax(s_logits[:b], 1), F.softmax(naive_teacher.classifier(t_feat[:b]), 1)
        )
        return kd3.weighted_feature_alignment(s_feat[:b], t_feat[:b], w) + margs.alpha * (
            kd3.mdcl_loss(z_s[:b], z_s[b:], **kw) + kd3.mdcl_loss(z_t[:b], z_t[b:], **kw)
        )

    return setup.student_bench(
        nets,
        naive_nets,
        fast_step=lambda x, opt: kd3.train_step(
            nets, teacher, x, opt, tau=margs.tau, alpha=margs.alpha, mix_delta=margs.mix_delta
        ),
        naive_loss=naive_loss,
        naive_transform=crop_flip_transform(setup.meta),
        flops=2 * b * (f_t + 3 * (f_s + f_heads)),
        formula=f"2B (F_T + 3 (F_S + F_heads)); B={b}, F_T={f_t}, F_S={f_s}, F_heads={f_heads}",
        student=student,
    )


def build_hidfd_distill(pair, args, device):
    setup = PairSetup(hidfd, pair, args, device)
    b, teacher, naive_teacher, one = args.batch, setup.teacher, setup.naive_teacher, setup.one
    student, naive_student = setup.twins(
        hidfd.SharedClassifierStudent(setup.student(), teacher.classifier)
    )
    trained = runtime.FeaturesAndLogits(student)
    f_t, f_s = forward_flops(teacher, "features", one), forward_flops(student, "features", one)
    return setup.student_bench(
        student,
        naive_student,
        fast_step=lambda x, opt: hidfd.distill_step(trained, teacher, x, opt),
        naive_loss=lambda x: hidfd.align_loss(
            naive_student.features(x), naive_teacher.features(x).detach()
        ),
        naive_transform=crop_flip_transform(setup.meta),
        flops=b * (f_t + 3 * f_s),
        formula=f"B (F_T,features + 3 F_S,features); B={b}, F_T,features={f_t}, F_S,features={f_s}",
    )


def build_bt_kd(pair, args, device):
    setup = PairSetup(bt, pair, args, device)
    margs, b, teacher, naive_teacher, one = (
        setup.margs,
        args.batch,
        setup.teacher,
        setup.naive_teacher,
        setup.one,
    )
    student, naive_student = setup.twins(setup.student())
    f_t, f_s = forward_flops(teacher, "forward", one), forward_flops(student, "forward", one)
    aug_gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    mean, std = (
        torch.tensor(v, device=device).view(1, -1, 1, 1)
        for v in (setup.meta["mean"], setup.meta["std"])
    )
    return setup.student_bench(
        student,
        naive_student,
        fast_step=lambda x, opt: bt.kd_step(
            student,
            teacher,
            x,
            None,
            opt,
            aug_gen,
            lambda v: (v - mean) / std,
            tau=margs.temperature,
        ),
        naive_loss=lambda x: bt.kd_loss(
            naive_student(x), naive_teacher(x).detach(), margs.temperature
        ),
        naive_transform=bt_transform(setup.meta),
        flops=b * (f_t + 3 * f_s),
        formula=f"B (F_T + 3 F_S); B={b}, F_T={f_t}, F_S={f_s}",
        # kd_step takes images in [0, 1]: it augments them, then normalises
        crop_pad=0,
        flip=False,
        mean=(0.0,) * setup.channels,
        std=(1.0,) * setup.channels,
    )


def build_hidfd_gan(pair, args, device):
    setup = PairSetup(hidfd, pair, args, device)
    margs, b, c, teacher, meta, one = (
        setup.margs,
        args.batch,
        setup.classes,
        setup.teacher,
        setup.meta,
        setup.one,
    )
    G, naive_G = setup.twins(
        hidfd.Generator(c, setup.channels, meta["size"], margs.z_dim, margs.gan_width)
    )
    D, naive_D = setup.twins(
        hidfd.Discriminator(c, setup.channels, meta["size"], teacher.feat_dim, margs.gan_width)
    )
    gan_teacher, naive_gan_teacher = (
        hidfd.GanRangeTeacher(t, meta["mean"], meta["std"]).to(device)
        for t in (teacher, setup.naive_teacher)
    )
    opt_g, opt_d, naive_opt_g, naive_opt_d = (
        torch.optim.Adam(net.parameters(), lr=lr, betas=tuple(margs.betas))
        for net, lr in (
            (G, margs.g_lr),
            (D, margs.d_lr),
            (naive_G, margs.g_lr),
            (naive_D, margs.d_lr),
        )
    )
    class_freq, naive_freq = (hidfd.ClassFrequency(c, b, margs.gamma).to(device) for _ in range(2))
    f_g = forward_flops(
        G, "forward", one.new_zeros(1, margs.z_dim), torch.zeros(1, dtype=torch.long, device=device)
    )
    f_d, f_tf, f_t = (
        forward_flops(D, "forward", one),
        forward_flops(teacher, "features", one),
        forward_flops(teacher, "forward", one),
    )
    setup.compile((teacher, "features"), (G, "forward"), (D, "forward"))
    labels = torch.randint(0, c, (args.pool,), generator=torch.Generator().manual_seed(args.seed))
    t_feats = torch.randn(
        args.pool, teacher.feat_dim, generator=torch.Generator().manual_seed(args.seed)
    )
    half = (0.5,) * setup.channels  # uint8 -> [-1, 1], the generator's range
    batches = setup.device_batches(labels, t_feats, crop_pad=0, flip=False, mean=half, std=half)
    naive = setup.naive_batches(
        NaiveImages(setup.images, normalize_transform(half, half), labels, t_feats)
    )
    noise = torch.Generator(device=device).manual_seed(args.seed + 2)

    def fast():
        x_real, y_real, t_real = next(batches)
        hidfd.discriminator_step(
            D,
            G,
            gan_teacher,
            x_real,
            y_real,
            t_real,
            opt_d,
            noise,
            z_dim=margs.z_dim,
            lambda_d=margs.lambda_d,
            q=margs.q,
        )
        hidfd.generator_step(
            G,
            D,
            gan_teacher,
            class_freq,
            opt_g,
            b,
            noise,
            z_dim=margs.z_dim,
            lambda_g=margs.lambda_g,
        )

    # the textbook loop: two D forwards, a generator graph kept in the D step, .item()
    def naive_step():
        x_real, y_real, t_real = (t.to(device) for t in next(naive))
        y_fake = torch.randint(0, c, (b,), device=device)
        x_fake = naive_G(torch.randn(b, margs.z_dim, device=device), y_fake).detach()
        t_fake = naive_gan_teacher.features(x_fake).detach()
        (adv_r, cls_r, d_real), (adv_f, cls_f, d_fake) = naive_D(x_real), naive_D(x_fake)
        d_loss = sum(
            hidfd.adc_discriminator_loss(adv_r, adv_f, cls_r, cls_f, y_real, y_fake, margs.gan_loss)
        ) + margs.lambda_d * (
            hidfd.blend_loss(t_real, t_fake, d_real, d_fake)
            + hidfd.trans_loss(t_real, t_fake, d_real, d_fake)
        )
        naive_update(naive_opt_d, d_loss)
        y_fake = torch.randint(0, c, (b,), device=device)
        x_fake = naive_G(torch.randn(b, margs.z_dim, device=device), y_fake)
        adv_f, cls_f, _ = naive_D(x_fake)
        t_logits = naive_gan_teacher(x_fake)
        g_loss = sum(
            hidfd.adc_generator_loss(adv_f, cls_f, y_fake, margs.gan_loss)
        ) + margs.lambda_g * hidfd.reg_loss(t_logits, naive_freq.n)
        naive_update(naive_opt_g, g_loss)
        naive_freq.update(torch.bincount(t_logits.argmax(1), minlength=c))

    # D step: G 1x, teacher features 1x, D 3x on real + fake;
    # G step: G 3x, D 3x, teacher 2x (to its input)
    return Bench(
        fast,
        naive_step,
        b * (4 * f_g + 9 * f_d + f_tf + 2 * f_t),
        f"B (4 F_G + 9 F_D + F_T,features + 2 F_T); B={b}, F_G={f_g}, F_D={f_d}, "
        f"F_T,features={f_tf}, F_T={f_t}",
    )


def build_bt_label(pair, args, device):
    setup = PairSetup(bt, pair, args, device)
    b, meta, teacher = args.batch, setup.meta, setup.teacher
    f_t = forward_flops(teacher, "forward", setup.one)
    setup.compile((teacher, "features"))
    labeller = bt.Labeller(teacher, meta["mean"], meta["std"], b)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def draw():
        return bt.draw_noise(b, setup.shape, "uniform", gen)

    # The phase a long composition spends nearly all its draws in: every class full but the two the
    # teacher gives least (their quotas never fill here), so the screen passes only their candidates
    # to fp32.
    quota = 2**62
    counts = torch.full((setup.classes,), quota, dtype=torch.int64, device=device)
    counts[torch.bincount(labeller.exact(draw()), minlength=setup.classes).argsort()[:2]] = 0
    naive_counts = counts.tolist()
    order_gen = torch.Generator().manual_seed(args.seed)
    naive = setup.naive_batches(
        NaiveNoise(setup.images, normalize_transform(meta["mean"], meta["std"]))
    )

    def fast():
        stream = bt.NoiseStream(gen, setup.classes)
        stream.counts = counts.clone()
        bt.compose_generated(stream, draw, labeller, quota, b)

    def naive_step():  # Algorithm 1 as printed, one sample at a time (labels: one batched forward)
        x = next(naive)[0].to(device)
        labels = setup.naive_teacher(x).argmax(1).tolist()
        kept = bt.algorithm1_literal(
            [range(len(x))], labels.__getitem__, quota, naive_counts, order_gen
        )
        return [x[k] for k in kept[0]]

    return Bench(fast, naive_step, b * f_t, f"B F_T; B={b}, F_T={f_t}")


BUILDERS = {
    "kd3": build_kd3,
    "hidfd-gan": build_hidfd_gan,
    "hidfd-distill": build_hidfd_distill,
    "bt-kd": build_bt_kd,
    "bt-label": build_bt_label,
}


#### Timing and the table ####


def measure(bench, args, device):
    """Warm up, then `repeats` windows of `steps` steps per path: (fast, naive) seconds per step,
    per window. Without DataLoader workers the windows alternate, so that other load hits both
    alike; with workers they do not (the workers would prefetch in the background while the fast
    path is timed)."""
    cuda = device.type == "cuda"

    def warm_up(step):
        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize(device)

    def window(
        step,
    ):  # seconds per step; on GPU from CUDA events, which also count the kernels still queued
        if not cuda:
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            return (time.perf_counter() - start) / args.steps
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.steps):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / args.steps

    warm_up(bench.fast)
    if args.workers:
        fast_s = [window(bench.fast) for _ in range(args.repeats)]
        warm_up(bench.naive)
        return fast_s, [window(bench.naive) for _ in range(args.repeats)]
    warm_up(bench.naive)
    alternating = [(window(bench.fast), window(bench.naive)) for _ in range(args.repeats)]
    return [f for f, _ in alternating], [n for _, n in alternating]


def row_result(step_name, pair, shape, args, bench, fast_s, naive_s):
    fast, naive = statistics.median(fast_s), statistics.median(naive_s)
    tflops = bench.flops / fast / 1e12
    return {
        "step": step_name,
        "pair": f"{pair[0]}->{pair[1]}",
        "dataset": pair[2],
        "input": shape,
        "batch": args.batch,
        "fast_img_s": args.batch / fast,
        "fast_ms": fast * 1e3,
        "fast_ms_runs": [s * 1e3 for s in fast_s],
        "naive_img_s": args.batch / naive,
        "naive_ms": naive * 1e3,
        "naive_ms_runs": [s * 1e3 for s in naive_s],
        "fast_over_naive": naive / fast,
        "gflop_per_step": bench.flops / 1e9,
        "flops_formula": bench.formula,
        "fast_tflop_s": tflops,
        "mfu": tflops / args.peak_tflops if args.peak_tflops else None,
    }


def format_table(rows):
    """Fixed-width text table; ms/step as median [min-max] over the repeats."""

    def ms(row, path):
        runs = row[f"{path}_ms_runs"]
        return f"{row[f'{path}_ms']:.1f}" + (
            f" [{min(runs):.1f}-{max(runs):.1f}]" if len(runs) > 1 else ""
        )

    def rate(img_s):
        return f"{img_s:.0f}" if img_s >= 100 else f"{img_s:.2f}"

    header = [
        "step",
        "pair",
        "input",
        "batch",
        "fast img/s",
        "fast ms/step",
        "naive img/s",
        "naive ms/step",
        "fast/naive",
        "GFLOP/step",
        "TFLOP/s",
        "MFU",
    ]
    lines = [
        [
            r["step"],
            r["pair"],
            r["input"],
            str(r["batch"]),
            rate(r["fast_img_s"]),
            ms(r, "fast"),
            rate(r["naive_img_s"]),
            ms(r, "naive"),
            f"{r['fast_over_naive']:.2f}x",
            f"{r['gflop_per_step']:.2f}",
            f"{r['fast_tflop_s']:.3f}",
            "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]

    def fmt(cells):  # text columns left-aligned, numbers right-aligned
        return "  ".join(
            c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def describe_device(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name
            )
    return f"CPU {name}, {os.cpu_count()} cores"


def run(args):
    """Time every (pair, step); print the table; return the results dict (also written to --out)."""
    args, device = resolve_settings(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    config = {k: v for k, v in vars(args).items() if k != "pairs"}
    device_name = describe_device(device)
    print("config: " + json.dumps(config), flush=True)
    print(
        f"device: {device_name}; torch {torch.__version__}; {args.threads} torch threads; "
        f"naive DataLoader num_workers={args.workers}; peak for MFU: {args.peak_tflops or 'none'}",
        flush=True,
    )
    start, rows = time.time(), []
    for pair in args.pairs:
        size = args.image_size or data.DATASETS[pair[2]]["size"]
        shape = f"{data.DATASETS[pair[2]]['channels']}x{size}x{size}"
        for step_name in args.only:
            runtime.seed_everything(args.seed)
            bench = BUILDERS[step_name](pair, args, device)
            row = row_result(step_name, pair, shape, args, bench, *measure(bench, args, device))
            rows.append(row)
            print(
                f"  {step_name} {row['pair']}: fast {row['fast_ms']:.1f} ms/step, "
                f"naive {row['naive_ms']:.1f} ms/step ({row['fast_over_naive']:.2f}x)",
                flush=True,
            )
            del bench  # and with it the naive DataLoader's worker processes
            gc.collect()
    print(format_table(rows), flush=True)
    wall = time.time() - start
    print(f"wall time {wall:.1f} s", flush=True)
    results = {
        "device": device_name,
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": args.threads,
        "naive_workers": args.workers,
        "peak_tflops": args.peak_tflops,
        "flop_convention": FLOP_CONVENTION,
        "config": config,
        "wall_time_s": round(wall, 1),
        "rows": rows,
    }
    if args.out:
        with runtime.reporting_write(args.out):
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
        print(f"wrote {args.out}", flush=True)
    return results


def main(argv=None):
    try:
        run(build_parser().parse_args(argv))
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
