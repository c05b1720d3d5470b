"""HiDFD (AAAI 2025) at rho = 0.1 and rho = 1.0 of a shifted Fashion-MNIST collection, vs
distillation on the (inflated) collection alone (--no-synthetic). LeNet-5 teacher -> LeNet-5-half
student. The claim: the synthetic data helps most when the collection is small.

The collection has the same make-up as `fashionmnist-web` (60% style-shifted Fashion-MNIST, 20%
procedural shapes, 20% noise) but 60,000 images, so that rho = 1.0 (|D_c| = |D_o| = 60,000) exists;
rho = 0.1 takes a seeded random 6,000 of it. Both rho get the same number of GAN iterations.

The GAN runs with the named CPU setting CONDITIONED below, not the paper's Adam rates (1e-4 / 4e-4):
on this budget the paper's rates leave G ignoring its label (the teacher agrees with G's label on
~13% of its samples after 1,800 iterations, chance 10%), while 1e-3 for both conditions it
(docs/hidfd.md has the grid).

    python experiments/table_hidfd_rho.py                                  # 3 seeds x 4 rows
    python experiments/table_hidfd_rho.py --gan-iterations 600 --seeds 0   # short

Writes experiments/results/hidfd_rho.md.
"""

import math
import os
import statistics

import runner

TABLE = "hidfd_rho"
TRAIN_SIZE = 60_000  # |D_o| of Fashion-MNIST (data.DATASETS["fashionmnist"]["train_size"])
GAN_BATCH = 100  # hidfd.py's --gan-batch-size default for the MNIST family
COLLECTION = "shifted:fashionmnist:36000,synthetic:12000,noise-uniform:12000"
# The CPU setting that conditions G (a deviation from the paper's rates, named here): Adam 1e-3 for
# both networks, width 16 (the default 64 is ~6x slower per iteration on a CPU).
CONDITIONED = ["--g-lr", "1e-3", "--d-lr", "1e-3", "--gan-width", "16"]
RHOS = [0.1, 1.0]
GAN_ITERATIONS = 4200


def run_names(rho, epochs, gan_iterations):
    """The kept runs of one rho: (collection only, HiDFD)."""
    return f"rho{rho}-collected-only-e{epochs}", f"rho{rho}-hidfd-it{gan_iterations}-e{epochs}"


def readme_block(epochs=20, seeds=(0, 1, 2), gan_iterations=GAN_ITERATIONS, rhos=RHOS):
    """The README's HiDFD row, numbers and verdict words from the kept results: the gain of the
    synthetic samples at the smallest and the largest rho, and whether it is larger at the smaller
    one, seed by seed."""
    small, large = min(rhos), max(rhos)
    accs, gains, agree = {}, {}, {}
    for rho in (small, large):
        only, gan = run_names(rho, epochs, gan_iterations)
        accs[rho] = runner.field(TABLE, only, seeds, "student_acc")
        hidfd = runner.field(TABLE, gan, seeds, "student_acc")
        gains[rho] = [None if None in (x, y) else y - x for x, y in zip(accs[rho], hidfd)]
        agree[rho] = runner.field(TABLE, gan, seeds, "synthetic_teacher_agree")
    counts = {len([g for g in gains[rho] if g is not None]) for rho in (small, large)}
    once = len(counts) == 1 and 0 not in counts  # one count for both gains (the same seeds)
    ours = ", ".join(
        f"{runner.mean_std(gains[rho], signed=True, count=not once)} at ρ = {rho}"
        for rho in (small, large)
    )
    if once:
        ours += f" ({counts.pop()})"
    per_seed = " / ".join(f"{v:.1f}" for v in agree[small] if v is not None) or "—"
    ours += (
        f"; the teacher agrees with G's label on {per_seed}% at ρ = {small}, "
        f"{runner.mean_std(agree[large], digits=1, count=False)}% at ρ = {large}"
    )
    diffs = [a - b for a, b in zip(gains[small], gains[large]) if None not in (a, b)]
    if not diffs:
        verdict = "not measured yet"
    else:
        m = runner.mean(diffs)
        spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        if m > 0 and all(d > 0 for d in diffs):
            verdict = "the direction holds in every seed"
        elif m > 0:
            verdict = "the direction holds on average, not in every seed"
        else:
            verdict = "does not hold"
        verdict += (
            f", by {'less' if abs(m) < spread else 'more'} than the seeds' spread "
            f"({runner.mean_std(diffs, signed=True, count=False)})"
        )
        loss = runner.mean(accs[large]) - runner.mean(accs[small])
        little = loss < runner.mean(gains[small])  # shrinking loses less than the samples add
        verdict += (
            f": this collection loses {'only ' * little}{loss:.1f} points from ρ = {large:g} to "
            f"{small:g}" + (", so there is little to win back" if little else "")
        )
    return "\n".join(
        [
            "| paper's claim | paper | ours | verdict | details |",
            "|---|---|---|---|---|",
            f"| HiDFD: synthetic samples help most when ρ is small | Fig. 2(d) | {ours} | "
            f"{verdict} | [hidfd_rho](docs/results.md#hidfd_rho) |",
        ]
    )


