"""VMDLS through the registry and `evaluate_ood`, and open-set F1 for every row (sklearn)."""
import os

import jax
import numpy as np
import pytest
import sklearn.metrics

from oodjax import evaluate
from oodjax.data.core import ImageDataset, normalize
from oodjax.models import get_model
from oodjax.vmdls import scoring
from oodjax.vmdls.model import VMDLSEncoder
from tests.train_helpers import TinyNet, tiny_dataset

AE_OPTIONS = {"vmdls_eval": {"ridge": 1e-6, "shift": True,
                             "autoencoder": {"num_epochs": 1, "batch_size": 16,
                                             "learning_rate": 1e-3, "seed": 0}}}


def _noise(n, seed=5):
  images = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1)).astype(np.uint8)
  return ImageDataset(images, None, (0.5,), (0.25,), (), "noise")


def _f1(scores_in, classes_in, labels_in, scores_out, classes_out, threshold, k):
  pred = np.concatenate([np.where(scores_in <= threshold, classes_in, k),
                         np.where(scores_out <= threshold, classes_out, k)])
  true = np.concatenate([labels_in, np.full(len(scores_out), k)])
  return sklearn.metrics.f1_score(true, pred, labels=list(range(k + 1)), average="macro",
                                  zero_division=0)


@pytest.fixture(scope="module")
def vmdls_run(tmp_path_factory):
  state_dir = tmp_path_factory.mktemp("eval") / "detectors"
  train, test, ood = tiny_dataset(60), tiny_dataset(30, seed=1), _noise(20)
  model = VMDLSEncoder(backbone=TinyNet(num_classes=3), latent_dim=2)
  variables = model.init(jax.random.key(0), normalize(train.images[:2], train.mean, train.std))
  results, scores = evaluate.evaluate_ood(
      model, variables, test, {"noise": ood}, ["vmdls_b", "vmdls"], options=AE_OPTIONS,
      id_train=train, state_dir=state_dir, classifier=False, open_set_train_size=0,
      batch_size=16)
  return dict(results=results, scores=scores, model=model, variables=variables, train=train,
              test=test, ood=ood, state_dir=state_dir)


def test_vmdls_rows_with_open_set_f1_as_sklearn_computes_it(vmdls_run):
  r = vmdls_run
  results = r["results"]
  assert results["rows"] == ["vmdls_b", "vmdls"] and results["accuracy"] is None
  assert results["sees"]["vmdls"] == ["id_train"]
  x_in = normalize(r["test"].images, r["test"].mean, r["test"].std)
  x_out = normalize(r["ood"].images, r["test"].mean, r["test"].std)
  state_b = scoring.fit_vmdls(r["model"], r["variables"], r["train"], batch_size=16)
  _, c_in = scoring.best_log_likelihood(r["model"], r["variables"], state_b, x_in)
  _, c_out = scoring.best_log_likelihood(r["model"], r["variables"], state_b, x_out)
  for row in ("vmdls_b", "vmdls"):
    s_in, s_out = r["scores"]["noise"][row]
    threshold = results["open_set"]["thresholds"][row]
    # The threshold accepts >= 95% of the training images' scores.
    expected = _f1(s_in, np.asarray(c_in), r["test"].labels, s_out, np.asarray(c_out),
                   threshold, 3)
    assert results["detectors"][row]["noise"]["open_set_f1"] == pytest.approx(expected, abs=1e-6)
    accepted = np.count_nonzero(np.asarray(s_in) <= threshold) / len(s_in)
    assert results["detectors"][row]["noise"]["open_set_id_accepted"] == pytest.approx(accepted)
  # VMDLS_b's scores are −l of the Gaussians fitted above.
  np.testing.assert_allclose(
      r["scores"]["noise"]["vmdls_b"][0],
      scoring.score_vmdls_b(r["model"], r["variables"], state_b, x_in)[0], rtol=1e-5)


def test_the_autoencoder_is_trained_in_the_fit_workdir_and_the_state_reused(vmdls_run,
                                                                           monkeypatch):
  r = vmdls_run
  assert os.path.isdir(r["state_dir"] / "vmdls" / "autoencoder" / "checkpoints")
  assert r["results"]["fit_info"]["vmdls"]["autoencoder_steps"] == 60 // 16

  def no_training(*args, **kwargs):
    raise AssertionError("the saved VMDLS state should have been reused")

  monkeypatch.setattr("oodjax.vmdls.train.train_autoencoder", no_training)
  again, _ = evaluate.evaluate_ood(
      r["model"], r["variables"], r["test"], {"noise": r["ood"]}, ["vmdls_b", "vmdls"],
      options=AE_OPTIONS, id_train=r["train"], state_dir=r["state_dir"], classifier=False,
      open_set_train_size=0, batch_size=16)
  assert again["detectors"] == r["results"]["detectors"]


