"""FrozenBatchNorm for any number of dimensions (a module of its own: it imports torch, and
saved frozen models must find the class by name when loaded)."""

from __future__ import annotations

import torch


class FrozenBatchNorm(torch.nn.Module):
    """BatchNorm with fixed statistics and affine terms, for 1d, 2d and 3d inputs.

    Everything is a buffer, so optimizers never see it and ``model.train()`` cannot make it
    update statistics again. Computes what the source module computes in eval mode.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    eps: float

    def __init__(self, source: torch.nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        channels = source.num_features
        self.num_features = channels
        self.eps = source.eps
        weight = source.weight.detach().clone() if source.weight is not None else torch.ones(channels)
        bias = source.bias.detach().clone() if source.bias is not None else torch.zeros(channels)
        mean = source.running_mean.detach().clone() if source.running_mean is not None else torch.zeros(channels)
        var = source.running_var.detach().clone() if source.running_var is not None else torch.ones(channels)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("running_mean", mean)
        self.register_buffer("running_var", var)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(shape) + shift.reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
