"""The command line's persistent compilation cache: where it goes, that the CLI turns it on, and that a
bound loaded from it is the bound compiled before, bit for bit."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from diverify import cli, compile_cache


def test_cache_dir_follows_the_environment(tmp_path):
    assert compile_cache.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "diverify" / "xla"
    assert compile_cache.cache_dir({compile_cache.ENV: str(tmp_path / "c")}) == tmp_path / "c"
    for off in ("off", "OFF", "0", "", "none", "false", "no"):
        assert compile_cache.cache_dir({compile_cache.ENV: off, "XDG_CACHE_HOME": str(tmp_path)}) is None


def test_an_uncreatable_directory_leaves_the_cache_off(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert compile_cache.enable(blocker / "xla") is False
    assert compile_cache.enable_from_environment({compile_cache.ENV: str(blocker / "xla")}) is None


def test_a_users_jax_cache_setting_wins(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(compile_cache, "enable", lambda path, *a: calls.append(path) or True)
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax"), compile_cache.ENV: str(tmp_path / "ours")}
    assert compile_cache.enable_from_environment(env) == tmp_path / "jax"
    assert calls == []


def test_every_command_runs_with_the_cache_the_environment_names(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(compile_cache, "enable", lambda path, *a: calls.append(path) or True)
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "xla"))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert cli.main(["bounds", "--ids", "101,102", "--positions", "0", "--eps", "-1"]) == 2  # bad eps: clear error
    assert calls == [tmp_path / "xla"]
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert cli.main(["bounds", "--ids", "101,102", "--positions", "0", "--eps", "-1"]) == 2
    assert calls == [tmp_path / "xla"]


_BOUND_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from diverify import compile_cache
    assert compile_cache.enable(Path(sys.argv[1]))  # the defaults: short compilations are written too
    import jax, jax.numpy as jnp
    from diverify.bounds import compile_bounds
    from diverify.specs import lp_ball

    w = jax.random.normal(jax.random.PRNGKey(0), (6, 6))
    fn = lambda x: jnp.tanh(w @ jnp.tanh(w @ x)).sum() + jnp.exp(x[0]) * x[1]
    ball = lp_ball(jnp.linspace(-0.5, 0.5, 6), 0.05)
    res, _, _ = compile_bounds(fn, ball, method="zonotope").timed(ball)
    print(json.dumps([float(res.output.lower), float(res.output.upper)]))
""")


def test_a_cached_bound_is_the_compiled_bound(tmp_path):
    """Two processes, the second loading the executable the first wrote: identical bounds."""
    cache = tmp_path / "xla"
    script = tmp_path / "bound.py"
    script.write_text(_BOUND_SCRIPT)
    first = subprocess.run([sys.executable, str(script), str(cache)], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    executables = lambda: {p.name: p.stat().st_mtime_ns for p in Path(cache).iterdir()}  # noqa: E731
    entries = executables()
    assert any(name.startswith("jit_unchecked") for name in entries), entries  # a bound compiled in well under 1 s
    second = subprocess.run([sys.executable, str(script), str(cache)], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    # A hit: the second process read the executables and wrote none (a miss would rewrite its entry).
    assert executables() == entries
    lo, hi = json.loads(first.stdout.strip().splitlines()[-1])
    assert lo < hi
    assert json.loads(second.stdout.strip().splitlines()[-1]) == [lo, hi]


def test_a_directory_filled_before_takes_new_entries_without_warnings(tmp_path):
    """An entry left by an earlier version (no side files of any kind) must not make later writes fail."""
    cache = tmp_path / "xla"
    cache.mkdir()
    (cache / "jit_old-0123456789abcdef-cache").write_bytes(b"an entry written before")
    script = tmp_path / "bound.py"
    script.write_text(_BOUND_SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(cache)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "persistent compilation cache" not in run.stderr, run.stderr
    assert any(p.name.startswith("jit_unchecked") for p in cache.iterdir())
