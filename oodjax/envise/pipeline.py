"""ENVISE from a config: online runs, the gates' evaluation per scenario, efficiency, plots.

    oodjax run --config configs/envise_embedded.py --workdir runs/envise

`oodjax run` trains the config's classifier, which is ENVISE's frozen TEACHER (trained on all
classes of `config.dataset`), evaluates it as every config does, and then, because the config
has an `envise` section (`envise_config`), calls `run_envise`, which

 1. builds the image stream: the scenarios `envise.scenarios` played in order over the
    `envise.split` split of `config.dataset` (`oodjax.envise.stream.make_stream` with
    `envise.stream`); with `envise.adaptive_inliers_only` the adaptive phases read a stream of
    the same draws restricted to inlier classes (the paper's "# OL train" = 0);
 2. adapts one student per network its gates need (`STUDENT_RUNS`, from the registry entries
    named in `envise.detectors`) and per extra Figure 3 kind (`envise.figure3_kinds`), each an
    `oodjax.envise.online.run_online` in `workdir/<run>` (resumable, logged per step);
 3. evaluates every gate on every scenario, in-distribution = the scenario's inlier classes,
    OOD = its outlier classes, on the `envise.eval_split` images of those classes, with the
    student deployed in that scenario (`online.load_snapshot`): FPR@95, detection error, AUROC,
    AUPR-in, AUPR-out through `oodjax.evaluate.evaluate_ood` (Tables 2-4 analogues);
 4. measures accuracy on the scenario's inlier test images of the student, the teacher and the
    combined system with the scenario's routing threshold (Table 6 analogue), the FLOPs of
    teacher and students (`efficiency.model_flops`) and GiE (Eq. 8) per gate and scenario
    (Figure 5 analogue);
 5. writes `results.json`, `results.md`, `figure3.png` (accuracy along the stream per student,
    the Figure 3 analogue) and `gradcam_overlay.png` (teacher vs student Grad-CAM maps on
    stream images), and prints the time of every stage.

GiE per gate, two ways (both Eq. 8 with the paper's X, Y = FLOPs of teacher and student, p = the
scenario's inlier probability, N_tr / N_in = the run's adaptive / inference steps):
  * "gie_at_tpr95": the gate's threshold keeps 95% of the inlier test images with the student
    (inliers routed f_p = 0.05) and routes the outliers it scores above it (o_d = 1 - FPR@95);
    every gate is compared at the same inlier cost.
  * "gie_online": the routing the online run actually did (MSP with the quantile threshold of
    `online_config`), its measured f_p and o_d; for the networks' runs only, since the online
    loop routes by max softmax.
  One student pass per image is counted for every gate; ODIN's input perturbation costs the
  student a backward and a second forward pass more, which GiE as defined does not include.

Choices (ours, the paper being silent): the stream reads the TRAINING split of the embedded
set and the gates are evaluated on its TEST split, so no evaluation image was seen by the
student or the teacher (configs/envise_cifar.py keeps the paper's reading: both from the test
set, see its docstring).
"""
from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from oodjax import data as data_lib
from oodjax.batching import map_padded
from oodjax.envise import efficiency, online, scenarios as scenarios_lib, students, stream
from oodjax.fileio import atomic_write_json, atomic_write_text
from oodjax.models.insides import inference_apply

PyTree = Any

# How each student network the gates score is adapted: overrides of `envise.online`.
STUDENT_RUNS: dict[str, dict[str, Any]] = {
    "envise_bsn": {"student_kind": "bsn"},  # ENVISE: BSN, L_d + L_at
    "envise_bsn_ld": {"student_kind": "bsn", "loss": {"attention": "none"}},  # L_d only
    "envise_rvsn": {"student_kind": "rvsn"},  # the real-valued twin, L_d + L_at
}
# Extra runs for Figure 3 only (no gate scores them).
FIGURE3_RUNS: dict[str, dict[str, Any]] = {
    "binarised_rvsn": {"student_kind": "binarised_rvsn"},
    "standalone": {"student_kind": "standalone"},
}
RUN_LABELS = {"envise_bsn": "BSN (L_d + L_at)", "envise_bsn_ld": "BSN (L_d only)",
              "envise_rvsn": "RvSN (L_d + L_at)", "binarised_rvsn": "binarised RvSN",
              "standalone": "standalone BSN (not adapted)"}
