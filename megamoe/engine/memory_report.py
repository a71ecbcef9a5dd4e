"""One line per phase of a run's start (model built, engine ready, first step) with the process's peak memory,
so a job that is going to run out of memory shows where before it dies."""

import resource

import torch

_GIB = 2**30


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_line(phase: str) -> str:
    """``memory: <phase>, peak RSS <x> GiB`` (+ ``(GPU <y> GiB)``, the peak allocated on this rank's device)."""
    line = f"memory: {phase}, peak RSS {peak_rss_bytes() / _GIB:.2f} GiB"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        line += f" (GPU {torch.cuda.max_memory_allocated() / _GIB:.2f} GiB)"
    return line
