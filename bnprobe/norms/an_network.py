"""A converted network with analytic normalization: input moments propagated through its graph.

:class:`ANNetwork` holds the converted network (``net``, the original module tree with its
BN layers replaced, see :mod:`bnprobe.norms.convert`) and its :class:`InputMoments`. At the
start of every forward it propagates the input moments through ``net``'s torch.fx graph with
:func:`bnprobe.norms.an_graph.propagate_graph`, which stores in every AN layer the moments it
normalizes by; then it runs ``net`` itself. The forward is ``net``'s own Python code, so
flags read at run time (``self.training`` in dropout or stochastic depth) keep working; the
graph (traced once, cached, sharing ``net``'s modules) serves the moment propagation only.
The input moments include the images' lag covariance once training has filled them: the
convolutions reading the images, and a max pool behind them, then use the images' spatial
correlation (:mod:`bnprobe.norms.spatial`).
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, fx, nn

from .an import InputMoments
from .an_graph import propagate_graph, trace

__all__ = ["ANNetwork"]


class ANNetwork(nn.Module):
    """``net`` with analytic normalization: moments of the input propagated before each forward.

    The output is the same in training and evaluation mode (noise aside) and for any batch
    size. ``input_moments`` (channel mean and variance of the normalized training inputs) are
    filled by training (:func:`bnprobe.norms.init.init_input_moments_`) and saved in the
    state_dict.

    Args:
        net: The converted network (its AN layers take moments from ``propagate``).
        in_channels: Input image channels.
    """

    def __init__(self, net: nn.Module, in_channels: int) -> None:
        super().__init__()
        self.net = net
        self.input_moments = InputMoments(in_channels, spatial=True)
        self.__dict__["_graph"] = None

    def graph(self) -> fx.GraphModule:
        """``net`` traced by :func:`bnprobe.norms.an_graph.trace` (cached; its modules are ``net``'s)."""
        if self.__dict__.get("_graph") is None:
            self.__dict__["_graph"] = trace(self.net)
        return self.__dict__["_graph"]

    def propagate(self, input_size: Optional[tuple[int, int]]) -> None:
        """Propagate the input moments through the graph, storing them in every AN layer.

        Args:
            input_size: Spatial size ``(H, W)`` of the input.
        """
        m, v = self.input_moments()
        propagate_graph(self.graph(), m, v, input_size, self.input_moments.covariance())

    def forward(self, x: Tensor) -> Tensor:
        """Propagate the input moments, then run ``net`` on ``x``."""
        self.propagate((int(x.shape[-2]), int(x.shape[-1])))
        return self.net(x)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> ANNetwork:
        self.__dict__["_graph"] = None  # re-traced on use: the graph holds its own attribute copies
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_graph"] = None
        return state