def main():
    p = runner.base_parser(__doc__, epochs=20)
    p.add_argument("--rhos", type=float, nargs="+", default=RHOS)
    p.add_argument(
        "--gan-iterations",
        type=int,
        default=GAN_ITERATIONS,
        help="GAN iterations at every rho (epochs = ceil(iterations / (rho * 60,000 / 100)))",
    )
    p.add_argument("--collected", default=COLLECTION)
    args = p.parse_args()
    runner.ensure_teacher(args)
    common = ["hidfd.py"] + runner.common_argv(args) + ["--collected", args.collected]
    jobs, rows = [], []
    for rho in args.rhos:
        iterations_per_epoch = math.ceil(rho * TRAIN_SIZE / GAN_BATCH)
        gan_epochs = math.ceil(args.gan_iterations / iterations_per_epoch)
        only, gan = run_names(rho, args.epochs, args.gan_iterations)
        for s in args.seeds:
            generator = (
                f"checkpoints/hidfd-generator-fashionmnist-rho{rho}-it{args.gan_iterations}"
                f"-seed{s}.pt"
            )
            jobs.append((only, s, common + ["--rho", str(rho), "--no-synthetic"]))
            jobs.append(
                (
                    gan,
                    s,
                    common
                    + [
                        "--rho",
                        str(rho),
                        "--gan-epochs",
                        str(gan_epochs),
                        "--generator",
                        generator,
                        "--sample-every",
                        str(max(1, gan_epochs // 4)),
                    ]
                    + CONDITIONED,
                )
            )
        rows.append((rho, only, gan, gan_epochs, gan_epochs * iterations_per_epoch))
    runner.run_jobs(TABLE, jobs, args.dry_run, args.report_only)
    table = []
    for rho, only, gan, gan_epochs, iterations in rows:
        a = runner.field(TABLE, only, args.seeds, "student_acc")
        b = runner.field(TABLE, gan, args.seeds, "student_acc")
        gains = runner.seed_diffs(TABLE, only, gan, args.seeds)
        first = runner.load(TABLE, gan, args.seeds[0]) or {}
        table.append(
            [
                rho,
                f"{gan_epochs} ({iterations:,})",
                runner.mean_std(a),
                runner.mean_std(b),
                runner.mean_std(gains, signed=True),
                runner.mean_std(runner.field(TABLE, gan, args.seeds, "synthetic_teacher_agree")),
                " / ".join(
                    f"{v:.1f}"
                    for v in runner.field(TABLE, gan, args.seeds, "synthetic_teacher_agree")
                    if v is not None
                )
                or "—",
                first.get("synthetic_teacher_hist", "—"),
                first.get("collected_teacher_hist", "—"),
                runner.wall_minutes(TABLE, only, args.seeds),
                runner.wall_minutes(TABLE, gan, args.seeds),
            ]
        )
    runner.write_table(
        TABLE,
        [
            "rho",
            "GAN epochs (iterations)",
            "collection only",
            "HiDFD",
            "gain (points)",
            "teacher agrees with G's label (%)",
            "per seed",
            f"D_s teacher histogram (seed {args.seeds[0]})",
            f"D_c teacher histogram (seed {args.seeds[0]})",
            "wall, collection only (min)",
            "wall, HiDFD (min)",
        ],
        table,
        f"Collection `{args.collected}`; GAN `{' '.join(CONDITIONED)}`, batch {GAN_BATCH}; student "
        f"{args.epochs} epochs; seeds {args.seeds}. Agreement: the teacher's argmax on the 50,000 "
        "generated images of D_s against the label G was asked for.",
        dry_run=args.dry_run,
    )
    if not args.dry_run and len(set(args.rhos)) > 1:  # the README's row compares two rho
        runner.fill_page(
            os.path.join(runner.REPO, "README.md"),
            "RESULTS",
            TABLE,
            readme_block(args.epochs, args.seeds, args.gan_iterations, args.rhos),
        )


if __name__ == "__main__":
    main()
