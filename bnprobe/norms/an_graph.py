"""Analytic normalization beyond chains: moment propagation over a ``torch.fx`` graph.

:func:`propagate_graph` walks the nodes of a traced network in topological order, from its
single input (the dataset's per-channel moments) to its output, and gives every value the
mean and variance of each of its positions and channels (a moment map ``(H, W, C)``, see
:mod:`bnprobe.norms.moment_maps`; ``(F,)`` for flat features). The per-channel moments that a
normalization sees are the mixture over positions. Each node is handled by a rule looked up in
a registry (BackPACK style, :mod:`bnprobe.norms.an_rules`): ``call_module`` nodes by the
module's type (:data:`MODULE_RULES`), ``call_function`` nodes by the function
(:data:`FUNCTION_RULES`), ``call_method`` nodes by the method name (:data:`METHOD_RULES`).

A module with a ``propagate(m, v)`` method (:class:`~bnprobe.norms.an.ANConv2d`,
:class:`~bnprobe.norms.wn.WNConv2d`, ``WNLinear``, the noise modules, ``ChannelAffine``) is
handled by that method, before any registered rule: it receives moment maps ``(H, W, C)``
(channels last, so per-channel modules broadcast) or feature vectors, and must return the
same kind. ``ANConv2d.propagate`` stores the maps that the layer normalizes by (its
normalizer is their mixture over its output positions, borders included), so calling
:func:`propagate_graph` before a forward makes an AN network normalize correctly. Gradients
flow through the stored moments as in :func:`~bnprobe.norms.an.propagate_sequence`: call it
again before every forward.

Approximations (the rules themselves: :mod:`bnprobe.norms.moments`,
:mod:`bnprobe.norms.moment_maps`; their accuracy per layer on real networks:
:mod:`bnprobe.norms.an_check` and ``benchmarks/an_accuracy.py``):

* **Independence.** Activations are independent across channels and positions, and the
  operands of a sum (residual connections) or product (squeeze-and-excitation) are
  independent of each other. Natural images are not: pixels are strongly correlated in space
  and across colours. Given the images' lag covariance (``cov``, which
  :class:`~bnprobe.norms.an_network.ANNetwork` keeps in its input moments) the convolution
  reading the images gets its exact variance per position (taken as independent, resnet18's
  or mobilenet_v2's first conv on CIFAR-10 is off per channel by a factor of 0.3-2.5), and a
  max pool behind it pools correlated neighbours (resnet18's stem: as independent, its mean
  is overestimated by 0.4 sd): :mod:`bnprobe.norms.spatial`. Deeper, independence holds for
  the pooled statistics: anchored on measured inputs, every resnet18 block is within 7%.
* **Gaussianity.** Nonlinearities see a Gaussian with the value's per-position moments. Two
  exceptions keep exact forms: a max pool after a nondecreasing elementwise map (ReLU,
  ReLU6, leaky ReLU, sigmoid, ...) pools that map's Gaussian input and maps afterwards
  (``max`` commutes with the map); and a closed-form nonlinearity (ReLU family, hardtanh,
  hardsigmoid, hardswish) of a sum ``A + act(Y)`` of a Gaussian and such a map's output (a
  ResNet block's output, its branch plus a rectified shortcut) is computed by quadrature
  over ``Y``, not by Gaussianizing the sum (which underestimates the variance by 7-21%):
  Gauss-Legendre on each piece between the kinks of ``act`` (16 nodes each; error below
  1e-3 sd), Gauss-Hermite (64 nodes) where its kinks are unknown. A
  ReLU of a sum of few rectified terms (a depthwise conv on small maps) is still treated as
  Gaussian: +3-5% variance per mobilenet_v2 block. The values of a max-pooling window are
  taken as equicorrelated draws from the window's mixture of Gaussians (independent where
  the correlation is not known).
* **Input.** Every position of the input has the dataset's channel moments (or pass a
  per-position map). From there on every position has its own moments: zero padding is exact,
  which matters for small inputs into strided networks (a 32x32 image is 2x2 and 1x1 in
  resnet18's last stage).
* **Deterministic network.** Dropout and stochastic depth are the identity, noise modules
  their eval-mode map. BatchNorm in eval mode is the affine map of its running statistics; in
  training mode (or without running statistics) it normalizes by the batch, taken to equal
  the population (channel moments ``(bias, weight^2)``).
* Flattening ``(C, H, W)`` gives each feature its position's moments.

Errors compound along a chain of analytic normalizations: a layer whose true variance is off
by a factor hands that factor on to the next. At init on CIFAR-10, with the images' lag
covariance: resnet18's pooled variance ratio (measured / predicted) is 0.94-1.17 over its 20
normalizations, rising by 1-3% per ReLU from heavy-tailed pre-activations (kurtosis 3.2-4.2:
natural images' local activity, shared by the channels; on Gaussian images the chain stays
within 0.94-1.02); mobilenet_v2's rises to 2.5 by its last layer (+4-9% per block after
ReLU6 of depthwise convs of few taps, which is not Gaussian; as much on Gaussian images).

Supported nodes: ``supported()`` lists them; add rules with :func:`register_module_rule`,
:func:`register_function_rule` and :func:`register_method_rule`, or give a module a
``propagate(m, v)`` method. An unsupported node raises :class:`UnsupportedNodeError` naming
the node, its target and the module type.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from torch import Tensor, fx, nn

from ..errors import BnprobeError
from .an_rules import (
    FUNCTION_RULES,
    METHOD_RULES,
    MODULE_RULES,
    NodeMoments,
    RuleCall,
    UnsupportedNodeError,
    _propagate_method,
    _Unsupported,
    function_rule,
    module_rule,
    register_function_rule,
    register_method_rule,
    register_module_rule,
    supported,
)

__all__ = [
    "FUNCTION_RULES",
    "METHOD_RULES",
    "MODULE_RULES",
    "NodeMoments",
    "RuleCall",
    "UnsupportedNodeError",
    "graph_moments",
    "propagate_graph",
    "register_function_rule",
    "register_method_rule",
    "register_module_rule",
    "supported",
    "trace",
]


# ---------------------------------------------------------------------------------------------
# The walk


def _is_leaf(module: nn.Module) -> bool:
    return callable(getattr(module, "propagate", None)) or module_rule(module) is not None


class _Tracer(fx.Tracer):
    """Keeps modules that moment propagation handles (and torch.nn's) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_leaf(m) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` with ``torch.fx``, keeping every module that has a rule as a leaf.

    Leaves are modules with a ``propagate`` method (AN/WN layers, noise modules), every module
    type in :data:`MODULE_RULES` (e.g. BatchNorm subclasses, torchvision's
    ``StochasticDepth``) and torch.nn's own modules. The graph module shares the model's
    submodules, so :func:`propagate_graph` on it stores moments in the model's AN layers.

    Args:
        model: The network (in the mode it will run in; training-mode branches are traced).

    Returns:
        The ``GraphModule``.

    Raises:
        BnprobeError: If the model cannot be traced symbolically.
    """
    if _is_leaf(model):  # the root is always traced through: wrap a lone leaf
        model = nn.Sequential(model)
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # fx raises many kinds (TraceError, TypeError, ...)
        raise BnprobeError(f"cannot trace {type(model).__name__} with torch.fx: {err}") from err
    return fx.GraphModule(model, graph, type(model).__name__)


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return f"node {node.name!r} (call_module {node.target!r}, module type {type(module).__name__})"
    if node.op == "call_function":
        name = getattr(node.target, "__qualname__", None) or repr(node.target)
        module = getattr(node.target, "__module__", None)
        return f"node {node.name!r} (call_function {module + '.' if module else ''}{name})"
    return f"node {node.name!r} ({node.op} {node.target!r})"


def _apply(gm: fx.GraphModule, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if callable(getattr(module, "propagate", None)):
            x = args[0] if args else None
            if not isinstance(x, NodeMoments):
                raise _Unsupported("input is not a tensor of the graph")
            return _propagate_method(module, x)
        rule, target = module_rule(module), module
    elif node.op == "call_function":
        rule, target = function_rule(node.target), node.target
    elif node.op == "call_method":
        rule, target = METHOD_RULES.get(node.target), node.target
    else:  # get_attr: a constant tensor
        rule, target = None, None
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value.detach() if isinstance(value, Tensor) else value
    if rule is None:
        raise _Unsupported("no rule for it")
    return rule(RuleCall(node, target, tuple(args), dict(kwargs)))


def graph_moments(
    gm: Union[fx.GraphModule, nn.Module],
    mean: Tensor,
    var: Tensor,
    input_size: Sequence[int],
    cov: Optional[Tensor] = None,
) -> dict[str, NodeMoments]:
    """Like :func:`propagate_graph`, returning :class:`NodeMoments` (position maps).

    Args:
        gm: Traced network (a plain module is traced with :func:`trace`).
        mean: Input channel means ``(C_in,)``, or per-position means ``(H, W, C_in)``.
        var: Input variances, same shape.
        input_size: Input ``(H, W)``.
        cov: Optional lag covariance of the input ``(C_in, C_in, 2R+1, 2R+1)``
            (:func:`~bnprobe.norms.spatial.lag_covariance`): convolutions reading the input
            then use it (see :mod:`bnprobe.norms.spatial`).

    Returns:
        Node name -> moments of that node's output, for every tensor-valued node in
        topological order (the input placeholder first, ``"output"`` last when the network
        returns one tensor).

    Raises:
        UnsupportedNodeError: For a node without a rule, naming it, its target and module
            type, or for a rule that cannot handle the node's arguments.
        BnprobeError: If the graph does not have exactly one input, or the moments do not
            have shape ``(C_in,)``.
    """
    if not isinstance(gm, fx.GraphModule):
        gm = trace(gm)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise BnprobeError(f"propagate_graph: the graph needs exactly one input, it has {len(inputs)}")
    size = (int(input_size[0]), int(input_size[1]))
    if tuple(var.shape) != tuple(mean.shape) or tuple(mean.shape[:-1]) not in ((), size):
        raise BnprobeError(
            f"propagate_graph: input moments must both be (C_in,) or (H, W, C_in) with (H, W) = "
            f"{size}, got {tuple(mean.shape)} and {tuple(var.shape)}"
        )
    channels = int(mean.shape[-1])
    if cov is not None and (cov.dim() != 4 or tuple(cov.shape[:2]) != (channels, channels)
                            or cov.shape[2] != cov.shape[3] or cov.shape[2] % 2 != 1):  # fmt: skip
        raise BnprobeError(
            f"propagate_graph: the input's lag covariance must have shape ({channels}, {channels}, "
            f"2R+1, 2R+1), got {tuple(cov.shape)}"
        )
    env: dict[fx.Node, Any] = {}
    out: dict[str, NodeMoments] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":  # channel moments: every position has them
            value: Any = NodeMoments(mean.expand(*size, -1), var.expand(*size, -1), cov=cov)
        elif node.op == "output":
            value = fx.node.map_arg(node.args[0], lambda n: env[n])
        else:
            try:
                value = _apply(gm, node, env)
            except _Unsupported as err:
                raise UnsupportedNodeError(
                    f"propagate_graph: {_describe(gm, node)} is not supported: {err} (the "
                    "supported nodes are listed by bnprobe.norms.an_graph.supported(); give the "
                    "module a propagate(m, v) method or register a rule)"
                ) from None
            except ValueError as err:
                raise UnsupportedNodeError(f"propagate_graph: {_describe(gm, node)}: {err}") from err
        env[node] = value
        if isinstance(value, NodeMoments):
            out[node.name] = value
    return out


def propagate_graph(
    gm: Union[fx.GraphModule, nn.Module],
    mean: Tensor,
    var: Tensor,
    input_size: Sequence[int],
    cov: Optional[Tensor] = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Propagate input channel moments through a traced network, storing them in AN layers.

    Walks ``gm``'s nodes in topological order from its single input, applies each node's rule
    (module, function or method; see the module docstring for the approximations) and calls
    ``propagate`` on every module that has one, so :class:`~bnprobe.norms.an.ANConv2d` layers
    store the moment maps they normalize by. Call it before every forward of an AN network
    (the stored moments keep their autograd graph).

    Args:
        gm: Traced network (``trace(model)``; a plain module is traced here).
        mean: Channel means of the network's input ``(C_in,)`` (or a per-position map
            ``(H, W, C_in)``), e.g. from
            :func:`~bnprobe.norms.an.dataset_channel_moments`.
        var: Variances of the input, same shape.
        input_size: Spatial size ``(H, W)`` of the input.
        cov: Optional lag covariance of the input (see :func:`graph_moments`).

    Returns:
        Node name -> per-channel ``(mean, var)`` of the node's output (the mixture over its
        positions: what BN would measure; features after flattening) for every tensor-valued
        node. :func:`graph_moments` gives the position maps.

    Raises:
        UnsupportedNodeError: For a node without a rule (naming the node, its target and the
            module type).
        BnprobeError: If the graph does not have exactly one input.
    """
    return {k: v.channel() for k, v in graph_moments(gm, mean, var, input_size, cov).items()}
