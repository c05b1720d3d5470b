"""Mutation check of the pure loss, selection and composition functions: every small change to one
of them (an operator, a comparison, a constant, a sign, a `.detach()`) must make one of the fast
math tests fail. A mutant that survives is either a missing test or an equivalent change (same
behaviour); the table says which.

    python experiments/mutation_check.py                 # every function below: 160 mutants
                                                         # (37 min with --workers 1)
    python experiments/mutation_check.py --only kd3.py   # one file
    python experiments/mutation_check.py --functions \\
        class_thresholds balanced_indices                # some functions
    python experiments/mutation_check.py --wiring        # the one-line wiring mutants of
                                                         # WIRING instead

Each mutant is written into a scratch copy of the repository and the file's math tests run there
(`python -m pytest -x -q test_all.py -k ...`); nothing in the working tree is touched. Writes
experiments/results/mutation.md (a run over a subset: mutation-subset.md; --wiring:
mutation-wiring.md). A development check: it needs pytest only, like the test suite.
"""

import argparse
import ast
import concurrent.futures
import copy
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# The pure functions of each method file and the fast tests that check them (test names, as
# pytest -k terms).
TARGETS = {
    "kd3.py": (
        [
            "alpha_schedule",
            "combine_predictions",
            "class_thresholds",
            "select_instances",
            "alignment_weights",
            "weighted_feature_alignment",
            "mix_distribution",
            "mdcl_loss",
        ],
        "alpha_schedule or combine_predictions or class_thresholds or select_instances "
        "or alignment_weights or weighted_feature_alignment or mix_distribution or mdcl_loss "
        "or projection_head",
    ),
    "hidfd.py": (
        [
            "adc_discriminator_loss",
            "adc_generator_loss",
            "blend_indicator",
            "blend_loss",
            "trans_loss",
            "update_class_frequency",
            "reg_loss",
            "inflation_factor",
            "align_loss",
        ],
        "adc_ or blend or trans_loss or class_frequency or reg_loss or inflation_factor "
        "or align_loss or feature_integration",
    ),
    "balanced_transfer.py": (
        ["class_fill", "balanced_indices", "kd_loss"],
        "balanced_indices or class_fill or kd_loss",
    ),
}
# Mutants that cannot change behaviour, each with the reason (function, mutant as the table names
# it).
EQUIVALENT = {
    ("alpha_schedule", "Gt -> GtE"): "at t = I/2 both branches give exp(0) = 1",
    (
        "class_thresholds",
        "'paper' -> 'mutant'",
    ): "a default value: any rule but 'flexmatch' is the paper's",
    (
        "select_instances",
        "'paper' -> 'mutant'",
    ): "a default value: any rule but 'flexmatch' is the paper's",
    ("mdcl_loss", "'mean' -> 'mutant'"): "a default value: any reduction but 'sum' is the mean",
    (
        "adc_discriminator_loss",
        "'standard' -> 'mutant'",
    ): "a default value: any loss but 'hinge' is the standard one",
    (
        "adc_generator_loss",
        "'standard' -> 'mutant'",
    ): "a default value: any loss but 'hinge' is the standard one",
    (
        "reg_loss",
        "'paper' -> 'mutant'",
    ): "a default value: any weights but 'normalised' are the paper's",
    ("mix_distribution", "1e-06 -> 1.5e-06"): "eps under the std: 5e-7 on variances of order 1",
    ("mix_distribution", "Add -> Sub"): "var + eps -> var - eps: the same 1e-6 scale",
    (
        "reg_loss",
        "1e-12 -> 1.5e-12",
    ): "the floor of p in log p: no probability is that small in a batch mean",
    (
        "balanced_indices",
        "GtE -> Gt",
    ): "counts never exceed the quota, so the early stop only skips sources that "
    "would keep nothing anyway",
}
SWAPS = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div,
    ast.Pow: ast.Mult,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.And: ast.Or,
    ast.Or: ast.And,
}

