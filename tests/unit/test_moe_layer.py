"""Equivalence tests of the MoE layer: against a naive per-token loop, the dense FFN, and hand-computed losses."""

import contextlib
import math

import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN

from megamoe.model.moe_dispatch import expert_capacity, permute, plan_dispatch, unpermute
from megamoe.model.moe_experts import FeedForward, GroupedExperts, _GatedActivation, grouped_linear
from megamoe.model.moe_layer import MoEFeedForward
from megamoe.model.moe_losses import load_balancing_loss, router_z_loss

HIDDEN, WIDTH = 16, 32


def make_layer(*, num_experts=4, top_k=2, mlp_type="glu", bias=False, **kwargs) -> MoEFeedForward:
    act = "silu" if mlp_type == "glu" else "gelu"
    layer = MoEFeedForward(
        HIDDEN,
        num_experts=num_experts,
        top_k=top_k,
        expert_intermediate_size=WIDTH,
        mlp_type=mlp_type,
        hidden_act=act,
        bias=bias,
        **kwargs,
    )
    for param in layer.parameters():
        nn.init.normal_(param, std=0.3)
    return layer


def expert_ffn(experts: GroupedExperts, e: int, x_D: torch.Tensor) -> torch.Tensor:
    """Expert e on one token, written out with plain matmuls."""
    h = experts.up_weight[e] @ x_D
    if experts.up_bias is not None:
        h = h + experts.up_bias[e]
    if experts.is_glu:
        gate, up = h.chunk(2)
        h = experts.act_fn(gate) * up
    else:
        h = experts.act_fn(h)
    y = experts.down_proj[e] @ h
    return y if experts.down_proj_bias is None else y + experts.down_proj_bias[e]


def naive_moe(
    layer: MoEFeedForward, x_TD: torch.Tensor, mask_T: torch.Tensor, capacity: int | None = None
) -> torch.Tensor:
    """Loop over tokens and their top-k experts; padding tokens get zero.

    With a capacity, assignments are taken slot by slot (every first choice in token order, then every second
    choice, ...) while their expert has room (GShard's priority); the others add nothing.
    """
    probs_TE = (x_TD.float() @ layer.router.weight.float().T).softmax(-1)
    weights_TK, ids_TK = probs_TE.topk(layer.router.top_k, dim=-1)
    if layer.router.norm_topk_prob:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    load = [0] * layer.num_experts
    outputs = [torch.zeros(HIDDEN) for _ in range(x_TD.shape[0])]
    for k in range(layer.router.top_k):
        for t in range(x_TD.shape[0]):
            e = int(ids_TK[t, k])
            if mask_T[t] and (capacity is None or load[e] < capacity):
                load[e] += 1
                outputs[t] = outputs[t] + weights_TK[t, k] * expert_ffn(layer.experts, e, x_TD[t])
    return torch.stack(outputs)


@pytest.mark.parametrize(("mlp_type", "bias"), [("glu", False), ("mlp", True)])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_dropless_matches_naive_reference_forward_and_backward(mlp_type, bias, top_k):
    layer = make_layer(num_experts=5, top_k=top_k, mlp_type=mlp_type, bias=bias)
    x_BSD = torch.randn(3, 7, HIDDEN)
    mask_BS = torch.ones(3, 7, dtype=torch.bool)
    mask_BS[1, 4:] = False
    mask_BS[2, 2:] = False

    x_fast = x_BSD.clone().requires_grad_()
    y_fast, _ = layer(x_fast, mask_BS)
    x_ref = x_BSD.clone().requires_grad_()
    y_ref = naive_moe(layer, x_ref.reshape(-1, HIDDEN), mask_BS.reshape(-1)).reshape(3, 7, HIDDEN)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)

    grad_out = torch.randn_like(y_ref)
    fast_grads = torch.autograd.grad(y_fast, [x_fast, *layer.parameters()], grad_out)
    ref_grads = torch.autograd.grad(y_ref, [x_ref, *layer.parameters()], grad_out)
    for name, g_fast, g_ref in zip(
        ["x", *dict(layer.named_parameters())], fast_grads, ref_grads, strict=True
    ):
        torch.testing.assert_close(
            g_fast, g_ref, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"grad of {n}: {m}"
        )


