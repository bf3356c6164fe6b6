"""A network's BN layers read from its torch.fx graph: which conv each one normalizes.

:func:`bn_sites` traces a network with ``torch.fx`` (bnprobe's normalized layers and noise
modules are leaves, like ``torch.nn`` modules) and returns every BatchNorm layer in graph
(execution) order, with the conv/linear it can be folded into: a BN is *paired* when its
input is the output of a plain ``nn.Conv2d`` (zero padding) or ``nn.Linear`` module that is
called once and whose output feeds this BN only. Other BN layers (after a concatenation, an
addition, a pooling, a shared or a custom conv) are *unpaired*, with a note saying why.

Networks that use another normalization (LayerNorm, GroupNorm, InstanceNorm, ...), that
cannot be traced, or that call a BN module more than once or read its attributes in their
forward are refused with a :class:`~bnprobe.errors.BnprobeError` naming the module.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..errors import BnprobeError
from ..noise.modules import NoiseModule
from .standalone import _ChannelNorm
from .wn import _WNBase

__all__ = ["BNSite", "bn_sites", "normalized_channels", "normalized_layers"]

#: bnprobe modules that tracing keeps as single ``call_module`` nodes.
LEAF_TYPES = (_WNBase, _ChannelNorm, NoiseModule)
#: Modules that normalize and carry noise: converted layers, and BN in BN networks.
NORMALIZED_TYPES = (_WNBase, _ChannelNorm, _BatchNorm)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)
_OTHER_NORMS = tuple(t for t in (nn.LayerNorm, nn.GroupNorm, _InstanceNorm, nn.LocalResponseNorm,
                                 nn.CrossMapLRN2d, getattr(nn, "RMSNorm", None)) if t is not None)


class _Tracer(fx.Tracer):
    """``torch.fx`` tracer that keeps bnprobe's normalized layers and noise modules as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LEAF_TYPES) or super().is_leaf_module(m, module_qualified_name)


@dataclass
class BNSite:
    """One BatchNorm layer of a network and what it normalizes.

    Attributes:
        name: Qualified module name of the BN layer.
        bn: The BN module.
        conv_name: Qualified name of the conv/linear folded into it (None: unpaired).
        conv: That module (None: unpaired).
        note: Why the BN is unpaired (empty when paired).
    """

    name: str
    bn: _BatchNorm
    conv_name: Optional[str] = None
    conv: Optional[nn.Module] = None
    note: str = ""

    @property
    def channels(self) -> int:
        """Channels the BN normalizes."""
        return int(self.bn.num_features)

    @property
    def paired(self) -> bool:
        """Whether a conv/linear is folded into the BN."""
        return self.conv is not None


def _trace_graph(model: nn.Module, where: str) -> fx.Graph:
    try:
        return _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - torch.fx raises many types for untraceable code
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BnprobeError(f"{where}: cannot trace {type(model).__name__} with torch.fx ({first[:200]}); "
                           "conversion needs a traceable forward") from exc


def _describe(node: fx.Argument, modules: dict[str, nn.Module]) -> str:
    if not isinstance(node, fx.Node):
        return "a constant"
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {node.target}"


def _pair_note(node: fx.Node, modules: dict[str, nn.Module], calls: Counter) -> str:
    """Empty when ``node`` (a BN call) can be folded into its input's conv, else the reason."""
    bn = modules[node.target]
    if len(node.args) != 1 or node.kwargs:
        return "it is called with extra arguments"
    src = node.args[0]
    if not (isinstance(src, fx.Node) and src.op == "call_module"):
        return f"its input comes from {_describe(src, modules)}, not from a conv"
    conv = modules[src.target]
    if type(conv) is nn.Conv2d and isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            return f"its conv {src.target} has padding {conv.padding!r}/{conv.padding_mode}"
    elif not (type(conv) is nn.Linear and isinstance(bn, nn.BatchNorm1d)):
        return f"its input comes from {_describe(src, modules)}, not from a plain Conv2d/Linear"
    if calls[src.target] != 1:
        return f"its conv {src.target} is called {calls[src.target]} times"
    if len(src.users) != 1:
        return f"the output of {src.target} is also used elsewhere"
    return ""


