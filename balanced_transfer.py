"""Class-balanced arbitrary transfer sets for data-free KD (Nayak, Mopuri, Chakraborty, WACV 2021).

Without the teacher's training data, distil on *arbitrary* unlabelled images (random noise, unrelated
synthetic or natural datasets). The teacher's argmax spreads such data very unevenly over its classes, so
Algorithm 1 composes a "target-class balanced" set: go through sources D_1..D_M in order and keep a sample
only while its teacher-predicted class holds fewer than N/C samples. The student then learns from the
teacher's temperature-softened outputs alone, Eq. (2), optionally on augmented images (Sec. 4.2).

    python balanced_transfer.py --dataset fashionmnist --source noise-uniform --data-root /usr/share/datasets
    python balanced_transfer.py --dataset fashionmnist --source noise-uniform --unbalanced --no-augment
    python balanced_transfer.py --dataset cifar10 --source svhn,tinyimagenet     # AlexNet -> AlexNet-half

Expected (Table 1, FMNIST, LeNet-5 -> LeNet-5-half, teacher 90.84%): noise unbalanced 33.49 / 38.37 and
balanced 70.15 / 74.33 (without / with augmentation). Uniform noise cannot fill every class quota of a
Fashion-MNIST teacher in a sensible number of draws, so the composer stops at --max-draws and reports the
histogram it reached; measured numbers on a 2-core CPU are in the README.
"""

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import data
import models
import teacher as teacher_lib

#### Settings: defaults per dataset family (every value is also a CLI flag) ####
# The paper gives architectures and sources (Sec. 4, Table 1) but no student optimiser, epochs or batch size.
# mnist: LeNet-5 -> LeNet-5-half, uniform noise; the repository's MNIST-family recipe (Adam 1e-3, 40 epochs).
#        max_draws 1M: ~3.5 min of teacher forwards on a busy 2-core CPU; more draws barely help (see the docs).
# cifar: AlexNet -> AlexNet-half (Table 1 / Table 2-left), SVHN then TinyImageNet (Sec. 4.1); the repository's
#        CIFAR recipe (SGD 0.05, 240 epochs, /10 at 150/180/210).
# synthetic: tiny settings so that the end-to-end tests take seconds; noise, then style-shifted shapes (two
#        sources, so Algorithm 1 switches source).
SETTINGS = {
    "mnist": dict(teacher_arch="lenet5", student_arch="lenet5_half", source="noise-uniform", optimizer="adam",
                  lr=1e-3, momentum=0.0, weight_decay=0.0, epochs=40, milestones=(), batch_size=256,
                  max_draws=1_000_000, draw_batch=8192),
    "cifar": dict(teacher_arch="alexnet", student_arch="alexnet_half", source="svhn,tinyimagenet", optimizer="sgd",
                  lr=0.05, momentum=0.9, weight_decay=5e-4, epochs=240, milestones=(150, 180, 210), batch_size=128,
                  max_draws=1_000_000, draw_batch=8192),
    "synthetic": dict(teacher_arch="lenet5", student_arch="lenet5_half", source="noise-uniform,shifted:synthetic",
                      optimizer="adam", lr=2e-3, momentum=0.0, weight_decay=0.0, epochs=2, milestones=(),
                      batch_size=128, max_draws=4000, draw_batch=2048),
}

# Generated sources are drawn on the fly by the streaming composer. uniform and gaussian are the paper's
# (Sec. 4: U[0,1] per pixel; N(0.5, 0.1) clipped for CIFAR-100); lowfreq and brightness are additions that
# reach far more teacher classes per draw (IMPLEMENTATION_NOTES) and are never a default.
NOISE_SOURCES = {"noise-uniform": "uniform", "noise-gaussian": "gaussian", "noise-lowfreq": "lowfreq",
                 "noise-brightness": "brightness"}


