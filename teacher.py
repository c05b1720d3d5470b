"""The teacher: the papers' training recipes, supervised training on the teacher's own data, and the
cache of trained teachers that every method file loads.

    # Adam 1e-3, 40 epochs -> ~90% test accuracy
    python teacher.py --dataset fashionmnist --arch lenet5
    # SGD 0.05, 240 epochs, /10 at 150/180/210
    python teacher.py --dataset cifar10 --arch resnet34

A teacher trained with its recipe is cached at checkpoints/<dataset>-<arch>-seed<seed>.pt;
`get_teacher(...)` (used by kd3.py, hidfd.py and balanced_transfer.py) loads it; when it is missing,
the committed teacher of teachers/ (COMMITTED), else it trains it with the recipe first.
The cache holds only recipe teachers and is never replaced silently: a run with other settings keeps
its checkpoint in its run folder, and a cached teacher is retrained only with --overwrite. Nothing
here writes into teachers/. A lock file next to the checkpoint keeps two processes from training the
same teacher at once.
"""

import argparse
import contextlib
import hashlib
import os
import time
import zipfile

import torch
import torch.nn.functional as F

import data
import models
import runtime

#### Recipes (the papers' teacher settings; every value is also a CLI flag) ####
# cifar (KD3 Sec. 4.1, HiDFD, balanced transfer ResNet34): SGD lr 0.05, momentum 0.9, wd 5e-4,
#        240 epochs, lr / 10 at epochs 150, 180, 210.
# mnist (DAFL / KD3 MNIST setting; MNIST, Fashion-MNIST, KMNIST): Adam 1e-3, 40 epochs, batch 256.
# synthetic: tiny settings so that the end-to-end tests take seconds.
RECIPES = {
    "cifar": dict(
        arch="resnet34",
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        epochs=240,
        milestones=(150, 180, 210),
        batch_size=128,
    ),
    "mnist": dict(
        arch="lenet5",
        optimizer="adam",
        lr=1e-3,
        momentum=0.0,
        weight_decay=0.0,
        epochs=40,
        milestones=(),
        batch_size=256,
    ),
    "synthetic": dict(
        arch="lenet5",
        optimizer="adam",
        lr=2e-3,
        momentum=0.0,
        weight_decay=0.0,
        epochs=8,
        milestones=(),
        batch_size=128,
    ),
}


# The committed teachers, by (dataset, arch, seed): recipe teachers kept in the repository, so
# that a fresh clone distils from the very network the results name by its sha256 (each run's
# config.json and results.json). get_teacher loads one when the cache has none.
TEACHERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "teachers")
COMMITTED = {("fashionmnist", "lenet5", 0): os.path.join(TEACHERS, "fashionmnist-lenet5.pt")}


def recipe_for(dataset):
    return RECIPES[data.DATASETS[dataset]["family"]]


def build_parser():
    p = argparse.ArgumentParser(
        description="Train (and cache) a teacher with the papers' recipe.",
        formatter_class=runtime.HelpFormatter,
    )
    runtime.add_dataset_flag(p)
    runtime.family_flag(p, "--arch", RECIPES, {}, "network")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch order")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a teacher already in the cache (default: "
        "refuse, the cached teacher is what every method loads)",
    )
    runtime.add_run_flags(p, {})
    runtime.add_optimisation_flags(p.add_argument_group("optimisation"), RECIPES, {})
    return p


def resolve_recipe(args):
    """The run's settings: every flag left out takes its value from RECIPES (above), or from the
    saved config.json under --resume; then checked."""
    args = runtime.complete_args(args, build_parser(), "teacher.py", RECIPES)
    runtime.check_training_flags(
        args, RECIPES, source="the recipes use", checkpoints=uses_recipe(args)
    )
    return args


def uses_recipe(args):
    """Whether the run's settings are its recipe's (only such a teacher goes into the cache)."""
    recipe = recipe_for(args.dataset)
    return all(
        tuple(v) == tuple(recipe[k]) if isinstance(v, (list, tuple)) else v == recipe[k]
        for k, v in vars(args).items()
        if k in recipe
    )


#### One step ####


def train_step(trained, x, y, opt):
    """Supervised training of the teacher: cross-entropy on the true labels of its own data."""
    with runtime.autocast(x.device):
        logits = trained(x)
        loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"cross_entropy": loss, "train_acc": (logits.argmax(1) == y).float().mean() * 100}


#### Training ####


def train_teacher(args):
    args = resolve_recipe(args)
    cache = teacher_path(args.dataset, args.arch, args.seed, args.checkpoint_dir)
    to_cache = uses_recipe(args)
    if to_cache and os.path.isfile(cache) and not args.overwrite:
        raise ValueError(
            f"a teacher is already cached at {cache} (every method loads it) — use it as it is, or "
            f"pass --overwrite to train it again"
        )
    with (
        CacheLock(cache, wait=False) if to_cache and runtime.is_main() else contextlib.nullcontext()
    ):
        return _train_teacher(args, cache if to_cache else None)