# Semantic mutants of the wiring between those functions: one-line changes a careful developer could
# make while moving code, each changing what a run computes (file, what it breaks, the line as
# written, the mutant). Run by --wiring against the wiring tests (WIRING_TESTS), the streaming
# composer's among them.
WIRING = [
    (
        "balanced_transfer.py",
        "the composer stops as soon as any class is full",
        "stream.complete = balanced and bool((stream.counts >= quota).all())",
        "stream.complete = balanced and bool((stream.counts >= quota).any())",
    ),
    (
        "balanced_transfer.py",
        "the screen passes draws of full classes instead of open ones",
        "passed_screen = screen_candidates(screened, stream.counts < quota, SCREEN_MARGIN)",
        "passed_screen = screen_candidates(screened, stream.counts >= quota, SCREEN_MARGIN)",
    ),
    (
        "balanced_transfer.py",
        "the candidates keep the screen's label instead of the fp32 teacher's",
        "labels[passed] = labeller.exact(x[passed])",
        "labels[passed] = screened.argmax(1)[passed]",
    ),
    (
        "balanced_transfer.py",
        "a continued stream starts its generator afresh",
        'self.generator.set_state(state["generator"])',
        "self.generator.manual_seed(0)",
    ),
    (
        "kd3.py",
        "N_T(x) from the perturbed half of [x, x^]",
        "t_logits = teacher.classifier(t_feat[:b]).float()",
        "t_logits = teacher.classifier(t_feat[b:]).float()",
    ),
    (
        "kd3.py",
        "Eq. (9) compares the teacher with itself",
        "weights = alignment_weights(F.softmax(n_s, dim=1), F.softmax(t_logits, dim=1))",
        "weights = alignment_weights(F.softmax(t_logits, dim=1), F.softmax(t_logits, dim=1))",
    ),
    (
        "kd3.py",
        "L_wfa aligns with the perturbed images' teacher features",
        'terms = {"wfa": weighted_feature_alignment(s_feat[:b], t_feat[:b], weights)}',
        'terms = {"wfa": weighted_feature_alignment(s_feat[:b], t_feat[b:], weights)}',
    ),
    (
        "kd3.py",
        "L^T_mdcl contrasts the teacher's head with the student's",
        "z_t[:b].float(), z_t[b:].float(), **kw",
        "z_t[:b].float(), z_s[b:].float(), **kw",
    ),
    (
        "kd3.py",
        "Eq. (18) drops L^T_mdcl",
        'loss = loss + alpha * (terms["mdcl_s"] + terms["mdcl_t"])',
        'loss = loss + alpha * terms["mdcl_s"]',
    ),
    (
        "kd3.py",
        "--contrastive reads the other way round",
        'positive_in_denominator=contrastive == "ntxent"',
        'positive_in_denominator=contrastive == "paper"',
    ),
    (
        "kd3.py",
        "soft labels: the teacher's outputs not softened",
        "F.softmax(t_logits / T, dim=1),",
        "F.softmax(t_logits, dim=1),",
    ),
    (
        "kd3.py",
        "one-hot labels: the student's own argmax",
        'terms["cls"] = F.cross_entropy(s_logits, t_logits.argmax(dim=1))',
        'terms["cls"] = F.cross_entropy(s_logits, s_logits.argmax(dim=1))',
    ),
    (
        "kd3.py",
        "Eq. (9)'s N_S is the teacher's prediction",
        "if shared_predictions else s_logits",
        "if shared_predictions else t_logits",
    ),
    ("kd3.py", "N_S is read only once alpha(t) = 1", "    if alpha_t > 0:", "    if alpha_t >= 1:"),
    (
        "kd3.py",
        "Eq. (3) with teacher and student swapped",
        "combined = combine_predictions(p_teacher_web, p_student_web, alpha_t)",
        "combined = combine_predictions(p_student_web, p_teacher_web, alpha_t)",
    ),
    (
        "kd3.py",
        "random selection from the first k web images only",
        "torch.randperm(len(web_x), generator=generator)[:k]",
        "torch.randperm(k, generator=generator)",
    ),
    (
        "kd3.py",
        "alpha(t) one epoch ahead",
        "alpha_schedule(epoch, total_epochs))",
        "alpha_schedule(epoch + 1, total_epochs))",
    ),
    (
        "kd3.py",
        "every epoch the same order and crops",
        "seed=self.args.seed + epoch",
        "seed=self.args.seed",
    ),
    (
        "kd3.py",
        "the optimiser holds the student but not the projection heads",
        "opt = runtime.make_optimizer([p for p in trained.parameters() if p.requires_grad], args)",
        "opt = runtime.make_optimizer([p for p in student.parameters() if p.requires_grad], args)",
    ),
    (
        "kd3.py",
        "MixDistribution mixes each image with itself",
        "return mix_distribution(x, lam, torch.randperm(b, device=x.device))",
        "return mix_distribution(x, lam, torch.arange(b, device=x.device))",
    ),
    (
        "kd3.py",
        "the teacher's projection head reads the student's features",
        "self.head_t(t_feat)",
        "self.head_t(s_feat)",
    ),
    (
        "hidfd.py",
        "the discriminator step gets G's optimiser",
        "D_trained, G, gan_teacher, x_real, y_real, t_real, opt_d, noise, **d_step",
        "D_trained, G, gan_teacher, x_real, y_real, t_real, opt_g, noise, **d_step",
    ),
    (
        "hidfd.py",
        "fake samples scored with the real labels",
        "adc_discriminator_loss(adv_r, adv_f, cls_r, cls_f, y_real, y_fake, gan_loss)",
        "adc_discriminator_loss(adv_r, adv_f, cls_r, cls_f, y_real, y_real, gan_loss)",
    ),
    (
        "hidfd.py",
        "the q-indicator compares with 1 - q",
        "blend_on = blend_indicator(p, q, blend_reading)",
        "blend_on = blend_indicator(p, 1 - q, blend_reading)",
    ),
    (
        "hidfd.py",
        "L_blend applied without its indicator",
        "d_loss = adv_d + cls_d + lambda_d * (blend_on * blend + trans)",
        "d_loss = adv_d + cls_d + lambda_d * (blend + trans)",
    ),
    (
        "hidfd.py",
        "Eq. (8) with real and fake teacher features swapped",
        "blend_loss(t_real, t_fake, d_real, d_fake),",
        "blend_loss(t_fake, t_real, d_real, d_fake),",
    ),
    (
        "hidfd.py",
        "L_reg ignores the class frequencies",
        "reg = reg_loss(t_logits, class_freq.n, weights=reg_weights)",
        "reg = reg_loss(t_logits, torch.ones_like(class_freq.n), weights=reg_weights)",
    ),
    (
        "hidfd.py",
        "L_reg sends no gradient to G",
        "g_loss = adv_g + cls_g + lambda_g * reg",
        "g_loss = adv_g + cls_g + lambda_g * reg.detach()",
    ),
    (
        "hidfd.py",
        "the class frequencies are never updated",
        "class_freq.update(runtime.all_reduce_sum(counts.clone()))",
        "runtime.all_reduce_sum(counts.clone())",
    ),
    (
        "hidfd.py",
        "G's samples scored against class 0",
        "adv_g, cls_g = adc_generator_loss(adv_f.float(), cls_f.float(), y_fake, gan_loss)",
        "adv_g, cls_g = adc_generator_loss(adv_f.float(), cls_f.float(), torch.zeros_like(y_fake), "
        "gan_loss)",
    ),
    (
        "hidfd.py",
        "G conditioned on other labels than it is scored on",
        "x_fake = G_trained(z, y_fake)",
        "x_fake = G_trained(z, y_fake.flip(0))",
    ),
    (
        "hidfd.py",
        "the teacher sees [-1, 1] images unmapped",
        "return (to_unit_range(x) - self.mean) / self.std",
        "return (x - self.mean) / self.std",
    ),
    (
        "hidfd.py",
        "D_c is not inflated N times",
        "[torch.arange(n_c).repeat(N), n_c + torch.arange(n_s)]",
        "[torch.arange(n_c), n_c + torch.arange(n_s)]",
    ),
    (
        "hidfd.py",
        "the student agreement compares the student with itself",
        '"teacher_agree": (s_logits.argmax(1) == teacher.classifier(t_feat).argmax(1))'
        ".float().mean()",
        '"teacher_agree": (s_logits.argmax(1) == s_logits.argmax(1)).float().mean()',
    ),
    (
        "hidfd.py",
        "the distillation stage ignores --milestones",
        "MultiStepLR(opt, args.milestones, gamma=0.1)",
        "MultiStepLR(opt, (), gamma=0.1)",
    ),
    (
        "balanced_transfer.py",
        "kd_loss with student and teacher logits swapped",
        "loss = kd_loss(trained(x).float(), t_logits, tau)",
        "loss = kd_loss(t_logits, trained(x).float(), tau)",
    ),
    (
        "balanced_transfer.py",
        "Eq. (2) at temperature 1",
        "loss = kd_loss(trained(x).float(), t_logits, tau)",
        "loss = kd_loss(trained(x).float(), t_logits, 1.0)",
    ),
    (
        "balanced_transfer.py",
        "the same augmentation at every step",
        "augmented = augment(x, aug_gen)",
        "augmented = augment(x, torch.Generator(x.device).manual_seed(0))",
    ),
    (
        "balanced_transfer.py",
        "with-originals holds every composed image twice",
        "x, cached_logits = torch.cat([x, augmented]), None",
        "x, cached_logits = torch.cat([x, x]), None",
    ),
    (
        "balanced_transfer.py",
        "the student sees unnormalised images",
        "    x = normalize(x)\n",
        "    x = x\n",
    ),
    (
        "balanced_transfer.py",
        "the last partial batch of an epoch dropped",
        "steps = -(-per_epoch // args.batch_size)",
        "steps = per_epoch // args.batch_size",
    ),
    (
        "kd3.py",
        "milestones take effect one epoch late",
        "MultiStepLR(opt, args.milestones, gamma=0.1)",
        "MultiStepLR(opt, [m + 1 for m in args.milestones], gamma=0.1)",
    ),
    (
        "runtime.py",
        "the lr schedule never moves",
        "self.lr_schedule.step()  # the next epoch's lr",
        "self.lr_schedule.get_last_lr()  # the next epoch's lr",
    ),
    (
        "runtime.py",
        "a resumed run starts its lr schedule again",
        'self.save["lr_schedule"] = lr_schedule',
        'self.extra["lr_schedule_kept"] = False',
    ),
    (
        "runtime.py",
        "the non-finite stop misses inf",
        "bad = {k: v for k, v in values.items() if not math.isfinite(v)}",
        "bad = {k: v for k, v in values.items() if math.isnan(v)}",
    ),
    (
        "runtime.py",
        "prediction in train mode",
        "    model.eval()\n    logits = [",
        "    model.train()\n    logits = [",
    ),
    (
        "data.py",
        "every source of a mix drawn with one seed",
        "name, split, root, n=count, shape=(channels, size, size), seed=seed + i",
        "name, split, root, n=count, shape=(channels, size, size), seed=seed",
    ),
    (
        "data.py",
        "every pass over a loader in the same order",
        "order = torch.randperm(n, generator=self.order_gen) if self.shuffle else torch.arange(n)",
        "order = torch.randperm(n, generator=torch.Generator().manual_seed(0)) "
        "if self.shuffle else torch.arange(n)",
    ),
]
# Wiring mutants that cannot change behaviour, each with the reason (keyed by the mutant's
# description).
WIRING_EQUIVALENT = {}
WIRING_TESTS = (
    "matches_its_reference or sends_gradient_where or reads_the_student_before or "
    "milestones_act or non_finite_stop_catches or mean_and_std_are or reshuffles_and_redraws or "
    "drawn_independently or "
    "eval_mode_and_restores or gan_loop_trains or kd3_loop_applies or student_loops_of or "
    "golden_trajectory or resumed_run_continues or the_screen_changes or composer_stops_only or "
    "continued_stream_equals"
)


