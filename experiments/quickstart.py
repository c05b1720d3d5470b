"""The README's quick start, measured: each method command of its quick-start section, run with
seeds 0, 1 and 2 at the default thread count and with the committed teacher (nothing is trained
before it), and the README's quick-start numbers written from those runs.

    python experiments/quickstart.py                  # 3 seeds x 3 commands, then the blocks
    python experiments/quickstart.py --report-only    # the blocks from the kept runs; run nothing
    python experiments/quickstart.py --smoke          # 1 seed, 1 epoch, synthetic data, scratch

The commands are read from README.md (the indented `python kd3.py ...`, `python hidfd.py ...` and
`python balanced_transfer.py ...` lines of its quick start), so the numbers belong to the commands
the page shows. Each run adds `--seed K`, `--teacher teachers/fashionmnist-lenet5.pt` (what a fresh
clone loads anyway) and a scratch `--checkpoint-dir`, emptied before every run (no HiDFD generator
or cached composition of an earlier run is reused). Its results.json, metrics.jsonl, config.json
and quickstart.json (command, threads, torch version, processor, wall time of the whole command)
are kept in experiments/results/quickstart/<method>-seed<k>/; a kept run of the same command is not
run again.

README.md marks each block with `<!-- QUICKSTART:<name> -->` ... `<!-- /QUICKSTART:<name> -->`: one
per command (kd3, hidfd, balanced_transfer), `teacher` and `total`; docs/long_runs.md has `spread`,
each command's spread over its seeds; docs/results.md has `teacher` too. A command whose seeds
spread over more than SPREAD_LIMIT points is flagged in both.
"""

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

import runner

TABLE = "quickstart"
METHODS = ("kd3", "hidfd", "balanced_transfer")  # the quick start's commands, in its order
TEACHER = runner.TEACHER
SCRATCH = os.path.join(runner.RUNS, "quickstart-checkpoints")
SPREAD_LIMIT = 3.0  # points of test accuracy (max - min over the seeds) that flag a command
CHANCE = 10.0  # Fashion-MNIST: 10 balanced classes
PAPER = {  # the paper's number beside each command (KD3 and HiDFD have no Fashion-MNIST experiment)
    "kd3": "the paper has no Fashion-MNIST experiment",
    "hidfd": "the paper has no Fashion-MNIST experiment",
    "balanced_transfer": "the paper's balanced uniform-noise row, Table 1: 70.15",
}
PAPER_TEACHER = "the LeNet-5 teacher of balanced transfer's Table 2: 90.84%"


#### The commands ####


def readme_commands(readme):
    """{method: command} from the indented command lines of README.md's quick-start section."""
    with open(readme) as f:
        text = f.read()
    section = text.partition("## Quick start")[2].split("\n## ")[0]
    commands = {}
    for line in section.splitlines():
        words = line.strip().split()
        if line.startswith("    python ") and len(words) > 1 and words[1].endswith(".py"):
            method = words[1][:-3]
            if method in METHODS and method not in commands:
                commands[method] = line.strip()
    missing = [m for m in METHODS if m not in commands]
    if missing:
        sys.exit(
            f"error: {readme} has no quick-start command for {', '.join(missing)} — add an "
            f"indented `python {missing[0]}.py ...` line to its quick start section"
        )
    return commands


def run_argv(command, seed, smoke=False):
    """The argv that runs `command` with its seed, the committed teacher and a scratch checkpoint
    folder (smoke: synthetic data, one epoch, the synthetic recipe teacher trained there)."""
    scratch = os.path.relpath(SCRATCH, runner.REPO)
    argv = shlex.split(command)[1:] + ["--seed", str(seed), "--checkpoint-dir", scratch]
    if smoke:
        return (
            argv
            + ["--dataset", "synthetic", "--epochs", "1"]
            + (["--gan-epochs", "1"] if argv[0] == "hidfd.py" else [])
        )
    return argv + ["--teacher", TEACHER]


def kept(name, seed, command):
    """The kept run of `command` with `seed` (results.json and quickstart.json), or None."""
    folder = runner.result_dir(TABLE, name, seed)
    try:
        with open(os.path.join(folder, "quickstart.json")) as f:
            info = json.load(f)
        with open(os.path.join(folder, "results.json")) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    return {**results, **info} if info.get("command") == command else None


