"""Transparent huge pages for the CPU allocations of training processes (megamoe.engine.host_memory)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megamoe.engine.host_memory import THP_ENV, enable_transparent_huge_pages

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# What `megamoe train` does: import the CLI and the training code, switch huge pages on, then allocate.
ALLOCATE_AFTER_TRAIN_IMPORTS = """
import megamoe.cli, megamoe.train
from megamoe.engine.host_memory import enable_transparent_huge_pages
print(enable_transparent_huge_pages())
import torch
x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
rollup = open("/proc/self/smaps_rollup").read().splitlines()
print(next(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages:")))
"""


@pytest.mark.skipif(
    not THP_MODE.exists() or "[never]" in THP_MODE.read_text(),
    reason="the kernel has no transparent huge pages",
)
def test_train_process_backs_large_cpu_tensors_with_huge_pages():
    env = {key: value for key, value in os.environ.items() if key != THP_ENV}
    out = subprocess.run(
        [sys.executable, "-c", ALLOCATE_AFTER_TRAIN_IMPORTS],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    enabled, huge_kib = out[-2], int(out[-1])
    assert enabled == "True"
    # The 64 MiB tensor sits in 2 MiB pages (all but a partial first and last one at most).
    assert huge_kib >= 60 * 1024, f"only {huge_kib} KiB in huge pages"


def test_a_value_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv(THP_ENV, "0")
    assert enable_transparent_huge_pages() is False
    assert os.environ[THP_ENV] == "0"
    monkeypatch.delenv(THP_ENV)
    assert enable_transparent_huge_pages() is True
    assert os.environ[THP_ENV] == "1"
