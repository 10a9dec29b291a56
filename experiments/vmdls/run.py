r"""VMDLS on embedded Fashion-MNIST: the analogues of Tables 3, 4, 5 and Figure 4 of the paper.

The paper's known classes are MNIST (Tables 3, 4) and CIFAR-10 (Table 5); ours are embedded
Fashion-MNIST, with the embedded unknowns (Animal-MNIST, the near one that stands in for
Omniglot, then Fashion-MNIST + noise, digits, textures and noise). Nothing here sees OOD data
before the test: every row is fitted on the ID training set only.

* Table 3 (F1 of the OOD-free rows: softmax threshold, ODIN tuned without OOD, 1C-Sum, VMDLS_b,
  VMDLS) is the main job's report, `experiments/baseline/results.json`: `make_readme.py` reads it,
  nothing is re-run here.
* Table 4 and Figure 4 (`ablation`): the paper's five losses and L_t with M_t = 1, with d = 2,
  trained as ONE vmapped program (`oodjax.vmdls.train.train_vmdls_variants`: the same batches, ε
  and initial weights for all six), each scored by VMDLS_b through `run_evaluation` like any
  registry row. Writes `ablation.json` (F1, AUROC, FPR@95 per OOD set; the class clusters'
  separation and isotropy) and `figure4.png` (μ of training images per class).
* Table 5 (`ensemble`): the main job's encoder (d = 16) and autoencoder, restored from its
  workdir (trained there if missing); VMDLS and VMDLS_b with the members of Eq. 8 dropped one by
  one from the front, as the paper's table does, all from one forward pass per image. Writes
  `ensemble.json`.

Command (from the repository root; reuses the main job's workdir of `experiments/run_baseline.sh`):

  .venv/bin/python -m experiments.vmdls.run                 # about 13 minutes on 2 CPU cores
  .venv/bin/python -m experiments.vmdls.run --quick         # smoke run, about 3 minutes
  .venv/bin/python -m experiments.vmdls.make_readme         # regenerate README.md only

`--quick` trains on slices (the smoke config) and writes under runs/vmdls_quick/, leaving the
committed results alone. Re-running resumes: the ablation's training and every fitted state
are reused from runs/vmdls/.

References:
  O. Dinari and O. Freifeld. Variational- and metric-based deep latent space for
  out-of-distribution detection. UAI 2022, Tables 3-5, Figure 4.
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

import jax
import numpy as np

from experiments.vmdls import make_readme
from oodjax import data, metrics, models
from oodjax.batching import map_padded
from oodjax.config import load_config
from oodjax.detectors.registry import VMDLS_AUTOENCODER
from oodjax.evaluate import OPEN_SET_TPR, open_set_f1, run_evaluation
from oodjax.vmdls import gaussians, scoring
from oodjax.vmdls.train import (autoencoder_config, train_autoencoder, train_vmdls,
                                train_vmdls_variants, vmdls_config)

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CONFIG = ROOT / "configs" / "fmnist_small_cnn.py"

# Table 4's rows (Sec. 4.1): which terms of Eq. 7 are on, and the margins (M_t = 0.1 unless
# stated). Every variant overrides only loss weights and margins of the d = 2 base.
VARIANTS = {
    "L_KL + L_t + L_d (M_d = 32)": {"distancing_margin": 32.0},
    "L_KL + L_t + L_d (M_d = 1)": {"distancing_margin": 1.0},
    "L_KL + L_t": {"distancing_weight": 0.0},
    "L_t + L_d (M_d = 32)": {"kl_weight": 0.0, "distancing_margin": 32.0},
    "L_t": {"kl_weight": 0.0, "distancing_weight": 0.0},
    "L_t (M_t = 1)": {"kl_weight": 0.0, "distancing_weight": 0.0, "triplet_margin": 1.0},
}
ABLATION_LATENT_DIM = 2  # "we chose d = 2 to let us visualize μ directly"



def member_names(num_members: int) -> list[str]:
  """Names of Eq. 8's members: the block members t1.. (up to three; the small CNN has two
  conv blocks, so two), then g and mu."""
  return [f"t{i + 1}" for i in range(num_members - 2)] + ["g", "mu"]


def subsets(num_members: int) -> list[tuple[int, ...]]:
  """Table 5's columns: the whole ensemble, then the members dropped one by one from the front,
  down to μ alone."""
  return [tuple(range(i, num_members)) for i in range(num_members)]


def protocol(quick: bool) -> dict:
  """Everything that defines the runs; stored in the result files."""
  if quick:
    return {"config": "fmnist_small_cnn.py:smoke", "ablation_train_size": 1024,
            "ablation_epochs": 2, "id_size": 300, "ood_size": 300, "open_set_train_size": 500,
            "figure_points": 500}
  # 5,000 of the 20,000 training images for 3 epochs (93 steps): the vmapped step of six
  # variants runs at ~25-34 images/s on 2 CPU cores (benchmarks/vmdls.py), so ~10 minutes.
  return {"config": "fmnist_small_cnn.py", "ablation_train_size": 5_000, "ablation_epochs": 3,
          "id_size": None, "ood_size": None, "open_set_train_size": 5_000,
          "figure_points": 3_000}


def _config(proto: dict):
  spec = str(CONFIG) + (":smoke" if proto["config"].endswith(":smoke") else "")
  return load_config(spec)


def _variables(state, index: int | None = None) -> dict:
  pick = (lambda a: a) if index is None else (lambda a: a[index])
  variables = {"params": jax.tree.map(pick, state.params)}
  if state.batch_stats:
    variables["batch_stats"] = jax.tree.map(pick, state.batch_stats)
  return variables


def _json_write(path: pathlib.Path, value) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(value, indent=1) + "\n")


# --- Table 4 and Figure 4 ------------------------------------------------------------------

def cluster_shape(mu: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
  """Figure 4's claims in numbers: how far apart and how round the class clusters of μ are.

  separation: the smallest distance between two class means divided by the mean within-class
    RMS radius (larger = classes further apart relative to their size).
  isotropy: the mean over classes of the smallest over the largest eigenvalue of the class
    covariance (1 = round clusters).
  size_spread: the largest over the smallest class RMS radius (1 = clusters of equal size).
  """
  means = np.stack([mu[labels == c].mean(axis=0) for c in range(num_classes)])
  radii, ratios = [], []
  for c in range(num_classes):
    centred = mu[labels == c] - means[c]
    radii.append(np.sqrt(np.mean(np.sum(centred ** 2, axis=1))))
    eig = np.linalg.eigvalsh(np.cov(centred.T))
    ratios.append(float(eig[0] / max(eig[-1], 1e-30)))
  gaps = np.linalg.norm(means[:, None] - means[None], axis=-1)
  gaps = gaps[~np.eye(num_classes, dtype=bool)]
  radii = np.array(radii)
  return {"separation": float(gaps.min() / radii.mean()), "isotropy": float(np.mean(ratios)),
          "size_spread": float(radii.max() / radii.min())}


def run_ablation(proto: dict, workroot: pathlib.Path, outdir: pathlib.Path) -> dict:
  """Trains the Table 4 variants as one program and scores each with VMDLS_b."""
  config = _config(proto)
  config.vmdls = vmdls_config(latent_dim=ABLATION_LATENT_DIM)
  config.vmdls.train = {"num_epochs": proto["ablation_epochs"], "learning_rate": 1e-3}
  config.checkpoint.every_steps = 10_000  # the end of each epoch is enough here
  train_full = data.load(config.dataset, "train", seed=config.seed)
  train_ds = train_full.take(slice(0, proto["ablation_train_size"]))
  backbone = models.get_model(config.model, num_classes=train_ds.num_classes)
  names = list(VARIANTS)
  start = time.time()
  model, state, summary = train_vmdls_variants(
      config, str(workroot / "ablation" / "train"), backbone=backbone, train_ds=train_ds,
      variants=[VARIANTS[n] for n in names], progress=False)
  train_seconds = time.time() - start
  print(f"ablation: {len(names)} variants trained as one program in {train_seconds:.0f}s "
        f"({summary['step']} steps)", flush=True)

  config.eval.update(dict(detectors=("vmdls_b",), holdout=None, id_size=proto["id_size"],
                          ood_size=proto["ood_size"],
                          open_set_train_size=proto["open_set_train_size"]))
  points = train_full.take(slice(0, proto["figure_points"]))
  x_points = data.normalize(points.images, points.mean, points.std)
  out = {"protocol": proto, "latent_dim": ABLATION_LATENT_DIM, "variants": {},
         "train_seconds": round(train_seconds, 1), "steps": int(summary["step"]),
         "ood_sets": list(config.eval.ood_sets), "figure_labels": points.labels.tolist()}
  for k, name in enumerate(names):
    variables = _variables(state, k)
    results = run_evaluation(config, workroot / "ablation" / f"variant{k}", None, None,
                             progress=False, plots=False, networks={"vmdls": (model, variables)},
                             config_name=f"experiments/vmdls ablation: {name}")
    mu = np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, x_points))
    out["variants"][name] = {
        "overrides": VARIANTS[name],
        "detectors": results["detectors"]["vmdls_b"],
        "clusters": cluster_shape(mu, points.labels, points.num_classes),
        "mu": np.round(mu, 4).tolist(),
    }
    f1 = {ood: row.get("open_set_f1") for ood, row in results["detectors"]["vmdls_b"].items()}
    print(f"ablation: {name}: F1 {f1}", flush=True)
  _json_write(outdir / "ablation.json", out)
  return out


# --- Table 5 -------------------------------------------------------------------------------

def _main_networks(config, main_workdir: pathlib.Path, train_ds):
  """The main job's VMDLS encoder and autoencoder, restored (or trained) in its workdir."""
  vmdls_train = train_ds
  if config.vmdls.get("train_size"):
    vmdls_train = train_ds.take(slice(0, config.vmdls.train_size))
  backbone = models.get_model(config.vmdls.get("backbone") or config.model,
                              num_classes=train_ds.num_classes)
  # The CLI's own folders (oodjax.cli._train_vmdls, the "vmdls" entry's FitData.workdir).
  encoder, state, _ = train_vmdls(config, str(main_workdir / "vmdls"), backbone=backbone,
                                  train_ds=vmdls_train, progress=False)
  ae_options = dict(config.eval.vmdls_eval.autoencoder)
  ae_state, _ = train_autoencoder(autoencoder_config(**ae_options),
                                  str(main_workdir / "detectors" / "vmdls" / "autoencoder"),
                                  model=VMDLS_AUTOENCODER, train_ds=train_ds, progress=False)
  return encoder, _variables(state), jax.device_get(ae_state.params)