@pytest.mark.parametrize(("mlp_type", "bias"), [("glu", False), ("mlp", True)])
def test_one_expert_equals_dense_ffn(mlp_type, bias):
    layer = make_layer(num_experts=1, top_k=1, mlp_type=mlp_type, bias=bias)
    act = "silu" if mlp_type == "glu" else "gelu"
    dense = FeedForward(HIDDEN, WIDTH, mlp_type=mlp_type, hidden_act=act, bias=bias)
    copy_expert_into_dense(layer.experts, 0, dense)
    x = torch.randn(2, 6, HIDDEN)
    y, _ = layer(x, torch.ones(2, 6, dtype=torch.bool))
    torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-6)


def copy_expert_into_dense(experts: GroupedExperts, e: int, dense: FeedForward) -> None:
    with torch.no_grad():
        if experts.is_glu:
            gate, up = experts.gate_up_proj[e].chunk(2)
            dense.gate_proj.weight.copy_(gate)
            dense.up_proj.weight.copy_(up)
        else:
            dense.up_proj.weight.copy_(experts.up_proj[e])
        dense.down_proj.weight.copy_(experts.down_proj[e])
        if experts.up_bias is not None:
            dense.up_proj.bias.copy_(experts.up_bias[e])
            dense.down_proj.bias.copy_(experts.down_proj_bias[e])


@pytest.mark.parametrize(("mlp_type", "bias"), [("glu", False), ("mlp", True)])
def test_identical_experts_equal_the_ffn_they_copy(mlp_type, bias):
    """The sparse-upcycling invariant: E copies of one FFN, renormalized top-k weights -> that FFN."""
    act = "silu" if mlp_type == "glu" else "gelu"
    dense = FeedForward(HIDDEN, WIDTH, mlp_type=mlp_type, hidden_act=act, bias=bias)
    for param in dense.parameters():
        nn.init.normal_(param, std=0.3)
    layer = make_layer(num_experts=8, top_k=2, mlp_type=mlp_type, bias=bias)
    with torch.no_grad():
        up = (
            torch.cat([dense.gate_proj.weight, dense.up_proj.weight])
            if mlp_type == "glu"
            else dense.up_proj.weight
        )
        layer.experts.up_weight.copy_(up.expand_as(layer.experts.up_weight))
        layer.experts.down_proj.copy_(dense.down_proj.weight.expand_as(layer.experts.down_proj))
        if bias:
            layer.experts.up_bias.copy_(dense.up_proj.bias.expand_as(layer.experts.up_bias))
            layer.experts.down_proj_bias.copy_(dense.down_proj.bias.expand_as(layer.experts.down_proj_bias))
    x = torch.randn(4, 9, HIDDEN)
    y, stats = layer(x, torch.ones(4, 9, dtype=torch.bool))
    torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-5)
    assert int(stats.tokens_per_expert.sum()) == 4 * 9 * 2
    assert (stats.tokens_per_expert > 0).sum() > 1, "the router should spread tokens over several experts"


