"""The command line's persistent XLA compilation cache.

A bound program is large (the zonotope bound of the two-layer tiny-BERT is
about 35,000 JAX operations) and XLA takes most of a command's time compiling
it. The executable depends only on the program, the compile options and the
device, so ``diverify`` stores it on disk (JAX's persistent compilation
cache) and a later command with the same model, method, precision and input
shapes loads it instead of compiling. Loading returns the executable XLA
produced before: the bounds are the same numbers, bit for bit.

Where: ``$DIVERIFY_CACHE_DIR`` when set (``off``, ``0``, ``none``, ``no``,
``false`` or an empty value disable the cache), else
``$XDG_CACHE_HOME/diverify/xla`` (``~/.cache/diverify/xla``). A directory that
cannot be created leaves the cache off. A ``JAX_COMPILATION_CACHE_DIR`` set by
the user wins over both.

Every program is written, however short its compilation (:data:`MIN_COMPILE_SECONDS`):
besides the bound, a command compiles dozens of small helper programs (loading,
the clean forward pass, checks), each in 5-250 ms; tiny-BERT's ``diverify bounds``
spends ~0.6 s on them, so loading them too takes a cached command from 4.2 to
3.6 s. They are a few KB each (tiny-BERT's command leaves 1.5 MB, the bound's
1.1 MB of it). Nothing is evicted: delete the directory to reclaim its space.
(JAX's size-limited cache is not used: it keeps an access-time file per entry and
fails to write, with a warning per program, in a directory that an unlimited
cache filled before.)
"""

from __future__ import annotations

import os
from pathlib import Path

#: The environment variable that moves (or, set to ``off``, disables) the cache.
ENV = "DIVERIFY_CACHE_DIR"
#: Values of :data:`ENV` that disable the cache.
OFF = frozenset({"", "0", "off", "none", "no", "false"})
#: Compilations shorter than this are not written to the cache (0: all of them, see the module docstring).
MIN_COMPILE_SECONDS = 0.0


def cache_dir(environ=None) -> Path | None:
    """The cache directory the environment asks for, or None when it is disabled."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in OFF else Path(value).expanduser()
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "diverify" / "xla"


def enable(path: Path, min_compile_seconds: float = MIN_COMPILE_SECONDS) -> bool:
    """Point JAX's persistent compilation cache at ``path`` (created if missing).

    Returns False, leaving JAX's configuration alone, when ``path`` cannot be created.
    """
    import jax

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    return True


def enable_from_environment(environ=None) -> Path | None:
    """Enable the cache where the environment says (see the module docstring); the directory used, or None."""
    environ = os.environ if environ is None else environ
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(environ["JAX_COMPILATION_CACHE_DIR"])
    path = cache_dir(environ)
    if path is None or not enable(path):
        return None
    return path
