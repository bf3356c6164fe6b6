"""One epoch of optimizer steps, the batches it draws, and the per-run random generators."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..data.batches import DeviceImages
from ..distributed import RANK_SEED_STRIDE, World
from ..progress import progress_bar

if TYPE_CHECKING:
    from .setup import TrainOptimizer


@dataclass
class RunGenerators:
    """The random streams of a run, all derived from its seed.

    Attributes:
        order: CPU generator of the data order.
        augment: Device generator of the augmentation.
        extra: CPU generator of the extra normalization samples (``--norm-batch``).
        noise: Device generator of the injected noise.
    """

    order: torch.Generator
    augment: torch.Generator
    extra: torch.Generator
    noise: torch.Generator

    @classmethod
    def from_seed(cls, seed: int, device: torch.device, rank: int = 0) -> RunGenerators:
        """Fresh generators for a run with this seed on this device.

        Under torchrun every process shares the data order (the global batches are split
        between processes), while augmentation, extra samples and noise are drawn
        independently per process: their seeds move by ``RANK_SEED_STRIDE * rank`` (process 0
        draws what a single process draws).
        """
        step = RANK_SEED_STRIDE * rank
        return cls(
            order=torch.Generator().manual_seed(seed),
            augment=torch.Generator(device=device).manual_seed(seed + 1 + step),
            extra=torch.Generator().manual_seed(seed + 3 + step),
            noise=torch.Generator(device=device).manual_seed(seed + 4 + step),
        )

    def state(self) -> dict[str, torch.Tensor]:
        """Generator states as CPU tensors (for checkpoints)."""
        return {"order": self.order.get_state(), "augment": self.augment.get_state().cpu(),
                "extra": self.extra.get_state(), "noise": self.noise.get_state().cpu()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore states saved by :meth:`state` (missing ones are left as they are)."""
        for name in ("order", "augment", "extra", "noise"):
            if name in state:
                gen = getattr(self, name)
                gen.set_state(state[name].to(gen.get_state().device))


def epoch_order(
    n: int, batch_size: int, generator: torch.Generator, world: World | None = None
) -> torch.Tensor:
    """This process's training indices of one epoch, ``(steps, batch_size)``.

    One permutation of the ``n`` images (the same in every process) is cut into global batches
    of ``batch_size * world.size``; process ``r`` takes the ``r``-th block of ``batch_size`` of
    each, so the processes' shards are disjoint and a global batch holds the images one process
    with batch ``batch_size * world.size`` would see. An incomplete last global batch is
    dropped, as a single process drops its incomplete last batch.
    """
    w = world or World()
    order = torch.randperm(n, generator=generator)
    steps = n // (batch_size * w.size)
    return order[: steps * batch_size * w.size].view(steps, w.size, batch_size)[:, w.rank]


def training_batches(
    images: DeviceImages,
    batch_size: int,
    generators: RunGenerators,
    augmented: bool,
    norm_batch: int | None = None,
    world: World | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled training batches (incomplete last batch dropped).

    Under torchrun (``world``) each process gets its shard of every global batch (see
    :func:`epoch_order`); ``batch_size`` is per process.

    With ``norm_batch`` K, each batch's inputs are followed by ``K - batch_size`` other random
    training samples (never ones of the batch itself): the model sees all K, so BN computes
    its statistics over them, while only the first ``batch_size`` outputs enter the loss
    (see :func:`train_epoch`).

    Yields:
        ``(x, y)`` with ``len(x) == K`` (or ``batch_size``) and ``len(y) == batch_size``.
    """
    n = len(images)
    order = epoch_order(n, batch_size, generators.order, world)
    if norm_batch is None or norm_batch == batch_size:
        for idx in order:
            yield images.batch(idx, augmented, generators.augment)
        return
    extra = norm_batch - batch_size
    for idx in order:
        others = torch.ones(n, dtype=torch.bool)
        others[idx] = False
        pool = others.nonzero().squeeze(1)
        pick = pool[torch.randperm(len(pool), generator=generators.extra)[:extra]]
        x, y = images.batch(torch.cat([idx, pick]), augmented, generators.augment)
        yield x, y[:batch_size]


def train_epoch(
    model: nn.Module,
    optimizer: TrainOptimizer,
    batches: Any,
    total: int | None = None,
    progress: bool = False,
    desc: str = "train",
    after_step: list[Callable[[], None]] | None = None,
    regularizer: Callable[[], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One pass of optimizer steps over ``batches`` in training mode.

    The loss is the mean NLL of the batch plus ``regularizer()`` (e.g. the KL term of
    learned noise). When a batch holds more inputs than labels, the extra inputs only take
    part in the forward pass (BN statistics, ``--norm-batch``): the loss uses the outputs of
    the first ``len(y)`` inputs, and gradients flow through all of them.

    Args:
        model: The model.
        optimizer: Its optimizer.
        batches: Iterable of ``(x, y)``.
        total: Number of batches (for the progress bar).
        progress: Show a progress bar.
        desc: Progress bar label.
        after_step: Called after every optimizer step (e.g. the projection).
        regularizer: Returns a scalar added to the loss.

    Returns:
        Summed NLL and correct count (as tensors, to avoid a device sync per step) and the
        number of samples.
    """
    model.train()
    loss_sum = correct = None
    seen = 0
    for x, y in progress_bar(batches, total=total, enabled=progress, desc=desc):
        out = model(x)
        if out.shape[0] != y.shape[0]:
            out = out[: y.shape[0]]
        nll = F.cross_entropy(out, y)
        loss = nll if regularizer is None else nll + regularizer()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for hook in after_step or ():
            hook()
        with torch.no_grad():
            batch_loss = nll.detach() * len(y)
            batch_correct = (out.argmax(1) == y).sum()
            loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
            correct = batch_correct if correct is None else correct + batch_correct
        seen += len(y)
    return loss_sum, correct, seen
