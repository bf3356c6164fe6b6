"""BN over the global batch of all processes (``--sync-bn``), on CPU (gloo) and CUDA (nccl).

torch's ``nn.SyncBatchNorm`` only runs on accelerators and has no place for noise, so bnprobe
has its own: the per-channel sum and sum of squares (in float64) and the count are summed over
processes by a differentiable all-reduce (its backward sums the gradients over processes), so
the backward pass also flows through the other processes' statistics, exactly as a single
process with the global batch would compute it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..distributed import world
from ..errors import BnprobeError
from ..noise.functional import noise_then_affine
from .bn import NoisyBatchNorm2d

__all__ = ["SyncBatchNorm2d", "convert_sync_batchnorm"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; its gradient is the sum of the processes' gradients."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        out = x.clone()
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        out = grad.clone()
        torch.distributed.all_reduce(out)
        return out


class SyncBatchNorm2d(NoisyBatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics are those of the global batch.

    Outside training mode or without a process group it computes what
    :class:`~bnprobe.norms.bn.NoisyBatchNorm2d` computes (a plain BatchNorm2d without noise).

    Args:
        num_features: Channels.
        noise: Optional noise module applied to ``x_hat`` before the affine.
        eps: Added to the variance.
        momentum: Running-statistics momentum (None: cumulative average).
    """

    def _global_moments(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dims = (0, *range(2, x.dim()))
        xd = x.double()
        count = torch.full((1,), x.numel() / x.shape[1], dtype=torch.float64, device=x.device)
        total = _AllReduceSum.apply(torch.cat([xd.sum(dims), xd.square().sum(dims), count]))
        c = x.shape[1]
        n = total[-1]
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean.square()).clamp_min(0)
        return mean, var, n

    def forward(self, x: Tensor) -> Tensor:
        """Normalize with the global batch statistics in training mode, else as BatchNorm2d."""
        if not (self.training and world().distributed):
            return super().forward(x)
        mean, var, n = self._global_moments(x)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                     else self.momentum)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.mul_(1 - f).add_(mean.to(x.dtype), alpha=f)
                self.running_var.mul_(1 - f).add_(unbiased.to(x.dtype), alpha=f)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x_hat = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + self.eps)
        return noise_then_affine(x_hat, self.weight, self.bias, self.noise)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` (with or without noise) by :class:`SyncBatchNorm2d`, in place.

    Parameters, buffers and noise modules are kept (the state_dict keys do not change, so a
    checkpoint of the converted model loads into the plain one).

    Args:
        model: The model.

    Returns:
        The model (the same object, unless it is itself a BatchNorm2d).

    Raises:
        BnprobeError: For other BN types (1d, 3d, torch's SyncBatchNorm), named.
    """
    def convert(module: nn.Module, name: str) -> nn.Module:
        if type(module) in (nn.BatchNorm2d, NoisyBatchNorm2d):
            new = SyncBatchNorm2d(module.num_features, getattr(module, "noise", None), module.eps,
                                  module.momentum)
            if new.affine != module.affine or not module.track_running_stats:
                raise BnprobeError(f"--sync-bn: {name or 'the model'} has affine={module.affine}, "
                                   f"track_running_stats={module.track_running_stats}; not supported")
            new.load_state_dict(module.state_dict(), strict=False)
            new.train(module.training)
            return new.to(next(iter(module.state_dict().values())).device)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm2d):
            raise BnprobeError(f"--sync-bn supports BatchNorm2d only; {name or 'the model'} is "
                               f"{type(module).__name__}")
        for child_name, child in list(module.named_children()):
            module.add_module(child_name, convert(child, f"{name}.{child_name}" if name else child_name))
        return module

    return convert(model, "")
