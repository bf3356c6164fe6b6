"""The rules of :mod:`bnprobe.norms.an_graph`: one per module type, function or tensor method.

A rule takes a :class:`RuleCall` (the node, its module/function/method and its arguments with
graph values replaced by :class:`NodeMoments`) and returns the :class:`NodeMoments` of the
node's output. Register new ones with :func:`register_module_rule`,
:func:`register_function_rule` and :func:`register_method_rule`. The approximations are listed
in :mod:`bnprobe.norms.an_graph`.
"""

from __future__ import annotations

import functools
import inspect
import operator
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numpy.polynomial.legendre import leggauss
from torch import Tensor, fx, nn

from ..errors import BnprobeError
from .bn import NoisyBatchNorm2d
from .moment_maps import (
    adaptive_avg_pool2d_map_moments,
    avg_pool2d_map_moments,
    channel_moments,
    conv2d_map_moments,
    flatten_map_moments,
    max_pool2d_map_moments,
)
from .moments import (
    _hermite_rule,
    _var_floor,
    add_moments,
    concat_moments,
    conv_moments,
    gaussian_map_moments,
    hardsigmoid_moments,
    hardswish_moments,
    hardtanh_moments,
    leaky_relu_moments,
    product_moments,
)
from .spatial import conv2d_cov_moments
from .syncbn import SyncBatchNorm2d
from .wn import affine_moments

__all__ = [
    "FUNCTION_RULES",
    "METHOD_RULES",
    "MODULE_RULES",
    "NodeMoments",
    "Rule",
    "RuleCall",
    "UnsupportedNodeError",
    "function_rule",
    "module_rule",
    "register_function_rule",
    "register_method_rule",
    "register_module_rule",
    "supported",
]

_Size = Optional[tuple[int, int]]
_Map = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class UnsupportedNodeError(BnprobeError, TypeError):
    """A graph node that moment propagation cannot handle (the message names it)."""


@dataclass
class NodeMoments:
    """Moments of one value of the graph.

    Attributes:
        mean: Means per position and channel ``(H, W, C)``, or per feature ``(F,)``.
        var: Variances, same shape.
        pre: For the output of an elementwise map ``act(Y)``: ``(Y, act)``, ``Y`` treated as
            Gaussian (a max pool after a nondecreasing map pools ``Y``; a sum with a Gaussian
            keeps the form, see ``parts``).
        parts: For a sum ``A + act(Y)`` of a Gaussian ``A`` and such an output:
            ``(mean_A, var_A, Y, act)``, so that a closed-form nonlinearity of the sum is
            computed exactly (by quadrature over ``Y``) instead of Gaussianizing it.
        cov: For the network's input: its stationary lag covariance ``(C, C, 2R+1, 2R+1)``
            (:func:`~bnprobe.norms.spatial.lag_covariance`), which a convolution reading the
            input uses for its exact variance (None: independent positions and channels).
        corr: Per-channel spatial correlation ``(C, 2L+1, 2L+1)`` at small lags, where known
            (the first convolution's output and per-channel maps of it), for a max pool of
            correlated values (:mod:`bnprobe.norms.spatial`); None: independent.
    """

    mean: Tensor
    var: Tensor
    pre: Optional[tuple[NodeMoments, _Activation]] = field(default=None, repr=False)
    parts: Optional[tuple[Tensor, Tensor, NodeMoments, _Activation]] = field(default=None, repr=False)
    cov: Optional[Tensor] = field(default=None, repr=False)
    corr: Optional[Tensor] = field(default=None, repr=False)

    @property
    def size(self) -> _Size:
        """Spatial size ``(H, W)``; None for flat features."""
        return None if self.mean.dim() == 1 else (int(self.mean.shape[0]), int(self.mean.shape[1]))

    @property
    def channels(self) -> int:
        """Number of channels (features)."""
        return int(self.mean.shape[-1])

    def channel(self) -> tuple[Tensor, Tensor]:
        """Per-channel ``(mean, var)``: the mixture over positions (what BN measures)."""
        return channel_moments(self.mean, self.var)


