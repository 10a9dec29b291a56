"""Streaming batches from a random-access source larger than memory (TFDS array_record).

The in-memory path (`oodjax.data.core.batches`) holds a whole `ImageDataset` in host memory.
For ImageNet-scale data this module reads each batch from a random-access source instead:
anything with `__len__` and `__getitem__` returning {"image": [H, W, C] uint8, "label": int},
which is what `tfds.data_source(...)` and `builder.as_data_source(split)` return for data
prepared as array_record (no TensorFlow needed to read it).

Usage:

  import tensorflow_datasets as tfds
  from oodjax.data import streaming

  source = tfds.data_source("imagenet2012", split="train", data_dir="/data/tfds",
                            download=False)
  stream = streaming.stream_batches(source, 256, seed=0, num_epochs=90)
  for batch in stream:  # {"image": [256, H, W, C] uint8, "label": [256] int32}, host numpy
    state = train_step(state, core.place(batch, sharding, 256))  # the caller places it
    meta = {"data": stream.get_state()}  # JSON; saved with the train state
  ...
  stream = streaming.stream_batches(source, 256, seed=0, num_epochs=90,
                                    state=meta["data"])  # resumes at the next batch

`get_state()["step"]` counts the batches this iterator has handed out. Behind a read-ahead
wrapper (`device_input.prefetch`) that is more than the batches trained on: save
`{**stream.get_state(), "step": trained_steps}` instead.

Per process, in a multi-process run: every process opens the same source and asks for the
same global batch size; each yields its own rows of every global batch, which
`oodjax.data.core.place` assembles into global arrays (`jax.make_array_from_process_local_data`;
a process's rows are its devices' rows when the mesh orders devices by process, as
`jax.make_mesh` does):

  stream = streaming.stream_batches(source, 256, seed=0, num_epochs=90,
                                    shard_index=jax.process_index(),
                                    shard_count=jax.process_count())
  # each batch: {"image": [256 // process_count, H, W, C] uint8, ...}

The contract:

  * Order. Global batch k (counting from 0 over all epochs) is batch j = k mod P of epoch
    e = k // P, P the batches per epoch (floor(N / B) with drop_remainder, else ceil(N / B);
    with drop_remainder=False the last batch of each epoch has N mod B rows and no batch mixes
    two epochs). Its records are `order[j * B:(j + 1) * B]` with
    `order = np.random.default_rng([seed, epoch]).permutation(N)` (`np.arange(N)` for
    seed=None): the rule of the in-memory `core.batches`, so both paths give the same batches
    of the same data, and the order depends on nothing but (seed, epoch).
  * Shards. With shard_count S, shard i yields rows [i * b, (i + 1) * b) of every global
    batch, b = rows / S: concatenating the k-th batches of shards 0..S-1 gives exactly the
    single-process k-th batch. Each process reads only its own rows.
  * Resumption. `get_state()` is {"step": k, ...}: the number of batches handed out, with the
    settings that fix the order (seed, global batch size, record count, drop_remainder) so a
    mismatched restore fails instead of silently reading other batches. It holds no shard
    index: every process of a run is at the same global step, so the one dict that process 0
    saves restores every process, under any shard_count and worker_count. Restoring is O(1):
    batch k is computed, not replayed.

Why grain's MapDataset, not its DataLoader: `IndexSampler` + `ShardOptions` shard the *records*
(process i gets a contiguous 1/S of the dataset and shuffles within it), so a process's batch
is not a slice of one global batch, and the shuffle is grain's own. Here the pipeline is
`MapDataset.range(step, stop).map(read global batch `step`'s rows for this shard)`: random
access makes the shard rule and resumption one line of index arithmetic each, and grain adds
what a plain loop lacks: reading batches ahead in threads, or in `worker_count` processes
(`mp_prefetch`; the program then needs an `if __name__ == "__main__":` guard), in order.
The permutation is numpy's rather than grain's `shuffle` so that it is the in-memory path's
and can be checked independently; each process (and worker) holds one epoch's permutation,
[N] int64 (10 MB for ImageNet's 1.28M images).
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Mapping

import numpy as np
from absl import flags


def _grain():
  """grain, imported at the first stream rather than with oodjax.train (it takes ~1 s)."""
  try:
    import grain
  except ImportError as e:  # pragma: no cover - grain is a declared dependency
    raise ImportError("oodjax.data.streaming needs grain: pip install 'grain>=0.2.18,<0.3'"
                      ) from e
  return grain

# What `get_state` saves besides the step: a restore with other values would read other
# batches, so it is refused.
_ORDER_KEYS = ("seed", "batch_size", "num_records", "drop_remainder")


def batches_per_epoch(num_records: int, batch_size: int, drop_remainder: bool) -> int:
  """P: floor(N / B) full batches, or ceil(N / B) with a final partial one."""
  return num_records // batch_size if drop_remainder else -(-num_records // batch_size)


# A memo, not state: the current epoch (and the next near a boundary) of a stream or two.
@functools.lru_cache(maxsize=4)
def epoch_order(num_records: int, seed: int | None, epoch: int) -> np.ndarray:
  """The order of the records in `epoch`: [N] int64, a function of (seed, epoch) only.

  `np.random.default_rng([seed, epoch]).permutation(N)`, as in `core.batches`; `arange(N)` for
  seed=None. Cached, so the returned array is shared: do not modify it.
  """
  if seed is None:
    order = np.arange(num_records)
  else:
    order = np.random.default_rng([seed, epoch]).permutation(num_records)
  order.flags.writeable = False
  return order


def shard_record_indices(step: int, *, num_records: int, batch_size: int, seed: int | None,
                         drop_remainder: bool = True, shard_index: int = 0,
                         shard_count: int = 1) -> np.ndarray:
  """The records of shard `shard_index`'s part of global batch `step`.

  Args:
    step: k, the global batch counted from 0 over all epochs.
    num_records: N.
    batch_size: B, the global batch size (all shards together).
    seed: the shuffle seed; None keeps the source's order.
    drop_remainder: whether epochs have floor(N / B) batches (else ceil, the last partial).
    shard_index, shard_count: i and S; shard i gets rows [i * b, (i + 1) * b), b = rows / S.

  Returns:
    [b] int64 record indices, b = B / S (or the partial batch's rows / S).
  """
  per_epoch = batches_per_epoch(num_records, batch_size, drop_remainder)
  epoch, j = divmod(step, per_epoch)
  rows = epoch_order(num_records, seed, epoch)[j * batch_size:(j + 1) * batch_size]
  b = rows.size // shard_count
  return rows[shard_index * b:(shard_index + 1) * b]


class _ReadBatch:
  """Global step -> this shard's host batch. A picklable callable, for grain's workers."""

  def __init__(self, source, image_key: str, label_key: str, **indexing):
    self.source, self.image_key, self.label_key = source, image_key, label_key
    self.indexing = indexing  # the keyword arguments of shard_record_indices

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    idx = shard_record_indices(int(step), **self.indexing).tolist()
    # TFDS sources read a list of records in one call, much faster than one at a time.
    getitems = getattr(self.source, "__getitems__", None)
    records = getitems(idx) if getitems is not None else [self.source[i] for i in idx]
    return _stack(records, self.image_key, self.label_key)


def _stack(records, image_key: str, label_key: str) -> dict[str, np.ndarray]:
  """Records -> {"image": [b, H, W, C] uint8, "label": [b] int32}; [H, W] images get C = 1."""
  images = np.stack([np.asarray(r[image_key]) for r in records])
  if images.ndim == 3:
    images = images[..., None]  # [b, H, W, 1]
  labels = np.asarray([r[label_key] for r in records], np.int32)
  return {"image": images, "label": labels}


def _check_record(record: Any, image_key: str, label_key: str) -> None:
  """Raises a readable ValueError for a record the batches cannot be built from."""
  if not isinstance(record, Mapping):
    raise ValueError(f"source records must be dicts with {image_key!r} and {label_key!r}, got "
                     f"{type(record).__name__}")
  missing = [k for k in (image_key, label_key) if k not in record]
  if missing:
    raise ValueError(f"source records lack {missing}; they have {sorted(record)} (pick others "
                     "with image_key= / label_key=)")
  image = np.asarray(record[image_key])
  if image.dtype != np.uint8 or image.ndim not in (2, 3):
    raise ValueError(f"source images must be [H, W, C] or [H, W] uint8, got {image.shape} "
                     f"{image.dtype}")
  label = np.asarray(record[label_key])
  if label.shape != () or not np.issubdtype(label.dtype, np.integer):
    raise ValueError(f"source labels must be integer scalars, got {label.shape} {label.dtype}")


class BatchStream:
  """An iterator of host batches with a JSON state; made by `stream_batches`.

  Yields {"image": [b, H, W, C] uint8, "label": [b] int32}, b = B / shard_count, and raises
  StopIteration after `num_epochs` epochs (never for num_epochs=None).
  """

  def __init__(self, source, batch_size: int, *, seed: int | None, shard_index: int,
               shard_count: int, num_epochs: int | None, drop_remainder: bool,
               worker_count: int, prefetch: int, image_key: str, label_key: str):
    self.num_records = len(source)
    self.batch_size, self.seed, self.drop_remainder = batch_size, seed, bool(drop_remainder)
    self.shard_index, self.shard_count = shard_index, shard_count
    self.num_epochs, self.worker_count, self.prefetch = num_epochs, worker_count, prefetch
    self.batches_per_epoch = batches_per_epoch(self.num_records, batch_size, drop_remainder)
    self._read = _ReadBatch(source, image_key, label_key, num_records=self.num_records,
                            batch_size=batch_size, seed=seed, drop_remainder=drop_remainder,
                            shard_index=shard_index, shard_count=shard_count)
    self.step = 0  # global batches handed out so far
    self._iter = None  # grain's iterator from `step` on, made at the first `next`

  @property
  def epoch(self) -> int:
    """The epoch of the next batch."""
    return self.step // self.batches_per_epoch

  @property
  def stop(self) -> int:
    """The global step at which the stream ends (sys.maxsize for num_epochs=None)."""
    return sys.maxsize if self.num_epochs is None else self.num_epochs * self.batches_per_epoch

  def __iter__(self) -> "BatchStream":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.step >= self.stop:
      raise StopIteration
    if self._iter is None:
      self._iter = iter(self._dataset(self.step))
    batch = next(self._iter)
    if self.worker_count:
      # Workers hand batches over in shared memory blocks that live as long as the arrays;
      # ordinary copies may be kept (accumulated, cached) without holding /dev/shm, and the
      # blocks are released at once rather than leaked at interpreter exit.
      batch = {k: np.array(v) for k, v in batch.items()}
    self.step += 1
    return batch

  def _dataset(self, start: int):
    """grain's pipeline for global steps [start, stop): one element per batch, in order."""
    grain = _grain()
    ds = grain.MapDataset.range(start, self.stop).map(self._read)
    if self.worker_count == 0:  # `prefetch` threads each read one batch ahead
      return ds.to_iter_dataset(grain.ReadOptions(num_threads=self.prefetch,
                                                  prefetch_buffer_size=self.prefetch))
    # grain 0.2.18's mp_prefetch reads an absl flag when jax is imported and fails with
    # UnparsedFlagAccessError in a program that does not run under absl.app (google/grain#1355,
    # fixed after 0.2.18 by #1362). Marking flags parsed keeps every default; a program that
    # parses its own absl flags is left alone.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    # Worker w computes steps start + w, start + w + W, ...; grain interleaves them in order.
    in_worker = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return in_worker.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=self.worker_count, per_worker_buffer_size=max(self.prefetch, 1)))

  def get_state(self) -> dict[str, Any]:
    """{"step": batches handed out, "seed", "batch_size", "num_records", "drop_remainder"}:
    plain ints, bools and None, so it survives `json.dumps` / `json.loads`."""
    return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size,
            "num_records": self.num_records, "drop_remainder": self.drop_remainder}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from `state` (a `get_state()` of this or another process's stream).

    Raises:
      ValueError: if the state's seed, batch size, record count or drop_remainder differ from
        this stream's (it would continue a different sequence), or it is malformed.
    """
    missing = [k for k in ("step",) + _ORDER_KEYS if k not in state]
    if missing:
      raise ValueError(f"stream state lacks {missing}: {dict(state)}")
    mine = self.get_state()
    for key in _ORDER_KEYS:
      if state[key] != mine[key]:
        raise ValueError(f"stream state was saved with {key}={state[key]!r} but this stream "
                         f"has {key}={mine[key]!r}; resuming would read other batches")
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
      raise ValueError(f"stream state step must be a non-negative int, got {step!r}")
    self.close()
    self.step = step

  def close(self) -> None:
    """Stops grain's reader threads or worker processes (a later `next` restarts them)."""
    if self._iter is not None:
      self._iter.close()
      self._iter = None

  def __enter__(self) -> "BatchStream":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def stream_batches(source, batch_size: int, *, seed: int | None, shard_index: int = 0,
                   shard_count: int = 1, num_epochs: int | None = None,
                   drop_remainder: bool = True, worker_count: int = 0, prefetch: int = 2,
                   state: Mapping[str, Any] | None = None, image_key: str = "image",
                   label_key: str = "label") -> BatchStream:
  """A deterministic, resumable iterator of this shard's rows of each global batch.

  Args:
    source: random access records, `len(source)` = N and `source[i]` = {"image": [H, W, C]
      (or [H, W]) uint8, "label": int}, e.g. `tfds.data_source(name, split=..., data_dir=...)`.
      Must be picklable for worker_count > 0 (TFDS sources are).
    batch_size: B, the global batch size, over all shards.
    seed: the shuffle seed (an int >= 0); None reads in the source's order every epoch.
    shard_index: i, this process's shard, in [0, shard_count) (`jax.process_index()`).
    shard_count: S, the number of shards (`jax.process_count()`); must divide B.
    num_epochs: passes over the data; None repeats forever.
    drop_remainder: drop each epoch's final partial batch (training wants fixed shapes);
      with False its N mod B rows must divide by S.
    worker_count: grain worker processes computing batches (0: threads of this process).
    prefetch: batches read ahead (threads with worker_count=0, per worker otherwise); 0 reads
      each batch when asked, in this thread.
    state: a `get_state()` to resume from; None starts at the first batch.
    image_key, label_key: the record fields to read, e.g. label_key="coarse_label".

  Returns:
    A `BatchStream` yielding {"image": [B / S, H, W, C] uint8, "label": [B / S] int32} host
    numpy batches (the caller places them on devices), with `get_state` / `set_state`.

  Raises:
    ValueError: for B not divisible by S, a shard index outside [0, S), an empty source or
      (with drop_remainder) one smaller than a batch, a partial batch that cannot be split over
      S shards, records without the image/label fields or of the wrong types, bad seed /
      num_epochs / worker_count / prefetch, or a `state` that does not match these settings.
  """
  # Plain ints (numpy integers accepted), so that the state is JSON.
  batch_size, shard_count, shard_index, seed, num_epochs = (
      _as_int(name, value) for name, value in (
          ("batch_size", batch_size), ("shard_count", shard_count),
          ("shard_index", shard_index), ("seed", seed), ("num_epochs", num_epochs)))
  if batch_size <= 0:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if shard_count <= 0:
    raise ValueError(f"shard_count must be a positive int, got {shard_count!r}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must lie in [0, shard_count) = [0, {shard_count}), got "
                     f"{shard_index!r}")
  if batch_size % shard_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by shard_count {shard_count}: "
                     "each shard yields an equal slice of every global batch")
  if seed is not None and seed < 0:
    raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
  if num_epochs is not None and num_epochs <= 0:
    raise ValueError(f"num_epochs must be a positive int or None (forever), got {num_epochs!r}")
  if worker_count < 0 or prefetch < 0:
    raise ValueError(f"worker_count and prefetch must be >= 0, got {worker_count}, {prefetch}")
  n = len(source)
  if n == 0:
    raise ValueError("the source is empty")
  if drop_remainder and n < batch_size:
    raise ValueError(f"the source has {n} records, fewer than one batch of {batch_size}: with "
                     "drop_remainder=True there would be no batches")
  last = n % batch_size
  if not drop_remainder and last % shard_count:
    raise ValueError(f"the last batch of each epoch has {last} records ({n} % {batch_size}), "
                     f"which cannot be split over {shard_count} shards; pass "
                     "drop_remainder=True or change batch_size")
  _check_record(source[0], image_key, label_key)
  stream = BatchStream(source, batch_size, seed=seed, shard_index=shard_index,
                       shard_count=shard_count, num_epochs=num_epochs,
                       drop_remainder=drop_remainder, worker_count=worker_count,
                       prefetch=prefetch, image_key=image_key, label_key=label_key)
  if state is not None:
    stream.set_state(state)
  return stream


