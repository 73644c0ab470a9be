"""What the drift tests share: a long walk of random line inserts and deletes on a pie
document, checked against rotating each surviving key once."""
from __future__ import annotations

import random

import numpy as np
import torch

from livekv import kernels


def drift_after_random_edits(doc, inv_freq, edits: int = 1000, seed: int = 0) -> float:
    """Insert and delete lines of a pie document at random; then every surviving original key
    must equal its first encoding rotated once to where it is now. Returns the worst relative
    error (an O(1) value means a wrong delta or a lost shift somewhere)."""
    T0 = doc.n
    k0 = doc.kv.k[:, :, :T0].clone()
    where = np.arange(T0)  # current slot of each original token, -1 once it is gone
    rng = random.Random(seed)
    for _ in range(edits):
        lines = doc.text.split("\n")
        ours = [i for i, s in enumerate(lines) if s in ("    x = 1", "  y = 2")]
        if rng.random() < 0.5 or not ours:  # insert a line anywhere ...
            line = rng.randrange(len(lines))
            doc.edit((line, 0), (line, 0), rng.choice(["    x = 1\n", "  y = 2\n"]))
        else:                               # ... or delete one we inserted, so originals survive
            line = rng.choice(ours)
            doc.edit((line, 0), (line + 1, 0), "")
        keep = doc.last_keep
        alive = keep >= 0
        back = np.full(keep.max() + 1 if alive.any() else 1, -1)
        back[keep[alive]] = np.flatnonzero(alive)
        where = np.where((where >= 0) & (where < len(back)), back[np.clip(where, 0, len(back) - 1)], -1)
    alive = np.flatnonzero(where >= 0)
    assert len(alive) > 20
    now = doc.kv.k[:, :, where[alive]]
    once = k0[:, :, alive].clone()
    kernels.rerotate_keys_(once, torch.from_numpy(where[alive] - alive), inv_freq, positions=torch.from_numpy(alive))
    return ((now - once).norm(dim=-1) / once.norm(dim=-1)).max().item()
