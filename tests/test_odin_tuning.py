"""ODIN's tuning protocol: splits, selection on hand-made grids, tune_odin, the OOD-free variant."""
from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from oodjax.detectors.odin import tuning
from test_detectors_softmax import STD, inputs, mlp_apply, mlp_params, np_odin, to_jax

TEMPERATURES = (1.0, 10.0, 1000.0)
EPSILONS = (0.0, 0.01, 0.05)
HOLDOUT = 12


def sklearn_fpr95(scores_in, scores_out):
  """FPR at 95% TPR with ID positive, from sklearn's ROC curve of -score."""
  labels = np.r_[np.ones(len(scores_in)), np.zeros(len(scores_out))]
  fpr, tpr, _ = roc_curve(labels, -np.r_[scores_in, scores_out], drop_intermediate=False)
  return fpr[tpr >= 0.95].min()


def test_paper_grid_constants():
  assert tuning.PAPER_TEMPERATURES == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
  assert len(tuning.PAPER_EPSILONS) == 21
  np.testing.assert_allclose(tuning.PAPER_EPSILONS, np.linspace(0, 0.004, 21), rtol=0,
                             atol=1e-15)


def test_split_holdout_partitions_each_set_and_is_seeded():
  tune_in, eval_in, tune_out, eval_out = tuning.split_holdout(50, 40, holdout=10, seed=3)
  assert len(tune_in) == len(tune_out) == 10 and len(eval_in) == 40 and len(eval_out) == 30
  assert not set(tune_in) & set(eval_in) and not set(tune_out) & set(eval_out)
  assert sorted(np.r_[tune_in, eval_in]) == list(range(50))
  assert sorted(np.r_[tune_out, eval_out]) == list(range(40))
  again = tuning.split_holdout(50, 40, holdout=10, seed=3)
  assert all(np.array_equal(a, b) for a, b in zip(again, (tune_in, eval_in, tune_out, eval_out)))
  other = tuning.split_holdout(50, 40, holdout=10, seed=4)
  assert not np.array_equal(other[0], tune_in)
  # The ID split does not depend on the OOD set, so every OOD set shares the ID evaluation part.
  assert np.array_equal(tuning.split_holdout(50, 99, holdout=10, seed=3)[0], tune_in)
  assert all(np.array_equal(a, b) for a, b in
             zip(tuning.split_holdout_in(50, holdout=10, seed=3), (tune_in, eval_in)))


@pytest.mark.parametrize("n_in,n_out,holdout", [(10, 20, 10), (20, 10, 10), (20, 20, 0)])
def test_split_holdout_rejects_holdouts_that_empty_a_part(n_in, n_out, holdout):
  with pytest.raises(ValueError, match="holdout"):
    tuning.split_holdout(n_in, n_out, holdout=holdout)


def test_select_from_hand_made_grids():
  assert tuning.select_from_grid([[0.5, 0.4], [0.1, 0.3]]) == (1, 0)
  tied = [[0.3, 0.2, 0.4], [0.25, 0.9, 0.2]]
  assert tuning.select_from_grid(tied) == (0, 1)  # first in row-major order
  assert tuning.select_from_grid(tied, tie_break=[[0, 0.5, 0], [0, 0, 0.1]]) == (1, 2)
  # tie_break only decides among the FPR ties: its global minimum (0) is not a candidate.
  assert tuning.select_from_grid(tied, tie_break=[[0, 0.5, 0], [0, 0, 0.5]]) == (0, 1)
  assert tuning.select_from_grid([[0.0, 0.0], [0.0, 0.0]]) == (0, 0)


def test_select_matches_brute_force_lexicographic_minimum():
  rng = np.random.default_rng(0)
  for _ in range(50):
    fpr = rng.integers(0, 3, size=(4, 5)) / 10  # coarse, so ties are common
    second = rng.integers(0, 3, size=(4, 5)) / 10
    want = min(itertools.product(range(4), range(5)),
               key=lambda te: (fpr[te], second[te], te[0], te[1]))
    assert tuning.select_from_grid(fpr, tie_break=second) == want


@pytest.mark.parametrize("grid,tie_break,match", [
    ([[0.1, np.nan]], None, "NaN"),
    ([0.1, 0.2], None, r"\[T, E\]"),
    (np.zeros((0, 3)), None, r"\[T, E\]"),
    ([[0.1, 0.2]], [[0.1]], "shape"),
    ([[0.1, 0.1]], [[0.1, np.nan]], "NaN"),
])
def test_select_rejects_bad_grids(grid, tie_break, match):
  with pytest.raises(ValueError, match=match):
    tuning.select_from_grid(grid, tie_break=tie_break)


@pytest.fixture(scope="module")
def data():
  x_in = inputs(n=30, seed=1)
  x_out = inputs(n=26, seed=2, shift=0.7) * 1.5
  return mlp_params(), x_in, x_out


@pytest.fixture(scope="module")
def tuned(data):
  p, x_in, x_out = data
  return tuning.tune_odin(mlp_apply, to_jax(p), x_in, x_out, std=STD, temperatures=TEMPERATURES,
                          epsilons=EPSILONS, holdout=HOLDOUT, seed=5, chunk_size=8,
                          forward_batch=4)


