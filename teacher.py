"""The teacher: the papers' training recipes, supervised training on the teacher's own data, and the cache of
trained teachers that every method file loads.

    python teacher.py --dataset fashionmnist --arch lenet5     # Adam 1e-3, 40 epochs -> ~90% test accuracy
    python teacher.py --dataset cifar10 --arch resnet34        # SGD 0.05, 240 epochs, /10 at 150/180/210

A teacher trained with its recipe is cached at checkpoints/<dataset>-<arch>-seed<seed>.pt; `get_teacher(...)`
(used by kd3.py, hidfd.py and balanced_transfer.py) loads it, or trains it with the recipe when it is missing.
"""

import argparse
import os

import torch.nn.functional as F

import data
import models
import runtime

#### Recipes (the papers' teacher settings; every value is also a CLI flag) ####
# cifar (KD3 Sec. 4.1, HiDFD, balanced transfer ResNet34): SGD lr 0.05, momentum 0.9, wd 5e-4, 240 epochs,
#        lr / 10 at epochs 150, 180, 210.
# mnist (DAFL / KD3 MNIST setting; MNIST, Fashion-MNIST, KMNIST): Adam 1e-3, 40 epochs, batch 256.
# synthetic: tiny settings so that the end-to-end tests take seconds.
RECIPES = {
    "cifar": dict(arch="resnet34", optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, epochs=240,
                  milestones=(150, 180, 210), batch_size=128),
    "mnist": dict(arch="lenet5", optimizer="adam", lr=1e-3, momentum=0.0, weight_decay=0.0, epochs=40,
                  milestones=(), batch_size=256),
    "synthetic": dict(arch="lenet5", optimizer="adam", lr=2e-3, momentum=0.0, weight_decay=0.0, epochs=8,
                      milestones=(), batch_size=128),
}


def recipe_for(dataset):
    return RECIPES[data.DATASETS[dataset]["family"]]


def build_parser():
    p = argparse.ArgumentParser(description="Train (and cache) a teacher with the papers' recipe.",
                                formatter_class=runtime.HelpFormatter)
    p.add_argument("--dataset", default="fashionmnist", choices=sorted(data.DATASETS), help="the teacher's task")
    p.add_argument("--arch", default=None, help="network; " + runtime.family_default(RECIPES, "arch"))
    p.add_argument("--epochs", type=int, default=None, help=runtime.family_default(RECIPES, "epochs"))
    p.add_argument("--optimizer", default=None, choices=["sgd", "adam"],
                   help=runtime.family_default(RECIPES, "optimizer"))
    p.add_argument("--lr", type=float, default=None, help=runtime.family_default(RECIPES, "lr"))
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum; "
                   + runtime.family_default(RECIPES, "momentum"))
    p.add_argument("--weight-decay", type=float, default=None, help=runtime.family_default(RECIPES, "weight_decay"))
    p.add_argument("--milestones", type=int, nargs="*", default=None, help="lr / 10 at these epochs; "
                   + runtime.family_default(RECIPES, "milestones"))
    p.add_argument("--batch-size", type=int, default=None, help=runtime.family_default(RECIPES, "batch_size"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default="data", help="where the dataset's files are (docs/data.md)")
    p.add_argument("--download", action="store_true", help="fetch the dataset with torchvision first")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--checkpoint-dir", default="checkpoints", help="the teacher cache")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run from "
                   "RUN_DIR/state.pt with its saved config.json (flags given now must match it)")
    return p


