"""How fast Algorithm 1 draws uniform noise, and what the bf16 screen costs in exactness.

Three measurements for one teacher, on the CPU threads torch is given (printed, and kept in the
JSON):

1. draws/s of the composer, side by side in alternating windows: the earlier path (noise drawn as
   floats and rounded, the fp32 teacher on every draw) against the current one (noise drawn on the
   256 stored levels, the bf16 screen, the fp32 teacher on the screen's candidates only), in the
   phase a long composition spends nearly all its draws in (every class full but the two the teacher
   gives least) and with every class open;
2. the screen against the fp32 teacher on --draws uniform draws: argmax agreement, the largest logit
   error, and the misses (a draw whose fp32 class the screen would not pass on, for any set of open
   classes);
3. the teacher-predicted histogram of those draws and the draws each class would need for a quota of
   6,000.

    python experiments/compose_speed.py   # the tables' teacher, 2 threads
    python experiments/compose_speed.py \\
        --teacher checkpoints/fashionmnist-lenet5-seed1.pt --skip-speed

Writes experiments/results/compose_speed/<teacher file name>.json and rewrites compose_speed.md from
every JSON there.
"""

import argparse
import glob
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import runner  # noqa: E402

import balanced_transfer as bt  # noqa: E402
import data  # noqa: E402
import runtime  # noqa: E402
import teacher as teacher_lib  # noqa: E402