def build_parser():
    p = argparse.ArgumentParser(description="KD on a class-balanced arbitrary transfer set (WACV 2021). "
                                            "Defaults per family: see SETTINGS.")
    p.add_argument("--dataset", default="fashionmnist", choices=sorted(data.DATASETS), help="the teacher's task")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: cached/trained by teacher.py)")
    p.add_argument("--teacher-arch", default=None, help="Sec. 4: lenet5 (MNIST/FMNIST), alexnet (CIFAR-10; "
                   "resnet34 for Table 2-right)")
    p.add_argument("--student-arch", default=None, help="Sec. 4: lenet5_half, alexnet_half (resnet18 for resnet34)")
    p.add_argument("--data-root", default="data")
    p.add_argument("--download", action="store_true", help="fetch the teacher's dataset with torchvision first")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--checkpoint-dir", default="checkpoints")
    # Transfer set (Algorithm 1, Sec. 4.1)
    p.add_argument("--source", default=None, help="arbitrary sources D_1..D_M in order, any data.py source list "
                   "or noise-uniform/-gaussian/-lowfreq/-brightness (Sec. 4.1: noise, Clevr+Mid-Air, "
                   "SVHN+TinyImageNet)")
    balance = p.add_mutually_exclusive_group()
    balance.add_argument("--balanced", dest="balanced", action="store_true", default=True,
                         help="compose with Algorithm 1 (default)")
    balance.add_argument("--unbalanced", dest="balanced", action="store_false",
                         help="Table 1 'X' rows: a random composition of the same size N")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="Sec. 4.2: scaling, rotation, flip, gaussian and salt-and-pepper noise during KD")
    p.add_argument("--transfer-size", type=int, default=None, help="N of Algorithm 1 (Sec. 4.1: the teacher's "
                   "training-set size, 60000 for FMNIST)")
    p.add_argument("--max-draws", type=int, default=None, help="cap on draws per generated source (a ':N' suffix "
                   "overrides it); the paper draws until balanced, which uniform noise never reaches for FMNIST")
    p.add_argument("--draw-batch", type=int, default=None, help="noise images per teacher forward while composing")
    p.add_argument("--strict", action="store_true", help="stop with an error if some class gets no sample at all")
    # Distillation (Eq. 2)
    p.add_argument("--temperature", type=float, default=20.0, help="tau of Eq. (2); not given in the paper: 20 as "
                   "in the same group's ZSKD and DeGAN")
    p.add_argument("--epochs", type=int, default=None, help="student epochs (not in the paper; 40 MNIST family)")
    p.add_argument("--batch-size", type=int, default=None, help="student batch size (256 MNIST family, 128 CIFAR)")
    p.add_argument("--lr", type=float, default=None, help="student lr (Adam 1e-3 MNIST family; SGD 0.05 CIFAR)")
    p.add_argument("--optimizer", default=None, choices=["sgd", "adam"], help="student optimizer")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay")
    p.add_argument("--milestones", type=int, nargs="*", default=None, help="lr /10 at these epochs")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run from "
                   "RUN_DIR/state.pt and transfer_set.pt with its saved config.json (flags given now must match it)")
    return p


def resolve_settings(args):
    """Fill every None flag from SETTINGS[family] (visible above); N defaults to |D_o|,
    the teacher's training-set size (Sec. 4.1), so the original data is never read."""
    for key, value in SETTINGS[data.DATASETS[args.dataset]["family"]].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.transfer_size is None:
        args.transfer_size = data.DATASETS[args.dataset]["train_size"]
    if args.transfer_size < data.DATASETS[args.dataset]["num_classes"]:
        raise ValueError("--transfer-size must be at least the number of classes (quota N // C >= 1)")
    if min(args.epochs, args.batch_size, args.max_draws, args.draw_batch) < 1 or args.temperature <= 0:
        raise ValueError("epochs, batch sizes and --max-draws must be >= 1 and --temperature > 0")
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


def random_noise(n, shape, kind, generator):
    """n noise images (n, *shape) in [0, 1] on the generator's device.
    uniform: U[0, 1] per pixel (Sec. 4, MNIST/FMNIST/CIFAR-10). gaussian: N(0.5, 0.1) clipped (Sec. 4, CIFAR-100).
    lowfreq: uniform 8x8 noise upsampled (nearest) to the image size. brightness: uniform x a per-image U[0, 1]."""
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
    raise ValueError(f"unknown noise kind {kind!r} (uniform, gaussian, lowfreq, brightness)")


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
    # reflection padding: black corners would move noise images into other teacher classes (IMPLEMENTATION_NOTES)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    gauss = chosen().view(b, 1, 1, 1)
    x = x + gauss * noise_std * torch.randn(x.shape, generator=generator, device=dev)
    sp = chosen().view(b, 1, 1, 1).bool()
    u = torch.rand(x.shape, generator=generator, device=dev)
    x = torch.where(sp & (u < salt_pepper / 2), 0.0, x)          # pepper
    x = torch.where(sp & (u > 1 - salt_pepper / 2), 1.0, x)      # salt
    return x.clamp(0, 1)


#### Training ####

def to_uint8(x):
    # DEVIATION: noise is quantised to 256 levels — the transfer set is stored as uint8 like every other source
    # (4x less memory on the device); a 1/255 step is far below the noise's own spread.
    return (x * 255).round().to(torch.uint8)


def teacher_labels(model, images, mean, std, batch_size):
    return teacher_lib.predict(model, images, mean, std, batch_size).argmax(1)


