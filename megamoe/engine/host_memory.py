"""Host (CPU) memory settings of training processes: a caching allocator and transparent huge pages.

A training step allocates its weight gradients and large activations afresh, and glibc returns blocks above
32 MB to the kernel when they are freed, so every page of them faults (and is zeroed) again on the next step:
96 MB of expert weight gradients per MoE layer at 64 experts. Two remedies, both on by default for
``megamoe train`` on CPU, measured on the quickstart in docs/benchmarks.md:

* tcmalloc (or jemalloc) preloaded in place of glibc's malloc keeps freed pages for the next step: no faults.
  A library cannot be swapped in once the process runs, so ``megamoe train`` restarts itself once with the
  library in ``LD_PRELOAD`` (``restart_with_caching_allocator``), the way PyTorch's own CPU launcher
  ``torch.backends.xeon.run_cpu`` preloads it.
* PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` backs its allocations of 2 MB and more with transparent huge pages: 512
  times fewer faults where pages are still fresh.
"""

import ctypes.util
import os
import sys
from pathlib import Path

THP_ENV = "THP_MEM_ALLOC_ENABLE"
ALLOCATOR_ENV = "MEGAMOE_CPU_ALLOCATOR"
# Set in the restarted process: the library it asked for, so a preload that did not take is not retried.
_RESTARTED_ENV = "MEGAMOE_CPU_ALLOCATOR_PRELOADED"
# Shared-library names of each allocator, best first, as Debian/Ubuntu (libtcmalloc-minimal4,
# libgoogle-perftools4, libjemalloc2), Fedora (gperftools-libs, jemalloc) and conda-forge name them.
ALLOCATOR_LIBRARIES = {
    "tcmalloc": ("tcmalloc_minimal", "tcmalloc"),
    "jemalloc": ("jemalloc",),
}
ALLOCATOR_CHOICES = ("auto", "system", *ALLOCATOR_LIBRARIES)
INSTALL_HINT = "apt install libtcmalloc-minimal4, dnf install gperftools-libs or conda install gperftools"


def enable_transparent_huge_pages() -> bool:
    """Ask PyTorch to back its CPU allocations of 2 MB and more with transparent huge pages; True if on.

    PyTorch's switch ``THP_MEM_ALLOC_ENABLE=1`` aligns those blocks to 2 MB and marks them for huge pages (where
    the kernel's THP mode is ``madvise`` or ``always``). Measured on 2 CPU cores with glibc's malloc: the
    quickstart's first 40 steps took 40-41 s instead of 49-51 s (two A/B pairs), the whole run 356 s instead
    of 413 s, with identical losses and metrics. GPU runs are unaffected (device memory has its own
    allocator). A value the user set, ``0`` included, is kept.

    PyTorch reads the variable at its first CPU allocation: call this before the process makes a tensor.
    """
    os.environ.setdefault(THP_ENV, "1")
    return os.environ[THP_ENV] == "1"


def caching_allocator_in_use() -> str | None:
    """The caching allocator this process runs on ("tcmalloc" or "jemalloc"), None for the system's malloc."""
    try:
        mapped = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return None
    return next((name for name in ALLOCATOR_LIBRARIES if f"lib{name}" in mapped), None)


def find_allocator_library(name: str) -> str | None:
    """The library to preload for allocator ``name``: in this environment (conda) or the system's, else None."""
    for stem in ALLOCATOR_LIBRARIES[name]:
        if in_environment := sorted(Path(sys.prefix, "lib").glob(f"lib{stem}.so*")):
            return str(in_environment[0])
        # ldconfig's cache: a bare soname, which the dynamic linker finds on its own search path.
        if (soname := ctypes.util.find_library(stem)) is not None:
            return soname
    return None


def caching_allocator_choice(choice: str | None = None) -> str:
    """``choice``, else ``$MEGAMOE_CPU_ALLOCATOR``: auto (tcmalloc, else jemalloc, else the system's), tcmalloc,
    jemalloc or system."""
    if choice is None:
        choice = os.environ.get(ALLOCATOR_ENV, "auto").strip().lower() or "auto"
    if choice not in ALLOCATOR_CHOICES:
        raise ValueError(f"{ALLOCATOR_ENV}={choice!r}: use one of {', '.join(ALLOCATOR_CHOICES)}")
    return choice


def restart_with_caching_allocator(choice: str | None = None) -> None:
    """Re-execute this process's command line with tcmalloc or jemalloc preloaded; return if there is no need.

    ``choice`` is one of ``ALLOCATOR_CHOICES``; None reads ``$MEGAMOE_CPU_ALLOCATOR`` (default ``auto``).
    Returns at once when the allocator is already loaded, when the choice is ``system``, when
    this process was restarted already, and (``auto``) when no library is installed. Raises ``ValueError``
    when a named allocator is not installed. Only a process whose whole command line is a ``megamoe train``
    may call this: its argv runs again from the start, under the same PID (launchers keep waiting on it).
    """
    choice = caching_allocator_choice(choice)
    if choice == "system" or caching_allocator_in_use() or os.environ.get(_RESTARTED_ENV):
        return
    names = tuple(ALLOCATOR_LIBRARIES) if choice == "auto" else (choice,)
    library = next((lib for name in names if (lib := find_allocator_library(name))), None)
    if library is None:
        if choice != "auto":
            raise ValueError(f"{ALLOCATOR_ENV}={choice}: lib{choice} is not installed ({INSTALL_HINT})")
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(filter(None, (library, env.get("LD_PRELOAD"))))
    env[_RESTARTED_ENV] = library
    # tcmalloc reports every allocation above 1 GB on stderr: a checkpoint load is not news.
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(2**40))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def describe_host_memory() -> str:
    """One line for the run log: which allocator and whether huge pages are on."""
    allocator = caching_allocator_in_use()
    if allocator is None:
        allocator = "system malloc"
        if caching_allocator_choice() == "auto":
            allocator += f" (tcmalloc is faster: {INSTALL_HINT})"
    huge_pages = "on" if os.environ.get(THP_ENV) == "1" else "off"
    return f"host memory: {allocator}, transparent huge pages {huge_pages}"