def mutation_sites(function):
    """Every (node, description, apply) of one function's AST that one mutant may change."""
    sites = []
    docstring = ast.get_docstring(function) is not None and function.body[0].value
    for node in ast.walk(function):
        if isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in SWAPS:
            sites.append(
                (node, f"{type(node.op).__name__} -> {SWAPS[type(node.op)].__name__}", "op")
            )
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in SWAPS:
                    sites.append(
                        (node, f"{type(op).__name__} -> {SWAPS[type(op)].__name__}", ("cmp", i))
                    )
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            sites.append((node, f"drop {type(node.op).__name__}", "unary"))
        elif isinstance(node, ast.Constant) and node is not docstring:
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float, str)):
                continue
            if isinstance(node.value, str):
                sites.append((node, f"{node.value!r} -> 'mutant'", "const"))
            else:
                sites.append((node, f"{node.value!r} -> {_changed(node.value)!r}", "const"))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "detach"
        ):
            sites.append((node, "drop .detach()", "detach"))
    return sites


def _changed(value):
    return value + 1 if isinstance(value, int) else (value * 1.5 if value else 1.0)


class Mutate(ast.NodeTransformer):
    """Apply the k-th site of the function `name`."""

    def __init__(self, name, k):
        self.name, self.k, self.description = name, k, None

    def visit_FunctionDef(self, node):
        if node.name != self.name:
            return node
        target, self.description, kind = mutation_sites(node)[self.k]
        replacement = _apply(target, kind)
        return _replace(node, target, replacement)


