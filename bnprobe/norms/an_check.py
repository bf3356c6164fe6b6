"""How well analytic normalization fits a network: predicted against measured per-layer moments.

:func:`an_layer_errors` takes a BN network, puts a :class:`PredictedNorm` in place of every
BatchNorm (it normalizes by the channel moments that :func:`~bnprobe.norms.an_graph.
propagate_graph` predicts for its input, then applies the BN's affine: the network that
analytic normalization would run), runs images through it and compares, at the input of every
normalization, the predicted per-channel mean and variance with the ones measured over the
images and positions, in that same network. Two switches:

* ``anchored=False`` (the chain): the AN network as it is. Errors compound from layer to
  layer, as they do when AN normalizes: a layer whose true variance is off by a factor passes
  that factor on. ``anchored=True``: the prediction at each normalization starts from the
  *measured* per-position moments at the outputs of the previous normalizations (and at the
  network's input): the error of one block's rules on the activations, without compounding.
* ``decorrelated=True`` (or ``"all"``): every activation entering a node is decorrelated (each
  position and channel paired with a different image), which makes the independence
  assumptions true; what remains is the Gaussian approximation and Monte Carlo noise. A test
  of the propagation machinery rather than of the approximation. ``"positions"`` removes only
  the dependence between positions (the channels at one position stay together), and
  ``"channels"`` only that between channels (each channel's map stays whole): which of the
  two correlations the independence assumption misses.

Statistics per normalization (:class:`LayerError`): the mean error in units of the measured
standard deviation, ``(mean_emp - mean_pred) / sd_emp``, and the variance ratio
``var_emp / var_pred`` (1 is exact), per channel.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional, Union

import torch
from torch import Tensor, fx, nn

from ..errors import BnprobeError
from .an import dataset_channel_moments
from .an_graph import propagate_graph, trace
from .moment_maps import channel_moments
from .spatial import lag_covariance

__all__ = ["Decorrelate", "LayerError", "PredictedNorm", "an_layer_errors", "with_predicted_norms"]


class Decorrelate(str, Enum):
    """What :func:`an_layer_errors` decorrelates in the activations entering every node."""

    NONE = "none"
    ALL = "all"  # positions and channels
    POSITIONS = "positions"  # positions from different images; a position's channels together
    CHANNELS = "channels"  # channels from different images; each channel's map whole

class PredictedNorm(nn.Module):
    """A BatchNorm's stand-in under analytic normalization.

    ``y = (x - mu) / sqrt(var + eps) * weight + bias`` with ``(mu, var)`` the channel moments
    propagated to its input (set by :meth:`propagate`), the affine shared with the BN it
    replaces.

    Args:
        bn: The BatchNorm whose affine and ``eps`` are used.

    Attributes:
        mean: Predicted input channel means (after :meth:`propagate`).
        var: Predicted input channel variances.
        anchor: Optional ``(mean, var)`` maps ``(H, W, C)`` that :meth:`propagate` returns
            instead of the prediction (the measured output moments, for ``anchored``).
    """

    channelwise = True  # a per-channel map: moment propagation keeps the spatial correlation

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.weight = bn.weight
        self.bias = bn.bias
        self.eps = float(bn.eps)
        self.mean: Optional[Tensor] = None
        self.var: Optional[Tensor] = None
        self.anchor: Optional[tuple[Tensor, Tensor]] = None

    def propagate(self, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the input's channel moments; return the output moment maps."""
        mu, var = channel_moments(m, v)
        self.mean, self.var = mu.detach(), var.detach()
        if self.anchor is not None:
            return self.anchor
        inv = (var + self.eps).rsqrt()
        m, v = (m - mu) * inv, v * inv * inv
        if self.weight is not None:
            m, v = m * self.weight, v * self.weight * self.weight
        return (m + self.bias, v) if self.bias is not None else (m, v)

    def forward(self, x: Tensor) -> Tensor:
        """Normalize by the predicted moments, then the affine."""
        if self.mean is None or self.var is None:
            raise RuntimeError("PredictedNorm: call propagate_graph before forward")
        shape = (-1,) + (1,) * (x.dim() - 2)
        inv = (self.var.to(x) + self.eps).rsqrt()
        y = (x - self.mean.to(x).reshape(shape)) * inv.reshape(shape)
        if self.weight is not None:
            y = y * self.weight.reshape(shape)
        return y + self.bias.reshape(shape) if self.bias is not None else y


