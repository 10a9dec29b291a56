"""The evaluation protocol: batched scoring, rows, fitted states, a user's own detector,
compile-once, the report, and the main job end to end (against the pre-registry numbers)."""
import json
import pathlib
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from oodjax import evaluate, report
from oodjax.data.core import ImageDataset, normalize
from oodjax.detectors import REGISTRY, Detector, odin, protocol
from oodjax.detectors.odin import tuning

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "fmnist_small_cnn.py") + ":smoke"


class Linear(nn.Module):
  """Flatten, then one Dense: logits a float64 numpy reference can recompute."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def _linear(seed=0):
  model = Linear()
  return model, model.init(jax.random.key(seed), jnp.zeros((1, 4, 4, 1)))


def _dataset(n, seed, shift=0):
  rng = np.random.default_rng(seed)
  images = np.clip(rng.normal(128 + shift, 40, (n, 4, 4, 1)), 0, 255).astype(np.uint8)
  return ImageDataset(images, np.zeros(n, np.int32), (0.5,), (0.25,), ("a", "b", "c"), "toy")


def _np_msp(variables, ds):
  x = (ds.images.astype(np.float64) / 255 - 0.5) / 0.25
  p = variables["params"]["Dense_0"]
  logits = x.reshape(len(ds), -1) @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"])
  e = np.exp(logits - logits.max(1, keepdims=True))
  return 1 - (e / e.sum(1, keepdims=True)).max(1)


def test_score_dataset_pads_the_last_batch_and_matches_a_numpy_forward():
  model, variables = _linear()
  ds = _dataset(23, 1)
  entries = {"msp": REGISTRY["msp"]}
  rows = evaluate.score_dataset(model, variables, entries, {"msp": {}}, ds, batch_size=5)
  assert rows["msp"].shape == (23,)
  np.testing.assert_allclose(rows["msp"], _np_msp(variables, ds), atol=1e-5)


def test_rows_match_sklearn_and_render_without_jax(tmp_path):
  model, variables = _linear()
  id_ds, ood_ds = _dataset(40, 1), _dataset(30, 2, shift=60)
  results, scores = evaluate.evaluate_ood(model, variables, id_ds, {"shifted": ood_ds}, ["msp"],
                                          batch_size=16)
  s_in, s_out = _np_msp(variables, id_ds), _np_msp(variables, ood_ds)
  # sklearn's AUROC with OOD labelled 1 equals the ID-positive AUROC when the score ranks OOD
  # high (the ROC is the same curve).
  expected = roc_auc_score(np.r_[np.zeros(40), np.ones(30)], np.r_[s_in, s_out])
  assert results["detectors"]["msp"]["shifted"]["auroc"] == pytest.approx(expected, abs=1e-6)
  np.testing.assert_allclose(scores["shifted"]["msp"][1], s_out, atol=1e-5)
  text = report.write_results(results, tmp_path, scores=scores)
  assert "### shifted (30 images)" in text and "| Baseline (MSP) |" in text
  assert f"{100 * expected:.2f}" in text
  # The report renders from the JSON alone, in a process that never imports JAX.
  code = ("import json, sys; from oodjax import report; "
          f"text = report.markdown_report(json.load(open({str(tmp_path / 'results.json')!r}))); "
          "assert 'jax' not in sys.modules, 'report imported jax'; print(text)")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == text.strip()


def test_bad_plans_fail_before_any_computation():
  model, variables = _linear()
  small = _dataset(5, 0)
  big = ImageDataset(np.zeros((5, 8, 8, 1), np.uint8), np.zeros(5, np.int32), (0.5,), (0.25,),
                     (), "big")
  with pytest.raises(ValueError, match="shape"):
    evaluate.evaluate_ood(model, variables, small, {"big": big}, ["msp"])
  with pytest.raises(ValueError, match="unknown detectors"):
    evaluate.evaluate_ood(model, variables, small, {"o": small}, ["msp", "nope"])
  with pytest.raises(ValueError, match="holdout"):
    evaluate.evaluate_ood(model, variables, small, {"o": small}, ["odin_tuned_on_ood"])


def test_odin_rows_share_one_split_and_are_odin_at_the_chosen_setting(tmp_path):
  model, variables = _linear()
  id_ds, ood_ds = _dataset(60, 1), _dataset(50, 2, shift=60)
  options = {"odin": dict(temperatures=(1.0, 100.0), epsilons=(0.0, 0.004),
                          no_ood_temperature=100.0, chunk_size=16)}
  names = ["msp", "odin_tuned_on_ood", "odin_tuned_without_ood"]
  results, scores = evaluate.evaluate_ood(model, variables, id_ds, {"shifted": ood_ds}, names,
                                          options=options, holdout=20, seed=3, batch_size=16)
  assert results["rows"] == names
  assert results["sees"]["odin_tuned_on_ood"] == ["heldout_id", "heldout_ood"]
  _, eval_in, _, eval_out = tuning.split_holdout(60, 50, 20, 3)
  for row in names:
    s_in, s_out = scores["shifted"][row]
    assert s_in.shape == (40,) and s_out.shape == (30,)
  # Recomputed independently: odin_score at the chosen (T, eps) on the evaluation images.
  row = results["detectors"]["odin_tuned_on_ood"]["shifted"]
  apply_fn = lambda v, x: model.apply(v, x)
  x_in = normalize(id_ds.images[eval_in], id_ds.mean, id_ds.std)
  x_out = normalize(ood_ds.images[eval_out], id_ds.mean, id_ds.std)
  hyper = dict(temperature=row["temperature"], epsilon=row["epsilon"], std=id_ds.std)
  s_in = odin.odin_score(apply_fn, variables, jnp.asarray(x_in), **hyper)
  s_out = odin.odin_score(apply_fn, variables, jnp.asarray(x_out), **hyper)
  expected = roc_auc_score(np.r_[np.zeros(40), np.ones(30)], np.r_[s_in, s_out])
  assert row["auroc"] == pytest.approx(expected, abs=1e-5)
  grid = results["fit_info"]["odin_tuned_on_ood"]["shifted"]["grid"]
  assert np.asarray(grid["fpr95"]).shape == (2, 2)
  assert min(map(min, grid["fpr95"])) == row["tune_fpr95"]
  text = report.write_results(results, tmp_path, scores=scores)
  assert "ODIN (tuned on OOD) †" in text and "| ODIN (tuned without OOD) |" in text
  for name in ("roc_shifted.png", "hist_shifted.png", "odin_fpr95_shifted.png"):
    assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_shared_id_grid_gives_what_tune_odin_gives():
  """The registry's ODIN fit scores the held-out ID grid once for every OOD set; per set, the
  choice and the metrics must equal `tune_odin`, which recomputes everything for that set."""
  model, variables = _linear(1)
  id_ds = _dataset(50, 1)
  oods = {"near": _dataset(40, 2, shift=20), "far": _dataset(45, 3, shift=80)}
  options = {"odin": dict(temperatures=(1.0, 10.0, 1000.0), epsilons=(0.0, 0.002, 0.004),
                          chunk_size=16)}
  results, _ = evaluate.evaluate_ood(model, variables, id_ds, oods, ["odin_tuned_on_ood"],
                                     options=options, holdout=15, seed=2, batch_size=16)
  x_in = normalize(id_ds.images, id_ds.mean, id_ds.std)
  for name, ds in oods.items():
    ref = tuning.tune_odin(lambda v, x: model.apply(v, x), variables, x_in,
                           normalize(ds.images, id_ds.mean, id_ds.std), std=id_ds.std,
                           temperatures=options["odin"]["temperatures"],
                           epsilons=options["odin"]["epsilons"], holdout=15, seed=2,
                           chunk_size=16)
    row = results["detectors"]["odin_tuned_on_ood"][name]
    assert (row["temperature"], row["epsilon"]) == (ref["temperature"], ref["epsilon"])
    for key, value in ref["metrics"].items():
      assert row[key] == pytest.approx(value, abs=1e-6)


def test_sample_free_rows_and_one_c_sum_by_hand():
  from oodjax import models
  from oodjax.detectors.sample_free import onecsum, whitebox
  model = models.get_model("small_cnn_tiny", num_classes=3)
  rng = np.random.default_rng(5)
  id_ds = ImageDataset(rng.integers(0, 255, (30, 8, 8, 1), dtype=np.uint8),
                       np.zeros(30, np.int32), (0.5,), (0.25,), ("a", "b", "c"), "id")
  ood_ds = ImageDataset(rng.integers(100, 255, (20, 8, 8, 1), dtype=np.uint8),
                        np.zeros(20, np.int32), (0.5,), (0.25,), (), "ood")
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  options = {"sample_free": {"noise_n": 64, "noise_seed": 1}}
  results, scores = evaluate.evaluate_ood(model, variables, id_ds, {"ood": ood_ds},
                                          ["indicators", "1c_sum"], options=options,
                                          batch_size=16)
  assert "ind:DMS" in results["detectors"] and "1c_sum" in results["detectors"]
  assert results["rows"][-1] == "1c_sum" and results["sees"]["1c_sum"] == ["noise"]
  # 1C-Sum by hand: standardise each member indicator with the noise mean/std, then sum.
  stats = onecsum.fit_noise_stats(model, variables, (8, 8, 1), (0.5,), (0.25,), n=64, seed=1,
                                  batch_size=16)
  x_in = jnp.asarray(normalize(id_ds.images, id_ds.mean, id_ds.std))
  ind_in = jax.jit(whitebox.indicators, static_argnums=0)(model, variables, x_in)
  by_hand = sum((np.asarray(ind_in[k], np.float64) - v["mean"]) / v["std"]
                for k, v in stats["indicators"].items() if v["std"] > 0)
  np.testing.assert_allclose(scores["ood"]["1c_sum"][0], by_hand, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(scores["ood"]["ind:DMS"][0], ind_in["DMS"], rtol=1e-6)


# --- A user's own detector, compile-once, fitted states ---------------------------------------

FIT_CALLS = []


def fit_shift(model, variables, data, options):
  """Sees held-out ID images only: the mean max logit there, and a traced scale."""
  FIT_CALLS.append(data)
  logits = model.apply(variables, jnp.asarray(data.heldout_id))
  return ({"centre": jnp.mean(jnp.max(logits, -1)), "scale": jnp.float32(options["scale"])},
          {"centre": float(jnp.mean(jnp.max(logits, -1)))})


def score_shift(model, variables, state, x):
  return state["scale"] * (state["centre"] - jnp.max(model.apply(variables, x), -1))


def test_a_users_detector_end_to_end_with_one_trace_and_a_saved_state(tmp_path):
  """Registered from Python without editing oodjax; its fit sees exactly what it declares; its
  score is traced once for every dataset and every option value; its state is reused."""
  model, variables = _linear(2)
  id_ds = _dataset(40, 1)
  oods = {"a": _dataset(30, 2, shift=40), "b": _dataset(35, 3, shift=-40),
          "c": _dataset(25, 4, shift=90)}
  counted = chex.assert_max_traces(score_shift, n=1)
  registry = {**REGISTRY, "shift": Detector("Shifted max logit", fit_shift, counted,
                                            sees=frozenset({protocol.HELDOUT_ID}),
                                            options="shift", defaults={"scale": 1.0})}
  FIT_CALLS.clear()
  run = lambda scale: evaluate.evaluate_ood(
      model, variables, id_ds, oods, ["msp", "shift"], registry=registry,
      options={"shift": {"scale": scale}}, holdout=10, seed=0, batch_size=16,
      state_dir=tmp_path)
  results, scores = run(2.0)
  (data,) = FIT_CALLS
  assert data.heldout_id.shape == (10, 4, 4, 1)
  assert data.heldout_ood is None and data.id_train is None
  assert results["rows"] == ["msp", "shift"] and results["labels"]["shift"] == "Shifted max logit"
  # The row, by hand: max logit of the evaluation images against the held-out mean.
  tune_in, eval_in, _, eval_out = tuning.split_holdout(40, 25, 10, 0)
  logits_in = np.asarray(model.apply(variables, normalize(id_ds.images, id_ds.mean, id_ds.std)))
  centre = logits_in[tune_in].max(-1).mean()
  np.testing.assert_allclose(scores["c"]["shift"][0], 2.0 * (centre - logits_in[eval_in].max(-1)),
                             rtol=1e-5, atol=1e-5)
  saved = json.loads((tmp_path / "shift.json").read_text())
  assert saved["fitted_on"]["sees"] == ["heldout_id"] and saved["fitted_on"]["options"] == {
      "scale": 2.0}
  # Same plan: the saved state is reused, nothing is refitted or retraced.
  again, _ = run(2.0)
  assert len(FIT_CALLS) == 1 and again["detectors"] == results["detectors"]
  # A new option value is a new fit, but the same compiled scorer (the scale is traced).
  doubled, _ = run(4.0)
  assert len(FIT_CALLS) == 2
  for ood in oods:
    assert doubled["detectors"]["shift"][ood]["auroc"] == pytest.approx(
        results["detectors"]["shift"][ood]["auroc"], abs=1e-6)


def test_one_compiled_scorer_per_model_and_shape_across_sets_and_hyperparameters():
  model, variables = _linear(3)
  id_ds = _dataset(40, 1)
  oods = {"a": _dataset(30, 2, shift=40), "b": _dataset(17, 3, shift=-40)}
  names = ["msp", "energy", "odin_fixed"]
  evaluate._score_rows.clear_cache()  # pylint: disable=protected-access
  for temperature, epsilon in ((1.0, 0.0), (3.0, 0.002), (1000.0, 0.004)):
    evaluate.evaluate_ood(model, variables, id_ds, oods, names, batch_size=16,
                          options={"energy": {"temperature": temperature},
                                   "odin_fixed": {"temperature": temperature,
                                                  "epsilon": epsilon}})
  # Three evaluations x three datasets x two batches each: one program.
  assert evaluate._score_rows._cache_size() == 1  # pylint: disable=protected-access
  # A new batch shape is a new program: the counter can count.
  evaluate.evaluate_ood(model, variables, id_ds, oods, names, batch_size=8)
  assert evaluate._score_rows._cache_size() == 2  # pylint: disable=protected-access


def test_a_stale_or_broken_state_file_is_refitted(tmp_path):
  model, variables = _linear(4)
  id_ds, ood = _dataset(30, 1), {"o": _dataset(30, 2, shift=50)}
  registry = {"shift": Detector("Shift", fit_shift, score_shift,
                                sees=frozenset({protocol.HELDOUT_ID}), options="shift",
                                defaults={"scale": 1.0})}
  FIT_CALLS.clear()
  plan = dict(registry=registry, holdout=10, batch_size=16, state_dir=tmp_path)
  evaluate.evaluate_ood(model, variables, id_ds, ood, ["shift"], **plan)
  (tmp_path / "shift.json").write_text("{not json")
  evaluate.evaluate_ood(model, variables, id_ds, ood, ["shift"], **plan)
  other_weights = jax.tree.map(lambda a: a + 1.0, variables)
  evaluate.evaluate_ood(model, other_weights, id_ds, ood, ["shift"], **plan)
  assert len(FIT_CALLS) == 3


# --- The command line -------------------------------------------------------------------------


def test_cli_reports_user_errors_in_one_line_and_bugs_with_a_traceback(tmp_path, monkeypatch):
  cmd = [sys.executable, "-m", "oodjax.cli", "train", "--config",
         str(ROOT / "configs" / "fmnist_small_cnn.py"), "--workdir", str(tmp_path),
         "--set", "trian.num_epochs=1"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "no key" in proc.stderr and "Traceback" not in proc.stderr
  cmd[-1] = "eval.detectors=('msp','odin_tuned_on_ood')"
  cmd += ["--set", "eval.holdout=None"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "holdout" in proc.stderr  # before any training
  from oodjax import cli

  def bug(args):
    raise TypeError("a programming error")

  monkeypatch.setattr(cli, "_cmd_data_list", bug)
  with pytest.raises(TypeError, match="programming error"):
    cli.main(["data", "list"])


# --- The main job, end to end, against the numbers of the evaluation it replaced -------------

RENAMED = {"odin": "odin_tuned_on_ood", "odin_no_ood": "odin_tuned_without_ood",
           "odin_sf": "odin_fixed"}
OOD = "eval.ood_sets=('embedded/animal_mnist','embedded/uniform_noise')"
# Rows whose definition issue 8 changed after the reference was taken: DMS, DMS-AOS, DSS and
# DSS-EXT now include the input pseudo-layer, ANG+ follows the authors' code, 1C-Sum counts
# ANG+, and the supervised bound has those as features. Their formulas are pinned by
# tests/test_sample_free_whitebox.py; here they must only be present.
CHANGED_BY_ISSUE_8 = {"ind:DMS", "ind:DMS-AOS", "ind:DSS", "ind:DSS-EXT", "ind:ANG+", "1c_sum",
                      "supervised"}


def _oodjax(*args):
  return subprocess.run([sys.executable, "-m", "oodjax.cli", *args, "--no-progress"],
                        capture_output=True, text=True, timeout=900)


def _assert_rows_match(reference_file, results):
  reference = json.loads((ROOT / "tests" / "data" / reference_file).read_text())
  assert results["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-9)
  assert set(results["detectors"]) == {RENAMED.get(k, k) for k in reference["detectors"]}
  for old_name, per_set in reference["detectors"].items():
    for ood, old_row in per_set.items():
      row = results["detectors"][RENAMED.get(old_name, old_name)][ood]
      if old_name in CHANGED_BY_ISSUE_8:
        assert set(row) >= set(old_row), (old_name, ood)
        continue
      for key, value in old_row.items():
        # ODIN's rows now go through odin_score instead of a one-point grid, and every row is
        # compiled into one program: float32 rounding moves at most one image of ~2,000.
        assert row[key] == pytest.approx(value, abs=5e-4), (old_name, ood, key)


@pytest.mark.slow  # three CLI runs, ~2.5 minutes on 2 cores
def test_main_job_smoke_matches_the_pre_registry_rows_and_resumes(tmp_path):
  """`oodjax run` on the smoke config trains, checkpoints and reports every row the evaluation
  it replaced reported, with the same numbers; a second run only re-scores; `oodjax evaluate`
  without a holdout reproduces the sample-free rows and the supervised bound."""
  common = ["--config", SMOKE, "--workdir", str(tmp_path), "--set", OOD,
            "--set", "eval.ood_size=2000", "--set", "envise.enabled=False"]
  all_holdout = ("eval.detectors=('msp','max_logit','energy','t1000','odin_tuned_on_ood',"
                 "'odin_tuned_without_ood','odin_fixed','indicators','1c_sum')")
  first = _oodjax("run", *common, "--set", all_holdout)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "time per stage" in first.stdout
  results = json.loads((tmp_path / "results.json").read_text())
  _assert_rows_match("pre_registry_smoke_holdout.json", results)
  assert sorted(p.name for p in (tmp_path / "detectors").iterdir()) == [
      "1c_sum.json", "odin_tuned_on_ood.json", "odin_tuned_without_ood.json"]
  lines_before = (tmp_path / "metrics.jsonl").read_text().count("\n")

  second = _oodjax("run", *common, "--set", all_holdout)
  assert second.returncode == 0, second.stderr[-3000:]
  assert json.loads((tmp_path / "results.json").read_text())["detectors"] == results["detectors"]
  train_lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
                 [lines_before:]]
  assert not [l for l in train_lines if l.get("kind", l.get("type")) == "train"]

  no_holdout = _oodjax("evaluate", *common, "--set", "eval.holdout=None", "--set",
                       "eval.detectors=('msp','odin_fixed','indicators','1c_sum','supervised')")
  assert no_holdout.returncode == 0, no_holdout.stderr[-3000:]
  _assert_rows_match("pre_registry_smoke_no_holdout.json",
                     json.loads((tmp_path / "results.json").read_text()))
