"""Feed-forward networks: the dense FFN, and E of them stacked as grouped experts.

Shape legend: N expert-sorted rows, D hidden size, F expert width, E experts.
Weights are stored (out_features, in_features) like ``nn.Linear`` and HF's fused 3D experts
(Qwen3-MoE / Mixtral in transformers 5: ``gate_up_proj [E, 2F, D]``, ``down_proj [E, D, F]``), so a dense
checkpoint's FFN is copied into every expert as is (sparse upcycling).
"""

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


def grouped_linear(
    x_NI: torch.Tensor,
    weight_EOI: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    bias_EO: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ weight[e].T + bias[e]`` for consecutive row groups of the given sizes."""
    if _grouped_mm_supported(x_NI, weight_EOI):
        offsets_E = torch.cumsum(tokens_per_expert_E, dim=0, dtype=torch.int32)
        y_NO = F.grouped_mm(x_NI, weight_EOI.transpose(-2, -1), offs=offsets_E)
    else:
        chunks = x_NI.split(tokens_per_expert_E.tolist())
        y_NO = torch.cat([F.linear(chunk, weight_EOI[e]) for e, chunk in enumerate(chunks)])
    if bias_EO is not None:
        y_NO = y_NO + bias_EO.repeat_interleave(tokens_per_expert_E, dim=0, output_size=x_NI.shape[0])
    return y_NO


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

    @property
    def up_weight(self) -> nn.Parameter:
        return self.gate_up_proj if self.is_glu else self.up_proj

    @property
    def up_bias(self) -> nn.Parameter | None:
        return self.gate_up_proj_bias if self.is_glu else self.up_proj_bias

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        h_NF = grouped_linear(x_ND, self.up_weight, tokens_per_expert_E, self.up_bias)
        if self.is_glu:
            gate_NF, up_NF = h_NF.chunk(2, dim=-1)
            h_NF = self.act_fn(gate_NF) * up_NF
        else:
            h_NF = self.act_fn(h_NF)
        return grouped_linear(h_NF, self.down_proj, tokens_per_expert_E, self.down_proj_bias)
