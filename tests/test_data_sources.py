"""TFDS array_record reading, the fast not-prepared failure, prepare's error path, folders."""
from __future__ import annotations

import io
import json
import os
import time

import numpy as np
import pytest

import oodjax.data as data
from oodjax.data import prepare as prep


def test_unprepared_tfds_fails_fast_with_instructions(tmp_path):
  for name in ("tfds/cifar10", "tfds/mnist", "tfds/cifar100:coarse"):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="oodjax data prepare") as err:
      data.load(name, data_dir=str(tmp_path))
    assert time.perf_counter() - start < 5
    assert "oodjax[prepare]" in str(err.value)
  # An interrupted preparation (TFDS's incomplete.* directory) is not prepared data.
  (tmp_path / "mnist" / "incomplete.abc_3.0.1").mkdir(parents=True)
  with pytest.raises(FileNotFoundError):
    data.load("tfds/mnist", data_dir=str(tmp_path))


def _png(a):
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="PNG")
  return buf.getvalue()


def _images(n, shape, offset):
  return [np.full(shape, (7 * i + offset) % 256, np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """Prepares two tiny array_record datasets the way a real preparation lays them out."""
  import tensorflow_datasets as tfds
  root = str(tmp_path_factory.mktemp("tfds"))

  class FakeCifar100(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = "cifar100"  # published statistics and the :coarse label suffix apply
    VERSION = tfds.core.Version("3.0.2")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(32, 32, 3)),
          "label": tfds.features.ClassLabel(names=[f"fine{i}" for i in range(5)]),
          "coarse_label": tfds.features.ClassLabel(names=["c0", "c1"])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(8, 0), "test": self._generate_examples(6, 100)}

    def _generate_examples(self, n, offset):
      for i, img in enumerate(_images(n, (32, 32, 3), offset)):
        # Pre-encoded PNG bytes: encoding numpy arrays would need TensorFlow.
        yield i, {"image": _png(img), "label": i % 5, "coarse_label": i % 2}

  class Strokes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = "strokes"  # no published statistics: they come from the train split
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Tensor(shape=(5, 5), dtype=np.uint8)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(4, 0), "test": self._generate_examples(3, 50)}

    def _generate_examples(self, n, offset):
      for i, img in enumerate(_images(n, (5, 5), offset)):
        yield i, {"image": img}

  for cls in (FakeCifar100, Strokes):
    cls(data_dir=root, file_format="array_record").download_and_prepare()
  return root


def test_tfds_reads_array_record(tfds_dir):
  ds = data.load("tfds/cifar100", "test", data_dir=tfds_dir)
  assert ds.images.shape == (6, 32, 32, 3) and ds.images.dtype == np.uint8
  # TFDS stores examples in a hashed order; the pixel value says which example each one is.
  index = (ds.images[:, 0, 0, 0].astype(int) - 100) // 7
  np.testing.assert_array_equal(np.sort(index), np.arange(6))
  np.testing.assert_array_equal(ds.labels, index % 5)
  assert ds.class_names == tuple(f"fine{i}" for i in range(5))
  assert ds.mean == (0.5071, 0.4865, 0.4409)  # the published CIFAR-100 values
  coarse = data.load("tfds/cifar100:coarse", "test", data_dir=tfds_dir)
  np.testing.assert_array_equal(coarse.labels, index % 2)
  assert coarse.class_names == ("c0", "c1")
  assert len(data.load("tfds/cifar100", "train", data_dir=tfds_dir, size=3)) == 3
  with pytest.raises(ValueError, match="splits"):
    data.load("tfds/cifar100", "validation", data_dir=tfds_dir)
  with pytest.raises(ValueError, match="label set"):
    data.load("tfds/cifar100:medium", data_dir=tfds_dir)


def test_tfds_unlabelled_set_gets_train_statistics(tfds_dir):
  ds = data.load("tfds/strokes", "test", data_dir=tfds_dir)
  assert ds.images.shape == (3, 5, 5, 1)
  np.testing.assert_array_equal(ds.labels, -1)
  train = np.array([(7 * i) % 256 for i in range(4)]) / 255.0  # constant images
  np.testing.assert_allclose(ds.mean, [train.mean()])
  np.testing.assert_allclose(ds.std, [train.std()])


def test_tfds_rejects_tfrecord_preparations(tmp_path):
  version = tmp_path / "mnist" / "3.0.1"
  version.mkdir(parents=True)
  (version / "dataset_info.json").write_text(json.dumps({"fileFormat": "tfrecord"}))
  with pytest.raises(ValueError, match="array_record"):
    data.load("tfds/mnist", data_dir=str(tmp_path))


def test_list_prepared_and_describe(tfds_dir):
  found = prep.list_prepared(tfds_dir)
  assert set(found) == {"cifar100", "strokes"}
  assert found["cifar100"].endswith(os.path.join("cifar100", "3.0.2"))
  text = prep.describe(tfds_dir)
  assert "embedded/textures" in text and "tfds/strokes" in text
  assert "oodjax data prepare cifar10" in text


def test_prepare_without_tensorflow_says_how_to_install(tmp_path):
  import importlib.util
  if importlib.util.find_spec("tensorflow") is not None:  # found, not imported
    pytest.skip("TensorFlow is installed; the error path cannot be reached")
  with pytest.raises(ImportError, match=r"pip install 'oodjax\[prepare\]'"):
    prep.prepare("cifar10", data_dir=str(tmp_path))


