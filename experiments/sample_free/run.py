r"""Sample-free white-box OOD indicators on embedded Fashion-MNIST: Tables 4 and 5 of the paper.

For three architectures (the small CNN, a tiny ResNet, a tiny DenseNet) and three seeds, this
trains a classifier on embedded Fashion-MNIST, fits the 1C-Sum noise statistics on uniform
noise, and computes the AUROC of every sample-free indicator, of ODIN at the paper's fixed
setting (T = 1000, eps = 8e-4), of 1C-Sum and of the supervised linear bound against every
embedded OOD set (full sets: no holdout; the supervised row trains on one random half of each
evaluation set and is scored on the other half, as in the paper).

Command (from the repository root):

  .venv/bin/python -m experiments.sample_free.run           # the real run, 12-25 minutes
  .venv/bin/python -m experiments.sample_free.run --quick   # smoke run, about a minute

The real run writes one JSON per (architecture, seed) to experiments/sample_free/runs/, the
aggregate experiments/sample_free/results.json and the generated
experiments/sample_free/README.md (`make_readme.py` beside this file); checkpoints go to
runs/sample_free/<arch>_seed<k>/. Re-running skips finished trainings (`train_classifier`
resumes) and finished evaluations (a run JSON with the same protocol is reused). `--quick`
trains on a slice for one epoch, scores slices, and writes everything under
runs/sample_free_quick/ instead, leaving the committed results alone.

Hardware and runtime: 2 shared CPU cores; training runs at roughly 500 images/s and each
evaluation (indicators + ODIN's backward pass + 10,000 noise images) takes about a minute.

Expected numbers (2 epochs): test accuracy about 88.5% for the small CNN, but only about 73%
for the tiny ResNet and 64% for the tiny DenseNet (under-trained: wider or longer would cost
more CPU time than this experiment's budget); the AUROC tables, generated from the results,
are in experiments/sample_free/README.md.

References:
  J.-M. Begon and P. Geurts. Sample-free white-box out-of-distribution detection for deep
  learning. CVPR Workshops 2021, Tables 4 and 5.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax

from experiments.sample_free import make_readme
from oodjax import data, models
from oodjax.config import load_config
from oodjax.evaluate import run_evaluation
from oodjax.train.classifier import train_classifier

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# The paper's ResNet 50 / WideResNet / DenseNet 121 scaled down to what trains in about two
# minutes on two CPU cores. The width overrides make the tiny variants trainable to a sensible
# accuracy (the registry's tiny variants are sized for unit tests).
ARCHITECTURES = {
    "small_cnn": {"model": "small_cnn", "kwargs": {}},
    "resnet": {"model": "resnet_tiny", "kwargs": {"width": 16}},
    "densenet": {"model": "densenet_tiny", "kwargs": {"growth_rate": 8}},
}
SEEDS = (0, 1, 2)
DATASET = "embedded/fashion_mnist"


def protocol(quick: bool) -> dict:
  """Everything that defines one run besides (architecture, seed); stored in every run JSON."""
  if quick:
    return {"num_epochs": 1, "train_size": 512, "id_test_size": 300, "ood_size": 300,
            "noise_n": 256, "noise_seed": 0, "ood_seed": 0, "batch_size": 128,
            "eval_batch_size": 300, "ood_sets": list(data.EMBEDDED_OOD), "dataset": DATASET}
  # Two epochs over the 20,000 embedded training images; N = 10,000 noise images as the paper.
  return {"num_epochs": 2, "train_size": None, "id_test_size": None, "ood_size": None,
          "noise_n": 10_000, "noise_seed": 0, "ood_seed": 0, "batch_size": 128,
          "eval_batch_size": 500, "ood_sets": list(data.EMBEDDED_OOD), "dataset": DATASET}


def _take(ds: data.ImageDataset, size: int | None) -> data.ImageDataset:
  return ds if size is None or len(ds) <= size else ds.take(slice(0, size))


def base_config(seed: int, proto: dict):
  """The main job's config with this experiment's training and evaluation protocol."""
  config = load_config(str(ROOT / "configs" / "fmnist_small_cnn.py"))
  config.seed = seed
  config.dataset = proto["dataset"]
  config.train.num_epochs = proto["num_epochs"]
  config.train.batch_size = proto["batch_size"]
  config.train_size = proto["train_size"]
  config.checkpoint.every_steps = 10_000  # checkpoint (and evaluate) only at the end
  config.eval.update(dict(
      detectors=("odin_fixed", "indicators", "1c_sum", "supervised"), holdout=None,
      ood_sets=tuple(proto["ood_sets"]), ood_seed=proto["ood_seed"], ood_size=proto["ood_size"],
      id_size=proto["id_test_size"], batch_size=proto["eval_batch_size"], split_seed=0))
  config.eval.sample_free.update(dict(noise_n=proto["noise_n"],
                                      noise_seed=proto["noise_seed"]))
  return config


def train_one(arch: str, seed: int, proto: dict, workdir: pathlib.Path):
  """Trains (or restores) one classifier; returns (model, variables, summary)."""
  spec = ARCHITECTURES[arch]
  config = base_config(seed, proto)
  config.model = spec["model"]

  # The config hash does not see the model's width overrides: keep them beside the checkpoints
  # and refuse to resume a run that was trained with different ones.
  workdir.mkdir(parents=True, exist_ok=True)
  spec_path = workdir / "model_spec.json"
  if spec_path.is_file() and json.loads(spec_path.read_text()) != spec:
    raise ValueError(f"{workdir} holds a run of {spec_path.read_text()}, not {spec}; "
                     "delete it to retrain")
  spec_path.write_text(json.dumps(spec))

  train_ds = _take(data.load(DATASET, "train", seed=seed), proto["train_size"])
  test_ds = data.load(DATASET, "test", seed=seed)
  model = models.get_model(spec["model"], num_classes=train_ds.num_classes, **spec["kwargs"])
  state, summary = train_classifier(config, workdir, model=model, train_ds=train_ds,
                                    eval_ds=test_ds, progress=False)
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return model, variables, summary


def evaluate_one(model, variables, workdir: pathlib.Path, seed: int, proto: dict) -> dict:
  """Every sample-free row against every OOD set (no holdout), through `run_evaluation`."""
  config = base_config(seed, proto)
  start = time.time()
  results = run_evaluation(config, workdir, model, variables, progress=False, plots=False,
                           config_name="experiments/sample_free")
  return {"accuracy": results["accuracy"], "num_in": results["num_in"],
          "ood_sizes": results["ood_sizes"], "detectors": results["detectors"],
          "noise_stats": {"indicators": results["fit_info"]["1c_sum"]["noise_stats"]},
          "eval_seconds": round(time.time() - start, 1)}


def run_one(arch: str, seed: int, proto: dict, workroot: pathlib.Path,
            outdir: pathlib.Path) -> dict:
  """One (architecture, seed): reuses its JSON if the protocol matches, else trains/scores."""
  path = outdir / "runs" / f"{arch}_seed{seed}.json"
  spec = ARCHITECTURES[arch]
  if path.is_file():
    previous = json.loads(path.read_text())
    if previous.get("protocol") == proto and previous.get("model_spec") == spec:
      print(f"{arch} seed {seed}: reusing {path.relative_to(ROOT)}", flush=True)
      return previous
  start = time.time()
  workdir = workroot / f"{arch}_seed{seed}"
  model, variables, summary = train_one(arch, seed, proto, workdir)
  trained = time.time() - start
  print(f"{arch} seed {seed}: trained in {trained:.0f}s "
        f"(accuracy {summary['eval']['eval_accuracy']:.4f})", flush=True)
  scored = evaluate_one(model, variables, workdir, seed, proto)
  num_params = sum(int(p.size) for p in jax.tree.leaves(variables["params"]))
  run = {"arch": arch, "model_spec": spec, "seed": seed, "protocol": proto,
         "num_params": num_params, "train_seconds": summary.get("train_seconds"),
         "train_summary_accuracy": summary["eval"]["eval_accuracy"], **scored}
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(run, indent=1, sort_keys=True) + "\n")
  print(f"{arch} seed {seed}: scored in {scored['eval_seconds']:.0f}s -> "
        f"{path.relative_to(ROOT)}", flush=True)
  return run


def aggregate(runs: list[dict], proto: dict) -> dict:
  """The per-seed AUROCs of every row, grouped by architecture (the README's only input)."""
  out = {"protocol": proto, "seeds": sorted({run["seed"] for run in runs}),
         "ood_sets": proto["ood_sets"], "architectures": {}}
  for arch in ARCHITECTURES:
    arch_runs = sorted((run for run in runs if run["arch"] == arch), key=lambda r: r["seed"])
    if not arch_runs:
      continue
    rows = arch_runs[0]["detectors"]
    out["architectures"][arch] = {
        "model_spec": arch_runs[0]["model_spec"],
        "num_params": arch_runs[0]["num_params"],
        "seeds": [run["seed"] for run in arch_runs],
        "accuracy": [run["accuracy"] for run in arch_runs],
        "num_in": arch_runs[0]["num_in"],
        "ood_sizes": arch_runs[0]["ood_sizes"],
        "noise_indicators": sorted(arch_runs[0]["noise_stats"]["indicators"]),
        # noise_stats[seed index][indicator] = {"mean", "std"}: 1C-Sum's standardisation
        "noise_stats": [run["noise_stats"]["indicators"] for run in arch_runs],
        # auroc[row][ood_set] = [one value per seed, in the order of "seeds"]
        "auroc": {row: {name: [run["detectors"][row][name]["auroc"] for run in arch_runs]
                        for name in proto["ood_sets"]}
                  for row in rows},
    }
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="smoke run on slices, one seed, written under runs/sample_free_quick/")
  parser.add_argument("--archs", nargs="+", choices=sorted(ARCHITECTURES), default=None,
                      help="architectures to run (default: all; --quick: small_cnn)")
  args = parser.parse_args(argv)
  proto = protocol(args.quick)
  archs = args.archs or (["small_cnn"] if args.quick else list(ARCHITECTURES))
  # Every OOD set, every seed and the noise fit run the same programs (the variables are
  # arguments, batches are padded to one size); the persistent cache compiles each once.
  jax.config.update("jax_compilation_cache_dir", str(ROOT / "runs" / "sample_free" / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  if args.quick:
    workroot = outdir = ROOT / "runs" / "sample_free_quick"
    seeds = SEEDS[:1]
  else:
    workroot, outdir = ROOT / "runs" / "sample_free", HERE
    seeds = SEEDS
  runs = [run_one(arch, seed, proto, workroot, outdir)
          for arch in archs for seed in seeds]
  results = aggregate(runs, proto)
  (outdir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
  make_readme.write(outdir / "results.json", outdir / "README.md")
  print(f"wrote {outdir / 'results.json'} and {outdir / 'README.md'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
