"""The grain streaming path over a TFDS array_record source that TFDS itself writes here.

The reference for every order is plain numpy: the records read one by one with a Python loop
over the source, permuted with `np.random.default_rng([seed, epoch]).permutation(N)` (the rule
the module documents) and cut into batches by hand.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from oodjax.data import core
from oodjax.data import streaming

N, SHAPE, K = 37, (6, 5, 3), 5  # 37 records: 4 full batches of 8 and one of 5


def _written(n=N):
  """What the builder writes: record i has pixel [0, 0, 0] = i and random other pixels."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n,) + SHAPE, dtype=np.uint8)  # [N, H, W, C]
  images[:, 0, 0, 0] = np.arange(n)
  labels = rng.integers(0, K, n)  # [N]
  return images, labels


def _builder_class(tfds):
  class StreamTiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = "stream_tiny"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Tensor(shape=SHAPE, dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=K)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      images, labels = _written()
      for i in range(N):
        yield i, {"image": images[i], "label": int(labels[i])}

  return StreamTiny


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  import tensorflow_datasets as tfds
  root = str(tmp_path_factory.mktemp("tfds"))
  _builder_class(tfds)(data_dir=root, file_format="array_record").download_and_prepare()
  return root


@pytest.fixture(scope="module")
def source(tfds_dir):
  import tensorflow_datasets as tfds
  # Found by name on disk (the builder is not registered); download=False so a mistake fails
  # at once instead of retrying a download.
  return tfds.data_source("stream_tiny", split="train", data_dir=tfds_dir, download=False)


@pytest.fixture(scope="module")
def reference(source):
  """The source read with a plain loop: images [N, H, W, C] uint8, labels [N] int32."""
  records = [source[i] for i in range(len(source))]
  return (np.stack([np.asarray(r["image"]) for r in records]),
          np.array([r["label"] for r in records], np.int32))


def _expected(reference, *, seed, batch_size, epochs, drop_remainder):
  """Plain numpy: each epoch permuted with default_rng([seed, epoch]), cut into batches."""
  images, labels = reference
  out = []
  for epoch in range(epochs):
    order = np.random.default_rng([seed, epoch]).permutation(N)
    stop = N - N % batch_size if drop_remainder else N
    for start in range(0, stop, batch_size):
      idx = order[start:start + batch_size]
      out.append({"image": images[idx], "label": labels[idx]})
  return out


def _assert_same(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g["image"].dtype == np.uint8 and g["label"].dtype == np.int32
    np.testing.assert_array_equal(g["image"], w["image"])
    np.testing.assert_array_equal(g["label"], w["label"])


def _take(stream, n):
  return [next(stream) for _ in range(n)]


def test_source_holds_what_was_written(reference):
  images, labels = reference
  written_images, written_labels = _written()
  ids = images[:, 0, 0, 0]  # TFDS stores the records in a hashed order
  np.testing.assert_array_equal(np.sort(ids), np.arange(N))
  np.testing.assert_array_equal(images, written_images[ids])
  np.testing.assert_array_equal(labels, written_labels[ids])


def test_one_epoch_covers_every_record_once(source):
  written_images, written_labels = _written()
  got = list(streaming.stream_batches(source, 8, seed=1, num_epochs=1, drop_remainder=False))
  assert [b["image"].shape for b in got] == [(8,) + SHAPE] * 4 + [(5,) + SHAPE]
  images = np.concatenate([b["image"] for b in got])
  ids = images[:, 0, 0, 0].astype(int)
  np.testing.assert_array_equal(np.sort(ids), np.arange(N))
  np.testing.assert_array_equal(images, written_images[ids])  # every pixel as written
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in got]), written_labels[ids])
  # drop_remainder: floor(37 / 8) = 4 full batches of distinct records.
  full = list(streaming.stream_batches(source, 8, seed=1, num_epochs=1))
  assert [b["label"].shape for b in full] == [(8,)] * 4
  assert len(np.unique(np.concatenate([b["image"][:, 0, 0, 0] for b in full]))) == 32


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_order_is_the_documented_numpy_permutation(source, reference, drop_remainder):
  got = list(streaming.stream_batches(source, 8, seed=5, num_epochs=3,
                                      drop_remainder=drop_remainder))
  _assert_same(got, _expected(reference, seed=5, batch_size=8, epochs=3,
                              drop_remainder=drop_remainder))


