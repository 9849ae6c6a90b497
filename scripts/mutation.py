"""`make mutation`: the mutation score of the modules where a silent bug costs a study (issue 16).

One module at a time (the machine has 2 cores): each runs in its own scratch copy under
.mutation/<module>/ with mutmut (https://github.com/boxed/mutmut), which mutates only that module's
files (optionally only some of its functions) and runs, for each mutant, only the tests of the
module's test subset that execute the mutated function. The modules, their test subsets and the
mutants listed as equivalent (each with the line it changes and the reason) live in pyproject.toml
under [tool.harness-mutation]; mutmut's own settings under [tool.mutmut].

    python scripts/mutation.py                 # every module
    python scripts/mutation.py diffusion spec  # some of them
    python scripts/mutation.py --report        # the table again, from the last runs
    python scripts/mutation.py --recheck stats # rerun only the last run's survivors, with today's tests
    python scripts/mutation.py --sample 60 train  # 60 random mutants: an estimate, with its 90% interval
    python scripts/mutation.py --resume sample    # go on where a stopped (or sampled) run left off

Prints, per module: mutants, killed, survived (the names), equivalent (excluded), score =
killed / (mutants - equivalent), and the wall time; writes .mutation/summary.json. Exit status 1 if a
module scores under [tool.harness-mutation] target or was not wholly checked (stopped, or sampled).
"""
from __future__ import annotations

import argparse
import difflib
import fnmatch
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"
COPY = ("harness", "tests", "sweeps", "pyproject.toml")
KILLED = {"killed", "timeout", "caught by type check", "segfault"}


def config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["harness-mutation"]


def _scratch(name: str, module: dict, fresh: bool = True) -> Path:
    """A copy of the tree whose pyproject tells mutmut this module's files and tests (`fresh=False`:
    keep the last run's mutants and results, refresh only the tests and the configuration)."""
    where = WORK / name
    if fresh and where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True, exist_ok=True)
    for item in COPY if fresh else ("tests", "pyproject.toml"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, where / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                            dirs_exist_ok=True)
        else:
            shutil.copy2(src, where / item)
    text = (where / "pyproject.toml").read_text()
    extra = (f"only_mutate = {json.dumps(module['mutate'])}\n"
             f"pytest_add_cli_args_test_selection = {json.dumps(module['tests'])}\n")
    assert "[tool.mutmut]\n" in text, "pyproject.toml has no [tool.mutmut] table"
    (where / "pyproject.toml").write_text(text.replace("[tool.mutmut]\n", "[tool.mutmut]\n" + extra, 1))
    return where


def _statuses(where: Path) -> dict[str, str]:
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "mutmut"), "results", "--all", "true"], cwd=where,
                         capture_output=True, text=True, check=True).stdout
    return dict(m.groups() for m in re.finditer(r"^\s+(\S+): (.+)$", out, re.M))


def _function_source(lines: list[str], name: str) -> list[str] | None:
    """The lines of `def name(` up to the next line indented no deeper (mutmut writes each mutant as its
    own function next to `..._mutmut_orig`)."""
    start = next((i for i, x in enumerate(lines) if x.lstrip().startswith(f"def {name}(")), None)
    if start is None:
        return None
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    return [x.replace(name, "F") for x in lines[start:end]]


def mutated_lines(where: Path, mutants: list[str]) -> dict[str, str]:
    """{mutant: its changed line(s), stripped and joined by ' / '}: what the mutant is, whatever its number."""
    out, files = {}, {}
    for mutant in mutants:
        module, function = mutant.rsplit(".", 1)
        path = where / "mutants" / Path(*module.split(".")).with_suffix(".py")
        if path not in files:
            files[path] = path.read_text().splitlines() if path.exists() else []
        orig = _function_source(files[path], function.rsplit("__mutmut_", 1)[0] + "__mutmut_orig")
        new = _function_source(files[path], function)
        if orig is None or new is None:
            continue
        changed = [x.strip() for tag, x in ((t[0], t[2:]) for t in difflib.ndiff(orig, new)) if tag == "+"]
        out[mutant] = " / ".join(changed)
    return out