def processor():
    """The processor's model name (Linux /proc/cpuinfo), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_one(name, seed, command, argv):
    """Run one command in a fresh scratch folder and keep its files (one line on failure)."""
    import torch  # the default thread count of this environment, which the child inherits

    shutil.rmtree(SCRATCH, ignore_errors=True)
    os.makedirs(runner.RUNS, exist_ok=True)
    log_path = os.path.join(runner.RUNS, f"{TABLE}-{name}-seed{seed}.log")
    print(
        f"{command} --seed {seed}\n    progress: tail -f {os.path.relpath(log_path, runner.REPO)}",
        flush=True,
    )
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable] + argv + ["--runs-dir", runner.RUNS],
            cwd=runner.REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
    wall = time.time() - start
    with open(log_path) as log:
        output = log.read()
    runner.stop_on_failure(f"{name} seed {seed}", proc.returncode, output, log_path)
    run_folder = output.split("run folder: ")[-1].split("\n")[0]  # smoke: after the teacher's
    out = runner.result_dir(TABLE, name, seed)
    os.makedirs(out, exist_ok=True)
    for filename in ("results.json", "metrics.jsonl", "config.json"):
        shutil.copy(os.path.join(runner.REPO, run_folder, filename), out)
    info = {
        "command": command,
        "seed": seed,
        "argv": argv,
        "wall_s": round(wall, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "processor": processor(),
    }
    with open(os.path.join(out, "quickstart.json"), "w") as f:
        json.dump(info, f, indent=2)
    shutil.rmtree(SCRATCH, ignore_errors=True)
    print(
        f"    student_acc {kept(name, seed, command)['student_acc']:.2f} in {wall / 60:.1f} min",
        flush=True,
    )


#### The report ####


def stats(values):
    """(mean, sample std, min, max) of a non-empty list (std 0 for one value)."""
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s, min(values), max(values)


def thread_counts(runs):
    """'2' (or '1, 2' when the kept runs differ): the torch thread counts of the runs."""
    return ", ".join(str(c) for c in sorted({r["threads"] for r in runs}))


def threads_of(runs):
    """'2 threads', '1 thread', '1, 2 threads'."""
    counts = thread_counts(runs)
    return f"{counts} thread{'s' * (counts != '1')}"


def command_block(method, runs):
    """The README's lines for one command, from its kept runs."""
    if not runs:
        return (
            f"You should see `student_acc` of about **—** (no kept runs yet: "
            f"`python experiments/quickstart.py` measures it). Chance: {CHANCE:.0f}%; "
            f"{PAPER[method]}."
        )
    accs = [r["student_acc"] for r in runs]
    m, s, lo, hi = stats(accs)
    wall = [r["wall_s"] / 60 for r in runs]
    n = len(runs)
    text = (
        f"You should see `student_acc` of about **{m:.1f}** ({lo:.2f}–{hi:.2f} over {n} "
        f"seed{'s' * (n > 1)}, {threads_of(runs)}; {m:.2f} ± {s:.2f}) after about "
        f"{sum(wall) / n:.1f} minutes ({min(wall):.1f}–{max(wall):.1f})."
    )
    if method == "hidfd":
        agree = [r["synthetic_teacher_agree"] for r in runs if "synthetic_teacher_agree" in r]
        if agree:
            am, _, alo, ahi = stats(agree)
            text += (
                f" The teacher agrees with the generator's label on about {am:.0f}% of its "
                f"samples ({alo:.1f}–{ahi:.1f}%; chance {CHANCE:.0f}%)."
            )
    text += f" Chance: {CHANCE:.0f}%; {PAPER[method]}."
    if hi - lo > SPREAD_LIMIT:
        text += (
            f" **Its seeds spread over {hi - lo:.2f} points (more than {SPREAD_LIMIT:.0f}): "
            f"a single run can land anywhere in that range.**"
        )
    return text


