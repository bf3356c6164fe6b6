"""Spatial correlation in analytic normalization: the input's lag covariance, used where exact.

Moment maps (:mod:`bnprobe.norms.moment_maps`) treat every position and channel as
independent. Natural images are not: neighbouring pixels and the three colours are strongly
correlated. Two places of a network feel it most, and this module makes both exact or nearly
so, from one more statistic of the data:

* **The input's lag covariance** ``C[c, c', dy, dx] = Cov(x_c(q), x_c'(q + (dy, dx)))``, the
  images taken as stationary (:func:`lag_covariance`; lags up to ``radius``, 10 by default).
* **The first convolution** (the one that reads the images): the variance of each output
  position is the quadratic form of its kernel in the covariance of the patch it reads, zero
  padding included (:func:`conv2d_cov_moments`), instead of the weighted sum of variances.
  On CIFAR-10 that sum is off per channel by a factor of 0.3-2.5 (resnet18's 7x7 stem). The
  same call gives the per-channel spatial correlation of the output at small lags.
* **A max pool of such a correlated map** (resnet's stem pool): the maximum of
  equicorrelated Gaussians, with the mean correlation of the values in each window
  (:func:`~bnprobe.norms.moment_maps.max_pool2d_map_moments` with ``corr``). Taken as
  independent, the maximum of nine strongly correlated neighbours has its mean
  overestimated by ~0.4 sd.

The correlation is carried only from the first convolution through per-channel maps (the
normalization, its affine and noise, a nondecreasing activation that the pool commutes with)
to the first max pool; past any other node the rules are back to independence. Deeper
layers mix many channels with random-sign weights, where independence is accurate for the
pooled statistics (``benchmarks/an_accuracy.py``).

Approximations: the input is stationary (the covariance of two positions depends only on
their offset); lags beyond ``radius`` count as uncorrelated; the correlation of the first
convolution's output is that of the interior (positions whose kernel reads padding are
correlated differently with their neighbours); a pooling window's values are taken as
equicorrelated.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .moment_maps import _at_offsets, _explicit_pads, _IntPair, _nchw, _pair
from .moments import _var_floor

__all__ = ["LAG_RADIUS", "conv2d_cov_moments", "lag_covariance"]

LAG_RADIUS = 10
"""Default largest lag of :func:`lag_covariance`: a 7x7 stride-2 stem and a 3x3 pool behind it."""
CORR_LAGS = 2
"""Largest lag (in output positions) of the correlation that :func:`conv2d_cov_moments` returns."""


def lag_covariance(
    images: Union[np.ndarray, Tensor],
    radius: Optional[int] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    channel_dim: int = 1,
    chunk_size: int = 512,
) -> Tensor:
    """Lag covariance of (normalized) images, taken as stationary.

    ``C[c, c', R + dy, R + dx]`` is the mean, over images and over the positions ``q`` with
    ``q`` and ``q + (dy, dx)`` both inside the image, of ``x_c(q) x_c'(q + (dy, dx))`` for the
    images centred by their channel means. ``C[:, :, R, R]`` is the channel covariance (its
    diagonal the variances of :func:`~bnprobe.norms.an.dataset_channel_moments`), and
    ``C[c, c', R + d] = C[c', c, R - d]``. Computed by FFT in float64, in chunks.

    uint8 images are scaled to ``[0, 1]``; the normalization ``(x - mean) / std`` is applied
    analytically (only ``std`` matters).

    Args:
        images: ``(N, C, H, W)`` (``channel_dim=1``) or ``(N, H, W, C)`` (``channel_dim=-1``).
        radius: Largest lag ``R`` per axis (at most ``H - 1``, ``W - 1``; None:
            :data:`LAG_RADIUS` or less for small images).
        mean: Per-channel normalization mean (accepted for symmetry; a shift changes nothing).
        std: Per-channel normalization std (None: no scaling).
        channel_dim: Dimension holding the channels.
        chunk_size: Images per FFT.

    Returns:
        Float64 ``(C, C, 2R + 1, 2R + 1)`` on the images' device.

    Raises:
        ValueError: For no images, a radius that does not fit, or a ``std`` of the wrong length.
    """
    x = images if isinstance(images, Tensor) else torch.from_numpy(np.asarray(images))
    if x.shape[0] == 0:
        raise ValueError("lag_covariance: no images")
    x = x.movedim(channel_dim, 1)
    n, channels, h, w = (int(s) for s in x.shape)
    if radius is None:
        radius = min(LAG_RADIUS, h - 1, w - 1)
    if not 0 <= radius < min(h, w):
        raise ValueError(f"lag_covariance: radius must be in [0, {min(h, w) - 1}], got {radius}")
    scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
    total = torch.zeros(channels, dtype=torch.float64, device=x.device)
    for start in range(0, n, chunk_size):
        total += x[start : start + chunk_size].to(torch.float64).sum(dim=(0, 2, 3)) * scale
    centre = (total / (n * h * w)).reshape(1, -1, 1, 1)
    size = (h + radius, w + radius)  # zero padding: no wrap-around up to the radius
    lag = torch.arange(-radius, radius + 1, device=x.device)
    rows, cols = lag % size[0], lag % size[1]  # where the FFT puts lag d
    acc = torch.zeros(channels, channels, lag.numel(), lag.numel(), dtype=torch.float64, device=x.device)
    for start in range(0, n, chunk_size):
        chunk = x[start : start + chunk_size].to(torch.float64) * scale - centre
        f = torch.fft.rfft2(chunk, s=size)
        # corr[c, c', d] = sum_q x_c(q) x_c'(q + d): inverse FFT of conj(F_c) F_c'
        cross = torch.fft.irfft2(torch.einsum("nahw,nbhw->abhw", f.conj(), f), s=size)
        acc += cross[:, :, rows][:, :, :, cols]
    far = lag.abs().to(torch.float64)
    pairs = n * (h - far)[:, None] * (w - far)[None, :]
    cov = acc / pairs
    if std is not None:
        if len(std) != channels:
            raise ValueError(f"lag_covariance: std has {len(std)} values, images have {channels} channels")
        s = torch.as_tensor(std, dtype=torch.float64, device=x.device)
        cov = cov / (s[:, None, None, None] * s[None, :, None, None])
    return cov


def _tap_pairs(size: int, out: int, k: int, s: int, p: int, d: int, like: Tensor) -> Tensor:
    # M[u, v, o] = 1 where taps u and v of output o both read inside the input
    taps = torch.arange(k, device=like.device) * d
    reads = torch.arange(out, device=like.device)[None, :] * s - p + taps[:, None]  # (k, out)
    inside = ((reads >= 0) & (reads < size)).to(like.dtype)
    return inside[:, None, :] * inside[None, :, :]


def conv2d_cov_moments(
    m: Tensor,
    cov: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: _IntPair = 1,
    padding: Union[str, _IntPair] = 0,
    dilation: _IntPair = 1,
    lags: int = CORR_LAGS,
) -> tuple[Tensor, Tensor, Tensor]:
    """Moment maps of a convolution of a stationary input with lag covariance ``cov``.

    The variance at an output position is ``sum_{a, b} w_a w_b C(b - a)`` over the pairs of
    kernel taps that both read inside the input (zero padding is exact); the mean map is
    the convolution of ``m``. Also returns the correlation of each output channel at output
    lags up to ``lags`` (interior positions, where every tap reads the input):
    ``Cov(y(p), y(p + D)) = sum_{a, b} w_a w_b C(s D + d (b - a))`` over the variance.
    Covariances at lags beyond ``cov``'s radius count as zero. Only ``groups=1``.

    Args:
        m: Input means ``(H, W, C_in)`` (a map: its size sets the borders).
        cov: Lag covariance ``(C_in, C_in, 2R + 1, 2R + 1)`` (:func:`lag_covariance`).
        weight: ``(C_out, C_in, kh, kw)``.
        bias: Optional ``(C_out,)``.
        stride: Stride.
        padding: Zero padding (int, pair, ``"same"`` or ``"valid"``).
        dilation: Dilation.
        lags: Largest output lag of the returned correlation.

    Returns:
        ``(mean, var, corr)``: maps ``(H', W', C_out)`` in the weight's dtype, and the
        correlation ``(C_out, 2 lags + 1, 2 lags + 1)`` (1 at the centre).

    Raises:
        ValueError: For a ``weight`` with another number of input channels than ``cov``.
    """
    c_out, c_in, kh, kw = (int(s) for s in weight.shape)
    if cov.shape[0] != c_in or cov.shape[1] != c_in:
        raise ValueError(
            f"conv2d_cov_moments: the covariance has {cov.shape[0]} channels, the weight {c_in} "
            "(grouped convolutions are not supported)"
        )
    s, d = _pair(stride), _pair(dilation)
    if isinstance(padding, str):
        left, _, top, _ = _explicit_pads(padding, (kh, kw), d)
        p = (top, left)
    else:
        p = _pair(padding)
    size = (int(m.shape[0]), int(m.shape[1]))
    mean = F.conv2d(_nchw(m, weight), weight, bias, s, padding if isinstance(padding, str) else p, d)
    mean = mean.squeeze(0).permute(1, 2, 0)
    out = (int(mean.shape[0]), int(mean.shape[1]))  # "same" may pad one more on the far side

    cov = cov.to(weight)
    ty = torch.arange(kh, device=weight.device) * d[0]
    tx = torch.arange(kw, device=weight.device) * d[1]

    # p0[c, c', y, x, Y, X]: covariance of tap (c, y, x) and tap (c', Y, X) of one output
    rows = ty[None, None, :, None] - ty[:, None, None, None]
    cols = tx[None, None, None, :] - tx[None, :, None, None]
    p0 = _at_offsets(cov, rows, cols)
    # h[o, y, x, Y, X] = sum_{c, c'} w[o, c, y, x] p0[c, c', y, x, Y, X] w[o, c', Y, X]
    h = torch.einsum("ocyx,ocyxYX->oyxYX", weight, torch.einsum("cdyxYX,odYX->ocyxYX", p0, weight))
    # sum over the tap pairs that both read inside the input, per output position
    pairs_y = _tap_pairs(size[0], out[0], kh, s[0], p[0], d[0], weight)  # (y, Y, H')
    pairs_x = _tap_pairs(size[1], out[1], kw, s[1], p[1], d[1], weight)  # (x, X, W')
    var = torch.einsum("oyYq,yYp->pqo", torch.einsum("oyxYX,xXq->oyYq", h, pairs_x), pairs_y)

    with torch.no_grad():  # interior correlation at output lags D: sum_delta K(delta) C(s D + d delta)
        w = weight.detach()
        # kernel cross-correlation k[o, c, c', dy, dx] = sum_a w[o, c, a] w[o, c', a + delta]
        shifted = F.pad(w, (kw - 1, kw - 1, kh - 1, kh - 1)).unfold(2, kh, 1).unfold(3, kw, 1)
        k = torch.einsum("ocyx,odYXyx->ocdYX", w, shifted)
        lag = torch.arange(-lags, lags + 1, device=weight.device)
        dy = torch.arange(-(kh - 1), kh, device=weight.device) * d[0]
        dx = torch.arange(-(kw - 1), kw, device=weight.device) * d[1]
        rows = (lag * s[0])[:, None, None, None] + dy[None, None, :, None]  # (D, 1, Y, 1)
        cols = (lag * s[1])[None, :, None, None] + dx[None, None, None, :]  # (1, E, 1, X)
        lag_cov = torch.einsum("ocdYX,cdDEYX->oDE", k, _at_offsets(cov, rows, cols))
        centre = lag_cov[:, lags, lags].clamp_min(_var_floor(weight.dtype))
        corr = (lag_cov / centre[:, None, None]).clamp(-1.0, 1.0)
    return mean, var.clamp_min(0.0), corr