def compose_generated(model, kind, shape, counts, quota, draws, args, mean, std, generator, balanced):
    """Streaming Algorithm 1 for a generated source: draw batches, label them with the teacher, keep what fills
    the quotas (balanced) or everything (unbalanced); stop when every class is full or after `draws` draws.
    Returns (kept uint8 images, their teacher labels, updated counts, draws made, histogram of all draws)."""
    kept_x, kept_y = [], []
    raw_hist = torch.zeros_like(counts)
    made = 0
    while made < draws:
        x = to_uint8(random_noise(min(args.draw_batch, draws - made), shape, kind, generator))  # (B, C, H, W)
        labels = teacher_labels(model, x, mean, std, args.draw_batch)
        made += len(x)
        raw_hist += torch.bincount(labels, minlength=len(counts))
        if balanced:
            keep, counts = class_fill(labels, counts, quota)  # Algorithm 1, lines 5-10
        else:
            keep = torch.ones_like(labels, dtype=torch.bool)
        kept_x.append(x[keep])
        kept_y.append(labels[keep])
        if balanced and bool((counts >= quota).all()):  # Algorithm 1, line 13
            break
    return torch.cat(kept_x), torch.cat(kept_y), counts, made, raw_hist


def compose_transfer_set(model, args, device):
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
    for i, spec in enumerate(s.strip() for s in args.source.split(",") if s.strip()):
        if args.balanced and bool((counts >= quota).all()):  # Algorithm 1, line 13: later sources are not needed
            per_source.append({"source": spec, "examined": 0, "kept": 0})
            continue
        name, count = data.parse_source(spec)
        if name in NOISE_SOURCES:
            # DEVIATION: at most --max-draws draws per generated source, then we train on what was found — the
            # paper draws until balanced, which for uniform noise on FMNIST takes far beyond 20 M draws.
            draws = count or (args.max_draws if args.balanced else n_total)
            x, y, counts, examined, hist = compose_generated(model, NOISE_SOURCES[name], shape, counts, quota, draws,
                                                             args, meta["mean"], meta["std"], generator, args.balanced)
        else:
            x = data.load_source(spec, "train", args.data_root, shape[0], shape[1], args.seed + i)[0].to(device)
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed + i))
            x = x[order.to(device)]  # Algorithm 1, line 5: sample x_k from D_i at random
            y = teacher_labels(model, x, meta["mean"], meta["std"], args.draw_batch)
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


def print_composition(report, class_names):
    print(f"transfer set: {report['transfer_size']} images, quota N/C = {report['quota']}, "
          f"{report['draws']} noise draws; per source: {report['per_source']}", flush=True)
    for c, (h, raw) in enumerate(zip(report["histogram"], report["raw_histogram"])):
        name = class_names[c] if class_names else str(c)
        note = f"  SHORT by {report['short'][c]}" if c in report["short"] else ""
        print(f"  class {c:3d} {name:>12s}: kept {h:6d} (teacher labelled {raw:8d} of all examined){note}", flush=True)


