"""Unlabelled OOD sets read from a folder of image files (ODIN's TinyImageNet, LSUN, iSUN).

ODIN (Liang et al. 2018, Sec. 4.2) builds its natural-image OOD sets from test images in two
ways: "crop" takes a random 32x32 patch of each image and "resize" downsamples the whole image
to 32x32. `load_folder` does either, so the sets can be rebuilt from the original images; the
files ODIN published are already 32x32, for which both modes return the images unchanged.
"""
from __future__ import annotations

import concurrent.futures
import os
import warnings

import numpy as np
import tqdm

from oodjax.data.core import ImageDataset, channel_stats

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_folder(path: str, *, mode: str = "resize", crop: str = "random", image_size: int = 32,
                channels: int = 3, seed: int = 0, size: int | None = None,
                skip_bad: bool = False, workers: int | None = None,
                progress: bool | None = None) -> ImageDataset:
  """Reads every image under `path` (recursively, in sorted path order) into an unlabelled set.

  Files are decoded by a pool of `workers` threads (Pillow releases the GIL while it decodes and
  resizes), with a progress bar; the result does not depend on the number of workers.

  Args:
    path: a directory of image files.
    mode: "resize" shrinks (or enlarges) each image to image_size x image_size with PIL's
      bilinear filter (which averages over the footprint when shrinking); "crop" cuts an
      image_size x image_size patch, first enlarging an image whose short side is smaller.
    crop: "random" (positions drawn from `seed` and the file's index, as ODIN) or "center";
      used by mode="crop".
    image_size: output height and width.
    channels: 3 (RGB) or 1 (grayscale). Every Pillow mode is converted: grayscale is
      replicated to RGB, palette images are expanded (through RGBA when they carry
      transparency), the alpha channel of RGBA / LA images is dropped (the stored colours are
      kept, not composited), 16-bit and 32-bit integer grayscale is rescaled to 8 bits.
    seed: seeds the random crops.
    size: read only the first `size` files.
    skip_bad: False (default): a file with an image extension that cannot be decoded is an
      error naming it (and how many files were fine); True: such files are skipped, with one
      warning giving their count and the first of them.
    workers: decoding threads (None: one per CPU core, at most 8).
    progress: show a progress bar (None: when stderr is a terminal and there are more than
      1,000 files).

  Returns:
    images [N, image_size, image_size, channels] uint8, labels [N] = -1, statistics of the set.

  Raises:
    FileNotFoundError: `path` is not a directory.
    ValueError: bad options, no image files, an unreadable file (unless `skip_bad`), or no
      readable file at all.
  """
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
  workers = workers or min(8, os.cpu_count() or 1)

  def read(index: int):
    try:
      return _read_image(files[index], mode, crop, image_size, channels, seed, index), None
    except Exception as e:  # pylint: disable=broad-except  # any decoder error is a bad file
      return None, f"{type(e).__name__}: {e}"

  show = progress if progress is not None else (len(files) > 1000 and os.isatty(2))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    results = list(tqdm.tqdm(pool.map(read, range(len(files))), total=len(files),
                             disable=not show, unit="img", desc=f"reading {path}"))
  bad = [(file, err) for file, (_, err) in zip(files, results) if err is not None]
  good = [img for img, err in results if err is None]
  if bad:
    first = f"{bad[0][0]} ({bad[0][1]})"
    if not skip_bad:
      raise ValueError(f"{len(bad)} of {len(files)} image files under {path!r} cannot be read, "
                       f"the first: {first}; the other {len(good)} were fine. Remove them, or "
                       "pass skip_bad=True to skip them with a warning")
    if not good:
      raise ValueError(f"none of the {len(files)} image files under {path!r} can be read; the "
                       f"first: {first}")
    warnings.warn(f"skipped {len(bad)} of {len(files)} image files under {path!r} that cannot "
                  f"be read (the first: {first}); {len(good)} loaded", stacklevel=2)
  out = np.stack(good)  # [N, image_size, image_size, channels]
  mean, std = channel_stats(out)
  name = f"folder/{path}"
  return ImageDataset(out, np.full((len(good),), -1, np.int32), mean, std, (), name)


def _to_8bit(img):
  """A Pillow image in a mode `convert("RGB" / "L")` handles: 16/32-bit integer grayscale is
  rescaled to 8 bits, palette images with transparency go through RGBA."""
  from PIL import Image
  if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
    a = np.asarray(img, np.float64)
    top = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
    return Image.fromarray(np.clip(np.rint(a / top * 255.0), 0, 255).astype(np.uint8), "L")
  if img.mode == "P" and "transparency" in img.info:
    return img.convert("RGBA")
  return img


def _read_image(file: str, mode: str, crop: str, image_size: int, channels: int, seed: int,
                index: int) -> np.ndarray:
  """One file as [image_size, image_size, channels] uint8."""
  from PIL import Image  # pillow comes with matplotlib; imported here to keep import cheap
  with Image.open(file) as img:
    img = _to_8bit(img).convert("RGB" if channels == 3 else "L")
    if mode == "resize":
      img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    else:
      img = _crop(img, image_size, crop, np.random.default_rng([seed, index]))
    return np.asarray(img).reshape(image_size, image_size, channels)


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
