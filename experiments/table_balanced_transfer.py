"""Balanced transfer (WACV 2021), Table 1, the Fashion-MNIST noise rows: unbalanced / balanced transfer set
of uniform noise, without / with augmentation; LeNet-5 teacher -> LeNet-5-half student.

    python experiments/table_balanced_transfer.py                     # 3 seeds x 4 rows, 40 epochs
    python experiments/table_balanced_transfer.py --epochs 10 --seeds 0 --max-draws 300000   # a short version

Writes experiments/results/balanced_transfer.md (mean ± std over the finished seeds).
"""

import runner

PAPER = {("unbalanced", "no-aug"): 33.49, ("unbalanced", "aug"): 38.37, ("balanced", "no-aug"): 70.15,
         ("balanced", "aug"): 74.33}
TABLE = "balanced_transfer"


def main():
    p = runner.base_parser(__doc__, epochs=40)
    p.add_argument("--source", default="noise-uniform", help="transfer source (paper: uniform noise)")
    p.add_argument("--max-draws", type=int, default=1_000_000, help="cap on noise draws of the balanced rows")
    args = p.parse_args()
    runner.ensure_teacher(args)
    common = ["balanced_transfer.py", "--dataset", "fashionmnist", "--teacher", args.teacher, "--source", args.source,
              "--data-root", args.data_root, "--device", args.device, "--epochs", str(args.epochs)]
    jobs, rows = [], []
    for balance in ("unbalanced", "balanced"):
        for aug in ("no-aug", "aug"):
            name = f"{args.source}-{balance}-{aug}-e{args.epochs}"
            flags = [f"--{balance}", "--augment" if aug == "aug" else "--no-augment"]
            if balance == "balanced":
                flags += ["--max-draws", str(args.max_draws)]
            jobs += [(name, s, common + flags) for s in args.seeds]
            rows.append((name, balance, aug))
    runner.run_jobs(TABLE, jobs, args.dry_run)
    table = []
    for name, balance, aug in rows:
        first = runner.load(TABLE, name, args.seeds[0]) or {}
        table.append([balance, aug, runner.mean_std(runner.field(TABLE, name, args.seeds, "student_acc")),
                      PAPER[(balance, aug)], f"{first['transfer_size']:,}" if first else "—",
                      f"{first['draws']:,}" if first else "—",
                      first.get("histogram", "—"), runner.wall_minutes(TABLE, name, args.seeds)])
    teacher = runner.field(TABLE, rows[0][0], args.seeds[:1], "teacher_acc")[0] or float("nan")
    runner.write_table(TABLE, ["transfer set", "augmentation", "student acc (ours)", "paper", "size", "noise draws",
                               f"class histogram (seed {args.seeds[0]})", "wall (min)"], table,
                       f"Teacher LeNet-5: {teacher:.2f}% (paper 90.84%). Source {args.source}, {args.epochs} student "
                       f"epochs, balanced rows capped at {args.max_draws:,} draws; seeds {args.seeds}.", dry_run=args.dry_run)


if __name__ == "__main__":
    main()
