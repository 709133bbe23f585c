"""Per-compilation XLA options for convolutional networks on CPU.

Measured on the 2-core development CPU (``benchmarks/train_throughput.py
--xla-options``): routing XLA:CPU's dot and convolution fusions through the
YNNPACK library (``xla_cpu_experimental_ynn_fusion_type=dot``) trains the
airbench network about 1.6x faster (the README's training-throughput table
gives the figure per model). The option is passed
to the ``jax.jit`` of the conv-net training step, evaluation and attacks only,
never set process-wide, and never when the user's ``XLA_FLAGS`` already choose
a YNN fusion type or ``GBJAX_XLA_CPU_OPTIONS=0``.

The backend is looked up on first call, not at import, so importing gbjax does
not initialise JAX (users may still configure devices after importing it).
"""

from __future__ import annotations

import functools
import os

import jax

from gbjax._checks import is_traced

__all__ = ["conv_options", "conv_jit", "relieve_map_pressure"]

_YNN = "xla_cpu_experimental_ynn_fusion_type"


def conv_options() -> dict | None:
    """Compiler options for conv-net programs on this backend (``None``: none)."""
    if os.environ.get("GBJAX_XLA_CPU_OPTIONS", "1") == "0":
        return None
    if _YNN in os.environ.get("XLA_FLAGS", ""):
        return None
    if jax.default_backend() != "cpu":
        return None
    return {_YNN: "LIBRARY_FUSION_TYPE_DOT"}


def conv_jit(fun=None, **jit_kwargs):
    """``jax.jit(fun, compiler_options=conv_options(), **jit_kwargs)``, built on first call.

    Usable as a decorator, with or without keyword arguments.
    """
    if fun is None:
        return functools.partial(conv_jit, **jit_kwargs)
    compiled = []
    nested = jax.jit(fun, **jit_kwargs)  # inside a caller's jit: options are the caller's

    @functools.wraps(fun)
    def call(*args, **kwargs):
        if any(is_traced(a) for a in jax.tree.leaves((args, kwargs))):
            return nested(*args, **kwargs)
        if not compiled:
            compiled.append(jax.jit(fun, compiler_options=conv_options(), **jit_kwargs))
        return compiled[0](*args, **kwargs)

    return call


# Compiled-code memory.  XLA:CPU maps the code of every compiled program into
# the process in many small memory mappings (measured here: about 650 per
# granular-ball program of a 32x32 batch), and Linux caps the mappings of a
# process (``vm.max_map_count``, 65,530 by default).  A long attack sweep over a
# GB-defended model compiles a program per attack, protocol, eps bucket and
# batch size, and crossed that cap after about 100 programs: LLVM aborts the
# process ("Unable to allocate section memory").  ``jax.clear_caches()`` unmaps
# them (measured: back to the count before the compiles), at the cost of
# recompiling what is used again, so it is done only when the count nears the cap.


def _map_counts() -> tuple[int, int] | None:
    """(mappings of this process, the kernel's cap), or None where unknown (not Linux)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            cap = int(f.read())
        with open("/proc/self/maps", "rb") as f:
            n = sum(1 for _ in f)
    except (OSError, ValueError):
        return None
    return n, cap


def relieve_map_pressure(fraction: float = 0.5) -> bool:
    """Clears JAX's compilation caches when this process uses over ``fraction`` of its
    memory-mapping cap; returns whether it did. Cheap (reads ``/proc/self/maps``);
    a no-op where the counts are unknown. Called between the stages of long attack
    sweeps, where each stage compiles new programs."""
    counts = _map_counts()
    if counts is None or counts[0] <= fraction * counts[1]:
        return False
    import gc

    jax.clear_caches()
    gc.collect()
    return True
