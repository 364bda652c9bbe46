"""Benchmark-style check (not a test, not in CI): mutation testing of the core with mutmut.

The modules where a silent mistake costs users most are mutated one small change
at a time (an operator flipped, a constant changed, an argument dropped, ...); for
each change mutmut runs the tests that cover the changed function, and a change
that leaves them all green "survives": the suite would not notice that mistake.

    pip install -e ".[mutation]"
    nice -n 10 python bench/mutation.py [--max-children 2] [--fresh] [--workdir DIR]

mutmut names modules by their file path, but this repository maps folders onto
packages (``engine/`` installs as ``fluxkiln.engine``), so the script stages a
copy laid out as the import names (``src/fluxkiln/engine/...``) in a work folder,
runs mutmut there, and ``PYTHONPATH`` points subprocesses (the CLI tests) at the
mutated copy too.  Results are kept in the work folder, so a second run only
re-checks what changed; ``--fresh`` starts over.  ``python bench/mutation.py NAME...`` re-checks named
mutants, and ``--merge`` folds a work folder of such re-checks into the JSON of a complete run made
elsewhere (each re-checked outcome replaces the earlier one; the JSON's ``note`` says so).

Prints a table and writes ``bench/mutation.json``: tool and version, date,
modules, mutant counts by outcome, seconds, and every surviving mutant (file,
line, diff) that is not in ``mutation_scope.EQUIVALENT``, the reviewed list of mutants that
cannot change behaviour, nor in ``mutation_scope.GPU_ONLY``, those only a CUDA run tells apart (with the test
that kills each there).
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from mutation_scope import EQUIVALENT, GPU_ONLY, GROUPS, SKIPPED_OPERATORS, Group

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "mutation.json"

# The folders that install as packages, and the import name each one gets.
PACKAGES = {"fluxkiln": "fluxkiln", "engine": "fluxkiln/engine", "plugins": "fluxkiln/plugins",
            "tui": "fluxkiln/tui"}

# Copied beside the tests (they read recipes, docs and the README from the repository root).
ALSO_COPY = ["recipes", "docs", "README.md", "mkdocs.yml", "bench"]

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          35: "suspicious", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout",
          37: "caught by type check", -11: "segfault", -9: "segfault", None: "not checked"}


@dataclass
class Survivor:
    """A mutant no test noticed."""

    name: str
    status: str
    file: str
    line: int | None
    diff: str


@dataclass
class GroupResult:
    """One group's outcome."""

    name: str
    modules: list[str]
    functions: list[str]
    tests: list[str]
    seconds: float  # wall clock of the last full run of the group (0 when not measured)
    mutant_seconds: float  # mutmut's own record: the test time of every mutant, added up
    counts: dict[str, int]


@dataclass
class Summary:
    """One run of the check, as written to bench/mutation.json."""

    tool: str
    version: str
    date: str
    modules: list[str]
    skipped_operators: list[str]
    seconds: float
    max_children: int
    total: int
    counts: dict[str, int]
    equivalent: int
    unexplained: int
    groups: list[GroupResult]
    survivors: list[Survivor] = field(default_factory=list)
    stale_exceptions: list[str] = field(default_factory=list)
    gpu_only: dict[str, str] = field(default_factory=dict)  # survived here; the test that kills each on a GPU
    equivalent_mutants: list[str] = field(default_factory=list)
    rechecked: dict[str, str] = field(default_factory=dict)  # --merge: mutant -> outcome of its re-check
    note: str = ""


def stage(work: Path, group: Group) -> None:
    """Lay the repository out under ``work`` as mutmut expects: the code under src/ by import name."""
    for folder, target in PACKAGES.items():
        dest = work / "src" / target
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(ROOT / folder, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ["tests", *ALSO_COPY]:
        src, dest = ROOT / name, work / name
        if dest.is_dir():
            shutil.rmtree(dest)
        if src.is_dir():
            shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dest)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project.setdefault("tool", {})["mutmut"] = {
        "source_paths": ["src"],
        "only_mutate": [_staged_path(m) for m in group.modules],
        "pytest_add_cli_args_test_selection": list(group.tests),
        "pytest_add_cli_args": ["-p", "no:cacheprovider"],
        "also_copy": ALSO_COPY,
        "use_git_change_detection": False,
    }
    import tomli_w

    (work / "pyproject.toml").write_text(tomli_w.dumps(project))


