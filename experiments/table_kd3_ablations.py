"""KD3 (ICCV 2023), Table 2 ablations on the shifted Fashion-MNIST web set `fashionmnist-web` (data.py):
full KD3 vs random / student-only / teacher-only selection, no classifier sharing (one-hot / soft), no
L_mdcl and no MixDistribution. LeNet-5 teacher -> LeNet-5-half student. The claim: full KD3 >= each ablation.

    python experiments/table_kd3_ablations.py                         # 3 seeds x 8 rows, 40 epochs
    python experiments/table_kd3_ablations.py --epochs 10 --seeds 0   # a short version

Writes experiments/results/kd3_ablations.md.
"""

import runner

TABLE = "kd3_ablations"
VARIANTS = [  # (name, flags, Table 2 row, Table 2 CIFAR-10 accuracy of ResNet34 -> ResNet18)
    ("kd3", [], "full KD3", 95.21),
    ("random", ["--selection", "random"], "instance selection: random", 90.22),
    ("student", ["--selection", "student"], "instance selection: student only", 91.99),
    ("teacher", ["--selection", "teacher"], "instance selection: teacher only", 94.01),
    ("no-cls-share-onehot", ["--no-cls-share", "onehot"], "no classifier sharing (one-hot)", 93.42),
    ("no-cls-share-soft", ["--no-cls-share", "soft"], "no classifier sharing (soft)", 93.98),
    ("no-mdcl", ["--no-mdcl"], "no L_mdcl", 94.48),
    ("no-md", ["--no-md"], "no MD (crop + flip views)", 94.61),
]
PAPER_FULL = VARIANTS[0][3]


def main():
    p = runner.base_parser(__doc__, epochs=40)
    p.add_argument("--web", default="fashionmnist-web", help="web data (a data.py source list)")
    p.add_argument("--only", nargs="*", default=None, help="run only these variants (names in VARIANTS)")
    args = p.parse_args()
    runner.ensure_teacher(args)
    common = ["kd3.py", "--dataset", "fashionmnist", "--teacher", args.teacher, "--web", args.web,
              "--data-root", args.data_root, "--device", args.device, "--epochs", str(args.epochs)]
    variants = [v for v in VARIANTS if args.only is None or v[0] in args.only]
    jobs = [(f"{name}-e{args.epochs}", s, common + flags) for name, flags, _, _ in variants for s in args.seeds]
    runner.run_jobs(TABLE, jobs, args.dry_run)
    full = runner.field(TABLE, f"kd3-e{args.epochs}", args.seeds, "student_acc")
    rows = []
    for name, flags, label, paper in variants:
        key = f"{name}-e{args.epochs}"
        accs = runner.field(TABLE, key, args.seeds, "student_acc")
        first = runner.load(TABLE, key, args.seeds[0]) or {}
        # per-seed difference to full KD3 with the same seed (same teacher, same web set)
        diffs = [a - f for a, f in zip(accs, full) if a is not None and f is not None]
        rows.append([label, f"`{' '.join(flags) or '(defaults)'}`", runner.mean_std(accs),
                     runner.mean_std(diffs, signed=True) if name != "kd3" else "—",
                     f"{paper:.2f} ({paper - PAPER_FULL:+.2f})" if name != "kd3" else f"{paper:.2f}",
                     f"{first['selected_frac'] * 100:.1f}%" if "selected_frac" in first else "—",
                     runner.wall_minutes(TABLE, key, args.seeds)])
    runner.write_table(TABLE, ["variant", "flags", "student acc (ours)", "vs full KD3, same seed (points)",
                               "paper, CIFAR-10 ResNet34→18 (vs full)", "selected at the last epoch", "wall (min)"],
                       rows, f"Web `{args.web}`, {args.epochs} epochs, seeds {args.seeds}; teacher {args.teacher}. "
                       "The paper's Table 2 has no Fashion-MNIST or LeNet rows; its CIFAR-10 column is given for the "
                       "direction of each effect.", dry_run=args.dry_run)


if __name__ == "__main__":
    main()
