"""Expert-parallel experts on 2 ranks against the full experts in one process, including experts (and a
whole rank) that receive no rows; run by test_expert_parallel.py. Exits non-zero on any mismatch, and a
hang fails the test's timeout."""

import copy

import torch
import torch.distributed as dist

from megamoe.engine.distributed import init_distributed
from megamoe.engine.expert_parallel import ExpertParallelExperts
from megamoe.model.moe_experts import GroupedExperts

HIDDEN, WIDTH, NUM_EXPERTS = 16, 24, 4

# Rows each rank sends to each global expert: experts 1 and 3 get none from anyone in case 0, and in
# case 1 rank 1 sends nothing at all.
CASES = [
    {0: [5, 0, 3, 0], 1: [2, 0, 0, 0]},
    {0: [1, 4, 0, 2], 1: [0, 0, 0, 0]},
]


def main() -> None:
    init_distributed(timeout_minutes=1.0)
    rank = dist.get_rank()
    torch.manual_seed(0)
    full = GroupedExperts(NUM_EXPERTS, HIDDEN, WIDTH, mlp_type="mlp", hidden_act="gelu", bias=True)
    for param in full.parameters():
        torch.nn.init.normal_(param, std=0.5)
    sharded = ExpertParallelExperts(copy.deepcopy(full), ep_size=2, ep_rank=rank)
    sharded.set_deepspeed_parallelism()

    for case in CASES:
        counts = torch.tensor(case[rank])
        x = torch.randn(int(counts.sum()), HIDDEN, generator=torch.Generator().manual_seed(rank))
        x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
        full.zero_grad()
        sharded.zero_grad()
        y_ref, y_ep = full(x_ref, counts), sharded(x_ep, counts)
        torch.testing.assert_close(y_ep, y_ref, rtol=1e-5, atol=1e-6)
        upstream = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(10 + rank))
        (y_ref * upstream).sum().backward()
        (y_ep * upstream).sum().backward()
        torch.testing.assert_close(x_ep.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
        # A local expert's gradient collects every rank's rows: the sum of the reference gradients.
        # An expert with no rows anywhere gets a zero gradient, not none: ZeRO's reduction hooks fire.
        local_grads = {name: param.grad for name, param in sharded.local_experts.named_parameters()}
        for name, param in full.named_parameters():
            reference = param.grad.clone()
            dist.all_reduce(reference)
            assert local_grads[name] is not None, f"{name} of the local experts got no gradient"
            torch.testing.assert_close(
                local_grads[name], reference[rank * 2 : rank * 2 + 2], rtol=1e-5, atol=1e-6
            )
    dist.barrier()
    if rank == 0:
        print("EP-LAYER-OK")
    dist.destroy_process_group()  # exiting with live gloo threads can abort the process


if __name__ == "__main__":
    main()