def test_seed_none_reads_in_source_order(source, reference):
  got = list(streaming.stream_batches(source, 10, seed=None, num_epochs=2,
                                      drop_remainder=False, prefetch=0))
  images = np.concatenate([b["image"] for b in got])
  np.testing.assert_array_equal(images, np.concatenate([reference[0]] * 2))


def test_same_seed_same_batches_other_epoch_or_seed_other_order(source):
  def ids(seed):
    stream = streaming.stream_batches(source, 8, seed=seed, num_epochs=2)
    return np.stack([b["image"][:, 0, 0, 0] for b in stream])  # [8 batches, 8]

  np.testing.assert_array_equal(ids(3), ids(3))
  first, second = ids(3)[:4], ids(3)[4:]  # epochs 0 and 1
  assert not np.array_equal(first, second)
  assert not np.array_equal(ids(3), ids(4))
  # An infinite stream is the same sequence, continued.
  forever = streaming.stream_batches(source, 8, seed=3, num_epochs=None)
  np.testing.assert_array_equal(np.stack([b["image"][:, 0, 0, 0] for b in _take(forever, 8)]),
                                ids(3))
  assert next(forever)["image"].shape == (8,) + SHAPE
  forever.close()


def test_same_batches_as_the_in_memory_path(source, reference):
  """`core.batches` over the same records in memory gives the same batches."""
  dataset = core.from_arrays(reference[0], reference[1], class_names=[str(k) for k in range(K)])
  stream = streaming.stream_batches(source, 8, seed=7, num_epochs=2, drop_remainder=False)
  for epoch in range(2):
    for want in core.batches(dataset, 8, seed=7, epoch=epoch, uint8=True):
      got = next(stream)
      np.testing.assert_array_equal(got["image"], np.asarray(want["image"]))
      np.testing.assert_array_equal(got["label"], np.asarray(want["label"]))
  with pytest.raises(StopIteration):
    next(stream)


