r"""ENVISE on the embedded 20-class set: analogues of the paper's Tables 2-4 and 6, Figures 3-5.

Three parts, each writing a JSON file here that `make_readme.py` turns into README.md:

* `main` (Tables 2-4, 6, Figures 3 and 5): `oodjax run --config configs/envise_embedded.py`:
  the teacher (small CNN, all 20 classes), then five students adapted online to the four
  scenarios zoo -> shop -> tops -> wildlife, the four gates of the registry evaluated per
  scenario (`oodjax.envise.pipeline`). Copies its `results.json` to `main.json`, and
  `figure3.png` and `gradcam_overlay.png` here.
* `ablation` (Table 3): the margin delta of L_at in {0.5, 1.0, 1.5, 2.0, 2.5}, five binary
  students trained as ONE vmapped program (`oodjax.envise.ablation.train_margin_variants`) on
  each scenario's adaptive phase (the same batches, initial weights and teacher for the five),
  each then evaluated as the "envise_gate" row on the scenario. Writes `ablation.json`.
* `variants`: ENVISE's BSN once more per variant of L_at (`VARIANTS`): summed over the pixels
  of a map (the issue's reading, `loss.pixel_mean=False`) instead of Eq. 5's 1/(N K), and with
  Grad-CAM of the centred logit (`loss.cam_target="centred"`, see `oodjax.envise.gradcam`,
  "Dead maps"); each one's gate per scenario. Writes `variants.json`.
* `dead_maps`: the share of test images whose student Grad-CAM map is zero everywhere, per
  student and scenario (such a map passes no gradient to L_at). Writes `dead_maps.json`.
* `separation` (Figure 4 and its p-values): the features of each adapted student's last layer
  (the input of its head) on the first scenario's test images; the 1-D quantity tested is the
  Euclidean distance of an image's features to the nearest inlier-class centroid (centroids:
  the scenario's inlier TRAINING images, by true class), inliers vs outliers, one-sided
  Wilcoxon rank-sum test (`scipy.stats.ranksums`, alternative: inliers closer; a two-sided
  test would also reward outliers that sit closer than the inliers); the paper does not say
  which quantity it tests, lower p = better separated, as in its Figure 4. With thousands of
  images any shift gives a tiny p, so the AUROC of the distance (higher = outliers farther) is
  reported as the size of the separation. The 2-D embedding is PCA of the features. Writes `separation.json` and `separation.png`.

Command (from the repository root):

  .venv/bin/python -m experiments.envise.run              # about 20 minutes on 2 CPU cores
  .venv/bin/python -m experiments.envise.run --quick      # smoke run, a few minutes
  .venv/bin/python -m experiments.envise.make_readme      # regenerate README.md only

`--quick` uses `configs/envise_embedded.py:quick` and writes under runs/envise_quick/ and
runs/envise_quick/experiment/, leaving the committed results alone. Re-running resumes (the
teacher and the online runs from their checkpoints).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import shutil
import time

import jax
import numpy as np

from experiments.envise import make_readme
from oodjax import cli, data, metrics, models
from oodjax.batching import map_padded
from oodjax.config import load_config
from oodjax.envise import ablation, gradcam, online, pipeline, students
from oodjax.evaluate import evaluate_ood
from oodjax.fileio import atomic_write_json
from oodjax.models.insides import forward_with_insides
from oodjax.train.classifier import train_classifier

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CONFIG = str(ROOT / "configs" / "envise_embedded.py")
MARGINS = (0.5, 1.0, 1.5, 2.0, 2.5)  # Table 3
SEPARATION_RUNS = ("envise_bsn", "envise_bsn_ld", "envise_rvsn")
PARTS = ("main", "ablation", "variants", "dead_maps", "separation")
# Variants of ENVISE's BSN: (label, overrides of envise.online).
VARIANTS = {
    "pixel_sum": ("L_at summed over pixels (loss.pixel_mean=False)",
                  {"loss": {"pixel_mean": False}}),
    "centred": ("Grad-CAM of y^c - mean_k y^k (loss.cam_target='centred')",
                {"loss": {"cam_target": "centred"}}),
}


def _teacher(config, workdir: pathlib.Path):
  """The main run's teacher, restored from its checkpoint."""
  train = data.load(config.dataset, "train", seed=config.seed)
  if config.get("train_size"):
    train = train.take(slice(0, config.train_size))
  model = models.get_model(config.model, num_classes=train.num_classes)
  state, _ = train_classifier(config, str(workdir), model=model, train_ds=train,
                              restore_only=True)
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return model, variables


