"""A few DeepSpeed steps of a tiny MegaMoE on a fixed global batch; run by test_expert_parallel.py.

Every global batch is two micro-batches of 4: under the deepspeed launcher with 2 ranks each rank takes one; a
plain `python` run is the single-process reference, which takes both with gradient accumulation. Both then
compute the same per-micro-batch router losses and capacities (a per-rank aux loss is a product of per-rank
means, so a reference on the whole global batch would compute another loss). Steps alternate between two
tasks. Writes ``losses.json`` (the global mean loss per step, from rank 0) and a
checkpoint; the test exports the checkpoint and compares.

Several HF backbones (``--backbone A B --out DIR_A DIR_B``) run one after another in one launch, each with an
engine of its own: the launcher's and the imports' start-up is paid once, not once per architecture.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from megamoe.checkpoint.resume import Checkpointer, Topology
from megamoe.config import ParallelSection, TrainSection
from megamoe.engine.deepspeed_engine import Engine, deepspeed_config, launch_world_size
from megamoe.model import MegaMoEForMultiTask
from megamoe.tasks.objective import MultiTaskObjective
from megamoe.tasks.weighting import build_weighting
from tests.conftest import TASKS, tiny_config, tiny_hf_moe_config

GLOBAL_BATCH, MICRO_BATCH, SEQ_LEN, VOCAB = 8, 4, 12, 64  # VOCAB: tiny_config's vocabulary
TASK_NAMES = ("topic", "sentiment")


def tiny_model(num_experts: int, backbone: str | None = None) -> MegaMoEForMultiTask:
    torch.manual_seed(0)
    # MegaMoE's own layers with everything that touches routing on: router losses, a capacity that drops
    # assignments (1.0 of top-2 over 4 experts), task-aware routing.
    architecture: dict = {
        "num_experts": num_experts,
        "router_aux_loss_coef": 0.1,
        "router_z_loss_coef": 0.01,
        "capacity_factor": 1.0,
        "task_aware_routing": True,
    }
    if backbone is not None:  # an HF MoE architecture instead of MegaMoE's own layers
        architecture = {
            "backbone": tiny_hf_moe_config(backbone).to_dict(),
            "classifier_pooling": "last",
            "router_aux_loss_coef": 0.0,
            "router_z_loss_coef": 0.0,
        }
    config = tiny_config(
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        tasks={name: TASKS[name] for name in TASK_NAMES},
        **architecture,
    )
    return MegaMoEForMultiTask(config)


def task_of(step: int) -> str:
    """Steps alternate between the tasks: the other head is idle, gets no gradient, in every step."""
    return TASK_NAMES[step % len(TASK_NAMES)]


def global_batch(step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    input_ids = torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=generator)
    lengths = torch.randint(3, SEQ_LEN + 1, (GLOBAL_BATCH,), generator=generator)
    attention_mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
    labels = torch.randint(0, 2, (GLOBAL_BATCH,), generator=generator)  # valid for both tasks
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, nargs="+", required=True, help="one run directory per backbone")
    parser.add_argument("--ep-size", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument(
        "--backbone", nargs="*", default=[None], help="HF MoE model_types (tests/conftest.py HF_MOE_TINY)"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save-at", type=int, default=0, help="also checkpoint after this step")
    parser.add_argument("--resume", type=Path, help="resume from this checkpoint first")
    args = parser.parse_args()
    if len(args.out) != len(args.backbone):
        parser.error(f"{len(args.backbone)} backbone(s), {len(args.out)} --out directories: one each")
    for backbone, out in zip(args.backbone, args.out, strict=True):
        run(args, backbone, out)
    dist.barrier()
    dist.destroy_process_group()  # exiting with live gloo threads can abort the process


def run(args: argparse.Namespace, backbone: str | None, out: Path) -> None:
    world_size = launch_world_size()
    accumulation = GLOBAL_BATCH // (MICRO_BATCH * world_size)
    train = TrainSection(
        max_steps=args.steps,
        micro_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=accumulation,
        lr=1e-2,
        # Heads at their own rate: their groups come before the expert groups DeepSpeed's MoE split appends
        # under EP (one process has none), and each must keep its rate.
        head_lr=3e-2,
        warmup_ratio=0.0,
    )
    parallel = ParallelSection(expert_parallel_size=args.ep_size, zero_stage=args.zero_stage)
    model = tiny_model(args.num_experts, backbone)
    objective = MultiTaskObjective(model, build_weighting("static", list(TASK_NAMES)))
    engine = Engine(
        objective, deepspeed_config(train, parallel), expert_parallel_size=args.ep_size, head_lr=train.head_lr
    )
    rank = dist.get_rank()
    checkpointer = Checkpointer(
        engine.engine,
        out / "checkpoints",
        topology=Topology(world_size, args.ep_size, args.zero_stage),
        rank_local={},
        write_hf_files=model.config.save_pretrained,
    )
    first_step = checkpointer.load(args.resume) + 1 if args.resume else 1

    losses, router_loads = [], []
    for step in range(first_step, args.steps + 1):
        batch = global_batch(step)
        loss, load = torch.zeros(()), torch.zeros((), dtype=torch.long)
        for micro in range(accumulation):
            first = (rank * accumulation + micro) * MICRO_BATCH
            rows = slice(first, first + MICRO_BATCH)
            output = engine.train_step({"task": task_of(step), **{k: v[rows] for k, v in batch.items()}})
            loss = loss + output.loss.detach()
            # Assignments per (MoE layer, expert): the routing the router stats saw.
            load = load + torch.stack([stats.tokens_per_expert for stats in output.router_stats])
        dist.all_reduce(loss)
        dist.all_reduce(load)
        losses.append(loss.item() / (world_size * accumulation))
        router_loads.append(load.tolist())
        if step in (args.save_at, args.steps):
            checkpointer.save(step)
    # The live (sharded) model's logits on a fixed batch, for comparison with the exported model.
    probe = global_batch(0)
    logits = engine.eval_forward({"task": "topic", **probe}).logits
    if rank == 0:
        torch.save(logits, out / "live_logits.pt")
        (out / "losses.json").write_text(
            json.dumps({"first_step": first_step, "losses": losses, "router_loads": router_loads})
        )
        module, optimizer = engine.engine.module, engine.engine.optimizer
        # Routed experts only; a ZeRO-3 parameter released after the forward has numel 0, ds_numel is its size.
        expert_numel = sum(
            getattr(p, "ds_numel", p.numel()) for n, p in module.named_parameters() if "mlp.experts." in n
        )
        # The fp32 master weights (and Adam moments of the same size) of the expert param groups.
        moe_groups = getattr(optimizer, "is_moe_param_group", [])  # set only when the model has MoE layers
        partitions = getattr(optimizer, "single_partition_of_fp32_groups", [])  # ZeRO-1/2
        expert_optimizer_numel = sum(p.numel() for p, moe in zip(partitions, moe_groups, strict=False) if moe)
        sizes = {"parameters": expert_numel, "optimizer_partition": expert_optimizer_numel}
        (out / "expert_numel.json").write_text(json.dumps(sizes))


if __name__ == "__main__":
    main()