DEFAULT_DETECTORS = ("envise_gate", "msp_gated", "odin_gated", "envise_gate_rvsn")
# The paper's figures for its own architectures (MFLOPs, Sec. 4 / Fig. 5 caption).
PAPER_MFLOPS = {"teacher (DenseNet-201)": 9048, "RvSN (VGG-16)": 310, "BSN (binary VGG-16)": 6}
GATE_TPR = 0.95
METRICS = ("fpr95", "detection_error", "auroc", "aupr_in", "aupr_out")


# ---------------------------------------------------------------------------------------------
# Config


def envise_config(**overrides) -> ml_collections.ConfigDict:
  """The `envise` section of an experiment config, with `overrides` applied.

  Keys:
    enabled            False: `oodjax run` / `evaluate` skip ENVISE (`--set envise.enabled=False`).
    scenarios          names, played in order: keys of `scenarios.EMBEDDED_SCENARIOS`,
                       `CIFAR100_SCENARIOS` or `TINY_IMAGENET_SCENARIOS`.
    student            a key of `students.STUDENTS`.
    split              split of `config.dataset` the stream draws from ("train").
    eval_split         split whose inlier / outlier images evaluate the gates ("test").
    adaptive_inliers_only  adaptive phases see inlier classes only (True, the paper's).
    detectors          ENVISE registry entries to evaluate (DEFAULT_DETECTORS).
    figure3_kinds      extra student kinds for Figure 3 (keys of FIGURE3_RUNS).
    online             an `online.online_config` (the runs' shared settings).
    stream             keyword arguments of `stream.make_stream` (lengths, batch size, seed,
                       augmentation); an override replaces the whole dict.
    eval               holdout (held-out inlier images for fits that see them: ODIN's ε),
                       batch_size, seed, and "odin" options of the `odin_gated` entry.
    overlay_images     stream images in the Grad-CAM overlay (0: none).
  """
  c = ml_collections.ConfigDict()
  c.enabled = True
  c.scenarios = ("zoo", "shop")
  c.student = "binary_tiny"
  c.split = "train"
  c.eval_split = "test"
  c.adaptive_inliers_only = True
  c.detectors = DEFAULT_DETECTORS
  c.figure3_kinds = tuple(FIGURE3_RUNS)
  c.online = online.online_config(optimizer={"learning_rate": 1e-3},
                                  adaptive={"window": 25, "max_steps": 200},
                                  checkpoint={"every_steps": 100})
  c.stream = ml_collections.ConfigDict({"images_per_scenario": 4000, "batch_size": 10,
                                        "seed": 0, "augment": True})
  c.eval = ml_collections.ConfigDict({"holdout": 100, "batch_size": 500, "seed": 0,
                                      "odin": {"chunk_size": 250}})
  c.overlay_images = 6
  for key, value in overrides.items():
    if key not in c:
      raise ValueError(f"unknown envise config key {key!r}; known: {sorted(c)}")
    if key == "online":
      value = merged_online_config(c.online, value)
    elif key == "stream":  # make_stream's keyword arguments, replaced as a whole
      value = ml_collections.ConfigDict(dict(value))
    elif isinstance(c[key], ml_collections.ConfigDict):
      value = ml_collections.ConfigDict({**c[key].to_dict(), **dict(value)})
    c[key] = value
  return c