def _train_teacher(args, cache):
    device = runtime.get_device(args.device)
    runtime.seed_everything(args.seed)
    meta = data.DATASETS[args.dataset]
    runtime.download_if_asked(args)
    train_x, train_y = data.load_dataset(args.dataset, "train", args.data_root)
    test_x, test_y = data.load_dataset(args.dataset, "test", args.data_root)
    log = runtime.RunLog(f"teacher-{args.dataset}-{args.arch}", args, args.runs_dir)
    print(
        f"train {tuple(train_x.shape)}, test {tuple(test_x.shape)}, device {device}"
        + (f", {runtime.world_size()} processes" if runtime.world_size() > 1 else ""),
        flush=True,
    )

    net = runtime.prepare_model(
        models.build_model(args.arch, meta["num_classes"], meta["channels"]), device
    )
    trained = runtime.distribute(net)
    opt = runtime.make_optimizer(net.parameters(), args)
    loader = data.DeviceLoader(
        train_x,
        train_y,
        batch_size=args.batch_size,
        shuffle=True,
        crop_pad=meta["crop_pad"],
        flip=meta["flip"],
        mean=meta["mean"],
        std=meta["std"],
        device=device,
        seed=args.seed,
        rank=runtime.rank(),
        world_size=runtime.world_size(),
    )
    test_x, test_y = test_x.to(device), test_y.to(device)
    lr_schedule = torch.optim.lr_scheduler.MultiStepLR(opt, args.milestones, gamma=0.1)  # lr / 10
    training = runtime.Training(
        log,
        args.epochs,
        save={"model": net, "opt": opt},
        rngs={"loader": loader},
        lr_schedule=lr_schedule,
    )
    for epoch in training.epochs():
        for x, y in loader:
            training.record(len(y), **train_step(trained, x, y, opt))
        training.end_epoch(
            test_acc=runtime.evaluate(net, test_x, test_y, meta["mean"], meta["std"])
        )

    test_acc = log.last_record["test_acc"]
    path = cache or log.path("teacher.pt")
    if runtime.is_main():
        with runtime.reporting_write(path, log):
            models.save_checkpoint(
                path,
                net,
                args.arch,
                meta["num_classes"],
                meta["channels"],
                args,
                test_acc,
                dataset=args.dataset,
                image_size=meta["size"],
            )
    print(
        f"saved teacher to {path}"
        + (
            ""
            if cache
            else " (not its recipe's settings, so not into the cache; "
            "pass it to a method with --teacher)"
        ),
        flush=True,
    )
    sha = file_sha256(path) if runtime.is_main() else None
    committed = COMMITTED.get((args.dataset, args.arch, args.seed)) if cache else None
    if sha and committed and os.path.isfile(committed):
        print(compare_with_committed(test_acc, sha, committed), flush=True)
    return log.finish(
        "teacher",
        args.dataset,
        {"arch": args.arch, "teacher_acc": test_acc, "checkpoint": path, "teacher_sha256": sha},
    )


def compare_with_committed(test_acc, sha, committed):
    """One line: how a teacher just trained with the recipe compares with the committed one."""
    ckpt = torch.load(committed, map_location="cpu", weights_only=True)
    same = sha == file_sha256(committed)
    where = os.path.relpath(committed)
    return (
        f"the committed teacher {where}: {ckpt['acc']:.2f}% test accuracy; this one: "
        f"{test_acc:.2f}% ({test_acc - ckpt['acc']:+.2f} points), "
        + (
            "the same file (sha256 equal)"
            if same
            else "another network (sha256 differs: another processor, thread count or torch "
            "version sums in another order)"
        )
        + f". The methods load this cached one from now on; --teacher {where} gives them the "
        "committed one"
    )


#### The cache ####


def teacher_path(dataset, arch, seed, checkpoint_dir="checkpoints"):
    return os.path.join(checkpoint_dir, f"{dataset}-{arch}-seed{seed}.pt")


class CacheLock:
    """<checkpoint>.lock while a process trains a teacher into the cache. wait=True: wait for
    another process's lock to go (then the caller loads what it wrote); wait=False: refuse. A lock
    whose process is gone is removed."""

    def __init__(self, path, wait):
        self.path, self.lock, self.wait = path, path + ".lock", wait

    def __enter__(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.lock)), exist_ok=True)
        said = False
        while True:
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = _lock_owner(self.lock)
                if owner is None:  # its process is gone: a stale lock
                    os.remove(self.lock)
                    continue
                if not self.wait:
                    raise ValueError(
                        f"process {owner} is training this teacher into {self.path} right now — "
                        f"wait for it to finish (or remove {self.lock} if that process is gone)"
                    ) from None
                if not said:
                    print(
                        f"waiting for process {owner}, which is training the teacher {self.path}",
                        flush=True,
                    )
                    said = True
                time.sleep(2)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self

    def __exit__(self, *exc):
        if os.path.isfile(self.lock) and _lock_owner(self.lock) == os.getpid():
            os.remove(self.lock)