def test_tune_odin_grid_is_the_held_out_fpr_and_the_choice_minimises_it(data, tuned):
  p, x_in, x_out = data
  x_tune_in = x_in[tuned["idx_tune_in"]].astype(np.float64)
  x_tune_out = x_out[tuned["idx_tune_out"]].astype(np.float64)
  want = np.array([[sklearn_fpr95(np_odin(p, x_tune_in, t, e), np_odin(p, x_tune_out, t, e))
                    for e in EPSILONS] for t in TEMPERATURES])
  np.testing.assert_allclose(tuned["grid_fpr95"], want, atol=1e-6)
  assert tuned["grid_fpr95"].shape == tuned["grid_detection_error"].shape == (3, 3)
  t, e = tuned["t_index"], tuned["e_index"]
  assert tuned["tune_fpr95"] == pytest.approx(want.min())
  assert want[t, e] == want.min()
  assert tuned["temperature"] == TEMPERATURES[t] and tuned["epsilon"] == EPSILONS[e]


def test_tune_odin_evaluates_the_choice_on_the_rest(data, tuned):
  p, x_in, x_out = data
  t, e = tuned["temperature"], tuned["epsilon"]
  s_in = np_odin(p, x_in[tuned["idx_eval_in"]].astype(np.float64), t, e)
  s_out = np_odin(p, x_out[tuned["idx_eval_out"]].astype(np.float64), t, e)
  np.testing.assert_allclose(tuned["scores_in"], s_in, rtol=2e-5, atol=2e-7)
  np.testing.assert_allclose(tuned["scores_out"], s_out, rtol=2e-5, atol=2e-7)
  labels = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
  assert tuned["metrics"]["auroc"] == pytest.approx(roc_auc_score(labels, np.r_[s_in, s_out]),
                                                    abs=1e-6)
  assert tuned["metrics"]["fpr95"] == pytest.approx(sklearn_fpr95(s_in, s_out), abs=1e-6)


def test_tune_odin_tuning_and_evaluation_images_are_disjoint(data, tuned):
  _, x_in, x_out = data
  for part, n in (("in", len(x_in)), ("out", len(x_out))):
    tune, rest = tuned[f"idx_tune_{part}"], tuned[f"idx_eval_{part}"]
    assert len(tune) == HOLDOUT and not set(tune) & set(rest)
    assert sorted(np.r_[tune, rest]) == list(range(n))
  assert len(tuned["scores_in"]) == len(x_in) - HOLDOUT
  assert len(tuned["scores_out"]) == len(x_out) - HOLDOUT


def test_tuning_without_ood_takes_no_ood_data_and_maximises_held_out_msp(data):
  p, x_in, _ = data
  signature = inspect.signature(tuning.tune_odin_without_ood)
  assert [name for name in signature.parameters if name.startswith("x")] == ["x_in"]
  result = tuning.tune_odin_without_ood(mlp_apply, to_jax(p), x_in, std=STD, temperature=10.0,
                                        epsilons=EPSILONS, holdout=HOLDOUT, seed=5,
                                        chunk_size=8, forward_batch=4)
  tune_in, eval_in = tuning.split_holdout_in(len(x_in), holdout=HOLDOUT, seed=5)
  assert np.array_equal(result["idx_tune_in"], tune_in)
  assert np.array_equal(result["idx_eval_in"], eval_in)
  x_tune = x_in[tune_in].astype(np.float64)
  mean_msp = np.array([np.mean(1.0 - np_odin(p, x_tune, 10.0, e)) for e in EPSILONS])
  np.testing.assert_allclose(result["grid_mean_max_softmax"], mean_msp, rtol=1e-5)
  assert result["e_index"] == int(np.argmax(mean_msp))
  assert result["epsilon"] == EPSILONS[result["e_index"]] and result["temperature"] == 10.0
  np.testing.assert_allclose(
      result["scores_in"], np_odin(p, x_in[eval_in].astype(np.float64), 10.0, result["epsilon"]),
      rtol=2e-5, atol=2e-7)


def test_select_from_scores_on_hand_made_score_grids():
  # (t=1, e=0) separates perfectly (FPR 0); every other point accepts all OOD (FPR 1).
  grid_in = np.zeros((2, 2, 20), np.float32)
  grid_out = np.zeros((2, 2, 10), np.float32)
  grid_out[1, 0] = 1.0
  choice = tuning.select_from_scores(grid_in, grid_out, (1.0, 1000.0), (0.0, 0.0012))
  assert (choice["t_index"], choice["e_index"]) == (1, 0)
  assert choice["temperature"] == 1000.0 and choice["epsilon"] == 0.0
  assert choice["tune_fpr95"] == 0.0
  np.testing.assert_array_equal(choice["grid_fpr95"], [[1, 1], [0, 1]])
  with pytest.raises(ValueError, match=r"\[T, E, n\]"):
    tuning.select_from_scores(grid_in, grid_out, (1.0, 2.0, 3.0), (0.0, 0.0012))