def merged_online_config(base: ml_collections.ConfigDict, overrides: Mapping[str, Any]
                         ) -> ml_collections.ConfigDict:
  """`base` (an online config) with a run's overrides merged group by group, validated."""
  merged = {k: (dict(v) if isinstance(v, (Mapping, ml_collections.ConfigDict)) else v)
            for k, v in base.items()}
  for key, value in overrides.items():
    merged[key] = {**merged[key], **value} if isinstance(value, Mapping) else value
  return online.online_config(**merged)


def resolve_scenarios(names: Sequence[str], class_names: Sequence[str]
                      ) -> tuple[scenarios_lib.Scenario, ...]:
  """The named scenarios, validated against the dataset's classes.

  Raises:
    ValueError: an unknown scenario name, or a scenario whose classes do not fit.
  """
  known = {**scenarios_lib.EMBEDDED_SCENARIOS, **scenarios_lib.CIFAR100_SCENARIOS,
           **scenarios_lib.TINY_IMAGENET_SCENARIOS}
  if isinstance(names, str) or not names:
    raise ValueError(f"envise.scenarios must be a non-empty list of names, got {names!r}")
  out = []
  for name in names:
    if name not in known:
      raise ValueError(f"unknown ENVISE scenario {name!r}; known: {sorted(known)}")
    out.append(scenarios_lib.validate(known[name], class_names))
  return tuple(out)


