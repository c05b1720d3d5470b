"""KD3 (ICCV 2023), Table 2 ablations on the shifted Fashion-MNIST web set `fashionmnist-web` (data.py):
full KD3 vs random / student-only / teacher-only selection, no classifier sharing (one-hot / soft), no
L_mdcl and no MixDistribution. LeNet-5 teacher -> LeNet-5-half student. The claim: full KD3 >= each ablation.

    python experiments/table_kd3_ablations.py                         # 3 seeds x 8 rows, 40 epochs
    python experiments/table_kd3_ablations.py --epochs 10 --seeds 0   # a short version

Writes experiments/results/kd3_ablations.md.
"""

import runner

TABLE = "kd3_ablations"
VARIANTS = [  # (name, flags, Table 2 row)
    ("kd3", [], "full KD3"),
    ("random", ["--selection", "random"], "instance selection: random"),
    ("student", ["--selection", "student"], "instance selection: student only"),
    ("teacher", ["--selection", "teacher"], "instance selection: teacher only"),
    ("no-cls-share-onehot", ["--no-cls-share", "onehot"], "no classifier sharing (one-hot)"),
    ("no-cls-share-soft", ["--no-cls-share", "soft"], "no classifier sharing (soft)"),
    ("no-mdcl", ["--no-mdcl"], "no L_mdcl"),
    ("no-md", ["--no-md"], "no MD (crop + flip views)"),
]


def main():
    p = runner.base_parser(__doc__, epochs=40)
    p.add_argument("--web", default="fashionmnist-web", help="web data (a data.py source list)")
    p.add_argument("--only", nargs="*", default=None, help="run only these variants (names in VARIANTS)")
    args = p.parse_args()
    runner.ensure_teacher(args)
    common = ["kd3.py", "--dataset", "fashionmnist", "--teacher", args.teacher, "--web", args.web,
              "--data-root", args.data_root, "--device", args.device, "--epochs", str(args.epochs)]
    variants = [v for v in VARIANTS if args.only is None or v[0] in args.only]
    jobs = [(f"{name}-e{args.epochs}", s, common + flags) for name, flags, _ in variants for s in args.seeds]
    runner.run_jobs(TABLE, jobs, args.dry_run)
    rows = []
    for name, flags, label in variants:
        key = f"{name}-e{args.epochs}"
        first = runner.load(TABLE, key, args.seeds[0]) or {}
        rows.append([label, f"`{' '.join(flags) or '(defaults)'}`",
                     runner.mean_std(runner.field(TABLE, key, args.seeds, "student_acc")),
                     f"{first['selected_frac'] * 100:.1f}%" if "selected_frac" in first else "—",
                     runner.wall_minutes(TABLE, key, args.seeds)])
    runner.write_table(TABLE, ["variant", "flags", "student acc", "selected at the last epoch", "wall (min)"], rows,
                       f"Web `{args.web}`, {args.epochs} epochs, seeds {args.seeds}; teacher {args.teacher}.", dry_run=args.dry_run)


if __name__ == "__main__":
    main()
