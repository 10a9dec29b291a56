"""Batched scoring, results tables, and the main job end to end on a smoke config."""
import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from oodjax import detectors, evaluate
from oodjax.data.core import ImageDataset

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _linear_apply(variables, x):
  return x.reshape(x.shape[0], -1) @ variables["w"]  # [B, K]


def _dataset(n, seed, shift=0):
  rng = np.random.default_rng(seed)
  images = np.clip(rng.normal(128 + shift, 40, (n, 4, 4, 1)), 0, 255).astype(np.uint8)
  return ImageDataset(images, np.zeros(n, np.int32), (0.5,), (0.25,), ("a", "b", "c"), "toy")


def test_score_dataset_pads_last_batch_and_matches_one_big_batch():
  rng = np.random.default_rng(0)
  variables = {"w": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)}
  ds = _dataset(23, 1)
  batched = evaluate.score_dataset(detectors.msp, _linear_apply, variables, ds, batch_size=5)
  x = (ds.images.astype(np.float32) / 255 - 0.5) / 0.25
  logits = x.reshape(23, -1).astype(np.float64) @ np.asarray(variables["w"], np.float64)
  p = np.exp(logits - logits.max(1, keepdims=True))
  expected = 1 - (p / p.sum(1, keepdims=True)).max(1)
  assert batched.shape == (23,)
  np.testing.assert_allclose(batched, expected, atol=1e-5)


def test_evaluate_ood_table_matches_sklearn_and_renders():
  rng = np.random.default_rng(0)
  variables = {"w": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)}
  id_ds, ood_ds = _dataset(40, 1), _dataset(30, 2, shift=60)
  results, scores = evaluate.evaluate_ood(_linear_apply, variables, id_ds, {"shifted": ood_ds},
                                          {"msp": detectors.msp}, batch_size=16)
  s_in = evaluate.score_dataset(detectors.msp, _linear_apply, variables, id_ds, 16)
  s_out = evaluate.score_dataset(detectors.msp, _linear_apply, variables,
                                 ood_ds.with_stats(id_ds.mean, id_ds.std), 16)
  # OOD is the positive class of this AUROC only in name: sklearn's AUROC with OOD labelled 1
  # equals the ID-positive AUROC when the score ranks OOD high (the ROC is the same curve).
  expected = roc_auc_score(np.r_[np.zeros(40), np.ones(30)], np.r_[s_in, s_out])
  assert results["detectors"]["msp"]["shifted"]["auroc"] == pytest.approx(expected, abs=1e-6)
  report = evaluate.markdown_report(results)
  assert "### shifted (30 images)" in report and "| Baseline (MSP) |" in report
  np.testing.assert_array_equal(scores["shifted"]["msp"][1], s_out)
  assert f"{100 * expected:.2f}" in report


def test_evaluate_rejects_mismatched_image_sizes():
  variables = {"w": jnp.zeros((16, 3))}
  small = _dataset(5, 0)
  big = ImageDataset(np.zeros((5, 8, 8, 1), np.uint8), np.zeros(5, np.int32), (0.5,), (0.25,),
                     (), "big")
  with pytest.raises(ValueError, match="shape"):
    evaluate.evaluate_ood(_linear_apply, variables, small, {"big": big},
                          {"msp": detectors.msp})


def test_main_job_smoke_end_to_end(tmp_path):
  """`oodjax run` on the smoke config: trains, checkpoints, writes results; a second run
  resumes from the finished checkpoint instead of training again."""
  cmd = [sys.executable, "-m", "oodjax.cli", "run", "--config",
         str(ROOT / "configs" / "fmnist_small_cnn.py") + ":smoke", "--workdir", str(tmp_path),
         "--no-progress", "--set", "eval.ood_sets=('embedded/uniform_noise',)"]
  first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert set(results["detectors"]["msp"]) == {"embedded/uniform_noise"}
  assert results["accuracy"] > 0.5  # 2,048 images, one epoch: far above chance (10%)
  assert (tmp_path / "metrics.jsonl").read_text().strip()
  lines_before = (tmp_path / "metrics.jsonl").read_text().count("\n")
  second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  assert json.loads((tmp_path / "results.json").read_text())["accuracy"] == results["accuracy"]
  # No training steps were logged the second time.
  train_lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
                 [lines_before:]]
  assert not [l for l in train_lines if l.get("kind", l.get("type")) == "train"]