def test_padding_tokens_are_not_routed_and_do_not_change_real_tokens():
    layer = make_layer(num_experts=4, top_k=2)
    x = torch.randn(1, 5, HIDDEN)
    alone, alone_stats = layer(x, torch.ones(1, 5, dtype=torch.bool))
    padded_x = torch.cat([x, 100 * torch.randn(1, 3, HIDDEN)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    padded, padded_stats = layer(padded_x, mask)
    torch.testing.assert_close(padded[:, :5], alone, rtol=0, atol=0)
    assert torch.all(padded[:, 5:] == 0)
    assert torch.equal(padded_stats.tokens_per_expert, alone_stats.tokens_per_expert)
    torch.testing.assert_close(padded_stats.aux_loss, alone_stats.aux_loss)
    torch.testing.assert_close(padded_stats.z_loss, alone_stats.z_loss)


def test_shared_expert_is_added_for_every_token():
    layer = make_layer(num_experts=4, top_k=2, num_shared_experts=2)
    assert layer.shared_experts.up_proj.out_features == 2 * WIDTH
    x = torch.randn(2, 3, HIDDEN)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with_shared, _ = layer(x, mask)
    shared = layer.shared_experts
    layer.shared_experts = None
    routed_only, _ = layer(x, mask)
    torch.testing.assert_close(with_shared, routed_only + shared(x.reshape(-1, HIDDEN)).reshape(2, 3, HIDDEN))


def test_load_balancing_loss_hand_computed():
    # 4 tokens, 2 experts, top-1: experts [0, 0, 0, 1]; probs as written.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    ids = torch.tensor([[0], [0], [0], [1]])
    loss = load_balancing_loss(
        router_probs_TE=probs, expert_ids_TK=ids, token_mask_T=torch.ones(4, dtype=torch.bool), num_experts=2
    )
    # f = [3/4, 1/4], P = [2.6/4, 1.4/4] -> 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
    assert loss.item() == pytest.approx(1.15, abs=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balancing_loss_ignores_padding(top_k):
    probs = torch.tensor(
        [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.98, 0.01, 0.01], [0.97, 0.02, 0.01]]
    )
    ids = probs.topk(top_k, dim=-1).indices
    mask = torch.tensor([True, True, True, False, False])
    with_padding = load_balancing_loss(
        router_probs_TE=probs, expert_ids_TK=ids, token_mask_T=mask, num_experts=3
    )
    real_only = load_balancing_loss(
        router_probs_TE=probs[:3], expert_ids_TK=ids[:3], token_mask_T=mask[:3], num_experts=3
    )
    assert with_padding.item() == pytest.approx(real_only.item(), abs=1e-7)
    # By hand over the 3 real tokens.
    counts = torch.zeros(3)
    for row in ids[:3]:
        counts[row] += 1
    expected = 3 * torch.dot(counts / (3 * top_k), probs[:3].mean(0))
    assert with_padding.item() == pytest.approx(expected.item(), abs=1e-7)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_load_balancing_loss_is_one_when_perfectly_balanced(top_k):
    num_experts = 4
    probs = torch.full((8, num_experts), 1 / num_experts)
    ids = torch.stack([torch.roll(torch.arange(num_experts), t)[:top_k] for t in range(8)])
    loss = load_balancing_loss(
        router_probs_TE=probs,
        expert_ids_TK=ids,
        token_mask_T=torch.ones(8, dtype=torch.bool),
        num_experts=num_experts,
    )
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


def test_router_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0], [50.0, 50.0]])
    mask = torch.tensor([True, True, False])
    expected = (math.log(2) ** 2 + math.log(math.e + math.e**2) ** 2) / 2
    assert router_z_loss(router_logits_TE=logits, token_mask_T=mask).item() == pytest.approx(
        expected, rel=1e-6
    )


def forced_router(layer: MoEFeedForward, preferred_expert_order: list[int]) -> None:
    """Make every token prefer the experts in this order (router ignores the input sign: x is positive)."""
    with torch.no_grad():
        layer.router.weight.zero_()
        for rank, e in enumerate(preferred_expert_order):
            layer.router.weight[e] = float(len(preferred_expert_order) - rank)


