"""Scale-invariant weights: find them, keep them at unit norm, exempt them from weight decay.

A weight is scale invariant when multiplying one output unit's weights (a slice along dim 0)
by a positive constant leaves the network's output unchanged. That holds for

* modules following the protocol ``scale_invariant_weights() -> list[Parameter]``
  (:class:`~bnprobe.norms.wn.WNConv2d`, :class:`~bnprobe.norms.wn.WNLinear`,
  :class:`~bnprobe.norms.an.ANConv2d`); the search does not descend into such a module;
* an ``nn.Conv1d/2d/3d`` or ``nn.Linear`` directly followed by a per-channel normalization
  (``BatchNorm*d`` or ``InstanceNorm*d``), recognised by the convention that the block
  exposes the two as submodules named ``conv`` and ``norm`` of the same parent (like
  ``bnprobe.norms.ConvNorm``), or as consecutive children of an ``nn.Sequential``;
* a conv/linear whose only use is a BatchNorm in the network's ``torch.fx`` graph (a paired
  :func:`~bnprobe.norms.tracing.bn_sites` entry: e.g. ``conv1 -> bn1`` in torchvision's
  residual blocks, which are not Sequential). The graph is read once per model and cached;
  an untraceable network keeps the two conventions above.

A conv bias before BN cancels in training mode, so such weights count as scale invariant too.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..errors import BnprobeError
from .tracing import bn_sites
from .wn import _WNBase

__all__ = [
    "param_groups_no_decay",
    "project_scale_invariant_",
    "project_unit_norm_",
    "scale_invariant_weights",
]

_LINEAR_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORM_TYPES = (_BatchNorm, _InstanceNorm)


@torch.no_grad()
def project_unit_norm_(weights: Iterable[Tensor]) -> list[Tensor]:
    """Rescale each weight in place to unit L2 norm per output unit (dim-0 slice).

    All-zero slices are left at zero.

    Args:
        weights: Weights of shape ``(C_out, ...)``.

    Returns:
        The per-unit norms before the projection, one ``(C_out,)`` tensor per weight.
    """
    norms = []
    for w in weights:
        n = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1)
        w.div_(n.clamp_min(torch.finfo(w.dtype).tiny).reshape((-1,) + (1,) * (w.dim() - 1)))
        norms.append(n)
    return norms


def _is_norm_pair(conv: Any, norm: Any) -> bool:
    return isinstance(conv, _LINEAR_TYPES) and isinstance(norm, _NORM_TYPES)


_GRAPH_PAIRS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], list]] = (
    weakref.WeakKeyDictionary()
)


def _graph_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """``(conv, bn)`` pairs of the fx graph, cached per model while its modules stay the same."""
    modules = tuple(id(m) for m in model.modules())
    cached = _GRAPH_PAIRS.get(model)
    if cached is not None and cached[0] == modules:
        return cached[1]
    pairs = []
    if any(isinstance(m, _BatchNorm) for m in model.modules()):
        try:
            pairs = [(site.conv, site.bn) for site in bn_sites(model) if site.paired]
        except BnprobeError:  # untraceable, or other norms: the naming conventions only
            pairs = []
    _GRAPH_PAIRS[model] = (modules, pairs)
    return pairs


def _norm_pairs(model: nn.Module) -> Iterator[tuple[nn.Module, nn.Module]]:
    """Yield ``(conv, norm)`` pairs of a plain conv/linear followed by BN/IN."""
    yield from _graph_pairs(model)
    for module in model.modules():
        conv, norm = getattr(module, "conv", None), getattr(module, "norm", None)
        if _is_norm_pair(conv, norm):
            yield conv, norm
        if isinstance(module, nn.Sequential):
            children = list(module.children())
            for first, second in zip(children, children[1:]):
                if _is_norm_pair(first, second):
                    yield first, second


def _protocol_weights(module: nn.Module, root: bool, out: list[nn.Parameter]) -> None:
    method = getattr(module, "scale_invariant_weights", None)
    # Only the root's own method is skipped (a model may implement the method by calling
    # scale_invariant_weights(self)); bnprobe's normalized layers are leaves and safe.
    if callable(method) and (not root or isinstance(module, _WNBase)):
        out.extend(method())
        return
    for child in module.children():
        _protocol_weights(child, False, out)


def scale_invariant_weights(model: nn.Module) -> list[nn.Parameter]:
    """Find every scale-invariant weight of a model (see the module docstring).

    Args:
        model: The model.

    Returns:
        The weights, each once, protocol modules first, then conv/norm pairs.
    """
    found: list[nn.Parameter] = []
    _protocol_weights(model, True, found)
    found.extend(conv.weight for conv, _ in _norm_pairs(model))
    unique: dict[int, nn.Parameter] = {}
    for w in found:
        unique.setdefault(id(w), w)
    return list(unique.values())


@torch.no_grad()
def project_scale_invariant_(model: nn.Module) -> None:
    """Project all of ``model``'s scale-invariant weights to unit norm per output unit.

    Unlike :func:`project_unit_norm_` on its own, this also rescales the running statistics
    of the BatchNorm after each projected conv/linear (``running_var * k^2`` and
    ``running_mean`` ``k (rm - c) + c`` with ``k`` the per-unit factor and ``c`` the conv bias),
    so that eval-mode outputs are unchanged by the projection as well.

    Args:
        model: The model (call after each optimizer step, and once before training).
    """
    pairs = list(_norm_pairs(model))
    pair_ids = {id(conv.weight) for conv, _ in pairs}
    rest = [w for w in scale_invariant_weights(model) if id(w) not in pair_ids]
    project_unit_norm_(rest)
    done: set[int] = set()
    for conv, norm in pairs:
        if id(conv.weight) in done:
            continue
        done.add(id(conv.weight))
        (n,) = project_unit_norm_([conv.weight])
        rm, rv = getattr(norm, "running_mean", None), getattr(norm, "running_var", None)
        if rm is None or rv is None or n.numel() != rm.numel():
            continue
        k = 1.0 / n.clamp_min(torch.finfo(n.dtype).tiny)
        k = torch.where(n > 0, k, torch.ones_like(k)).to(rm.dtype)
        c = conv.bias.to(rm.dtype) if conv.bias is not None else torch.zeros_like(rm)
        rm.copy_(k * (rm - c) + c)
        rv.mul_(k * k)


def param_groups_no_decay(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups with no weight decay on the scale-invariant weights.

    Args:
        model: The model; only parameters with ``requires_grad`` are included.
        weight_decay: Decay of every other parameter (biases and norm affines included).

    Returns:
        ``[{"params": others, "weight_decay": weight_decay, "name": "decay"},
        {"params": invariant, "weight_decay": 0.0, "name": "no_decay"}]``, empty groups
        left out; pass it to any ``torch.optim`` optimizer.
    """
    invariant_ids = {id(w) for w in scale_invariant_weights(model)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if id(p) in invariant_ids else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay), "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]
