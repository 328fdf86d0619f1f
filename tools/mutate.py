"""Mutation testing for the numerical core: plant small bugs, check that the tests notice.

    python tools/mutate.py                     # every target module (see TARGETS), all mutants
    python tools/mutate.py moe/optim.py        # only these files (or folders)
    python tools/mutate.py --list              # print the mutants, run nothing
    python tools/mutate.py --jobs 2 --shard 1/4
    python tools/mutate.py --planted           # the hand-planted bugs of tools/planted_bugs.toml

Each mutant is one AST-level change to one file: an arithmetic, comparison, boolean or
augmented-assignment operator swapped, a number or boolean constant changed, a condition
negated, or one statement (a `raise`, a bare call, an augmented assignment) deleted. The
mutated file is written into a private copy of the checkout (never into the checkout
itself), and the tests that cover that module run there with `-x` and a timeout. A mutant
is *killed* when that run fails (a timeout counts as killed) and *survives* when it passes.

Not mutated, because they are not behaviour: docstrings and other string constants,
f-strings, the arguments of a `raise` (the error message), type annotations, `__all__`, and
lines marked `# pragma: no mutate`.

A survivor is either an equivalent mutant (no test can tell it from the original; listed
with its reason in tools/mutation_equivalents.toml, keyed by the mutant's stable id) or a
gap in the suite. The summary prints both and the surviving percentage per module; the
figures of the last full run are in docs/TESTING.md. The exit status is 1 when any
unexplained mutant survives or the surviving fraction exceeds --max-survival (0.10).

Results are cached in .mutation/cache.json under a hash of the mutated file and of every
file under moe/ and tests/, so an interrupted run resumes where it stopped; --fresh ignores
the cache. Runs are CPU-heavy: on a shared machine run them under `flock -s`.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures as cf
import fnmatch
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Which tests cover which module, fastest and most sensitive first (-x stops at the first
# failure). A glob covers every file a folder gains later; the first matching entry wins.
TARGETS: list[tuple[str, list[str]]] = [
    ("moe/routing/*.py", ["tests/routing", "tests/test_hierarchical.py", "tests/test_layer.py",
                          "tests/bindings/test_kernels_gates.py"]),
    ("moe/bindings/reference.py", ["tests/test_dispatch.py", "tests/bindings", "tests/test_optim.py"]),
    ("moe/optim.py", ["tests/test_optim.py", "tests/model/test_noise_schedule.py", "tests/model/test_sparse_state.py",
                      "tests/experts", "tests/test_transfer.py", "tests/model/test_resume.py"]),
    ("moe/checkpoint.py", ["tests/model/test_checkpoint.py", "tests/model/test_checkpoint_digest.py",
                           "tests/model/test_resume.py"]),
    ("moe/sharding/wire.py", ["tests/sharding/test_wire*.py", "tests/sharding/test_shard_units.py"]),
    ("moe/tasks/losses.py", ["tests/tasks/test_task_losses.py", "tests/model/test_model_gradients.py"]),
]
EQUIVALENTS = ROOT / "tools" / "mutation_equivalents.toml"
PLANTED = ROOT / "tools" / "planted_bugs.toml"
CACHE = ROOT / ".mutation" / "cache.json"
NO_MUTATE = "pragma: no mutate"

_SWAP_BINOP = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div, ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult,
    ast.LShift: ast.RShift, ast.RShift: ast.LShift, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd,
    ast.MatMult: ast.Mult,
}
_SWAP_CMP = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}
_OP_TEXT = {
    ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
    ast.Pow: "**", ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&", ast.BitOr: "|",
    ast.MatMult: "@", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==",
    ast.NotEq: "!=", ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not",
    ast.And: "and", ast.Or: "or",
}


@dataclass(frozen=True)
class Mutant:
    path: str  # relative to ROOT
    line: int
    qualname: str  # enclosing function/class, "<module>" at top level
    what: str  # e.g. "a + b -> a - b"
    start: tuple[int, int]  # (line, byte column) of the replaced span
    end: tuple[int, int]
    replacement: str
    ordinal: int = 0  # among mutants with the same (path, qualname, what)

    @property
    def id(self) -> str:
        """Stable across unrelated edits: no line number, only where and what."""
        return f"{self.path}::{self.qualname}::{self.what}" + (f" #{self.ordinal}" if self.ordinal else "")

    def apply(self, source: bytes) -> bytes:
        lines = source.splitlines(keepends=True)
        (l0, c0), (l1, c1) = self.start, self.end
        head = b"".join(lines[: l0 - 1]) + lines[l0 - 1][:c0]
        tail = lines[l1 - 1][c1:] + b"".join(lines[l1:])
        return head + self.replacement.encode() + tail


def _short(text: str, n: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


class _Finder(ast.NodeVisitor):
    """Walks one module and collects its mutants."""

    def __init__(self, path: str, source: bytes) -> None:
        self.path, self.lines = path, source.splitlines()
        self.scope: list[str] = []
        self.found: list[Mutant] = []
        self.skip_lines = {i + 1 for i, line in enumerate(self.lines) if NO_MUTATE.encode() in line}

    # ------------------------------------------------------------------ helpers
    def _segment(self, node: ast.AST) -> str:
        l0, c0, l1, c1 = node.lineno, node.col_offset, node.end_lineno, node.end_col_offset
        if l0 == l1:
            return self.lines[l0 - 1][c0:c1].decode()
        parts = [self.lines[l0 - 1][c0:]] + self.lines[l0 : l1 - 1] + [self.lines[l1 - 1][:c1]]
        return b"\n".join(parts).decode()

    def _add(self, node: ast.AST, what: str, replacement: str) -> None:
        if node.lineno in self.skip_lines:
            return
        self.found.append(Mutant(
            self.path, node.lineno, ".".join(self.scope) or "<module>", what,
            (node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset), replacement))

    def _expr(self, node: ast.expr, new: ast.expr, label: str) -> None:
        text = ast.unparse(new)
        self._add(node, f"{label}: {_short(ast.unparse(node))} -> {_short(text)}", f"({text})")

    # ------------------------------------------------------------------ scopes and skips
    def _scoped(self, node) -> None:
        self.scope.append(node.name)
        for dec in node.decorator_list:
            self.visit(dec)
        if isinstance(node, ast.ClassDef):
            body = node.body
        else:
            for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
                self.visit(default)
            body = node.body
        for i, stmt in enumerate(body):
            if i == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                continue  # docstring
            self.visit(stmt)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_Module(self, node: ast.Module) -> None:
        for stmt in node.body:
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                continue  # module docstring
            if isinstance(stmt, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in stmt.targets
            ):
                continue
            if isinstance(stmt, ast.If) and "__name__" in ast.unparse(stmt.test):
                continue
            self.visit(stmt)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        return  # f-strings are messages

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:  # the annotation is not behaviour; the value is
            self.visit(node.value)

    def visit_Raise(self, node: ast.Raise) -> None:
        self._add(node, f"delete: {_short(self._segment(node))}", "pass")
        # the exception's arguments are its message: not mutated

    # ------------------------------------------------------------------ statements
    def visit_Expr(self, node: ast.Expr) -> None:
        if isinstance(node.value, ast.Call):
            self._add(node, f"delete: {_short(self._segment(node))}", "pass")
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._add(node, f"delete: {_short(self._segment(node))}", "pass")
        swap = _SWAP_BINOP.get(type(node.op))
        if swap is not None:
            new = ast.AugAssign(target=node.target, op=swap(), value=node.value)
            self._add(node, f"operator: {_short(ast.unparse(node))} -> {_short(ast.unparse(new))}", ast.unparse(new))
        self.generic_visit(node)

    def _negate_test(self, test: ast.expr) -> None:
        if isinstance(test, ast.Compare | ast.BoolOp):
            return  # covered by the operator swaps
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            return  # covered by removing the `not`
        seg = self._segment(test)
        self._add(test, f"negate: {_short(seg)}", f"(not ({seg}))")

    def visit_If(self, node: ast.If) -> None:
        self._negate_test(node.test)
        self.generic_visit(node)

    def visit_While(self, node: ast.While) -> None:
        self._negate_test(node.test)
        self.generic_visit(node)

    def visit_IfExp(self, node: ast.IfExp) -> None:
        self._negate_test(node.test)
        self.generic_visit(node)

    # ------------------------------------------------------------------ expressions
    def visit_BinOp(self, node: ast.BinOp) -> None:
        swap = _SWAP_BINOP.get(type(node.op))
        if swap is not None:
            self._expr(node, ast.BinOp(left=node.left, op=swap(), right=node.right), "operator")
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, ast.Not | ast.USub):
            self._expr(node, node.operand, "drop unary")
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        new_op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        self._expr(node, ast.BoolOp(op=new_op, values=node.values), "boolean")
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        for i, op in enumerate(node.ops):
            swap = _SWAP_CMP.get(type(op))
            if swap is not None:
                ops = list(node.ops)
                ops[i] = swap()
                self._expr(node, ast.Compare(left=node.left, ops=ops, comparators=node.comparators), "compare")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        v = node.value
        if isinstance(v, bool):
            self._expr(node, ast.Constant(not v), "constant")
        elif isinstance(v, int):
            self._expr(node, ast.Constant(v + 1), "constant")
        elif isinstance(v, float):
            self._expr(node, ast.Constant(v + 1.0), "constant")


def find_mutants(path: Path) -> list[Mutant]:
    source = path.read_bytes()
    finder = _Finder(str(path.relative_to(ROOT)), source)
    finder.visit(ast.parse(source))
    seen: dict[str, int] = {}
    out = []
    for m in finder.found:
        key = f"{m.qualname}::{m.what}"
        n = seen.get(key, 0)
        seen[key] = n + 1
        out.append(Mutant(m.path, m.line, m.qualname, m.what, m.start, m.end, m.replacement, n))
    for m in out:  # every mutant must still be valid Python (a bug here, never in the target)
        ast.parse(m.apply(source))
    return out


# ----------------------------------------------------------------------------- selection
def tests_for(rel: str) -> list[str]:
    """The test paths of the first TARGETS entry matching `rel`; globs expand to what exists."""
    for pattern, tests in TARGETS:
        if fnmatch.fnmatch(rel, pattern):
            found = [str(p.relative_to(ROOT)) for t in tests for p in sorted(ROOT.glob(t))]
            if not found:  # pytest without paths would run the whole suite for every mutant
                sys.exit(f"mutate: none of the tests listed for {rel} exist: {tests}")
            return found
    sys.exit(f"mutate: {rel} is not a mutation target")


def target_files(selected: list[str]) -> list[Path]:
    files = sorted({p for pattern, _ in TARGETS for p in ROOT.glob(pattern) if p.is_file()})
    if not selected:
        return files
    wanted = [(ROOT / s).resolve() for s in selected]
    picked = [f for f in files if any(f == w or w in f.parents for w in wanted)]
    unknown = [s for s, w in zip(selected, wanted, strict=True) if not any(f == w or w in f.parents for f in files)]
    if unknown:
        sys.exit(f"mutate: {unknown} are not mutation targets; targets: {[p for p, _ in TARGETS]}")
    return picked


def load_equivalents() -> dict[str, str]:
    if not EQUIVALENTS.exists():
        return {}
    data = tomllib.loads(EQUIVALENTS.read_text())
    return {e["id"]: e["reason"] for e in data.get("equivalent", [])}


def planted_bugs() -> list[tuple[Mutant, list[str]]]:
    """The hand-planted bugs, as mutants: each `find` must occur exactly once in its file."""
    out = []
    for bug in tomllib.loads(PLANTED.read_text())["bug"]:
        source, find = (ROOT / bug["path"]).read_bytes(), bug["find"].encode()
        if source.count(find) != 1:
            sys.exit(f"mutate: planted bug {bug['name']!r}: expected its text once in {bug['path']}, "
                     f"found it {source.count(find)} times (update {PLANTED.name}): {bug['find']!r}")
        i, j = source.index(find), source.index(find) + len(find)
        start = (source.count(b"\n", 0, i) + 1, i - (source.rfind(b"\n", 0, i) + 1))
        end = (source.count(b"\n", 0, j) + 1, j - (source.rfind(b"\n", 0, j) + 1))
        out.append((Mutant(bug["path"], start[0], "<planted>", bug["name"], start, end, bug["replace"]), bug["tests"]))
    return out


def run_planted(timeout: float) -> int:
    """Every planted bug must make its tests fail; prints one line per bug."""
    bugs = planted_bugs()
    worker = Worker()
    caught = 0
    try:
        for m, tests in bugs:
            status, took, tail = worker.run(m, (ROOT / m.path).read_bytes(), tests, timeout)
            caught += status != "passed"
            print(f"{'caught' if status != 'passed' else 'MISSED':7s} {took:6.1f}s  {m.what}", flush=True)
    finally:
        worker.close()
    print(f"\n{caught}/{len(bugs)} planted bugs caught")
    return 0 if caught == len(bugs) else 1


# ----------------------------------------------------------------------------- running
def tree_digest() -> str:
    """Everything a mutant's outcome depends on besides the mutated file itself."""
    h = hashlib.sha256()
    for folder in ("moe", "tests"):
        for p in sorted((ROOT / folder).rglob("*.py")) + sorted((ROOT / folder).rglob("*.so")):
            if "__pycache__" not in p.parts:
                h.update(str(p.relative_to(ROOT)).encode())
                h.update(p.read_bytes())
    h.update((ROOT / "pyproject.toml").read_bytes())
    return h.hexdigest()


