"""Digits data and quality metrics: split, batching, Frechet distance, judge, PNG grid."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dumo_engine.config import DataConfig
from dumo_engine.data import DigitsData, load_digits_split
from dumo_engine.eval import DigitsJudge, frechet_distance, save_grid


def test_split_is_disjoint_stratified_and_scaled():
    x_tr, y_tr, x_te, y_te = load_digits_split(0.2, 0)
    assert x_tr.shape[1:] == (1, 8, 8) and len(x_tr) + len(x_te) == 1797
    assert x_tr.min() == -1.0 and x_tr.max() == 1.0
    assert set(np.unique(y_te)) == set(range(10))
    tr = {a.tobytes() for a in x_tr}
    assert sum(a.tobytes() in tr for a in x_te) < 5  # digits has a handful of exact duplicate images


def test_batches_cover_an_epoch_without_repeats():
    d = DigitsData.from_config(DataConfig(), batch_size=100, seed=3)
    seen = torch.cat([d.batch(k)[1] for k in range(d.batches_per_epoch)])
    assert len(seen) == 100 * d.batches_per_epoch
    xs = torch.cat([d.batch(k)[0] for k in range(d.batches_per_epoch)]).flatten(1)
    assert torch.equal(d.batch(2)[0], d.batch(2)[0])  # stateless: same step, same batch
    assert not torch.equal(d.batch(0)[0], d.batch(d.batches_per_epoch)[0])  # new epoch, new order
    assert len(torch.unique(xs, dim=0)) >= len(xs) - 5
    with pytest.raises(ValueError, match="batch_size"):
        DigitsData.from_config(DataConfig(), batch_size=5000, seed=0)


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # N(0, I) vs N(m, 4 I): ||m||^2 + tr(I + 4I - 2*2I) = ||m||^2 + 3
    b = rng.normal(size=(20000, 3)) * 2.0 + np.array([1.0, 2.0, 0.0])
    assert frechet_distance(a, b) == pytest.approx(5.0 + 3.0, rel=0.03)


@pytest.fixture(scope="module")
def judge():
    return DigitsJudge()


def test_judge_scores_real_and_noise(judge):
    assert judge.test_accuracy > 0.93
    real = judge.score(judge.x_test.reshape(-1, 1, 8, 8), judge.y_test)
    assert real["accuracy"] == pytest.approx(judge.test_accuracy) and real["fd"] < 1e-6
    noise = judge.score(np.random.default_rng(0).uniform(-1, 1, (300, 1, 8, 8)), np.arange(300) % 10)
    assert noise["accuracy"] < 0.3 and noise["fd"] > 10 * judge.real_fd
    # wrong labels on real images: FD unchanged, accuracy collapses
    wrong = judge.score(judge.x_test.reshape(-1, 1, 8, 8), (judge.y_test + 1) % 10)
    assert wrong["accuracy"] < 0.1
    assert real["non_finite"] == noise["non_finite"] == 0


def test_judge_counts_non_finite_samples(judge):
    """A diverged model's NaN/inf samples are counted and scored as misses, not a crash inside scikit-learn."""
    x = judge.x_test.reshape(-1, 1, 8, 8).copy()
    x[:10, 0, 0, 0] = np.nan
    x[10:15, 0, 3, 3] = np.inf
    s = judge.score(x, judge.y_test)
    finite = judge.score(x[15:], judge.y_test[15:])
    assert s["non_finite"] == 15 and finite["non_finite"] == 0
    assert s["accuracy"] == pytest.approx(finite["accuracy"] * (len(x) - 15) / len(x))
    assert s["fd"] == pytest.approx(finite["fd"])
    none = judge.score(np.full((4, 1, 8, 8), np.nan), np.arange(4))
    assert none == {"accuracy": 0.0, "fd": None, "non_finite": 4}


def test_grid_png(tmp_path):
    from PIL import Image
    x = np.linspace(-1, 1, 30 * 64).reshape(30, 1, 8, 8)
    y = np.arange(30) % 10
    save_grid(str(tmp_path / "g.png"), x, y, cols=3, scale=2)
    im = np.asarray(Image.open(tmp_path / "g.png"))
    assert im.shape == (2 * (10 * 9 + 1), 2 * (3 * 9 + 1))
    # the tile of class 0, column 0 is sample 0
    tile = im[2:18:2, 2:18:2]
    assert np.array_equal(tile, ((x[0, 0] + 1) * 127.5).round().astype(np.uint8))


def test_floor_is_at_the_generators_count_and_balance(judge):
    """The floor scores per_class training images of each class, as the generator is scored on per_class samples
    of each class (it took 360 random, unbalanced training images: 1.32 where a matched floor is about 1.0), and a
    test split larger than the training split no longer crashes it."""
    assert judge.per_class == 50
    few = DigitsJudge(per_class=5)
    assert few.real_fd > 2 * judge.real_fd  # 50 images give a much noisier FD than 500: the count matters
    assert np.isfinite(DigitsJudge(test_fraction=0.6).real_fd)  # 719 training images, 1078 test images
    with pytest.raises(ValueError, match="per_class must be >= 1"):
        DigitsJudge(per_class=0)
