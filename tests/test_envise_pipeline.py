"""Tests of ENVISE from a config: the gates in the registry, config checks, one run end to end."""
import json

import jax
import ml_collections
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from oodjax.detectors import REGISTRY
from oodjax.detectors.odin.tuning import split_holdout
from oodjax.envise import efficiency, online, pipeline
from oodjax.envise.scenarios import Scenario
from oodjax.models import get_model
from oodjax.models.insides import inference_apply
from oodjax.train.classifier import default_train_config
from tests.test_envise_online import K, NAMES, blob_dataset

SCENARIOS = {"a": Scenario("a", NAMES[:5], NAMES[5:8], inlier_probability=0.8),
             "b": Scenario("b", NAMES[10:15], NAMES[15:18], inlier_probability=0.8)}


def _config(**envise):
  """An experiment config with an `envise` section over the blob classes."""
  config = ml_collections.ConfigDict({"dataset": "blobs", "model": "small_cnn_tiny", "seed": 0})
  base = dict(scenarios=("a", "b"), student="binary_tiny",
              online=dict(optimizer=dict(learning_rate=1e-3),
                          adaptive=dict(window=3, max_steps=6, target_agreement=0.99),
                          checkpoint=dict(every_steps=50)),
              stream=dict(images_per_scenario=120, batch_size=10, seed=1, augment=False),
              eval={"holdout": 10, "batch_size": 64, "seed": 0,
                    "odin": {"epsilons": (0.0, 0.002), "chunk_size": 64}},
              figure3_kinds=("standalone",), overlay_images=2)
  base.update(envise)
  config.envise = pipeline.envise_config(**base)
  return config


@pytest.fixture
def blob_scenarios(monkeypatch):
  monkeypatch.setattr("oodjax.envise.scenarios.EMBEDDED_SCENARIOS", SCENARIOS)


# --- registry -------------------------------------------------------------------------------

def test_gates_are_registry_entries_on_the_student_networks():
  expect = {"envise_gate": "envise_bsn", "envise_gate_rvsn": "envise_rvsn",
            "msp_gated": "envise_bsn_ld", "odin_gated": "envise_bsn_ld"}
  assert {n: REGISTRY[n].network for n in expect} == expect
  assert REGISTRY["odin_gated"].sees == {"heldout_id"}  # never the outliers
  for name, network in expect.items():  # each network has its training recipe
    assert network in pipeline.STUDENT_RUNS
  assert pipeline.STUDENT_RUNS["envise_bsn_ld"]["loss"]["attention"] == "none"