OUT = os.path.join(runner.RESULTS, "compose_speed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=runner.HelpFormatter)
    p.add_argument("--teacher", default=runner.TEACHER, help="the Fashion-MNIST teacher checkpoint")
    p.add_argument(
        "--draws", type=int, default=1_000_000, help="uniform draws for the screen's agreement"
    )
    p.add_argument("--draw-batch", type=int, default=8192, help="draws per teacher forward")
    p.add_argument("--windows", type=int, default=3, help="timing windows per path")
    p.add_argument("--window-batches", type=int, default=10, help="draw batches per timing window")
    p.add_argument(
        "--quota", type=int, default=6000, help="the quota the 'draws needed' column is for"
    )
    p.add_argument("--skip-speed", action="store_true", help="only the agreement and the histogram")
    p.add_argument(
        "--report-only", action="store_true", help="rewrite compose_speed.md from the kept JSON"
    )
    args = p.parse_args(argv)
    if min(args.draws, args.draw_batch, args.windows, args.window_batches, args.quota) < 1:
        p.error("--draws, --draw-batch, --windows, --window-batches and --quota must be >= 1")
    if not args.report_only and not os.path.isfile(args.teacher):
        sys.exit(f"error: --teacher {args.teacher} does not exist — train it with teacher.py first")
    return args


def composer_speed(teacher, meta, args):
    """draws/s of the earlier and the current composer path, alternating windows (other load hits
    both)."""
    shape, c, b = (
        (meta["channels"], meta["size"], meta["size"]),
        meta["num_classes"],
        args.draw_batch,
    )
    gen = torch.Generator().manual_seed(0)
    earlier = bt.Labeller(teacher, meta["mean"], meta["std"], b, screen=False)
    current = bt.Labeller(teacher, meta["mean"], meta["std"], b, screen=True)
    rare = torch.bincount(
        earlier.exact(bt.draw_noise(b, shape, "uniform", gen)), minlength=c
    ).argsort()[:2]
    quota = 2**62
    late = torch.full((c,), quota, dtype=torch.int64)
    late[rare] = 0
    paths = {
        "earlier": (earlier, lambda: bt.to_uint8(bt.random_noise(b, shape, "uniform", gen)), late),
        "current": (current, lambda: bt.draw_noise(b, shape, "uniform", gen), late),
        "current, every class open": (
            current,
            lambda: bt.draw_noise(b, shape, "uniform", gen),
            torch.zeros(c, dtype=torch.int64),
        ),
    }
    rates = {name: [] for name in paths}
    for _ in range(args.windows):
        for name, (labeller, draw, counts) in paths.items():
            stream = bt.NoiseStream(gen, c)
            stream.counts = counts.clone()
            start = time.perf_counter()
            bt.compose_generated(stream, draw, labeller, quota, args.window_batches * b)
            rates[name].append(stream.made / (time.perf_counter() - start))
            print(f"  {name}: {rates[name][-1]:,.0f} draws/s", flush=True)
    return {
        "open_classes_late": rare.tolist(),
        "draws_per_s": {k: max(v) for k, v in rates.items()},
        "windows": rates,
        "speedup": max(rates["current"]) / max(rates["earlier"]),
    }


@torch.inference_mode()
def screen_agreement(teacher, meta, args):
    """The screen against the fp32 teacher on args.draws uniform draws (seed 0), and the fp32
    histogram."""
    shape, c, b = (
        (meta["channels"], meta["size"], meta["size"]),
        meta["num_classes"],
        args.draw_batch,
    )
    labeller = bt.Labeller(teacher, meta["mean"], meta["std"], b, screen=True)
    gen = torch.Generator().manual_seed(0)
    made, agree, worst, misses = 0, 0, 0.0, torch.zeros(c, dtype=torch.int64)
    hist = torch.zeros(c, dtype=torch.int64)
    start = time.time()
    while made < args.draws:
        x = bt.draw_noise(b, shape, "uniform", gen)
        exact = runtime.predict(teacher, x, meta["mean"], meta["std"], b)  # (B, C) fp32
        screened = labeller.screened_logits(x)  # (B, C)
        labels = exact.argmax(1)
        agree += int((screened.argmax(1) == labels).sum())
        worst = max(worst, float((screened - exact).abs().max()))
        for k in range(
            c
        ):  # a miss for open classes {k}: the draw is class k, the screen does not pass it
            open_k = torch.arange(c) == k
            misses[k] += int(
                ((labels == k) & ~bt.screen_candidates(screened, open_k, bt.SCREEN_MARGIN)).sum()
            )
        hist += torch.bincount(labels, minlength=c)
        made += b
        if made % (b * 20) == 0:
            print(
                f"  agreement: {made:,} of {args.draws:,} draws, {time.time() - start:.0f} s",
                flush=True,
            )
    share = hist.double() / made
    need = [round(args.quota / float(p)) if p > 0 else None for p in share]
    return {
        "draws": made,
        "agreement": agree / made,
        "max_logit_error": worst,
        "margin": bt.SCREEN_MARGIN,
        "misses_per_class": misses.tolist(),
        "histogram": hist.tolist(),
        "draws_for_quota": need,
        "quota": args.quota,
        "seconds": round(time.time() - start, 1),
    }


def write_table():
    rows = []
    for path in sorted(glob.glob(os.path.join(OUT, "*.json"))):
        r = json.load(open(path))
        a, s = r["agreement"], r.get("speed")
        slowest = max((n for n in a["draws_for_quota"] if n), default=None)
        speed = (
            "—"
            if not s
            else f"{s['draws_per_s']['earlier']:,.0f} → {s['draws_per_s']['current']:,.0f} "
            f"({s['speedup']:.1f}×; every class open: "
            f"{s['draws_per_s']['current, every class open']:,.0f})"
        )
        top = max(a["histogram"]) / a["draws"]
        rows.append(
            f"| {r['teacher']} (`{r['teacher_sha256'][:12]}`) | {r['teacher_acc']:.2f} | "
            f"{r['threads']} "
            f"| {speed} | {100 * a['agreement']:.2f}% | {a['max_logit_error']:.3f} | "
            f"{sum(a['misses_per_class'])} | {100 * top:.1f}% | "
            f"{' / '.join(str(h) for h in a['histogram'])} | {slowest:,} |"
        )
    text = (
        "# Composer speed and the bf16 screen\n\nWritten by `experiments/compose_speed.py`. "
        "Draws/s: the earlier composer (float noise rounded, fp32 teacher on every draw) → the "
        "current one (noise on the 256 levels, bf16 screen, fp32 on candidates), every class full "
        "but two, best of the windows. "
        "Agreement, largest logit error and misses (a draw the screen would wrongly drop, margin "
        f"{bt.SCREEN_MARGIN}) on the first uniform draws of seed 0; the histogram of those draws "
        "(fp32 argmax, classes 0-9) and the draws the slowest class needs for its quota.\n\n"
        "| teacher | test acc | threads | draws/s | agreement | max logit error | misses "
        "| largest class | histogram of the draws | draws to fill every quota of 6,000 |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    with open(os.path.join(runner.RESULTS, "compose_speed.md"), "w") as f:
        f.write(text)
    print(text)


def main(argv=None):
    args = parse_args(argv)
    if args.report_only:
        return write_table()
    meta = data.DATASETS["fashionmnist"]
    model, ckpt = teacher_lib.read_teacher_file(args.teacher)
    model = runtime.prepare_model(model, torch.device("cpu")).eval().requires_grad_(False)
    test_x, test_y = data.load_dataset("fashionmnist", "test", runner.DATA_ROOT)
    result = {
        "teacher": os.path.basename(args.teacher),
        "teacher_sha256": teacher_lib.file_sha256(args.teacher),
        "teacher_acc": runtime.evaluate(model, test_x, test_y, meta["mean"], meta["std"]),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(
        f"teacher {args.teacher}: {result['teacher_acc']:.2f}%; {result['threads']} threads",
        flush=True,
    )
    os.makedirs(OUT, exist_ok=True)
    out = os.path.join(OUT, os.path.splitext(result["teacher"])[0] + ".json")
    if not args.skip_speed:
        result["speed"] = composer_speed(model, meta, args)
    result["agreement"] = screen_agreement(model, meta, args)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    write_table()


if __name__ == "__main__":
    main()
