"""Regenerates the vendored datasets in oodjax/data/embedded/ from installed packages.

    python scripts/make_embedded_data.py            # rewrite oodjax/data/embedded/*.npz
    python scripts/make_embedded_data.py --check    # rebuild into a temp dir, compare bytes
    python scripts/make_embedded_data.py --out DIR  # write elsewhere

Sources (all installed locally, nothing is downloaded):
  * Fashion-MNIST: Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist,
    IDX files, MIT). Train: the first 2,000 images of each class in the original train order
    (20,000). Test: the first 300 of each class in the original test order (3,000).
  * Animal-MNIST: PyPI `animal-mnist` 0.4 (MIT), gzipped pickles of uint8 [10000, 28, 28]
    images and int64 labels 0..9 (1,000 each), read with a numpy-only unpickler. All kept.
  * Digits: scikit-learn `load_digits` (1,797 8x8 images, values 0..16), scaled to 0..255 and
    upsampled to 28x28 by bilinear interpolation with half-pixel centres (the convention of
    PIL and `jax.image.resize`), written out in numpy so it does not depend on a resize library.
  * Textures: scikit-image `brick`, `grass`, `gravel` (512x512 grayscale, CC0). 56x56 windows on a
    fixed grid (stride 18, 26x26 positions per texture, 2,028 crops in all), each 2x2
    mean-pooled to 28x28 so a crop shows several texture elements, as a texture patch should.

The .npz files are zip archives that we write ourselves: every member gets the same fixed
timestamp and the LZMA compressor (np.load reads any member zipfile can; LZMA is about 15%
smaller than deflate here), so two runs with the same numpy/liblzma give identical bytes.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import os
import struct
import sys
import tempfile
import zipfile

import numpy as np

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
# Label order of animal-mnist 0.4: its README lists the classes alphabetically and the images
# of labels 0..9 are, on inspection, bears, birds, cats, ... zebras in that order.
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep",
                  "zebra")
TEXTURES = ("brick", "grass", "gravel")
TRAIN_PER_CLASS = 2000
TEST_PER_CLASS = 300
TEXTURE_WINDOW, TEXTURE_STRIDE, TEXTURE_GRID = 56, 18, 26
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def read_idx(path: str) -> np.ndarray:
  """Reads a gzipped IDX file (the MNIST format: magic, dims as big-endian uint32, uint8 data)."""
  with gzip.open(path, "rb") as f:
    raw = f.read()
  zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
  if zero != 0 or dtype_code != 0x08:
    raise ValueError(f"{path}: not an unsigned-byte IDX file")
  dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
  """Positions of the first `per_class` examples of each class, in the original order."""
  picks = [np.flatnonzero(labels == k)[:per_class] for k in np.unique(labels)]
  if any(len(p) < per_class for p in picks):
    raise ValueError(f"some class has fewer than {per_class} examples")
  return np.sort(np.concatenate(picks))


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of uint8 [N, H, W, C] images on the [0, 1] scale, in float64."""
  x = images.astype(np.float64) / 255.0
  return x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))


