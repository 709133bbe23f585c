import os
import sys

from hypothesis import settings

# Tests import the numpy oracle as a plain module.
sys.path.insert(0, os.path.dirname(__file__))

# Deterministic property tests: the same examples on every run and in CI.
settings.register_profile("gbjax", derandomize=True, print_blob=True)
settings.load_profile("gbjax")

# XLA compiles dominate the suite's time on 2 CPU cores, and many tests compile the
# same programs (same models, shapes and attacks). JAX's persistent compilation cache
# (keyed by the program, the jax version and the flags; shared by the xdist workers)
# lets a test reuse another's executable. Results are unaffected: a hit returns the
# executable the same program would compile to. $GBJAX_TEST_JAX_CACHE overrides the
# folder; an empty value turns the cache off. The settings also go into the
# environment, where JAX reads its flags' defaults at import: the processes that
# tests spawn (two trainings or evaluation parts at once, the process_parallel
# benchmark's children) then share the cache too.
_JAX_CACHE = os.environ.get(
    "GBJAX_TEST_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "jax-tests")
)
if _JAX_CACHE:
    _settings = {
        "jax_compilation_cache_dir": os.path.abspath(_JAX_CACHE),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    for _name, _value in _settings.items():
        os.environ[_name.upper()] = str(_value)
    import jax

    for _name, _value in _settings.items():
        jax.config.update(_name, _value)

# Where the suite's time goes: with $GBJAX_TEST_COMPILE_PROFILE set to a folder, each
# pytest process (every xdist worker) writes there, per test, the seconds JAX reports
# for tracing, lowering and XLA compilation (jax.monitoring duration events; spawned
# processes are not counted), the seconds and count of each compiled program by name,
# and the test's start and end (wall clock). benchmarks/suite_profile.py sums them beside
# the tests' durations. Off by default: it only observes, and changes no result.
_PROFILE = os.environ.get("GBJAX_TEST_COMPILE_PROFILE")
if _PROFILE:
    import collections
    import json
    import time

    import jax
    import pytest

    _COMPILE = "/jax/core/compile/backend_compile_duration"
    _current = ["<outside tests>"]
    _seconds = collections.defaultdict(lambda: collections.defaultdict(float))
    _programs = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
    _spans = {}

    def _listen(event, duration, **kw):
        _seconds[_current[0]][event] += duration
        if event == _COMPILE:
            program = _programs[_current[0]][str(kw.get("fun_name", "?"))]
            program[0] += duration
            program[1] += 1

    jax.monitoring.register_event_duration_secs_listener(_listen)

    @pytest.fixture(autouse=True)
    def _compile_profile(request):
        _current[0] = request.node.nodeid
        start = time.time()
        yield
        _spans[request.node.nodeid] = (start, time.time())
        _current[0] = "<outside tests>"

    def pytest_sessionfinish(session):
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        os.makedirs(_PROFILE, exist_ok=True)
        with open(os.path.join(_PROFILE, f"compile_{worker}.json"), "w") as f:
            json.dump(
                dict(
                    worker=worker,
                    events={k: dict(v) for k, v in _seconds.items()},
                    programs={k: dict(v) for k, v in _programs.items()},
                    spans=_spans,
                ),
                f,
                indent=0,
            )