def test_gate_score_is_one_minus_the_students_max_softmax():
  model = get_model("small_cnn_tiny", K)
  x = np.asarray(jax.random.normal(jax.random.key(0), (6, 28, 28, 1)), np.float32)
  variables = jax.jit(model.init)(jax.random.key(1), x[:1])
  logits = np.asarray(model.apply(variables, x), np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  score = REGISTRY["envise_gate"].score(model, variables, {}, x)
  np.testing.assert_allclose(np.asarray(score), 1.0 - p.max(-1), atol=1e-6)


# --- config checks --------------------------------------------------------------------------

@pytest.mark.parametrize("envise, message", [
    (dict(scenarios=("a", "nope")), "unknown ENVISE scenario 'nope'"),
    (dict(student="binary_huge"), "unknown envise.student"),
    (dict(detectors=("envise_gate", "msp")), "'msp' is not an ENVISE gate"),
    (dict(figure3_kinds=("rvsn",)), "unknown envise.figure3_kinds"),
    (dict(stream=dict(images_per_scenario=125)), "not a positive multiple"),
    (dict(stream=dict(images_per_scenario=120, batch_size=20)), "differs from"),
    (dict(overlay_images=11), "overlay_images"),
])
def test_bad_envise_configs_fail_before_training(envise, message, blob_scenarios):
  config = _config(**envise)
  with pytest.raises(ValueError, match=message):
    pipeline.check_envise_config(config, NAMES)


def test_a_scenario_naming_an_unknown_class_fails(monkeypatch, blob_scenarios):
  monkeypatch.setitem(SCENARIOS, "bad", Scenario("bad", ("c0", "zebra"), ("c5",)))
  with pytest.raises(ValueError, match="zebra"):
    pipeline.check_envise_config(_config(scenarios=("bad",)), NAMES)


def test_unknown_keys_are_refused():
  with pytest.raises(ValueError, match="unknown envise config key"):
    pipeline.envise_config(scenario="zoo")
  with pytest.raises(ValueError, match="unknown key adaptive.windw"):
    pipeline.envise_config(online=dict(adaptive=dict(windw=3)))


def test_runs_follow_the_gates_asked_for():
  ec = _config(detectors=("odin_gated",), figure3_kinds=()).envise
  assert list(pipeline.runs_of(ec)) == ["envise_bsn_ld"]
  ec = _config().envise
  assert list(pipeline.runs_of(ec)) == ["envise_bsn", "envise_bsn_ld", "envise_rvsn",
                                        "standalone"]


# --- measurements ---------------------------------------------------------------------------

def test_split_scenario_takes_the_inlier_and_outlier_classes():
  ds = blob_dataset(per_class=3)
  inliers, outliers = pipeline.split_scenario(ds, SCENARIOS["a"])
  assert sorted(set(inliers.labels)) == [0, 1, 2, 3, 4] and len(inliers) == 15
  assert sorted(set(outliers.labels)) == [5, 6, 7] and len(outliers) == 9


def test_system_accuracy_against_a_numpy_loop():
  ds = blob_dataset(per_class=3)
  teacher, student = get_model("small_cnn_tiny", K), get_model("small_cnn_tiny", K)
  x = np.zeros((1, 28, 28, 1), np.float32)
  tv, sv = jax.jit(teacher.init)(jax.random.key(0), x), jax.jit(student.init)(
      jax.random.key(1), x)
  images = (ds.images.astype(np.float32) / 255.0 - 0.3) / 0.3
  s_logits = np.asarray(inference_apply(student)(sv, images))
  t_logits = np.asarray(inference_apply(teacher)(tv, images))
  conf = np.exp(s_logits - s_logits.max(-1, keepdims=True))
  conf = (conf / conf.sum(-1, keepdims=True)).max(-1)
  tau = float(np.median(conf))
  got = pipeline.system_accuracy(student, sv, teacher, tv, ds, tau, batch_size=16)
  s_ok = t_ok = c_ok = routed = 0
  for i, label in enumerate(ds.labels):
    r = conf[i] < tau
    pred = t_logits[i].argmax() if r else s_logits[i].argmax()
    s_ok += s_logits[i].argmax() == label
    t_ok += t_logits[i].argmax() == label
    c_ok += pred == label
    routed += r
  n = len(ds.labels)
  assert got == pytest.approx({"student": s_ok / n, "teacher": t_ok / n, "combined": c_ok / n,
                               "routed": routed / n}, abs=1e-6)
  assert pipeline.system_accuracy(student, sv, teacher, tv, ds, None)["combined"] == \
      pytest.approx(t_ok / n)  # no threshold: everything routed


# --- end to end -----------------------------------------------------------------------------

# The end-to-end tests share one run (~1 minute on 2 cores): they are in the slow set.
@pytest.fixture(scope="module")
def envise_run(tmp_path_factory):
  ds = blob_dataset(per_class=12)
  tc = default_train_config()
  tc.train.update({"num_epochs": 3, "batch_size": 16, "optimizer": "adam",
                   "learning_rate": 1e-2, "schedule": "constant", "log_every_steps": 10})
  root = tmp_path_factory.mktemp("pipeline")
  teacher, tv = online.train_teacher(tc, str(root / "tn"), model=get_model("small_cnn_tiny", K),
                                     train_ds=ds, progress=False)
  mp = pytest.MonkeyPatch()
  mp.setattr("oodjax.envise.scenarios.EMBEDDED_SCENARIOS", SCENARIOS)
  try:
    results = pipeline.run_envise(_config(), root / "envise", teacher=teacher,
                                  teacher_variables=tv, progress=False, stream_ds=ds,
                                  eval_ds=blob_dataset(per_class=12, seed=5))
  finally:
    mp.undo()
  return {"results": results, "root": root / "envise", "teacher": (teacher, tv)}


@pytest.mark.slow
def test_run_writes_every_gate_per_scenario_and_the_plots(envise_run):
  results, root = envise_run["results"], envise_run["root"]
  assert json.loads((root / "results.json").read_text()) == json.loads(json.dumps(results))
  assert [e["scenario"] for e in results["per_scenario"]] == ["a", "b"]
  for e in results["per_scenario"]:
    assert list(e["gates"]) == list(pipeline.DEFAULT_DETECTORS)
    for gate in e["gates"].values():
      assert 0.0 <= gate["auroc"] <= 1.0 and 0.0 <= gate["fpr95"] <= 1.0
    assert e["gates"]["odin_gated"]["temperature"] == 1000.0
    assert set(e["accuracy"]) == {"envise_bsn", "envise_bsn_ld", "envise_rvsn", "standalone"}
  for name in ("results.md", "figure3.png", "gradcam_overlay.png"):
    assert (root / name).stat().st_size > 0
  assert "Table 6 analogue" in (root / "results.md").read_text()


@pytest.mark.slow
def test_gate_auroc_is_sklearns_on_the_deployed_snapshot(envise_run):
  """The reported AUROC is recomputed from the scenario's snapshot and scikit-learn."""
  results, root = envise_run["results"], envise_run["root"]
  from oodjax.envise import students
  student = students.get_student("binary_tiny", K)
  eval_ds = blob_dataset(per_class=12, seed=5)
  for index, name in enumerate(("a", "b")):
    variables = online.load_snapshot(root / "envise_bsn", index)
    inliers, outliers = pipeline.split_scenario(eval_ds, SCENARIOS[name])
    scores = []
    for ds in (inliers, outliers):
      x = (ds.images.astype(np.float32) / 255.0 - 0.3) / 0.3
      scores.append(np.asarray(REGISTRY["envise_gate"].score(student, variables, {}, x)))
    # Every row is reported on the images the holdout leaves (ODIN's split, shared by rows).
    _, eval_in, _, eval_out = split_holdout(len(inliers), len(outliers), 10, 0)
    got = results["per_scenario"][index]["gates"]["envise_gate"]
    want = roc_auc_score(np.r_[np.zeros(len(eval_in)), np.ones(len(eval_out))],
                         np.r_[scores[0][eval_in], scores[1][eval_out]])
    assert got["auroc"] == pytest.approx(want, abs=1e-6)


@pytest.mark.slow
def test_gie_at_tpr95_is_eq8_of_the_gates_fpr(envise_run):
  results = envise_run["results"]
  flops = results["flops"]
  for e in results["per_scenario"]:
    g, o = e["gates"]["msp_gated"], e["online"]["envise_bsn_ld"]
    want = efficiency.gain_in_efficiency(
        flops["teacher"]["layer_total"], flops["envise_bsn_ld"]["layer_total"], 0.8, 0.05,
        1.0 - g["fpr95"], o["adaptive_steps"], o["inference_steps"])
    assert g["gie_at_tpr95"] == pytest.approx(float(want), rel=1e-6)


@pytest.mark.slow
def test_a_second_run_resumes_and_reports_the_same(envise_run):
  teacher, tv = envise_run["teacher"]
  mp = pytest.MonkeyPatch()
  mp.setattr("oodjax.envise.scenarios.EMBEDDED_SCENARIOS", SCENARIOS)
  try:
    again = pipeline.run_envise(_config(), envise_run["root"], teacher=teacher,
                                teacher_variables=tv, progress=False,
                                stream_ds=blob_dataset(per_class=12),
                                eval_ds=blob_dataset(per_class=12, seed=5))
  finally:
    mp.undo()
  first = envise_run["results"]
  for a, b in zip(first["per_scenario"], again["per_scenario"]):
    assert a["gates"] == b["gates"] and a["accuracy"] == b["accuracy"]


def test_the_cli_refuses_a_bad_envise_section_before_training(tmp_path, capsys):
  from oodjax import cli
  config = "configs/fmnist_small_cnn.py:smoke"
  code = cli.main(["run", "--config", config, "--workdir", str(tmp_path), "--no-progress",
                   "--set", "envise.scenarios=('tops','nowhere')"])
  assert code == 2
  assert "unknown ENVISE scenario 'nowhere'" in capsys.readouterr().err
  assert not (tmp_path / "checkpoints").exists()  # nothing was trained
