"""Shared plumbing of the experiment scripts in this folder: run CLI jobs, keep their small result
files, write markdown tables. The scripts themselves only list jobs and table rows.

A job is (name, seed, argv) for one of the repository's CLIs. Its run folder goes to
experiments/runs/ (ignored by git); its results.json and metrics.jsonl are copied to
experiments/results/<table>/<name>-seed<k>/ (committed). A job whose result files are already there
is skipped, so an interrupted table resumes where it stopped, and re-running a script with more
seeds only runs the new ones.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
RUNS = os.path.join(HERE, "runs")
DATA_ROOT = (
    "/usr/share/datasets"  # where `apt-get install dataset-fashion-mnist` puts Fashion-MNIST
)
TEACHER = os.path.join("teachers", "fashionmnist-lenet5.pt")  # the committed teacher of the tables


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of a table script: its docstring as written (commands on their own lines) and every
    flag's default."""


def base_parser(description, epochs):
    """The flags every table script shares."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="student seeds (mean ± std over them)",
    )
    p.add_argument("--epochs", type=int, default=epochs, help="student epochs of every run")
    p.add_argument("--data-root", default=DATA_ROOT, help="where Fashion-MNIST is")
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where every run trains"
    )
    p.add_argument(
        "--teacher",
        default=TEACHER,
        help="one teacher for every run, so seeds vary the student only",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the commands and the table so far; run nothing",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write the table from the kept results; run nothing",
    )
    return p


def ensure_teacher(args):
    """--teacher must exist (the default is the committed Fashion-MNIST LeNet-5): no table trains
    its teacher, so every row of a table names the same file by its sha256."""
    if os.path.isfile(os.path.join(REPO, args.teacher)) or args.dry_run or args.report_only:
        return
    if os.path.normpath(args.teacher) == os.path.normpath(TEACHER):
        sys.exit(
            f"error: the committed teacher {TEACHER} is missing — restore it from the "
            f"repository (git checkout -- {TEACHER})"
        )
    sys.exit(
        f"error: --teacher {args.teacher} does not exist — give a teacher checkpoint "
        f"(relative to {REPO}), or leave it out for the committed {TEACHER}"
    )


def stop_on_failure(what, returncode, output, log_path=None):
    """A failed child CLI: its own `error: ...` line relayed as this script's one line (exit 1); a
    child that ended otherwise (a crash, a kill) with the end of its output."""
    if returncode == 0:
        return
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    where = f" (its output: {os.path.relpath(log_path, REPO)})" if log_path else ""
    if lines:
        print(f"{what} stopped{where}", file=sys.stderr, flush=True)
        sys.exit(lines[-1])
    sys.exit(f"{what} failed (exit {returncode}){where}:\n{output[-3000:]}")


def check_only(only, names):
    """--only of a table script: every given row name must be one of the table's rows (one line,
    else)."""
    unknown = [name for name in only or [] if name not in names]
    if unknown:
        sys.exit(f"error: --only {' '.join(unknown)}: no such row (rows: {', '.join(names)})")


def result_dir(table, name, seed):
    return os.path.join(RESULTS, table, f"{name}-seed{seed}")


def pending_jobs(table, jobs):
    """The jobs whose results.json is not kept yet, in seed-major order: every row gets its first
    seed before any row gets its second, so a table stopped early still has every row (with fewer
    seeds) rather than some rows complete and others empty. Within a seed the given order is
    kept."""
    todo = [
        job
        for job in jobs
        if not os.path.isfile(os.path.join(result_dir(table, job[0], job[1]), "results.json"))
    ]
    seed_rank = {s: i for i, s in enumerate(dict.fromkeys(job[1] for job in jobs))}
    return sorted(todo, key=lambda job: seed_rank[job[1]])  # sorted() is stable


def run_jobs(table, jobs, dry_run=False, report_only=False):
    """Run every (name, seed, argv) job whose results are not kept yet; argv[0] is the CLI file."""
    todo = pending_jobs(table, jobs)
    print(f"{table}: {len(jobs) - len(todo)} of {len(jobs)} runs already done", flush=True)
    if report_only:
        return
    os.makedirs(RUNS, exist_ok=True)
    for i, (name, seed, argv) in enumerate(todo):
        cmd = [sys.executable] + argv + ["--seed", str(seed), "--runs-dir", RUNS]
        print(
            f"[{i + 1}/{len(todo)}] {name} seed {seed}: python {' '.join(argv)} --seed {seed}",
            flush=True,
        )
        if dry_run:
            continue
        start = time.time()
        log_path = os.path.join(
            RUNS, f"{table}-{name}-seed{seed}.log"
        )  # the run's own progress lines, live
        print(f"    progress: tail -f {os.path.relpath(log_path, REPO)}", flush=True)
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        with open(log_path) as log:
            output = log.read()
        run_folder = (
            output.split("run folder: ")[1].split("\n")[0] if "run folder: " in output else None
        )
        stopped = run_folder and os.path.isfile(os.path.join(REPO, run_folder, "results.json"))
        if not stopped:  # a run that stopped early by design keeps its results.json
            stop_on_failure(f"{name} seed {seed}", proc.returncode, output, log_path)
        out = result_dir(table, name, seed)
        os.makedirs(out, exist_ok=True)
        for fname in ("results.json", "metrics.jsonl", "config.json"):
            shutil.copy(os.path.join(REPO, run_folder, fname), out)
        result = load(table, name, seed)
        acc = (
            result["student_acc"] if "student_acc" in result else result.get("teacher_acc")
        )  # teacher.py runs
        print(f"    test accuracy {acc:.2f}% in {(time.time() - start) / 60:.1f} min", flush=True)


def load(table, name, seed):
    path = os.path.join(result_dir(table, name, seed), "results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def teacher_note(table, names, seeds):
    """Which teacher the kept runs of `names` used, from what they recorded (not from --teacher):
    the sha256 each results.json records, or, where none is recorded, the earlier teacher, not
    kept."""
    runs = [(n, s, load(table, n, s)) for n in names for s in seeds]
    shas = [r.get("teacher_sha256") for _, _, r in runs if r]
    recorded = sorted({sha[:16] for sha in shas if sha})
    unrecorded = sum(1 for sha in shas if not sha)
    parts = [
        f"sha256 `{sha}` ({sum(1 for x in shas if x and x[:16] == sha)} runs)" for sha in recorded
    ]
    if unrecorded:
        parts.append(f"the earlier teacher, not kept ({unrecorded} runs record no sha256)")
    return "; ".join(parts) or "—"


def seed_diffs(table, name_a, name_b, seeds):
    """name_b - name_a, seed by seed (student_acc), over the seeds both runs have."""
    a = field(table, name_a, seeds, "student_acc")
    b = field(table, name_b, seeds, "student_acc")
    return [y - x for x, y in zip(a, b) if x is not None and y is not None]


def common_argv(args, teacher=None):
    """The flags every table run of a method CLI starts with: Fashion-MNIST, the table's teacher
    (or `teacher`), --data-root, --device and --epochs from the table script's own flags."""
    return [
        "--dataset",
        "fashionmnist",
        "--teacher",
        teacher or args.teacher,
        "--data-root",
        args.data_root,
        "--device",
        args.device,
        "--epochs",
        str(args.epochs),
    ]


