"""Peak anonymous memory of `save_pretrained` on a MegaMoE whose weights are memory-mapped (what `megamoe
export` hands it), for an HF MoE backbone and for a native MegaMoE of about the same size.

    python bench/save_memory.py [--kind hf_moe megamoe]

The weights are saved once with torch.save and loaded back with ``mmap=True`` onto a meta-device model, so
anything above zero is memory that `save_pretrained` itself allocates (a sampler thread reads RssAnon every
2 ms). The HF MoE backbone is the bf16 Qwen3-MoE of bench/load_memory.py's ``300m`` size.
"""

import argparse
import tempfile
import threading
import time
from pathlib import Path

import torch
from load_memory import SIZES, write_checkpoint  # bench/ is this script's directory

_GIB = 2**30
TASKS = {"topic": {"type": "sequence_classification", "labels": ["a", "b"]}}


def rss_anon() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon"))


def build(kind: str, directory: Path):
    from megamoe import MegaMoEConfig, MegaMoEForMultiTask
    from megamoe.sources.hf_moe import load_hf_moe

    if kind == "megamoe":  # the same widths, depth and experts as the HF MoE checkpoint
        config = MegaMoEConfig(
            vocab_size=32000, num_attention_heads=8, intermediate_size=1024, tasks=TASKS, **SIZES["300m"]
        )
        return MegaMoEForMultiTask(config).to(torch.bfloat16)
    write_checkpoint(directory / "published", "300m")
    return load_hf_moe(str(directory / "published"), tasks=TASKS, dtype=torch.bfloat16)


def measure(kind: str) -> None:
    from accelerate import init_empty_weights

    from megamoe import MegaMoEForMultiTask

    with tempfile.TemporaryDirectory(prefix="megamoe-save-memory-", dir=Path.cwd()) as tmp:
        directory = Path(tmp)
        model = build(kind, directory)
        torch.save(model.state_dict(), directory / "states.pt")
        config = model.config
        del model
        with init_empty_weights(include_buffers=False):
            mapped = MegaMoEForMultiTask(config)
        state = torch.load(directory / "states.pt", mmap=True, weights_only=True)
        mapped.load_state_dict(state, assign=True, strict=False)
        weights = sum(p.numel() * p.element_size() for p in mapped.parameters())
        peak, done = [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_anon())
                time.sleep(0.002)

        start = rss_anon()
        sampler = threading.Thread(target=sample)
        sampler.start()
        mapped.save_pretrained(directory / "saved", max_shard_size="200MB")
        done.set()
        sampler.join()
        print(
            f"{kind}: weights {weights / _GIB:.3f} GiB, save_pretrained peak RssAnon +{(peak[0] - start) / _GIB:.3f} GiB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", nargs="+", choices=["hf_moe", "megamoe"], default=["hf_moe", "megamoe"])
    for kind in parser.parse_args().kind:
        measure(kind)


if __name__ == "__main__":
    main()