def _staged_path(module: str) -> str:
    """engine/cache.py -> src/fluxkiln/engine/cache.py"""
    folder, rest = module.split("/", 1)
    return f"src/{PACKAGES[folder]}/{rest}"


def _original_path(staged: Path) -> str:
    """src/fluxkiln/engine/cache.py -> engine/cache.py"""
    rel = staged.relative_to("src").as_posix()
    for folder, target in sorted(PACKAGES.items(), key=lambda kv: -len(kv[1])):
        if rel.startswith(target + "/"):
            return folder + rel[len(target):]
    return rel


# Imported at start-up by every Python process started with the PYTHONPATH below: mutmut's string
# mutations are switched off before it generates mutants, and a test's subprocess (the CLI tests),
# which runs in another folder, loads mutmut's settings from the work folder before it imports
# the mutated code (mutmut reads them from the working folder on first use).
SHIM = '''"""Mutation check only (bench/mutation.py): set mutmut up in every process it starts."""
import os

_work = os.environ.get("FLUXKILN_MUTATION_WORK")
if _work:
    import mutmut.configuration
    import mutmut.mutation.mutators as _mutators

    _skip = os.environ.get("FLUXKILN_MUTATION_SKIP", "").split(",")
    _mutators.mutation_operators[:] = [op for op in _mutators.mutation_operators if op[1].__name__ not in _skip]
    _here = os.getcwd()
    os.chdir(_work)
    try:
        mutmut.configuration.config()
    finally:
        os.chdir(_here)
'''


