"""Where the test suite's time goes: XLA compilation against everything else.

Run the suite with the profile on and ``--durations=0``, keeping its output::

    GBJAX_TEST_COMPILE_PROFILE=/tmp/prof GBJAX_DATA_DIR=../shared/data \\
        python -m pytest -q -n auto --dist worksteal --durations=0 | tee /tmp/suite.txt
    python benchmarks/suite_profile.py /tmp/prof /tmp/suite.txt

It prints the sum of the tests' durations, the seconds JAX spent tracing, lowering and
compiling inside them (per test, the slowest first, then per file) and the share of
compilation; the compiled programs by name (seconds, compilations, tests), the costliest
first (JAX times a program loaded from the persistent compilation cache as a compilation
too, with its load time, so a count includes such loads); and per xdist worker the
seconds its tests ran and when its last test ended, so the tail where one core idles
shows. Processes the tests spawn (notebook kernels, parallel trainings) are in the
durations but not in the compile seconds, so the share is a lower bound.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re

COMPILE = "/jax/core/compile/backend_compile_duration"
LOWER = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
)


def durations(log: pathlib.Path) -> dict[str, float]:
    """Per test id, its setup + call + teardown seconds from pytest's --durations lines."""
    out: dict[str, float] = collections.Counter()
    for line in log.read_text().splitlines():
        m = re.match(r"\s*([0-9.]+)s (?:call|setup|teardown)\s+(\S+)", line)
        if m:
            out[m.group(2)] += float(m.group(1))
    return dict(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile_dir", type=pathlib.Path, help="$GBJAX_TEST_COMPILE_PROFILE")
    p.add_argument("log", type=pathlib.Path, help="the suite's output, with --durations=0")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args(argv)
    events: dict[str, dict[str, float]] = {}
    programs = collections.defaultdict(lambda: [0.0, 0, set()])
    workers = {}
    for f in sorted(args.profile_dir.glob("compile_*.json")):
        rec = json.loads(f.read_text())
        events.update(rec["events"])
        for test, progs in rec["programs"].items():
            for name, (secs, n) in progs.items():
                programs[name][0] += secs
                programs[name][1] += n
                programs[name][2].add(test)
        if rec["spans"]:
            workers[rec["worker"]] = list(rec["spans"].values())
    dur = durations(args.log)
    if not dur:
        raise SystemExit(
            f"error: no --durations lines in {args.log}; run pytest with --durations=0"
        )
    rows = []
    for test, secs in dur.items():
        ev = events.get(test, {})
        rows.append((secs, ev.get(COMPILE, 0.0), sum(ev.get(e, 0.0) for e in LOWER), test))
    total, comp, low = (sum(r[i] for r in rows) for i in range(3))
    print(
        f"{len(rows)} tests listed, {total:.1f} s in all; XLA compilation {comp:.1f} s "
        f"({comp / total:.0%}), tracing and lowering {low:.1f} s ({low / total:.0%})"
    )
    print(f"\n{'seconds':>8} {'compile':>8} {'lower':>6}  test")
    for r in sorted(rows, reverse=True)[: args.top]:
        print(f"{r[0]:8.1f} {r[1]:8.1f} {r[2]:6.1f}  {r[3]}")
    per_file = collections.defaultdict(lambda: [0.0, 0.0])
    for secs, c, _, test in rows:
        per_file[test.split("::")[0]][0] += secs
        per_file[test.split("::")[0]][1] += c
    print(f"\n{'seconds':>8} {'compile':>8}  file")
    for f, (s, c) in sorted(per_file.items(), key=lambda kv: -kv[1][0]):
        print(f"{s:8.1f} {c:8.1f}  {f}")
    print(f"\n{'seconds':>8} {'compiles':>8} {'tests':>6}  program")
    for name, (secs, n, tests) in sorted(programs.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{secs:8.1f} {n:8d} {len(tests):6d}  {name}")
    if workers:
        t0 = min(s for spans in workers.values() for s, _ in spans)
        t1 = max(e for spans in workers.values() for _, e in spans)
        print(f"\nworkers: {t1 - t0:.1f} s from the first test's start to the last's end")
        print(f"{'worker':>8} {'tests':>6} {'busy s':>8} {'ends at':>8} {'idle tail':>9}")
        for w, spans in sorted(workers.items()):
            end = max(e for _, e in spans)
            busy = sum(e - s for s, e in spans)
            print(f"{w:>8} {len(spans):6d} {busy:8.1f} {end - t0:8.1f} {t1 - end:9.1f}")
    return dict(tests=len(rows), seconds=total, compile_seconds=comp, lower_seconds=low)


if __name__ == "__main__":
    main()
