"""Mutation check of the pure loss, selection and composition functions: every small change to one of them (an
operator, a comparison, a constant, a sign, a `.detach()`) must make one of the fast math tests fail. A mutant
that survives is either a missing test or an equivalent change (same behaviour); the table says which.

    python experiments/mutation_check.py                 # every function below: 160 mutants (37 min with --workers 1)
    python experiments/mutation_check.py --only kd3.py   # one file
    python experiments/mutation_check.py --functions class_thresholds balanced_indices   # some functions

Each mutant is written into a scratch copy of the repository and the file's math tests run there
(`python -m pytest -x -q test_all.py -k ...`); nothing in the working tree is touched. Writes
experiments/results/mutation.md (a run over a subset: mutation-subset.md). A development check: it needs pytest
only, like the test suite.
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

# The pure functions of each method file and the fast tests that check them (test names, as pytest -k terms).
TARGETS = {
    "kd3.py": (["alpha_schedule", "combine_predictions", "class_thresholds", "select_instances", "alignment_weights",
                "weighted_feature_alignment", "mix_distribution", "mdcl_loss"],
               "alpha_schedule or combine_predictions or class_thresholds or select_instances or alignment_weights "
               "or weighted_feature_alignment or mix_distribution or mdcl_loss or projection_head"),
    "hidfd.py": (["adc_discriminator_loss", "adc_generator_loss", "blend_indicator", "blend_loss", "trans_loss",
                  "update_class_frequency", "reg_loss", "inflation_factor", "align_loss"],
                 "adc_ or blend or trans_loss or class_frequency or reg_loss or inflation_factor or align_loss or "
                 "feature_integration"),
    "balanced_transfer.py": (["class_fill", "balanced_indices", "kd_loss"],
                             "balanced_indices or class_fill or kd_loss"),
}
# Mutants that cannot change behaviour, each with the reason (function, mutant as the table names it).
EQUIVALENT = {
    ("alpha_schedule", "Gt -> GtE"): "at t = I/2 both branches give exp(0) = 1",
    ("class_thresholds", "'paper' -> 'mutant'"): "a default value: any rule but 'flexmatch' is the paper's",
    ("select_instances", "'paper' -> 'mutant'"): "a default value: any rule but 'flexmatch' is the paper's",
    ("mdcl_loss", "'mean' -> 'mutant'"): "a default value: any reduction but 'sum' is the mean",
    ("adc_discriminator_loss", "'standard' -> 'mutant'"): "a default value: any loss but 'hinge' is the standard one",
    ("adc_generator_loss", "'standard' -> 'mutant'"): "a default value: any loss but 'hinge' is the standard one",
    ("reg_loss", "'paper' -> 'mutant'"): "a default value: any weights but 'normalised' are the paper's",
    ("mix_distribution", "1e-06 -> 1.5e-06"): "eps under the std: 5e-7 on variances of order 1",
    ("mix_distribution", "Add -> Sub"): "var + eps -> var - eps: the same 1e-6 scale",
    ("reg_loss", "1e-12 -> 1.5e-12"): "the floor of p in log p: no probability is that small in a batch mean",
    ("balanced_indices", "GtE -> Gt"): "counts never exceed the quota, so the early stop only skips sources that "
                                        "would keep nothing anyway",
}
SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
         ast.Pow: ast.Mult, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Eq: ast.NotEq,
         ast.NotEq: ast.Eq, ast.And: ast.Or, ast.Or: ast.And}


def mutation_sites(function):
    """Every (node, description, apply) of one function's AST that one mutant may change."""
    sites = []
    docstring = ast.get_docstring(function) is not None and function.body[0].value
    for node in ast.walk(function):
        if isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in SWAPS:
            sites.append((node, f"{type(node.op).__name__} -> {SWAPS[type(node.op)].__name__}", "op"))
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in SWAPS:
                    sites.append((node, f"{type(op).__name__} -> {SWAPS[type(op)].__name__}", ("cmp", i)))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            sites.append((node, f"drop {type(node.op).__name__}", "unary"))
        elif isinstance(node, ast.Constant) and node is not docstring:
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float, str)):
                continue
            if isinstance(node.value, str):
                sites.append((node, f"{node.value!r} -> 'mutant'", "const"))
            else:
                sites.append((node, f"{node.value!r} -> {_changed(node.value)!r}", "const"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "detach":
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
    """Write the mutant into this worker's scratch copy and run the file's tests; True if a test failed."""
    scratch, filename, tests, mutated = job
    with open(os.path.join(scratch, filename), "w") as f:
        f.write(mutated)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "test_all.py",
                           "-k", tests], cwd=scratch, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    shutil.copy(os.path.join(REPO, filename), os.path.join(scratch, filename))  # the original back
    return proc.returncode != 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=list(TARGETS), choices=list(TARGETS), help="files to mutate")
    p.add_argument("--functions", nargs="*", default=None, metavar="NAME",
                   help="mutate only these functions (default: every function in TARGETS)")
    p.add_argument("--workers", type=int, default=2, help="mutants tested at once (one CPU core each)")
    args = p.parse_args()
    known = {fn for functions, _ in TARGETS.values() for fn in functions}
    unknown = sorted(set(args.functions or ()) - known)
    if unknown:
        p.error(f"--functions: {', '.join(unknown)} not in TARGETS (choose from {', '.join(sorted(known))})")
    if args.functions:  # only the files that hold the named functions
        args.only = [f for f in args.only if set(TARGETS[f][0]) & set(args.functions)]
    scratches = [tempfile.mkdtemp(prefix="mutants-") for _ in range(args.workers)]
    for scratch in scratches:  # the repository's modules and tests (what test_all.py imports)
        for f in os.listdir(REPO):
            if f.endswith(".py"):
                shutil.copy(os.path.join(REPO, f), scratch)
    start, rows = time.time(), []
    for filename in args.only:  # the unmutated file must pass its tests, or every mutant would look killed
        source = open(os.path.join(REPO, filename)).read()
        if run_mutant((scratches[0], filename, TARGETS[filename][1], ast.unparse(ast.parse(source)))):
            sys.exit(f"the tests of {filename} fail without any mutant: fix them first")
    for filename in args.only:
        functions, tests = TARGETS[filename]
        functions = [fn for fn in functions if not args.functions or fn in args.functions]
        found = list(mutants(filename, functions))
        jobs = [(scratches[i % args.workers], filename, tests, m) for i, (_, _, m) in enumerate(found)]
        # one scratch copy per worker: each worker takes every workers-th job, in order
        with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
            lanes = [pool.submit(lambda lane: [run_mutant(j) for j in jobs[lane::args.workers]], w)
                     for w in range(args.workers)]
            killed = [None] * len(jobs)
            for w, lane in enumerate(lanes):
                killed[w::args.workers] = lane.result()
        for (function, description, _), dead in zip(found, killed):
            rows.append((filename, function, description, dead))
        alive = sum(1 for r in rows if r[0] == filename and not r[3])
        print(f"{filename}: {len(found)} mutants, {len(found) - alive} killed, {alive} survived "
              f"({time.time() - start:.0f} s so far)", flush=True)
    for scratch in scratches:
        shutil.rmtree(scratch)
    total, dead = len(rows), sum(r[3] for r in rows)
    equivalent = sum(1 for _, fn, d, k in rows if not k and (fn, d) in EQUIVALENT)
    lines = [f"Mutation check: {dead} of {total} mutants killed ({100 * dead / max(total, 1):.1f}%); {equivalent} of "
             f"the survivors are equivalent, so {dead} of {total - equivalent} behaviour-changing mutants are killed "
             f"({100 * dead / max(total - equivalent, 1):.1f}%). {time.time() - start:.0f} s, {args.workers} "
             f"worker(s). Functions: {', '.join(args.functions) if args.functions else 'all'}.", "", "Survivors:", "",
             "| file | function | mutant | equivalent? |", "|---|---|---|---|"]
    lines += [f"| {f} | `{fn}` | {d} | {EQUIVALENT.get((fn, d), '**no: needs a test**')} |"
              for f, fn, d, k in rows if not k]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    partial = args.functions or set(args.only) != set(TARGETS)  # a subset never replaces the full run's table
    with open(os.path.join(HERE, "results", "mutation-subset.md" if partial else "mutation.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
