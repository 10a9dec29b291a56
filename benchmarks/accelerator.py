"""The main job's networks on an accelerator: training images/s, compile time and peak memory in
float32 and bfloat16, and ODIN's (T, ε) grid, with the device that ran them.

    python3 -m benchmarks.accelerator                                   # everything (see below)
    python3 -m benchmarks.accelerator --models resnet18 --skip-odin     # one network's training
    python3 -m benchmarks.accelerator --skip-train --odin-chunk-size 64 # one ODIN setting
    python3 -m benchmarks.accelerator --merge a.json b.json c.json      # one results file
    .venv/bin/python -m benchmarks.accelerator --steps 2 --batch-size 8 --odin-images 8 \
        --odin-chunk-size 8 --floor-chunk 8 --json /tmp/acc.json       # CPU smoke run, ~7 min

(1) Training. For each `--models` network (default the zoo's full-size CIFAR "resnet18" and
"densenet_bc100", K = 10) and each `--dtypes` compute dtype (float32, and bfloat16 on float32
master weights as `train.compute_dtype="bfloat16"` trains: `model.clone(dtype=jnp.bfloat16)`,
`classifier._compute_model`), the trainer's step is built from the library's pieces:
`make_classification_loss` behind `device_input.prepare_batch` (crop + flip keyed by the step,
then normalisation with CIFAR-10's statistics: the body of `classifier.with_device_input`),
`make_train_step`, and `sharding.jit_train_step` over all devices on the "data" axis (state
donated). The optimizer is what `schedules.make_optimizer` builds for the ODIN recipe (SGD,
Nesterov momentum 0.9, lr 0.1 dropped x10 at 50% and 75% of `--steps`, coupled weight decay
1e-4 for DenseNet-BC, 5e-4 otherwise), written with optax here because `schedules` imports
ml_collections. Data: 50,000 synthetic uint8 32x32x3 images with random labels (CIFAR's
training set's size and shape), batched as the trainer batches them (`core.batches(...,
uint8=True)`: a permutation per epoch, uint8 rows placed on the mesh, `prefetch` 2 ahead).
The step is compiled ahead of time (timed: "compile s"), run `WARMUP_STEPS` times, then timed
over `--steps` steps twice, back to back: "resident" on 8 batches already on the device (the
step alone), and "trainer" fed through the trainer's input path. images/s = steps x batch /
seconds, after `jax.block_until_ready`. Peak memory is the device allocator's
`peak_bytes_in_use` (`jax.local_devices()[0].memory_stats()`; None on CPU, which gives no
stats); XLA's own analysis of the compiled step (`sharding.memory_report`) is recorded too.

(2) ODIN. DenseNet-BC-100 (random initialisation: only the timing matters) scores
`--odin-images` (default 10,000) synthetic 32x32x3 images under the paper's 10 x 21 grid
(`tuning.PAPER_TEMPERATURES` x `PAPER_EPSILONS`) with the library's `odin_grid`, once per
`--odin-chunk-size` (default 256, the library's default, then 64) with `--forward-batch`
(default "auto": one `vmap` over all 210 configurations on an accelerator, whose activations
grow with 210 x chunk; 256 may not fit in 80 GB: then the error is recorded and the next size
runs). "first call" is one chunk (compilation included); "seconds" is the whole set, median of
`--odin-repeats`. The floor is benchmarks/odin_grid.py's T·(fwd + bwd) + T·E·fwd, priced from
one jitted forward (max softmax) and one jitted forward + backward (`odin_perturbation`), each
timed over all images in chunks of `--floor-chunk` (default 500): odin_grid.py's strict floor
runs each piece as one call over all N images, but a forward + backward of DenseNet-BC-100
over 10,000 images keeps tens of GB of activations, so here it is the "chunked floor" (3b) of
that script. The two agree where throughput no longer grows with the chunk (expected well
below 500 images on a GPU; not measured).

Every (network, dtype), every ODIN setting and the floor run in their own Python process, one
after another, so each peak is its own (XLA's allocator never resets its peak) and an
out-of-memory error ends only its own measurement. The parent process never initialises JAX.

(3) Recorded, in `--json` (default benchmarks/results/accelerator.json; '' writes nothing;
rewritten after every measurement, so a run cut off by a time limit keeps what it finished):
the device kind, platform, device count, memory limit, the client's platform version (CUDA),
nvidia-smi's name, driver and memory where it exists, jax/jaxlib/flax/optax versions and any
jax CUDA plugin's, JAX_*/XLA_* variables, the host CPU, and the arguments. `--merge` combines the
JSON files of several runs (say one per network, as below) into one, refusing different devices.
`python -m benchmarks.make_readme` renders it into benchmarks/README.md.

How to run on the device machine (the `run` tool: a GPU machine with jax[cuda], flax, optax,
orbax and chex but not this project's other dependencies, and no internet). Nothing needs to be
installed: `python3 -m benchmarks.accelerator` (or `python -m`, whichever the image has) run
from the repository root imports `oodjax` from the working tree, and only leaf modules that
need jax, flax, optax and chex (`_leaf_import` loads them without the package `__init__`s that
pull grain, TFDS, tqdm, ml_collections and scikit-learn), so no wheels have to be carried.
A command may run 10 minutes at most and the session has 30 minutes of device time, a few of
them for the machine to start, so split the work into calls, each writing its JSON under $OUT
(only $OUT comes back):

    python3 -c "import jax; print(jax.__version__, jax.devices())" && python3 -m \
      benchmarks.accelerator --models resnet18 --skip-odin --json $OUT/train_resnet18.json
    python3 -m benchmarks.accelerator --models densenet_bc100 --skip-odin \
      --json $OUT/train_densenet.json
    python3 -m benchmarks.accelerator --skip-train --json $OUT/odin.json

(timeout_s 600 each; the tool names the machine in its reply). A call cut off at its limit
still returns the JSON of the measurements it finished; run what is missing in a further call
(e.g. `--models densenet_bc100 --dtypes bfloat16 --skip-odin`, `--skip-train --skip-floor
--odin-chunk-size 64`, or the floor alone: `--skip-train --skip-grid`). Then, here:
`.venv/bin/python -m benchmarks.accelerator --merge FILES_AT/*.json` (writes
benchmarks/results/accelerator.json) and `.venv/bin/python -m benchmarks.make_readme`. Expected
sizes, not measured: compiling a DenseNet-BC-100 step takes a minute or more, 200 steps take
seconds, and the grid 2,100,000 image-forwards (a minute or two per chunk size on an H100).
A CPU smoke run (the last command above) checks the code paths, not the numbers: its results
belong in /tmp, never in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types

from benchmarks.machine import cpu_name

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_JSON = HERE / "results" / "accelerator.json"
MODELS = ("resnet18", "densenet_bc100")
DTYPES = ("float32", "bfloat16")
ODIN_MODEL = "densenet_bc100"
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
TRAIN_SIZE = 50_000  # CIFAR-10/100's training set
WARMUP_STEPS = 2  # after compiling: the first executions also settle the allocator
RESIDENT_BATCHES = 8  # distinct batches held on the device for the "resident" timing
FLOOR_CALLS = 3  # each floor piece is timed this many times; the median is used


def _leaf_import(name: str) -> types.ModuleType:
  """Imports the oodjax module `name` without running the `__init__` of its parent packages.

  `oodjax.train`, `oodjax.data` and `oodjax.detectors` import, in their `__init__`s, the
  trainer, the data sources and the detector registry, and with them grain, TFDS, tqdm,
  ml_collections and scikit-learn, which a bare accelerator image lacks. The modules used here
  need only jax, flax, optax and chex. A parent not yet imported is registered as an empty
  package over its directory, so its submodules import as usual and its `__init__` never runs.
  Only for this script's own processes (`main` calls it, importing this module does not).
  """
  parts = name.split(".")
  for i in range(2, len(parts)):  # "oodjax" itself has an empty __init__: imported normally
    package = ".".join(parts[:i])
    if package not in sys.modules:
      module = types.ModuleType(package)
      module.__path__ = [str(ROOT.joinpath(*parts[:i]))]
      sys.modules[package] = module
  return importlib.import_module(name)


def _versions() -> dict[str, str]:
  """Versions of JAX, its CUDA plugin and libraries, and the other libraries timed here."""
  from importlib import metadata
  wanted = {"jax", "jaxlib", "flax", "optax", "chex", "numpy", "ml-dtypes"}
  found = {}
  for dist in metadata.distributions():
    name = (dist.metadata["Name"] or "").lower().replace("_", "-")
    if (name in wanted or name.startswith("jax-cuda") or name.startswith("nvidia-cudnn")
        or name.startswith("nvidia-cuda-runtime") or name.startswith("libtpu")):
      found[name] = dist.version
  return dict(sorted(found.items()))


def _nvidia_smi() -> str | None:
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None


def _memory(device) -> dict[str, int | None]:
  """The allocator's statistics: None each where the backend gives none (CPU)."""
  stats = device.memory_stats() or {}
  return {key: stats.get(key) for key in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")}


def _device_info() -> dict:
  import jax
  device = jax.local_devices()[0]
  return {
      "device_kind": device.device_kind, "platform": device.platform,
      "backend": jax.default_backend(), "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(), "process_count": jax.process_count(),
      "platform_version": getattr(device.client, "platform_version", None),
      "bytes_limit": _memory(device)["bytes_limit"], "nvidia_smi": _nvidia_smi(),
      "default_matmul_precision": str(jax.config.jax_default_matmul_precision),
      "versions": _versions(),
      "env": {k: v for k, v in sorted(os.environ.items())
              if k.startswith(("JAX_", "XLA_", "CUDA_VISIBLE"))},
  }


def _optimizer(steps: int, weight_decay: float):
  """`schedules.make_optimizer` for the ODIN recipe over `steps` updates, without ml_collections:
  coupled L2 decay, then SGD with Nesterov momentum 0.9 and lr 0.1 dropped x10 at 50% and 75%."""
  import optax
  drops = {}
  for fraction in (0.5, 0.75):
    boundary = int(round(fraction * steps))
    drops[boundary] = drops.get(boundary, 1.0) * 0.1
  schedule = optax.piecewise_constant_schedule(0.1, drops)
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(schedule, momentum=0.9, nesterov=True))