def mutmut_env(work: Path) -> dict[str, str]:
    """The environment mutmut runs in: the mutated copy first on every (sub)process's import path."""
    shim = work / "shim"
    shim.mkdir(exist_ok=True)
    # Made now: a folder on the import path that does not exist yet when Python starts is never looked in.
    (work / "mutants" / "src").mkdir(parents=True, exist_ok=True)
    (shim / "sitecustomize.py").write_text(SHIM)
    env = dict(os.environ, FLUXKILN_MUTATION_WORK=str(work), FLUXKILN_MUTATION_SKIP=",".join(SKIPPED_OPERATORS))
    paths = [str(work / "mutants" / "src"), str(shim), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.setdefault("OMP_NUM_THREADS", "1")  # workers are forked: no OpenMP pool may exist before the fork
    return env


def run_mutmut(work: Path, max_children: int, names: list[str]) -> int:
    """Run ``mutmut run`` in ``work`` (every mutant not yet checked, or only ``names``)."""
    command = [sys.executable, "-c", "from mutmut.__main__ import cli; cli()", "run",
               "--max-children", str(max_children), *names]
    return subprocess.run(command, cwd=work, env=mutmut_env(work)).returncode


def _function_source(path: Path, key: str) -> tuple[int, list[str]] | None:
    """(first line, lines) of the function a mutant key names, e.g. ``xǁDiskCacheǁprobe`` or ``x_digest``."""
    mangled = key.rsplit(".", 1)[-1].partition("__mutmut_")[0]
    if mangled.startswith("x_"):
        cls, name = None, mangled[2:]
    else:
        _, cls, name = mangled.split("ǁ")
    text = path.read_text()
    tree = ast.parse(text)
    scope = tree.body
    if cls is not None:
        scope = next((n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), [])
    for node in scope:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            return first, text.splitlines()[first - 1:node.end_lineno]
    return None


def mutant_line(path: Path, key: str, diff: str) -> int | None:
    """The line in the original file of the first line the mutant changes."""
    found = _function_source(path, key)
    removed = [line[1:].strip() for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    if found is None or not removed:
        return None
    first, lines = found
    header = re.search(r"^@@ -(\d+)", diff, re.M)
    hint = int(header.group(1)) if header else 1
    hits = [i for i, line in enumerate(lines) if line.strip() == removed[0]]
    return first + min(hits, key=lambda i: abs(i - hint)) if hits else None


def collect(work: Path, group: Group) -> tuple[dict[str, int], list[Survivor], set[str], float]:
    """Read one group's results: counts by outcome, the unexplained survivors, the explained ones (equivalent
    or GPU-only)."""
    here = os.getcwd()
    os.chdir(work)  # mutmut reads its settings and files relative to the working folder
    try:
        from mutmut.mutation.diff_apply import get_diff_for_mutant

        counts: dict[str, int] = {}
        survivors: list[Survivor] = []
        equivalent: set[str] = set()
        busy = 0.0
        for meta in sorted((work / "mutants" / "src").rglob("*.py.meta")):
            rel = meta.relative_to(work / "mutants").with_suffix("")
            data = json.loads(meta.read_text())
            for name, code in sorted(data["exit_code_by_key"].items()):
                if not any(fnmatch.fnmatch(name, f) for f in group.functions):
                    continue
                busy += data["durations_by_key"].get(name, 0.0)
                status = STATUS.get(code, "suspicious")
                counts[status] = counts.get(status, 0) + 1
                if status in ("killed", "caught by type check", "not checked"):
                    continue  # a stopped run: "not checked" is counted, not listed
                if name in EQUIVALENT or name in GPU_ONLY:
                    equivalent.add(name)  # explained: the caller tells the two kinds apart
                    continue
                diff = get_diff_for_mutant(name, path=rel)
                original = _original_path(rel)
                survivors.append(Survivor(name, status, original, mutant_line(ROOT / original, name, diff), diff))
        return counts, survivors, equivalent, round(busy, 1)
    finally:
        os.chdir(here)


def outcomes(work: Path, group: Group) -> dict[str, str]:
    """The outcome of every mutant of the group that has one in ``work`` (not-checked ones left out)."""
    found: dict[str, str] = {}
    for meta in (work / "mutants" / "src").rglob("*.py.meta"):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if code is not None and any(fnmatch.fnmatch(name, f) for f in group.functions):
                found[name] = STATUS.get(code, "suspicious")
    return found


def merge(previous: dict[str, Any], root: Path) -> Summary:
    """The earlier complete run (``previous``, as read from the JSON) with the outcome of every mutant re-checked
    in ``root`` in place of its earlier one; every other mutant keeps the earlier run's outcome.  For a work
    folder that holds only re-checks, e.g. when the complete run was made on another machine."""
    stale = set(previous.get("stale_exceptions", []))
    listed = {s["name"]: s for s in previous.get("survivors", [])}
    explained_before = set(previous.get("equivalent_mutants", [])) | set(previous.get("gpu_only", {})) or {
        n for n in EQUIVALENT if n not in listed and n not in stale}
    survived_before = {n: listed[n]["status"] if n in listed else "survived" for n in (*listed, *explained_before)}
    rechecked: dict[str, str] = dict(previous.get("rechecked", {}))
    dead = ("killed", "caught by type check")
    fresh: dict[str, Survivor] = {}
    for group in GROUPS:
        work = root / group.name
        if not (work / "mutants").exists():
            continue
        here = outcomes(work, group)
        rechecked.update(here)
        if any(st not in dead and n not in listed and n not in EQUIVALENT and n not in GPU_ONLY
               for n, st in here.items()):  # a new unexplained survivor: its diff is read from the work folder
            fresh.update({s.name: s for s in collect(work, group)[1]})
    groups = []
    for g in previous["groups"]:
        counts = dict(g["counts"])
        for name, now in rechecked.items():
            if any(fnmatch.fnmatch(name, f) for f in g["functions"]):
                was = survived_before.get(name, "killed")
                counts[was] -= 1
                counts[now] = counts.get(now, 0) + 1
        current = next(x for x in GROUPS if x.name == g["name"])  # re-checks ran with today's selection
        kept = {k: v for k, v in counts.items() if v}
        groups.append(GroupResult(**{**g, "tests": list(current.tests), "counts": kept}))
    alive = {n: st for n, st in survived_before.items() if rechecked.get(n, st) not in dead}
    alive.update({n: st for n, st in rechecked.items() if st not in dead})
    survivors = [fresh[n] if n in fresh else Survivor(**{**listed[n], "status": st})
                 for n, st in sorted(alive.items()) if n not in EQUIVALENT and n not in GPU_ONLY]
    totals: dict[str, int] = {}
    for g in groups:
        for k, v in g.counts.items():
            totals[k] = totals.get(k, 0) + v
    equivalent = sorted(n for n in alive if n in EQUIVALENT)
    return Summary(tool="mutmut", version=previous["version"], date=dt.date.today().isoformat(),
                   modules=previous["modules"], skipped_operators=previous["skipped_operators"],
                   seconds=previous["seconds"], max_children=previous["max_children"], total=sum(totals.values()),
                   counts=totals, equivalent=len(equivalent), unexplained=len(survivors), groups=groups,
                   survivors=survivors, stale_exceptions=sorted((set(EQUIVALENT) | set(GPU_ONLY)) - set(alive)),
                   gpu_only={n: GPU_ONLY[n] for n in sorted(alive) if n in GPU_ONLY}, equivalent_mutants=equivalent,
                   rechecked=dict(sorted(rechecked.items())),
                   note=f"the complete run of {previous['date']} ({previous['max_children']} at once) with the "
                        f"outcomes of {len(rechecked)} mutants re-checked since (--merge) in place of theirs")


def table(summary: Summary) -> str:
    order = ["killed", "survived", "no tests", "timeout", "suspicious", "segfault", "skipped", "not checked"]
    lines = [f"mutmut {summary.version}, {summary.date}, {summary.seconds:.0f} s, {summary.total} mutants in "
             f"{len(summary.modules)} modules", "",
             f"  {'group':<10}" + "".join(f"{k:>12}" for k in order) + f"{'seconds':>10}{'mutant s':>10}"]
    for g in summary.groups:
        lines.append(f"  {g.name:<10}" + "".join(f"{g.counts.get(k, 0):>12}" for k in order)
                     + f"{g.seconds:>10.0f}{g.mutant_seconds:>10.0f}")
    lines += ["", f"  equivalent (reviewed, in EQUIVALENT): {summary.equivalent}",
              f"  GPU-only (killed by a CUDA test):     {len(summary.gpu_only)}",
              f"  unexplained (survived or untested):   {summary.unexplained}"]
    lines += [f"    {s.file}:{s.line}  {s.status}  {s.name}" for s in summary.survivors]
    lines += [f"    stale exception (no such surviving mutant): {n}" for n in summary.stale_exceptions]
    lines += [f"  {summary.note}"] if summary.note else []
    return "\n".join(lines)


def _in_group(name: str, group: Group) -> bool:
    """Whether a mutant name (or glob) belongs to one of the group's modules."""
    prefixes = [_staged_path(m)[len("src/"):-len(".py")].replace("/", ".") for m in group.modules]
    return any(name.startswith(p + ".") for p in prefixes)


def _unchecked(work: Path, group: Group) -> list[str] | None:
    """The group's mutants without a result yet, so that a stopped run goes on; None before mutmut ran."""
    metas = list((work / "mutants" / "src").rglob("*.py.meta"))
    if not metas:
        return None
    return [name for meta in metas for name, code in json.loads(meta.read_text())["exit_code_by_key"].items()
            if code is None and any(fnmatch.fnmatch(name, f) for f in group.functions)]


def _same_selection(work: Path, group: Group) -> bool:
    """Whether the results in ``work`` came from this group's test selection (else they are stale)."""
    staged = work / "pyproject.toml"
    if not staged.exists():
        return False
    return tomllib.loads(staged.read_text())["tool"]["mutmut"]["pytest_add_cli_args_test_selection"] == list(group.tests)


def check_group(group: Group, work: Path, args: argparse.Namespace, seconds: float) -> float | None:
    """Stage and run one group; the seconds it took (added to a stopped run's; unchanged for a re-check)."""
    names = [n for n in args.mutants if _in_group(n, group)]
    if args.mutants and not names:
        return seconds
    if work.exists() and (args.fresh or not _same_selection(work, group)):
        shutil.rmtree(work)
        seconds = 0.0
    pending = _unchecked(work, group)
    if not names and pending == []:
        return seconds  # every mutant has its result
    work.mkdir(parents=True, exist_ok=True)
    stage(work, group)
    start = time.monotonic()
    code = run_mutmut(work, args.max_children, names or pending or list(group.functions))
    if code != 0:
        print(f"mutmut exited {code} in group {group.name}; see its output above", file=sys.stderr)
        return None
    return seconds if names else round(seconds + time.monotonic() - start, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mutants", nargs="*", help="re-check only these mutants (names as in the JSON; * globs)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fluxkiln-mutation",
                        help="where the staged copies and mutmut's results live (default: %(default)s)")
    parser.add_argument("--group", action="append", choices=[g.name for g in GROUPS],
                        help="check only this group (repeatable; default: all)")
    parser.add_argument("--max-children", type=int, default=2, help="mutants checked at once (default: 2)")
    parser.add_argument("--fresh", action="store_true", help="forget earlier results and check every mutant")
    parser.add_argument("--report-only", action="store_true", help="only read the results of the last run")
    parser.add_argument("--out", type=Path, default=OUT, help="the JSON to write (default: bench/mutation.json)")
    parser.add_argument("--merge", action="store_true",
                        help="the work folder holds only re-checks: put their outcomes into the JSON in place of "
                             "the earlier ones, keeping every other outcome of the earlier complete run")
    args = parser.parse_args(argv)
    root: Path = args.workdir.resolve()
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.merge:
        if not previous:
            parser.error(f"--merge needs an earlier complete run in {args.out}")
        summary = merge(previous, root)
        args.out.write_text(json.dumps(asdict(summary), indent=2, ensure_ascii=False) + "\n")
        print(table(summary))
        return 0
    before = {g["name"]: g["seconds"] for g in previous.get("groups", [])}
    results: list[GroupResult] = []
    survivors: list[Survivor] = []
    equivalent: set[str] = set()
    for group in GROUPS:
        work = root / group.name
        seconds: float | None = before.get(group.name, 0.0)
        if not args.report_only and (not args.group or group.name in args.group):
            seconds = check_group(group, work, args, seconds or 0.0)
            if seconds is None:
                return 1
        if not (work / "mutants").exists():
            print(f"group {group.name} has no results in {work}; run it first", file=sys.stderr)
            continue
        counts, lost, same, busy = collect(work, group)
        results.append(GroupResult(group.name, list(group.modules), list(group.functions), list(group.tests),
                                   seconds or 0.0, busy, counts))
        survivors += lost
        equivalent |= same
    totals: dict[str, int] = {}
    for g in results:
        for k, v in g.counts.items():
            totals[k] = totals.get(k, 0) + v
    summary = Summary(tool="mutmut", version=metadata.version("mutmut"), date=dt.date.today().isoformat(),
                      modules=[m for g in results for m in g.modules], skipped_operators=list(SKIPPED_OPERATORS),
                      seconds=round(sum(g.seconds for g in results), 1),
                      # what the checks ran with: a report or a re-check of named mutants keeps the run's value
                      max_children=args.max_children if not (args.report_only or args.mutants)
                      else previous.get("max_children", args.max_children),
                      total=sum(totals.values()), counts=totals, equivalent=len(equivalent & set(EQUIVALENT)),
                      unexplained=len(survivors), groups=results, survivors=survivors,
                      stale_exceptions=sorted((set(EQUIVALENT) | set(GPU_ONLY)) - equivalent),
                      gpu_only={n: GPU_ONLY[n] for n in sorted(equivalent) if n in GPU_ONLY},
                      equivalent_mutants=sorted(equivalent & set(EQUIVALENT)))
    args.out.write_text(json.dumps(asdict(summary), indent=2, ensure_ascii=False) + "\n")
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