def _write_images(folder, sizes):
  from PIL import Image
  rng = np.random.default_rng(0)
  arrays = []
  for i, (h, w) in enumerate(sizes):
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(a).save(folder / f"img{i:02d}.png")
    arrays.append(a)
  return arrays


def test_folder_crop_and_resize(tmp_path):
  arrays = _write_images(tmp_path, [(40, 50), (64, 64), (32, 32)])
  (tmp_path / "notes.txt").write_text("not an image")
  centre = data.load(f"folder/{tmp_path}", mode="crop", crop="center")
  assert centre.images.shape == (3, 32, 32, 3) and centre.name.startswith("folder/")
  np.testing.assert_array_equal(centre.images[0], arrays[0][4:36, 9:41])
  np.testing.assert_array_equal(centre.images[2], arrays[2])  # already 32x32: unchanged
  np.testing.assert_array_equal(centre.labels, -1)
  rand_a = data.load(f"folder/{tmp_path}", mode="crop", seed=1)
  rand_b = data.load(f"folder/{tmp_path}", mode="crop", seed=1)
  np.testing.assert_array_equal(rand_a.images, rand_b.images)
  # Every random crop is a window of its source image.
  src = arrays[1]
  assert any(np.array_equal(rand_a.images[1], src[y:y + 32, x:x + 32])
             for y in range(33) for x in range(33))
  resized = data.load(f"folder/{tmp_path}", mode="resize")
  np.testing.assert_array_equal(resized.images[2], arrays[2])
  # 64 -> 32 bilinear averages over the footprint: close to a 2x2 block mean.
  block = arrays[1].reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
  assert np.abs(resized.images[1] - block).mean() < 20
  gray = data.load(f"folder/{tmp_path}", channels=1, image_size=16)
  assert gray.images.shape == (3, 16, 16, 1) and len(gray.mean) == 1


def test_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    data.load(f"folder/{tmp_path}/missing")
  with pytest.raises(ValueError, match="no image files"):
    data.load(f"folder/{tmp_path}")
  with pytest.raises(ValueError, match="mode"):
    data.load(f"folder/{tmp_path}", mode="zoom")
  with pytest.raises(ValueError, match="only to folder"):
    data.load("embedded/digits", mode="crop")


def test_resize_dataset_for_mismatched_pairs():
  ood = data.load("embedded/digits", size=4)
  rgb32 = data.resize_dataset(ood, 32, channels=3)
  assert rgb32.images.shape == (4, 32, 32, 3) and len(rgb32.mean) == 3
  np.testing.assert_array_equal(rgb32.images[..., 0], rgb32.images[..., 2])  # gray in RGB


def test_folder_bad_files_are_an_error_or_skipped(tmp_path):
  _write_images(tmp_path, [(32, 32), (40, 40), (32, 48)])
  (tmp_path / "broken.png").write_bytes(b"this is no png")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 10)
  with pytest.raises(ValueError, match=r"2 of 5 image files .*broken\.png.*other 3 were fine"):
    data.load(f"folder/{tmp_path}")
  with pytest.warns(UserWarning, match=r"skipped 2 of 5 .*broken\.png.*3 loaded"):
    ds = data.load(f"folder/{tmp_path}", skip_bad=True)
  assert ds.images.shape == (3, 32, 32, 3) and len(ds.labels) == 3
  only_bad = tmp_path / "sub"
  with pytest.raises(ValueError, match="none of the 1 image files"):
    data.load(f"folder/{only_bad}", skip_bad=True)


def test_folder_converts_every_pillow_mode(tmp_path):
  from PIL import Image
  grey = np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) % 256
  Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "a_l.png")
  Image.fromarray(grey.astype(np.uint8)).convert("LA").save(tmp_path / "b_la.png")
  rgba = np.dstack([grey, grey, grey, np.full_like(grey, 7)]).astype(np.uint8)
  Image.fromarray(rgba).save(tmp_path / "c_rgba.png")
  Image.fromarray(grey.astype(np.uint8)).convert("P").save(tmp_path / "d_p.png")
  palette = Image.fromarray(grey.astype(np.uint8)).convert("P")
  palette.info["transparency"] = 0
  palette.save(tmp_path / "e_ptrans.png", transparency=0)
  wide = Image.fromarray((grey * 257).astype(np.uint16))
  assert wide.mode.startswith("I;16")
  wide.save(tmp_path / "f_i16.png")
  rgb = data.load(f"folder/{tmp_path}", mode="crop", crop="center")
  assert rgb.images.shape == (6, 32, 32, 3)
  for i in range(6):  # every file holds the same grey ramp: R = G = B = the ramp
    np.testing.assert_array_equal(rgb.images[i], np.repeat(grey[..., None], 3, -1),
                                  err_msg=str(i))
  gray = data.load(f"folder/{tmp_path}", mode="crop", crop="center", channels=1)
  for i in range(6):
    np.testing.assert_array_equal(gray.images[i, ..., 0], grey, err_msg=str(i))


def test_folder_result_does_not_depend_on_workers(tmp_path):
  _write_images(tmp_path, [(40 + i, 50) for i in range(12)])
  one = data.load(f"folder/{tmp_path}", mode="crop", seed=3, workers=1, progress=True)
  many = data.load(f"folder/{tmp_path}", mode="crop", seed=3, workers=4)
  np.testing.assert_array_equal(one.images, many.images)
  other_seed = data.load(f"folder/{tmp_path}", mode="crop", seed=4, workers=4)
  assert not np.array_equal(one.images, other_seed.images)
