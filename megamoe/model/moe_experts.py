"""Feed-forward networks: the dense FFN, and E of them stacked as grouped experts.

Shape legend: N expert-sorted rows, D hidden size, F expert width, E experts.
Weights are stored (out_features, in_features) like ``nn.Linear`` and HF's fused 3D experts
(Qwen3-MoE / Mixtral in transformers 5: ``gate_up_proj [E, 2F, D]``, ``down_proj [E, D, F]``), so a dense
checkpoint's FFN is copied into every expert as is (sparse upcycling).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


def _grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch's grouped GEMM runs on CPU (torch >= 2.13) and on CUDA SM80+ in bf16, with 16-byte aligned rows."""
    if (
        not hasattr(F, "grouped_mm")
        or x.dtype != weight.dtype
        or x.dtype not in (torch.float32, torch.bfloat16, torch.float16)
    ):
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type != "cpu":
        return False
    return all(dim * x.element_size() % 16 == 0 for dim in weight.shape[1:])


@torch.compiler.disable
def _grouped_mm_outside_the_compiler(
    x: torch.Tensor, weight_t: torch.Tensor, offs: torch.Tensor
) -> torch.Tensor:
    """``F.grouped_mm`` run eagerly inside a compiled region (a graph break): the meta kernel of
    ``torch._grouped_mm``, which the compiler traces with, accepts bf16 only, while the CPU kernel runs fp32 too."""
    return F.grouped_mm(x, weight_t, offs=offs)


def grouped_linear(
    x_NI: torch.Tensor,
    weight_EOI: torch.Tensor,
    group_sizes_E: torch.Tensor,
    bias_EO: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ weight[e].T + bias[e]`` for consecutive row groups of the given sizes.

    The groups may end before the last row: the rows past them are not computed (torch's grouped GEMM leaves
    them uninitialized), and no gradient flows from them into the weights or the biases.
    """
    group_end_E = torch.cumsum(group_sizes_E, dim=0, dtype=torch.int32)
    if _grouped_mm_supported(x_NI, weight_EOI):
        # Device offsets: the group sizes are never read to the host.
        grouped_mm = F.grouped_mm if x_NI.dtype == torch.bfloat16 else _grouped_mm_outside_the_compiler
        y_NO = grouped_mm(x_NI, weight_EOI.transpose(-2, -1), offs=group_end_E)
    else:
        # The group sizes read to the host: this path serves the dtypes and row strides the grouped GEMM refuses.
        # unbind, not weight[e]: each indexing op's backward would allocate a zero gradient of the whole stack.
        sizes = group_sizes_E.tolist()
        *chunks, rest = x_NI.split([*sizes, x_NI.shape[0] - sum(sizes)])
        outputs = [F.linear(chunk, w) for chunk, w in zip(chunks, weight_EOI.unbind(0), strict=True)]
        y_NO = torch.cat([*outputs, rest.new_zeros(rest.shape[0], weight_EOI.shape[1])])
    if bias_EO is not None:
        # Rows past the groups (expert id E) take a zero bias row that is cut off in the backward, so their
        # uninitialized gradients never reach the biases.
        row_expert_N = torch.searchsorted(
            group_end_E, torch.arange(x_NI.shape[0], device=x_NI.device, dtype=torch.int32), right=True
        )
        padded_bias_EO = torch.cat([bias_EO, bias_EO.new_zeros(1, bias_EO.shape[1])])
        y_NO = y_NO + padded_bias_EO.index_select(0, row_expert_N)
    return y_NO


class _GatedActivation(torch.autograd.Function):
    """``act(gate) * up`` over a fused ``[N, 2F]`` projection, saving only that projection for backward.

    Autograd's own graph would keep ``act(gate)`` too and rebuild the ``[N, 2F]`` gradient with a ``cat``
    of two halves; here the two halves of the gradient are written in place. silu (SwiGLU) and gelu have
    closed-form backward kernels; other activations are recomputed under autograd.
    """

    @staticmethod
    def forward(ctx, h_N2F: torch.Tensor, act_fn: nn.Module, act_name: str) -> torch.Tensor:
        gate_NF, up_NF = h_N2F.chunk(2, dim=-1)
        ctx.save_for_backward(h_N2F)
        ctx.act_fn, ctx.act_name = act_fn, act_name
        if act_name in _CLOSED_FORM:
            # One [N, F] buffer: act(gate) is written into the output, which is then scaled by up in place.
            return _CLOSED_FORM[act_name][0](gate_NF).mul_(up_NF)
        return act_fn(gate_NF) * up_NF

    @staticmethod
    def backward(ctx, grad_NF: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (h_N2F,) = ctx.saved_tensors
        gate_NF, up_NF = h_N2F.chunk(2, dim=-1)
        grad_h_N2F = torch.empty_like(h_N2F)
        grad_gate_NF, grad_up_NF = grad_h_N2F.chunk(2, dim=-1)
        if ctx.act_name in _CLOSED_FORM:
            # Both halves written in place, no temporary: grad_gate = act'(gate) * (grad * up),
            # grad_up = act(gate) * grad.
            act_out, act_backward_out = _CLOSED_FORM[ctx.act_name][1:]
            torch.mul(grad_NF, up_NF, out=grad_gate_NF)
            act_backward_out(grad_gate_NF, gate_NF, grad_gate_NF)
            act_out(gate_NF, grad_up_NF)
            grad_up_NF.mul_(grad_NF)
        else:
            with torch.enable_grad():
                gate = gate_NF.detach().requires_grad_()
                act_NF = ctx.act_fn(gate)
            (grad_gate,) = torch.autograd.grad(act_NF, gate, grad_NF * up_NF)
            grad_gate_NF.copy_(grad_gate)
            torch.mul(grad_NF, act_NF.detach(), out=grad_up_NF)
        return grad_h_N2F, None, None


def gated_activation(h_N2F: torch.Tensor, act_fn: nn.Module, act_name: str) -> torch.Tensor:
    """``act(gate) * up`` over a fused ``[N, 2F]`` projection (gate columns first)."""
    if torch.compiler.is_compiling():
        # The compiler plans the memory of the plain form itself; and dynamo cannot trace the eager
        # Function's backward, which writes (``out=``) into the two strided halves of the gradient.
        gate_NF, up_NF = h_N2F.chunk(2, dim=-1)
        return act_fn(gate_NF) * up_NF
    return _GatedActivation.apply(h_N2F, act_fn, act_name)


# Activations with a closed-form backward: (act(x) -> new tensor, act(x, out), act_backward(grad, x, out)).
_CLOSED_FORM: dict[str, tuple[Callable[..., torch.Tensor], ...]] = {
    "silu": (
        F.silu,
        lambda x, out: torch.ops.aten.silu.out(x, out=out),
        lambda grad, x, out: torch.ops.aten.silu_backward.grad_input(grad, x, grad_input=out),
    ),
    "gelu": (
        F.gelu,
        lambda x, out: torch.ops.aten.gelu.out(x, out=out),
        lambda grad, x, out: torch.ops.aten.gelu_backward.grad_input(grad, x, grad_input=out),
    ),
    "gelu_pytorch_tanh": (
        lambda x: F.gelu(x, approximate="tanh"),
        lambda x, out: torch.ops.aten.gelu.out(x, approximate="tanh", out=out),
        lambda grad, x, out: torch.ops.aten.gelu_backward.grad_input(
            grad, x, approximate="tanh", grad_input=out
        ),
    ),
}


class FeedForward(nn.Module):
    """The dense FFN: ``down(act(up(x)))`` (BERT) or ``down(act(gate(x)) * up(x))`` (GLU; SwiGLU with silu)."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, *, mlp_type: str, hidden_act: str, bias: bool
    ):
        super().__init__()
        self.is_glu = mlp_type == "glu"
        if self.is_glu:
            self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x) if self.is_glu else self.act_fn(self.up_proj(x))
        return self.down_proj(h)