def fashion_mnist() -> dict[str, np.ndarray]:
  out = {}
  for split, prefix, per_class in (("train", "train", TRAIN_PER_CLASS),
                                   ("test", "t10k", TEST_PER_CLASS)):
    images = read_idx(os.path.join(FASHION_DIR, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(FASHION_DIR, f"{prefix}-labels-idx1-ubyte.gz"))
    keep = first_per_class(labels, per_class)
    out[f"{split}_images"] = images[keep][..., None]  # [N, 28, 28, 1]
    out[f"{split}_labels"] = labels[keep].astype(np.int32)
    out[f"{split}_source_index"] = keep.astype(np.int32)  # provenance: rows of the original
  out["mean"], out["std"] = channel_stats(out["train_images"])
  out["class_names"] = np.array(FASHION_CLASSES)
  return out


def animal_mnist() -> dict[str, np.ndarray]:
  from oodjax.data.safepickle import load_numpy_pickle
  # find_spec locates the package without importing it (its modules import tensorflow).
  spec = importlib.util.find_spec("animal_mnist")
  data_dir = os.path.join(os.path.dirname(spec.origin), "data", "Animal_MNIST")
  with gzip.open(os.path.join(data_dir, "animal_data_version_3.gz"), "rb") as f:
    images = load_numpy_pickle(f)
  with gzip.open(os.path.join(data_dir, "animal_label_version_3.gz"), "rb") as f:
    labels = load_numpy_pickle(f)
  if images.shape != (10000, 28, 28) or images.dtype != np.uint8:
    raise ValueError(f"unexpected Animal-MNIST images {images.shape} {images.dtype}")
  if sorted(np.unique(labels)) != list(range(10)):
    raise ValueError("unexpected Animal-MNIST labels")
  return {"images": images[..., None], "labels": labels.astype(np.int32),
          "class_names": np.array(ANIMAL_CLASSES)}


def bilinear_resize(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of float [N, h, w] to [N, size, size], half-pixel centres, edge clamping."""
  def weights(n_in):
    centre = (np.arange(size) + 0.5) * (n_in / size) - 0.5  # output centres in input pixels
    centre = np.clip(centre, 0, n_in - 1)
    lo = np.floor(centre).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = centre - lo
    m = np.zeros((size, n_in))
    m[np.arange(size), lo] += 1 - frac
    m[np.arange(size), hi] += frac
    return m  # [size, n_in], rows sum to 1
  wy, wx = weights(images.shape[1]), weights(images.shape[2])
  return np.einsum("yh,nhw,xw->nyx", wy, images, wx)


def digits() -> dict[str, np.ndarray]:
  from sklearn.datasets import load_digits
  d = load_digits()
  x = d.images.astype(np.float64) * (255.0 / 16.0)  # [1797, 8, 8], 0..255
  up = bilinear_resize(x, 28)
  images = np.clip(np.rint(up), 0, 255).astype(np.uint8)[..., None]
  return {"images": images, "labels": d.target.astype(np.int32),
          "class_names": np.array([str(k) for k in range(10)])}


def textures() -> dict[str, np.ndarray]:
  import skimage.data
  crops, labels = [], []
  starts = np.arange(TEXTURE_GRID) * TEXTURE_STRIDE
  for k, name in enumerate(TEXTURES):
    img = getattr(skimage.data, name)().astype(np.float64)  # [512, 512]
    if starts[-1] + TEXTURE_WINDOW > img.shape[0]:
      raise ValueError("texture grid does not fit the image")
    for y in starts:
      for x in starts:
        w = img[y:y + TEXTURE_WINDOW, x:x + TEXTURE_WINDOW]
        crops.append(w.reshape(28, 2, 28, 2).mean(axis=(1, 3)))  # 2x2 mean pooling
        labels.append(k)
  images = np.clip(np.rint(np.stack(crops)), 0, 255).astype(np.uint8)[..., None]
  return {"images": images, "labels": np.array(labels, np.int32),
          "class_names": np.array(TEXTURES)}


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes an .npz that np.load reads, with byte-identical output for identical arrays."""
  with zipfile.ZipFile(path, "w") as zf:
    for key in sorted(arrays):
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
      info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_DATE)
      info.compress_type = zipfile.ZIP_LZMA
      info.external_attr = 0o644 << 16
      zf.writestr(info, buf.getvalue())


BUILDERS = {"fashion_mnist": fashion_mnist, "animal_mnist": animal_mnist, "digits": digits,
            "textures": textures}


def build(out_dir: str) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, make in BUILDERS.items():
    path = os.path.join(out_dir, name + ".npz")
    write_npz(path, make())
    paths.append(path)
  return paths


def main(argv=None) -> int:
  default_out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "oodjax", "data",
                             "embedded")
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=default_out)
  parser.add_argument("--check", action="store_true",
                      help="rebuild into a temporary directory and compare with --out")
  args = parser.parse_args(argv)
  if not args.check:
    for path in build(args.out):
      print(f"{os.path.getsize(path) / 1e6:7.3f} MB  {os.path.normpath(path)}")
    return 0
  with tempfile.TemporaryDirectory() as tmp:
    differ = []
    for path in build(tmp):
      with open(path, "rb") as a, open(os.path.join(args.out, os.path.basename(path)), "rb") as b:
        if a.read() != b.read():
          differ.append(os.path.basename(path))
  print("differ: " + ", ".join(differ) if differ else "all files identical")
  return 1 if differ else 0


if __name__ == "__main__":
  sys.exit(main())