def run(args):
    args = resolve_settings(teacher_lib.resume_config(args, build_parser(), "balanced_transfer.py"))
    device = teacher_lib.get_device(args.device)
    teacher_lib.seed_everything(args.seed)
    meta = data.DATASETS[args.dataset]
    if args.download and teacher_lib.is_main():
        data.download(args.dataset, args.data_root)
    teacher_lib.barrier()
    model_t, _ = teacher_lib.get_teacher(args.dataset, args.teacher_arch, args.seed, args.data_root, device,
                                         args.teacher, args.checkpoint_dir, args.download)
    test_x, test_y = data.load_dataset(args.dataset, "test", args.data_root)
    log = teacher_lib.RunLog(f"balanced_transfer-{args.dataset}", args, args.runs_dir)
    test_x, test_y = test_x.to(device), test_y.to(device)
    teacher_acc = teacher_lib.evaluate(model_t, test_x, test_y, meta["mean"], meta["std"])
    print(f"teacher {args.teacher_arch}: {teacher_acc:.2f}% test accuracy", flush=True)

    # The composed set is saved once in the run folder and read back by --resume: composing can take minutes
    # of teacher forwards, and on a GPU the teacher's argmax is not guaranteed to repeat bit for bit.
    if log.state:
        saved = torch.load(log.path("transfer_set.pt"), map_location="cpu", weights_only=True)
        images, report, compose_s = saved["images"].to(device), saved["report"], saved["compose_s"]
        print(f"transfer set read from {log.path('transfer_set.pt')}", flush=True)
    else:
        start = time.time()
        images, _, report = compose_transfer_set(model_t, args, device)
        compose_s = time.time() - start
        if teacher_lib.is_main():
            models.atomic_save({"images": images.cpu(), "report": report, "compose_s": compose_s},
                               log.path("transfer_set.pt"))
    print_composition(report, meta["classes"])
    print(f"composition took {teacher_lib.format_seconds(compose_s)}", flush=True)
    empty = [c for c, h in enumerate(report["histogram"]) if h == 0]
    if not len(images):
        raise ValueError(f"the sources {args.source!r} gave no transfer image at all")
    if empty and args.strict:
        raise ValueError(f"--strict: classes {empty} received no transfer sample from {args.source!r} "
                         f"(raise --max-draws or add a source)")

    mean = torch.tensor(meta["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], device=device).view(1, -1, 1, 1)
    # Without augmentation every image is seen unchanged, so the teacher's logits are computed once.
    cached = [] if args.augment else [teacher_lib.predict(model_t, images, meta["mean"], meta["std"], args.draw_batch)]
    loader = data.DeviceLoader(images, *cached, batch_size=args.batch_size, shuffle=True,  # x in [0, 1]
                               mean=(0.0,) * meta["channels"], std=(1.0,) * meta["channels"], device=device,
                               seed=args.seed, rank=teacher_lib.rank(), world_size=teacher_lib.world_size())
    aug_gen = torch.Generator(device=device).manual_seed(teacher_lib.rank_seed(args.seed + 2))  # per rank
    student = teacher_lib.prepare_model(models.build_model(args.student_arch, meta["num_classes"], meta["channels"]),
                                        device)
    opt = teacher_lib.make_optimizer(student.parameters(), args)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(args.milestones), gamma=0.1)
    first_epoch = 0
    if log.state:
        for name, module in (("student", student), ("opt", opt), ("sched", sched)):
            module.load_state_dict(log.state[name])
        teacher_lib.set_rng_state(log.state["rng"], device, aug=aug_gen, loader_order=loader.order_gen,
                                  loader_aug=loader.aug_gen)
        first_epoch, last = log.state["epoch"], log.state["last"]

    with log.stop_cleanly("balanced_transfer.py"):
        for epoch in range(first_epoch, args.epochs):
            student.train()
            epoch_start = time.time()
            loss_sum = torch.zeros((), device=device)
            seen_hist = torch.zeros(meta["num_classes"], dtype=torch.int64, device=device)
            seen = 0
            for x, *cached_logits in loader:
                if args.augment:
                    x = augment(x, aug_gen)  # a fresh augmentation each time; the teacher labels it afresh
                x = (x - mean) / std
                if cached_logits:
                    t_logits = cached_logits[0]
                else:
                    with torch.inference_mode(), teacher_lib.autocast(device):
                        t_logits = model_t(x).float()
                    t_logits = t_logits.clone()  # a normal tensor, usable by autograd
                with teacher_lib.autocast(device):
                    loss = kd_loss(student(x).float(), t_logits, args.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                teacher_lib.average_gradients(student.parameters())
                opt.step()
                loss_sum += loss.detach() * len(x)
                seen_hist += F.one_hot(t_logits.argmax(1), meta["num_classes"]).sum(0)  # no host sync, unlike bincount
                seen += len(x)
            sched.step()
            seconds = time.time() - epoch_start
            totals = teacher_lib.epoch_sums({"kd": loss_sum, "hist": seen_hist, "seen": seen})  # the one sync
            log.check_finite(f"epoch {epoch + 1}", {"kd_loss": totals["kd"] / totals["seen"]})
            teacher_lib.average_buffers(student)
            student_acc = teacher_lib.evaluate(student, test_x, test_y, meta["mean"], meta["std"])
            last = {"student_acc": student_acc, "augmented_histogram": [int(v) for v in totals["hist"]]}
            log.log_epoch(epoch, args.epochs, {"kd_loss": totals["kd"] / totals["seen"], "test_acc": student_acc,
                                               "teacher_histogram": last["augmented_histogram"]},
                          totals["seen"], seconds)
            log.save_state({"epoch": epoch + 1, "student": student.state_dict(), "opt": opt.state_dict(),
                            "sched": sched.state_dict(), "last": last,
                            "rng": teacher_lib.rng_state(device, aug=aug_gen, loader_order=loader.order_gen,
                                                         loader_aug=loader.aug_gen)},
                           f"epoch {epoch + 1}/{args.epochs}")
    path = log.path("student.pt")
    if teacher_lib.is_main():
        models.save_checkpoint(path, student, args.student_arch, meta["num_classes"], meta["channels"], args,
                               last["student_acc"], dataset=args.dataset, image_size=meta["size"])
    print(f"saved student to {path}", flush=True)
    return log.finish("balanced_transfer", args.dataset, {
        "teacher_acc": teacher_acc, "student_acc": last["student_acc"], "balanced": args.balanced,
        "augment": args.augment, "source": args.source, **report, "augmented_histogram": last["augmented_histogram"],
        "compose_s": round(compose_s, 1), "student_checkpoint": path})


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
