"""The V/U noise model of BN: its file format, formulas, modules and Monte Carlo samplers.

Everything that injects, learns, fits or samples BN-like noise depends on this package; it
depends only on the base modules of bnprobe (errors, io, options, layers, progress).

* :mod:`~bnprobe.noise.spec`: ``fitted.json`` (:class:`NoiseSpec`).
* :mod:`~bnprobe.noise.functional`: draw V, U (or S) and apply them; the only place the
  formulas live.
* :mod:`~bnprobe.noise.modules`: :class:`NoiseModule`, :class:`FixedNoise`,
  :class:`LearnedNoise`.
* :mod:`~bnprobe.noise.network`: noise modules of a whole network (build, find, KL, sigmas).
* :mod:`~bnprobe.noise.samplers`: :class:`InjectedNoise`, :class:`MCBN`, :class:`ParametricBN`.
* :mod:`~bnprobe.noise.mc`: the Monte Carlo loop.
"""

from .functional import fixed_noise, learned_noise, sigma_param, sigma_param_inverse
from .mc import mc_average, mc_log_probs
from .modules import FixedNoise, LearnedNoise, NoiseModule
from .network import (
    build_noise_modules,
    kl_total,
    learned_noise_modules,
    learned_noise_parameters,
    noise_kwargs_from_spec,
    noise_modules,
    relative_sigmas,
    set_noise_generator,
)
from .samplers import MCBN, InjectedNoise, ParametricBN, Sampler, choose_sampler
from .spec import NoiseSpec

__all__ = [
    "MCBN",
    "FixedNoise",
    "InjectedNoise",
    "LearnedNoise",
    "NoiseModule",
    "NoiseSpec",
    "ParametricBN",
    "Sampler",
    "build_noise_modules",
    "choose_sampler",
    "fixed_noise",
    "kl_total",
    "learned_noise",
    "learned_noise_modules",
    "learned_noise_parameters",
    "mc_average",
    "mc_log_probs",
    "noise_kwargs_from_spec",
    "noise_modules",
    "relative_sigmas",
    "set_noise_generator",
    "sigma_param",
    "sigma_param_inverse",
]
