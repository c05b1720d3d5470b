"""Figures for the docs from the kept results (experiments/results/<table>/<run>/metrics.jsonl,
results.json): test accuracy vs epoch for every table, the class histograms of the balanced-transfer
sets, and the HiDFD generator's teacher agreement over GAN iterations.
matplotlib is used here only (pip install -r requirements-plots.txt); the methods need torch alone.

    python experiments/plots.py            # writes experiments/results/<table>-accuracy.png,
                                           # ...-histograms.png
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import table_families  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from runner import DATA_ROOT, RESULTS, TEACHER  # noqa: E402


def save(fig, filename):
    """Write a figure into experiments/results/ and return its path."""
    path = os.path.join(RESULTS, filename)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def accuracy_curves(table, variants=None, chance=None):
    """Test accuracy per student epoch, one colour per variant: the mean over its seeds as a line
    and the seeds' min..max as a band (HiDFD's GAN epochs have no test accuracy and are left out).
    variants: {label: (table, run name)}, the runs to draw when a table reuses other tables' runs;
    default: the table's own runs, each labelled by its name. chance: a dotted line there."""
    if variants is None:
        folder = os.path.join(RESULTS, table)
        names = sorted({d.rsplit("-seed", 1)[0] for d in os.listdir(folder)})
        variants = {name: (table, name) for name in names}
    curves = {}  # variant -> list of per-seed accuracy lists
    for label, (source, name) in variants.items():
        folder = os.path.join(RESULTS, source)
        runs = sorted(
            d
            for d in os.listdir(folder)
            if d.rsplit("-seed", 1)[0] == name
            and os.path.isfile(os.path.join(folder, d, "metrics.jsonl"))
        )
        for run in runs:
            records = read_jsonl(os.path.join(folder, run, "metrics.jsonl"))
            curves.setdefault(label, []).append([r["test_acc"] for r in records if "test_acc" in r])
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (variant, seeds) in enumerate(sorted(curves.items())):
        n = min(len(c) for c in seeds)  # epochs every seed has (all of them for finished runs)
        epochs = range(1, n + 1)
        per_epoch = list(zip(*[c[:n] for c in seeds]))
        mean = [sum(v) / len(v) for v in per_epoch]
        colour = plt.cm.tab10(i % 10)
        ax.plot(
            epochs,
            mean,
            color=colour,
            label=f"{variant} ({len(seeds)} seed{'s' * (len(seeds) > 1)})",
        )
        if len(seeds) > 1:
            ax.fill_between(
                epochs,
                [min(v) for v in per_epoch],
                [max(v) for v in per_epoch],
                color=colour,
                alpha=0.15,
                linewidth=0,
            )
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.0f}%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("student epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{table}: test accuracy per epoch (mean over seeds, band = min..max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, f"{table}-accuracy.png")


def families_variants():
    """Every row of the families table, with the other tables' runs that its KD3 and HiDFD rows
    reuse (table_families.rows names them), at the student epochs of its kept runs."""
    folder = os.path.join(RESULTS, table_families.TABLE)
    epochs = max(int(d.rsplit("-seed", 1)[0].rsplit("-e", 1)[1]) for d in os.listdir(folder))
    settings = argparse.Namespace(teacher=TEACHER, data_root=DATA_ROOT, device="cpu", epochs=epochs)
    variants = {}
    for name, _, argv in table_families.rows(settings):
        own = (table_families.TABLE, f"{name}-e{epochs}")
        source, run = argv if isinstance(argv, tuple) else own
        variants[name if source == table_families.TABLE else f"{name} ({source})"] = (source, run)
    return variants


def transfer_histograms():
    """Teacher-labelled class histograms of the balanced-transfer runs (first seed kept): the
    composed transfer set of each composition (unbalanced / balanced) and, for the augmented runs,
    the stream the student actually sees (the teacher's labels of the last epoch's augmented
    images). Log scale: the counts span 1..50,000."""
    folder = os.path.join(RESULTS, "balanced_transfer")
    if not os.path.isdir(folder):
        return None
    results = {}
    for run in sorted(os.listdir(folder)):
        variant = run.rsplit("-seed", 1)[0]
        path = os.path.join(folder, run, "results.json")
        if variant not in results and os.path.isfile(path):
            with open(path) as f:
                results[variant] = json.load(f)
    bars = {}  # label -> histogram
    for variant, res in sorted(
        results.items(), key=lambda kv: (kv[1]["balanced"], kv[1]["augment"])
    ):
        composition = "balanced" if res["balanced"] else "unbalanced"
        label = f"{composition} set ({res['transfer_size']:,} of {res['draws']:,} draws)"
        bars.setdefault(label, res["histogram"])
        trained = res.get("trained_histogram") or res.get("augmented_histogram")
        if res["augment"] and trained and res.get("source", "noise-uniform") == "noise-uniform":
            bars[
                f"{composition}, trained stream, targets {res.get('aug_labels', 'relabel')} "
                "(last epoch)"
            ] = trained
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / len(bars)
    for i, (label, hist) in enumerate(bars.items()):
        ax.bar(
            [c + i * width for c in range(len(hist))],
            [max(h, 0.8) for h in hist],
            width=width,
            label=label,
        )
    ax.set_yscale("log")
    ax.set_xticks([c + 0.4 - width / 2 for c in range(10)])
    ax.set_xticklabels(
        [
            "t-shirt",
            "trouser",
            "pullover",
            "dress",
            "coat",
            "sandal",
            "shirt",
            "sneaker",
            "bag",
            "boot",
        ],
        rotation=30,
    )
    ax.set_ylabel("images (log scale)")
    ax.set_title(
        "uniform noise as Fashion-MNIST: the teacher's argmax histogram of each transfer set"
    )
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return save(fig, "balanced_transfer-histograms.png")


def gan_agreement():
    """The teacher's agreement with G's label on the fixed probe samples after every GAN epoch,
    against GAN iterations, one line per run of the hidfd_rho table (chance 10%)."""
    folder = os.path.join(RESULTS, "hidfd_rho")
    if not os.path.isdir(folder):
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = 0
    for run in sorted(os.listdir(folder)):
        path = os.path.join(folder, run, "metrics.jsonl")
        records = (
            [r for r in read_jsonl(path) if r.get("stage") == "gan" and "probe_agree" in r]
            if os.path.isfile(path)
            else []
        )
        if not records:
            continue
        with open(os.path.join(folder, run, "config.json")) as f:
            batch = json.load(f)["gan_batch_size"]
        per_epoch = (
            records[0]["images"] // batch
        )  # the real images of one GAN epoch, in drop_last batches
        ax.plot(
            [r["epoch"] * per_epoch for r in records],
            [r["probe_agree"] for r in records],
            label=run,
        )
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(10, color="grey", linestyle=":", label="chance")
    ax.axhline(70, color="grey", linestyle="--", label="70%")
    ax.set_xlabel("GAN iterations")
    ax.set_ylabel("teacher agrees with G's label (%)")
    ax.set_title("HiDFD: does G learn its labels? (1,000 fixed (z, y), eval mode)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, "hidfd_rho-agreement.png")


def main():
    if not os.path.isdir(RESULTS):
        raise SystemExit(f"no results yet in {RESULTS}: run a table script first")
    tables = sorted(d for d in os.listdir(RESULTS) if os.path.isdir(os.path.join(RESULTS, d)))
    families = table_families.TABLE
    curves = [
        accuracy_curves(t, families_variants(), chance=100 / 10)
        if t == families
        else accuracy_curves(t)
        for t in tables
    ]
    for path in curves + [transfer_histograms(), gan_agreement()]:
        if path:
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
