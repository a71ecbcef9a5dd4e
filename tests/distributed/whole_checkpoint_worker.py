"""Each rank picks the checkpoint to resume from in ``--run-dir`` and writes it to ``--out``
(run by test_resume_fallback.py)."""

import argparse
from pathlib import Path

import torch.distributed as dist

from megamoe.checkpoint.resume import newest_whole_checkpoint
from megamoe.engine.distributed import init_distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    init_distributed(timeout_minutes=1)
    chosen = newest_whole_checkpoint(args.run_dir)
    (args.out / f"chosen_rank{dist.get_rank()}.txt").write_text(chosen.name)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