def _synthetic_images(n: int, seed: int):
  """[n, 32, 32, 3] uint8 uniform pixels and [n] int32 labels in [0, K)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8),
          rng.integers(0, NUM_CLASSES, (n,)).astype(np.int32))


def _cifar_stats():
  return _leaf_import("oodjax.data.tfds_sources").PUBLISHED_STATS["cifar10"]


def _time(fn) -> float:
  import jax
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def _train_worker(spec: dict) -> dict:
  """Times `spec["steps"]` training steps of one (network, dtype); see the module docstring."""
  import itertools

  import jax
  import jax.numpy as jnp

  models = _leaf_import("oodjax.models")
  core = _leaf_import("oodjax.data.core")
  device_input = _leaf_import("oodjax.data.device_input")
  shd = _leaf_import("oodjax.train.sharding")
  state_lib = _leaf_import("oodjax.train.state")
  step_lib = _leaf_import("oodjax.train.step")

  name, dtype, batch_size, steps = spec["model"], spec["dtype"], spec["batch_size"], spec["steps"]
  mean, std = _cifar_stats()
  mesh = shd.make_mesh((-1,), ("data",))
  model = models.get_model(name, NUM_CLASSES)
  # classifier._compute_model: float32 master weights, the step's passes in bfloat16.
  train_model = model if dtype == "float32" else model.clone(dtype=jnp.bfloat16)
  tx = _optimizer(steps, 1e-4 if name.startswith("densenet") else 5e-4)
  loss_fn = step_lib.make_classification_loss(train_model.apply)

  def loss(params, batch_stats, batch, rng):  # classifier.with_device_input's body
    batch = device_input.prepare_batch(batch, jax.random.fold_in(rng, 1), mean=mean, std=std,
                                       augment=spec["augment"])
    return loss_fn(params, batch_stats, batch, rng)

  sample = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)
  init = lambda key: state_lib.create_train_state(model, tx, key, sample)  # noqa: E731
  shardings = shd.state_sharding(jax.eval_shape(init, jax.random.key(0)), mesh)
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
  rng = shd.replicate_key(jax.random.key(1), mesh)
  jitted = shd.jit_train_step(step_lib.make_train_step(loss, tx), mesh, shardings)

  images, labels = _synthetic_images(TRAIN_SIZE, seed=0)
  dataset = core.ImageDataset(images, labels, mean, std,
                              tuple(str(k) for k in range(NUM_CLASSES)), "synthetic_cifar")
  data_sharding = shd.batch_sharding(mesh)

  def host_batches():  # the trainer's input path, epoch after epoch
    for epoch in itertools.count():
      yield from core.batches(dataset, batch_size, seed=0, epoch=epoch, drop_remainder=True,
                              sharding=data_sharding, uint8=True)

  source = host_batches()
  resident = [next(source) for _ in range(RESIDENT_BATCHES)]
  start = time.perf_counter()
  compiled = jitted.lower(state, resident[0], rng).compile()
  compile_s = time.perf_counter() - start
  xla_memory = shd.memory_report(compiled, state)
  for i in range(WARMUP_STEPS):
    state, metrics = compiled(state, resident[i % RESIDENT_BATCHES], rng)
  jax.block_until_ready(metrics)

  start = time.perf_counter()
  for i in range(steps):
    state, metrics = compiled(state, resident[i % RESIDENT_BATCHES], rng)
  jax.block_until_ready((state, metrics))
  resident_s = time.perf_counter() - start

  batches = device_input.prefetch(source, size=2)  # as run_job feeds the step
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, next(batches), rng)
  jax.block_until_ready((state, metrics))
  trainer_s = time.perf_counter() - start
  batches.close()

  params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
  return {"model": name, "dtype": dtype, "batch_size": batch_size, "steps": steps,
          "augment": spec["augment"], "params": int(params), "compile_s": compile_s,
          "resident_s": resident_s, "trainer_s": trainer_s,
          "images_per_s_resident": steps * batch_size / resident_s,
          "images_per_s": steps * batch_size / trainer_s,
          "final_loss": float(metrics["loss"]), "memory": _memory(jax.local_devices()[0]),
          "xla_memory": xla_memory}


def _odin_inputs(spec: dict):
  """The network, its variables, the normalised images [N, 32, 32, 3] and the grid."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  models = _leaf_import("oodjax.models")
  core = _leaf_import("oodjax.data.core")
  tuning = _leaf_import("oodjax.detectors.odin.tuning")
  mean, std = _cifar_stats()
  model = models.get_model(ODIN_MODEL, NUM_CLASSES)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE), jnp.float32))
  images, _ = _synthetic_images(spec["images"], seed=1)
  x = core.normalize(images, mean, std)  # [N, 32, 32, 3] float32, on the host as odin_grid takes
  temperatures = np.asarray(tuning.PAPER_TEMPERATURES, np.float32)  # [T]
  epsilons = np.asarray(tuning.PAPER_EPSILONS, np.float32)  # [E]
  return models.inference_apply(model), variables, x, temperatures, epsilons, std