@jax.jit
def _best(fitted: gaussians.ClassGaussians, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  return gaussians.best_class(gaussians.log_likelihoods(fitted, t))


def _subset_scores(fitted, members, subset, batch_size=2000):
  """(l [N], c_max [N]) of the class Gaussians on the concatenated members in `subset`."""
  t = np.concatenate([members[i] for i in subset], axis=-1)
  return map_padded(functools.partial(_best, fitted), t, batch_size)


def run_ensemble(proto: dict, main_workdir: pathlib.Path, outdir: pathlib.Path) -> dict:
  """Table 5: VMDLS_b and VMDLS with subsets of the feature ensemble."""
  config = _config(proto)
  train_ds = data.load(config.dataset, "train", seed=config.seed)
  test_ds = data.load(config.dataset, "test", seed=config.seed)
  if proto["id_size"]:
    test_ds = test_ds.take(slice(0, proto["id_size"]))
  ood_sets = {name: data.load(name, "test", seed=config.eval.ood_seed, size=proto["ood_size"])
              for name in config.eval.ood_sets}
  start = time.time()
  encoder, variables, ae_params = _main_networks(config, main_workdir, train_ds)
  x0 = data.normalize(train_ds.images[:1], train_ds.mean, train_ds.std)
  is_block = scoring.ensemble_blocks(encoder, variables, x0)

  @jax.jit
  def pieces(x):
    members = scoring.ensemble_members(encoder, variables, x, is_block=is_block)
    w = scoring.reconstruction_weight(encoder, variables, x, VMDLS_AUTOENCODER, ae_params,
                                      is_block=is_block, t1=members[0])
    return members, w

  def features(ds):
    # Every set is normalised with the ID statistics, as the network was trained (an OOD set's
    # own mean and std would hide part of its shift).
    x = data.normalize(ds.images, train_ds.mean, train_ds.std)
    return map_padded(pieces, x, int(config.eval.batch_size))

  train_members, train_w = features(train_ds)
  test_members, test_w = features(test_ds)
  ood_features = {name: features(ds) for name, ds in ood_sets.items()}
  print(f"ensemble: features of {len(train_ds)} + {len(test_ds)} + "
        f"{sum(map(len, ood_sets.values()))} images in {time.time() - start:.0f}s", flush=True)

  num_classes = train_ds.num_classes
  n_threshold = proto["open_set_train_size"]
  names = member_names(len(train_members))
  w_scale = max(float(train_w.max()), 1e-30)
  out = {"protocol": proto, "ood_sets": list(ood_sets), "members": names,
         "member_dims": [int(m.shape[-1]) for m in train_members], "subsets": {}}
  for subset in subsets(len(names)):
    t_train = np.concatenate([train_members[i] for i in subset], axis=-1)
    sums = gaussians.accumulate(gaussians.empty_sums(num_classes, t_train.shape[-1]), t_train,
                                train_ds.labels)
    fitted = gaussians.fit_class_gaussians(sums, ridge=float(config.eval.vmdls_eval.ridge))
    l_train, _ = _subset_scores(fitted, train_members, subset)
    l_in, c_in = _subset_scores(fitted, test_members, subset)
    ood_best = {ood: (_subset_scores(fitted, members_out, subset), w_out)
                for ood, (members_out, w_out) in ood_features.items()}
    if len(subset) == len(names):
      out["accuracy_c_max"] = float(np.mean(c_in == test_ds.labels))
    big_l = float(l_train.max()) + 1.0  # L of oodjax.vmdls.scoring (training set only)
    rows = {"VMDLS_b": lambda l, w: -l,
            "VMDLS": lambda l, w, big_l=big_l: w / w_scale * (big_l - l)}
    name = "(" + ", ".join(names[i] for i in subset) + ")"
    out["subsets"][name] = {"members": list(subset), "dim": int(t_train.shape[-1]), "rows": {},
                            "id_test_accepted": {}}
    for row, score in rows.items():
      train_scores = score(l_train, train_w)[:n_threshold or None]
      threshold = float(metrics.threshold_at_tpr(train_scores, OPEN_SET_TPR))
      s_in = score(l_in, test_w)
      # The threshold comes from training images: how many ID TEST images it accepts shows
      # how well it transfers (0.95 if the fit does not overfit the training set).
      out["subsets"][name]["id_test_accepted"][row] = float(np.mean(s_in <= threshold))
      per_set = {}
      for ood, ((l_out, c_out), w_out) in ood_best.items():
        s_out = score(l_out, w_out)
        per_set[ood] = {
            "auroc": float(metrics.auroc(s_in, s_out)),
            "fpr95": float(metrics.fpr_at_tpr(s_in, s_out, 0.95)),
            "open_set_f1": open_set_f1(s_in, c_in, test_ds.labels, s_out, c_out, threshold,
                                       num_classes)}
      out["subsets"][name]["rows"][row] = per_set
    print(f"ensemble: {name}: F1 " + ", ".join(
        f"{r} {np.mean([v['open_set_f1'] for v in p.values()]):.3f}"
        for r, p in out["subsets"][name]["rows"].items()), flush=True)
  out["seconds"] = round(time.time() - start, 1)
  _json_write(outdir / "ensemble.json", out)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="smoke run on slices, written under runs/vmdls_quick/")
  parser.add_argument("--main-workdir", default=None,
                      help="the main job's workdir holding its VMDLS encoder and autoencoder "
                           "(default: runs/experiments_baseline, that of "
                           "experiments/run_baseline.sh; --quick: runs/vmdls_quick/main)")
  parser.add_argument("--parts", nargs="+", choices=("ablation", "ensemble"),
                      default=("ablation", "ensemble"))
  args = parser.parse_args(argv)
  proto = protocol(args.quick)
  if args.quick:
    workroot = outdir = ROOT / "runs" / "vmdls_quick"
    main_workdir = pathlib.Path(args.main_workdir or workroot / "main")
  else:
    workroot, outdir = ROOT / "runs" / "vmdls", HERE
    main_workdir = pathlib.Path(args.main_workdir or ROOT / "runs" / "experiments_baseline")
  jax.config.update("jax_compilation_cache_dir", str(ROOT / "runs" / "vmdls" / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  for part in args.parts:
    start = time.time()
    if part == "ablation":
      run_ablation(proto, workroot, outdir)
    else:
      run_ensemble(proto, main_workdir, outdir)
    print(f"{part}: {time.time() - start:.0f}s", flush=True)
  if not args.quick:
    make_readme.main([])
  else:
    make_readme.write(outdir, outdir / "README.md")
    print(f"wrote {outdir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