def run_main(config_spec: str, workdir: pathlib.Path, out: pathlib.Path) -> None:
  code = cli.main(["run", "--config", config_spec, "--workdir", str(workdir), "--no-progress"])
  if code:
    raise SystemExit(code)
  shutil.copy(workdir / "envise" / "results.json", out / "main.json")
  for name in ("figure3.png", "gradcam_overlay.png"):
    shutil.copy(workdir / "envise" / name, out / name)


def run_ablation(config, workdir: pathlib.Path, out: pathlib.Path) -> None:
  """Table 3: the margins as one vmapped program, on each scenario's adaptive phase.

  For every scenario, five students start from the same initial weights (the config's seed:
  not the main run's weights carried over from the previous scenarios) and train on that
  scenario's adaptive steps, as one program; each is then evaluated as ENVISE's gate on the
  scenario's test images.
  """
  ec = config.envise
  teacher, tv = _teacher(config, workdir)
  stream_ds, eval_ds, scenarios, deploy, adapt = _scenario_streams(config)
  source = deploy if adapt is None else adapt  # what the main run's adaptive phases read
  oc = pipeline.merged_online_config(ec.online, pipeline.STUDENT_RUNS["envise_bsn"])
  student = students.get_student(ec.student, stream_ds.num_classes)
  deployed = online.student_modules(student, oc.student_kind)[1]
  start = time.time()
  per_scenario = []
  for index, scenario in enumerate(scenarios):
    num_steps = min(int(online.max_adaptive_steps(oc) or source.steps_per_scenario[index]),
                    source.steps_per_scenario[index])
    states, metrics = ablation.train_margin_variants(
        oc, teacher=teacher, teacher_variables=tv, student=student, stream=source,
        margins=MARGINS, num_steps=num_steps, start_step=source.first_step(index))
    inliers, outliers = pipeline.split_scenario(eval_ds, scenario)
    rows = []
    for v, margin in enumerate(MARGINS):
      variables = jax.device_get(ablation.variant({"params": states.params,
                                                   "batch_stats": states.batch_stats}, v))
      results, _ = evaluate_ood(deployed, variables, inliers, {"outliers": outliers},
                                ("envise_gate",), holdout=ec.eval.holdout,
                                seed=int(ec.eval.seed), batch_size=int(ec.eval.batch_size))
      gate = results["detectors"]["envise_gate"]["outliers"]
      rows.append({"margin": margin, **{k: float(gate[k]) for k in pipeline.METRICS},
                   "student_accuracy": float(results["accuracy"]),
                   "final_loss": float(metrics["loss"][-10:, v].mean()),
                   "final_attention": float(metrics["attention"][-10:, v].mean())})
    per_scenario.append({"scenario": scenario.name, "adaptive_steps": num_steps, "rows": rows})
  seconds = time.time() - start
  keys = (*pipeline.METRICS, "student_accuracy", "final_attention")
  mean_rows = [{"margin": margin, **{k: float(np.mean([e["rows"][v][k] for e in per_scenario]))
                                     for k in keys}}
               for v, margin in enumerate(MARGINS)]
  atomic_write_json(out / "ablation.json", {
      "student": ec.student, "margins": list(MARGINS), "scenarios": per_scenario,
      "mean_rows": mean_rows, "seconds": round(seconds, 1),
      "note": "per scenario, one vmapped program over the margins from the same initial "
              "weights; final_loss / final_attention are the means of the last 10 steps' "
              "batch means"})


def _scenario_streams(config):
  """(stream dataset, eval dataset, scenarios, deployment stream, adaptive stream or None)."""
  ec = config.envise
  stream_ds = data.load(config.dataset, ec.split, seed=config.seed)
  eval_ds = data.load(config.dataset, ec.eval_split, seed=config.seed)
  return (stream_ds, eval_ds, *pipeline.scenario_streams(ec, stream_ds))


