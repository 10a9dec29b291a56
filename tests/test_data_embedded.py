"""The vendored and generated sets, and the numpy-only unpickler used to build them."""
from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

import oodjax.data as data
from oodjax.data.safepickle import load_numpy_pickle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # name -> (N, number of classes)
    "embedded/animal_mnist": (10000, 10),
    "embedded/digits": (1797, 10),
    "embedded/textures": (2028, 3),
}


@pytest.mark.parametrize("split, n", [("train", 20000), ("test", 3000)])
def test_fashion_mnist_splits(split, n):
  ds = data.load("embedded/fashion_mnist", split)
  assert ds.images.shape == (n, 28, 28, 1) and ds.images.dtype == np.uint8
  assert ds.labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(ds.labels), [n // 10] * 10)  # class-balanced
  assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
  # Both splits carry the train statistics: recomputed here in float64 from the train images,
  # and close to the published full-train-set values (0.2860, 0.3530).
  train = data.load("embedded/fashion_mnist", "train").images / 255.0
  np.testing.assert_allclose(ds.mean, [train.mean()], rtol=1e-9)
  np.testing.assert_allclose(ds.std, [train.std()], rtol=1e-9)
  np.testing.assert_allclose(ds.mean + ds.std, [0.2860, 0.3530], atol=2e-3)


def test_fashion_mnist_splits_are_disjoint_originals():
  # Train and test come from different original files; no test image appears in train.
  tr = data.load("embedded/fashion_mnist", "train").images.reshape(20000, -1)
  te = data.load("embedded/fashion_mnist", "test").images.reshape(3000, -1)
  assert not set(map(bytes, te[:300])) & set(map(bytes, tr))


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_vendored_ood_sets(name):
  n, k = SHAPES[name]
  ds = data.load(name)
  assert ds.images.shape == (n, 28, 28, 1) and ds.images.dtype == np.uint8
  assert ds.labels.min() == 0 and ds.labels.max() == k - 1 and ds.num_classes == k
  x = ds.images / 255.0
  np.testing.assert_allclose(ds.mean, [x.mean()])
  np.testing.assert_allclose(ds.std, [x.std()])
  assert ds.images.max() > 200  # scaled to the full 0..255 range, not left at 0..16


def test_digits_match_sklearn_at_pixel_centres():
  # 8 -> 28 bilinear with half-pixel centres: output pixel 1 of 28 sits at input coordinate
  # (1.5 * 8 / 28 - 0.5) ~ -0.071, clamped to 0, so output (1, 1) equals input (0, 0) exactly.
  from sklearn.datasets import load_digits
  src = load_digits().images * 255.0 / 16.0
  ds = data.load("embedded/digits")
  np.testing.assert_array_equal(ds.images[:, 1, 1, 0], np.rint(src[:, 0, 0]))
  np.testing.assert_array_equal(ds.labels, load_digits().target)


def test_textures_are_pooled_crops():
  skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is in the test extra")
  brick = skimage_data.brick().astype(np.float64)
  ds = data.load("embedded/textures")
  first = brick[:56, :56].reshape(28, 2, 28, 2).mean(axis=(1, 3))
  np.testing.assert_array_equal(ds.images[0, ..., 0], np.rint(first))
  assert ds.class_names == ("brick", "grass", "gravel")


def test_animal_mnist_matches_package():
  import gzip
  import importlib.util
  spec = importlib.util.find_spec("animal_mnist")
  if spec is None:  # scripts/setup.sh installs it; its metadata pulls TensorFlow, hence --no-deps
    pytest.skip("needs: pip install --no-deps animal-mnist==0.4")
  path = os.path.join(os.path.dirname(spec.origin), "data", "Animal_MNIST")
  with gzip.open(os.path.join(path, "animal_data_version_3.gz")) as f:
    raw = load_numpy_pickle(f)
  ds = data.load("embedded/animal_mnist")
  np.testing.assert_array_equal(ds.images[..., 0], raw)
  assert ds.class_names[0] == "bear" and ds.class_names[-1] == "zebra"


def test_embedded_ood_names_all_load_and_fit_the_id_set():
  id_test = data.load("embedded/fashion_mnist")
  assert len(data.EMBEDDED_OOD) == 6
  for name in data.EMBEDDED_OOD:
    ood = data.load(name, size=50)
    data.check_compatible(id_test, ood)
    moved = ood.with_stats(id_test.mean, id_test.std)
    assert moved.mean == id_test.mean and ood.mean != id_test.mean


@pytest.mark.parametrize("name", ["embedded/gaussian_noise", "embedded/uniform_noise",
                                  "embedded/fashion_mnist_noise"])
def test_generated_sets_reproducible_from_seed(name):
  a, b, c = data.load(name, seed=5), data.load(name, seed=5), data.load(name, seed=6)
  assert len(a) == 3000 and a.images.dtype == np.uint8 and a.images.shape[1:] == (28, 28, 1)
  np.testing.assert_array_equal(a.images, b.images)
  assert not np.array_equal(a.images, c.images)
  np.testing.assert_array_equal(a.labels, -1)
  assert len(data.load(name, size=17)) == 17


def test_uniform_noise_distribution():
  x = data.load("embedded/uniform_noise", size=2000).images.ravel().astype(np.float64)
  # round(255 U) is uniform on {1..254} with half weight on 0 and 255: mean 127.5.
  assert abs(x.mean() / 255 - 0.5) < 2e-3
  assert abs(x.std() / 255 - np.sqrt(1 / 12)) < 2e-3
  counts = np.bincount(x.astype(int), minlength=256)
  assert stats.chisquare(counts[1:255]).pvalue > 1e-4


def test_gaussian_noise_distribution():
  x = data.load("embedded/gaussian_noise", size=2000).images.ravel()
  # Clipped N(0.5, 1): P(0) = Phi((0.5/255 - 0.5) / 1), and symmetrically for 255.
  p_edge = stats.norm.cdf(0.5 / 255 - 0.5)
  assert abs(np.mean(x == 0) - p_edge) < 3e-3
  assert abs(np.mean(x == 255) - p_edge) < 3e-3
  assert abs(x.mean() / 255 - 0.5) < 3e-3
  # Between the edges the density is nearly flat (the normal is wide), ~0.38/254 per level.
  inner = np.bincount(x[(x > 0) & (x < 255)], minlength=255)[1:]
  assert inner.max() < 1.2 * inner.mean()


def test_fashion_mnist_noise_is_test_plus_uniform_noise():
  clean = data.load("embedded/fashion_mnist").images.astype(np.int64)
  noisy = data.load("embedded/fashion_mnist_noise", seed=2).images.astype(np.int64)
  assert np.all(noisy >= clean)  # noise is non-negative
  dark = clean == 0
  # On black pixels the result is the noise itself, U(0, 1) quantised: mean 127.5.
  assert abs(noisy[dark].mean() - 127.5) < 1.5
  # On pixels of value v the result is min(1, v/255 + U): P(saturated) = v/255.
  bright = clean == 204
  assert abs(np.mean(noisy[bright] == 255) - 0.8) < 0.03


def test_unknown_names_and_splits():
  with pytest.raises(ValueError, match="embedded/fashion_mnist"):
    data.load("embedded/cifar10")
  with pytest.raises(ValueError, match="splits"):
    data.load("embedded/fashion_mnist", "validation")
  with pytest.raises(ValueError, match="single split"):
    data.load("embedded/digits", "train")


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned",))


def test_safe_unpickler_loads_arrays():
  for arr in (np.arange(12, dtype=np.uint8).reshape(3, 4), np.array([1.5, -2.0])):
    for protocol in (2, 4, 5):
      np.testing.assert_array_equal(load_numpy_pickle(pickle.dumps(arr, protocol=protocol)), arr)


@pytest.mark.parametrize("payload", [
    pickle.dumps(_Evil()),
    pickle.dumps([np.zeros(2), _Evil()]),
    b"cos\nsystem\n(S'echo pwned'\ntR.",  # hand-written protocol-0 os.system call
    pickle.dumps(np.array([{"a": 1}], dtype=object)),
    pickle.dumps({"not": "an array"}),
])
def test_safe_unpickler_rejects(payload, capfd):
  with pytest.raises(pickle.UnpicklingError):
    load_numpy_pickle(io.BytesIO(payload))
  assert "pwned" not in capfd.readouterr().out


def test_embedded_files_fit_budget():
  folder = os.path.join(ROOT, "oodjax", "data", "embedded")
  total = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
  assert total < 12e6
  assert os.path.isfile(os.path.join(folder, "LICENSES.md"))


@pytest.mark.slow
def test_provenance_script_regenerates_identical_bytes():
  script = os.path.join(ROOT, "scripts", "make_embedded_data.py")
  res = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True,
                       timeout=600)
  assert res.returncode == 0, res.stdout + res.stderr
  assert "all files identical" in res.stdout


def test_noise_sets_at_cifar_size():
  uniform = data.load("embedded/uniform_noise:32x32x3", size=400, seed=1)
  assert uniform.images.shape == (400, 32, 32, 3) and uniform.images.dtype == np.uint8
  x = uniform.images / 255.0
  assert abs(x.mean() - 0.5) < 0.01 and abs(x.std() - np.sqrt(1 / 12)) < 0.01
  gauss = data.load("embedded/gaussian_noise:32x32x3", size=400, seed=1)
  # N(0.5, 1) clipped to [0, 1]: P(x <= 0) = Phi(-0.5) ~ 0.3085 of the pixels sit at 0.
  assert abs(np.mean(gauss.images == 0) - stats.norm.cdf(-0.5)) < 0.01
  np.testing.assert_array_equal(
      data.load("embedded/uniform_noise:32x32x3", size=5, seed=1).images, uniform.images[:5])
  for bad in ("embedded/uniform_noise:32x32", "embedded/uniform_noise:32x32x2",
              "embedded/fashion_mnist_noise:32x32x3"):
    with pytest.raises(ValueError):
      data.load(bad, size=4)