class _Opaque:
    """A non-tensor value (a shape, a size): only view/reshape may consume it."""

    def __repr__(self) -> str:
        return "<opaque>"


class _Unsupported(Exception):
    """Raised inside a rule; the walker adds the node's name, target and module type."""


@dataclass
class RuleCall:
    """What a rule receives: the node, its module/function/method name, resolved arguments.

    Attributes:
        node: The fx node.
        target: The module (``call_module``), function (``call_function``) or method name.
        args: Positional arguments, nodes replaced by their values (:class:`NodeMoments`,
            constants, or opaque shapes).
        kwargs: Keyword arguments, likewise.
    """

    node: fx.Node
    target: Any
    args: tuple
    kwargs: dict

    def arg(self, index: int, name: str, default: Any = inspect.Parameter.empty) -> Any:
        """Argument by position or keyword (``default`` when absent)."""
        if index < len(self.args):
            return self.args[index]
        if name in self.kwargs:
            return self.kwargs[name]
        if default is inspect.Parameter.empty:
            raise _Unsupported(f"missing argument {name!r}")
        return default

    def moments(self, index: int = 0, name: str = "input") -> NodeMoments:
        """The tensor argument at ``index`` (error if it is not a tensor value)."""
        value = self.arg(index, name)
        if not isinstance(value, NodeMoments):
            raise _Unsupported(f"argument {name!r} is not a tensor of the graph ({value!r})")
        return value


Rule = Callable[[RuleCall], Any]

MODULE_RULES: dict[type, Rule] = {}
"""Rules of ``call_module`` nodes by module type (a subclass uses its base's rule unless it
overrides ``forward``)."""
FUNCTION_RULES: dict[Any, Rule] = {}
"""Rules of ``call_function`` nodes by function."""
METHOD_RULES: dict[str, Rule] = {}
"""Rules of ``call_method`` nodes (tensor methods) by name."""


def _registrar(table: dict[Any, Rule], keys: Sequence[Any]) -> Callable[[Rule], Rule]:
    def deco(rule: Rule) -> Rule:
        for key in keys:
            table[key] = rule
        return rule

    return deco


def register_module_rule(*types: type) -> Callable[[Rule], Rule]:
    """Decorator registering a rule for ``call_module`` nodes of the given module types."""
    return _registrar(MODULE_RULES, types)


def register_function_rule(*functions: Any) -> Callable[[Rule], Rule]:
    """Decorator registering a rule for ``call_function`` nodes of the given functions."""
    return _registrar(FUNCTION_RULES, functions)


def register_method_rule(*names: str) -> Callable[[Rule], Rule]:
    """Decorator registering a rule for ``call_method`` nodes of the given tensor methods."""
    return _registrar(METHOD_RULES, names)


_optional_rules_registered = False


def _register_optional_rules() -> None:
    """Register torchvision's stochastic depth (module and function) once torchvision is loaded.

    A network that uses them has imported torchvision; importing it here would add about 2 s
    of CPU to the start of every bnprobe command.
    """
    global _optional_rules_registered
    if _optional_rules_registered or "torchvision" not in sys.modules:
        return
    from torchvision.ops import StochasticDepth, stochastic_depth

    MODULE_RULES.setdefault(StochasticDepth, _activation_module)
    FUNCTION_RULES.setdefault(stochastic_depth, _activation_function)
    _optional_rules_registered = True


def module_rule(module: nn.Module) -> Optional[Rule]:
    """The registered rule for ``module`` (by type; None if there is none)."""
    _register_optional_rules()
    kind = type(module)
    for base in kind.__mro__:
        rule = MODULE_RULES.get(base)
        if rule is not None and (base is kind or kind.forward is base.forward):
            return rule
    return None


# ---------------------------------------------------------------------------------------------
# Elementwise maps