def mean(values):
    """The mean over the finished seeds; None when none finished."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def mean_std(values, signed=False, digits=2, count=True):
    """'m ± s (n)' over the finished seeds (sample std); '—' when none finished. signed: '+m' for
    differences; digits: decimals of m and s; count=False leaves out the '(n)' (and '(1 seed)'),
    for a text that gives the count once for several numbers."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    m = sum(values) / len(values)
    mean = f"{m:+.{digits}f}" if signed else f"{m:.{digits}f}"
    if len(values) == 1:
        return f"{mean} (1 seed)" if count else mean
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return f"{mean} ± {s:.{digits}f}" + (f" ({len(values)})" if count else "")


def write_table(table, header, rows, notes="", dry_run=False):
    """rows: lists of cells; writes experiments/results/<table>.md (not on a dry run) and prints
    it."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n" + (f"\n{notes}\n" if notes else "")
    if dry_run:
        print(text, flush=True)
        return text
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{table}.md"), "w") as f:
        f.write(text)
    fill_docs(table, text)
    print(text, flush=True)
    return text


def fill_docs(table, text, docs=os.path.join(REPO, "docs")):
    """Put the table into every docs/ page that marks its place with `<!-- TABLE:<table> -->` (and,
    once filled, `<!-- /TABLE:<table> -->`), so the pages show exactly the kept results."""
    for page in sorted(os.listdir(docs)):
        if page.endswith(".md"):
            fill_page(os.path.join(docs, page), "TABLE", table, text)


def fill_page(path, kind, name, text):
    """Put `text` between `<!-- <kind>:<name> -->` and `<!-- /<kind>:<name> -->` in the page at
    `path` (the end marker is added after a start marker that has none yet). False when the page has
    no such start marker (the page is left as it is)."""
    start, end = f"<!-- {kind}:{name} -->", f"<!-- /{kind}:{name} -->"
    with open(path) as f:
        before, marked, rest = f.read().partition(start)
    if not marked:
        return False
    after = rest.partition(end)[2] if end in rest else rest
    with open(path, "w") as f:
        f.write(f"{before}{start}\n{text.rstrip()}\n{end}{after}")
    return True


def field(table, name, seeds, key):
    return [(load(table, name, s) or {}).get(key) for s in seeds]


def epoch_metric(table, name, seeds, epoch, key):
    """metrics.jsonl's `key` at `epoch` (1-based) of each seed's kept run; None where missing."""
    values = []
    for s in seeds:
        path = os.path.join(result_dir(table, name, s), "metrics.jsonl")
        records = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
        values.append(
            next((r.get(key) for r in records if r.get("epoch") == epoch and key in r), None)
        )
    return values


def wall_minutes(table, name, seeds):
    walls = [w for w in field(table, name, seeds, "wall_time_s") if w is not None]
    return f"{sum(walls) / len(walls) / 60:.1f}" if walls else "—"
