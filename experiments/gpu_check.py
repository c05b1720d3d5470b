"""The GPU check: every measurement of the CUDA path in one command, within a hard wall-time budget.

    python experiments/gpu_check.py RESULTS_DIR          # on a GPU: about 9 minutes
    python experiments/gpu_check.py RESULTS_DIR --smoke  # the same parts on the CPU, tiny: < 1 min

Each part runs one of the project's CLIs (bench.py, teacher.py, kd3.py, balanced_transfer.py, or
this file's own profiler) as a subprocess, with a timeout from what is left of --budget-minutes; the
budget is checked between parts, and a part that does not fit is skipped. As soon as a part ends,
RESULTS_DIR/<NN>-<part>.json holds what it measured (or its error: a failed part does not stop the
others), <NN>-<part>.log its output, and RESULTS_DIR/bench-<device>.json the summary so far (the
bench table, the projected full-run times, the goal). A run cut off from outside still leaves every
finished part's files. docs/speed.md lists the parts.

Fashion-MNIST (the teacher, KD3 and balanced-transfer parts) is read from --data-root (default
data/, relative to the repository root), where data.py looks in <root>/FashionMNIST/raw/, then
<root>/fashion-mnist/ (the Debian layout), then the system install
/usr/share/datasets/fashion-mnist. For a machine that receives a copy of the working tree, put the
four .gz files into the ignored data/ folder and send it along:

    mkdir -p data && cp -r /usr/share/datasets/fashion-mnist data/      # 4 files, 31 MB

--smoke runs every part on the CPU at tiny sizes on the generated `synthetic` dataset (no file
needed), bench steps at batch 2 and without torch.compile (compiling takes minutes on a CPU): it
proves the script, the CLIs' flags and the result parsing before a GPU is at hand.
"""

import argparse
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

import bench  # noqa: E402
import data  # noqa: E402
import runtime  # noqa: E402

#### Settings: the full check on a GPU, and the smoke check on the CPU ####
# bench_flags: none on a GPU, so bench.py's own CUDA settings (batch 256, 3 windows of 50 steps);
# compile_steps: only the step the goal names is compiled (compiling every step of both pairs takes
# longer than the whole budget); hidfd_gan_batch: the authors' GAN batch (hidfd.py SETTINGS);
# bt_max_draws: "full", until every quota is full, within the time left (--max-minutes; the second
# part reads the first one's composition from the cache); compile_cap_s:
# the most the compiled bench may take (the balanced-transfer parts after it keep their time).
# --smoke: bench.py times only the step the summary reads (its own test covers the others).
SETTINGS = {
    "gpu": dict(
        device="cuda",
        dataset="fashionmnist",
        bench_flags=[],
        compile_steps=["kd3"],
        hidfd_gan_batch=100,
        hidfd_gan_flags=["--warmup", "5", "--steps", "20", "--repeats", "3"],
        profile_batch=256,
        profile_steps=5,
        teacher_flags=[],
        kd3_epochs=20,
        bt_flags=[],
        bt_max_draws="full",
        bt_train_reserve_s=90,
        min_part_s=20,
        compile_cap_s=180,
    ),
    "smoke": dict(
        device="cpu",
        dataset="synthetic",
        bench_flags=["--quick", "--batch", "2", "--pool", "4", "--only", "kd3"],
        compile_steps=None,
        hidfd_gan_batch=2,
        hidfd_gan_flags=["--quick", "--pool", "4"],
        profile_batch=2,
        profile_steps=1,
        teacher_flags=["--epochs", "1"],
        kd3_epochs=1,
        bt_flags=["--epochs", "1", "--transfer-size", "100", "--draw-batch", "100"],
        bt_max_draws="400",
        bt_train_reserve_s=5,
        min_part_s=1,
        compile_cap_s=None,
    ),
}
PAIRS = ["resnet34:resnet18:cifar10", "lenet5:lenet5_half:mnist"]
KD3_PAIR = ("kd3", "resnet34->resnet18")
# Dense bf16 tensor-core peaks (TFLOP/s, without 2:4 sparsity), first match on the device name wins.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0)]
GOAL = dict(mfu=0.30, fast_over_naive=5.0)  # the KD3 ResNet34 -> ResNet18 step, in one run
# What the projections scale: ImageNet's training set (KD3's CIFAR web set, at 32x32), KD3's CIFAR
# epochs (kd3.py SETTINGS), HiDFD's GAN epochs and batch on |D_c| = rho * 50,000 (hidfd.py
# SETTINGS).
WEB_IMAGES, KD3_EPOCHS = 1_281_167, 240
GAN_EPOCHS, GAN_BATCH, CIFAR_TRAIN = 500, 100, 50_000


