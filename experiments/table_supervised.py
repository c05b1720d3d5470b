"""The upper reference: LeNet-5-half (and the LeNet-5 teacher architecture) trained with labels on the real
Fashion-MNIST training set, with teacher.py's MNIST-family recipe.

    python experiments/table_supervised.py

Writes experiments/results/supervised.md.
"""

import runner

TABLE = "supervised"


def main():
    p = runner.base_parser(__doc__, epochs=40)
    p.add_argument("--archs", nargs="+", default=["lenet5_half", "lenet5"])
    args = p.parse_args()
    jobs = [(f"{arch}-e{args.epochs}", s, ["teacher.py", "--dataset", "fashionmnist", "--arch", arch, "--epochs",
                                           str(args.epochs), "--data-root", args.data_root, "--device", args.device,
                                           "--checkpoint-dir", "checkpoints/supervised"])
            for arch in args.archs for s in args.seeds]
    runner.run_jobs(TABLE, jobs, args.dry_run)
    rows = [[arch, runner.mean_std(runner.field(TABLE, f"{arch}-e{args.epochs}", args.seeds, "teacher_acc")),
             runner.wall_minutes(TABLE, f"{arch}-e{args.epochs}", args.seeds)] for arch in args.archs]
    runner.write_table(TABLE, ["network", "test acc (supervised)", "wall (min)"], rows,
                       f"{args.epochs} epochs, Adam 1e-3, batch 256, seeds {args.seeds}.", dry_run=args.dry_run)


if __name__ == "__main__":
    main()
