"""The embedded default data set: scikit-learn's digits (1,797 real 8x8 grey images, 10 classes).

Ships with scikit-learn, so nothing is downloaded. Pixels 0..16 are mapped to [-1, 1]. A fixed,
stratified split holds out `test_fraction` of the images for evaluation only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def load_digits_split(test_fraction: float = 0.2, split_seed: int = 0):
    """Returns (x_train, y_train, x_test, y_test); x as float32 (N, 1, 8, 8) in [-1, 1], y int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # (N, 1, 8, 8)
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=split_seed, stratify=y)
    return x_tr, y_tr, x_te, y_te


@dataclass
class DigitsData:
    """Batches by step: epoch e is a permutation drawn from (seed, e), so batch(step) needs no state
    and a resumed run sees exactly the batches an uninterrupted one would."""

    x: torch.Tensor  # (N, 1, 8, 8)
    y: torch.Tensor  # (N,)
    batch_size: int
    seed: int

    @classmethod
    def from_config(cls, data_cfg, batch_size: int, seed: int, device="cpu") -> "DigitsData":
        x_tr, y_tr, _, _ = load_digits_split(data_cfg.test_fraction, data_cfg.split_seed)
        if batch_size > len(x_tr):
            raise ValueError(f"train.batch_size {batch_size} exceeds the {len(x_tr)} training images")
        return cls(torch.from_numpy(x_tr).to(device), torch.from_numpy(y_tr).to(device), batch_size, seed)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.x) // self.batch_size

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, k = divmod(step, self.batches_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        idx = torch.randperm(len(self.x), generator=g)[k * self.batch_size:(k + 1) * self.batch_size]
        idx = idx.to(self.x.device)
        return self.x[idx], self.y[idx]
