"""Balanced transfer (WACV 2021): which classes uniform noise reaches is a property of the teacher.
The Fashion-MNIST LeNet-5 recipe teacher trained with three seeds: its test accuracy, the
teacher-predicted histogram of 10^6 uniform draws, the draws each class's quota of 6,000 would need,
and Table 1's unbalanced-noise row (40 epochs of 60,000 draws, no augmentation, student seeds
--seeds) distilled from each teacher. Seed 0 is the committed teacher of the tables (its row's run
is bt_complete's unbalanced row).

    python experiments/table_bt_teachers.py   # trains the seed-1 and seed-2 teachers if missing

Writes experiments/results/bt_teachers.md; the histograms come from compose_speed.py's agreement
part and are kept in experiments/results/compose_speed/.
"""

import json
import os
import subprocess
import sys

import compose_speed
import runner

TABLE = "bt_teachers"
PAPER_UNBALANCED = 33.49


def teacher_file(seed):
    """Seed 0 is the committed teacher of every table (the recipe's seed 0); others go to the
    cache."""
    if seed == 0:
        return runner.TEACHER
    return os.path.join("checkpoints", f"fashionmnist-lenet5-seed{seed}.pt")


def unbalanced_row(seed, epochs):
    """(table, run name) of the unbalanced noise row distilled from the teacher of `seed`: for the
    committed teacher, the row of bt_complete (the same command)."""
    if seed == 0:
        return "bt_complete", f"noise-uniform-unbalanced-no-aug-e{epochs}"
    return TABLE, f"teacher{seed}-unbalanced-no-aug-e{epochs}"


def main():
    p = runner.base_parser(__doc__, epochs=40)
    p.add_argument(
        "--teacher-seeds", type=int, nargs="+", default=[0, 1, 2], help="recipe teacher seeds"
    )
    args = p.parse_args()
    jobs = []
    for t in args.teacher_seeds:
        path = teacher_file(t)
        if not os.path.isfile(os.path.join(runner.REPO, path)) and not (
            args.dry_run or args.report_only
        ):
            print(f"training the recipe teacher with seed {t}", flush=True)
            proc = subprocess.run(
                [
                    sys.executable,
                    "teacher.py",
                    "--seed",
                    str(t),
                    "--data-root",
                    args.data_root,
                    "--device",
                    args.device,
                ],
                cwd=runner.REPO,
                stderr=subprocess.PIPE,
                text=True,
            )
            runner.stop_on_failure("teacher.py", proc.returncode, proc.stderr)
        kept = os.path.join(
            compose_speed.OUT, os.path.splitext(os.path.basename(path))[0] + ".json"
        )
        if not os.path.isfile(kept) and not (args.dry_run or args.report_only):
            compose_speed.main(["--teacher", os.path.join(runner.REPO, path), "--skip-speed"])
        table, name = unbalanced_row(t, args.epochs)
        if table != TABLE:  # kept by its own table
            continue
        jobs += [
            (
                name,
                s,
                ["balanced_transfer.py"]
                + runner.common_argv(args, teacher=path)
                + [
                    "--epoch-images",
                    "60000",
                    "--source",
                    "noise-uniform",
                    "--unbalanced",
                    "--no-augment",
                ],
            )
            for s in args.seeds
        ]
    runner.run_jobs(TABLE, jobs, args.dry_run, args.report_only)
    rows = []
    for t in args.teacher_seeds:
        kept = os.path.join(
            compose_speed.OUT, os.path.splitext(os.path.basename(teacher_file(t)))[0] + ".json"
        )
        r = json.load(open(kept)) if os.path.isfile(kept) else None
        a = r["agreement"] if r else None
        hist = a["histogram"] if a else None
        need = [n for n in a["draws_for_quota"] if n] if a else []
        unseen = sum(h == 0 for h in hist) if hist else None
        rows.append(
            [
                t,
                f"`{r['teacher_sha256'][:12]}`" if r else "—",
                f"{r['teacher_acc']:.2f}" if r else "—",
                f"{100 * max(hist) / sum(hist):.1f}% (class {hist.index(max(hist))})"
                if hist
                else "—",
                " / ".join(str(h) for h in hist) if hist else "—",
                ("never seen" if unseen else f"{max(need):,}") if a else "—",
                runner.mean_std(
                    runner.field(*unbalanced_row(t, args.epochs), args.seeds, "student_acc")
                ),
            ]
        )
    runner.write_table(
        TABLE,
        [
            "teacher seed",
            "sha256",
            "test acc",
            "largest class of 10^6 uniform draws",
            "histogram of the draws (classes 0-9)",
            "draws to fill every quota of 6,000",
            f"unbalanced noise row, student seeds {args.seeds}",
        ],
        rows,
        f"LeNet-5 recipe teachers (Adam 1e-3, 40 epochs); the paper's teacher: 90.84%, its "
        f"unbalanced noise row {PAPER_UNBALANCED}. Histograms: fp32 argmax of the first 10^6 "
        f"uniform draws of seed 0. Student runs: {args.epochs} epochs of 60,000 draws, "
        f"no augmentation.",
        dry_run=args.dry_run,
    )


if __name__ == "__main__":
    main()