def resolve_recipe(args):
    """Fill every None flag from RECIPES[family] (visible above) and validate."""
    for key, value in recipe_for(args.dataset).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.epochs < 1:
        raise ValueError("--epochs must be >= 1")
    return args


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
    args = resolve_recipe(runtime.resume_config(args, build_parser(), "teacher.py"))
    device = runtime.get_device(args.device)
    runtime.seed_everything(args.seed)
    meta = data.DATASETS[args.dataset]
    runtime.download_if_asked(args)
    train_x, train_y = data.load_dataset(args.dataset, "train", args.data_root)
    test_x, test_y = data.load_dataset(args.dataset, "test", args.data_root)
    log = runtime.RunLog(f"teacher-{args.dataset}-{args.arch}", args, args.runs_dir)
    print(f"train {tuple(train_x.shape)}, test {tuple(test_x.shape)}, device {device}"
          + (f", {runtime.world_size()} processes" if runtime.world_size() > 1 else ""), flush=True)

    net = runtime.prepare_model(models.build_model(args.arch, meta["num_classes"], meta["channels"]), device)
    trained = runtime.distribute(net)
    opt = runtime.make_optimizer(net.parameters(), args)
    loader = data.DeviceLoader(train_x, train_y, batch_size=args.batch_size, shuffle=True, crop_pad=meta["crop_pad"],
                               flip=meta["flip"], mean=meta["mean"], std=meta["std"], device=device, seed=args.seed,
                               rank=runtime.rank(), world_size=runtime.world_size())
    test_x, test_y = test_x.to(device), test_y.to(device)
    training = runtime.Training(log, args.epochs, save={"model": net, "opt": opt}, rngs={"loader": loader},
                                optimizer=opt, lr=args.lr, milestones=args.milestones)
    for epoch in training.epochs():
        for x, y in loader:
            training.record(len(y), **train_step(trained, x, y, opt))
        training.end_epoch(test_acc=runtime.evaluate(net, test_x, test_y, meta["mean"], meta["std"]))

    test_acc = log.last_record["test_acc"]
    path = teacher_path(args.dataset, args.arch, args.seed, args.checkpoint_dir)
    if runtime.is_main():
        models.save_checkpoint(path, net, args.arch, meta["num_classes"], meta["channels"], args, test_acc,
                               dataset=args.dataset, image_size=meta["size"])
    print(f"saved teacher to {path}", flush=True)
    return log.finish("teacher", args.dataset, {"arch": args.arch, "teacher_acc": test_acc, "checkpoint": path})


#### The cache ####

def teacher_path(dataset, arch, seed, checkpoint_dir="checkpoints"):
    return os.path.join(checkpoint_dir, f"{dataset}-{arch}-seed{seed}.pt")


def check_teacher(ckpt, dataset, source="teacher"):
    """Clear error before any training when a checkpoint does not fit the dataset."""
    meta = data.DATASETS[dataset]
    if ckpt["num_classes"] != meta["num_classes"] or ckpt["in_channels"] != meta["channels"]:
        raise ValueError(f"{source} has {ckpt['num_classes']} classes and {ckpt['in_channels']} input channels, but "
                         f"{dataset} has {meta['num_classes']} classes and {meta['channels']} channels")
    if ckpt.get("image_size") not in (None, meta["size"]):
        raise ValueError(f"{source} was trained on {ckpt['image_size']}x{ckpt['image_size']} images, {dataset} "
                         f"uses {meta['size']}x{meta['size']}")


def get_teacher(dataset, arch=None, seed=0, data_root="data", device="cpu", path=None, checkpoint_dir="checkpoints",
                download=False):
    """The frozen teacher for `dataset`: from `path` if given, else the cached checkpoint, else trained now
    with the recipe defaults (and cached). Returns (model in eval mode on device, checkpoint dict)."""
    arch = arch or recipe_for(dataset)["arch"]
    if path is None:
        path = teacher_path(dataset, arch, seed, checkpoint_dir)
        if not os.path.isfile(path):
            print(f"no cached teacher at {path}: training one with the {data.DATASETS[dataset]['family']} recipe "
                  f"(python teacher.py --dataset {dataset} --arch {arch} --seed {seed})", flush=True)
            args = build_parser().parse_args(["--dataset", dataset, "--arch", arch, "--seed", str(seed),
                                              "--data-root", data_root, "--device", device.type,
                                              "--checkpoint-dir", checkpoint_dir] + (["--download"] if download else []))
            train_teacher(args)
            runtime.barrier()  # under torchrun rank 0 wrote the checkpoint that every rank loads next
        else:
            print(f"loading cached teacher {path}", flush=True)
    else:
        print(f"loading teacher {path}", flush=True)
    model, ckpt = models.load_checkpoint(path)
    check_teacher(ckpt, dataset, source=f"teacher {path}")
    model = runtime.prepare_model(model, device).eval()
    model.requires_grad_(False)
    return model, ckpt


def main(argv=None):
    runtime.cli(train_teacher, build_parser(), "teacher.py", argv)


if __name__ == "__main__":
    main()