def with_predicted_norms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (in eval mode) with every BatchNorm replaced by :class:`PredictedNorm`.

    Args:
        model: A network with ``nn.BatchNorm1d``/``2d`` layers (subclasses included).

    Returns:
        The copy.
    """
    net = copy.deepcopy(model).eval()
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, PredictedNorm(child))
    return net


@dataclass
class LayerError:
    """Predicted against measured moments at the input of one normalization.

    Attributes:
        name: The normalization's module name.
        size: Spatial size ``(H, W)`` of its input.
        mean_error: Per channel ``(mean_emp - mean_pred) / sd_emp``.
        var_ratio: Per channel ``var_emp / var_pred``.
        pooled_var_ratio: Mean over channels of ``var_emp`` over that of ``var_pred``.
    """

    name: str
    size: tuple[int, int]
    mean_error: Tensor
    var_ratio: Tensor
    pooled_var_ratio: float

    @property
    def channels(self) -> int:
        """Number of channels."""
        return int(self.var_ratio.numel())

    def summary(self) -> dict[str, Any]:
        """Summary statistics of the layer, as a flat dict (one table row).

        Median and max ``|mean error|``, variance-ratio median and 10%/90% quantiles, the
        pooled ratio and the fraction of channels within 10% (``|ratio - 1| < 0.1`` and
        ``|mean error| < 0.1``).
        """
        err = self.mean_error.abs()
        ratio = self.var_ratio
        within = ((ratio - 1).abs() < 0.1) & (err < 0.1)
        return {
            "layer": self.name,
            "C": self.channels,
            "HxW": f"{self.size[0]}x{self.size[1]}",
            "mean_err_med": float(err.median()),
            "mean_err_max": float(err.max()),
            "var_ratio_med": float(ratio.median()),
            "var_ratio_q10": float(ratio.quantile(0.1)),
            "var_ratio_q90": float(ratio.quantile(0.9)),
            "var_ratio_pooled": self.pooled_var_ratio,
            "within_10pct": float(within.double().mean()),
        }


class _Decorrelating(fx.Interpreter):
    """Runs a graph with every tensor entering a node decorrelated across positions/channels.

    Element ``(i, c, h, w)`` is replaced by that of image ``(i + o[c, h, w]) mod N`` with a
    random offset per element: marginals are kept, dependence between elements is removed
    (up to the ``1 / N`` chance that two elements draw the same offset). With ``POSITIONS``
    the offset is shared by the channels of a position (``o[h, w]``), with ``CHANNELS`` by the
    positions of a channel (``o[c]``); flat features count as channels.
    """

    def __init__(self, gm: fx.GraphModule, generator: torch.Generator, what: Decorrelate) -> None:
        super().__init__(gm)
        self.generator = generator
        self.what = what

    def _shuffle(self, value: Any) -> Any:
        if not isinstance(value, Tensor) or value.dim() < 2 or value.shape[0] < 2:
            return value
        n = value.shape[0]
        shape = list(value.shape[1:])
        if self.what is Decorrelate.POSITIONS:
            shape[0] = 1
        elif self.what is Decorrelate.CHANNELS:
            shape[1:] = [1] * (len(shape) - 1)
        offset = torch.randint(n, shape, generator=self.generator).expand(value.shape[1:]).to(value.device)
        index = (torch.arange(n, device=value.device).reshape((n,) + (1,) * (value.dim() - 1)) + offset) % n
        return value.gather(0, index)

    def run_node(self, n: fx.Node) -> Any:
        if n.op in ("call_module", "call_function", "call_method"):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args = fx.node.map_aggregate(args, self._shuffle)
            return getattr(self, n.op)(n.target, args, kwargs)
        return super().run_node(n)


class _Sums:
    """Float64 running sums of a (N, C, ...) tensor: per channel, and per channel and position."""

    def __init__(self) -> None:
        self.count = 0
        self.s1: Any = 0.0
        self.s2: Any = 0.0

    def add(self, x: Tensor) -> None:
        x = x.detach().double()
        self.count += x.shape[0]
        self.s1 = self.s1 + x.sum(dim=0)
        self.s2 = self.s2 + (x * x).sum(dim=0)

    def maps(self) -> tuple[Tensor, Tensor]:
        """Per (channel, position) mean and variance, as ``(H, W, C)`` maps (``(F,)`` if flat)."""
        mean = self.s1 / self.count
        var = (self.s2 / self.count - mean * mean).clamp_min(0.0)
        if mean.dim() == 3:
            return mean.permute(1, 2, 0), var.permute(1, 2, 0)
        return mean, var


def an_layer_errors(
    model: nn.Module,
    images: Tensor,
    mean: Optional[Tensor] = None,
    var: Optional[Tensor] = None,
    anchored: bool = False,
    decorrelated: Union[bool, str, Decorrelate] = False,
    spatial: bool = True,
    batch_size: int = 200,
    generator: Optional[torch.Generator] = None,
) -> list[LayerError]:
    """Per-normalization errors of analytic normalization on ``images`` (see the module doc).

    Args:
        model: A BN network (not modified; a copy with :class:`PredictedNorm` layers is used).
        images: Input batch ``(N, C, H, W)``, normalized as the network expects.
        mean: Input channel means (None: measured on ``images``).
        var: Input channel variances (None: measured on ``images``).
        anchored: Predict each normalization's input from the measured outputs of the previous
            ones (one block's error) instead of the whole chain.
        decorrelated: Decorrelate every node's inputs (True or ``"all"``: the rules'
            independence made true), only across positions (``"positions"``) or only across
            channels (``"channels"``); False or ``"none"``: as they are.
        spatial: Give the propagation the images' lag covariance (measured on ``images``),
            as an :class:`~bnprobe.norms.an_network.ANNetwork` has it: the first convolution's
            variance and a max pool behind it use the spatial correlation
            (:mod:`bnprobe.norms.spatial`). Not used with ``decorrelated`` (the images then
            reach the first layer decorrelated).
        batch_size: Images per forward.
        generator: Random generator of ``decorrelated`` (None: a fresh one seeded 0).

    Returns:
        One :class:`LayerError` per normalization, in graph order.

    Raises:
        BnprobeError: For a network without BatchNorm layers, or an unknown ``decorrelated``.
    """
    what = _decorrelate(decorrelated)
    net = with_predicted_norms(model)
    gm = trace(net)
    norms = {str(n.target): gm.get_submodule(n.target) for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), PredictedNorm)}  # fmt: skip
    if not norms:
        raise BnprobeError("an_layer_errors: the network has no BatchNorm layers")
    if mean is None or var is None:
        mean, var = dataset_channel_moments(images)
    size = tuple(images.shape[-2:])
    cov = None
    if spatial and what is Decorrelate.NONE:
        cov = lag_covariance(images).to(images)
    propagate_graph(gm, mean, var, size, cov)
    inputs = {k: _Sums() for k in norms}
    outputs = {k: _Sums() for k in norms}
    first = _Sums()
    hooks = []
    for name, module in norms.items():
        def hook(mod, args, out, name=name):
            inputs[name].add(args[0])
            outputs[name].add(out)

        hooks.append(module.register_forward_hook(hook))
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    runner = _Decorrelating(gm, generator, what) if what is not Decorrelate.NONE else None
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                batch = images[start : start + batch_size]
                first.add(batch)
                gm(batch) if runner is None else runner.run(batch)
    finally:
        for h in hooks:
            h.remove()
    if anchored:  # predict again, from the measured input and normalization outputs
        for name, module in norms.items():
            module.anchor = tuple(t.to(module.mean) for t in outputs[name].maps())
        start = first.maps()
        if cov is not None:  # cov is centred on the channel means: stationary input moments
            start = channel_moments(*start)
        propagate_graph(gm, *start, size, cov)
    result = []
    for name, module in norms.items():
        in_m, in_v = inputs[name].maps()
        emp_m, emp_v = channel_moments(in_m, in_v)
        pred_m, pred_v = module.mean.double(), module.var.double()
        result.append(LayerError(
            name=name,
            size=(int(in_m.shape[0]), int(in_m.shape[1])) if in_m.dim() == 3 else (1, 1),
            mean_error=(emp_m - pred_m) / emp_v.sqrt(),
            var_ratio=emp_v / pred_v,
            pooled_var_ratio=float(emp_v.mean() / pred_v.mean()),
        ))  # fmt: skip
    return result


def _decorrelate(value: Union[bool, str, Decorrelate]) -> Decorrelate:
    if isinstance(value, bool):
        return Decorrelate.ALL if value else Decorrelate.NONE
    try:
        return Decorrelate(value)
    except ValueError:
        choices = ", ".join(d.value for d in Decorrelate)
        raise BnprobeError(f"an_layer_errors: decorrelated={value!r} is not one of {choices}") from None
