"""Small-scale quality metrics for the digits main job.

A digits classifier (an MLP, trained on the training split only) judges generated samples:
  - accuracy: fraction of samples classified as the class they were generated for;
  - FD: Frechet distance between its hidden-layer features of generated samples and of the
    held-out real test split (the digits analogue of FID).
Its own held-out accuracy and the FD of real training images vs the test split (the floor an
ideal generator would reach with the same sample count: per_class training images of each class, as
the generator is scored on per_class samples of each class) are reported beside them for scale.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

from ..data.digits import load_digits_split
from ..fsio import write_bytes_atomic


def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two (N, D) feature sets."""
    mu_a, mu_b = feat_a.mean(0), feat_b.mean(0)
    s_a, s_b = np.cov(feat_a, rowvar=False), np.cov(feat_b, rowvar=False)
    with warnings.catch_warnings():  # singular products are handled below
        warnings.simplefilter("ignore")
        covmean, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: regularise, as pytorch-fid does
        off = np.eye(s_a.shape[0]) * 1e-6
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            covmean, _ = linalg.sqrtm((s_a + off) @ (s_b + off), disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


class DigitsJudge:
    """Classifier + feature extractor trained on the digits training split (same split as training)."""

    def __init__(self, test_fraction: float = 0.2, split_seed: int = 0, hidden: int = 64, seed: int = 0,
                 per_class: int = 50):
        from sklearn.neural_network import MLPClassifier

        x_tr, y_tr, x_te, y_te = load_digits_split(test_fraction, split_seed)
        self.x_train, self.y_train = x_tr.reshape(len(x_tr), -1), y_tr
        self.x_test, self.y_test = x_te.reshape(len(x_te), -1), y_te
        self.clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=600, random_state=seed, alpha=1e-3)
        self.clf.fit(self.x_train, self.y_train)
        self.test_accuracy = float(self.clf.score(self.x_test, self.y_test))
        self.test_features = self.features(self.x_test)
        # the floor at the generator's sample count and class balance: per_class training images of each class
        # (all of a class's, where it has fewer); it was 360 random training images (the test split's size, not
        # balanced, and a crash where the test split outnumbered the training split)
        if per_class < 1:
            raise ValueError(f"DigitsJudge: per_class must be >= 1, got {per_class}")
        rng = np.random.default_rng(seed)
        idx = np.concatenate([rng.permutation(np.flatnonzero(y_tr == c))[:per_class] for c in np.unique(y_tr)])
        self.per_class = per_class
        self.real_fd = frechet_distance(self.features(self.x_train[idx]), self.test_features)

    def features(self, x: np.ndarray) -> np.ndarray:
        """Hidden-layer ReLU activations, (N, hidden)."""
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        return np.maximum(x @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0.0)

    def score(self, samples: np.ndarray, labels: np.ndarray) -> dict:
        """Metrics for generated samples (N, 1, 8, 8) in [-1, 1] and their conditioning labels. Samples with a
        non-finite value (a diverged model) are counted in "non_finite" and as misclassified; FD is over the finite
        ones (None when fewer than 2 are)."""
        x = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)
        labels = np.asarray(labels)
        finite = np.isfinite(x).all(axis=1)
        x = np.clip(x[finite], -1, 1)
        hits = int((self.clf.predict(x) == labels[finite]).sum()) if len(x) else 0
        fd = frechet_distance(self.features(x), self.test_features) if len(x) >= 2 else None
        return {"accuracy": hits / max(len(samples), 1), "fd": fd, "non_finite": int((~finite).sum())}


def save_grid(path: str, samples: np.ndarray, labels: np.ndarray, cols: int = 10, scale: int = 4,
              num_classes: int = 10) -> None:
    """PNG grid, one row per class, the first `cols` samples of each; samples (N, 1, H, W) in [-1, 1]."""
    from PIL import Image

    _, _, h, w = samples.shape
    pad = 1
    img = np.full((num_classes * (h + pad) + pad, cols * (w + pad) + pad), 40, dtype=np.uint8)
    for c in range(num_classes):
        for j, s in enumerate(samples[labels == c][:cols]):
            tile = ((np.clip(s[0], -1, 1) + 1) * 127.5).round().astype(np.uint8)
            r0, c0 = pad + c * (h + pad), pad + j * (w + pad)
            img[r0:r0 + h, c0:c0 + w] = tile
    fmt = image_format(path)
    big = Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)
    write_bytes_atomic(path, lambda f: big.save(f, format=fmt))


def image_format(path: str) -> str:
    """PIL's format name for path's extension; ValueError naming the path where it has none PIL writes."""
    import os

    from PIL import Image

    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"{path!r}: {'no' if not ext else 'unknown'} image extension{' ' + ext if ext else ''}; "
                         "use .png (or .jpg, .bmp, ...)")
    return fmt