def _odin_worker(spec: dict) -> dict:
  """Times `odin_grid` over the whole set at one (chunk size, forward batch)."""
  import jax

  grid = _leaf_import("oodjax.detectors.odin.grid")
  apply_fn, variables, x, temps, eps, std = _odin_inputs(spec)
  chunk, forward_batch = spec["chunk_size"], spec["forward_batch"]

  def run(images):
    return grid.odin_grid(apply_fn, variables, images, temps, eps, std=std, chunk_size=chunk,
                          forward_batch=forward_batch)

  first_call_s = _time(lambda: run(x[:chunk]))  # the program every chunk runs, compiled here
  seconds = [_time(lambda: run(x)) for _ in range(spec["repeats"])]
  median = statistics.median(seconds)
  configs = len(temps) * len(eps)
  return {"images": len(x), "grid": [len(temps), len(eps)], "chunk_size": chunk,
          "forward_batch": forward_batch,
          "forward_batch_used": grid._resolve_forward_batch(forward_batch),
          "first_call_s": first_call_s, "seconds": median, "seconds_per_repeat": seconds,
          "image_configs_per_s": len(x) * configs / median,
          "memory": _memory(jax.local_devices()[0])}


def _floor_worker(spec: dict) -> dict:
  """T·(fwd + bwd) + T·E·fwd from jitted pieces over `spec["chunk_size"]`-image chunks."""
  import jax
  import jax.numpy as jnp

  preprocessing = _leaf_import("oodjax.detectors.odin.preprocessing")
  apply_fn, variables, x, temps, eps, std = _odin_inputs(spec)
  perturb = jax.jit(lambda v, xb, t: preprocessing.odin_perturbation(apply_fn, v, xb,
                                                                     temperature=t, std=std))
  forward = jax.jit(lambda v, xb: jnp.max(jax.nn.softmax(apply_fn(v, xb)), -1))
  size = spec["chunk_size"]
  chunks = [jax.device_put(x[s:s + size]) for s in range(0, len(x), size)]
  one = jnp.float32(1.0)
  pieces = {"forward": lambda: [forward(variables, c) for c in chunks],
            "forward_backward": lambda: [perturb(variables, c, one) for c in chunks]}
  compile_s = {name: _time(fn) for name, fn in pieces.items()}  # every chunk shape compiles
  seconds = {name: statistics.median(_time(fn) for _ in range(FLOOR_CALLS))
             for name, fn in pieces.items()}
  n_t, n_e = len(temps), len(eps)
  return {"images": len(x), "grid": [n_t, n_e], "chunk_size": size, "calls": FLOOR_CALLS,
          "forward_s": seconds["forward"], "forward_backward_s": seconds["forward_backward"],
          "first_call_s": compile_s,
          "floor_s": n_t * seconds["forward_backward"] + n_t * n_e * seconds["forward"],
          "memory": _memory(jax.local_devices()[0])}