def runs_of(ec: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """{run name: online overrides}: the networks the gates need, then the Figure 3 kinds."""
  from oodjax.detectors import REGISTRY  # pylint: disable=g-import-not-at-top
  runs = {}
  for name in ec.detectors:
    network = REGISTRY[name].network
    runs[network] = STUDENT_RUNS[network]
  for kind in ec.figure3_kinds:
    runs[kind] = FIGURE3_RUNS[kind]
  return runs


def check_envise_config(config: ml_collections.ConfigDict, class_names: Sequence[str]) -> None:
  """Every error of an experiment config's `envise` section, before anything is trained.

  Raises:
    ValueError: unknown scenarios or classes, overlapping inlier and outlier sets, bad
      probabilities, a detector that is not an ENVISE gate, an unknown student, Figure 3 kind
      or online setting, stream lengths that are not multiples of the batch size, or a
      stream batch size different from the online one.
  """
  from oodjax.detectors import REGISTRY  # pylint: disable=g-import-not-at-top
  ec = config.envise
  resolve_scenarios(ec.scenarios, class_names)
  if ec.student not in students.STUDENTS:
    raise ValueError(f"unknown envise.student {ec.student!r}; known: {sorted(students.STUDENTS)}")
  for name in ec.detectors:
    if name not in REGISTRY or REGISTRY[name].network not in STUDENT_RUNS:
      gates = sorted(n for n, d in REGISTRY.items() if d.network in STUDENT_RUNS)
      raise ValueError(f"envise.detectors: {name!r} is not an ENVISE gate; known: {gates}")
  unknown = [k for k in ec.figure3_kinds if k not in FIGURE3_RUNS]
  if unknown:
    raise ValueError(f"unknown envise.figure3_kinds {unknown}; known: {sorted(FIGURE3_RUNS)}")
  if not ec.detectors and not ec.figure3_kinds:
    raise ValueError("envise.detectors and envise.figure3_kinds are both empty: nothing to run")
  for overrides in runs_of(ec).values():
    merged_online_config(ec.online, overrides)
  if int(ec.stream.get("batch_size", 10)) != int(ec.online.batch_size):
    raise ValueError(f"envise.stream.batch_size {ec.stream.get('batch_size', 10)} differs from "
                     f"envise.online.batch_size {ec.online.batch_size}")
  sizes = stream._scenario_sizes(  # pylint: disable=protected-access
      len(ec.scenarios), ec.stream.get("images_per_scenario"),
      ec.stream.get("epochs_per_scenario"), ec.stream.get("epoch_size"))
  for name, n in zip(ec.scenarios, sizes):
    if n <= 0 or n % int(ec.online.batch_size):
      raise ValueError(f"envise.stream: scenario {name!r} has {n} images, not a positive "
                       f"multiple of the batch size {ec.online.batch_size}")
  if int(ec.overlay_images) < 0 or int(ec.overlay_images) > int(ec.online.batch_size):
    raise ValueError(f"envise.overlay_images must be in [0, batch size "
                     f"{ec.online.batch_size}], got {ec.overlay_images}")


def scenario_streams(ec: ml_collections.ConfigDict, stream_ds):
  """(scenarios, deployment stream, adaptive stream or None) of an `envise` section over
  `stream_ds`; the adaptive stream has the same draws restricted to inlier classes."""
  scenarios = resolve_scenarios(ec.scenarios, stream_ds.class_names)
  deploy = stream.make_stream(stream_ds, scenarios, **ec.stream)
  adapt = (stream.make_stream(stream_ds, [scenarios_lib.inliers_only(s) for s in scenarios],
                              **ec.stream) if ec.adaptive_inliers_only else None)
  return scenarios, deploy, adapt


# ---------------------------------------------------------------------------------------------
# Measurements


def split_scenario(ds, scenario: scenarios_lib.Scenario):
  """(inlier images, outlier images) of `ds` for a scenario: two ImageDatasets."""
  names = tuple(ds.class_names)
  inlier = scenarios_lib.inlier_mask(scenario, names)  # [K]
  outlier = np.isin(np.asarray(names), np.asarray(scenario.outliers))  # [K]
  labels = np.asarray(ds.labels)
  return (ds.take(np.flatnonzero(inlier[labels])), ds.take(np.flatnonzero(outlier[labels])))


def system_accuracy(student, student_variables: PyTree, teacher, teacher_variables: PyTree,
                    ds, threshold: float | None, batch_size: int = 500) -> dict[str, float]:
  """Accuracy on `ds` of the student, the teacher and the combined system (Table 6).

  The combined prediction is the teacher's for the images whose student max softmax is below
  `threshold` (routed), the student's elsewhere; None: no inference phase, everything routed.

  Returns:
    {"student", "teacher", "combined", "routed"} fractions of the images.
  """
  s_apply, t_apply = inference_apply(student), inference_apply(teacher)
  images = data_lib.core.normalize(ds.images, ds.mean, ds.std)

  def logits(x):
    return online.predict(s_apply, t_apply, student_variables, teacher_variables, x)

  s_logits, t_logits = map_padded(logits, images, batch_size)
  labels = np.asarray(ds.labels)
  conf = np.asarray(online.confidence(s_logits))
  routed = np.ones(len(labels), bool) if threshold is None else conf < np.float32(threshold)
  s_pred, t_pred = s_logits.argmax(-1), t_logits.argmax(-1)
  combined = np.where(routed, t_pred, s_pred)
  return {"student": float(np.mean(s_pred == labels)), "teacher": float(np.mean(t_pred == labels)),
          "combined": float(np.mean(combined == labels)), "routed": float(np.mean(routed))}


def _gie(teacher_flops, student_flops, p, inlier_routed, outlier_routed, n_tr, n_in):
  if None in (inlier_routed, outlier_routed) or n_tr + n_in == 0:
    return None
  return float(efficiency.gain_in_efficiency(teacher_flops, student_flops, p, inlier_routed,
                                             outlier_routed, n_tr, n_in))


class _Timer:
  """Seconds per named stage, printed as they end."""

  def __init__(self):
    self.stages: dict[str, float] = {}
    self._start = time.time()

  def done(self, name: str) -> None:
    now = time.time()
    self.stages[name] = round(now - self._start, 1)
    print(f"[envise] {name}: {now - self._start:.0f} s", flush=True)
    self._start = now


# ---------------------------------------------------------------------------------------------
# The experiment


def run_envise(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
               teacher, teacher_variables: PyTree, data_dir: str | None = None,
               progress: bool | None = None, stream_ds=None, eval_ds=None) -> dict[str, Any]:
  """Runs ENVISE as `config.envise` says with a trained teacher; see the module docstring.

  Args:
    config: an experiment config with an `envise` section (`envise_config`).
    workdir: the ENVISE folder (one sub-folder per online run; results at its top).
    teacher: the frozen teacher (the experiment's classifier) and teacher_variables its
      variables; its K outputs are `config.dataset`'s classes.
    data_dir: TFDS data folder, for tfds/ datasets.
    progress: progress bars of the online runs (None: when stderr is a terminal).
    stream_ds, eval_ds: labelled ImageDatasets to use instead of loading `envise.split` and
      `envise.eval_split` of `config.dataset` (e.g. data held in memory).

  Returns:
    The results dict written to `workdir/results.json`.
  """
  from oodjax.detectors import REGISTRY  # pylint: disable=g-import-not-at-top
  from oodjax.evaluate import evaluate_ood  # pylint: disable=g-import-not-at-top
  ec = config.envise
  workdir = pathlib.Path(workdir)
  timer = _Timer()
  if stream_ds is None:
    stream_ds = data_lib.load_config_dataset(config, ec.split, data_dir=data_dir)
  if eval_ds is None:
    eval_ds = data_lib.load_config_dataset(config, ec.eval_split, data_dir=data_dir)
  if tuple(eval_ds.class_names) != tuple(stream_ds.class_names):
    raise ValueError("the stream's and the evaluation's datasets have different classes")
  check_envise_config(config, stream_ds.class_names)
  scenarios, deploy, adapt = scenario_streams(ec, stream_ds)
  student = students.get_student(ec.student, stream_ds.num_classes)
  timer.done("streams")

  # 2. The online runs.
  runs = runs_of(ec)
  summaries, deployed = {}, {}
  for run, overrides in runs.items():
    oc = merged_online_config(ec.online, overrides)
    print(f"[envise] online run {run}: {RUN_LABELS[run]}, {deploy.num_steps} steps", flush=True)
    summaries[run] = online.run_online(oc, workdir / run, teacher=teacher,
                                       teacher_variables=teacher_variables, student=student,
                                       stream=deploy, adaptive_stream=adapt, progress=progress)
    deployed[run] = online.student_modules(student, oc.student_kind)[1]
    timer.done(f"online run {run}")

  # 3-4. Gates, accuracies and GiE per scenario.
  image_shape = eval_ds.image_shape
  teacher_flops = efficiency.model_flops(teacher, teacher_variables, image_shape)
  # What each run deployed in each scenario, read once: snapshots[run][scenario].
  snapshots = {run: [online.load_snapshot(workdir / run, i) for i in range(len(scenarios))]
               for run in runs}
  flops = {"teacher": teacher_flops}
  for run in (r for r in runs if r in STUDENT_RUNS):
    flops[run] = efficiency.model_flops(deployed[run], snapshots[run][0], image_shape)
  groups: dict[str, list[str]] = {}
  for name in ec.detectors:
    groups.setdefault(REGISTRY[name].network, []).append(name)
  options = {k: dict(v) for k, v in ec.eval.items() if isinstance(v, (Mapping,
                                                                      ml_collections.ConfigDict))}
  per_scenario = []
  for index, scenario in enumerate(scenarios):
    inliers, outliers = split_scenario(eval_ds, scenario)
    entry = {"scenario": scenario.name, "description": scenario.description,
             "inlier_probability": float(scenario.inlier_probability),
             "num_inliers": len(inliers), "num_outliers": len(outliers),
             "gates": {}, "accuracy": {}, "online": {}}
    for run in runs:
      s = summaries[run]["scenarios"][index]
      entry["online"][run] = {k: s[k] for k in (
          "adaptive_steps", "adaptive_end", "final_window_agreement", "threshold",
          "inference_steps", "student_accuracy", "teacher_accuracy", "combined_accuracy",
          "inlier_routed", "outlier_routed")}
      entry["accuracy"][run] = system_accuracy(deployed[run], snapshots[run][index], teacher,
                                               teacher_variables, inliers, s["threshold"],
                                               int(ec.eval.batch_size))
      if run in flops:
        entry["online"][run]["gie_online"] = _gie(
            teacher_flops["layer_total"], flops[run]["layer_total"],
            scenario.inlier_probability, s["inlier_routed"], s["outlier_routed"],
            s["adaptive_steps"], s["inference_steps"])
    for network, names in groups.items():
      results, _ = evaluate_ood(deployed[network], snapshots[network][index], inliers,
                                {"outliers": outliers},
                                tuple(names), options=options, holdout=ec.eval.holdout,
                                seed=int(ec.eval.seed), batch_size=int(ec.eval.batch_size))
      s = summaries[network]["scenarios"][index]
      for row in results["rows"]:
        metrics = {k: float(results["detectors"][row]["outliers"][k]) for k in METRICS}
        info = results["fit_info"].get(row) or {}
        entry["gates"][row] = {
            "label": results["labels"][row], "network": network, **metrics,
            **{k: info[k] for k in ("temperature", "epsilon") if k in info},
            "gie_at_tpr95": _gie(teacher_flops["layer_total"], flops[network]["layer_total"],
                                 scenario.inlier_probability, 1.0 - GATE_TPR,
                                 1.0 - metrics["fpr95"], s["adaptive_steps"],
                                 s["inference_steps"])}
    entry["gates"] = {row: entry["gates"][row] for row in ec.detectors}  # the config's order
    per_scenario.append(entry)
  timer.done("gates, accuracies and GiE")

  # 5. Plots and files.
  plots = {}
  if runs:
    plots["figure3"] = "figure3.png"
    online.plot_online({RUN_LABELS[r]: workdir / r / online.LOG_NAME for r in runs},
                       workdir / plots["figure3"], smooth=max(1, deploy.num_steps // 100),
                       title="Online distillation on " + " -> ".join(s.name for s in scenarios))
  overlay_run = next((r for r in ("envise_bsn", "envise_rvsn", "envise_bsn_ld") if r in runs),
                     None)
  if int(ec.overlay_images) and overlay_run:
    from oodjax.envise.visualize import gradcam_overlay_png  # pylint: disable=g-import-not-at-top
    last = len(scenarios) - 1
    images = stream.batch_at(deploy, deploy.num_steps - 1)["image"][:int(ec.overlay_images)]
    plots["gradcam_overlay"] = "gradcam_overlay.png"
    gradcam_overlay_png(teacher, teacher_variables, deployed[overlay_run],
                        snapshots[overlay_run][last], images,
                        workdir / plots["gradcam_overlay"], class_names=stream_ds.class_names)
  timer.done("plots")
  results = {
      "dataset": config.dataset, "teacher": config.model, "student": ec.student,
      "scenarios": [s.name for s in scenarios], "stream_steps": deploy.num_steps,
      "runs": {r: RUN_LABELS[r] for r in runs}, "detectors": list(ec.detectors),
      "flops": flops, "paper_mflops": PAPER_MFLOPS, "per_scenario": per_scenario,
      "means": _means(per_scenario), "seconds": timer.stages,
      "envise_config": json.loads(ec.to_json()), "plots": plots}
  atomic_write_json(workdir / "results.json", results)
  atomic_write_text(workdir / "results.md", results_markdown(results))
  return results


def _mean(values) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def _means(per_scenario: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Means over scenarios of every gate metric, GiE and accuracy."""
  gates = {}
  for row in per_scenario[0]["gates"] if per_scenario else ():
    gates[row] = {k: _mean(e["gates"][row][k] for e in per_scenario)
                  for k in (*METRICS, "gie_at_tpr95")}
  accuracy = {}
  for run in per_scenario[0]["accuracy"] if per_scenario else ():
    accuracy[run] = {k: _mean(e["accuracy"][run][k] for e in per_scenario)
                     for k in ("student", "teacher", "combined", "routed")}
  adaptive = {run: _mean(e["online"][run]["adaptive_steps"] for e in per_scenario)
              for run in (per_scenario[0]["online"] if per_scenario else ())}
  return {"gates": gates, "accuracy": accuracy, "adaptive_steps": adaptive}


def _f(value, digits: int = 3) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def results_markdown(results: Mapping[str, Any]) -> str:
  """The report of `run_envise`, generated from its results dict."""
  lines = [f"# ENVISE: {results['student']} student, {results['teacher']} teacher on "
           f"{results['dataset']}", "",
           f"Scenarios, in stream order: {', '.join(results['scenarios'])} "
           f"({results['stream_steps']} stream steps). In-distribution (positive) = the "
           "scenario's inlier classes, OOD = its outlier classes, on held-apart test images.", ""]
  lines += ["## Gates (Tables 2-4 analogue): outlier detection per scenario", "",
            "| scenario | gate | FPR@95 | det. error | AUROC | AUPR-in | AUPR-out | GiE@TPR95 |",
            "|---|---|---|---|---|---|---|---|"]
  for e in results["per_scenario"]:
    for row, g in e["gates"].items():
      lines.append(f"| {e['scenario']} | {g['label']} | " + " | ".join(
          _f(g[k]) for k in (*METRICS, "gie_at_tpr95")) + " |")
  for row, g in results["means"]["gates"].items():
    label = results["per_scenario"][0]["gates"][row]["label"]
    lines.append(f"| **mean** | {label} | " + " | ".join(
        _f(g[k]) for k in (*METRICS, "gie_at_tpr95")) + " |")
  lines += ["", "## Accuracy on the inlier test images (Table 6 analogue)", "",
            "| scenario | student run | student | teacher | combined | routed |",
            "|---|---|---|---|---|---|"]
  for e in results["per_scenario"]:
    for run, a in e["accuracy"].items():
      lines.append(f"| {e['scenario']} | {results['runs'][run]} | {_f(a['student'])} | "
                   f"{_f(a['teacher'])} | {_f(a['combined'])} | {_f(a['routed'])} |")
  lines += ["", "## Online runs: adaptive phase and measured routing", "",
            "| scenario | student run | adaptive steps | ended by | last window agreement | "
            "inference steps | inliers routed | outliers routed | GiE (online) |",
            "|---|---|---|---|---|---|---|---|---|"]
  for e in results["per_scenario"]:
    for run, o in e["online"].items():
      lines.append(f"| {e['scenario']} | {results['runs'][run]} | {o['adaptive_steps']} | "
                   f"{o['adaptive_end']} | {_f(o['final_window_agreement'])} | "
                   f"{o['inference_steps']} | {_f(o['inlier_routed'])} | "
                   f"{_f(o['outlier_routed'])} | {_f(o.get('gie_online'))} |")
  lines += ["", "## FLOPs of one image (FLOPs = MACs; binary MACs / 64, as XNOR-Net)", "",
            "| network | ours: total | ours: binary part | paper (MFLOPs, its architectures) |",
            "|---|---|---|---|"]
  paper = {"teacher": "9048 (DenseNet-201)", "envise_bsn": "6 (binary VGG-16)",
           "envise_bsn_ld": "6 (binary VGG-16)", "envise_rvsn": "310 (VGG-16)"}
  for name, f in results["flops"].items():
    lines.append(f"| {results['runs'].get(name, name)} | {f['layer_total'] / 1e6:.3f} M | "
                 f"{f['binary'] / 1e6:.3f} M | {paper.get(name, '-')} |")
  lines += ["", "Time per stage (s): " + ", ".join(f"{k} {v:.0f}"
                                                   for k, v in results["seconds"].items()), ""]
  return "\n".join(lines)
