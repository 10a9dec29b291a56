"""The on-device input path: normalisation and crop + flip against the host's numpy code, and
the background prefetcher's order, errors, shutdown and run-ahead."""
from __future__ import annotations

import functools
import itertools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oodjax.data import core
from oodjax.data.device_input import (crop_and_flip, crop_flip_draws, normalize, prefetch,
                                      prepare_batch)

# Odd statistics: values whose float32 divisions round differently from multiplications by
# their reciprocals.
STATS = {1: ((0.1234567,), (0.0312345,)),
         3: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}


def _images(shape, seed=0):
  images = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
  flat = images.reshape(-1)
  flat[:256] = np.arange(256, dtype=np.uint8)  # every value occurs at least once
  return images


def _reference_crop_and_flip(images, dy, dx, flip, pad):
  """The obvious per-image loop, in numpy."""
  _, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.empty_like(images)
  for i in range(images.shape[0]):
    window = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    out[i] = window[:, ::-1] if flip[i] else window
  return out


@functools.partial(jax.jit, static_argnums=2)
def _crop_and_draws(images, key, pad):
  """crop_and_flip and its draws from one compiled program (threefry dominates compile time)."""
  return crop_and_flip(images, key, pad), crop_flip_draws(key, images.shape[0], pad)


def _crop(images, key, pad):
  return _crop_and_draws(images, key, pad)[0]


def _draws(key, n, pad):
  return tuple(np.asarray(a) for a in jax.jit(crop_flip_draws, static_argnums=(1, 2))(
      key, n, pad))


def _prefetch_threads():
  return [t for t in threading.enumerate() if t.name == "oodjax-prefetch"]


@pytest.mark.parametrize("shape, mean, std", [
    ((8, 28, 30, 1), *STATS[1]),
    ((8, 9, 13, 3), *STATS[3]),
    ((4, 16, 16, 3), (0.0, 1.0, 0.3333333), (3.7, 1e-3, 0.7777777)),
])
def test_normalize_bit_identical_to_host(shape, mean, std):
  images = _images(shape)
  host = core.normalize(images, mean, std)
  traced = jax.jit(normalize)(images, np.float32(mean), np.float32(std))
  closed_over = jax.jit(lambda x: normalize(x, mean, std))(images)
  for out in (traced, closed_over):
    assert out.dtype == jnp.float32 and out.shape == shape
    np.testing.assert_array_equal(np.asarray(out), host)


def test_normalize_rejects_float_images():
  with pytest.raises(ValueError, match="uint8"):
    normalize(jnp.zeros((1, 2, 2, 1), jnp.float32), (0.5,), (0.5,))


@pytest.mark.parametrize("shape, pad", [
    ((12, 28, 28, 1), 4), ((12, 9, 13, 3), 4), ((12, 5, 7, 3), 6), ((12, 7, 5, 1), 0)])
def test_crop_and_flip_matches_numpy_loop(shape, pad):
  images = _images(shape, seed=1)
  key = jax.random.key(7)
  out, draws = _crop_and_draws(images, key, pad)
  assert out.dtype == jnp.uint8 and out.shape == shape
  dy, dx, flip = (np.asarray(a) for a in draws)
  np.testing.assert_array_equal(np.asarray(out),
                                _reference_crop_and_flip(images, dy, dx, flip, pad))
  if pad == 0:  # no crop at all: each image is itself or its mirror
    assert not dy.any() and not dx.any() and 0 < flip.sum() < shape[0]
    np.testing.assert_array_equal(np.asarray(out)[~flip], images[~flip])


def test_crop_and_flip_depends_only_on_key():
  images = _images((12, 28, 28, 1))
  a = _crop(images, jax.random.key(0), 4)
  np.testing.assert_array_equal(a, _crop(images, jax.random.key(0), 4))
  assert not np.array_equal(a, _crop(images, jax.random.key(1), 4))


def test_crop_flip_draws_cover_every_offset():
  pad, n = 4, 20_000
  dy, dx, flip = _draws(jax.random.key(3), n, pad)
  assert dy.dtype == dx.dtype == np.int32 and flip.dtype == bool
  counts = np.zeros((2 * pad + 1, 2 * pad + 1), int)
  np.add.at(counts, (dy, dx), 1)
  expected = n / counts.size  # ~247
  assert counts.min() > 0.6 * expected and counts.max() < 1.4 * expected
  assert abs(flip.mean() - 0.5) < 0.02