def run_variants(config, workdir: pathlib.Path, out: pathlib.Path) -> None:
  """ENVISE's BSN once more per variant of L_at (`VARIANTS`), on the same stream from the same
  initial weights as the main run; each variant's gate per scenario."""
  ec = config.envise
  teacher, tv = _teacher(config, workdir)
  stream_ds, eval_ds, scenarios, deploy, adapt = _scenario_streams(config)
  student = students.get_student(ec.student, stream_ds.num_classes)
  results_by_variant = {}
  for name, (label, overrides) in VARIANTS.items():
    oc = pipeline.merged_online_config(
        ec.online, {**pipeline.STUDENT_RUNS["envise_bsn"], **overrides})
    run_dir = workdir / "envise" / f"envise_bsn_{name}"
    start = time.time()
    summary = online.run_online(oc, run_dir, teacher=teacher, teacher_variables=tv,
                                student=student, stream=deploy, adaptive_stream=adapt,
                                progress=False)
    seconds = time.time() - start
    deployed = online.student_modules(student, oc.student_kind)[1]
    rows = []
    for index, scenario in enumerate(scenarios):
      inliers, outliers = pipeline.split_scenario(eval_ds, scenario)
      results, _ = evaluate_ood(deployed, online.load_snapshot(run_dir, index), inliers,
                                {"outliers": outliers}, ("envise_gate",),
                                holdout=ec.eval.holdout, seed=int(ec.eval.seed),
                                batch_size=int(ec.eval.batch_size))
      gate = results["detectors"]["envise_gate"]["outliers"]
      s = summary["scenarios"][index]
      rows.append({"scenario": scenario.name, **{k: float(gate[k]) for k in pipeline.METRICS},
                   "student_accuracy": float(results["accuracy"]),
                   "adaptive_steps": s["adaptive_steps"],
                   "final_window_agreement": s["final_window_agreement"]})
    results_by_variant[name] = {"label": label, "overrides": overrides, "rows": rows,
                                "seconds": round(seconds, 1)}
  atomic_write_json(out / "variants.json", results_by_variant)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _dead_maps(model, variables, x, target: str):
  """[B] bool: the Grad-CAM map of the predicted class is zero everywhere."""
  logits, cam = gradcam.logits_and_cam(model, variables, x, target=target)
  return jax.numpy.all(cam(logits.argmax(-1)) <= 0, axis=(1, 2))


def dead_fraction(model, variables, ds, target: str, batch_size: int = 500) -> float:
  """Share of `ds`'s images whose Grad-CAM map (for the model's predicted class, with
  `target`) is zero everywhere: an all-zero map passes no gradient to L_at."""
  images = data.core.normalize(ds.images, ds.mean, ds.std)
  return float(np.mean(map_padded(lambda x: _dead_maps(model, variables, x, target), images,
                                  batch_size)))


def run_dead_maps(config, workdir: pathlib.Path, out: pathlib.Path) -> None:
  """Share of all-zero student Grad-CAM maps per run and scenario (the deployed snapshot, the
  scenario's test images), with the target each run was trained with."""
  ec = config.envise
  stream_ds, eval_ds, scenarios, _, _ = _scenario_streams(config)
  student = students.get_student(ec.student, stream_ds.num_classes)
  runs = {run: (pipeline.STUDENT_RUNS[run]["student_kind"], "logit") for run in SEPARATION_RUNS}
  for name, (_, overrides) in VARIANTS.items():
    runs[f"envise_bsn_{name}"] = ("bsn", overrides.get("loss", {}).get("cam_target", "logit"))
  table = {}
  for run, (kind, target) in runs.items():
    run_dir = workdir / "envise" / run
    if not (run_dir / online.SNAPSHOT_DIR).is_dir():
      continue
    model = online.student_modules(student, kind)[1]
    per = {}
    for index, scenario in enumerate(scenarios):
      test_in, test_out = pipeline.split_scenario(eval_ds, scenario)
      both = dataclasses.replace(test_in,  # the scenario's inlier and outlier test images
                                 images=np.concatenate([test_in.images, test_out.images]),
                                 labels=np.concatenate([test_in.labels, test_out.labels]))
      per[scenario.name] = dead_fraction(model, online.load_snapshot(run_dir, index), both,
                                         target)
    table[run] = {"target": target, "dead": per}
  init = student.init(jax.random.key(int(ec.online.seed)),
                      np.zeros((1, *eval_ds.image_shape), np.float32))
  atomic_write_json(out / "dead_maps.json", {
      "initial_weights": dead_fraction(online.student_modules(student, "bsn")[1], init,
                                       eval_ds, "logit"),
      "runs": table})


@functools.partial(jax.jit, static_argnums=0)
def _head_features(model, variables, x):
  return forward_with_insides(model, variables, x, which=("head",))[1].features


def _features(model, variables, ds, batch_size: int = 500) -> np.ndarray:
  """[N, D] input of the head of `model` (its last layer's features) on `ds`."""
  images = data.core.normalize(ds.images, ds.mean, ds.std)
  return map_padded(lambda x: _head_features(model, variables, x), images, batch_size)