def _lock_owner(lock):
    """The pid written in a lock file if that process is alive, else None."""
    try:
        with open(lock) as f:
            pid = int(f.read().strip() or 0)
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def check_teacher(ckpt, dataset, arch=None, source="teacher"):
    """Clear error before any training when a checkpoint does not fit the dataset (or the asked
    architecture)."""
    meta = data.DATASETS[dataset]
    if ckpt["num_classes"] != meta["num_classes"] or ckpt["in_channels"] != meta["channels"]:
        raise ValueError(
            f"{source} has {ckpt['num_classes']} classes and {ckpt['in_channels']} input channels, "
            f"but {dataset} has {meta['num_classes']} classes and {meta['channels']} channels — "
            f"pass a {dataset} teacher"
        )
    if ckpt.get("image_size") not in (None, meta["size"]):
        raise ValueError(
            f"{source} was trained on {ckpt['image_size']}x{ckpt['image_size']} images, {dataset} "
            f"uses {meta['size']}x{meta['size']} — pass a {dataset} teacher"
        )
    if ckpt.get("dataset") not in (None, dataset):
        raise ValueError(
            f"{source} was trained on {ckpt['dataset']}, not {dataset} — pass a {dataset} teacher, "
            f"or --dataset {ckpt['dataset']}"
        )
    if arch is not None and ckpt["arch"] != arch:
        raise ValueError(
            f"{source} is a {ckpt['arch']}, but --teacher-arch says {arch} — leave --teacher-arch "
            f"out (the checkpoint's architecture is used) or pass a {arch} checkpoint"
        )


def get_teacher(args, device):
    """The frozen teacher of a method run: --teacher PATH if given, else the cached recipe teacher
    for (--dataset, --teacher-arch, --teacher-seed), else the committed one (COMMITTED), else the
    recipe teacher trained now (saying so, with an estimate of its time). --seed never picks the
    teacher: every student seed distils the same one. Sets args.teacher_arch to the checkpoint's
    architecture and args.teacher_sha256 to its file's sha256 (the run's config.json names it; a
    --resume run must find the teacher it started with). Returns (model in eval mode, ckpt)."""
    path = args.teacher
    if path is None:
        arch = args.teacher_arch or recipe_for(args.dataset)["arch"]
        path = teacher_path(args.dataset, arch, args.teacher_seed, args.checkpoint_dir)
        if runtime.is_main():
            with CacheLock(path, wait=True):  # another process training it: wait for its checkpoint
                pass
        committed = COMMITTED.get((args.dataset, arch, args.teacher_seed))
        if not os.path.isfile(path) and committed and os.path.isfile(committed):
            print(
                f"no cached teacher at {path}: loading the committed teacher "
                f"{os.path.relpath(committed)}",
                flush=True,
            )
            path = committed
        else:
            if not os.path.isfile(path):
                train_missing_teacher(args, arch, path, device)
            print(f"loading cached teacher {path}", flush=True)
    elif not os.path.exists(path):
        raise ValueError(
            f"--teacher {path} does not exist — give a checkpoint written by teacher.py, or leave "
            f"--teacher out to use (or train) the cached teacher"
        )
    else:
        print(f"loading teacher {path}", flush=True)
    model, ckpt = read_teacher_file(path, "--teacher" if args.teacher else "the cached teacher")
    check_teacher(ckpt, args.dataset, args.teacher_arch, source=f"teacher {path}")
    args.teacher_arch = ckpt["arch"]
    ckpt["path"], ckpt["sha256"] = path, file_sha256(path)  # a result names the teacher it ran with
    if getattr(args, "teacher_sha256", None) not in (None, ckpt["sha256"]):  # from --resume
        raise ValueError(
            f"--resume {args.resume}: the run started with the teacher of sha256 "
            f"{args.teacher_sha256[:12]}..., but {path} is {ckpt['sha256'][:12]}..."
            " — "
            f"put that teacher back at {path}, or start a new run"
        )
    args.teacher_sha256 = ckpt["sha256"]
    model = runtime.prepare_model(model, device).eval()
    model.requires_grad_(False)
    return model, ckpt