def teacher_block(teacher_file):
    """The committed teacher's test accuracy (stored in the checkpoint) and sha256."""
    import torch

    ckpt = torch.load(teacher_file, map_location="cpu", weights_only=True)
    with open(teacher_file, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return (
        f"The committed teacher `{TEACHER}` has {ckpt['acc']:.2f}% test accuracy "
        f"({PAPER_TEACHER}) and sha256 `{sha}`, which every run's `config.json` and "
        f"`results.json` record."
    )


def total_block(runs_by_method):
    """The three commands' wall time together: the sum over commands of the mean over seeds."""
    if not all(runs_by_method.values()):
        return "Together the three commands take — minutes (not measured yet)."
    means = [sum(r["wall_s"] for r in runs) / len(runs) / 60 for runs in runs_by_method.values()]
    every = [r for runs in runs_by_method.values() for r in runs]
    return (
        f"Together the three commands take about {sum(means):.1f} minutes "
        f"({threads_of(every)}, {every[0]['processor']}, torch {every[0]['torch']})."
    )


def spread_block(runs_by_method, commands):
    """docs/long_runs.md's table: each command's spread over its kept seeds."""
    header = (
        "| command | seeds | student acc (mean ± std) | min–max | spread (points) | threads "
        "| wall (min) |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for method, runs in runs_by_method.items():
        if not runs:
            lines.append(f"| `{commands[method]}` | none | — | — | — | — | — |")
            continue
        m, s, lo, hi = stats([r["student_acc"] for r in runs])
        flag = f" (more than {SPREAD_LIMIT:.0f})" if hi - lo > SPREAD_LIMIT else ""
        wall = sum(r["wall_s"] for r in runs) / len(runs) / 60
        lines.append(
            f"| `{commands[method]}` | {', '.join(str(r['seed']) for r in runs)} | "
            f"{m:.2f} ± {s:.2f} | {lo:.2f}–{hi:.2f} | {hi - lo:.2f}{flag} | "
            f"{thread_counts(runs)} | {wall:.1f} |"
        )
    every = [r for runs in runs_by_method.values() for r in runs]
    where = (
        (
            f"Measured by `python experiments/quickstart.py` on {every[0]['processor']}, torch "
            f"{every[0]['torch']}, the default thread count."
        )
        if every
        else "Not measured yet: `python experiments/quickstart.py` runs the commands and writes it."
    )
    return "\n".join(lines) + "\n\n" + where


def report(readme, docs, seeds, teacher_file=None):
    """Write every QUICKSTART block from the kept runs: the teacher's into `readme` and
    docs["results"], the commands' and the total into `readme`, the spread table into
    docs["long_runs"]. Returns the blocks."""
    commands = readme_commands(readme)
    runs_by_method = {}
    for method in METHODS:
        runs = [kept(method, s, commands[method]) for s in seeds]
        runs_by_method[method] = [r for r in runs if r is not None]
    blocks = {m: command_block(m, runs_by_method[m]) for m in METHODS}
    blocks["total"] = total_block(runs_by_method)
    blocks["teacher"] = teacher_block(teacher_file or os.path.join(runner.REPO, TEACHER))
    blocks["spread"] = spread_block(runs_by_method, commands)
    pages = {"teacher": [readme, docs["results"]], "spread": [docs["long_runs"]]}
    for name in blocks:  # every marker is there before any page is written
        for page in pages.get(name, [readme]):
            with open(page) as f:
                if f"<!-- QUICKSTART:{name} -->" not in f.read():
                    sys.exit(
                        f"error: {page} has no <!-- QUICKSTART:{name} --> marker — add it "
                        f"where the block goes"
                    )
    for name, text in blocks.items():
        for page in pages.get(name, [readme]):
            runner.fill_page(page, "QUICKSTART", name, text)
    for method in METHODS:
        print(f"{commands[method]}\n    {blocks[method]}", flush=True)
    print(blocks["total"], flush=True)
    return blocks


#### Main ####


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=runner.HelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every command")
    p.add_argument(
        "--report-only", action="store_true", help="fill the blocks from the kept runs; run nothing"
    )
    p.add_argument("--dry-run", action="store_true", help="print the runs still to do; run nothing")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="check this script end to end in about a "
        "minute: one seed, one epoch, synthetic data; results and a filled copy of "
        "README.md go to experiments/runs/quickstart-smoke/ (nothing kept is touched)",
    )
    args = p.parse_args(argv)
    if any(s < 0 for s in args.seeds):
        sys.exit("error: --seeds must be whole numbers from 0 — give e.g. --seeds 0 1 2")
    readme = os.path.join(runner.REPO, "README.md")
    docs = {
        page: os.path.join(runner.REPO, "docs", f"{page}.md") for page in ("results", "long_runs")
    }
    commands = readme_commands(readme)
    if not os.path.isfile(os.path.join(runner.REPO, TEACHER)):
        sys.exit(
            f"error: the committed teacher {TEACHER} is missing — restore it from the "
            f"repository (git checkout -- {TEACHER})"
        )
    if args.smoke:
        smoke = os.path.join(runner.RUNS, "quickstart-smoke")
        shutil.rmtree(smoke, ignore_errors=True)
        os.makedirs(smoke)
        runner.RESULTS = os.path.join(smoke, "results")
        for path in [readme] + list(docs.values()):
            shutil.copy(path, smoke)
        readme = os.path.join(smoke, "README.md")
        docs = {page: os.path.join(smoke, os.path.basename(path)) for page, path in docs.items()}
        args.seeds = args.seeds[:1]
    todo = [(m, s) for s in args.seeds for m in METHODS if kept(m, s, commands[m]) is None]
    print(
        f"{TABLE}: {len(args.seeds) * len(METHODS) - len(todo)} of "
        f"{len(args.seeds) * len(METHODS)} runs already kept",
        flush=True,
    )
    for i, (method, seed) in enumerate([] if args.report_only else todo):
        print(f"[{i + 1}/{len(todo)}] ", end="", flush=True)
        argv = run_argv(commands[method], seed, args.smoke)
        if args.dry_run:
            print(f"python {' '.join(argv)}", flush=True)
            continue
        run_one(method, seed, commands[method], argv)
    if not args.dry_run:
        report(readme, docs, args.seeds)


if __name__ == "__main__":
    main()
