"""Samplers: how one forward pass of a model becomes one Monte Carlo sample of its prediction.

Every sampler has the same protocol: ``with sampler.sampling(model) as resample:`` puts the
model in evaluation mode with its randomness switched on, ``resample()`` is called before each
sample (a pass over the whole set), and on exit the model is restored: training flags, noise
flags and generators, and any buffer the sampler changed.

* :class:`InjectedNoise`: the model's own noise modules draw in eval mode (fixed or learned
  noise of a WN/AN/BN network).
* :class:`MCBN` (Teye et al. 2018): each sample normalizes every BN layer with the batch
  statistics of one random training batch.
* :class:`ParametricBN`: eval-mode BN followed by the fitted V/U noise of a noise file,
  ``(x_hat + V) * U * gamma + beta``, as :class:`~bnprobe.norms.bn.NoisyBatchNorm2d` with
  :class:`~bnprobe.noise.modules.FixedNoise` computes it.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Callable, ClassVar, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import BnprobeError
from ..layers import BN_TYPES, channel_moments, hooks_removed, preserved_state
from .functional import fixed_noise, noise_then_affine
from .network import noise_modules

__all__ = ["InjectedNoise", "MCBN", "ParametricBN", "Sampler", "bn_layers", "choose_sampler"]

Resample = Callable[[], None]


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The BatchNorm layers of a model in registration order (empty when it has none)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BN_TYPES)]


class Sampler(abc.ABC):
    """A way to draw Monte Carlo samples of a model's prediction.

    Attributes:
        kind: Name recorded in evaluation results (``noise``, ``mcbn``, ``parametric-bn``).
    """

    kind: ClassVar[str]

    @abc.abstractmethod
    def sampling(self, model: nn.Module) -> contextlib.AbstractContextManager[Resample]:
        """Context manager: the model in its sampling mode, yielding the per-sample callable."""


class InjectedNoise(Sampler):
    """The model's noise modules draw also in evaluation mode.

    Args:
        generator: Generator of the draws (None: each module's own).
    """

    kind = "noise"

    def __init__(self, generator: Optional[torch.Generator] = None) -> None:
        self.generator = generator

    @contextlib.contextmanager
    def sampling(self, model: nn.Module) -> Iterator[Resample]:
        """Eval mode with ``mc = True`` on every noise module; all restored on exit."""
        modules = noise_modules(model)
        if not modules:
            raise BnprobeError("the model has no noise modules to sample")
        flags = {m: m.training for m in model.modules()}
        saved = [(m.mc, m.generator) for m in modules]
        try:
            model.eval()
            for m in modules:
                m.mc = True
                if self.generator is not None:
                    m.generator = self.generator
            yield lambda: None
        finally:
            for m, (mc, gen) in zip(modules, saved):
                m.mc, m.generator = mc, gen
            for m, flag in flags.items():
                m.training = flag


class MCBN(Sampler):
    """MCBN: each sample normalizes with the statistics of one random training batch.

    ``resample()`` runs one training batch with every BN in training mode, records each
    layer's biased batch mean and variance, and installs them as the statistics that
    evaluation mode uses. Running statistics are restored on exit.

    Args:
        draw_batch: Returns a random training batch (inputs only) on the model's device.
    """

    kind = "mcbn"

    def __init__(self, draw_batch: Callable[[], Tensor]) -> None:
        self.draw_batch = draw_batch

    @contextlib.contextmanager
    def sampling(self, model: nn.Module) -> Iterator[Resample]:
        """Eval mode; ``resample()`` installs one training batch's statistics."""
        layers = bn_layers(model)
        if not layers:
            raise BnprobeError("MCBN needs BatchNorm layers")
        captured: dict[int, tuple[Tensor, Tensor]] = {}
        handles: list = []

        def capture(i: int):
            def hook(_m, inputs):
                var, mean = channel_moments(inputs[0].detach())
                captured[i] = (mean, var)

            return hook

        def resample() -> None:
            with hooks_removed(handles):
                for i, (_, m) in enumerate(layers):
                    handles.append(m.register_forward_pre_hook(capture(i)))
                    m.train()
                with torch.no_grad():
                    model(self.draw_batch())
            for i, (_, m) in enumerate(layers):
                m.eval()
                m.running_mean.copy_(captured[i][0])
                m.running_var.copy_(captured[i][1])

        with preserved_state(model):
            model.eval()
            yield resample


class ParametricBN(Sampler):
    """Eval-mode BN with the fitted noise: ``(x_hat + V) * U * gamma + beta`` per layer.

    ``x_hat`` is normalized with the running (population) statistics and ``V``, ``U`` are
    drawn per input and channel by :func:`~bnprobe.noise.functional.fixed_noise`, so the
    output equals :class:`~bnprobe.norms.bn.NoisyBatchNorm2d` with a ``FixedNoise`` of the
    same sigmas, bit for bit under the same generator.

    Args:
        sigmas: Per BN layer (in network order) per-channel ``(sigma_v, sigma_u)``.
        generator: Generator of the draws (None: the default RNG).
    """

    kind = "parametric-bn"

    def __init__(
        self,
        sigmas: Sequence[tuple[Sequence[float] | Tensor, Sequence[float] | Tensor]],
        generator: Optional[torch.Generator] = None,
    ) -> None:
        self.sigmas = list(sigmas)
        self.generator = generator

    def _check(self, layers: list[tuple[str, nn.Module]]) -> None:
        if len(layers) != len(self.sigmas):
            raise BnprobeError(f"the noise file has {len(self.sigmas)} layers, the network "
                               f"{len(layers)} BN layers")
        for (name, m), (sv, _su) in zip(layers, self.sigmas):
            if len(sv) != m.num_features:
                raise BnprobeError(f"noise file layer for {name} has {len(sv)} channels, the "
                                   f"network {m.num_features}")

    def _hook(self, sv: Tensor, su: Tensor):
        generator = self.generator

        def hook(m, inputs, _output):
            x_hat = F.batch_norm(inputs[0], m.running_mean, m.running_var, None, None, False, 0.0,
                                 m.eps)
            return noise_then_affine(x_hat, m.weight, m.bias,
                                     lambda t: fixed_noise(t, sv, su, True, generator))

        return hook

    @contextlib.contextmanager
    def sampling(self, model: nn.Module) -> Iterator[Resample]:
        """Eval mode with a forward hook on every BN; hooks removed and state restored on exit."""
        layers = bn_layers(model)
        if not layers:
            raise BnprobeError("parametric BN needs BatchNorm layers")
        self._check(layers)
        handles: list = []
        with preserved_state(model), hooks_removed(handles):
            model.eval()
            for (_, m), (sv, su) in zip(layers, self.sigmas):
                like = dict(device=m.running_mean.device, dtype=m.running_mean.dtype)
                handles.append(m.register_forward_hook(
                    self._hook(torch.as_tensor(sv, **like), torch.as_tensor(su, **like))))
            yield lambda: None


def choose_sampler(
    model: nn.Module,
    noise_sigmas: Optional[Sequence[tuple[Sequence[float], Sequence[float]]]] = None,
    draw_batch: Optional[Callable[[], Tensor]] = None,
    generator: Optional[torch.Generator] = None,
) -> Optional[Sampler]:
    """The Monte Carlo sampler of a model: its noise, parametric BN, MCBN, or None.

    Args:
        model: The model.
        noise_sigmas: Per-BN-layer ``(sigma_v, sigma_u)`` of a noise file: parametric BN for a
            BN network without noise modules.
        draw_batch: Random training batches: MCBN for a BN network (without noise sigmas).
        generator: Generator of injected or parametric noise draws.

    Returns:
        The sampler, or None for a deterministic model.
    """
    if noise_modules(model):
        return InjectedNoise(generator)
    if bn_layers(model):
        if noise_sigmas is not None:
            return ParametricBN(noise_sigmas, generator)
        if draw_batch is not None:
            return MCBN(draw_batch)
    return None
