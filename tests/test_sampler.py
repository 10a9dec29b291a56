"""Class-balanced batches (VMDLS Sec. 3.1): composition, determinism, resume, coverage, errors.

The images encode their own position (pixel (0, 0) = i % 256, pixel (0, 1) = i // 256, with
mean 0 and std 1), so the examples a batch holds can be read back from the batch itself and
compared with `class_balanced_indices` and with counts made in the test.
"""
from __future__ import annotations

import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from oodjax.data import ImageDataset
from oodjax.data.sampler import (check_class_balanced, class_balanced_batches,
                                 class_balanced_indices)

from tests.train_helpers import run_with_fake_devices


def _dataset(counts, num_classes=None, c=1, seed=0, name="toy") -> ImageDataset:
  """counts[k] examples of class k, in shuffled order; images encode their position."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(len(counts)), counts)).astype(np.int32)
  n = labels.size
  images = rng.integers(0, 256, (n, 4, 4, c), dtype=np.uint8)
  images[:, 0, 0, :] = (np.arange(n) % 256)[:, None]
  images[:, 0, 1, :] = (np.arange(n) // 256)[:, None]
  k = num_classes or len(counts)
  return ImageDataset(images, labels, (0.0,) * c, (1.0,) * c,
                      tuple(f"c{i}" for i in range(k)), name)


def _positions(batch) -> np.ndarray:
  """[B] dataset positions, decoded from the images of a batch."""
  image = np.asarray(batch["image"]) * 255.0  # mean 0, std 1: back to the uint8 values
  return np.rint(image[:, 0, 0, 0]).astype(int) + 256 * np.rint(image[:, 0, 1, 0]).astype(int)


def _all_positions(*args, **kwargs) -> list[np.ndarray]:
  return [_positions(b) for b in class_balanced_batches(*args, **kwargs)]


def test_each_batch_has_exactly_bc_classes_of_bn_examples():
  ds = _dataset([13] * 7)
  for b in range(12):
    idx = class_balanced_indices(ds.labels, 3, 4, seed=5, epoch=1, batch_index=b)
    assert idx.shape == (12,)
    groups = ds.labels[idx].reshape(3, 4)  # [B_C, B_N]: one class per row
    assert np.all(groups == groups[:, :1])
    assert np.all(np.diff(groups[:, 0]) > 0)  # three distinct classes, increasing
    assert len(set(idx.tolist())) == 12  # 13 >= 4 examples per class: no repeats
  batch = next(class_balanced_batches(ds, 3, 4, seed=5, epoch=1))
  assert batch["image"].shape == (12, 4, 4, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (12,) and batch["label"].dtype == np.int32
  np.testing.assert_array_equal(np.bincount(np.asarray(batch["label"]), minlength=7) % 4, 0)


def test_generator_batches_are_the_indices_of_the_pure_core():
  ds = _dataset([9, 5, 12, 7, 3])
  got = list(class_balanced_batches(ds, 3, 4, seed=2, epoch=3, steps_per_epoch=9))
  assert len(got) == 9
  for b, batch in enumerate(got):
    want = class_balanced_indices(ds.labels, 3, 4, seed=2, epoch=3, batch_index=b)
    np.testing.assert_array_equal(_positions(batch), want)
    np.testing.assert_array_equal(np.asarray(batch["label"]), ds.labels[want])
    np.testing.assert_array_equal(np.asarray(batch["image"]),
                                  ds.images[want].astype(np.float32) / 255.0)


def test_classes_drawn_uniformly_and_empty_classes_never():
  # Classes 2 and 4 of six have no examples: only the other four may ever be drawn.
  ds = _dataset([6, 6, 0, 6, 0, 6], num_classes=6)
  seen = np.concatenate([np.asarray(b["label"])
                         for b in class_balanced_batches(ds, 2, 1, seed=0, steps_per_epoch=600)])
  counts = np.bincount(seen, minlength=6)
  assert counts[2] == counts[4] == 0
  # 600 batches x 2 of 4 classes: each class drawn Binomial(600, 1/2) = 300 +- 12 times.
  assert np.all(np.abs(counts[[0, 1, 3, 5]] - 300) < 60), counts
  full = list(class_balanced_batches(ds, 4, 2, seed=0, steps_per_epoch=5))
  for b in full:
    np.testing.assert_array_equal(np.unique(np.asarray(b["label"])), [0, 1, 3, 5])


def test_small_class_repeats_its_examples_evenly():
  ds = _dataset([2, 10, 10])
  members0 = set(np.flatnonzero(ds.labels == 0).tolist())
  for b in range(8):
    idx = class_balanced_indices(ds.labels, 3, 5, seed=1, epoch=0, batch_index=b)
    group = idx[:5]  # class 0 comes first
    assert set(group.tolist()) == members0  # both of its examples ...
    assert sorted(np.unique(group, return_counts=True)[1].tolist()) == [2, 3]  # ... 2 + 3 times
    assert len(set(idx[5:10].tolist())) == 5 and len(set(idx[10:].tolist())) == 5


def test_deterministic_in_seed_epoch_and_batch_only():
  ds = _dataset([8] * 6)
  a = _all_positions(ds, 3, 2, seed=4, epoch=2)
  b = _all_positions(ds, 3, 2, seed=4, epoch=2)
  assert len(a) == 48 // 6
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  for other in (dict(seed=5, epoch=2), dict(seed=4, epoch=3)):
    c = _all_positions(ds, 3, 2, **other)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  # The pure core takes any array-like and gives what the generator yields.
  idx1 = class_balanced_indices(ds.labels, 3, 2, seed=4, epoch=2, batch_index=5)
  idx2 = class_balanced_indices(list(ds.labels), 3, 2, seed=4, epoch=2, batch_index=5)
  np.testing.assert_array_equal(idx1, idx2)
  np.testing.assert_array_equal(idx1, a[5])


@pytest.mark.parametrize("start", [1, 4, 9, 12])
def test_resume_equals_tail_of_full_epoch(start):
  ds = _dataset([7, 11, 5, 9], c=3)
  kwargs = dict(seed=7, epoch=4, augment=True, steps_per_epoch=10)
  full = list(class_balanced_batches(ds, 2, 3, **kwargs))
  tail = list(class_balanced_batches(ds, 2, 3, start_batch=start, **kwargs))
  assert len(tail) == max(10 - start, 0)
  for f, t in zip(full[start:], tail):
    np.testing.assert_array_equal(np.asarray(f["image"]), np.asarray(t["image"]))
    np.testing.assert_array_equal(np.asarray(f["label"]), np.asarray(t["label"]))


def test_epoch_visits_balanced_data_about_once_each():
  # 10 classes x 40, B = 5 x 4 = 20, 20 steps: 400 draws in an epoch, as many as examples.
  ds = _dataset([40] * 10)
  epochs = [np.concatenate(_all_positions(ds, 5, 4, seed=3, epoch=e)) for e in range(8)]
  for drawn in epochs:
    assert drawn.size == 400
    visits = np.bincount(drawn, minlength=400)
    for k in range(10):
      in_class = visits[ds.labels == k]
      # Without replacement within a class: its visits differ by at most one across examples.
      assert in_class.max() - in_class.min() <= 1, in_class
  visits = np.bincount(np.concatenate(epochs), minlength=400)
  # 8 epochs: about 8 visits each. Sampling with replacement would give Poisson(8), std 2.8.
  assert visits.min() >= 4 and visits.max() <= 12, (visits.min(), visits.max())
  assert visits.std() < 2.0, visits.std()  # about 1.2 expected here


def test_cycling_through_a_class_many_times_in_one_epoch():
  # 3 classes x 8 examples, B_N = 4: a shuffle serves 2 groups, and every class is drawn about
  # 20 times in 30 batches, so each class is reshuffled about 10 times within the epoch.
  ds = _dataset([8, 8, 8])
  batches = _all_positions(ds, 2, 4, seed=0, steps_per_epoch=30)
  drawn = np.concatenate(batches)
  for idx in batches:
    assert len(set(idx[:4].tolist())) == 4 and len(set(idx[4:].tolist())) == 4
  visits = np.bincount(drawn, minlength=24)
  for k in range(3):
    uses = np.sum(ds.labels[drawn] == k) // 4
    # uses // 2 complete shuffles visit every example; a half-used one visits 4 of them once.
    want = sorted([uses // 2] * (8 - 4 * (uses % 2)) + [uses // 2 + 1] * (4 * (uses % 2)))
    assert sorted(visits[ds.labels == k].tolist()) == want


def test_steps_per_epoch_default_and_explicit():
  ds = _dataset([25, 25])
  assert len(list(class_balanced_batches(ds, 2, 6, seed=0))) == 50 // 12
  assert len(list(class_balanced_batches(_dataset([3, 2]), 2, 3, seed=0))) == 1  # 5 // 6 -> 1
  assert len(list(class_balanced_batches(ds, 2, 6, seed=0, steps_per_epoch=7))) == 7
  assert len(list(class_balanced_batches(ds, 2, 6, seed=0, start_batch=2))) == 2


@pytest.mark.parametrize("args, kwargs, message", [
    ((1, 4), {}, "classes_per_batch must be at least 2"),
    ((4, 2), {}, r"'toy' has only 3 classes with examples; use at most 3"),
    ((2, 0), {}, "per_class must be at least 1"),
    ((3, 2), dict(data_axis_size=4), r"3 \* 2 = 6 is not divisible by the 4 devices"),
    ((2, 2), dict(data_axis_size=0), "data_axis_size must be at least 1"),
])
def test_check_class_balanced_errors(args, kwargs, message):
  ds = _dataset([5, 0, 5, 5], num_classes=4)  # class 1 is empty: 3 classes with examples
  with pytest.raises(ValueError, match=message):
    check_class_balanced(ds, *args, **kwargs)
  if "data_axis_size" not in kwargs:
    with pytest.raises(ValueError, match=message):
      class_balanced_batches(ds, *args, seed=0)  # at the call, before any next()
    with pytest.raises(ValueError, match=message.replace("'toy'", "labels")):
      class_balanced_indices(ds.labels, *args, seed=0, epoch=0, batch_index=0)


def test_check_class_balanced_accepts_and_rejects_unlabelled():
  ds = _dataset([4, 4, 4])
  check_class_balanced(ds, 3, 2, data_axis_size=2)
  check_class_balanced(ds, 2, 5)  # more per class than a class holds: allowed, repeats
  unlabelled = ImageDataset(ds.images, np.full((12,), -1, np.int32), ds.mean, ds.std, (),
                            "noise")
  with pytest.raises(ValueError, match="'noise': has no labels"):
    check_class_balanced(unlabelled, 2, 2)
  with pytest.raises(ValueError, match="has no labels"):
    class_balanced_batches(unlabelled, 2, 2, seed=0)


def test_generator_argument_errors():
  ds = _dataset([4, 4, 4])
  with pytest.raises(ValueError, match="steps_per_epoch must be at least 1"):
    class_balanced_batches(ds, 2, 2, seed=0, steps_per_epoch=0)
  with pytest.raises(ValueError, match="start_batch must be >= 0"):
    class_balanced_batches(ds, 2, 2, seed=0, start_batch=-1)
  with pytest.raises(ValueError, match="batch_index must be >= 0"):
    class_balanced_indices(ds.labels, 2, 2, seed=0, epoch=0, batch_index=-1)


def test_on_single_device_mesh():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  ds = _dataset([6, 6, 6])
  sharded = list(class_balanced_batches(ds, 2, 3, seed=1, sharding=sharding))
  plain = list(class_balanced_batches(ds, 2, 3, seed=1))
  assert len(sharded) == len(plain) == 3
  for s, p in zip(sharded, plain):
    assert s["image"].sharding == sharding and s["label"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(s["image"]), np.asarray(p["image"]))
    np.testing.assert_array_equal(np.asarray(s["label"]), np.asarray(p["label"]))


def test_on_fake_device_mesh():
  # Fake CPU devices must be configured before JAX starts, hence a fresh interpreter.
  code = textwrap.dedent("""
      import numpy as np, jax
      from jax.sharding import NamedSharding, PartitionSpec as P
      from oodjax.data import ImageDataset
      from oodjax.data.sampler import class_balanced_batches
      ds = ImageDataset(np.zeros((30, 4, 4, 1), np.uint8), np.arange(30, dtype=np.int32) % 3,
                        (0.,), (1.,), ("a", "b", "c"))
      sh = NamedSharding(jax.make_mesh((4,), ("data",)), P("data"))
      got = list(class_balanced_batches(ds, 2, 4, seed=0, sharding=sh))
      assert len(got) == 3 and got[0]["image"].sharding == sh
      assert got[0]["label"].addressable_shards[1].data.shape == (2,)
      try:
        class_balanced_batches(ds, 3, 2, seed=0, sharding=sh)
      except ValueError as e:
        print("ERR", e)
      print("OK")
  """)
  res = run_with_fake_devices(code, 4)
  assert "OK" in res.stdout
  errors = [l for l in res.stdout.splitlines() if l.startswith("ERR")]
  assert len(errors) == 1 and "not divisible by the 4 devices" in errors[0]