WORKERS = {"train": _train_worker, "odin": _odin_worker, "floor": _floor_worker}


def _worker_main(spec: dict, out: str) -> None:
  """A measurement in this process: writes {"device", "result"} or {"device", "error"}."""
  record = {"device": _device_info()}
  try:
    record["result"] = WORKERS[spec["kind"]](spec)
  except Exception as error:  # noqa: BLE001  (an out-of-memory error ends one measurement)
    record["error"] = f"{type(error).__name__}: {error}"[:2000]
  pathlib.Path(out).write_text(json.dumps(record))
  if "error" in record:
    print(record["error"], file=sys.stderr)


def _run_worker(spec: dict) -> dict:
  """Runs one measurement in a fresh Python process; returns its record."""
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "record.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.accelerator", "--worker",
                           json.dumps(spec), "--worker-out", str(out)], cwd=ROOT)
    if not out.is_file():
      return {"error": f"the worker process exited with status {proc.returncode} and no record"}
    return json.loads(out.read_text())


def _same_device(a: dict, b: dict) -> bool:
  return all(a.get(k) == b.get(k) for k in ("device_kind", "platform", "device_count"))


def _write(result: dict, path: str) -> None:
  if path:
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text(json.dumps(result, indent=1) + "\n")


def _gib(nbytes) -> str:
  return "-" if nbytes is None else f"{nbytes / 2**30:.2f} GiB"


