"""ImageDataset validation, from_arrays, and the batch iterator (order, resume, augment, mesh)."""
from __future__ import annotations

import textwrap

import jax
import numpy as np
import pytest

from oodjax.data import (ImageDataset, batches, check_compatible, from_arrays, normalize,
                         validate)

from tests.train_helpers import run_with_fake_devices


def _toy(n=10, h=6, w=6, c=1, k=3, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
  labels = (np.arange(n) % k).astype(np.int32)
  return ImageDataset(images, labels, (0.5,) * c, (0.25,) * c,
                      tuple(f"c{i}" for i in range(k)), "toy")


@pytest.mark.parametrize("change, message", [
    (dict(images=np.zeros((4, 6, 6, 1), np.float32)), "uint8"),
    (dict(images=np.zeros((4, 6, 6), np.uint8)), r"\[N, H, W, C\]"),
    (dict(images=np.zeros((4, 6, 6, 2), np.uint8)), "1 or 3 channels"),
    (dict(images=np.zeros((0, 6, 6, 1), np.uint8), labels=np.zeros((0,), np.int32)), "empty"),
    (dict(labels=np.array([0, 1, 3, 0], np.int32)), r"\[0, 3\)"),
    (dict(labels=np.array([0, 1, -1, 0], np.int32)), r"\[0, 3\)"),
    (dict(labels=np.zeros((3,), np.int32)), "labels must be"),
    (dict(mean=(0.5, 0.5, 0.5)), "one value per channel"),
    (dict(std=(0.0,)), "std must be > 0"),
    (dict(std=(-1.0,)), "std must be > 0"),
    (dict(mean=(float("nan"),)), "finite"),
])
def test_validate_rejects(change, message):
  base = dict(images=np.zeros((4, 6, 6, 1), np.uint8), labels=np.array([0, 1, 2, 0], np.int32),
              mean=(0.5,), std=(0.25,), class_names=("a", "b", "c"), name="bad")
  with pytest.raises(ValueError, match=message):
    validate(ImageDataset(**{**base, **change}))


def test_validate_accepts_and_unlabelled_rules():
  ds = _toy()
  assert validate(ds) is ds
  unlabelled = ImageDataset(ds.images, np.full((10,), -1, np.int32), ds.mean, ds.std, ())
  validate(unlabelled)
  with pytest.raises(ValueError, match="labels are required"):
    validate(unlabelled, require_labels=True)
  with pytest.raises(ValueError, match="must be -1"):
    validate(ImageDataset(ds.images, ds.labels, ds.mean, ds.std, ()))


def test_check_compatible():
  check_compatible(_toy(), _toy(n=3, k=1))
  with pytest.raises(ValueError, match=r"\(6, 6, 3\)"):
    check_compatible(_toy(), _toy(c=3))
  with pytest.raises(ValueError, match="shape"):
    check_compatible(_toy(), _toy(h=8))


def test_from_arrays_float_and_uint8():
  x = np.array([0.0, 0.5, 1.0, 0.2]).reshape(1, 2, 2)
  ds = from_arrays(x, [1], class_names=("a", "b"))
  np.testing.assert_array_equal(ds.images[0, ..., 0], [[0, 128], [255, 51]])
  assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int32
  # Statistics default to the images' own: worked out by hand from 0, 128, 255, 51.
  vals = np.array([0, 128, 255, 51]) / 255.0
  np.testing.assert_allclose(ds.mean, [vals.mean()])
  np.testing.assert_allclose(ds.std, [vals.std()])
  unlabelled = from_arrays(np.zeros((3, 4, 4, 3), np.uint8) + 7)
  np.testing.assert_array_equal(unlabelled.labels, [-1, -1, -1])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_from_arrays_rejects_non_finite(bad):
  x = np.full((2, 4, 4, 1), 0.5, np.float32)
  x[1, 2, 3, 0] = bad
  with pytest.raises(ValueError, match="NaN or Inf"):
    from_arrays(x)


def test_from_arrays_rejects_out_of_range_and_wrong_dtype():
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    from_arrays(np.full((2, 4, 4, 1), 1.5))
  with pytest.raises(ValueError, match="uint8 or float"):
    from_arrays(np.zeros((2, 4, 4, 1), np.int64))
  with pytest.raises(ValueError, match=r"\[0, 2\)"):
    from_arrays(np.zeros((2, 4, 4, 1), np.uint8), [0, 2], class_names=("a", "b"))


def test_normalize_matches_formula():
  x = np.array([[0, 255], [51, 102]], np.uint8)[..., None]
  np.testing.assert_allclose(normalize(x, (0.2,), (0.5,))[..., 0],
                             (np.array([[0, 255], [51, 102]]) / 255.0 - 0.2) / 0.5, rtol=1e-6)


def _collect(it):
  return [(np.asarray(b["image"]), np.asarray(b["label"])) for b in it]


def test_batches_order_and_seed_determinism():
  ds = _toy(n=23)
  plain = _collect(batches(ds, 5))
  assert [len(l) for _, l in plain] == [5, 5, 5, 5, 3]
  np.testing.assert_array_equal(np.concatenate([l for _, l in plain]), ds.labels)
  np.testing.assert_allclose(plain[0][0], normalize(ds.images[:5], ds.mean, ds.std))
  a = _collect(batches(ds, 5, seed=3, epoch=1))
  b = _collect(batches(ds, 5, seed=3, epoch=1))
  c = _collect(batches(ds, 5, seed=3, epoch=2))
  for (xa, la), (xb, lb) in zip(a, b):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(la, lb)
  assert not all(np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
  # A shuffled epoch is a permutation: every image exactly once.
  seen = np.sort(np.concatenate([x.reshape(len(x), -1) for x, _ in a]), axis=0)
  want = np.sort(normalize(ds.images, ds.mean, ds.std).reshape(23, -1), axis=0)
  np.testing.assert_allclose(seen, want)
  assert len(_collect(batches(ds, 5, seed=3, drop_remainder=True))) == 4


def test_resume_equals_tail_of_full_epoch():
  ds = _toy(n=37, c=3)
  full = _collect(batches(ds, 8, seed=7, epoch=4, augment=True))
  tail = _collect(batches(ds, 8, seed=7, epoch=4, augment=True, start_batch=2))
  assert len(tail) == len(full) - 2
  for (xf, lf), (xt, lt) in zip(full[2:], tail):
    np.testing.assert_array_equal(xf, xt)
    np.testing.assert_array_equal(lf, lt)


def test_augment_shape_dtype_determinism_and_content():
  ds = _toy(n=16, h=8, w=8, c=3)
  a = _collect(batches(ds, 16, seed=1, augment=True))[0][0]
  b = _collect(batches(ds, 16, seed=1, augment=True))[0][0]
  plain = _collect(batches(ds, 16))[0][0]
  assert a.shape == plain.shape == (16, 8, 8, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(np.sort(a.ravel()), np.sort(plain.ravel()))  # padding zeros appear
  # Each augmented image is a shifted, maybe mirrored, window of its zero-padded original.
  order = np.random.default_rng([1, 0]).permutation(16)
  zero = normalize(np.zeros((1, 1, 1, 3), np.uint8), ds.mean, ds.std)[0, 0, 0]
  for i in range(16):
    orig = np.pad(normalize(ds.images[order[i]], ds.mean, ds.std), ((4, 4), (4, 4), (0, 0)))
    orig[:4], orig[-4:], orig[:, :4], orig[:, -4:] = zero, zero, zero, zero
    windows = [orig[y:y + 8, x:x + 8] for y in range(9) for x in range(9)]
    assert any(np.allclose(a[i], wdw) or np.allclose(a[i], wdw[:, ::-1]) for wdw in windows)


def test_batches_on_single_device_mesh():
  mesh = jax.make_mesh((1,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  out = list(batches(_toy(n=6), 3, sharding=sharding))
  assert out[0]["image"].sharding == sharding and out[0]["label"].shape == (3,)


def test_batches_on_fake_device_mesh():
  # Fake CPU devices must be configured before JAX starts, hence a fresh interpreter.
  code = textwrap.dedent("""
      import numpy as np, jax
      from jax.sharding import NamedSharding, PartitionSpec as P
      from oodjax.data import ImageDataset, batches
      ds = ImageDataset(np.arange(14 * 4 * 4).reshape(14, 4, 4, 1).astype(np.uint8),
                        np.arange(14, dtype=np.int32) % 2, (0.,), (1.,), ("a", "b"))
      mesh = jax.make_mesh((4,), ("data",))
      sh = NamedSharding(mesh, P("data"))
      got = list(batches(ds, 8, sharding=sh, drop_remainder=True))
      assert len(got) == 1 and got[0]["image"].sharding == sh
      assert len(got[0]["image"].addressable_shards) == 4
      assert got[0]["image"].addressable_shards[1].data.shape == (2, 4, 4, 1)
      np.testing.assert_array_equal(np.asarray(got[0]["label"]), ds.labels[:8])
      for bad in (dict(batch_size=6, drop_remainder=True), dict(batch_size=8)):
        try:
          list(batches(ds, sharding=sh, **bad))
        except ValueError as e:
          print("ERR", e)
      print("OK")
  """)
  res = run_with_fake_devices(code, 4)
  assert "OK" in res.stdout
  errors = [l for l in res.stdout.splitlines() if l.startswith("ERR")]
  assert len(errors) == 2
  assert "not divisible by the 4 devices" in errors[0]
  assert "drop_remainder=True" in errors[1]


def test_uint8_batches_are_the_stored_images_in_the_same_order():
  ds = _toy(n=23, c=3)
  host = list(batches(ds, 5, seed=3, epoch=1))
  raw = list(batches(ds, 5, seed=3, epoch=1, uint8=True))
  assert len(raw) == len(host) == 5
  for h, r in zip(host, raw):
    assert r["image"].dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(r["label"]), np.asarray(h["label"]))
    np.testing.assert_array_equal(normalize(np.asarray(r["image"]), ds.mean, ds.std),
                                  np.asarray(h["image"]))
  with pytest.raises(ValueError, match="augmented on the device"):
    list(batches(ds, 5, uint8=True, augment=True))