def test_classifier_rows_get_open_set_f1_from_the_argmax(tmp_path):
  train, test, ood = tiny_dataset(60), tiny_dataset(30, seed=1), _noise(20)
  model = get_model("small_cnn_tiny", num_classes=3)
  variables = model.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
  results, scores = evaluate.evaluate_ood(model, variables, test, {"noise": ood},
                                          ["msp", "energy"], id_train=train,
                                          open_set_train_size=40, batch_size=16)
  assert results["open_set"]["train_images"] == 40
  x_in = normalize(test.images, test.mean, test.std)
  x_out = normalize(ood.images, test.mean, test.std)
  c_in = np.argmax(model.apply(variables, x_in), -1)
  c_out = np.argmax(model.apply(variables, x_out), -1)
  for row in ("msp", "energy"):
    s_in, s_out = scores["noise"][row]
    train_scores = evaluate.score_dataset(model, variables, {row: evaluate.REGISTRY[row]},
                                          {row: {"temperature": np.float32(1.0)}
                                           if row == "energy" else {}},
                                          train.take(slice(0, 40)), 16)[row]
    threshold = results["open_set"]["thresholds"][row]
    assert np.mean(train_scores <= threshold) >= 0.95
    assert np.mean(train_scores < threshold) < 0.95
    expected = _f1(s_in, c_in, test.labels, s_out, c_out, threshold, 3)
    assert results["detectors"][row]["noise"]["open_set_f1"] == pytest.approx(expected, abs=1e-6)
    accepted = np.count_nonzero(np.asarray(s_in) <= threshold) / len(s_in)
    assert results["detectors"][row]["noise"]["open_set_id_accepted"] == pytest.approx(accepted)


def test_open_set_without_labelled_training_data_is_an_error():
  test, ood = tiny_dataset(30, seed=1), _noise(20)
  model = get_model("small_cnn_tiny", num_classes=3)
  variables = model.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
  with pytest.raises(ValueError, match="open-set"):
    evaluate.evaluate_ood(model, variables, test, {"noise": ood}, ["msp"],
                          open_set_train_size=0)


@pytest.mark.slow  # ~75 s on 2 cores: trains a classifier, an encoder and an autoencoder
def test_cli_run_trains_both_networks_and_reports_their_rows_in_one_table(tmp_path):
  """`oodjax run` on the smoke config: the classifier and the VMDLS encoder are trained, the
  rows of both networks land in one results.json/results.md; `oodjax evaluate` restores both."""
  import json
  import subprocess
  import sys
  smoke = os.path.join(os.path.dirname(__file__), "..", "configs", "fmnist_small_cnn.py")
  common = ["--config", smoke + ":smoke", "--workdir", str(tmp_path), "--no-progress",
            "--set", "eval.ood_sets=('embedded/uniform_noise',)", "--set", "eval.ood_size=600",
            "--set", "eval.id_size=1200", "--set", "eval.detectors=('msp','vmdls_b','vmdls')"]
  run = subprocess.run([sys.executable, "-m", "oodjax.cli", "run", *common],
                       capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "training the VMDLS encoder" in run.stdout
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["rows"] == ["msp", "vmdls_b", "vmdls"]
  assert results["networks"] == {"msp": "classifier", "vmdls_b": "vmdls", "vmdls": "vmdls"}
  assert results["accuracy"] > 0.5  # the classifier's
  for row in results["rows"]:
    assert 0.0 <= results["detectors"][row]["embedded/uniform_noise"]["open_set_f1"] <= 1.0
  markdown = (tmp_path / "results.md").read_text()
  assert "| VMDLS |" in markdown and "Open-set F1" in markdown
  assert (tmp_path / "vmdls" / "checkpoints").is_dir()
  again = subprocess.run([sys.executable, "-m", "oodjax.cli", "evaluate", *common],
                         capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.loads((tmp_path / "results.json").read_text())["detectors"] == results["detectors"]