@dataclass(frozen=True)
class _Activation:
    """An elementwise map: its moment rule for a Gaussian input and its pointwise function."""

    moments: _Map
    pointwise: Callable[[Tensor], Tensor]
    monotone: bool  # nondecreasing: commutes with max pooling
    closed_form: bool  # cheap enough to evaluate at every node of a quadrature
    kinks: Optional[tuple[float, ...]] = None  # where a piecewise-smooth map bends (None: unknown)


def _identity(x: Tensor) -> Tensor:
    return x


_IDENTITY = _Activation(lambda m, v: (m, v), _identity, True, True)


def _compose(outer: _Activation, inner: _Activation) -> _Activation:
    return _Activation(
        lambda m, v: outer.moments(*inner.moments(m, v)),
        lambda x: outer.pointwise(inner.pointwise(x)),
        outer.monotone and inner.monotone,
        outer.closed_form and inner.closed_form,
    )


_Z_RANGE = 8.0  # |z| beyond it carries a normal mass below 1e-15


@functools.cache
def _legendre_rule(order: int) -> tuple[np.ndarray, np.ndarray]:
    # Gauss-Legendre nodes and weights on [-1, 1] (numpy computes them afresh on every call)
    return leggauss(order)


def _piecewise_rule(kinks: Sequence[float], y_m: Tensor, s: Tensor, order: int) -> tuple[Tensor, Tensor]:
    # Nodes z (..., n) and weights (..., n) summing to 1 for E[f(m + s Z)], Z ~ N(0, 1), where f
    # bends at the kinks: Gauss-Legendre on each piece of [-8, 8] between them, so that every
    # piece is smooth (Gauss-Hermite across a kink converges slowly: 64 nodes leave ~1e-2 errors)
    x, gw = (torch.as_tensor(t, dtype=y_m.dtype, device=y_m.device) for t in _legendre_rule(order))
    bends = [((k - y_m) / s).clamp(-_Z_RANGE, _Z_RANGE) for k in sorted(kinks)]
    edges = [torch.full_like(y_m, -_Z_RANGE), *bends, torch.full_like(y_m, _Z_RANGE)]
    zs, ws = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        half = ((hi - lo) * 0.5).unsqueeze(-1)
        zs.append(((lo + hi) * 0.5).unsqueeze(-1) + half * x)
        ws.append(half * gw)
    z = torch.cat(zs, dim=-1)
    w = torch.cat(ws, dim=-1) * torch.exp(-0.5 * z * z)
    return z, w / w.sum(dim=-1, keepdim=True)


def _sum_rule(parts: tuple[Tensor, Tensor, NodeMoments, _Activation], act: _Activation, order: int = 64):
    # moments of act(A + h(Y)), A ~ N(a_m, a_v) independent of Y ~ N(m_Y, v_Y): quadrature over
    # Y of the closed-form moments of act(A + c) at c = h(y_i); split at h's kinks when known
    # (16 Gauss-Legendre nodes per piece), Gauss-Hermite otherwise
    a_m, a_v, y, h = parts
    a_m, a_v, y_m, y_v = torch.broadcast_tensors(a_m, a_v, y.mean, y.var)
    s = y_v.clamp_min(_var_floor(y_v.dtype)).sqrt()
    if h.kinks:
        z, w = _piecewise_rule(h.kinks, y_m, s, 16)
    else:
        nodes, weights = _hermite_rule(order)
        z = torch.as_tensor(nodes, dtype=a_m.dtype, device=a_m.device)
        w = torch.as_tensor(weights, dtype=a_m.dtype, device=a_m.device)
    c = h.pointwise(y_m.unsqueeze(-1) + s.unsqueeze(-1) * z)
    mu, var = act.moments(a_m.unsqueeze(-1) + c, a_v.unsqueeze(-1).expand_as(c))
    mean = torch.linalg.vecdot(mu, w)
    return mean, torch.linalg.vecdot(var + (mu - mean.unsqueeze(-1)).square(), w)


