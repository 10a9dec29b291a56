"""`oodjax data prepare` end to end: stock TFDS builders, TensorFlow, array_record, read back.

The stock `mnist` and `fashion_mnist` builders prepare full-size (60,000 + 10,000 examples)
IDX archives that the test writes into a manual directory, through `oodjax.data.prepare.prepare`
and the `oodjax data prepare` command; TensorFlow encodes every image as PNG (their `Image`
feature). The result is then read back with `oodjax.data.load`, in this process and in a fresh
one that never imports TensorFlow, and compared pixel for pixel with what was written.

TFDS checks a manually supplied archive against the sha256 it registers for the archive's URL,
which a fabricated archive cannot match. The test replaces only that registry (the builder
class's `url_infos`) with the sizes and digests of its own archives: the file names the builder
expects, the checksum validation itself, the extraction and the builder's parsing all run as
shipped, and `test_prepare_rejects_an_archive_that_fails_its_checksum` shows the validation is
live.

Needs TensorFlow (`pip install 'oodjax[prepare]'`); skipped without it. About a minute on 2
cores.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

import oodjax
import oodjax.data as data
from oodjax import cli
from oodjax.data import prepare as prep
from oodjax.data.tfds_sources import find_prepared

pytestmark = pytest.mark.slow

# The archives of the IDX format (LeCun et al.), as the builders' URLs name them.
SPLIT_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
               "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
SPLIT_SIZES = {"train": 60_000, "test": 10_000}  # the builders read exactly these counts
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")  # Xiao et al. 2017


def _fabricated_split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Random 28x28 images whose first three pixels spell the example's index, random labels."""
  images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
  index = np.arange(n)
  images[:, 0, :3] = np.stack([index % 256, index // 256 % 256, index // 65536], -1)  # [N, 3]
  return images, rng.integers(0, 10, n, dtype=np.uint8)


def _index_of(images: np.ndarray) -> np.ndarray:
  """[N] the example index spelled by the first three pixels of images [N, 28, 28, 1]."""
  first = images[:, 0, :3, 0].astype(np.int64)  # [N, 3]
  return first[:, 0] + 256 * first[:, 1] + 65536 * first[:, 2]


def _write_idx(folder, split: str, images: np.ndarray, labels: np.ndarray) -> None:
  """Writes the gzipped IDX files: big-endian magic number and sizes, then the raw bytes."""
  image_file, label_file = SPLIT_FILES[split]
  n = len(images)
  with gzip.open(folder / image_file, "wb", compresslevel=1) as f:
    f.write(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
  with gzip.open(folder / label_file, "wb", compresslevel=1) as f:
    f.write(struct.pack(">II", 0x801, n) + labels.tobytes())


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
  """(manual_dir, {split: (images [N, 28, 28] uint8, labels [N] uint8)}) in IDX archives."""
  pytest.importorskip("tensorflow")  # here, so collecting the default suite never imports it
  manual_dir = tmp_path_factory.mktemp("manual")
  rng = np.random.default_rng(12)
  written = {}
  for split, n in SPLIT_SIZES.items():
    written[split] = _fabricated_split(n, rng)
    _write_idx(manual_dir, split, *written[split])
  return manual_dir, written


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
  """A download TFDS starts fails at once (offline it would retry for minutes)."""
  from tensorflow_datasets.core.download.download_manager import DownloadManager

  def refuse(self, resource):
    raise AssertionError(f"TFDS tried to download {resource.url}")

  monkeypatch.setattr(DownloadManager, "_download", refuse)


def _accept_archives(monkeypatch, name: str, manual_dir) -> None:
  """Registers the sizes and sha256 digests of the archives in `manual_dir` for builder `name`.

  Every URL the builder registers must have its file in `manual_dir`, or TFDS would download it.
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.download.checksums import UrlInfo
  builder_cls = tfds.builder_cls(name)
  registered = builder_cls.url_infos
  ours = {}
  for url, info in registered.items():
    path = manual_dir / info.filename
    assert path.is_file(), f"{name} expects {info.filename} (from {url})"
    content = path.read_bytes()
    ours[url] = UrlInfo(size=len(content),
                        checksum=hashlib.sha256(content).hexdigest(), filename=info.filename)
  assert sorted(i.filename for i in ours.values()) == sorted(sum(SPLIT_FILES.values(), ()))
  monkeypatch.setattr(builder_cls, "url_infos", ours)


def _assert_read_back(ds, written, name: str) -> None:
  """`ds` holds exactly the written examples (in TFDS's shuffled order), labels with them."""
  images, labels = written
  assert ds.name == name
  assert ds.images.shape == images.shape + (1,) and ds.images.dtype == np.uint8
  index = _index_of(ds.images)
  np.testing.assert_array_equal(np.sort(index), np.arange(len(images)))  # each example once
  np.testing.assert_array_equal(ds.images[..., 0], images[index])
  np.testing.assert_array_equal(ds.labels, labels[index].astype(np.int32))


# Run in a fresh interpreter: load the test split and save it, then report whether anything
# imported TensorFlow (TFDS's own modules, tensorflow_datasets.*, are expected).
_READ_WITHOUT_TF = """
import sys
import numpy as np
import oodjax.data as data
ds = data.load(sys.argv[1], "test", data_dir=sys.argv[2])
np.savez(sys.argv[3], images=ds.images, labels=ds.labels)
tf_modules = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
print("TF_MODULES", len(tf_modules), tf_modules[:3])
"""


def test_prepare_stock_mnist_then_read_back(archives, tmp_path, monkeypatch):
  manual_dir, written = archives
  _accept_archives(monkeypatch, "mnist", manual_dir)
  data_dir = str(tmp_path / "tfds")
  version_dir = prep.prepare("mnist", data_dir=data_dir, manual_dir=str(manual_dir))

  assert version_dir == find_prepared("mnist", data_dir)
  assert any(".array_record-" in f for f in os.listdir(version_dir))  # not tfrecord
  assert prep.list_prepared(data_dir) == {"mnist": version_dir}
  assert f"tfds/mnist  (prepared: {version_dir})" in prep.describe(data_dir)
  loaded = {split: data.load("tfds/mnist", split, data_dir=data_dir) for split in written}
  for split, ds in loaded.items():
    _assert_read_back(ds, written[split], "tfds/mnist")
    assert ds.class_names == tuple(str(k) for k in range(10))

  out = tmp_path / "read.npz"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(oodjax.__file__))  # this oodjax, wherever pytest runs
  done = subprocess.run([sys.executable, "-c", _READ_WITHOUT_TF, "tfds/mnist", data_dir,
                         str(out)], cwd=root, env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "TF_MODULES 0 []" in done.stdout.splitlines(), done.stdout[-3000:]
  with np.load(out) as fresh:
    np.testing.assert_array_equal(fresh["images"], loaded["test"].images)
    np.testing.assert_array_equal(fresh["labels"], loaded["test"].labels)


def test_cli_prepares_stock_fashion_mnist(archives, tmp_path, monkeypatch, capsys):
  manual_dir, written = archives
  _accept_archives(monkeypatch, "fashion_mnist", manual_dir)
  data_dir = str(tmp_path / "tfds")
  assert cli.main(["data", "prepare", "fashion_mnist", "--data-dir", data_dir,
                   "--manual-dir", str(manual_dir)]) == 0
  version_dir = find_prepared("fashion_mnist", data_dir)
  assert version_dir is not None
  capsys.readouterr()
  assert cli.main(["data", "list", "--data-dir", data_dir]) == 0
  assert f"tfds/fashion_mnist  (prepared: {version_dir})" in capsys.readouterr().out
  ds = data.load("tfds/fashion_mnist", "test", data_dir=data_dir)
  _assert_read_back(ds, written["test"], "tfds/fashion_mnist")
  assert ds.class_names == FASHION_CLASSES


def test_prepare_rejects_an_archive_that_fails_its_checksum(archives, tmp_path, monkeypatch):
  from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError
  manual_dir, _ = archives
  _accept_archives(monkeypatch, "mnist", manual_dir)
  tampered = tmp_path / "manual"
  shutil.copytree(manual_dir, tampered)
  labels_file = tampered / SPLIT_FILES["test"][1]
  content = bytearray(labels_file.read_bytes())
  content[-1] ^= 1  # the gzip trailer's last byte: same size, another digest
  labels_file.write_bytes(bytes(content))
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(NonMatchingChecksumError, match=SPLIT_FILES["test"][1]):
    prep.prepare("mnist", data_dir=data_dir, manual_dir=str(tampered))
  assert find_prepared("mnist", data_dir) is None