def _apply(node, kind):
    if kind == "op":
        new = copy.copy(node)
        new.op = SWAPS[type(node.op)]()
        return new
    if isinstance(kind, tuple):
        new = copy.copy(node)
        new.ops = list(node.ops)
        new.ops[kind[1]] = SWAPS[type(node.ops[kind[1]])]()
        return new
    if kind == "unary":
        return node.operand
    if kind == "const":
        return ast.Constant("mutant" if isinstance(node.value, str) else _changed(node.value))
    return node.func.value  # drop .detach()


def _replace(tree, target, replacement):
    class Swap(ast.NodeTransformer):
        def generic_visit(self, node):
            if node is target:
                return replacement
            return super().generic_visit(node)

    return Swap().visit(tree)


def mutants(filename, functions):
    source = open(os.path.join(REPO, filename)).read()
    tree = ast.parse(source)
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in functions):
        for k in range(len(mutation_sites(fn))):
            mutate = Mutate(fn.name, k)
            mutated = ast.unparse(ast.fix_missing_locations(mutate.visit(ast.parse(source))))
            yield fn.name, mutate.description, mutated


def run_mutant(job):
    """Write the mutant into this worker's scratch copy and run the file's tests; True if a test
    failed."""
    scratch, filename, tests, mutated = job
    with open(os.path.join(scratch, filename), "w") as f:
        f.write(mutated)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-x",
            "-q",
            "-p",
            "no:cacheprovider",
            "test_all.py",
            "-k",
            tests,
        ],
        cwd=scratch,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    shutil.copy(os.path.join(REPO, filename), os.path.join(scratch, filename))  # the original back
    return proc.returncode != 0