def _elementwise(x: NodeMoments, act: _Activation) -> NodeMoments:
    if act is _IDENTITY:
        return x
    if x.parts is not None and act.closed_form:
        mean, var = _sum_rule(x.parts, act)
    else:
        mean, var = act.moments(x.mean, x.var)
    pre = (x.pre[0], _compose(act, x.pre[1])) if x.pre is not None and x.parts is None else (x, act)
    return NodeMoments(mean, var, pre)


def _quadrature(fn: Callable[[Tensor], Tensor], monotone: bool) -> _Activation:
    return _Activation(lambda m, v: gaussian_map_moments(fn, m, v), fn, monotone, False)


def _relu(slope: float) -> _Activation:
    return _Activation(lambda m, v: leaky_relu_moments(m, v, slope),
                       functools.partial(F.leaky_relu, negative_slope=slope), slope >= 0, True,
                       (0.0,))  # fmt: skip


def _hardtanh(lo: float, hi: float) -> _Activation:
    return _Activation(lambda m, v: hardtanh_moments(m, v, lo, hi),
                       functools.partial(torch.clamp, min=lo, max=hi), True, True,
                       (float(lo), float(hi)))  # fmt: skip


_HARDSIGMOID = _Activation(hardsigmoid_moments, F.hardsigmoid, True, True, (-3.0, 3.0))
_HARDSWISH = _Activation(hardswish_moments, F.hardswish, False, True, (-3.0, 3.0))


def _module_activation(module: nn.Module) -> _Activation:
    if isinstance(module, nn.ReLU):
        return _relu(0.0)
    if isinstance(module, nn.LeakyReLU):
        return _relu(module.negative_slope)
    if isinstance(module, nn.Hardtanh):  # also ReLU6
        return _hardtanh(module.min_val, module.max_val)
    if isinstance(module, nn.Hardsigmoid):
        return _HARDSIGMOID
    if isinstance(module, nn.Hardswish):
        return _HARDSWISH
    if isinstance(module, nn.SiLU):
        return _quadrature(F.silu, False)
    if isinstance(module, nn.GELU):
        return _quadrature(functools.partial(F.gelu, approximate=module.approximate), False)
    if isinstance(module, nn.Mish):
        return _quadrature(F.mish, False)
    if isinstance(module, nn.Sigmoid):
        return _quadrature(torch.sigmoid, True)
    if isinstance(module, nn.Tanh):
        return _quadrature(torch.tanh, True)
    if isinstance(module, nn.Softplus):
        return _quadrature(functools.partial(F.softplus, beta=module.beta, threshold=module.threshold), True)
    return _IDENTITY  # Identity, Dropout, StochasticDepth (eval-mode maps)