@pytest.mark.parametrize(("mlp_type", "bias"), [("glu", False), ("mlp", True)])
@pytest.mark.parametrize("top_k", [1, 2])
def test_capacity_with_padding_matches_naive_reference_forward_and_backward(mlp_type, bias, top_k):
    layer = make_layer(num_experts=4, top_k=top_k, mlp_type=mlp_type, bias=bias, capacity_factor=0.75)
    x_BSD = torch.randn(2, 9, HIDDEN)
    mask_BS = torch.ones(2, 9, dtype=torch.bool)
    mask_BS[1, 5:] = False
    capacity = math.ceil(0.75 * int(mask_BS.sum()) * top_k / 4)

    x_fast = x_BSD.clone().requires_grad_()
    y_fast, stats = layer(x_fast, mask_BS)
    assert int(stats.dropped_tokens) > 0
    x_ref = x_BSD.clone().requires_grad_()
    y_ref = naive_moe(layer, x_ref.reshape(-1, HIDDEN), mask_BS.reshape(-1), capacity).reshape(2, 9, HIDDEN)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)

    grad_out = torch.randn_like(y_ref)
    params = dict(layer.named_parameters())
    fast_grads = torch.autograd.grad(y_fast, [x_fast, *params.values()], grad_out, allow_unused=True)
    ref_grads = torch.autograd.grad(y_ref, [x_ref, *params.values()], grad_out, allow_unused=True)
    for name, g_fast, g_ref in zip(["x", *params], fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(
            g_fast, g_ref, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"grad of {n}: {m}"
        )


def test_capacity_drops_the_overflow_and_counts_it():
    layer = make_layer(num_experts=4, top_k=1, capacity_factor=1.0)
    forced_router(layer, [2, 0, 1, 3])
    x = torch.rand(1, 8, HIDDEN) + 0.1  # positive inputs: every token picks expert 2
    mask = torch.ones(1, 8, dtype=torch.bool)
    mask[0, 7] = False  # padding does not take capacity: capacity = ceil(1.0 * 7 * 1 / 4) = 2
    y, stats = layer(x, mask)
    assert expert_capacity(num_tokens=torch.tensor(7), top_k=1, num_experts=4, capacity_factor=1.0) == 2
    assert stats.tokens_per_expert.tolist() == [0, 0, 7, 0]
    assert int(stats.dropped_tokens) == 5
    # The first two tokens (token order inside an expert) are kept; the dropped ones get a zero update.
    assert torch.all(y[0, 2:] == 0)
    reference = naive_moe(layer, x[0, :2], torch.ones(2, dtype=torch.bool))
    torch.testing.assert_close(y[0, :2], reference, rtol=1e-5, atol=1e-6)


def test_capacity_gives_first_choices_priority_over_second_choices():
    ids_TK = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]])  # expert 0: first choice of tokens 0, 2
    weights_TK = torch.full((4, 2), 0.5)
    plan = plan_dispatch(
        expert_ids_TK=ids_TK,
        weights_TK=weights_TK,
        token_mask_T=torch.ones(4, dtype=torch.bool),
        num_experts=2,
        capacity_factor=0.5,  # capacity = ceil(0.5 * 4 * 2 / 2) = 2
    )
    assert plan.group_sizes_E.tolist() == [2, 2]
    assert int(plan.num_dropped) == 4
    # Kept rows first, sorted by expert; each expert keeps exactly its first-choice tokens; the 4 dropped
    # assignments are the tail, with weight 0.
    assert plan.token_idx_N[:4].tolist() == [0, 2, 1, 3]
    assert plan.weights_N[4:].tolist() == [0, 0, 0, 0]
    assert plan.kept_KT.tolist() == [[1, 1, 1, 1], [0, 0, 0, 0]]


