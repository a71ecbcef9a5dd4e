"""Model FLOP utilization of `megamoe train` on one GPU: a ~1 B-parameter MegaMoE against its dense twin.

    python bench/gpu_mfu.py OUT_DIR [--steps 60 --skip 20 --micro-batch 8 ...]

Trains, through `megamoe train` and the DeepSpeed engine in bf16 (one rank, ZeRO-1), two models from scratch
on the builtin topic data (bbc_news articles, which fill long sequences) with the committed SentencePiece
tokenizer:

* ``moe``:   E=16 experts, top-2, d=2048, 12 layers, 16 heads, every layer MoE, sequence length 1024
             (expert width 768: ~1.1 B parameters in all, ~0.35 B active per token);
* ``dense``: the same model with one dense FFN of width top_k x expert width in every layer: the same active
             parameters per token, so the same FLOPs.

Each run is `bench/train_throughput.py` in its own process (its own CUDA memory peak), whose JSON is kept in
OUT_DIR. Printed and written to ``OUT_DIR/gpu_mfu.json``: tokens/s (padded and real), achieved TFLOP/s, MFU
against the device's bf16 peaks and peak memory, for both, and the MoE/dense step-time ratio. Issue 13's target:
MFU >= 40 % for the MoE (Megatron-Core reports 49 % for Mixtral-8x22B on H100s). On a CPU it runs too (use
``--tiny``), which is how it is checked without a GPU.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent

ARCHITECTURE = {
    "hidden_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "moe_intermediate_size": 768,
    "num_experts": 16,
    "num_experts_per_tok": 2,
    "moe_layer_freq": 1,
    "max_position_embeddings": 1024,
    "norm_position": "pre",
    "norm_type": "rmsnorm",
    "mlp_type": "glu",
    "hidden_act": "silu",
    "position_embedding_type": "rope",
}
# A model small enough for a CPU: the same script end to end, for checking it without a GPU.
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "moe_intermediate_size": 32}


def run_config(architecture: dict, run_dir: Path, args: argparse.Namespace) -> dict:
    return {
        "run_dir": str(run_dir),
        "model": {
            "init": "scratch",
            "tokenizer": str(REPO / "tokenizer" / "default"),
            "architecture": architecture,
        },
        "tasks": {"topic": {"type": "sequence_classification", "source": "builtin:bbc_news"}},
        "data": {"max_length": args.seq_len},
        "train": {
            "max_steps": args.steps,
            "micro_batch_size": args.micro_batch,
            "lr": 3.0e-4,
            "warmup_ratio": 0.05,
            "precision": "bf16",
            "eval_every": 0,
        },
        "parallel": {"expert_parallel_size": 1, "zero_stage": 1},
        "checkpoint": {"every_steps": 0},
        "logging": {"every_steps": 10},
    }


def dense_twin(architecture: dict) -> dict:
    """The same model with a dense FFN of the MoE's active width in every layer."""
    dense = {k: v for k, v in architecture.items() if k not in ("num_experts", "num_experts_per_tok")}
    dense["moe_layer_freq"] = 0
    dense["intermediate_size"] = architecture["num_experts_per_tok"] * architecture["moe_intermediate_size"]
    return dense


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=20, help="warm-up steps left out of the timings")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument(
        "--tiny", action="store_true", help="a model small enough for a CPU (a check, no numbers)"
    )
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    moe = {**ARCHITECTURE, **(TINY if args.tiny else {}), "max_position_embeddings": args.seq_len}
    results = {}
    for name, architecture in (("moe", moe), ("dense", dense_twin(moe))):
        config_path = args.out_dir / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(run_config(architecture, args.out_dir / f"run_{name}", args)))
        out = args.out_dir / f"throughput_{name}.json"
        command = [sys.executable, str(REPO / "bench" / "train_throughput.py"), str(out), str(config_path)]
        print("+", " ".join(command), flush=True)
        subprocess.run([*command, "--skip", str(args.skip)], check=True, cwd=REPO)
        summary = json.loads(out.read_text())
        results[name] = {
            key: summary[key]
            for key in (
                "device",
                "torch",
                "params",
                "step_ms_median",
                "padded_tokens_per_s",
                "real_tokens_per_s",
                "achieved_tflops",
                "peak_tflops",
                "mfu",
                "max_memory_allocated_GiB",
                "expert_path_calls",
            )
        }
    results["moe_over_dense_step_time"] = (
        results["moe"]["step_ms_median"] / results["dense"]["step_ms_median"]
    )
    (args.out_dir / "gpu_mfu.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