@register_module_rule(
    nn.ReLU, nn.LeakyReLU, nn.Hardtanh, nn.ReLU6, nn.Hardsigmoid, nn.Hardswish, nn.SiLU,
    nn.GELU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip  (torchvision's StochasticDepth: _register_optional_rules)
def _activation_module(call: RuleCall) -> NodeMoments:
    return _elementwise(call.moments(0), _module_activation(call.target))


def _function_activation(call: RuleCall) -> _Activation:
    f = call.target
    if f in (F.relu, torch.relu, "relu", "relu_"):
        return _relu(0.0)
    if f is F.leaky_relu:
        return _relu(float(call.arg(1, "negative_slope", 0.01)))
    if f is F.relu6:
        return _hardtanh(0.0, 6.0)
    if f is F.hardtanh:
        return _hardtanh(float(call.arg(1, "min_val", -1.0)), float(call.arg(2, "max_val", 1.0)))
    if f is F.hardsigmoid:
        return _HARDSIGMOID
    if f is F.hardswish:
        return _HARDSWISH
    if f is F.silu:
        return _quadrature(F.silu, False)
    if f is F.gelu:
        return _quadrature(functools.partial(F.gelu, approximate=call.arg(1, "approximate", "none")), False)
    if f is F.mish:
        return _quadrature(F.mish, False)
    if f in (torch.sigmoid, F.sigmoid, "sigmoid", "sigmoid_"):
        return _quadrature(torch.sigmoid, True)
    if f in (torch.tanh, F.tanh, "tanh", "tanh_"):
        return _quadrature(torch.tanh, True)
    if f is F.softplus:
        beta, threshold = float(call.arg(1, "beta", 1.0)), float(call.arg(2, "threshold", 20.0))
        return _quadrature(functools.partial(F.softplus, beta=beta, threshold=threshold), True)
    return _IDENTITY  # dropout, stochastic depth, contiguous, clone


@register_function_rule(
    F.relu, torch.relu, F.leaky_relu, F.relu6, F.hardtanh, F.hardsigmoid, F.hardswish, F.silu,
    F.gelu, F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.softplus,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
)  # fmt: skip  (torchvision's stochastic_depth: _register_optional_rules)
@register_method_rule("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone")
def _activation_function(call: RuleCall) -> NodeMoments:
    return _elementwise(call.moments(0), _function_activation(call))


# ---------------------------------------------------------------------------------------------
# Linear maps


@register_module_rule(nn.Conv2d)
def _conv2d(call: RuleCall) -> NodeMoments:
    conv: nn.Conv2d = call.target
    x = call.moments(0)
    if x.size is None:
        raise _Unsupported("Conv2d on flat features")
    if x.cov is not None and conv.groups == 1 and conv.padding_mode == "zeros":
        mean, var, corr = conv2d_cov_moments(x.mean, x.cov, conv.weight, conv.bias, conv.stride,
                                             conv.padding, conv.dilation)  # fmt: skip
        return NodeMoments(mean, var, corr=corr)
    return NodeMoments(*conv2d_map_moments(
        x.mean, x.var, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
        conv.groups, conv.padding_mode,
    ))  # fmt: skip


@register_module_rule(nn.Linear)
def _linear(call: RuleCall) -> NodeMoments:
    x = call.moments(0)
    if x.size is not None:
        raise _Unsupported(f"Linear on a (C, H, W) = ({x.channels}, {x.size[0]}, {x.size[1]}) tensor")
    return NodeMoments(*conv_moments(x.mean, x.var, call.target.weight, call.target.bias))


@register_module_rule(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, NoisyBatchNorm2d, SyncBatchNorm2d
)
def _batch_norm(call: RuleCall) -> NodeMoments:
    bn = call.target
    x = call.moments(0)
    if bn.training or bn.running_mean is None:  # batch statistics, taken as the population's
        mu, var = x.channel()
        inv = (var + bn.eps).rsqrt()
        x_mean, x_var = (x.mean - mu) * inv, x.var * inv * inv
    else:
        inv = (bn.running_var + bn.eps).rsqrt()
        x_mean, x_var = (x.mean - bn.running_mean) * inv, x.var * inv * inv
    mean, var = affine_moments(x_mean, x_var, bn.weight, bn.bias, getattr(bn, "noise", None))
    return NodeMoments(mean, var, corr=x.corr)


def _propagate_method(module: nn.Module, x: NodeMoments) -> NodeMoments:
    # propagate_spatial(m, v, cov) -> (m, v, corr): a module reading the input, given its lag
    # covariance; a module marked ``channelwise`` (per-channel maps) keeps the correlation
    spatial = getattr(module, "propagate_spatial", None)
    if x.cov is not None and callable(spatial):
        mean, var, corr = spatial(x.mean, x.var, x.cov)
    else:
        mean, var = module.propagate(x.mean, x.var)
        corr = x.corr if getattr(module, "channelwise", False) else None
    if mean.dim() != x.mean.dim() or var.shape != mean.shape:
        raise _Unsupported(
            f"its propagate(m, v) returned shapes {tuple(mean.shape)}, {tuple(var.shape)} for "
            f"input moments of shape {tuple(x.mean.shape)} (it must keep the (H, W) dims of a "
            "moment map, channels last)"
        )
    return NodeMoments(mean, var, corr=corr)


# ---------------------------------------------------------------------------------------------
# Pooling


def _spatial(x: NodeMoments, what: str) -> tuple[int, int]:
    if x.size is None:
        raise _Unsupported(f"{what} on flat features")
    return x.size


def _avg_pool(x: NodeMoments, k, s, p, ceil_mode, include_pad, divisor) -> NodeMoments:
    _spatial(x, "avg_pool2d")
    return NodeMoments(*avg_pool2d_map_moments(x.mean, x.var, k, s, p, ceil_mode, include_pad, divisor))


def _max_pool(x: NodeMoments, k, s, p, d, ceil_mode) -> NodeMoments:
    _spatial(x, "max_pool2d")
    source, act = x.pre if x.pre is not None and x.pre[1].monotone else (x, _IDENTITY)
    # max commutes with a nondecreasing map: pool its Gaussian input, map afterwards
    pooled = max_pool2d_map_moments(source.mean, source.var, k, s, p, d, ceil_mode, source.corr)
    return _elementwise(NodeMoments(*pooled), act)


def _adaptive_avg_pool(x: NodeMoments, output_size) -> NodeMoments:
    _spatial(x, "adaptive_avg_pool2d")
    return NodeMoments(*adaptive_avg_pool2d_map_moments(x.mean, x.var, output_size))


@register_module_rule(nn.AvgPool2d)
def _avg_pool_module(call: RuleCall) -> NodeMoments:
    p = call.target
    return _avg_pool(call.moments(0), p.kernel_size, p.stride, p.padding, p.ceil_mode,
                     p.count_include_pad, p.divisor_override)  # fmt: skip


@register_function_rule(F.avg_pool2d)
def _avg_pool_function(call: RuleCall) -> NodeMoments:
    return _avg_pool(
        call.moments(0), call.arg(1, "kernel_size"), call.arg(2, "stride", None),
        call.arg(3, "padding", 0), call.arg(4, "ceil_mode", False),
        call.arg(5, "count_include_pad", True), call.arg(6, "divisor_override", None),
    )  # fmt: skip


@register_module_rule(nn.MaxPool2d)
def _max_pool_module(call: RuleCall) -> NodeMoments:
    p = call.target
    if p.return_indices:
        raise _Unsupported("MaxPool2d with return_indices")
    return _max_pool(call.moments(0), p.kernel_size, p.stride, p.padding, p.dilation, p.ceil_mode)


@register_function_rule(F.max_pool2d)
def _max_pool_function(call: RuleCall) -> NodeMoments:
    if call.arg(6, "return_indices", False):
        raise _Unsupported("max_pool2d with return_indices")
    return _max_pool(
        call.moments(0), call.arg(1, "kernel_size"), call.arg(2, "stride", None),
        call.arg(3, "padding", 0), call.arg(4, "dilation", 1), call.arg(5, "ceil_mode", False),
    )  # fmt: skip


@register_module_rule(nn.AdaptiveAvgPool2d)
def _adaptive_avg_pool_module(call: RuleCall) -> NodeMoments:
    return _adaptive_avg_pool(call.moments(0), call.target.output_size)


@register_function_rule(F.adaptive_avg_pool2d)
def _adaptive_avg_pool_function(call: RuleCall) -> NodeMoments:
    return _adaptive_avg_pool(call.moments(0), call.arg(1, "output_size"))


def _dims(value: Any) -> tuple[int, ...]:
    return (int(value),) if isinstance(value, int) else tuple(int(d) for d in value)


@register_function_rule(torch.mean)
@register_method_rule("mean")
def _mean(call: RuleCall) -> NodeMoments:
    x = call.moments(0)
    dims = sorted(d % 4 for d in _dims(call.arg(1, "dim", ())))  # of the (N, C, H, W) tensor
    if x.size is None or dims != [2, 3]:
        raise _Unsupported(f"mean over dims {call.arg(1, 'dim', None)!r} (only (2, 3) of a 4-D tensor)")
    pooled = _adaptive_avg_pool(x, 1)
    return pooled if call.arg(2, "keepdim", False) else _flatten(pooled)


# ---------------------------------------------------------------------------------------------
# Shapes: flatten/view/reshape for a classifier, concatenation


def _flatten(x: NodeMoments) -> NodeMoments:
    return NodeMoments(*flatten_map_moments(x.mean, x.var))


@register_module_rule(nn.Flatten)
def _flatten_module(call: RuleCall) -> NodeMoments:
    f = call.target
    if f.start_dim != 1 or f.end_dim != -1:
        raise _Unsupported(f"Flatten(start_dim={f.start_dim}, end_dim={f.end_dim}); only (1, -1)")
    return _flatten(call.moments(0))


@register_function_rule(torch.flatten)
@register_method_rule("flatten")
def _flatten_function(call: RuleCall) -> NodeMoments:
    start, end = int(call.arg(1, "start_dim", 0)), int(call.arg(2, "end_dim", -1))
    if start != 1 or end != -1:
        raise _Unsupported(f"flatten(start_dim={start}, end_dim={end}); only (1, -1)")
    return _flatten(call.moments(0))


@register_function_rule(torch.reshape)
@register_method_rule("view", "reshape")
def _reshape(call: RuleCall) -> NodeMoments:
    x = call.moments(0)
    shape = call.args[1:] if call.args[1:] else (call.kwargs.get("shape") or call.kwargs.get("size"),)
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    numel = x.mean.numel()
    if len(shape) == 2 and (shape[1] == -1 or shape[1] == numel):
        return _flatten(x)
    raise _Unsupported(f"reshape to {shape!r}; only (batch, -1) flattening for a classifier")


@register_function_rule(torch.cat, torch.concat)
def _cat(call: RuleCall) -> NodeMoments:
    parts = call.arg(0, "tensors")
    dim = int(call.arg(1, "dim", 0))
    if not parts or not all(isinstance(p, NodeMoments) for p in parts):
        raise _Unsupported("cat of values that are not all tensors of the graph")
    sizes = {p.size for p in parts}
    flat = parts[0].size is None
    if len(sizes) != 1 or dim not in ((1, -1) if flat else (1, -3)):
        raise _Unsupported(f"cat along dim {dim} of sizes {sorted(map(str, sizes))}; only channels")
    return NodeMoments(*concat_moments([(p.mean, p.var) for p in parts]))


# ---------------------------------------------------------------------------------------------
# Arithmetic: sums and products of independent values, affine maps by constants


def _constant(value: Any, like: NodeMoments) -> Tensor:
    # a python number or a tensor constant, as a scalar or per-channel tensor
    t = torch.as_tensor(value, dtype=like.mean.dtype, device=like.mean.device)
    if t.numel() == 1:
        return t.reshape(())
    channel_dim = -3 if like.size is not None else -1  # of the (N, C, H, W) or (N, F) tensor
    if t.dim() >= -channel_dim and t.shape[channel_dim] == like.channels and t.numel() == like.channels:
        return t.reshape(-1)
    raise _Unsupported(f"constant of shape {tuple(t.shape)} is not per-channel")


def _check_broadcast(a: NodeMoments, b: NodeMoments) -> None:
    if (a.size is None) != (b.size is None):
        raise _Unsupported("operands mix flat features and feature maps")
    try:
        torch.broadcast_shapes(a.mean.shape, b.mean.shape)
    except RuntimeError:
        raise _Unsupported(
            f"operands of shapes (H, W, C) {tuple(a.mean.shape)} and {tuple(b.mean.shape)}"
        ) from None


def _operands(call: RuleCall, names: Sequence[str]) -> tuple[Any, Any]:
    return call.arg(0, names[0]), call.arg(1, names[1])


def _shift(x: NodeMoments, c: Tensor) -> NodeMoments:
    return NodeMoments(x.mean + c, x.var)


def _scale(x: NodeMoments, c: Tensor) -> NodeMoments:
    return NodeMoments(x.mean * c, x.var * c * c)


def _add_values(a: Any, b: Any) -> NodeMoments:
    if isinstance(a, NodeMoments) and isinstance(b, NodeMoments):
        _check_broadcast(a, b)
        total = NodeMoments(*add_moments((a.mean, a.var), (b.mean, b.var)))
        for x, gauss in ((a, b), (b, a)):  # Gaussian + act(Gaussian): keep the parts
            if x.pre is not None and x.parts is None and gauss.pre is None and gauss.parts is None:
                total.parts = (gauss.mean, gauss.var, x.pre[0], x.pre[1])
        return total
    if isinstance(a, NodeMoments):
        return _shift(a, _constant(b, a))
    if isinstance(b, NodeMoments):
        return _shift(b, _constant(a, b))
    raise _Unsupported("addition of two constants")


def _times(value: Any, factor: float) -> Any:
    if factor == 1:
        return value
    if isinstance(value, NodeMoments):
        return _scale(value, _constant(factor, value))
    return value * factor


@register_function_rule(operator.add, operator.iadd, torch.add)
@register_method_rule("add", "add_")
def _add(call: RuleCall) -> NodeMoments:
    a, b = _operands(call, ("input", "other"))
    return _add_values(a, _times(b, call.kwargs.get("alpha", 1)))


@register_function_rule(operator.sub, operator.isub, torch.sub)
@register_method_rule("sub", "sub_")
def _sub(call: RuleCall) -> NodeMoments:
    a, b = _operands(call, ("input", "other"))
    return _add_values(a, _times(b, -call.kwargs.get("alpha", 1)))


@register_function_rule(operator.mul, operator.imul, torch.mul)
@register_method_rule("mul", "mul_")
def _mul(call: RuleCall) -> NodeMoments:
    a, b = _operands(call, ("input", "other"))
    if isinstance(a, NodeMoments) and isinstance(b, NodeMoments):
        _check_broadcast(a, b)
        return NodeMoments(*product_moments(a.mean, a.var, b.mean, b.var))
    if isinstance(a, NodeMoments):
        return _scale(a, _constant(b, a))
    if isinstance(b, NodeMoments):
        return _scale(b, _constant(a, b))
    raise _Unsupported("product of two constants")


@register_function_rule(operator.truediv, operator.itruediv, torch.div)
@register_method_rule("div", "div_")
def _div(call: RuleCall) -> NodeMoments:
    a, b = _operands(call, ("input", "other"))
    if not isinstance(a, NodeMoments) or isinstance(b, NodeMoments):
        raise _Unsupported("division other than by a constant")
    return _scale(a, 1.0 / _constant(b, a))


@register_function_rule(getattr, operator.getitem)
@register_method_rule("size", "dim")
def _opaque(call: RuleCall) -> _Opaque:
    # x.shape, x.size(0), shape[0]: only consumed by view/reshape
    source = call.args[0] if call.args else None
    if isinstance(source, NodeMoments) and call.target is operator.getitem:
        raise _Unsupported("indexing a tensor")
    return _Opaque()


def function_rule(function: Any) -> Optional[Rule]:
    """The registered rule for a ``call_function`` target (None if there is none)."""
    _register_optional_rules()
    return FUNCTION_RULES.get(function)


def supported() -> str:
    """One line listing the supported module types, functions and methods."""
    _register_optional_rules()
    modules = sorted({t.__name__ for t in MODULE_RULES})
    functions = sorted({getattr(f, "__name__", repr(f)) for f in FUNCTION_RULES})
    return (
        f"modules with a propagate(m, v) method; modules {', '.join(modules)}; functions "
        f"{', '.join(functions)}; tensor methods {', '.join(sorted(METHOD_RULES))}"
    )