@pytest.mark.parametrize("shard_count", [2, 4])
def test_shards_concatenate_to_the_global_batch(tfds_dir, source, shard_count):
  import tensorflow_datasets as tfds
  whole = list(streaming.stream_batches(source, 8, seed=2, num_epochs=2))
  shards = [list(streaming.stream_batches(source, 8, seed=2, num_epochs=2, shard_index=i,
                                          shard_count=shard_count))
            for i in range(shard_count)]
  assert all(len(s) == len(whole) for s in shards)
  for k, batch in enumerate(whole):
    for key in ("image", "label"):
      parts = [s[k][key] for s in shards]
      assert all(p.shape[0] == 8 // shard_count for p in parts)
      np.testing.assert_array_equal(np.concatenate(parts), batch[key])
  # A final partial batch (36 % 8 = 4 records) is split too.
  source36 = tfds.data_source("stream_tiny", split="train[:36]", data_dir=tfds_dir,
                              download=False)
  whole = list(streaming.stream_batches(source36, 8, seed=2, num_epochs=1,
                                        drop_remainder=False))
  shards = [list(streaming.stream_batches(source36, 8, seed=2, num_epochs=1,
                                          drop_remainder=False, shard_index=i,
                                          shard_count=shard_count))
            for i in range(shard_count)]
  assert whole[-1]["label"].shape == (4,)
  for k, batch in enumerate(whole):
    np.testing.assert_array_equal(np.concatenate([s[k]["image"] for s in shards]),
                                  batch["image"])


@pytest.mark.parametrize("drop_remainder, ks", [(True, (0, 3, 4, 6)), (False, (2, 5, 9))])
def test_resume_gives_the_remaining_batches(source, drop_remainder, ks):
  """Batches per epoch: 4 with drop_remainder, else 5; k = 4 or 5 is an epoch boundary."""
  kwargs = dict(seed=11, num_epochs=3, drop_remainder=drop_remainder)
  full = list(streaming.stream_batches(source, 8, **kwargs))
  for k in ks:
    stream = streaming.stream_batches(source, 8, **kwargs)
    _take(stream, k)
    state = json.loads(json.dumps(stream.get_state()))
    stream.close()
    assert state["step"] == k
    _assert_same(list(streaming.stream_batches(source, 8, state=state, **kwargs)), full[k:])
  # set_state on a running stream moves it, backwards too.
  stream = streaming.stream_batches(source, 8, **kwargs)
  _take(stream, 7)
  stream.set_state(json.loads(json.dumps({**stream.get_state(), "step": 2})))
  assert stream.epoch == 0
  _assert_same(list(stream), full[2:])


def test_resume_sharded_and_under_another_shard_count(source):
  """The state has no shard index: process 0's dict restores every process, for any S."""
  kwargs = dict(seed=4, num_epochs=2)
  whole = list(streaming.stream_batches(source, 8, **kwargs))
  shard0 = streaming.stream_batches(source, 8, shard_index=0, shard_count=2, **kwargs)
  _take(shard0, 5)  # into the second epoch
  state = json.loads(json.dumps(shard0.get_state()))
  shard0.close()
  for shard_count in (2, 4, 1):
    rest = [list(streaming.stream_batches(source, 8, shard_index=i, shard_count=shard_count,
                                          state=state, **kwargs))
            for i in range(shard_count)]
    for k, batch in enumerate(whole[5:]):
      np.testing.assert_array_equal(np.concatenate([r[k]["image"] for r in rest]),
                                    batch["image"])
    assert all(len(r) == len(whole) - 5 for r in rest)


def test_worker_processes_give_the_same_batches(source):
  kwargs = dict(seed=6, num_epochs=2, drop_remainder=False)
  want = list(streaming.stream_batches(source, 8, **kwargs))
  threads = streaming.stream_batches(source, 8, **kwargs)
  _take(threads, 3)
  state = json.loads(json.dumps(threads.get_state()))
  # Resumed in 2 worker processes (the state does not depend on how batches are read).
  with streaming.stream_batches(source, 8, worker_count=2, state=state, **kwargs) as stream:
    rest = list(stream)
  _assert_same(rest, want[3:])
  assert all(type(b["image"]) is np.ndarray for b in rest)  # not grain's shared memory


def _records(n, image_shape=(4, 4, 3)):
  return [{"image": np.full(image_shape, i, np.uint8), "label": i % 3} for i in range(n)]


def test_any_sequence_of_records_and_2d_images():
  got = list(streaming.stream_batches(_records(6, (4, 4)), 3, seed=None, num_epochs=1))
  assert got[0]["image"].shape == (3, 4, 4, 1)
  np.testing.assert_array_equal(got[1]["label"], [0, 1, 2])
  # numpy integers (a config's seed, a computed batch size) are accepted; the state stays JSON.
  stream = streaming.stream_batches(_records(6), np.int64(2), seed=np.int64(3),
                                    drop_remainder=np.bool_(True))
  next(stream)
  assert json.loads(json.dumps(stream.get_state())) == stream.get_state()


def test_errors(source):
  records = _records(10)
  with pytest.raises(ValueError, match="not divisible by shard_count 3"):
    streaming.stream_batches(records, 8, seed=0, shard_count=3)
  for index in (-1, 2):
    with pytest.raises(ValueError, match=r"shard_index must lie in .* = \[0, 2\)"):
      streaming.stream_batches(records, 8, seed=0, shard_index=index, shard_count=2)
  with pytest.raises(ValueError, match="fewer than one batch"):
    streaming.stream_batches(records, 16, seed=0)
  with pytest.raises(ValueError, match="empty"):
    streaming.stream_batches([], 4, seed=0, drop_remainder=False)
  with pytest.raises(ValueError, match="cannot be split over 4 shards"):
    streaming.stream_batches(records, 8, seed=0, shard_count=4, drop_remainder=False)
  with pytest.raises(ValueError, match=r"lack \['label'\]"):
    streaming.stream_batches([{"image": r["image"]} for r in records], 4, seed=0)
  with pytest.raises(ValueError, match=r"lack \['image'\]"):
    streaming.stream_batches([{"img": r["image"], "label": 0} for r in records], 4, seed=0)
  with pytest.raises(ValueError, match="uint8"):
    streaming.stream_batches([{"image": np.zeros((4, 4, 3)), "label": 0}] * 4, 2, seed=0)
  with pytest.raises(ValueError, match="batch_size must be a positive int"):
    streaming.stream_batches(records, 0, seed=0)
  with pytest.raises(ValueError, match="batch_size must be an int"):
    streaming.stream_batches(records, 2.0, seed=0)
  with pytest.raises(ValueError, match="seed"):
    streaming.stream_batches(records, 2, seed=-1)
  with pytest.raises(ValueError, match="num_epochs"):
    streaming.stream_batches(records, 2, seed=0, num_epochs=0)
  # A state from other settings would continue another sequence.
  state = streaming.stream_batches(source, 8, seed=1).get_state()
  with pytest.raises(ValueError, match="seed=1 but this stream has seed=2"):
    streaming.stream_batches(source, 8, seed=2, state=state)
  with pytest.raises(ValueError, match="batch_size=8 but this stream has batch_size=4"):
    streaming.stream_batches(source, 4, seed=1, state=state)
  with pytest.raises(ValueError, match="num_records=37 but this stream has num_records=10"):
    streaming.stream_batches(records, 8, seed=1, state=state)
  with pytest.raises(ValueError, match="lacks"):
    streaming.stream_batches(source, 8, seed=1, state={"step": 3})
  with pytest.raises(ValueError, match="non-negative int"):
    streaming.stream_batches(source, 8, seed=1, state={**state, "step": -1})


def test_writes_and_streams_without_tensorflow(tmp_path):
  """With TensorFlow made unimportable (CI's `prepare` extra installs it), TFDS still writes
  and reads array_record, and the stream runs; in a fresh interpreter."""
  script = textwrap.dedent(f"""
      import sys

      class HideTensorFlow:  # every finder acts as if TensorFlow were not installed
        def __init__(self, finder):
          self.finder = finder

        def find_spec(self, name, path=None, target=None):
          if name.partition(".")[0] == "tensorflow":
            return None
          return self.finder.find_spec(name, path, target)

        def __getattr__(self, attr):
          return getattr(self.finder, attr)

      sys.meta_path[:] = [HideTensorFlow(f) for f in sys.meta_path]
      import numpy as np
      import tensorflow_datasets as tfds
      sys.path.insert(0, {os.path.dirname(__file__)!r})
      from test_streaming import N, _builder_class
      from oodjax.data import streaming
      builder = _builder_class(tfds)(data_dir={str(tmp_path)!r}, file_format="array_record")
      builder.download_and_prepare()
      batches = list(streaming.stream_batches(builder.as_data_source("train"), 8, seed=0,
                                              num_epochs=1, drop_remainder=False))
      ids = np.concatenate([b["image"][:, 0, 0, 0] for b in batches])
      assert sorted(ids.tolist()) == list(range(N)), ids
      assert "tensorflow" not in sys.modules
      print("ok")
      """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")


# --- training from a stream ----------------------------------------------------------------

def _train(config, workdir, train_ds):
  from oodjax.train import train_classifier
  from train_helpers import TinyNet
  return train_classifier(config, workdir, model=TinyNet(num_classes=K), train_ds=train_ds,
                          progress=False)


def test_training_from_a_stream_equals_training_in_memory_and_resumes(tfds_dir, reference,
                                                                      tmp_path):
  """`train_classifier` on `stream_tfds(...)` reads the same batches as on the set loaded
  into memory, so it ends with the same parameters; its checkpoints carry the iterator state,
  a run resumed from one ends the same, and resuming with other data is refused."""
  import dataclasses
  import shutil

  import jax

  from train_helpers import tiny_config
  streamed = streaming.stream_tfds("stream_tiny", data_dir=tfds_dir)
  images, labels = reference
  assert (streamed.image_shape, streamed.num_classes, len(streamed)) == (SHAPE, K, N)
  np.testing.assert_allclose(streamed.mean, core.channel_stats(images)[0])  # all 37 sampled
  in_memory = core.ImageDataset(images, labels, streamed.mean, streamed.std,
                                streamed.class_names, "in memory")
  config = tiny_config(num_epochs=3, augment=True)  # 4 steps an epoch, checkpoints every 4
  state_s, summary = _train(config, tmp_path / "streamed", streamed)
  state_m, _ = _train(config, tmp_path / "memory", in_memory)
  assert summary["step"] == 12
  for a, b in zip(jax.tree.leaves(state_s.params), jax.tree.leaves(state_m.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  checkpoints = tmp_path / "streamed" / "checkpoints"
  meta = json.loads((checkpoints / "12" / "meta" / "metadata").read_text())
  assert meta["data"] == streaming.state_at(12, seed=config.seed, batch_size=8, num_records=N)
  shutil.rmtree(checkpoints / "12")
  resumed, summary = _train(config, tmp_path / "streamed", streamed)
  assert summary["resumed_from"] == 8
  for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(state_s.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  shutil.rmtree(checkpoints / "12")
  fewer = dataclasses.replace(streamed, source=[streamed.source[i] for i in range(N - 1)])
  with pytest.raises(ValueError, match="reading other data.*num_records"):
    _train(config, tmp_path / "streamed", fewer)


@pytest.mark.slow
def test_cli_train_stream_matches_training_in_memory(tmp_path, capsys):
  """`oodjax train --stream` on a TFDS set trains the classifier on the batches that
  `oodjax train` reads from the same set loaded into memory: the same losses, bit for bit."""
  from oodjax.cli import main
  from train_helpers import write_fmnist_tfds
  write_fmnist_tfds(tmp_path / "tfds", n_train=512, n_test=200)
  common = ["--config", "configs/fmnist_small_cnn.py:smoke", "--data-dir", str(tmp_path / "tfds"),
            "--no-progress", "--set", "dataset=tfds/fmnist_smoke", "--set", "train_size=384",
            "--set", "train.log_every_steps=1", "--set", "vmdls.train.num_epochs=1"]
  assert main(["train", "--workdir", str(tmp_path / "streamed"), "--stream", *common]) == 0
  assert "VMDLS encoder not trained" in capsys.readouterr().out
  assert main(["train", "--workdir", str(tmp_path / "memory"), *common]) == 0

  def records(workdir):
    with open(workdir / "metrics.jsonl") as f:
      return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in f]

  streamed, memory = records(tmp_path / "streamed"), records(tmp_path / "memory")
  assert len([r for r in streamed if r["kind"] == "train"]) == 3  # 384 // 128
  assert streamed == memory
  assert main(["train", "--workdir", str(tmp_path / "x"), "--stream",
               "--config", "configs/fmnist_small_cnn.py:smoke"]) == 2  # embedded: not TFDS
  assert "--stream reads TFDS" in capsys.readouterr().err
