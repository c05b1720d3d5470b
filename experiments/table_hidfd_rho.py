"""HiDFD (AAAI 2025) at rho = 0.1 and rho = 1.0 of a shifted Fashion-MNIST collection, vs distillation on the
(inflated) collection alone (--no-synthetic). LeNet-5 teacher -> LeNet-5-half student. The claim: the
synthetic data helps most when the collection is small.

The collection has the same make-up as `fashionmnist-web` (60% style-shifted Fashion-MNIST, 20% procedural
shapes, 20% noise) but 60,000 images, so that rho = 1.0 (|D_c| = |D_o| = 60,000) exists; rho = 0.1 takes a
seeded random 6,000 of it.

    python experiments/table_hidfd_rho.py                             # 3 seeds x 4 rows
    python experiments/table_hidfd_rho.py --epochs 20 --gan-epochs 25 --gan-width 16 --seeds 0   # short

Writes experiments/results/hidfd_rho.md.
"""

import math

import runner

TABLE = "hidfd_rho"
TRAIN_SIZE = 60_000  # |D_o| of Fashion-MNIST (data.DATASETS["fashionmnist"]["train_size"])
GAN_BATCH = 100  # hidfd.py's --gan-batch-size default for the MNIST family
COLLECTION = "shifted:fashionmnist:36000,synthetic:12000,noise-uniform:12000"


def main():
    p = runner.base_parser(__doc__, epochs=40)
    p.add_argument("--rhos", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--gan-epochs", type=int, default=100, help="GAN epochs (hidfd.py's MNIST-family default)")
    p.add_argument("--gan-iterations", type=int, default=None, help="instead of --gan-epochs: the same number of GAN "
                   "iterations at every rho (epochs = ceil(iterations / (rho * 60,000 / 100))), so rho = 1.0 gets no "
                   "more generator training than rho = 0.1")
    p.add_argument("--gan-width", type=int, default=64)
    p.add_argument("--collected", default=COLLECTION)
    args = p.parse_args()
    runner.ensure_teacher(args)
    common = ["hidfd.py", "--dataset", "fashionmnist", "--teacher", args.teacher, "--collected", args.collected,
              "--data-root", args.data_root, "--device", args.device, "--epochs", str(args.epochs)]
    jobs, rows = [], []
    for rho in args.rhos:
        iterations_per_epoch = math.ceil(rho * TRAIN_SIZE / GAN_BATCH)  # |D_c| / batch 100 (hidfd.py's default)
        gan_epochs = args.gan_epochs
        if args.gan_iterations is not None:
            gan_epochs = math.ceil(args.gan_iterations / iterations_per_epoch)
        only = f"rho{rho}-collected-only-e{args.epochs}"
        gan = f"rho{rho}-hidfd-gan{gan_epochs}w{args.gan_width}-e{args.epochs}"
        for s in args.seeds:
            generator = f"checkpoints/hidfd-generator-fashionmnist-rho{rho}-gan{gan_epochs}w{args.gan_width}-seed{s}.pt"
            jobs.append((only, s, common + ["--rho", str(rho), "--no-synthetic"]))
            jobs.append((gan, s, common + ["--rho", str(rho), "--gan-epochs", str(gan_epochs),
                                           "--gan-width", str(args.gan_width), "--generator", generator]))
        rows.append((rho, only, gan, gan_epochs, gan_epochs * iterations_per_epoch))
    runner.run_jobs(TABLE, jobs, args.dry_run)
    table = []
    for rho, only, gan, gan_epochs, iterations in rows:
        a = runner.field(TABLE, only, args.seeds, "student_acc")
        b = runner.field(TABLE, gan, args.seeds, "student_acc")
        agree = runner.field(TABLE, gan, args.seeds, "synthetic_teacher_agree")
        gains = [y - x for x, y in zip(a, b) if x is not None and y is not None]
        table.append([rho, f"{gan_epochs} ({iterations:,})", runner.mean_std(a), runner.mean_std(b),
                      runner.mean_std(gains, signed=True),
                      runner.mean_std(agree), runner.wall_minutes(TABLE, only, args.seeds),
                      runner.wall_minutes(TABLE, gan, args.seeds)])
    runner.write_table(TABLE, ["rho", "GAN epochs (iterations)", "collection only", "HiDFD", "gain (points)",
                               "teacher agrees with G's label (%)",
                               "wall, collection only (min)", "wall, HiDFD (min)"], table,
                       f"Collection `{args.collected}`; GAN width {args.gan_width}, batch {GAN_BATCH}; "
                       f"student {args.epochs} epochs; seeds {args.seeds}.", dry_run=args.dry_run)


if __name__ == "__main__":
    main()
