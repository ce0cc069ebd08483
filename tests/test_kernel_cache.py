"""Numba's on-disk cache follows every kernel source (kernels_cpu/cachestamp.py): a caller whose own file did
not change must not keep running a changed helper's old code."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from kernels_cpu import cachestamp


def _package(root: Path, k: int) -> Path:
    """A two-module package: caller.run() returns helper.K through an @njit call chain across the files."""
    pkg = root / "kpkg"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text(textwrap.dedent(f"""
        from numba import njit
        K = {k}
        @njit(cache=True)
        def value():
            return K
        """))
    (pkg / "caller.py").write_text(textwrap.dedent("""
        from numba import njit
        from kpkg.helper import value
        @njit(cache=True)
        def run():
            return value() + 0
        """))
    return pkg


def _run(root: Path, refresh: bool) -> int:
    """caller.run() in a fresh process, with or without cachestamp.refresh over the package first."""
    code = textwrap.dedent(f"""
        import sys; from pathlib import Path
        from kernels_cpu import cachestamp
        from kpkg import caller
        if {refresh}:
            cachestamp.refresh(Path(caller.__file__).parent, Path(caller.run._cache._cache_path))
        print(caller.run())
        """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(Path(__file__).parents[1])]))
    env.pop("NUMBA_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_a_changed_helper_reaches_a_cached_caller(tmp_path):
    """After only the helper's file changed, Numba alone serves the caller's cached code (checked on 0.68: the
    old value); with the refresh the caller is compiled again and returns the new one. Unchanged sources keep
    the cache."""
    pkg = _package(tmp_path, 1)
    assert _run(tmp_path, refresh=False) == 1
    _package(tmp_path, 2)  # only helper.py changes
    assert _run(tmp_path, refresh=True) == 2  # Numba 0.68 alone: 1, the caller's cached code
    cache = pkg / "__pycache__"
    kept = sorted(f.name for f in cache.iterdir() if f.suffix in (".nbi", ".nbc"))
    assert kept and cachestamp.refresh(pkg, cache) is False  # stamped: nothing dropped again
    assert sorted(f.name for f in cache.iterdir() if f.suffix in (".nbi", ".nbc")) == kept
    assert (cache / cachestamp.STAMP).read_text() == cachestamp.sources_digest(pkg)


def test_refresh_drops_only_the_packages_compiled_functions(tmp_path):
    """A missing stamp or other sources drop the package's .nbi and .nbc files, and nothing else: Python's
    own .pyc and other packages' entries stay. A directory that does not exist yet is made and stamped."""
    pkg = _package(tmp_path, 1)
    cache = tmp_path / "cache" / "deep"
    assert cachestamp.refresh(pkg, cache) is False and (cache / cachestamp.STAMP).exists()
    ours = ["caller.run-5.py311.nbi", "caller.run-5.py311.1.nbc", "helper.value-5.py311.nbi"]
    others = ["caller.cpython-311.pyc", "other.f-1.py311.nbi", "notes.txt"]
    for name in ours + others:
        (cache / name).write_bytes(b"x")
    assert cachestamp.refresh(pkg, cache) is False  # the stamp matches: kept
    (pkg / "helper.py").write_text((pkg / "helper.py").read_text() + "\n# changed\n")
    assert cachestamp.refresh(pkg, cache) is True
    assert sorted(f.name for f in cache.iterdir()) == sorted(others + [cachestamp.STAMP])


def test_importing_the_kernels_stamps_their_cache():
    """kernels_cpu's import runs the refresh against the directory Numba caches its kernels in."""
    import kernels_cpu
    from kernels_cpu.membw import read_sum

    cache = Path(read_sum._cache._cache_path)
    assert (cache / cachestamp.STAMP).read_text() == cachestamp.sources_digest(Path(kernels_cpu.__file__).parent)
