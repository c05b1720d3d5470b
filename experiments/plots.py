"""Figures for the README from the kept results (experiments/results/<table>/<run>/metrics.jsonl, results.json):
test accuracy vs epoch for every table, and the class histograms of the balanced-transfer sets.
matplotlib is used here only (pip install -r requirements-plots.txt); the methods need torch alone.

    python experiments/plots.py            # writes experiments/results/<table>-accuracy.png, ...-histograms.png
"""

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from runner import RESULTS  # noqa: E402


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def accuracy_curves(table):
    """One line per run (colour per variant, one line per seed); student epochs only (HiDFD's GAN epochs
    have no test accuracy)."""
    folder = os.path.join(RESULTS, table)
    runs = sorted(d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, "metrics.jsonl")))
    if not runs:
        return None
    variants = sorted({r.rsplit("-seed", 1)[0] for r in runs})
    colours = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
    fig, ax = plt.subplots(figsize=(8, 5))
    labelled = set()
    for run in runs:
        variant = run.rsplit("-seed", 1)[0]
        records = [r for r in read_jsonl(os.path.join(folder, run, "metrics.jsonl")) if "test_acc" in r]
        label = None if variant in labelled else variant  # one legend entry per variant
        labelled.add(variant)
        ax.plot(range(1, len(records) + 1), [r["test_acc"] for r in records], color=colours[variant], label=label,
                alpha=0.8)
    ax.set_xlabel("student epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{table}: test accuracy per epoch (one line per seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = os.path.join(RESULTS, f"{table}-accuracy.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def transfer_histograms():
    """Kept class histogram of each balanced-transfer variant (first seed found), side by side."""
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
    if not results:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(results)
    for i, (variant, res) in enumerate(sorted(results.items())):
        hist = res["histogram"]
        ax.bar([c + i * width for c in range(len(hist))], hist, width=width, label=variant)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(10)])
    ax.set_xticklabels(["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                        "boot"], rotation=30)
    ax.set_ylabel("images in the transfer set")
    ax.set_title("teacher-labelled class histogram of each transfer set")
    ax.legend(fontsize=8)
    path = os.path.join(RESULTS, "balanced_transfer-histograms.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main():
    if not os.path.isdir(RESULTS):
        raise SystemExit(f"no results yet in {RESULTS}: run a table script first")
    tables = sorted(d for d in os.listdir(RESULTS) if os.path.isdir(os.path.join(RESULTS, d)))
    for path in [accuracy_curves(t) for t in tables] + [transfer_histograms()]:
        if path:
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
