"""Built-in data sets and the DataBundle's seeded, shardable, augmentable batching."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from normcore.data import DataBundle, build_data
from normcore.data import transforms as T
from normcore.spec import DataSpec

BUILTIN = ["synthetic", "brightness", "digits"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These models are tiny: one intra-op thread is faster and does not spin on a busy box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _spec(dataset: str, **kwargs: object) -> DataSpec:
    return DataSpec(dataset=dataset, **kwargs)


def _id_bundle(n: int = 40, *, augment: bool = False, seed: int = 0) -> DataBundle:
    """A bundle whose sample i is an image filled with the value i, so batches show indices."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 8, 8).contiguous()
    y = torch.arange(n)
    return DataBundle(
        train_x=x,
        train_y=y,
        val_x=x[:3],
        val_y=y[:3],
        in_channels=1,
        num_classes=n,
        image_size=(8, 8),
        mean=(0.0,),
        std=(1.0,),
        augment=augment,
        seed=seed,
    )


@pytest.mark.parametrize("dataset", BUILTIN)
def test_builtin_sets_build(dataset: str) -> None:
    bundle = build_data(_spec(dataset), seed=0)
    expected = {
        "synthetic": (3, 4, (16, 16), 1024),
        "brightness": (1, 4, (16, 16), 1024),
        "digits": (1, 10, (8, 8), 1797),
    }[dataset]
    channels, classes, size, total = expected
    assert bundle.in_channels == channels and bundle.num_classes == classes
    assert bundle.image_size == size
    assert bundle.num_train + bundle.num_val == total
    assert bundle.num_val == pytest.approx(0.2 * total, abs=classes)
    for x, y in ((bundle.train_x, bundle.train_y), (bundle.val_x, bundle.val_y)):
        assert x.dtype == torch.float32 and x.shape[1:] == (channels, *size)
        assert y.dtype == torch.int64 and len(y) == len(x)
        assert int(y.min()) >= 0 and int(y.max()) < classes
    # every class is present on both sides (stratified split)
    assert set(bundle.train_y.tolist()) == set(range(classes))
    assert set(bundle.val_y.tolist()) == set(range(classes))
    assert bundle.task == "classification"


@pytest.mark.parametrize("dataset", [*BUILTIN, "sr-synthetic"])
def test_deterministic_per_seed(dataset: str) -> None:
    spec = _spec(dataset, num_samples=64) if dataset != "digits" else _spec(dataset)
    a = build_data(spec, seed=1)
    b = build_data(spec, seed=1)
    c = build_data(spec, seed=2)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert torch.equal(a.val_x, b.val_x)
    assert a.train_x.shape != c.train_x.shape or not torch.equal(a.train_x, c.train_x)


def test_generated_set_parameters() -> None:
    spec = _spec("synthetic", num_samples=100, image_size=12, channels=2, num_classes=10)
    bundle = build_data(spec, seed=0, task="classification")
    assert bundle.train_x.shape[1:] == (2, 12, 12)
    assert bundle.num_train + bundle.num_val == 100
    assert bundle.num_classes == 10
    assert set(torch.cat([bundle.train_y, bundle.val_y]).tolist()) == set(range(10))
    bright = build_data(_spec("brightness", num_samples=64, channels=3), seed=0)
    assert bright.in_channels == 3