def test_cli_reports_bad_override_without_traceback(tmp_path):
  cmd = [sys.executable, "-m", "oodjax.cli", "train", "--config",
         str(ROOT / "configs" / "fmnist_small_cnn.py"), "--workdir", str(tmp_path),
         "--set", "trian.num_epochs=1"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "no key" in proc.stderr and "Traceback" not in proc.stderr


def test_evaluate_with_odin_uses_one_split_for_every_row_and_writes_plots(tmp_path):
  from oodjax import tuning
  rng = np.random.default_rng(0)
  variables = {"w": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)}
  id_ds, ood_ds = _dataset(60, 1), _dataset(50, 2, shift=60)
  odin = dict(temperatures=(1.0, 100.0), epsilons=(0.0, 0.004), no_ood_temperature=100.0,
              chunk_size=16)
  results, scores = evaluate.evaluate_ood(_linear_apply, variables, id_ds, {"shifted": ood_ds},
                                          {"msp": detectors.msp}, batch_size=16, odin=odin,
                                          holdout=20, seed=3)
  assert set(results["detectors"]) == {"msp", "odin", "odin_no_ood"}
  _, eval_in, _, eval_out = tuning.split_holdout(60, 50, 20, 3)
  for det in ("msp", "odin", "odin_no_ood"):
    s_in, s_out = scores["shifted"][det]
    assert s_in.shape == (40,) and s_out.shape == (30,)
  # The ODIN row, recomputed independently: score the evaluation images with `odin` at the
  # chosen (T, eps) and compare with sklearn's AUROC.
  row = results["detectors"]["odin"]["shifted"]
  hyper = dict(temperature=row["temperature"], epsilon=row["epsilon"], std=id_ds.std)
  s_in = evaluate.score_dataset(detectors.odin, _linear_apply, variables, id_ds.take(eval_in),
                                16, **hyper)
  s_out = evaluate.score_dataset(detectors.odin, _linear_apply, variables,
                                 ood_ds.with_stats(id_ds.mean, id_ds.std).take(eval_out), 16,
                                 **hyper)
  expected = roc_auc_score(np.r_[np.zeros(40), np.ones(30)], np.r_[s_in, s_out])
  assert row["auroc"] == pytest.approx(expected, abs=1e-5)
  grid = results["odin_grid"]["shifted"]
  assert np.asarray(grid["fpr95"]).shape == (2, 2)
  assert min(map(min, grid["fpr95"])) == row["tune_fpr95"]
  report = evaluate.write_results(results, tmp_path, scores=scores)
  assert "ODIN (tuned on OOD)" in report and "ODIN (tuned without OOD)" in report
  for name in ("roc_shifted.png", "hist_shifted.png", "odin_fpr95_shifted.png"):
    assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"
  assert json.loads((tmp_path / "results.json").read_text())["protocol"]["holdout"] == 20


def test_odin_needs_a_holdout():
  variables = {"w": jnp.zeros((16, 3))}
  with pytest.raises(ValueError, match="holdout"):
    evaluate.evaluate_ood(_linear_apply, variables, _dataset(10, 0), {"o": _dataset(10, 1)}, {},
                          odin=dict(temperatures=(1.0,), epsilons=(0.0,),
                                    no_ood_temperature=1.0))


def test_sample_free_rows_and_one_c_sum_by_hand():
  import functools

  import jax

  from oodjax import models
  from oodjax.detectors import onecsum
  model = models.get_model("small_cnn_tiny", num_classes=3)
  rng = np.random.default_rng(5)
  id_ds = ImageDataset(rng.integers(0, 255, (30, 8, 8, 1), dtype=np.uint8),
                       np.zeros(30, np.int32), (0.5,), (0.25,), ("a", "b", "c"), "id")
  ood_ds = ImageDataset(rng.integers(100, 255, (20, 8, 8, 1), dtype=np.uint8),
                        np.zeros(20, np.int32), (0.5,), (0.25,), (), "ood")
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  stats = onecsum.fit_noise_stats(model, variables, (8, 8, 1), (0.5,), (0.25,), n=64, seed=1,
                                  batch_size=32)
  results, scores = evaluate.evaluate_ood(
      functools.partial(model.apply, train=False), variables, id_ds, {"ood": ood_ds}, {},
      batch_size=16, holdout=None, model=model,
      sample_free={"indicators": True, "one_c_sum": True, "noise_stats": stats})
  assert "ind:DMS" in results["detectors"] and "1c_sum" in results["detectors"]
  # 1C-Sum by hand: standardise each member indicator with the noise mean/std, then sum.
  ind_in = evaluate.indicator_scores(model, variables, id_ds, 16)
  by_hand = sum((ind_in[k].astype(np.float64) - v["mean"]) / v["std"]
                for k, v in stats["indicators"].items() if v["std"] > 0)
  np.testing.assert_allclose(scores["ood"]["1c_sum"][0], by_hand, rtol=1e-4, atol=1e-3)
  np.testing.assert_array_equal(scores["ood"]["ind:DMS"][0], ind_in["DMS"])


def test_shared_id_grid_gives_what_tune_odin_gives():
  """evaluate scores the held-out ID grid once for all OOD sets; per set, the choice and the
  metrics must equal `tuning.tune_odin`, which recomputes everything for that set."""
  from oodjax import tuning
  from oodjax.data.core import normalize
  rng = np.random.default_rng(1)
  variables = {"w": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)}
  id_ds = _dataset(50, 1)
  oods = {"near": _dataset(40, 2, shift=20), "far": _dataset(45, 3, shift=80)}
  odin = dict(temperatures=(1.0, 10.0, 1000.0), epsilons=(0.0, 0.002, 0.004),
              no_ood_temperature=1000.0, chunk_size=16, tuned_without_ood=False)
  results, _ = evaluate.evaluate_ood(_linear_apply, variables, id_ds, oods, {}, 16, odin=odin,
                                     holdout=15, seed=2)
  x_in = normalize(id_ds.images, id_ds.mean, id_ds.std)
  for name, ds in oods.items():
    ref = tuning.tune_odin(_linear_apply, variables, x_in,
                           normalize(ds.images, id_ds.mean, id_ds.std), std=id_ds.std,
                           temperatures=odin["temperatures"], epsilons=odin["epsilons"],
                           holdout=15, seed=2, chunk_size=16)
    row = results["detectors"]["odin"][name]
    assert (row["temperature"], row["epsilon"]) == (ref["temperature"], ref["epsilon"])
    for key, value in ref["metrics"].items():
      assert row[key] == pytest.approx(value, abs=1e-6)