def _print_train(row: dict) -> None:
  if "error" in row:
    print(f"  {row['model']:15s} {row['dtype']:9s} failed: {row['error'][:300]}", flush=True)
    return
  print(f"  {row['model']:15s} {row['dtype']:9s} {row['images_per_s']:9.0f} img/s "
        f"(resident {row['images_per_s_resident']:9.0f}), compile {row['compile_s']:6.1f} s, "
        f"peak {_gib(row['memory']['peak_bytes_in_use'])}, loss {row['final_loss']:.3f}",
        flush=True)


def _print_odin(row: dict) -> None:
  if "error" in row:
    print(f"  odin_grid chunk {row['chunk_size']} failed: {row['error'][:300]}", flush=True)
    return
  print(f"  odin_grid chunk {row['chunk_size']}, forward_batch {row['forward_batch']}: "
        f"{row['seconds']:.2f} s ({row['image_configs_per_s']:.0f} image-configs/s), first "
        f"call {row['first_call_s']:.1f} s, peak {_gib(row['memory']['peak_bytes_in_use'])}",
        flush=True)


def merge(paths: list[str]) -> dict:
  """One result from several runs' JSON files: their measurements in order, one device."""
  merged = None
  for path in paths:
    part = json.loads(pathlib.Path(path).read_text())
    if merged is None:
      merged = {**part, "train": [], "odin": [], "odin_floor": None, "runs": []}
    elif part["device"] and merged["device"] and not _same_device(part["device"],
                                                                   merged["device"]):
      raise SystemExit(f"{path} was measured on {part['device']['device_kind']} x "
                       f"{part['device']['device_count']}, the others on "
                       f"{merged['device']['device_kind']} x {merged['device']['device_count']}")
    merged["device"] = merged["device"] or part["device"]
    merged["train"] += part["train"]
    merged["odin"] += part["odin"]
    merged["odin_floor"] = part["odin_floor"] or merged["odin_floor"]
    merged["runs"] += part["runs"]
  return merged


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="+", default=list(MODELS), help="zoo names to train")
  parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
  parser.add_argument("--steps", type=int, default=200, help="timed training steps")
  parser.add_argument("--batch-size", type=int, default=128, help="global batch")
  parser.add_argument("--no-augment", action="store_true",
                      help="leave out the on-device crop + flip (the CIFAR recipe has it)")
  parser.add_argument("--skip-train", action="store_true")
  parser.add_argument("--skip-odin", action="store_true")
  parser.add_argument("--skip-floor", action="store_true", help="time odin_grid only")
  parser.add_argument("--skip-grid", action="store_true", help="time the ODIN floor only")
  parser.add_argument("--odin-images", type=int, default=10_000)
  parser.add_argument("--odin-chunk-size", type=int, nargs="+", default=[256, 64],
                      help="odin_grid's chunk_size; one measurement (process) each")
  parser.add_argument("--forward-batch", default="auto",
                      help="odin_grid's forward_batch: 'auto', 'none' (one vmap) or an int")
  parser.add_argument("--odin-repeats", type=int, default=1)
  parser.add_argument("--floor-chunk", type=int, default=500,
                      help="images per call of the floor's forward and forward + backward")
  parser.add_argument("--json", default=None,
                      help=f"where to write the results (default {DEFAULT_JSON.relative_to(ROOT)}"
                      "); '' for nowhere")
  parser.add_argument("--merge", nargs="+", metavar="JSON",
                      help="combine these runs' files into --json and exit")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--worker-out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  json_path = str(DEFAULT_JSON) if args.json is None else args.json

  if args.worker:
    _worker_main(json.loads(args.worker), args.worker_out)
    return
  if args.merge:
    result = merge(args.merge)
    _write(result, json_path)
    print(f"merged {len(args.merge)} files: {len(result['train'])} training rows, "
          f"{len(result['odin'])} ODIN settings, floor "
          f"{'yes' if result['odin_floor'] else 'no'} -> {json_path or 'nowhere'}")
    return
  for flag in ("steps", "batch_size", "odin_images", "odin_repeats", "floor_chunk"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag.replace('_', '-')} must be >= 1")
  if args.batch_size > TRAIN_SIZE:
    parser.error(f"--batch-size must be at most the {TRAIN_SIZE} training images")
  forward_batch = args.forward_batch.lower()
  forward_batch = {"auto": "auto", "none": None}.get(forward_batch, forward_batch)
  if isinstance(forward_batch, str) and forward_batch != "auto":
    forward_batch = int(forward_batch)

  started = time.perf_counter()
  result = {
      "device": None,
      "host": {"cpu": cpu_name(), "cpu_threads": os.cpu_count(),
               "platform": platform.platform(), "python": platform.python_version()},
      "train": [], "odin": [], "odin_floor": None,
      "runs": [{"argv": sys.argv[1:] if argv is None else list(argv), "args": vars(args),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"), "wall_s": None}]}

  def record(spec: dict) -> dict:
    rec = _run_worker(spec)
    device = rec.get("device")
    if device and result["device"] is None:
      result["device"] = device
      print(f"device: {device['device_kind']} x {device['device_count']} ({device['platform']}, "
            f"{device['platform_version']}), memory limit {_gib(device['bytes_limit'])}",
            flush=True)
    elif device and not _same_device(device, result["device"]):
      raise SystemExit(f"a worker saw {device}, an earlier one {result['device']}")
    row = rec.get("result") or {**{k: v for k, v in spec.items() if k != "kind"},
                                "error": rec["error"]}
    result["runs"][0]["wall_s"] = time.perf_counter() - started
    return row

  if not args.skip_train:
    for name in args.models:
      for dtype in args.dtypes:  # the dtypes of one network back to back
        row = record({"kind": "train", "model": name, "dtype": dtype, "steps": args.steps,
                      "batch_size": args.batch_size, "augment": not args.no_augment})
        result["train"].append(row)
        _print_train(row)
        _write(result, json_path)
  if not args.skip_odin:
    for chunk in [] if args.skip_grid else args.odin_chunk_size:
      row = record({"kind": "odin", "images": args.odin_images, "chunk_size": chunk,
                    "forward_batch": forward_batch, "repeats": args.odin_repeats})
      result["odin"].append(row)
      _print_odin(row)
      _write(result, json_path)
    if not args.skip_floor:
      row = record({"kind": "floor", "images": args.odin_images, "chunk_size": args.floor_chunk})
      result["odin_floor"] = row
      if "error" in row:
        print(f"  floor failed: {row['error'][:300]}")
      else:
        print(f"  floor T·(fwd+bwd) + T·E·fwd, chunks of {row['chunk_size']}: "
              f"{row['floor_s']:.2f} s (forward {row['forward_s']:.3f} s, forward + backward "
              f"{row['forward_backward_s']:.3f} s over {row['images']} images)", flush=True)
        for odin in result["odin"]:
          if "error" not in odin:
            print(f"    odin_grid chunk {odin['chunk_size']} / floor = "
                  f"{odin['seconds'] / row['floor_s']:.2f}x")
      _write(result, json_path)
  print(f"done in {time.perf_counter() - started:.0f} s; results in {json_path or 'nowhere'}")


if __name__ == "__main__":
  main()