def make_scratch() -> Path:
    """A private copy of what the tests need; mutants are written here, never into ROOT."""
    scratch = Path(tempfile.mkdtemp(prefix="moe-mutate-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.c", "*.pyc")
    for name in ("moe", "tests", "docs", "bench"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, scratch / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "setup.py", "Makefile"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, scratch / name)
    return scratch


_RUNNING: set[subprocess.Popen] = set()  # test runs in flight, each its own process group


def run_tests(scratch: Path, tests: list[str], timeout: float) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout', seconds, last lines of output)."""
    env = {**os.environ, "PYTHONPATH": str(scratch), "PYTHONDONTWRITEBYTECODE": "1",
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header",
           "--timeout", str(int(timeout)), *tests]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=scratch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    _RUNNING.add(proc)
    try:
        out, _ = proc.communicate(timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        _kill(proc)
        proc.communicate()
        return "timeout", time.monotonic() - start, ""
    finally:
        _RUNNING.discard(proc)
    took = time.monotonic() - start
    tail = "\n".join(out.strip().splitlines()[-3:])
    if proc.returncode == 0:
        return "passed", took, tail
    if "Timeout" in out:
        return "timeout", took, tail
    return "failed", took, tail


def _kill(proc: subprocess.Popen) -> None:
    """The test run and everything it started (its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Worker:
    """One scratch copy; runs one mutant at a time in it and restores the file after."""

    def __init__(self) -> None:
        self.scratch = make_scratch()

    def run(self, m: Mutant, source: bytes, tests: list[str], timeout: float) -> tuple[str, float, str]:
        target = self.scratch / m.path
        target.write_bytes(m.apply(source))
        try:
            return run_tests(self.scratch, tests, timeout)
        finally:
            target.write_bytes(source)

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def load_cache(fresh: bool) -> dict[str, dict]:
    if fresh or not CACHE.exists():
        return {}
    return json.loads(CACHE.read_text())


def save_cache(cache: dict[str, dict]) -> None:
    CACHE.parent.mkdir(exist_ok=True)
    tmp = CACHE.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
    tmp.replace(CACHE)


def _interrupt(signum, frame) -> None:
    for proc in list(_RUNNING):
        _kill(proc)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", help="target files or folders (default: every target)")
    p.add_argument("--list", action="store_true", help="print the mutants and exit")
    p.add_argument("--jobs", type=int, default=1, help="mutants run in parallel (default 1)")
    p.add_argument("--shard", default="1/1", metavar="I/N", help="run only the I-th of N slices of the mutants")
    p.add_argument("--fresh", action="store_true", help="ignore cached results")
    p.add_argument("--max-survival", type=float, default=0.10, help="largest surviving fraction per module")
    p.add_argument("--json", dest="json_out", help="also write every mutant's outcome to this file")
    p.add_argument("--survivors-of", metavar="FILE",
                   help="rerun only the mutants that survived in an earlier --json file (quick iteration)")
    p.add_argument("--cached", action="store_true", help="run nothing: report what the cache holds")
    p.add_argument("--planted", action="store_true", help=f"run the hand-planted bugs of {PLANTED.name} instead")
    args = p.parse_args(argv)
    # SIGTERM (and SIGINT, which a background job ignores) stop the run through the `finally`
    # blocks: the running test is killed and the private copies are removed.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
    if args.planted:
        return run_planted(600)

    files = target_files(args.paths)
    mutants = {f: find_mutants(f) for f in files}
    if args.list:
        for ms in mutants.values():
            for m in ms:
                print(f"{m.path}:{m.line}  {m.id}")
        print(f"{sum(map(len, mutants.values()))} mutants in {len(files)} files", file=sys.stderr)
        return 0
    i, n = (int(v) for v in args.shard.split("/"))
    # interleaved across modules (each module's mutants spread evenly over the run), so a run
    # stopped early has covered the same fraction of every module
    flat = [(f, m) for f, ms in mutants.items() for m in ms]
    position = {m.id: i / len(ms) for ms in mutants.values() for i, m in enumerate(ms)}
    flat.sort(key=lambda fm: position[fm[1].id])
    results: dict[str, dict] = {}
    if args.survivors_of:  # what it records as killed stays killed: added tests cannot revive it
        earlier = json.loads(Path(args.survivors_of).read_text())
        flat = [(f, m) for f, m in flat if m.id in earlier]
        results = {m.id: earlier[m.id] for _, m in flat if earlier[m.id]["status"] == "killed"}
    flat = flat[i - 1 :: n]

    digest = tree_digest()
    cache = load_cache(args.fresh)
    equivalents = load_equivalents()
    todo = []
    for f, m in flat:
        if m.id in results:
            continue
        source = f.read_bytes()
        key = hashlib.sha256(digest.encode() + m.apply(source)).hexdigest()
        if key in cache:
            results[m.id] = cache[key]
        elif not args.cached:
            todo.append((f, m, source, key))
    workers = [Worker() for _ in range(max(1, args.jobs))] if todo else []
    try:
        budgets, timed = {}, {}
        for f in sorted({f for f, *_ in todo}):  # the unmutated tests must pass first, and set the timeout
            tests = tests_for(str(f.relative_to(ROOT)))
            if tuple(tests) not in timed:
                status, took, tail = workers[0].run(
                    Mutant(str(f.relative_to(ROOT)), 0, "", "none", (1, 0), (1, 0), ""), f.read_bytes(), tests, 1800)
                if status != "passed":
                    print(f"mutate: the tests of {f.relative_to(ROOT)} fail without any mutant:\n{tail}", file=sys.stderr)
                    return 2
                timed[tuple(tests)] = took
            took = timed[tuple(tests)]
            budgets[f] = max(60.0, 5 * took)
            print(f"{f.relative_to(ROOT)}: {len(mutants[f])} mutants, tests {tests} take {took:.1f}s", flush=True)

        free = list(workers)
        done = 0
        with cf.ThreadPoolExecutor(max_workers=max(1, len(workers))) as pool:
            pending = {}
            queue = list(todo)
            while queue or pending:
                while queue and free:
                    f, m, source, key = queue.pop(0)
                    w = free.pop()
                    tests = tests_for(m.path)
                    pending[pool.submit(w.run, m, source, tests, budgets[f])] = (w, m, key)
                finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    w, m, key = pending.pop(fut)
                    free.append(w)
                    status, took, tail = fut.result()
                    outcome = {"status": "survived" if status == "passed" else "killed", "how": status,
                               "seconds": round(took, 2), "line": m.line, "path": m.path, "tail": tail}
                    results[m.id] = cache[key] = outcome
                    done += 1
                    if outcome["status"] == "survived":
                        print(f"  survived: {m.path}:{m.line} {m.id}", flush=True)
                    if done % 10 == 0:
                        save_cache(cache)
                        print(f"  [{done}/{len(todo)}]", flush=True)
    except KeyboardInterrupt as e:  # stopped: what finished is kept and reported as partial
        print(f"\nmutate: stopped ({e})", file=sys.stderr)
    finally:
        save_cache(cache)
        for w in workers:
            w.close()
    return report(flat, results, equivalents, args)


def report(flat, results, equivalents, args) -> int:
    by_file: dict[str, list[tuple[Mutant, dict]]] = {}
    not_run: dict[str, int] = {}
    for _, m in flat:
        by_file.setdefault(m.path, [])
        if m.id in results:
            by_file[m.path].append((m, results[m.id]))
        else:
            not_run[m.path] = not_run.get(m.path, 0) + 1
    bad = False
    print()
    print(f"{'module':32s} {'mutants':>8s} {'killed':>7s} {'survived':>9s} {'equivalent':>11s} {'unexplained':>12s} {'survival':>9s}"
          + ("  not run" if not_run else ""))
    tot = [0, 0, 0, 0, 0]
    for path, rows in by_file.items():
        surv = [m for m, r in rows if r["status"] == "survived"]
        eq = [m for m in surv if m.id in equivalents]
        unexplained = [m for m in surv if m.id not in equivalents]
        frac = len(surv) / len(rows) if rows else 0.0
        counts = [len(rows), len(rows) - len(surv), len(surv), len(eq), len(unexplained)]
        tot = [a + b for a, b in zip(tot, counts, strict=True)]
        print(f"{path:32s} {counts[0]:8d} {counts[1]:7d} {counts[2]:9d} {counts[3]:11d} {counts[4]:12d} {100 * frac:8.1f}%"
              + (f"  {not_run.get(path, 0):7d}" if not_run else ""))
        bad |= bool(unexplained) or frac > args.max_survival
    frac = tot[2] / tot[0] if tot[0] else 0.0
    print(f"{'total':32s} {tot[0]:8d} {tot[1]:7d} {tot[2]:9d} {tot[3]:11d} {tot[4]:12d} {100 * frac:8.1f}%"
          + (f"  {sum(not_run.values()):7d}" if not_run else ""))
    if not_run:
        print(f"\nPARTIAL: {sum(not_run.values())} mutants not run (the mutants column counts those that ran)")
        bad = True
    unexplained = [(m, r) for rows in by_file.values() for m, r in rows
                   if r["status"] == "survived" and m.id not in equivalents]
    if unexplained:
        print("\nunexplained survivors (a test should kill them, or list them as equivalent with a reason):")
        for m, _ in unexplained:
            print(f"  {m.path}:{m.line}  {m.id}")
    complete = not args.paths and args.shard == "1/1" and not not_run
    stale = sorted(set(equivalents) - {m.id for _, m in flat}) if complete else []
    if stale:
        print("\nequivalents that no longer match a mutant (remove them from the list):")
        for s in stale:
            print(f"  {s}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {m.id: {**r, "equivalent": equivalents.get(m.id)} for rows in by_file.values() for m, r in rows},
            indent=1, sort_keys=True))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
