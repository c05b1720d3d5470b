"""The upper reference: LeNet-5-half trained with labels on the real Fashion-MNIST training set,
with teacher.py's MNIST-family recipe (Adam 1e-3, 40 epochs, batch 256) — what a student could reach
if the teacher's data were available.

    python experiments/table_supervised.py                  # 3 seeds
    python experiments/table_supervised.py --archs lenet5   # the teacher's architecture,
                                                            # for comparison

Writes experiments/results/supervised.md.
"""

import runner

TABLE = "supervised"


def main():
    p = runner.base_parser(__doc__, epochs=40)
    p.add_argument(
        "--archs",
        nargs="+",
        default=["lenet5_half"],
        help="networks to train with labels (the teacher, "
        "lenet5, is trained by teacher.py and reported with every table)",
    )
    args = p.parse_args()
    jobs = [
        (
            f"{arch}-e{args.epochs}",
            s,
            [
                "teacher.py",
                "--dataset",
                "fashionmnist",
                "--arch",
                arch,
                "--epochs",
                str(args.epochs),
                "--data-root",
                args.data_root,
                "--device",
                args.device,
                "--checkpoint-dir",
                "checkpoints/supervised",
            ],
        )
        for arch in args.archs
        for s in args.seeds
    ]
    runner.run_jobs(TABLE, jobs, args.dry_run, args.report_only)
    rows = [
        [
            arch,
            runner.mean_std(
                runner.field(TABLE, f"{arch}-e{args.epochs}", args.seeds, "teacher_acc")
            ),
            runner.wall_minutes(TABLE, f"{arch}-e{args.epochs}", args.seeds),
        ]
        for arch in args.archs
    ]
    runner.write_table(
        TABLE,
        ["network", "test acc (supervised)", "wall (min)"],
        rows,
        f"{args.epochs} epochs, Adam 1e-3, batch 256, seeds {args.seeds}.",
        dry_run=args.dry_run,
    )


if __name__ == "__main__":
    main()