def test_normalization_uses_train_split_stats() -> None:
    raw = build_data(_spec("synthetic", num_samples=256, normalize=False), seed=0)
    assert raw.mean == (0.0, 0.0, 0.0) and raw.std == (1.0, 1.0, 1.0)
    assert raw.train_x.min() >= 0.0 and raw.train_x.max() <= 1.0
    norm = build_data(_spec("synthetic", num_samples=256), seed=0)
    mean = raw.train_x.mean(dim=(0, 2, 3))
    std = raw.train_x.std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(torch.tensor(norm.mean, dtype=torch.float64), mean.double(), atol=1e-5)
    assert torch.allclose(torch.tensor(norm.std, dtype=torch.float64), std.double(), atol=1e-5)
    assert torch.allclose(norm.train_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(norm.train_x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    # val is normalized with the train statistics, not its own
    m = torch.tensor(norm.mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(norm.std, dtype=torch.float32).view(1, 3, 1, 1)
    assert torch.allclose(norm.val_x, (raw.val_x - m) / s, atol=1e-5)
    assert not torch.allclose(norm.val_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)


def test_digits_values_and_resize() -> None:
    bundle = build_data(_spec("digits", normalize=False), seed=0)
    values = torch.unique(torch.cat([bundle.train_x, bundle.val_x]) * 16)
    assert torch.allclose(values, values.round()) and values.min() == 0 and values.max() == 16
    big = build_data(_spec("digits", image_size=16, channels=3), seed=0)
    assert big.train_x.shape[1:] == (3, 16, 16) and big.in_channels == 3


def test_train_batches_reproducible_per_epoch() -> None:
    bundle = _id_bundle(40)
    rng_before = torch.get_rng_state()
    epoch0 = [x[:, 0, 0, 0].long() for x, _ in bundle.train_batches(0, 8)]
    assert torch.equal(torch.get_rng_state(), rng_before)  # no global RNG consumed
    again = [x[:, 0, 0, 0].long() for x, _ in bundle.train_batches(0, 8)]
    epoch1 = [x[:, 0, 0, 0].long() for x, _ in bundle.train_batches(1, 8)]
    assert len(epoch0) == bundle.steps_per_epoch(8) == 5
    assert all(torch.equal(a, b) for a, b in zip(epoch0, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, epoch1, strict=True))
    seen = torch.cat(epoch0)
    assert sorted(seen.tolist()) == list(range(40))  # a permutation: no repeats
    # another seed, another order
    other = [x[:, 0, 0, 0].long() for x, _ in _id_bundle(40, seed=5).train_batches(0, 8)]
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, other, strict=True))


def test_drop_last_and_labels_follow_images() -> None:
    bundle = _id_bundle(43)
    batches = list(bundle.train_batches(3, 8))
    assert len(batches) == 5 == bundle.steps_per_epoch(8)
    assert all(len(x) == 8 and len(y) == 8 for x, y in batches)
    for x, y in batches:
        assert torch.equal(x[:, 0, 0, 0].long(), y)


def test_start_step_resumes_mid_epoch() -> None:
    bundle = _id_bundle(40, augment=True)
    full = list(bundle.train_batches(2, 8))
    tail = list(bundle.train_batches(2, 8, start_step=3))
    assert len(tail) == 2
    for (xa, ya), (xb, yb) in zip(full[3:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("augment", [False, True])
def test_world_size_two_shards_equal_one_big_batch(augment: bool) -> None:
    bundle = build_data(_spec("synthetic", num_samples=128, augment=augment), seed=0)
    batch = 8
    single = list(bundle.train_batches(1, 2 * batch))
    rank0 = list(bundle.train_batches(1, batch, rank=0, world_size=2))
    rank1 = list(bundle.train_batches(1, batch, rank=1, world_size=2))
    assert len(single) == len(rank0) == len(rank1) == bundle.steps_per_epoch(batch, 2)
    for (xs, ys), (x0, y0), (x1, y1) in zip(single, rank0, rank1, strict=True):
        assert torch.equal(torch.cat([x0, x1]), xs)
        assert torch.equal(torch.cat([y0, y1]), ys)
    ids = _id_bundle(48)
    for (a, _), (b, _) in zip(
        ids.train_batches(0, 4, rank=0, world_size=3),
        ids.train_batches(0, 4, rank=2, world_size=3),
        strict=True,
    ):
        assert not set(a[:, 0, 0, 0].tolist()) & set(b[:, 0, 0, 0].tolist())
    with pytest.raises(ValueError, match="rank"):
        next(ids.train_batches(0, 4, rank=2, world_size=2))


def test_augmentation_changes_pixels_reproducibly() -> None:
    plain = build_data(_spec("synthetic", num_samples=128), seed=0)
    aug = build_data(_spec("synthetic", num_samples=128, augment=True), seed=0)
    (xp, yp), (xa, ya) = next(plain.train_batches(0, 32)), next(aug.train_batches(0, 32))
    assert xa.shape == xp.shape and torch.equal(ya, yp)
    assert not torch.equal(xa, xp)
    assert torch.equal(next(aug.train_batches(0, 32))[0], xa)
    assert not torch.equal(next(aug.train_batches(1, 32))[0], next(plain.train_batches(1, 32))[0])
    # val batches are never augmented
    assert torch.equal(next(aug.val_batches(16))[0], aug.val_x[:16])


def test_crop_flip_matches_a_per_sample_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 5, 7, generator=gen)
    pad = 2
    dy, dx, flip = T.crop_flip_params(6, pad, gen)
    out = T.crop_flip(x, dy, dx, flip, pad)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    for i in range(6):
        crop = padded[i, :, dy[i] : dy[i] + 5, dx[i] : dx[i] + 7]
        expected = crop.flip(-1) if flip[i] else crop
        assert torch.equal(out[i], expected)
    centre = torch.full((6,), pad)
    assert torch.equal(T.crop_flip(x, centre, centre, torch.zeros(6, dtype=torch.bool), pad), x)
    assert torch.equal(
        T.crop_flip(x, centre, centre, torch.ones(6, dtype=torch.bool), pad), x.flip(-1)
    )


def test_val_batches_in_order_with_partial_last() -> None:
    bundle = build_data(_spec("brightness", num_samples=100, val_fraction=0.25), seed=0)
    batches = list(bundle.val_batches(10, device="cpu"))
    assert [len(x) for x, _ in batches] == [10, 10, 5]
    assert torch.equal(torch.cat([x for x, _ in batches]), bundle.val_x)
    assert torch.equal(torch.cat([y for _, y in batches]), bundle.val_y)


def test_too_small_train_split_is_refused() -> None:
    with pytest.raises(ValueError, match="fewer than one batch"):
        build_data(_spec("synthetic", num_samples=20, batch_size=32), seed=0)
    bundle = build_data(_spec("synthetic", num_samples=40, batch_size=16), seed=0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        bundle.steps_per_epoch(16, world_size=3)


def test_spec_fields_that_do_not_apply_are_refused() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        build_data(_spec("digits", num_samples=100), seed=0)
    with pytest.raises(ValueError, match="num_classes"):
        build_data(_spec("brightness", num_classes=3), seed=0)
    with pytest.raises(ValueError, match="super_resolution"):
        build_data(_spec("synthetic"), seed=0, task="super_resolution")
    with pytest.raises(ValueError, match="classes"):
        build_data(_spec("synthetic", num_classes=11), seed=0)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_sr_pairs(scale: int) -> None:
    bundle = build_data(_spec("sr-synthetic", num_samples=40, batch_size=8), seed=0, scale=scale)
    hr_side = 32 - 32 % scale
    assert bundle.task == "super_resolution" and bundle.num_classes is None
    assert bundle.train_y.shape[1:] == (3, hr_side, hr_side)
    assert bundle.train_x.shape[1:] == (3, hr_side // scale, hr_side // scale)
    assert bundle.image_size == (hr_side // scale, hr_side // scale)
    for t in (bundle.train_x, bundle.train_y, bundle.val_x, bundle.val_y):
        assert t.dtype == torch.float32 and t.min() >= 0.0 and t.max() <= 1.0
    assert bundle.mean == (0.0, 0.0, 0.0) and bundle.std == (1.0, 1.0, 1.0)
    # the low-res image is the high-res one shrunk: upsampling it back lands close
    up = torch.nn.functional.interpolate(bundle.val_x, scale_factor=scale, mode="bicubic")
    assert (up - bundle.val_y).abs().mean() < 0.05
    x, y = next(bundle.train_batches(0, 8))
    assert x.shape[0] == y.shape[0] == 8 and y.shape[-1] == scale * x.shape[-1]


def test_sr_batches_are_not_augmented() -> None:
    plain = build_data(_spec("sr-synthetic", num_samples=40, batch_size=8), seed=0)
    aug = build_data(_spec("sr-synthetic", num_samples=40, batch_size=8, augment=True), seed=0)
    for (a, b), (c, d) in zip(plain.train_batches(0, 8), aug.train_batches(0, 8), strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_brightness_is_learned_by_a_bn_net() -> None:
    """Seed 002: the label is global brightness and contrast; a small BN net picks both up."""
    from normcore.models import convblock

    torch.manual_seed(0)
    bundle = build_data(_spec("brightness", num_samples=512, image_size=8), seed=0)
    model = convblock(in_channels=1, num_classes=4, norm="bn", width=8, depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for epoch in range(8):
        model.train()
        for x, y in bundle.train_batches(epoch, 32):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(bundle.val_x).argmax(1) == bundle.val_y).float().mean().item()
    assert accuracy > 0.85  # chance is 0.25