def test_crop_and_flip_statistics_from_the_images():
  """Reads each output's (dy, dx, flip) back off the image itself: every offset and both
  flips occur, at about the right rates."""
  pad, n = 2, 5000
  image = np.arange(1, 10, dtype=np.uint8).reshape(1, 3, 3, 1)  # distinct, nonzero pixels
  out = np.asarray(_crop(np.repeat(image, n, 0), jax.random.key(11), pad))
  offsets = [(y, x, f) for y in range(2 * pad + 1) for x in range(2 * pad + 1)
             for f in (False, True)]
  candidates = np.concatenate([  # [50, 3, 3, 1], pairwise different
      _reference_crop_and_flip(image, [y], [x], [f], pad) for y, x, f in offsets])
  match = np.all(out[:, None] == candidates[None], axis=(2, 3, 4))  # [n, 50]
  assert np.all(match.sum(1) == 1)
  counts = match.sum(0).reshape(2 * pad + 1, 2 * pad + 1, 2)  # [dy, dx, flip]
  per_offset = counts.sum(-1)
  assert per_offset.min() > 0.5 * n / 25 and per_offset.max() < 1.5 * n / 25
  assert counts.min() > 0  # both flips at every offset
  assert abs(counts[..., 1].sum() / n - 0.5) < 0.03


def test_crop_and_flip_rejects_bad_arguments():
  with pytest.raises(ValueError, match="pad"):
    crop_and_flip(jnp.zeros((2, 4, 4, 1), jnp.uint8), jax.random.key(0), -1)
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    crop_and_flip(jnp.zeros((4, 4, 1), jnp.uint8), jax.random.key(0))


@pytest.mark.parametrize("augment", [False, True])
def test_prepare_batch_matches_host_path(augment):
  mean, std = STATS[3]
  images = _images((12, 9, 13, 3), seed=2)
  batch = {"image": images, "label": np.arange(12, dtype=np.int32), "index": np.arange(12)}
  key = jax.random.key(5)
  out = jax.jit(functools.partial(prepare_batch, mean=mean, std=std, augment=augment))(batch,
                                                                                       key)
  expected = images
  if augment:
    draws = (np.asarray(a) for a in _crop_and_draws(images, key, 4)[1])
    expected = _reference_crop_and_flip(images, *draws, 4)
  assert set(out) == set(batch) and out["image"].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out["image"]), core.normalize(expected, mean, std))
  np.testing.assert_array_equal(out["label"], batch["label"])
  np.testing.assert_array_equal(out["index"], batch["index"])


def test_prepare_batch_rejects_float_images():
  batch = {"image": jnp.zeros((2, 4, 4, 1)), "label": jnp.zeros((2,), jnp.int32)}
  with pytest.raises(ValueError, match="uint8"):
    prepare_batch(batch, jax.random.key(0), mean=(0.5,), std=(0.5,), augment=False)


@pytest.mark.parametrize("size", [1, 2, 5])
def test_prefetch_keeps_order(size):
  baseline = threading.active_count()
  assert list(prefetch(range(50), size)) == list(range(50))
  assert list(prefetch([], size)) == []
  assert threading.active_count() == baseline and not _prefetch_threads()


@pytest.mark.parametrize("size", [0, -1])
def test_prefetch_rejects_size(size):
  with pytest.raises(ValueError, match="size"):
    prefetch(range(3), size)  # at the call, before any iteration


def test_prefetch_reraises_where_the_error_occurred():
  error = RuntimeError("source failed")

  def source():
    yield 0
    yield 1
    raise error

  baseline = threading.active_count()
  it = prefetch(source(), size=4)  # the thread hits the error before the consumer gets there
  assert next(it) == 0 and next(it) == 1
  with pytest.raises(RuntimeError, match="source failed") as raised:
    next(it)
  assert raised.value is error
  with pytest.raises(StopIteration):
    next(it)
  assert threading.active_count() == baseline and not _prefetch_threads()


def test_prefetch_close_stops_a_producer_that_would_block_forever():
  baseline = threading.active_count()
  it = prefetch(itertools.count(), size=2)  # endless: its producer waits for a free slot
  assert [next(it) for _ in range(3)] == [0, 1, 2]
  assert len(_prefetch_threads()) == 1
  it.close()
  assert threading.active_count() == baseline and not _prefetch_threads()

  for k in prefetch(itertools.count(), size=3):  # break: CPython closes the dropped generator
    if k == 4:
      break
  assert threading.active_count() == baseline and not _prefetch_threads()

  unstarted = prefetch(itertools.count())  # never iterated: no thread was started
  assert not _prefetch_threads()
  unstarted.close()


def test_prefetch_runs_ahead_in_a_thread():
  pulled = [threading.Event() for _ in range(6)]
  producers = []

  def source():
    for k in range(6):
      producers.append(threading.current_thread())
      pulled[k].set()
      yield k

  it = prefetch(source(), size=2)
  assert next(it) == 0
  # While the consumer holds item 0, items 1 and 2 are produced without being asked for ...
  assert pulled[1].wait(timeout=10) and pulled[2].wait(timeout=10)
  # ... and not item 3 (size = 2). Waiting can only miss a violation, never invent one.
  assert not pulled[3].wait(timeout=0.2)
  assert threading.main_thread() not in producers
  assert list(it) == [1, 2, 3, 4, 5]