def run_module(name: str, module: dict, env: dict, recheck: list[str] | None = None, sample: int = 0,
               seed: int = 0) -> dict:
    """Run mutmut on one module; `recheck`: only these mutants, in the last run's scratch copy; `sample`:
    only that many of the module's mutants, drawn at random with `seed` -- an estimate for the slow
    modules (unbiased only for tests written before the draw: a recheck after fixing its survivors is not)."""
    where = _scratch(name, module, fresh=recheck is None)
    if recheck is not None:  # mutmut picks each mutant's tests from this record: new tests must be in it
        (where / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    t0 = time.monotonic()
    cmd = [str(ROOT / ".venv" / "bin" / "mutmut"), "run", "--max-children", str(env["MUTATION_JOBS"])]
    log = (WORK / f"{name}{'.recheck' if recheck else ''}.log").open("w")
    selected = recheck if recheck is not None else module.get("functions", [])
    if sample:  # generate the mutants and the test coverage only (the filter matches none), then draw
        subprocess.run(cmd + ["no.mutant.is.named.this"], cwd=where, env=env, stdout=log, stderr=subprocess.STDOUT,
                       check=False)
        patterns = module.get("functions", ["*"])
        names = sorted(k for k in _statuses(where) if any(fnmatch.fnmatch(k, p) for p in patterns))
        if not names:
            raise SystemExit(f"mutation: {name}: mutmut generated no mutants to sample from; see {log.name}")
        selected = random.Random(seed).sample(names, min(sample, len(names)))
    subprocess.run(cmd + list(selected), cwd=where, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.monotonic() - t0
    summary = {"wall_s": round(wall, 1), "statuses": _statuses(where), "sample": sample, "seed": seed}
    summary["lines"] = mutated_lines(where, [k for k, s in summary["statuses"].items() if s not in KILLED])
    if recheck is not None:  # mutmut forgets the mutants it did not rerun: keep their last verdicts
        last = json.loads((WORK / f"{name}.json").read_text())
        summary["statuses"] = {**last["statuses"], **{k: summary["statuses"][k] for k in recheck}}
        summary["wall_s"], summary["recheck_wall_s"] = last["wall_s"], round(wall, 1)
        summary["sample"] = last.get("sample", 0)
        summary["lines"] = {**last.get("lines", {}), **summary["lines"]}
    (WORK / f"{name}.json").write_text(json.dumps(summary, indent=1))
    return summary


def score(name: str, module: dict, summary: dict, equivalent: dict[str, dict]) -> dict:
    """Counts over the module's mutants (those its `functions` patterns select, if it has any). A mutant
    listed as equivalent is excluded only while it is still the line it was judged on: mutmut numbers
    mutants by position, so an edit above it gives its number to another mutant (reported as stale)."""
    patterns = module.get("functions", ["*"])
    statuses = {k: s for k, s in summary["statuses"].items() if any(fnmatch.fnmatch(k, p) for p in patterns)}
    lines = summary.get("lines", {})
    stale = sorted(k for k in statuses if k in equivalent and lines.get(k, equivalent[k]["line"]) != equivalent[k]["line"])
    equivalent = {k: v for k, v in equivalent.items() if k not in stale}
    eq = sorted(k for k in statuses if k in equivalent)
    # a run stopped early leaves mutants "not checked": reported as such, outside the score
    unchecked = sorted(k for k, s in statuses.items() if s == "not checked" and k not in equivalent)
    counted = {k: s for k, s in statuses.items() if k not in equivalent and k not in unchecked}
    killed = sum(s in KILLED for s in counted.values())
    survived = sorted(k for k, s in counted.items() if s not in KILLED)
    total = len(counted)
    return {"module": name, "mutants": len(statuses), "equivalent": eq, "unchecked": len(unchecked), "killed": killed,
            "interval": _wilson(killed, total) if summary.get("sample") and unchecked else None,
            "survived": {k: counted[k] for k in survived}, "stale": stale, "lines": lines,
            "killed_equivalent": [k for k in eq if statuses[k] in KILLED],
            "score": killed / total if total else float("nan"), "wall_s": summary["wall_s"]}


def _wilson(k: int, n: int, z: float = 1.645) -> tuple[float, float]:
    """90% Wilson interval of a proportion k / n (the score of a random sample of mutants)."""
    if n == 0:
        return (0.0, 1.0)
    p, d = k / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, mid - half), min(1.0, mid + half))


