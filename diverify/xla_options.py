"""XLA compiler options for diverify's compiled programs, and their ahead-of-time compilation
(:func:`compile`: the compiler's freed heap released before a large program runs).

On the CPU, XLA (jaxlib 0.10) hands elementwise, reduction and dot fusions to
the YNNPACK library by default. On diverify's float32 programs that is slower: YNNPACK
packs operands into freshly allocated buffers on every call, and the kernel
spends its time zeroing new pages (``perf``: 20% of the tiny-BERT bound
command in ``clear_page_erms`` under ``ynn::packer::pack``). With YNNPACK
fusions off (``xla_cpu_experimental_ynn_fusion_type=""``, XLA's own fused
loops and Eigen dots instead) the tiny-BERT zonotope bound takes 0.40-0.48 s
instead of 1.1-1.4 s (its first call 0.5-0.8 s instead of 3.0-3.4 s), and a
MiniLM forward of one sentence 4.8 ms instead of 6.6 ms. On the large float64
programs it is the other way round: YNNPACK's elementwise fusions are faster
there (the digits UNet's step bound: 14 s a step with them, 25 s without; the
6-layer MiniLM crown-zonotope bound: 60 s with, 70 s without, though 8.6
instead of 10.2 GB peak). So the options apply to float32 programs only (see
``benchmarks/RESULTS.md``, "Stop 21").

Programs that carry forward linear bounds with interval slack (the engine's
``forward`` intermediate bounds: methods ``forward`` and ``crown-forward``) also
turn off XLA:CPU's fusion emitters (:data:`FORWARD_CPU_OPTIONS`). Their slack is a
long chain of small elementwise maps, one per node, that XLA fuses into single
kernels of ~1500 operations; the fusion emitters evaluate such a kernel with one
call per operation and no reuse of a value read at two indices, so the work grows
exponentially with the chain's depth. A 2 x 2 program of five blocks with two
maxima (``tests.bounds.random_programs`` seed 11), ``forward`` in mixed precision,
compiled in 28 s and then ran for more than 10 min; without the fusion emitters it
compiles in 8.8 s and runs in 2 ms. Only there: turning them off costs tiny-BERT's
``forward`` bound ~1 s of compilation (8.2 -> 9.2-9.9 s), but its CROWN bound 19 -> 30 s
(``benchmarks/RESULTS.md``, "stop 35").

The options are passed per compilation (``jax.jit(..., compiler_options=)``),
never through ``XLA_FLAGS``, so they apply to diverify's own programs only,
and an XLA that does not know an option (it is named "experimental") is
detected once by compiling a trivial function and then simply not given it:
the programs compute the same function either way, only their speed differs.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

#: XLA:CPU options diverify compiles its float32 programs with (when the backend accepts them).
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
#: XLA:CPU options of the programs whose bounds carry forward interval slack (see the module docstring).
FORWARD_CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def compiler_options(dtype: Any = jnp.float32, forward_slack: bool = False) -> dict[str, Any]:
    """The options for a program computing in ``dtype``: :data:`CPU_OPTIONS` for float32, and
    :data:`FORWARD_CPU_OPTIONS` when it propagates ``forward_slack``, each when this process's
    default backend accepts it, else none."""
    options = _accepted(tuple(CPU_OPTIONS.items())) if jnp.dtype(dtype) == jnp.float32 else {}
    if forward_slack:
        options = {**options, **_accepted(tuple(FORWARD_CPU_OPTIONS.items()))}
    return dict(options)


@functools.cache
def _accepted(options: tuple) -> dict[str, Any]:
    """``dict(options)`` (``(name, value)`` pairs) if the default backend is the CPU and its XLA accepts
    them, else none; probed once per set of options."""
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options))(jnp.zeros((), jnp.float32)).block_until_ready()
    except Exception:  # an XLA without the option: "No such compile option"
        return {}
    return dict(options)


def jit(fn: Callable, dtype: Any = jnp.float32, forward_slack: bool = False, **kwargs) -> Callable:
    """``jax.jit(fn, **kwargs)`` with the :func:`compiler_options` of a program computing in ``dtype``
    (and propagating ``forward_slack``)."""
    return jax.jit(fn, compiler_options=compiler_options(dtype, forward_slack) or None, **kwargs)


#: :func:`compile` releases the freed heap when the program's temporaries reach this many bytes.
RELEASE_FOR_TEMP_BYTES = 1 << 30


def compile(lowered) -> jax.stages.Compiled:
    """``lowered.compile()``, then, for a program whose temporaries reach
    :data:`RELEASE_FOR_TEMP_BYTES` (XLA's memory analysis), the heap the compiler freed
    handed back to the OS (:func:`release_freed_heap`).

    XLA's compiler allocates many small objects; glibc keeps their freed pages in
    its arenas, where the large buffers of the run (allocated by ``mmap``) cannot
    use them. So a process that compiles a large bound and then runs it peaks at
    the compiler's leftovers plus the run's buffers: the 6-layer MiniLM
    crown-zonotope bound (float64, 3.9 GB of temporaries) peaked at 10.2 GB, 5.0 GB
    resident after compiling and 2.5 GB after the release, 7.7 GB at its peak
    (``benchmarks/RESULTS.md``, "Stop 29"). Small programs keep the pages: their later
    allocations reuse them, and releasing them after every compilation made
    ``tests/bounds/test_api.py`` 13% slower (re-faulting the pages).
    """
    compiled = lowered.compile()
    analysis = compiled.memory_analysis()
    if analysis is not None and getattr(analysis, "temp_size_in_bytes", 0) >= RELEASE_FOR_TEMP_BYTES:
        release_freed_heap()
    return compiled


def release_freed_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc's ``malloc_trim(0)``); False where the C
    library has no such call (not glibc), where it is a no-op."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