def test_dropless_keeps_everything():
    ids_TK = torch.randint(0, 3, (50, 2))
    plan = plan_dispatch(
        expert_ids_TK=ids_TK,
        weights_TK=torch.rand(50, 2),
        token_mask_T=torch.ones(50, dtype=torch.bool),
        num_experts=3,
    )
    assert int(plan.num_dropped) == 0
    assert plan.group_sizes_E.tolist() == torch.bincount(ids_TK.flatten(), minlength=3).tolist()
    # Every (token, slot) appears once, rows grouped by expert.
    rows_per_token = torch.bincount(plan.token_idx_N, minlength=50)
    assert torch.all(rows_per_token == 2)
    row_experts = torch.repeat_interleave(torch.arange(3), plan.group_sizes_E)
    for row, (token, expert) in enumerate(zip(plan.token_idx_N.tolist(), row_experts.tolist(), strict=True)):
        assert expert in ids_TK[token].tolist(), f"row {row}: token {token} was not routed to expert {expert}"
    assert plan.token_idx_N.numel() == ids_TK.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_path_equals_loop_fallback(dtype):
    sizes = torch.tensor([3, 0, 5, 0, 8])
    x = torch.randn(16, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(5, 32, 16, dtype=dtype, requires_grad=True)
    b = torch.randn(5, 32, dtype=dtype, requires_grad=True)
    fast = grouped_linear(x, w, sizes, b)
    loop = torch.cat(
        [
            x[s:e] @ w[g].T + b[g]
            for g, (s, e) in enumerate(zip([0, 3, 3, 8, 8], [3, 3, 8, 8, 16], strict=True))
        ]
    )
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(fast, loop, **tol)
    grad = torch.randn_like(loop)
    fast_grads = torch.autograd.grad(fast, [x, w, b], grad)
    for g_fast, g_loop in zip(fast_grads, torch.autograd.grad(loop, [x, w, b], grad), strict=True):
        torch.testing.assert_close(g_fast, g_loop, **tol)
    assert torch.all(fast_grads[1][1] == 0), "an expert with no rows gets no gradient"


def test_unaligned_shapes_use_the_fallback():
    # 6 floats = 24 bytes per row: torch's grouped GEMM refuses it, the loop must take over.
    x = torch.randn(4, 6)
    w = torch.randn(2, 10, 6)
    y = grouped_linear(x, w, torch.tensor([1, 3]))
    torch.testing.assert_close(y, torch.cat([x[:1] @ w[0].T, x[1:] @ w[1].T]))


@contextlib.contextmanager
def uninitialized_memory_as_nan():
    """Deterministic mode fills ``torch.empty`` with NaN: a read of a row the grouped GEMM leaves uncomputed shows."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("in_features", [16, 6], ids=["grouped_mm", "fallback"])
def test_grouped_linear_leaves_rows_past_the_groups_out(in_features):
    sizes = torch.tensor([3, 0, 4])
    x = torch.randn(10, in_features)
    x[7:] = float("nan")  # the tail: no weight or bias gradient may see it
    x.requires_grad_()
    w = torch.randn(3, 8, in_features, requires_grad=True)
    b = torch.randn(3, 8, requires_grad=True)
    with uninitialized_memory_as_nan():
        y = grouped_linear(x, w, sizes, b)
    loop = torch.cat([x[:3] @ w[0].T + b[0], x[3:7] @ w[2].T + b[2]])
    torch.testing.assert_close(y[:7], loop)
    grad = torch.randn(7, 8)
    ours = torch.autograd.grad(y[:7], [w, b], grad)
    for g_ours, g_loop in zip(ours, torch.autograd.grad(loop, [w, b], grad), strict=True):
        torch.testing.assert_close(g_ours, g_loop)
    if in_features == 16:
        assert torch.isnan(y[7:]).all(), "the grouped GEMM leaves the tail uninitialized (NaN here)"


@pytest.mark.parametrize(("mlp_type", "bias"), [("glu", False), ("mlp", True)])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_uninitialized_tail_never_reaches_outputs_or_gradients(mlp_type, bias, capacity_factor):
    """With the tail NaN (deterministic mode), outputs, losses and every gradient are finite and unchanged."""
    layer = make_layer(num_experts=4, top_k=2, mlp_type=mlp_type, bias=bias, capacity_factor=capacity_factor)
    x = torch.randn(2, 9, HIDDEN, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False

    def step():
        y, stats = layer(x, mask)
        loss = (y * torch.linspace(-1, 1, HIDDEN)).sum() + stats.aux_loss + stats.z_loss
        return [y, *torch.autograd.grad(loss, [x, *layer.parameters()])]

    expected = step()
    with uninitialized_memory_as_nan():
        poisoned = step()
    for ours, reference in zip(poisoned, expected, strict=True):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("mlp_type", "bias", "capacity_factor"),
    [("glu", False, None), ("mlp", True, 0.75)],
    ids=["dropless", "capacity"],
)
def test_compiled_layer_has_no_graph_break_and_equals_eager(mlp_type, bias, capacity_factor):
    """``fullgraph=True`` fails on any host sync (dynamo cannot trace past it), forward or backward.

    aot_eager traces the forward and the backward graph with AOTAutograd and runs them with eager kernels, so
    it checks the whole step in seconds without a C++ compiler. bfloat16: the meta kernel of
    ``torch._grouped_mm`` (what dynamo traces with) accepts bf16 only, though the CPU kernel runs float32 too.
    """
    torch._dynamo.reset()
    layer = make_layer(num_experts=4, top_k=2, mlp_type=mlp_type, bias=bias, capacity_factor=capacity_factor)
    layer.to(torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 6, HIDDEN, dtype=torch.bfloat16)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False

    def step(module):
        x_in = x.clone().requires_grad_()
        y, stats = module(x_in, mask)
        loss = (y.float() * torch.linspace(-1, 1, HIDDEN)).sum() + stats.aux_loss + stats.z_loss
        grads = torch.autograd.grad(loss, [x_in, *layer.parameters()])
        return [y, stats.aux_loss, stats.z_loss, stats.tokens_per_expert, stats.dropped_tokens, *grads]

    for ours, eager in zip(step(compiled), step(layer), strict=True):
        torch.testing.assert_close(ours, eager, rtol=0, atol=0)


def test_a_compiled_float32_layer_runs_its_grouped_gemms_eagerly_and_equals_eager():
    """fp32 has no meta kernel for ``torch._grouped_mm``: the compiler breaks the graph around the grouped
    GEMMs (and compiles the rest) instead of failing."""
    torch._dynamo.reset()
    layer = make_layer(num_experts=4, top_k=2, mlp_type="mlp", bias=True)
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(2, 6, HIDDEN)
    mask = torch.ones(2, 6, dtype=torch.bool)

    def step(module):
        x_in = x.clone().requires_grad_()
        y, stats = module(x_in, mask)
        grads = torch.autograd.grad(
            (y * torch.linspace(-1, 1, HIDDEN)).sum() + stats.aux_loss, [x_in, *layer.parameters()]
        )
        return [y, *grads]

    for ours, eager in zip(step(compiled), step(layer), strict=True):
        torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)


def test_all_padding_batch_runs():
    layer = make_layer()
    y, stats = layer(torch.randn(2, 3, HIDDEN), torch.zeros(2, 3, dtype=torch.bool))
    assert torch.all(y == 0)
    assert int(stats.tokens_per_expert.sum()) == 0
    assert torch.isfinite(stats.aux_loss) and torch.isfinite(stats.z_loss)


def test_task_aware_router_needs_a_task_and_separates_tasks():
    layer = make_layer(num_experts=4, top_k=1, num_tasks=2)
    x = torch.randn(1, 6, HIDDEN)
    mask = torch.ones(1, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="task-aware"):
        layer(x, mask)
    with torch.no_grad():
        layer.router.task_logit_bias.zero_()
        layer.router.task_logit_bias[0, 0] = 100.0
        layer.router.task_logit_bias[1, 3] = 100.0
    assert layer(x, mask, task_id=0)[1].tokens_per_expert.tolist() == [6, 0, 0, 0]
    assert layer(x, mask, task_id=1)[1].tokens_per_expert.tolist() == [0, 0, 0, 6]


def test_jitter_noise_only_in_training():
    layer = make_layer(jitter_noise=0.5)
    x = torch.randn(2, 8, HIDDEN)
    mask = torch.ones(2, 8, dtype=torch.bool)
    layer.eval()
    torch.testing.assert_close(layer(x, mask)[0], layer(x, mask)[0], rtol=0, atol=0)
    layer.train()
    assert not torch.equal(layer(x, mask)[1].z_loss, layer(x, mask)[1].z_loss)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize(
    ("padding", "capacity_factor"), [(False, None), (True, None), (False, 0.5), (True, 0.75)]
)
def test_permute_and_unpermute_gradients_match_autograd(top_k, padding, capacity_factor):
    """The gather-based autograd Functions against gradcheck, and against index_select / index_add."""
    num_tokens, num_experts = 9, 4
    ids_TK = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)])
    mask_T = torch.ones(num_tokens, dtype=torch.bool)
    if padding:
        mask_T[[2, 7]] = False
    weights_TK = torch.rand(num_tokens, top_k, dtype=torch.float64, requires_grad=True)

    def make_plan(weights_TK):
        return plan_dispatch(
            expert_ids_TK=ids_TK,
            weights_TK=weights_TK,
            token_mask_T=mask_T,
            num_experts=num_experts,
            capacity_factor=capacity_factor,
        )

    plan = make_plan(weights_TK)
    # Static shapes: T*K rows, the kept ones first, then a tail with weight 0.
    num_kept = int(mask_T.sum()) * top_k - int(plan.num_dropped)
    assert plan.token_idx_N.numel() == num_tokens * top_k
    assert torch.all(plan.weights_N[:num_kept] > 0) and torch.all(plan.weights_N[num_kept:] == 0)
    x_TD = torch.randn(num_tokens, 5, dtype=torch.float64, requires_grad=True)
    y_ND = torch.randn(num_tokens * top_k, 5, dtype=torch.float64, requires_grad=True)

    # The tail rows' gradient is 0 in the layer (weight 0 in the combine) and the permute's backward does not
    # read it, so it is checked on the kept rows.
    torch.autograd.gradcheck(lambda x: permute(x, plan)[:num_kept], (x_TD,))
    torch.autograd.gradcheck(lambda y, w: unpermute(y, make_plan(w), num_tokens), (y_ND, weights_TK))

    # Same values and gradients as the scatter formulation the Functions replace.
    x_ND = permute(x_TD, plan)
    torch.testing.assert_close(x_ND, x_TD[plan.token_idx_N])
    grad_ND = torch.randn_like(x_ND)
    grad_ND[num_kept:] = 0
    (grad_x,) = torch.autograd.grad(x_ND, x_TD, grad_ND)
    torch.testing.assert_close(grad_x, torch.zeros_like(x_TD).index_add(0, plan.token_idx_N, grad_ND))
    y_TD = unpermute(y_ND, plan, num_tokens)
    reference = torch.zeros_like(y_TD).index_add(0, plan.token_idx_N, y_ND * plan.weights_N[:, None])
    torch.testing.assert_close(y_TD, reference)
    grad_TD = torch.randn_like(y_TD)
    for ours, ref in zip(
        torch.autograd.grad(y_TD, [y_ND, weights_TK], grad_TD, retain_graph=True),
        torch.autograd.grad(reference, [y_ND, weights_TK], grad_TD),
        strict=True,
    ):
        torch.testing.assert_close(ours, ref)


def test_unpermute_with_no_routed_rows_is_zero():
    plan = plan_dispatch(
        expert_ids_TK=torch.zeros(3, 2, dtype=torch.long),
        weights_TK=torch.rand(3, 2),
        token_mask_T=torch.zeros(3, dtype=torch.bool),
        num_experts=2,
    )
    x_TD = torch.randn(3, 4, requires_grad=True)
    y_TD = unpermute(permute(x_TD, plan), plan, 3)
    assert torch.all(y_TD == 0)
    y_TD.sum().backward()
    assert torch.all(x_TD.grad == 0)


@pytest.mark.parametrize("act_name", ["silu", "gelu", "gelu_pytorch_tanh", "relu"])
def test_gated_activation_gradients(act_name):
    """Closed-form (silu, gelu) and recomputed (others) backward of the fused gated activation."""
    h_N2F = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    act_fn = ACT2FN[act_name]
    torch.autograd.gradcheck(lambda h: _GatedActivation.apply(h, act_fn, act_name), (h_N2F,))
    gate, up = h_N2F.chunk(2, dim=-1)
    torch.testing.assert_close(_GatedActivation.apply(h_N2F, act_fn, act_name), act_fn(gate) * up)
