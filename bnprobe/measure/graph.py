"""Running a network in segments that end at its BN layers, with chosen BN statistics.

The sequential population reference needs, for each BN layer in execution order, the
statistics of its input while every upstream BN normalizes by *its own* population
statistics. :class:`SegmentedNetwork` traces the network with ``torch.fx`` and runs it one
segment at a time (from one BN layer's input to the next), keeping only the values that
later nodes still need (the frontier). Each node then runs once per input overall: the whole
reference costs about one forward pass. Networks that ``torch.fx`` cannot trace fall back to
:class:`HookedNetwork`: a forward pass from the input per layer, stopped at that layer.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..layers import BN_TYPES, hooks_removed

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]


class StopForward(Exception):
    """Raised by a hook to skip the rest of the network."""


def normalize(module: nn.Module, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """BN ``module`` applied to ``x`` in evaluation mode with the statistics ``mean``, ``var``."""
    return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), module.weight, module.bias, False, 0.0,
                        module.eps)


@contextlib.contextmanager
def fixed_statistics(model: nn.Module, stats: Stats) -> Iterator[None]:
    """Every BN layer named in ``stats`` normalizes by those statistics (its buffers untouched).

    A forward hook replaces the layer's output, so this works for layers without running
    buffers and never reads them. The hooks are removed on exit, even after an error.
    """
    handles: list = []
    with hooks_removed(handles):
        for name, m in model.named_modules():
            if name in stats:
                mean, var = stats[name]
                handles.append(m.register_forward_hook(
                    lambda mod, inputs, _out, mean=mean, var=var: normalize(mod, inputs[0], mean, var)))
        yield


def execution_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the BN layers in the order a forward pass of ``example`` calls them."""
    order: list[str] = []
    handles: list = []
    with hooks_removed(handles), torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, BN_TYPES):
                handles.append(m.register_forward_pre_hook(
                    lambda _m, _i, name=name: order.append(name) if name not in order else None))
        model(example)
    return order


class _Runner(fx.Interpreter):
    """Runs a range of nodes on a given environment, BN layers with fixed statistics."""

    def __init__(self, gm: fx.GraphModule, stats: Stats) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.stats = stats

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in self.stats:
            mean, var = self.stats[target]
            return normalize(self.fetch_attr(target), args[0], mean, var)
        return super().call_module(target, args, kwargs)

    def run_range(self, env: dict, nodes: Sequence[fx.Node]) -> dict:
        self.env = env
        for node in nodes:
            env[node] = self.run_node(node)
        return env


class SegmentedNetwork:
    """A traced network whose BN layers' inputs can be reached segment by segment.

    Args:
        model: The network (in evaluation mode; BN layers are normalized with given statistics).

    Raises:
        Exception: Whatever ``torch.fx.symbolic_trace`` raises for an untraceable network.
    """

    method = "fx-segments"

    def __init__(self, model: nn.Module) -> None:
        self.gm = fx.symbolic_trace(model)
        self.nodes = list(self.gm.graph.nodes)
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.first = len(self.placeholders)
        self.bn_nodes: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            if n.op == "call_module" and isinstance(self.gm.get_submodule(n.target), BN_TYPES):
                self.bn_nodes.setdefault(str(n.target), i)
        self.order = sorted(self.bn_nodes, key=self.bn_nodes.get)
        self._position = {n: i for i, n in enumerate(self.nodes)}

    def start(self, x: torch.Tensor) -> tuple[int, dict]:
        """The environment at the network's input."""
        env = {self.placeholders[0]: x}
        for p in self.placeholders[1:]:
            env[p] = p.args[0] if p.args else None
        return self.first, env

    def advance(self, state: tuple[int, dict], layer: str,
                stats: Stats) -> tuple[torch.Tensor, tuple[int, dict]]:
        """Run from ``state`` to the input of ``layer``.

        Returns:
            ``(x, state)``: the layer's input and the frontier there (the values that the rest
            of the network still needs).
        """
        begin, env = state
        env = dict(env)  # the state stays valid: it may be advanced again to a later layer
        stop = self.bn_nodes[layer]
        _Runner(self.gm, stats).run_range(env, self.nodes[begin:stop])
        x = env[self.nodes[stop].args[0]]
        live = {n: v for n, v in env.items()
                if any(self._position[u] >= stop for u in n.users)}
        return x, (stop, live)


class HookedNetwork:
    """Fallback for untraceable networks: a forward pass from the input per BN layer."""

    method = "hook-passes"

    def __init__(self, model: nn.Module, order: list[str]) -> None:
        self.model = model
        self.order = order
        self.modules = dict(model.named_modules())

    def start(self, x: torch.Tensor) -> tuple[int, torch.Tensor]:
        """The input itself (nothing is cached)."""
        return 0, x

    def advance(self, state: tuple[int, torch.Tensor], layer: str,
                stats: Stats) -> tuple[torch.Tensor, Any]:
        """A forward pass of the input, stopped at ``layer``; returns its input and the same state."""
        seen: list[torch.Tensor] = []

        def grab(_m: nn.Module, inputs: tuple) -> None:
            seen.append(inputs[0])
            raise StopForward

        handles: list = [self.modules[layer].register_forward_pre_hook(grab)]
        with hooks_removed(handles), fixed_statistics(self.model, stats), contextlib.suppress(StopForward):
            self.model(state[1])
        return seen[0], state


def segmented(model: nn.Module, example: torch.Tensor) -> SegmentedNetwork | HookedNetwork:
    """A :class:`SegmentedNetwork` when the network traces and calls its BN layers in graph order."""
    order = execution_order(model, example)
    try:
        net = SegmentedNetwork(model)
    except Exception:  # noqa: BLE001 - any tracing failure means: use the generic fallback
        return HookedNetwork(model, order)
    if net.order != order:
        return HookedNetwork(model, order)
    return net
