"""Where the test suite's time goes: XLA compilation against everything else.

Run the suite with the profile on and ``--durations=0``, keeping its output::

    GBJAX_TEST_COMPILE_PROFILE=/tmp/prof GBJAX_DATA_DIR=../shared/data \\
        python -m pytest -q -n auto --dist worksteal --durations=0 | tee /tmp/suite.txt
    python benchmarks/suite_profile.py /tmp/prof /tmp/suite.txt

It prints the sum of the tests' durations, the seconds JAX spent tracing, lowering and
compiling inside them (per test, the slowest first, then per file) and the share of
compilation. Processes the tests spawn (notebook kernels, parallel trainings) are in
the durations but not in the compile seconds, so the share is a lower bound.
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
    for f in sorted(args.profile_dir.glob("compile_*.json")):
        events.update(json.loads(f.read_text()))
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
    return dict(tests=len(rows), seconds=total, compile_seconds=comp, lower_seconds=low)


if __name__ == "__main__":
    main()