def bn_sites(model: nn.Module, where: Optional[str] = None) -> list[BNSite]:
    """Every BatchNorm layer of ``model`` in graph order, paired with its conv where possible.

    Args:
        model: The BN network.
        where: How to call the network in messages (default: its class name).

    Returns:
        One :class:`BNSite` per BN module.

    Raises:
        BnprobeError: For an untraceable network, no BN layer, another kind of normalization,
            a BatchNorm3d, a BN module called other than once, or a forward that reads a
            BN's or a folded conv's attributes (each message names the module).
    """
    where = where or type(model).__name__
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if isinstance(m, _OTHER_NORMS):
            raise BnprobeError(f"{where}: cannot convert {name} ({type(m).__name__}): only BatchNorm "
                               "layers are replaced; networks with LayerNorm, GroupNorm or InstanceNorm "
                               "are not supported")
        if isinstance(m, _BatchNorm) and not isinstance(m, _BN_TYPES):
            raise BnprobeError(f"{where}: cannot convert {name} ({type(m).__name__}): only BatchNorm1d/2d")
    bns = [name for name, m in modules.items() if isinstance(m, _BatchNorm)]
    if not bns:
        raise BnprobeError(f"{where} has no BatchNorm layers to convert")
    graph = _trace_graph(model, where)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    for name in bns:
        if calls[name] != 1:
            raise BnprobeError(f"{where}: cannot convert {name}: the forward calls it {calls[name]} times "
                               "(each BN must be called exactly once)")
    sites = []
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], _BatchNorm):
            note = _pair_note(node, modules, calls)
            site = BNSite(str(node.target), modules[node.target], note=note)
            if not note:
                site.conv_name, site.conv = str(node.args[0].target), modules[node.args[0].target]
            sites.append(site)
    touched = {s.name for s in sites} | {s.conv_name for s in sites if s.paired}
    for node in graph.nodes:
        if node.op == "get_attr" and any(str(node.target).startswith(t + ".") for t in touched):
            raise BnprobeError(f"{where}: cannot convert: the forward reads {node.target} directly")
    return sites


def normalized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers that normalize (and may carry noise), in execution order when traceable.

    These are bnprobe's WN/AN layers (``WNConv2d``, ``WNLinear``, ``ANConv2d``), the
    weightless :class:`~bnprobe.norms.standalone.FixedNorm`/``ANNorm``, and BatchNorm layers.
    For a converted network their order is the order of the BN layers they replace. Networks
    that cannot be traced are listed in registration order.

    Args:
        model: The network (a converted AN network is traced through its ``net``).

    Returns:
        ``[(qualified name, module), ...]``.
    """
    from .an_network import ANNetwork

    prefix, net = ("net.", model.net) if isinstance(model, ANNetwork) else ("", model)
    found = [(name, m) for name, m in net.named_modules() if isinstance(m, NORMALIZED_TYPES)]
    try:
        graph = _Tracer().trace(net)
    except Exception:  # noqa: BLE001 - untraceable: registration order
        return [(prefix + name, m) for name, m in found]
    position: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        if node.op == "call_module":
            position.setdefault(str(node.target), i)
    order = {name: k for k, (name, _) in enumerate(found)}
    found.sort(key=lambda item: (position.get(item[0], len(position) + order[item[0]])))
    return [(prefix + name, m) for name, m in found]


def normalized_channels(model: nn.Module) -> list[int]:
    """Output channels of each of :func:`normalized_layers` (what noise files must match)."""
    channels = []
    for _, m in normalized_layers(model):
        for attr in ("out_channels", "out_features", "channels", "num_features"):
            if hasattr(m, attr):
                channels.append(int(getattr(m, attr)))
                break
    return channels
