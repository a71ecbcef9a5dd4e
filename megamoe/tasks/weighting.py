"""Task loss weighting: ``L = Σ_t w_t L_t`` with static, uncertainty or DWA weights.

Each micro-batch trains one task (see `megamoe.data.sampling`), so a strategy maps (task, loss) to that
task's weighted loss. Router losses are not weighted here: the objective adds them once per step. The
strategies are modules so their learned parameters and running statistics ride in the DeepSpeed optimizer
and checkpoints.
"""

import torch
import torch.distributed as dist
from torch import nn

WEIGHTING_STRATEGIES = ("static", "uncertainty", "dwa")


class LossWeighting(nn.Module):
    """Base: ``forward(task, loss)`` returns the weighted loss; `current_weights` is for logging."""

    def __init__(self, task_names: list[str]):
        super().__init__()
        self.task_names = sorted(task_names)

    def index(self, task: str) -> int:
        return self.task_names.index(task)

    def forward(self, task: str, loss: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def current_weights(self) -> dict[str, float]:
        raise NotImplementedError


class StaticWeighting(LossWeighting):
    """Fixed α_t: ``L = Σ_t α_t L_t``. A micro-batch holds one task, so at α_t = 1 it trains at the scale of
    that task's single-task fine-tune: gradient clipping and the router losses' coefficients mean the same in
    both (dividing by the number of tasks T made clipping T times looser)."""

    weights: torch.Tensor

    def __init__(self, task_names: list[str], alphas: dict[str, float] | None = None):
        super().__init__(task_names)
        alphas = alphas or {}
        weights = [alphas.get(name, 1.0) for name in self.task_names]
        self.register_buffer("weights", torch.tensor(weights))

    def forward(self, task: str, loss: torch.Tensor) -> torch.Tensor:
        return self.weights[self.index(task)] * loss

    def current_weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.weights.tolist(), strict=True))


class UncertaintyWeighting(LossWeighting):
    """Homoscedastic uncertainty (Kendall, Gal & Cipolla, CVPR 2018), in LibMTL's form:
    ``L_t / (2 exp(s_t)) + s_t / 2`` with learned ``s_t = log σ_t²`` (starting at 0: weight 1/2)."""

    def __init__(self, task_names: list[str]):
        super().__init__(task_names)
        self.log_variances = nn.Parameter(torch.zeros(len(self.task_names)))

    def forward(self, task: str, loss: torch.Tensor) -> torch.Tensor:
        s = self.log_variances[self.index(task)]
        return loss / (2 * s.exp()) + s / 2

    def current_weights(self) -> dict[str, float]:
        weights = (0.5 * torch.exp(-self.log_variances.detach())).tolist()
        return dict(zip(self.task_names, weights, strict=True))


class DynamicWeightAverage(LossWeighting):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019).

    ``w_t = T · softmax_t(r_t / τ)`` with ``r_t = L̄_t(k-1) / L̄_t(k-2)``, the ratio of task t's mean loss
    over the two previous windows; weights are 1 until two windows have completed. A window is
    ``window_steps`` training micro-batches (the paper's epoch; one task per micro-batch here). The loss is
    ``w_t L_t``: the weights average 1, the static formula's scale. Window means are all-reduced across
    data-parallel ranks so every rank uses the same weights.
    """

    weights: torch.Tensor
    window_sums: torch.Tensor
    window_counts: torch.Tensor
    previous_means: torch.Tensor
    windows_done: torch.Tensor
    steps_in_window: torch.Tensor

    def __init__(self, task_names: list[str], *, window_steps: int = 100, temperature: float = 2.0):
        super().__init__(task_names)
        if window_steps < 1:
            raise ValueError(f"dwa window_steps must be >= 1, got {window_steps}")
        self.window_steps = window_steps
        self.temperature = temperature
        num_tasks = len(self.task_names)
        self.register_buffer("weights", torch.ones(num_tasks))
        self.register_buffer("window_sums", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("window_counts", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("previous_means", torch.zeros(2, num_tasks, dtype=torch.float64))
        self.register_buffer("windows_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps_in_window", torch.zeros((), dtype=torch.long))
        # The buffer above, mirrored on the host, so that deciding whether a window ends reads nothing from
        # the device (a sync per micro-batch on a GPU); read from the buffer again after a checkpoint load.
        self._host_steps_in_window = 0
        self.register_load_state_dict_post_hook(_read_host_steps)

    def forward(self, task: str, loss: torch.Tensor) -> torch.Tensor:
        i = self.index(task)
        # A copy: the backward needs this micro-batch's weight after the window it closes has updated the
        # buffer in place (autograd refuses a saved tensor changed since).
        weighted = self.weights[i].clone() * loss
        if self.training:
            # A non-finite loss (its step is skipped) would stay in every later window's ratio: left out, on
            # the device (a branch would read the loss to the host).
            finite = torch.isfinite(loss.detach())
            self.window_sums[i] += torch.where(finite, loss.detach().double(), 0.0)
            self.window_counts[i] += finite.double()
            self.steps_in_window += 1
            self._host_steps_in_window += 1
            if self._host_steps_in_window == self.window_steps:
                self.end_window()
        return weighted

    @torch.no_grad()
    def end_window(self) -> None:
        sums, counts = self.window_sums.clone(), self.window_counts.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        # A task not sampled in this window keeps its previous mean (ratio 1 next time).
        means = torch.where(counts > 0, sums / counts.clamp(min=1), self.previous_means[0])
        self.previous_means.copy_(torch.stack([means, self.previous_means[0]]))
        self.windows_done += 1
        if int(self.windows_done) >= 2:
            ratios = self.previous_means[0] / self.previous_means[1].clamp(min=1e-12)
            self.weights.copy_(len(self.task_names) * torch.softmax(ratios / self.temperature, dim=0).float())
        self.window_sums.zero_()
        self.window_counts.zero_()
        self.steps_in_window.zero_()
        self._host_steps_in_window = 0

    def current_weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.weights.tolist(), strict=True))


def _read_host_steps(weighting: DynamicWeightAverage, _incompatible_keys: object) -> None:
    """After a load (a resume, also as part of the whole training module): one read of the loaded buffer."""
    weighting._host_steps_in_window = int(weighting.steps_in_window)


def build_weighting(
    strategy: str, task_names: list[str], *, alphas: dict[str, float] | None = None
) -> LossWeighting:
    if strategy == "static":
        return StaticWeighting(task_names, alphas)
    if strategy == "uncertainty":
        return UncertaintyWeighting(task_names)
    if strategy == "dwa":
        return DynamicWeightAverage(task_names)
    raise ValueError(f"unknown loss weighting {strategy!r}; strategies: {list(WEIGHTING_STRATEGIES)}")