def nearest_centroid_distance(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
  """[N] Euclidean distance of each row of `features` to its nearest row of `centroids`."""
  d2 = ((features[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)  # [N, C]
  return np.sqrt(d2.min(axis=1))


def run_separation(config, workdir: pathlib.Path, out: pathlib.Path) -> None:
  """Figure 4's analogue on the first scenario: PCA scatter and rank-sum p-values."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  from oodjax.plots import _pyplot  # pylint: disable=g-import-not-at-top
  ec = config.envise
  stream_ds, eval_ds, scenarios, _, _ = _scenario_streams(config)
  scenario = scenarios[0]
  train_in, _ = pipeline.split_scenario(stream_ds, scenario)
  test_in, test_out = pipeline.split_scenario(eval_ds, scenario)
  student = students.get_student(ec.student, stream_ds.num_classes)
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(SEPARATION_RUNS), figsize=(4 * len(SEPARATION_RUNS), 3.6))
  rows = {}
  for ax, run in zip(axes, SEPARATION_RUNS):
    kind = pipeline.STUDENT_RUNS[run]["student_kind"]
    model = online.student_modules(student, kind)[1]
    variables = online.load_snapshot(workdir / "envise" / run, 0)
    f_train = _features(model, variables, train_in)
    centroids = np.stack([f_train[train_in.labels == k].mean(0)
                          for k in np.unique(train_in.labels)])
    f_in, f_out = _features(model, variables, test_in), _features(model, variables, test_out)
    d_in = nearest_centroid_distance(f_in, centroids)
    d_out = nearest_centroid_distance(f_out, centroids)
    test = stats.ranksums(d_in, d_out, alternative="less")
    rows[run] = {"label": pipeline.RUN_LABELS[run], "p_value": float(test.pvalue),
                 "statistic": float(test.statistic),
                 "distance_auroc": float(metrics.auroc(d_in, d_out)),
                 "median_distance_inliers": float(np.median(d_in)),
                 "median_distance_outliers": float(np.median(d_out)),
                 "feature_dim": int(f_in.shape[1])}
    both = np.concatenate([f_in, f_out])
    centred = both - both.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    ax.scatter(*xy[:len(f_in)].T, s=3, alpha=0.5, label="inliers")
    ax.scatter(*xy[len(f_in):].T, s=3, alpha=0.5, label="outliers")
    p_text = "p < 1e-300" if test.pvalue < 1e-300 else f"p = {test.pvalue:.2g}"
    ax.set_title(f"{pipeline.RUN_LABELS[run]}\n{p_text}, distance AUROC "
                 f"{rows[run]['distance_auroc']:.2f}", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
  axes[0].legend(fontsize=7, markerscale=3)
  fig.suptitle(f"Last-layer features, scenario {scenario.name} (PCA)", fontsize=9)
  fig.tight_layout()
  fig.savefig(out / "separation.png", dpi=110)
  plt.close(fig)
  atomic_write_json(out / "separation.json", {
      "scenario": scenario.name, "num_inliers": len(test_in), "num_outliers": len(test_out),
      "quantity": "Euclidean distance of the head's input features to the nearest inlier-class "
                  "centroid (centroids from the scenario's inlier training images)",
      "test": "one-sided Wilcoxon rank-sum (scipy.stats.ranksums, alternative: inliers "
              "closer than outliers)",
      "runs": rows})


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="the smoke config, under runs/")
  parser.add_argument("--workdir", default=None, help="the main run's workdir")
  parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS)
  args = parser.parse_args(argv)
  spec = CONFIG + (":quick" if args.quick else "")
  workdir = pathlib.Path(args.workdir or ROOT / "runs" / ("envise_quick" if args.quick
                                                         else "envise_embedded"))
  out = workdir / "experiment" if args.quick else HERE
  out.mkdir(parents=True, exist_ok=True)
  config = load_config(spec)
  for part in args.parts:
    start = time.time()
    if part == "main":
      run_main(spec, workdir, out)
    elif part == "ablation":
      run_ablation(config, workdir, out)
    elif part == "variants":
      run_variants(config, workdir, out)
    elif part == "dead_maps":
      run_dead_maps(config, workdir, out)
    else:
      run_separation(config, workdir, out)
    print(f"[experiments.envise] {part}: {time.time() - start:.0f} s", flush=True)
  make_readme.main(["--dir", str(out)])


if __name__ == "__main__":
  main()
