"""Unlabelled OOD sets read from a folder of image files (ODIN's TinyImageNet, LSUN, iSUN).

ODIN (Liang et al. 2018, Sec. 4.2) builds its natural-image OOD sets from test images in two
ways: "crop" takes a random 32x32 patch of each image and "resize" downsamples the whole image
to 32x32. `load_folder` does either, so the sets can be rebuilt from the original images; the
files ODIN published are already 32x32, for which both modes return the images unchanged.
"""
from __future__ import annotations

import os

import numpy as np

from oodjax.data.core import ImageDataset, channel_stats

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_folder(path: str, *, mode: str = "resize", crop: str = "random", image_size: int = 32,
                channels: int = 3, seed: int = 0, size: int | None = None) -> ImageDataset:
  """Reads every image under `path` (recursively, in sorted path order) into an unlabelled set.

  Args:
    path: a directory of image files.
    mode: "resize" shrinks (or enlarges) each image to image_size x image_size with PIL's
      bilinear filter (which averages over the footprint when shrinking); "crop" cuts an
      image_size x image_size patch, first enlarging an image whose short side is smaller.
    crop: "random" (positions drawn from `seed`, as ODIN) or "center"; used by mode="crop".
    image_size: output height and width.
    channels: 3 (RGB) or 1 (grayscale, PIL's "L" conversion).
    seed: seeds the random crops.
    size: read only the first `size` files.

  Returns:
    images [N, image_size, image_size, channels] uint8, labels [N] = -1, statistics of the set.
  """
  from PIL import Image  # pillow comes with matplotlib; imported here to keep import cheap

  if mode not in ("resize", "crop") or crop not in ("random", "center"):
    raise ValueError(f"mode must be 'resize' or 'crop' and crop 'random' or 'center', "
                     f"got mode={mode!r}, crop={crop!r}")
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels}")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"image folder {path!r} does not exist")
  files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  if size is not None:
    files = files[:size]
  if not files:
    raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {path!r}")
  rng = np.random.default_rng(seed)
  out = np.empty((len(files), image_size, image_size, channels), np.uint8)
  for i, file in enumerate(files):
    with Image.open(file) as img:
      img = img.convert("RGB" if channels == 3 else "L")
      if mode == "resize":
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
      else:
        img = _crop(img, image_size, crop, rng)
      out[i] = np.asarray(img).reshape(image_size, image_size, channels)
  mean, std = channel_stats(out)
  name = f"folder/{path}"
  return ImageDataset(out, np.full((len(files),), -1, np.int32), mean, std, (), name)


def _crop(img, image_size: int, crop: str, rng: np.random.Generator):
  from PIL import Image
  w, h = img.size
  if min(w, h) < image_size:  # too small to cut a patch from: enlarge the short side first
    scale = image_size / min(w, h)
    w, h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    img = img.resize((w, h), Image.Resampling.BILINEAR)
  if crop == "random":
    left, top = int(rng.integers(0, w - image_size + 1)), int(rng.integers(0, h - image_size + 1))
  else:
    left, top = (w - image_size) // 2, (h - image_size) // 2
  return img.crop((left, top, left + image_size, top + image_size))


def resize_dataset(dataset: ImageDataset, image_size: int, *, channels: int | None = None
                   ) -> ImageDataset:
  """Resizes every image (PIL bilinear) and optionally converts RGB <-> grayscale.

  For pairing sets of different shapes, e.g. Omniglot (105x105x3) as OOD for MNIST (28x28x1).
  The statistics are recomputed from the converted images.

  Args:
    dataset: images [N, H, W, C] uint8.
    image_size: output height and width.
    channels: 1 or 3; None keeps C.
  """
  from PIL import Image
  channels = channels or dataset.images.shape[-1]
  mode = "RGB" if channels == 3 else "L"
  out = np.empty((len(dataset), image_size, image_size, channels), np.uint8)
  for i, x in enumerate(dataset.images):
    img = Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).convert(mode)
    img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    out[i] = np.asarray(img).reshape(image_size, image_size, channels)
  mean, std = channel_stats(out)
  return ImageDataset(out, dataset.labels, mean, std, dataset.class_names, dataset.name)