def _as_int(name: str, value) -> int | None:
  """`value` as a Python int (None stays None for seed and num_epochs); ValueError for None
  elsewhere and for floats, strings, bools."""
  if value is None and name in ("seed", "num_epochs"):
    return None
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int, got {value!r}")
  return int(value)


def state_at(step: int, *, seed: int | None, batch_size: int, num_records: int,
             drop_remainder: bool = True) -> dict[str, Any]:
  """The `get_state()` of a stream of these settings that has handed out `step` batches."""
  return {"step": int(step), "seed": seed, "batch_size": int(batch_size),
          "num_records": int(num_records), "drop_remainder": bool(drop_remainder)}


@dataclasses.dataclass(frozen=True)
class StreamedDataset:
  """A training set read batch by batch from a random-access source, never held in memory.

  What `oodjax.train.train_classifier` takes in place of an in-memory `ImageDataset` when the
  data does not fit: it has the same descriptive attributes, and its batches come from
  `stream_batches` (the same order as `core.batches` over the same records).

  Attributes:
    source: random-access records (`source[i]` = {image_key: [H, W, C] uint8, label_key: int}).
    image_shape: (H, W, C) of every record.
    mean, std: per-channel statistics on the [0, 1] scale, for the normalisation.
    class_names: the K class names.
    name: for messages, e.g. "tfds/imagenet2012".
    image_key, label_key: the record fields read.
  """
  source: Any
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  class_names: tuple[str, ...]
  name: str = ""
  image_key: str = "image"
  label_key: str = "label"

  def __len__(self) -> int:
    return len(self.source)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def stream_tfds(spec: str, split: str = "train", *, data_dir: str | None = None,
                mean=None, std=None, stats_sample: int = 10_000) -> StreamedDataset:
  """A prepared TFDS array_record set as a `StreamedDataset` (`tfds/<spec>`'s streamed twin).

  Args:
    spec: the TFDS name, optionally ":coarse"/":fine" for the label set, as in `load`.
    split: a TFDS split.
    data_dir: TFDS data directory; None for TFDS's default.
    mean, std: the normalisation statistics; None takes the published ones
      (`tfds_sources.PUBLISHED_STATS`) or, failing those, `core.channel_stats` of
      `stats_sample` records drawn with seed 0 (all of them if there are fewer).
    stats_sample: see `mean`.

  Raises:
    FileNotFoundError: when the set is not prepared in `data_dir` (at once, no download).
    ValueError: an unknown label suffix, or a set without labels (training needs them).
  """
  import tensorflow_datasets as tfds

  from oodjax.data import core, tfds_sources
  name, _, suffix = spec.partition(":")
  if suffix and suffix not in tfds_sources.LABEL_KEYS:
    raise ValueError(f"tfds/{spec}: unknown label set {suffix!r}; use one of "
                     f"{list(tfds_sources.LABEL_KEYS)}")
  version_dir = tfds_sources.find_prepared(name, data_dir)
  if version_dir is None:
    raise FileNotFoundError(tfds_sources.not_prepared_message(name, data_dir))
  builder = tfds.builder_from_directory(version_dir)
  source = builder.as_data_source(split=split)
  features = builder.info.features
  label_key = tfds_sources.LABEL_KEYS.get(suffix, "label")
  if label_key not in features:
    raise ValueError(f"tfds/{spec} has no {label_key!r} feature: a training set needs labels")
  image_key = "image" if "image" in features else next(
      k for k, v in features.items() if isinstance(v, tfds.features.Image))
  first = np.asarray(source[0][image_key])
  image_shape = first.shape if first.ndim == 3 else first.shape + (1,)
  if mean is None or std is None:
    if name in tfds_sources.PUBLISHED_STATS:
      mean, std = tfds_sources.PUBLISHED_STATS[name]
    else:
      n = len(source)
      picks = np.sort(np.random.default_rng(0).permutation(n)[:stats_sample])
      images = np.stack([np.asarray(source[int(i)][image_key]).reshape(image_shape)
                         for i in picks])
      mean, std = core.channel_stats(images)
  return StreamedDataset(source, tuple(image_shape), tuple(float(m) for m in mean),
                         tuple(float(s) for s in std), tuple(features[label_key].names),
                         f"tfds/{spec}", image_key, label_key)
