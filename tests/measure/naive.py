"""An independent, deliberately naive sequential population reference for the tests."""

import copy

import torch

from bnprobe.measure import find_bn_layers


def bn_inputs(model, x):
    """Every BN layer's input for one forward pass."""
    seen = {}
    handles = [m.register_forward_pre_hook(lambda mod, inp, n=n: seen.__setitem__(n, inp[0].detach()))
               for n, m in find_bn_layers(model)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def naive_population(model, data):
    """Layer by layer: upstream BN buffers set to the statistics found so far, one full pass each.

    Works on a float64 copy; BN layers are assumed to run in registration order.
    Returns name -> (mean, biased var) as float64 tensors.
    """
    ref = copy.deepcopy(model).double().eval()
    stats = {}
    with torch.no_grad():
        for name, _ in find_bn_layers(ref):
            for n2, m2 in find_bn_layers(ref):
                if n2 in stats:
                    m2.running_mean.copy_(stats[n2][0])
                    m2.running_var.copy_(stats[n2][1])
            x = bn_inputs(ref, data.double())[name]
            flat = x.transpose(0, 1).reshape(x.shape[1], -1)
            stats[name] = (flat.mean(1), flat.var(1, unbiased=False))
    return stats
