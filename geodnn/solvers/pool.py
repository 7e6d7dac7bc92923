"""The crop pool: which training crops sit in slot k at generation g, from (seed, k, g) alone.

The rank that owns the stem (reads images) and the rank that owns the head (reads labels) must
agree on the crops of every slot without talking, so the choice is a pure function of its key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def auto_refresh(slots: int, num_layers: int, margin: float = 1.0) -> int:
    """Smallest refresh period R with S R >= margin x 2 L. With margin 1 a slot keeps its crops
    just long enough for the head's request to travel down to the stem (one layer per iteration)
    before they change, so the low layers drop most requests (they arrive for crops already
    gone); margin 2 lets the stem use about half of them."""
    return max(1, math.ceil(margin * 2 * num_layers / slots - 1e-9))


@dataclass(frozen=True)
class CropPool:
    """`slots` mini-batches of `batch_size` crops each, drawn from `size` data indices.

    A slot's crops change every `refresh_every` visits of the stem (its generation goes up by
    one), all slots at once or, with `stagger`, at evenly spread times; see `generation`.
    Indices within a slot are distinct (when `size` allows).
    """

    size: int
    slots: int
    batch_size: int
    refresh_every: int
    seed: int
    stagger: bool = False

    def __post_init__(self) -> None:
        if self.size < 1 or self.slots < 1 or self.batch_size < 1 or self.refresh_every < 1:
            raise ValueError(f"invalid crop pool {self}: every count must be >= 1")

    @property
    def crops(self) -> int:
        """P, the number of crops held at once (slots x batch size)."""
        return self.slots * self.batch_size

    def slot_at(self, iteration: int, layer: int) -> int:
        """The slot layer `layer` works on at `iteration` (the wavefront: (t - l) mod S)."""
        return (iteration - layer) % self.slots

    def generation(self, iteration: int, layer: int = 0) -> int:
        """Generation of the slot that layer `layer` works on at `iteration` (-1: not yet).

        A generation lasts `refresh_every` stem visits. Unstaggered, all slots change crops in
        the same S iterations; staggered, slot k changes k R iterations early, so the changes
        are spread over the cycle of S R iterations (and so is the work the low layers skip
        when the requests about changed crops arrive: see `AdmmSettings.stagger_refresh`)."""
        t = iteration - layer
        if t < 0:
            return -1
        if not self.stagger:
            return (t // self.slots) // self.refresh_every
        slot, cycle = t % self.slots, self.slots * self.refresh_every
        shift = slot * self.refresh_every
        return (t + shift) // cycle - (slot + shift) // cycle

    def indices(self, slot: int, generation: int) -> list[int]:
        """The data indices in `slot` at `generation`: a pure function of (seed, slot, gen)."""
        rng = np.random.default_rng([self.seed, slot, generation, 0x9E3779B9])
        if self.batch_size <= self.size:
            picked = rng.choice(self.size, size=self.batch_size, replace=False)
        else:
            picked = rng.integers(0, self.size, size=self.batch_size)
        return [int(i) for i in picked]

    def batch_at(self, iteration: int) -> list[int]:
        """The crops the stem reads at `iteration`; the stream a backprop baseline also sees."""
        return self.indices(self.slot_at(iteration, 0), self.generation(iteration, 0))