class GroupedExperts(nn.Module):
    """E feed-forward experts as stacked weights, run over expert-sorted rows with grouped matmuls.

    GLU experts hold ``gate_up_proj [E, 2F, D]`` (gate rows first, as in HF); plain MLP experts hold
    ``up_proj [E, F, D]``; both hold ``down_proj [E, D, F]``, and ``*_bias`` tensors when ``bias=True``.
    """

    gate_up_proj: nn.Parameter
    gate_up_proj_bias: nn.Parameter | None
    up_proj: nn.Parameter
    up_proj_bias: nn.Parameter | None

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        mlp_type: str,
        hidden_act: str,
        bias: bool,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.is_glu = mlp_type == "glu"
        up_rows = 2 * intermediate_size if self.is_glu else intermediate_size
        up_name = "gate_up_proj" if self.is_glu else "up_proj"
        self.register_parameter(up_name, nn.Parameter(torch.empty(num_experts, up_rows, hidden_size)))
        self.register_parameter(
            f"{up_name}_bias", nn.Parameter(torch.zeros(num_experts, up_rows)) if bias else None
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size)) if bias else None
        self.act_fn = ACT2FN[hidden_act]
        self.hidden_act = hidden_act

    @property
    def up_weight(self) -> nn.Parameter:
        return self.gate_up_proj if self.is_glu else self.up_proj

    @property
    def up_bias(self) -> nn.Parameter | None:
        return self.gate_up_proj_bias if self.is_glu else self.up_proj_bias

    def forward(self, x_ND: torch.Tensor, group_sizes_E: torch.Tensor) -> torch.Tensor:
        """Expert e on the e-th group of rows; rows past the groups are left uncomputed (see `grouped_linear`)."""
        h_NF = grouped_linear(x_ND, self.up_weight, group_sizes_E, self.up_bias)
        h_NF = gated_activation(h_NF, self.act_fn, self.hidden_act) if self.is_glu else self.act_fn(h_NF)
        return grouped_linear(h_NF, self.down_proj, group_sizes_E, self.down_proj_bias)
