"""Numba's on-disk cache, kept true to this package's sources.

Owns refresh. Numba keys each cached function on its own source file alone: a function whose file did
not change is loaded with the code of the helpers and intrinsics it was compiled with, even where their
files changed since (Numba's docs list it under the cache's limitations). With an editable install
updated by `git pull`, an edit to simd.py or int8dot.py alone would leave moe.py's and widen.py's callers
running the old kernels. So the package's sources are hashed together at import, and where the digest
differs from the one stamped beside the cache, every cached function of the package is dropped first
(compiled again on first use, as on a fresh machine). Imports nothing from hybrid/.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

STAMP = "kernels_cpu.sources"  # the digest the cache beside it was compiled from


def sources_digest(package: Path) -> str:
    """sha256 over the package's .py files, by name and content."""
    h = hashlib.sha256()
    for f in sorted(package.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def refresh(package: Path, cache: Path) -> bool:
    """Drop the cached functions (.nbi indexes, .nbc code) of package's modules from the cache directory
    where its stamp is missing or names other sources, then stamp it. -> whether anything was dropped.
    A cache directory that cannot be written is left as it is (Numba cannot save there either)."""
    digest = sources_digest(package)
    stamp = cache / STAMP
    try:
        if stamp.read_text() == digest:
            return False
    except OSError:
        pass
    modules = {f.stem for f in package.glob("*.py")}
    dropped = False
    try:
        cache.mkdir(parents=True, exist_ok=True)  # a fresh machine: stamped before Numba fills it
        for f in cache.iterdir():
            if f.suffix in (".nbi", ".nbc") and f.name.split(".", 1)[0] in modules:
                f.unlink(missing_ok=True)  # another process may be dropping it too
                dropped = True
        tmp = cache / f"{STAMP}.{os.getpid()}.tmp"
        tmp.write_text(digest)
        os.replace(tmp, stamp)
    except OSError:
        pass
    return dropped