def build_parser():
    p = argparse.ArgumentParser(
        description="Every measurement of the CUDA path in one command (docs/speed.md).",
        formatter_class=runtime.HelpFormatter,
    )
    p.add_argument("results", nargs="?", help="folder for the JSON and log files (new or empty)")
    p.add_argument("--smoke", action="store_true", help="every part on the CPU at tiny sizes (CI)")
    p.add_argument(
        "--budget-minutes", type=float, default=9.0, help="hard wall-time budget of all parts"
    )
    p.add_argument(
        "--data-root",
        default="data",
        help="where Fashion-MNIST is (a relative path: from the repository root)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="PART",
        help="run these parts only (default: all): " + ", ".join(n for n, _ in PARTS),
    )
    p.add_argument(
        "--work-dir",
        default=None,
        help="run folders and checkpoints of the parts "
        "(default: a temporary folder, removed at the end)",
    )
    # the profile part: this file run as a subprocess of itself
    p.add_argument("--profile-kd3", default=None, metavar="JSON", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=1, help=argparse.SUPPRESS)
    return p


#### Parsing what the CLIs write ####


def run_folder(runs_dir):
    """The one run folder a CLI wrote under runs_dir: (results.json, [metrics.jsonl records])."""
    runs = sorted(os.listdir(runs_dir))
    if len(runs) != 1:
        raise PartError(f"expected one run folder in {runs_dir}, found {len(runs)}")
    folder = os.path.join(runs_dir, runs[0])
    with open(os.path.join(folder, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return results, [json.loads(line) for line in f if line.strip()]


def epoch_rates(records):
    """Images/s of a run's epochs: the median, and the first epoch's (it includes the warm-up)."""
    rates = [r["images_per_s"] for r in records]
    return {
        "median_img_s": statistics.median(rates) if rates else None,
        "first_epoch_img_s": rates[0] if rates else None,
        "epochs": len(records),
    }


BENCH_LINE = re.compile(
    r"^\s+(\S+) (\S+): fast ([\d.]+) ms/step, naive ([\d.]+) ms/step \(([\d.]+)x\)"
)


def printed_bench_rows(text):
    """The rows bench.py prints as it goes (kept when a bench part is cut off before its JSON)."""
    return [
        {
            "step": m[1],
            "pair": m[2],
            "fast_ms": float(m[3]),
            "naive_ms": float(m[4]),
            "fast_over_naive": float(m[5]),
        }
        for m in map(BENCH_LINE.match, text.splitlines())
        if m
    ]


def bench_row(rows, step, pair):
    return next((r for r in rows or [] if (r["step"], r["pair"]) == (step, pair)), None)


def idle_gaps(intervals, top=10):
    """Device idle time between kernels: intervals (start, end) in us, overlaps merged. Returns the
    busy time, the span, and the `top` longest gaps (the host not feeding the device); None without
    any kernel."""
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    if not merged:
        return None
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(merged)]
    span = merged[-1][1] - merged[0][0]
    busy = sum(end - start for start, end in merged)
    return {
        "span_us": span,
        "busy_us": busy,
        "idle_fraction": 1 - busy / span if span else 0.0,
        "gaps": len(gaps),
        "longest_gaps_us": sorted(gaps, reverse=True)[:top],
    }


def peak_tflops(device_name):
    return next(
        (peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), bench.H100_BF16_DENSE_TFLOPS
    )


def slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


#### The parts ####


class PartError(Exception):
    """A part that failed: its message goes into the part's JSON."""


class Check:
    """The budget, the results folder and what the parts share (the teacher checkpoint)."""

    def __init__(self, args, mode):
        self.args, self.mode, self.s = args, mode, SETTINGS[mode]
        self.out = os.path.abspath(args.results)
        self.work = args.work_dir or tempfile.mkdtemp(prefix="gpu_check-")
        self.start = time.time()
        self.deadline = self.start + 60 * args.budget_minutes
        self.parts, self.shared = [], {}
        self.device_name = bench.describe_device(torch.device(self.s["device"]))
        self.peak = peak_tflops(self.device_name) if self.s["device"] == "cuda" else None
        self.summary_path = os.path.join(
            self.out, f"bench-{slug(self.device_name)}" + ("-smoke" if args.smoke else "") + ".json"
        )

    def left(self):
        return self.deadline - time.time()

    def cli(self, record, name, argv, cap_s=None):
        """Run `argv` (a script of the repository, then its flags) with what is left of the budget
        (or cap_s) as its timeout; its output goes to <name>.log as it runs. Returns the output; a
        non-zero exit or the timeout raises PartError with the last line it printed."""
        timeout = min(self.left(), cap_s or float("inf"))
        command = [sys.executable, os.path.join(REPO, argv[0])] + [str(a) for a in argv[1:]]
        record.setdefault("commands", []).append(" ".join(["python"] + [str(a) for a in argv]))
        log = os.path.join(self.out, f"{name}.log")
        with open(log, "a") as f:
            proc = subprocess.Popen(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(timeout=max(timeout, 1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = None
        with open(log) as f:
            text = f.read()
        self.last_output = text
        if rc is None:
            raise PartError(f"stopped after {timeout:.0f} s: its share of the budget was spent")
        if rc:
            lines = [line for line in text.splitlines() if line.strip()]
            raise PartError(f"exit {rc}: {lines[-1] if lines else 'no output'}")
        return text

    def run_part(self, index, name, fn):
        """Run one part within the budget and write its JSON (and the summary) at once."""
        record = {"part": name, "status": "ok", "error": None}
        stem = f"{index:02d}-{name}"
        left = self.left()
        start = time.time()
        if left < self.s["min_part_s"]:
            record.update(status="skipped", error=f"{left:.0f} s of the budget left")
        else:
            self.last_output = ""
            try:
                record.update(fn(self, record, stem) or {})
            except PartError as e:
                record.update(status="failed", error=str(e))
            except Exception as e:  # a parsing surprise: kept in the JSON, the next part still runs
                record.update(status="failed", error=f"{type(e).__name__}: {e}")
            if record["status"] == "failed" and self.last_output:
                record["output_tail"] = self.last_output.splitlines()[-30:]
        record["wall_s"] = round(time.time() - start, 1)
        self.parts.append(record)
        write_json(os.path.join(self.out, f"{stem}.json"), record)
        self.write_summary()
        print(
            f"[gpu_check] {stem}: {record['status']} in {record['wall_s']:.0f} s"
            + (f" ({record['error']})" if record["error"] else "")
            + f"; {self.left():.0f} s of the budget left",
            flush=True,
        )

    def write_summary(self):
        by_name = {p["part"]: p for p in self.parts}
        write_json(
            self.summary_path,
            {
                "device": self.device_name,
                "torch": torch.__version__,
                "mode": self.mode,
                "budget_minutes": self.args.budget_minutes,
                "elapsed_s": round(time.time() - self.start, 1),
                "peak_bf16_tflops": self.peak,
                "goal": goal(by_name),
                "projections": projections(by_name),
                "parts": {
                    p["part"]: {k: v for k, v in p.items() if k not in ("output_tail", "part")}
                    for p in self.parts
                },
            },
        )

    def flags(self, *names):
        return [x for n in names for x in self.s[n]]


def part_env(check, record, stem):
    """Device name, torch/CUDA/cuDNN versions and the MFU peak."""
    cuda = check.s["device"] == "cuda"
    if cuda and not torch.cuda.is_available():
        raise PartError("CUDA is not available")
    import torchvision

    props = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "device": check.device_name,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1) if cuda else None,
        "cpu_count": os.cpu_count(),
        "peak_bf16_tflops": check.peak,
        "python": sys.version.split()[0],
    }


def bench_part(check, record, stem, extra, cap_s=None):
    """bench.py on both pairs: the rows the goal and the projections read (all of bench.py's JSON is
    kept beside)."""
    out = os.path.join(check.out, f"{stem}-bench.json")
    argv = [
        "bench.py",
        "--device",
        check.s["device"],
        "--arch-pair",
        *PAIRS,
        "--out",
        out,
        *check.flags("bench_flags"),
        *extra,
        *peak_flag(check),
    ]
    try:
        check.cli(record, stem, argv, cap_s)
    except PartError:
        record["printed_rows"] = printed_bench_rows(check.last_output)  # measured before it stopped
        raise
    with open(out) as f:
        result = json.load(f)
    keys = (
        "step",
        "pair",
        "input",
        "batch",
        "fast_img_s",
        "fast_ms",
        "naive_ms",
        "fast_over_naive",
        "fast_tflop_s",
        "mfu",
        "flops_formula",
    )
    record["rows"] = [{k: r[k] for k in keys} for r in result["rows"]]
    return {
        "device": result["device"],
        "torch": result["torch"],
        "bench_json": os.path.basename(out),
    }


def peak_flag(check):
    return ["--peak-tflops", check.peak] if check.peak else []


def part_bench(check, record, stem):
    return bench_part(check, record, stem, [])


def part_bench_compile(check, record, stem):
    if check.s["compile_steps"] is None:
        record.update(status="skipped", error="--smoke: torch.compile takes minutes on a CPU")
        return {}
    return bench_part(
        check,
        record,
        stem,
        ["--compile", "--only", *check.s["compile_steps"]],
        check.s["compile_cap_s"],
    )


def part_profile(check, record, stem):
    """torch.profiler on the KD3 ResNet step, when it falls short of the goal's MFU (or no MFU was
    measured: on the CPU, or without the bench part)."""
    rows = next((p.get("rows") for p in check.parts if p["part"] == "bench"), None)
    row = bench_row(rows, *KD3_PAIR)
    mfu = row["mfu"] if row else None
    if mfu is not None and mfu >= GOAL["mfu"]:
        record.update(status="skipped", error=f"no shortfall: MFU {mfu:.1%}")
        return {}
    out = os.path.join(check.out, f"{stem}-table.json")
    check.cli(
        record,
        stem,
        [
            "experiments/gpu_check.py",
            "--profile-kd3",
            out,
            "--device",
            check.s["device"],
            "--batch",
            check.s["profile_batch"],
            "--steps",
            check.s["profile_steps"],
        ],
    )
    with open(out) as f:
        return {"measured_mfu": mfu, **json.load(f)}


def part_hidfd_gan(check, record, stem):
    """HiDFD's GAN step (one D and one G update) at the CIFAR setting, width 128, at the authors'
    batch."""
    b = check.s["hidfd_gan_batch"]
    out = os.path.join(check.out, f"{stem}-bench.json")
    check.cli(
        record,
        stem,
        [
            "bench.py",
            "--device",
            check.s["device"],
            "--arch-pair",
            PAIRS[0],
            "--only",
            "hidfd-gan",
            "--batch",
            b,
            "--out",
            out,
            *check.flags("hidfd_gan_flags"),
            *peak_flag(check),
        ],
    )
    with open(out) as f:
        row = json.load(f)["rows"][0]
    return {
        "batch": b,
        "iterations_per_s": 1000 / row["fast_ms"],
        "fast_ms": row["fast_ms"],
        "naive_ms": row["naive_ms"],
        "fast_tflop_s": row["fast_tflop_s"],
        "mfu": row["mfu"],
    }


def method_run(check, record, stem, argv):
    """A method CLI with its own runs folder in the work dir; returns (results, metrics records)."""
    runs = os.path.join(check.work, stem)
    check.cli(
        record,
        stem,
        argv
        + [
            "--device",
            check.s["device"],
            "--data-root",
            check.args.data_root,
            "--runs-dir",
            runs,
            "--checkpoint-dir",
            os.path.join(check.work, "ckpt"),
        ],
    )
    return run_folder(runs)


def part_teacher(check, record, stem):
    """The LeNet-5 teacher with the MNIST-family recipe (40 epochs), into the work dir's cache."""
    results, records = method_run(
        check,
        record,
        stem,
        [
            "teacher.py",
            "--dataset",
            check.s["dataset"],
            "--arch",
            "lenet5",
            *check.flags("teacher_flags"),
        ],
    )
    check.shared["teacher"] = results["checkpoint"]
    return {
        "teacher_acc": results["teacher_acc"],
        "run_wall_s": results["wall_time_s"],
        **epoch_rates(records),
    }


def teacher_flag(check):
    if "teacher" not in check.shared:
        raise PartError("no teacher: the teacher part did not finish")
    return ["--teacher", check.shared["teacher"]]


def part_kd3(check, record, stem):
    """kd3.py --epochs 20 with the teacher part's teacher (its default web set)."""
    results, records = method_run(
        check,
        record,
        stem,
        [
            "kd3.py",
            "--dataset",
            check.s["dataset"],
            "--epochs",
            check.s["kd3_epochs"],
            *teacher_flag(check),
        ],
    )
    return {
        "student_acc": results["student_acc"],
        "teacher_acc": results["teacher_acc"],
        "web_size": results["web_size"],
        "selected": results["selected"],
        "run_wall_s": results["wall_time_s"],
        **epoch_rates(records),
    }


def bt_part(check, record, stem, augment, share):
    """balanced_transfer.py on uniform noise with the default quota (Table 1), composing for `share`
    of the time left (less what its 40-epoch student needs); the composer's draws/s and whether
    every quota filled."""
    compose_s = max((check.left() - check.s["bt_train_reserve_s"]) * share, 6)
    argv = [
        "balanced_transfer.py",
        "--dataset",
        check.s["dataset"],
        "--source",
        "noise-uniform",
        "--max-draws",
        check.s["bt_max_draws"],
        "--max-minutes",
        f"{compose_s / 60:.2f}",
        "--augment" if augment else "--no-augment",
        *teacher_flag(check),
        *check.flags("bt_flags"),
    ]
    results, records = method_run(check, record, stem, argv)
    return {
        "augment": augment,
        "draws": results["draws"],
        "compose_s": results["compose_s"],
        # compose_s is rounded to 0.1 s in results.json: no rate from a shorter composition
        "draws_per_s": (results["draws"] / results["compose_s"]) if results["compose_s"] else None,
        "transfer_size": results["transfer_size"],
        "quota": results["quota"],
        "histogram": results["histogram"],
        "complete": not results["short"],
        "student_acc": results["student_acc"],
        "run_wall_s": results["wall_time_s"],
        **epoch_rates(records),
    }


def part_bt_noaug(check, record, stem):
    return bt_part(check, record, stem, augment=False, share=0.5)


def part_bt_aug(check, record, stem):
    return bt_part(check, record, stem, augment=True, share=1.0)


# In the order the budget should buy them: the goal's step, its profile, the projections, the runs.
PARTS = [
    ("env", part_env),
    ("bench", part_bench),
    ("profile", part_profile),
    ("hidfd-gan", part_hidfd_gan),
    ("teacher", part_teacher),
    ("kd3", part_kd3),
    ("bench-compile", part_bench_compile),
    ("bt-noaug", part_bt_noaug),
    ("bt-aug", part_bt_aug),
]


#### The summary: the goal and the projected full runs ####


def goal(parts):
    """The KD3 ResNet34 -> ResNet18 step against the goal (MFU and fast/naive in one run), plain and
    compiled; met is None where no MFU was measured (on the CPU)."""
    out = {"mfu_at_least": GOAL["mfu"], "fast_over_naive_at_least": GOAL["fast_over_naive"]}
    for name in ("bench", "bench-compile"):
        row = bench_row(parts.get(name, {}).get("rows"), *KD3_PAIR)
        if row:
            met = (
                None
                if row["mfu"] is None
                else (
                    row["mfu"] >= GOAL["mfu"] and row["fast_over_naive"] >= GOAL["fast_over_naive"]
                )
            )
            out[name] = {"mfu": row["mfu"], "fast_over_naive": row["fast_over_naive"], "met": met}
    return out


def projections(parts):
    """Full runs scaled from the measured steps: KD3 CIFAR-10 (240 epochs over 1.28 M web images)
    and HiDFD's 500 GAN epochs (rho 0.1 and 1.0). Upper bounds where said."""
    out = {}
    rows = parts.get("bench", {}).get("rows")
    kd3_row = bench_row(rows, *KD3_PAIR)
    if kd3_row:
        # forward FLOPs per image of the teacher and the student, as bench.py counted them
        f_t, f_s = (
            int(re.search(rf"{name}=(\d+)", kd3_row["flops_formula"])[1]) for name in ("F_T", "F_S")
        )
        flop_s = kd3_row["fast_tflop_s"] * 1e12
        train_s = KD3_EPOCHS * WEB_IMAGES / kd3_row["fast_img_s"]
        select_s = (KD3_EPOCHS * f_s + f_t) * WEB_IMAGES / flop_s
        out["kd3_cifar10_240_epochs"] = {
            "hours": (train_s + select_s) / 3600,
            "train_hours": train_s / 3600,
            "select_hours": select_s / 3600,
            "formula": "240 x 1,281,167 / kd3 step img/s (every web image selected) + (240 F_S + "
            "F_T) x 1,281,167 / the kd3 step's FLOP/s (the student's selection pass "
            "every epoch, the teacher's labels once); upper bounds: the selection keeps "
            "part of the web set, inference runs faster than training; bench batch "
            f"{kd3_row['batch']}, kd3.py's CIFAR batch is 128",
        }
    gan = parts.get("hidfd-gan", {})
    if gan.get("iterations_per_s"):
        hidfd = {
            "formula": "500 x floor(rho x 50,000 / 100) iterations / iterations/s at batch "
            f"{gan['batch']}; the per-epoch probe is not counted"
        }
        for rho in (0.1, 1.0):
            iterations = GAN_EPOCHS * (int(rho * CIFAR_TRAIN) // GAN_BATCH)
            hidfd[f"rho_{rho}"] = {
                "iterations": iterations,
                "hours": iterations / gan["iterations_per_s"] / 3600,
            }
        out["hidfd_500_gan_epochs"] = hidfd
    return out


#### The profiler part (run by the check itself as a subprocess) ####


def profile_kd3(path, device_name, batch, steps):
    """torch.profiler over `steps` KD3 ResNet34 -> ResNet18 steps (kd3.train_step, as bench.py times
    it): the top operators and kernels, and the device's idle gaps between kernels."""
    args, device = bench.resolve_settings(
        bench.build_parser().parse_args(
            [
                "--device",
                device_name,
                "--arch-pair",
                PAIRS[0],
                "--only",
                "kd3",
                "--batch",
                str(batch),
                "--pool",
                str(max(4 * batch, 8)),
                "--warmup",
                "3",
                "--steps",
                str(steps),
                "--repeats",
                "1",
            ]
        )
    )
    runtime.seed_everything(0)
    step = bench.build_kd3(args.pairs[0], args, device)
    for _ in range(args.warmup):
        step.fast()
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step.fast()
        if cuda:
            torch.cuda.synchronize(device)
    wall = (time.perf_counter() - start) / steps
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    kernels = [
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
    ]
    write_json(
        path,
        {
            "batch": batch,
            "steps": steps,
            "ms_per_step_profiled": wall * 1e3,
            "sort_by": sort_by,
            "table": prof.key_averages().table(sort_by=sort_by, row_limit=25).splitlines(),
            "host_gaps": idle_gaps(kernels),
        },
    )


#### Main ####


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def check_input(args):
    """Bad input ends here, before any part runs."""
    if not args.results:
        raise ValueError(
            "no results folder given — python experiments/gpu_check.py RESULTS_DIR [--smoke]"
        )
    if os.path.exists(args.results) and not os.path.isdir(args.results):
        raise ValueError(f"{args.results} is a file — give a folder for the results")
    if os.path.isdir(args.results) and os.listdir(args.results):
        raise ValueError(
            f"{args.results} is not empty — give a new folder (the check never replaces results)"
        )
    if args.budget_minutes <= 0:
        raise ValueError(
            f"--budget-minutes must be > 0, got {args.budget_minutes} — the default is 9"
        )
    unknown = [p for p in args.only or [] if p not in dict(PARTS)]
    if unknown:
        raise ValueError(
            f"--only {' '.join(unknown)}: no such part — parts: {', '.join(dict(PARTS))}"
        )
    if args.smoke:
        return
    if not torch.cuda.is_available():
        raise ValueError(
            "CUDA is not available — run the check on a GPU machine, or --smoke on the CPU"
        )
    root = os.path.join(REPO, args.data_root)
    try:
        data.load_images("fashionmnist", "test", root)
    except data.DatasetNotFoundError:
        raise ValueError(
            f"Fashion-MNIST not found in {root}/fashion-mnist, "
            f"{root}/FashionMNIST/raw or {data.SYSTEM_FASHION_MNIST} — copy its "
            f"four .gz files into {root}/fashion-mnist (this file's docstring says "
            "how)"
        ) from None
    args.data_root = root


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.profile_kd3:
        return profile_kd3(args.profile_kd3, args.device, args.batch, args.steps)
    try:
        check_input(args)
    except ValueError as e:
        sys.exit(f"error: {e}")
    os.makedirs(args.results, exist_ok=True)
    check = Check(args, "smoke" if args.smoke else "gpu")
    print(
        f"[gpu_check] {check.mode} on {check.device_name}, torch {torch.__version__}, budget "
        f"{args.budget_minutes:g} min, results in {check.out}",
        flush=True,
    )
    try:
        for index, (name, fn) in enumerate(PARTS):
            if args.only is None or name in args.only:
                check.run_part(index, name, fn)
    finally:
        if args.work_dir is None:
            shutil.rmtree(check.work, ignore_errors=True)
    failed = [p["part"] for p in check.parts if p["status"] == "failed"]
    print(
        f"[gpu_check] {len(check.parts)} parts in {time.time() - check.start:.0f} s; failed: "
        f"{', '.join(failed) or 'none'}; summary {check.summary_path}",
        flush=True,
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
