"""Why noise-trained balanced-transfer students sit at exactly 10% for their first epochs, and what
removes it.

A balanced uniform-noise transfer set is composed once (Algorithm 1, 300,000 draws, the LeNet-5
Fashion-MNIST teacher), then a LeNet-5-half student is distilled on it (Eq. 2, no augmentation,
Adam, batch 256) for 6 epochs under one change at a time: the temperature, the learning rate, He
initialisation. Each cell is the test accuracy after that epoch and, in brackets, the share of test
images the student gives its most common class (100% = one class for everything: the plateau). One
seed; about 5 minutes on one CPU core.

    python experiments/table_bt_plateau.py [--data-root /usr/share/datasets] \\
        [--teacher checkpoints/...pt]

Writes experiments/results/bt_plateau.md.
"""

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import runner  # noqa: E402

import balanced_transfer as bt  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402
import runtime  # noqa: E402

VARIANTS = [
    ("the defaults: T 20, lr 1e-3, PyTorch init", {}),
    ("T 4", {"T": 4.0}),
    ("T 1", {"T": 1.0}),
    ("lr 3e-3", {"lr": 3e-3}),
    ("lr 3e-4", {"lr": 3e-4}),
    ("He initialisation", {"init": "he"}),
]


def distil(x, logits, test, meta, T=20.0, lr=1e-3, init="default", epochs=6):
    torch.manual_seed(0)
    student = models.build_model("lenet5_half", 10, 1)
    if init == "he":
        models.he_init(student)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (meta["mean"], meta["std"]))
    loader = data.DeviceLoader(x, logits, batch_size=256, mean=(0.0,), std=(1.0,), seed=0)
    cells = []
    for _ in range(epochs):
        for xb, target in loader:
            loss = bt.kd_loss(student((xb - mean) / std), target, T)
            opt.zero_grad()
            loss.backward()
            opt.step()
        pred = runtime.predict(student, test[0], meta["mean"], meta["std"]).argmax(1)
        acc = (pred == test[1]).float().mean().item() * 100
        top = torch.bincount(pred, minlength=10).max().item() / len(pred) * 100
        cells.append(f"{acc:.1f} ({top:.0f}%)")
    return cells


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=runner.HelpFormatter)
    p.add_argument("--data-root", default=runner.DATA_ROOT, help="where Fashion-MNIST is")
    p.add_argument("--teacher", default=runner.TEACHER, help="the LeNet-5 Fashion-MNIST teacher")
    args = p.parse_args()
    teacher_path = os.path.join(runner.REPO, args.teacher)
    if not os.path.isfile(teacher_path):
        sys.exit(
            f"error: no teacher at {args.teacher} — give a teacher checkpoint, or leave "
            f"--teacher out for the committed {runner.TEACHER}"
        )
    torch.set_num_threads(1)
    teacher, _ = models.load_checkpoint(teacher_path)
    teacher.eval().requires_grad_(False)
    meta = data.DATASETS["fashionmnist"]
    test = data.load_dataset("fashionmnist", "test", args.data_root)
    settings = bt.resolve_settings(
        bt.build_parser().parse_args(["--max-draws", "300000", "--no-augment"])
    )
    x, _, report = bt.compose_transfer_set(teacher, settings, torch.device("cpu"))
    logits = runtime.predict(teacher, x, meta["mean"], meta["std"])
    lines = [
        "| student | " + " | ".join(f"epoch {e}" for e in range(1, 7)) + " |",
        "|---|" + "---|" * 6,
    ]
    for name, kw in VARIANTS:
        lines.append(f"| {name} | " + " | ".join(distil(x, logits, test, meta, **kw)) + " |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + (
        f"\n\nTransfer set: {len(x):,} images of uniform noise, teacher histogram "
        f"{report['histogram']}; seed 0.\n"
    )
    with open(os.path.join(HERE, "results", "bt_plateau.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