def main(argv: list[str] | None = None) -> int:
    cfg = config()
    modules = cfg["modules"]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("modules", nargs="*", choices=[[], *modules], help="default: all of them")
    p.add_argument("--report", action="store_true", help="print the table of the last runs; run nothing")
    p.add_argument("--recheck", action="store_true", help="rerun only the survivors of each module's last run")
    p.add_argument("--resume", action="store_true", help="check what the last run left unchecked (stopped or sampled)")
    p.add_argument("--jobs", type=int, default=int(os.environ.get("MUTATION_JOBS", 2)))
    p.add_argument("--sample", type=int, default=0, metavar="N",
                   help="check only N mutants per module drawn at random: an estimate with its 90%% interval")
    p.add_argument("--seed", type=int, default=0, help="the draw of --sample (a new draw after tests were written "
                                                       "against the last one's survivors)")
    args = p.parse_args(argv)
    names = args.modules or list(modules)
    env = dict(os.environ, OMP_NUM_THREADS="1", HARNESS_CACHE_KEEP="1", MUTATION_JOBS=str(args.jobs),
               HARNESS_CACHE=str(WORK / "cache-harness"), PYTHONPATH="")
    WORK.mkdir(exist_ok=True)
    rows = []
    for name in names:
        if args.report:
            path = WORK / f"{name}.json"
            if not path.exists():
                continue
            summary = json.loads(path.read_text())
            if "lines" not in summary:  # a run from before lines were recorded
                summary["lines"] = mutated_lines(WORK / name, [k for k, s in summary["statuses"].items()
                                                               if s not in KILLED])
        elif args.resume:
            statuses = _statuses(WORK / name)
            todo = [k for k, st in statuses.items() if st == "not checked"]
            if not (WORK / f"{name}.json").exists():  # stopped before it wrote its summary
                (WORK / f"{name}.json").write_text(json.dumps({"wall_s": 0, "statuses": statuses}))
            print(f"mutation: {name}: checking the {len(todo)} mutants the last run left unchecked ...", flush=True)
            summary = (run_module(name, modules[name], env, recheck=todo) if todo
                       else json.loads((WORK / f"{name}.json").read_text()))
        elif args.recheck:
            last = score(name, modules[name], json.loads((WORK / f"{name}.json").read_text()), cfg.get("equivalent", {}))
            print(f"mutation: {name}: rechecking {len(last['survived'])} survivors ...", flush=True)
            summary = (run_module(name, modules[name], env, recheck=list(last["survived"])) if last["survived"]
                       else json.loads((WORK / f"{name}.json").read_text()))
        else:
            print(f"mutation: {name} ({', '.join(modules[name]['mutate'])}) ...", flush=True)
            summary = run_module(name, modules[name], env, sample=args.sample, seed=args.seed)
        rows.append(score(name, modules[name], summary, cfg.get("equivalent", {})))
        r = rows[-1]
        checked = r["mutants"] - len(r["equivalent"]) - r["unchecked"]
        print(f"  {name:12s} {r['killed']:4d}/{checked:4d} killed = {r['score']:6.1%}"
              f"  ({len(r['equivalent'])} equivalent excluded, {r['wall_s']:.0f} s"
              + (f"; PARTIAL: {r['unchecked']} not checked" if r["unchecked"] else "")
              + (f"; a random sample: 90% interval {r['interval'][0]:.0%}-{r['interval'][1]:.0%}" if r["interval"] else "")
              + ")", flush=True)
        for k, status in r["survived"].items():
            print(f"      {status:10s} {k}: {r['lines'].get(k, '?')}")
        for k in r["killed_equivalent"]:
            print(f"      listed equivalent but a test kills it: {k}: remove its entry from pyproject.toml")
        for k in r["stale"]:
            print(f"      stale equivalent {k}: now {r['lines'].get(k, '?')!r}, judged on "
                  f"{cfg['equivalent'][k]['line']!r}: read it again and update pyproject.toml")
    (WORK / "summary.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "lines"} for r in rows], indent=1))
    target = float(cfg.get("target", 0.85))
    low = [r["module"] for r in rows if not r["score"] >= target or r["unchecked"]]
    if low:
        print(f"under the {target:.0%} target or not wholly checked: {', '.join(low)}")
    return 1 if low else 0


if __name__ == "__main__":
    sys.exit(main())