def file_sha256(path):
    """The sha256 of a file's bytes, as `sha256sum` prints it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_teacher_file(path, what="--teacher"):
    """(model, checkpoint) of a teacher checkpoint. A file of another kind is named in one line
    with what is expected: a folder, an empty file, TorchScript, a pickled model
    (torch.save(model)), not a torch file, or another file of this project (a HiDFD generator,
    a run's state.pt, a transfer set)."""
    expected = "a checkpoint written by teacher.py (or models.save_checkpoint)"
    if os.path.isdir(path):
        inside = [f for f in ("teacher.pt", "student.pt") if os.path.isfile(os.path.join(path, f))]
        hint = f", e.g. {os.path.join(path, inside[0])}" if inside else ""
        raise ValueError(f"{what} {path} is a folder — give {expected}{hint}")
    if os.path.getsize(path) == 0:
        again = "; delete it and it is trained again" if what != "--teacher" else ""
        raise ValueError(
            f"{what} {path} is an empty file (a save that never finished?) — give {expected}{again}"
        )
    names = zipfile.ZipFile(path).namelist() if zipfile.is_zipfile(path) else []
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise ValueError(
            f"{what} {path} is a TorchScript module (torch.jit.save), not a "
            f"checkpoint — give {expected}; for a network of models.py, save its "
            f"state_dict with models.save_checkpoint"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        if any(n.endswith("/data.pkl") for n in names):
            raise ValueError(
                f"{what} {path} holds a pickled Python object (torch.save(model)), "
                f"which is not loaded (it would run code from the file) — give "
                f"{expected}; models.save_checkpoint(path, model, arch, ...) writes "
                f"one"
            ) from None
        raise ValueError(
            f"{what} {path} is not a torch file (or is damaged) — give {expected}"
        ) from None
    kinds = (
        ("images", "a transfer set (balanced_transfer.py's transfer_set.pt)"),
        ("rng", "a run's state.pt (resume it with --resume <run folder>)"),
    )
    for key, kind in kinds:
        if isinstance(ckpt, dict) and key in ckpt:
            raise ValueError(f"{what} {path} is {kind}, not a teacher — give {expected}")
    arch = ckpt.get("arch") if isinstance(ckpt, dict) else None
    if arch == "hidfd-generator":
        raise ValueError(
            f"{what} {path} is a HiDFD generator (hidfd.py --stage gan), not a "
            f"teacher — give {expected}; the generator goes to hidfd.py --generator"
        )
    if arch is not None and arch not in models.MODELS:
        raise ValueError(
            f"{what} {path} holds a {arch!r}, not a network of models.py — give {expected}"
        )
    return models.load_checkpoint(path)


def train_missing_teacher(args, arch, path, device):
    """Train the recipe teacher a method needs into the cache, after saying what runs and for about
    how long."""
    argv = [
        "--dataset",
        args.dataset,
        "--arch",
        arch,
        "--seed",
        str(args.teacher_seed),
        "--data-root",
        args.data_root,
        "--device",
        device.type,
        "--checkpoint-dir",
        args.checkpoint_dir,
    ]
    teacher_args = resolve_recipe(
        build_parser().parse_args(argv + (["--download"] if args.download else []))
    )
    if not args.download:
        data.load_dataset(
            args.dataset, "train", args.data_root
        )  # its data missing: the error comes now
    with torch.random.fork_rng(
        devices=[device] if device.type == "cuda" else []
    ):  # the method's draws unchanged
        seconds = estimate_seconds(teacher_args, device)
        print(
            f"no cached teacher at {path} (and none committed): training it first with the "
            f"{data.DATASETS[args.dataset]['family']} recipe, "
            f"about {runtime.format_seconds(seconds)} "
            f"on {device.type} (estimated from 3 timed steps):"
            f"\n    python teacher.py {' '.join(argv)}",
            flush=True,
        )
        train_teacher(teacher_args)
    runtime.barrier()  # under torchrun rank 0 wrote the checkpoint that every rank loads next


def estimate_seconds(args, device, steps=3):
    """Wall time of the recipe's training on `device`, from a few timed steps on random images of
    the real shape."""
    meta = data.DATASETS[args.dataset]
    net = runtime.prepare_model(
        models.build_model(args.arch, meta["num_classes"], meta["channels"]), device
    )
    opt = runtime.make_optimizer(net.parameters(), args)
    x = torch.randn(args.batch_size, meta["channels"], meta["size"], meta["size"], device=device)
    y = torch.randint(0, meta["num_classes"], (args.batch_size,), device=device)
    train_step(net, x, y, opt)  # warm-up
    start = time.time()
    for _ in range(steps):
        train_step(net, x, y, opt)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    per_step = (time.time() - start) / steps
    return per_step * -(-meta["train_size"] // args.batch_size) * args.epochs


def main(argv=None):
    runtime.cli(train_teacher, build_parser(), "teacher.py", argv)


if __name__ == "__main__":
    main()