def run_lanes(jobs, workers):
    """run_mutant over `jobs` with one scratch copy per worker: each worker takes every workers-th
    job, in order. Returns, per job, whether a test failed."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        lanes = [
            pool.submit(lambda lane: [run_mutant(j) for j in jobs[lane::workers]], w)
            for w in range(workers)
        ]
        killed = [None] * len(jobs)
        for w, lane in enumerate(lanes):
            killed[w::workers] = lane.result()
    return killed


def scratch_copies(workers):
    """One scratch copy per worker of the repository's modules and tests (what test_all.py
    imports)."""
    scratches = [tempfile.mkdtemp(prefix="mutants-") for _ in range(workers)]
    for scratch in scratches:
        for f in os.listdir(REPO):
            if f.endswith(".py"):
                shutil.copy(os.path.join(REPO, f), scratch)
    return scratches


def wiring_check(workers):
    """Every mutant of WIRING against WIRING_TESTS; writes
    experiments/results/mutation-wiring.md."""
    start, scratches = time.time(), scratch_copies(workers)
    for filename in sorted({w[0] for w in WIRING}):
        if run_mutant(
            (scratches[0], filename, WIRING_TESTS, open(os.path.join(REPO, filename)).read())
        ):
            sys.exit(f"the wiring tests fail without any mutant ({filename}): fix them first")
    found, stale = [], []
    for filename, description, line, mutant in WIRING:
        source = open(os.path.join(REPO, filename)).read()
        if source.count(line) != 1:  # the code moved: the mutant must be written again
            stale.append((filename, description))
            continue
        found.append((filename, description, source.replace(line, mutant)))
    killed = run_lanes(
        [(scratches[i % workers], f, WIRING_TESTS, m) for i, (f, _, m) in enumerate(found)], workers
    )
    for scratch in scratches:
        shutil.rmtree(scratch)
    total, dead = len(found), sum(killed)
    equivalent = sum(1 for (_, d, _), k in zip(found, killed) if not k and d in WIRING_EQUIVALENT)
    lines = [
        f"Wiring mutation check: {dead} of {total} mutants killed "
        f"({100 * dead / max(total, 1):.1f}%); "
        f"{equivalent} of the survivors are equivalent, so {dead} of {total - equivalent} "
        f"behaviour-changing mutants are killed ({100 * dead / max(total - equivalent, 1):.1f}%). "
        f"{time.time() - start:.0f} s, {workers} worker(s).",
        "",
        "| file | mutant | killed? |",
        "|---|---|---|",
    ]
    lines += [
        f"| {f} | {d} | {'yes' if k else WIRING_EQUIVALENT.get(d, '**no: needs a test**')} |"
        for (f, d, _), k in zip(found, killed)
    ]
    if stale:
        lines += [
            "",
            "Not run (the line is no longer in the file once): "
            + "; ".join(f"{f}: {d}" for f, d in stale),
        ]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "mutation-wiring.md"), "w") as f:
        f.write(text)
    print(text)


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--only", nargs="*", default=list(TARGETS), choices=list(TARGETS), help="files to mutate"
    )
    p.add_argument(
        "--functions",
        nargs="*",
        default=None,
        metavar="NAME",
        help="mutate only these functions (default: every function in TARGETS)",
    )
    p.add_argument(
        "--workers", type=int, default=2, help="mutants tested at once (one CPU core each)"
    )
    p.add_argument("--wiring", action="store_true", help="run the wiring mutants of WIRING instead")
    args = p.parse_args()
    if args.wiring:
        return wiring_check(args.workers)
    known = {fn for functions, _ in TARGETS.values() for fn in functions}
    unknown = sorted(set(args.functions or ()) - known)
    if unknown:
        p.error(
            f"--functions: {', '.join(unknown)} not in TARGETS "
            f"(choose from {', '.join(sorted(known))})"
        )
    if args.functions:  # only the files that hold the named functions
        args.only = [f for f in args.only if set(TARGETS[f][0]) & set(args.functions)]
    scratches = scratch_copies(args.workers)
    start, rows = time.time(), []
    for (
        filename
    ) in args.only:  # the unmutated file must pass its tests, or every mutant would look killed
        source = open(os.path.join(REPO, filename)).read()
        if run_mutant(
            (scratches[0], filename, TARGETS[filename][1], ast.unparse(ast.parse(source)))
        ):
            sys.exit(f"the tests of {filename} fail without any mutant: fix them first")
    for filename in args.only:
        functions, tests = TARGETS[filename]
        functions = [fn for fn in functions if not args.functions or fn in args.functions]
        found = list(mutants(filename, functions))
        jobs = [
            (scratches[i % args.workers], filename, tests, m) for i, (_, _, m) in enumerate(found)
        ]
        killed = run_lanes(jobs, args.workers)
        for (function, description, _), dead in zip(found, killed):
            rows.append((filename, function, description, dead))
        alive = sum(1 for r in rows if r[0] == filename and not r[3])
        print(
            f"{filename}: {len(found)} mutants, {len(found) - alive} killed, {alive} survived "
            f"({time.time() - start:.0f} s so far)",
            flush=True,
        )
    for scratch in scratches:
        shutil.rmtree(scratch)
    total, dead = len(rows), sum(r[3] for r in rows)
    equivalent = sum(1 for _, fn, d, k in rows if not k and (fn, d) in EQUIVALENT)
    lines = [
        f"Mutation check: {dead} of {total} mutants killed ({100 * dead / max(total, 1):.1f}%); "
        f"{equivalent} of the survivors are equivalent, so {dead} of {total - equivalent} "
        f"behaviour-changing mutants are killed ({100 * dead / max(total - equivalent, 1):.1f}%). "
        f"{time.time() - start:.0f} s, {args.workers} worker(s). "
        f"Functions: {', '.join(args.functions) if args.functions else 'all'}.",
        "",
        "Survivors:",
        "",
        "| file | function | mutant | equivalent? |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {f} | `{fn}` | {d} | {EQUIVALENT.get((fn, d), '**no: needs a test**')} |"
        for f, fn, d, k in rows
        if not k
    ]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    partial = args.functions or set(args.only) != set(
        TARGETS
    )  # a subset never replaces the full run's table
    with open(
        os.path.join(HERE, "results", "mutation-subset.md" if partial else "mutation.md"), "w"
    ) as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
