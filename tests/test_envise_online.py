"""Tests of the ENVISE online loop: config, adaptive step, threshold, routing, logs, resuming."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oodjax.data.core import ImageDataset
from oodjax.envise import online, students
from oodjax.envise.scenarios import Scenario, inliers_only
from oodjax.envise.stream import batch_at, make_stream
from oodjax.models import get_model
from oodjax.train.classifier import default_train_config

K = 20
NAMES = tuple(f"c{k}" for k in range(K))


def blob_dataset(per_class: int = 8, seed: int = 0) -> ImageDataset:
  """28x28x1 images; class k is a bright 5x7 cell k of a 5x4 grid on dim noise."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(K), per_class).astype(np.int32)
  images = rng.integers(0, 60, (len(labels), 28, 28, 1))
  for i, k in enumerate(labels):
    r, c = divmod(int(k), 4)
    images[i, 2 + 5 * r:2 + 5 * r + 5, 7 * c:7 * c + 7] += 180
  return ImageDataset(np.clip(images, 0, 255).astype(np.uint8), labels, (0.3,), (0.3,), NAMES,
                      "blobs")


SCENARIOS = [Scenario("a", NAMES[:5], NAMES[5:8], inlier_probability=0.8),
             Scenario("b", NAMES[10:15], NAMES[15:18], inlier_probability=0.8)]
STEPS_PER_SCENARIO = 12


def run_config(**overrides):
  base = {"optimizer": {"learning_rate": 1e-3},
          "adaptive": {"window": 2, "max_steps": 6, "target_agreement": 0.99, "patience": 2},
          "checkpoint": {"every_steps": 4}}
  base.update(overrides)
  return online.online_config(**base)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  ds = blob_dataset()
  tc = default_train_config()
  tc.train.update({"num_epochs": 3, "batch_size": 16, "optimizer": "adam",
                   "learning_rate": 1e-2, "schedule": "constant", "log_every_steps": 10})
  tc.checkpoint.every_steps = 1000
  root = tmp_path_factory.mktemp("online")
  teacher, teacher_vars = online.train_teacher(tc, str(root / "tn"),
                                               model=get_model("small_cnn_tiny", K),
                                               train_ds=ds, progress=False)
  stream = make_stream(ds, SCENARIOS, images_per_scenario=10 * STEPS_PER_SCENARIO,
                       batch_size=10, seed=1)
  student = students.get_student("binary_tiny", K)
  kwargs = {"teacher": teacher, "teacher_variables": teacher_vars, "student": student,
            "stream": stream, "progress": False}
  summary = online.run_online(run_config(), str(root / "bsn"), **kwargs)
  return {"root": root, "kwargs": kwargs, "summary": summary, "stream": stream,
          "records": online.read_log(root / "bsn" / online.LOG_NAME)}


# --- config ---------------------------------------------------------------------------------

def test_config_defaults_are_the_papers():
  c = online.online_config()
  assert (c.optimizer.name, c.optimizer.learning_rate, c.batch_size) == ("adam", 1e-4, 10)
  assert (c.adaptive.max_epochs, c.loss.lambda_d, c.loss.lambda_at, c.loss.margin) == \
      (10, 1.0, 0.2, 1.5)
  assert c.loss.attention == "triplet" and c.loss.temperature is None
  assert online.max_adaptive_steps(c) is None
  assert online.max_adaptive_steps(online.online_config(adaptive={"epoch_size": 1001})) == 1001
  assert online.max_adaptive_steps(
      online.online_config(adaptive={"epoch_size": 1000, "max_steps": 7})) == 7


@pytest.mark.parametrize("overrides, match", [
    ({"nonsense": 1}, "unknown online config key"),
    ({"adaptive": {"windw": 3}}, "unknown key adaptive.windw"),
    ({"adaptive": 5}, "must be a dict"),
    ({"student_kind": "teacher"}, "student_kind"),
    ({"optimizer": {"learning_rate": 0.0}}, "optimizer.learning_rate"),
    ({"optimizer": {"name": "lamb"}}, "optimizer.name"),
    ({"loss": {"attention": "cosine"}}, "loss.attention"),
    ({"loss": {"temperature": -1.0}}, "loss.temperature"),
    ({"loss": {"batchnorm": "frozen"}}, "loss.batchnorm"),
    ({"loss": {"margin": -0.5}}, "loss.margin"),
    ({"adaptive": {"window": 0}}, "adaptive.window"),
    ({"adaptive": {"target_agreement": 1.5}}, "adaptive.target_agreement"),
    ({"adaptive": {"max_steps": 0}}, "adaptive.max_steps"),
    ({"routing": {"keep": 0.0}}, "routing.keep"),
    ({"routing": {"rule": "oracle"}}, "routing.rule"),
    ({"checkpoint": {"every_steps": 0}}, "checkpoint.every_steps"),
    ({"batch_size": 0}, "batch_size"),
])
def test_config_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    online.online_config(**overrides)


def test_student_kinds():
  s = students.get_student("binary_tiny", K)
  assert all(m.binary for m in online.student_modules(s, "bsn"))
  assert not any(m.binary for m in online.student_modules(s, "rvsn"))
  trained, deployed = online.student_modules(s, "binarised_rvsn")
  assert not trained.binary and deployed.binary
  with pytest.raises(ValueError, match="binarised_rvsn"):
    online.student_modules(get_model("small_cnn_tiny", K), "binarised_rvsn")


# --- adaptive step ----------------------------------------------------------------------------

def test_adaptive_step_decreases_loss_on_a_fixed_batch(setup):
  # The spec of the loop's run, so this reuses its compiled step.
  kwargs = setup["kwargs"]
  spec = online.step_spec(run_config(), kwargs["student"], kwargs["teacher"])
  state = online.create_student_state(spec, jax.random.key(3), jnp.zeros((1, 28, 28, 1)))
  x = batch_at(setup["stream"], 0)["image"]  # [10, 28, 28, 1]
  teacher_vars = kwargs["teacher_variables"]
  losses = []
  for _ in range(15):
    state, metrics = online.adaptive_step(spec, state, teacher_vars, x)
    losses.append(float(metrics["loss"]))
    assert math.isclose(metrics["loss"], metrics["distillation"] + 0.2 * metrics["attention"],
                        rel_tol=1e-5)
  assert int(state.step) == 15
  assert losses[-1] < 0.7 * losses[0], losses


def test_pixel_mean_option_scales_the_attention_term_by_the_pixels(setup):
  """loss.pixel_mean=False sums L_at over the K pixels of the compared maps: K times Eq. 5's
  1/(N K) reading, for the same state and batch."""
  from oodjax.envise.gradcam import common_size
  from oodjax.models.insides import forward_with_insides
  kwargs = setup["kwargs"]
  x = batch_at(setup["stream"], 0)["image"]
  attention = {}
  for pixel_mean in (True, False):
    spec = online.step_spec(run_config(loss={"pixel_mean": pixel_mean}), kwargs["student"],
                            kwargs["teacher"])
    state = online.create_student_state(spec, jax.random.key(3), jnp.zeros((1, 28, 28, 1)))
    _, metrics = online.adaptive_step(spec, state, kwargs["teacher_variables"], x)
    attention[pixel_mean] = float(metrics["attention"])
    if pixel_mean:
      maps = [jax.eval_shape(lambda v, m=m: forward_with_insides(
          m, v, x, which=("feature_map",))[1].feature_map, v).shape[1:3]
              for m, v in ((kwargs["teacher"], kwargs["teacher_variables"]),
                           (spec.student, {"params": state.params,
                                           "batch_stats": state.batch_stats}))]
  h, w = common_size(*maps)
  assert attention[True] > 0
  assert attention[False] == pytest.approx(h * w * attention[True], rel=1e-5)


# --- threshold and routing --------------------------------------------------------------------

def test_threshold_rule_by_hand():
  c = [0.9, 0.1, 0.5, 0.7, 0.3, 0.95, 0.2, 0.6, 0.8, 0.4]
  # m = floor(10 * 0.2) = 2: tau is the third smallest, 0.3; 0.1 and 0.2 are routed.
  assert online.confidence_threshold(c, keep=0.8) == np.float32(0.3)
  assert online.confidence_threshold(c, keep=1.0) == np.float32(0.1)  # routes nothing
  assert online.confidence_threshold(c, keep=0.95) == np.float32(0.1)  # m = floor(0.5) = 0
  assert online.confidence_threshold(np.linspace(0.01, 0.4, 40), keep=0.95) == \
      np.float32(np.linspace(0.01, 0.4, 40)[2])
  ties = [0.5] * 4 + [0.9] * 6
  tau = online.confidence_threshold(ties, keep=0.8)
  assert tau == np.float32(0.5) and sum(v < tau for v in ties) == 0  # "at most m" with ties
  with pytest.raises(ValueError, match="at least one"):
    online.confidence_threshold([], 0.9)
  with pytest.raises(ValueError, match="keep"):
    online.confidence_threshold(c, 0.0)


def test_routing_counts_against_numpy():
  rng = np.random.default_rng(0)
  s_logits = rng.normal(size=(12, 4)) * 2
  t_logits = rng.normal(size=(12, 4)) * 2
  labels = rng.integers(0, 4, 12)
  inlier = rng.random(12) < 0.6
  tau = 0.55
  ref = dict.fromkeys(["student_correct", "teacher_correct", "combined_correct", "agree",
                       "routed", "routed_inliers", "routed_outliers"], 0)
  for b in range(12):  # float64 loop
    p = np.exp(s_logits[b] - s_logits[b].max())
    p /= p.sum()
    s, t = int(np.argmax(s_logits[b])), int(np.argmax(t_logits[b]))
    routed = p.max() < tau
    ref["student_correct"] += s == labels[b]
    ref["teacher_correct"] += t == labels[b]
    ref["combined_correct"] += (t if routed else s) == labels[b]
    ref["agree"] += s == t
    ref["routed"] += routed
    ref["routed_inliers"] += routed and inlier[b]
    ref["routed_outliers"] += routed and not inlier[b]
  got = {k: int(v) for k, v in online.routing_counts(
      jnp.asarray(s_logits, jnp.float32), jnp.asarray(t_logits, jnp.float32),
      jnp.asarray(labels), jnp.asarray(inlier), np.float32(tau)).items()}
  assert 0 < ref["routed"] < 12  # the hand-made batch exercises both branches
  assert got == dict(ref, n=12, n_inliers=int(inlier.sum()), n_outliers=int((~inlier).sum()))
  m = online.count_metrics(got)
  assert m["combined_accuracy"] == ref["combined_correct"] / 12
  assert m["routed_fraction_inliers"] == ref["routed_inliers"] / inlier.sum()
  assert m["routed_fraction_outliers"] == ref["routed_outliers"] / (~inlier).sum()
  everything = online.routing_counts(s_logits, t_logits, labels, inlier, np.float32(np.inf))
  assert int(everything["routed"]) == 12
  assert int(everything["combined_correct"]) == ref["teacher_correct"]
  assert online.count_metrics(dict(got, n_outliers=0))["routed_fraction_outliers"] is None


# --- the loop ---------------------------------------------------------------------------------

def test_log_fields(setup):
  records, stream = setup["records"], setup["stream"]
  assert [r["step"] for r in records] == list(range(stream.num_steps))
  for r in records:
    assert set(online.RECORD_FIELDS) <= set(r)
    assert r["n"] == 10 and r["n_inliers"] + r["n_outliers"] == 10
    assert r["routed_inliers"] + r["routed_outliers"] == r["routed"]
    assert r["student_kind"] == "bsn"
    for key in ("student_accuracy", "teacher_accuracy", "combined_accuracy", "agreement"):
      assert 0.0 <= r[key] <= 1.0
    if r["phase"] == "adaptive":
      assert {"loss", "distillation", "attention"} <= set(r)
      assert r["threshold"] is None and r["routed"] == 10
      assert r["combined_accuracy"] == r["teacher_accuracy"]
    else:
      assert 0.0 <= r["threshold"] <= 1.0
  # The teacher learnt the blobs; the run is not trivially constant.
  assert np.mean([r["teacher_accuracy"] for r in records]) > 0.5


def test_scenario_change_starts_an_adaptive_phase(setup):
  records, stream = setup["records"], setup["stream"]
  for s in range(2):
    recs = [r for r in records if r["scenario"] == s]
    phases = [r["phase"] for r in recs]
    n_adaptive = phases.count("adaptive")
    assert 1 <= n_adaptive <= 6 and phases == ["adaptive"] * n_adaptive + \
        ["inference"] * (len(phases) - n_adaptive)
    assert recs[0]["step"] == stream.first_step(s) and recs[0]["phase_step"] == 0
    assert recs[n_adaptive - 1]["phase_end"] in online.ADAPTIVE_ENDS
    assert len({r["threshold"] for r in recs[n_adaptive:]}) == 1  # one tau per scenario
  first_b = stream.first_step(1)
  assert records[first_b - 1]["phase"] == "inference"
  assert records[first_b]["phase"] == "adaptive"


def test_summary_matches_the_log(setup):
  records, summary = setup["records"], setup["summary"]
  assert summary["resumed_from"] is None and summary["steps"] == len(records)
  for s, entry in enumerate(summary["scenarios"]):
    inf = [r for r in records if r["scenario"] == s and r["phase"] == "inference"]
    assert entry["adaptive_steps"] + entry["inference_steps"] == STEPS_PER_SCENARIO
    n_in = sum(r["n_inliers"] for r in inf)
    n_out = sum(r["n_outliers"] for r in inf)
    assert entry["inlier_routed"] == pytest.approx(sum(r["routed_inliers"] for r in inf) / n_in)
    assert entry["outlier_routed"] == pytest.approx(
        sum(r["routed_outliers"] for r in inf) / n_out)
    # Equal-size batches: the pooled accuracy is the mean of the per-step accuracies.
    assert entry["combined_accuracy"] == pytest.approx(
        np.mean([r["combined_accuracy"] for r in inf]))


def test_resume_gives_the_same_log(setup):
  root, kwargs = setup["root"], setup["kwargs"]
  workdir = str(root / "interrupted")
  online.run_online(run_config(), workdir, stop_at=10, **kwargs)  # "killed" before step 10
  partial = online.read_log(os.path.join(workdir, online.LOG_NAME))
  assert len(partial) == 10
  summary = online.run_online(run_config(), workdir, **kwargs)
  assert summary["resumed_from"] is not None and summary["resumed_from"] <= 10
  with open(os.path.join(workdir, online.LOG_NAME)) as f:
    resumed = f.read()
  with open(root / "bsn" / online.LOG_NAME) as f:
    assert resumed == f.read()


def test_bad_inputs_fail_before_running(setup, tmp_path):
  kwargs = dict(setup["kwargs"])
  with pytest.raises(ValueError, match="batch size"):
    online.run_online(run_config(batch_size=5), str(tmp_path / "a"), **kwargs)
  with pytest.raises(ValueError, match="teacher maps a batch"):
    wrong = get_model("small_cnn_tiny", 3)
    online.run_online(run_config(), str(tmp_path / "b"),
                      **dict(kwargs, teacher=wrong,
                             teacher_variables=jax.jit(wrong.init)(jax.random.key(0),
                                                                   jnp.zeros((1, 28, 28, 1)))))
  other = make_stream(blob_dataset(), SCENARIOS, images_per_scenario=50, batch_size=10)
  with pytest.raises(ValueError, match="adaptive_stream"):
    online.run_online(run_config(), str(tmp_path / "c"), adaptive_stream=other, **kwargs)
  assert not any(os.path.exists(tmp_path / d) for d in "abc")


def test_standalone_student_is_never_adapted_and_plot(setup, tmp_path):
  kwargs = setup["kwargs"]
  summary = online.run_online(run_config(student_kind="standalone"), str(tmp_path / "sa"),
                              **kwargs)
  records = online.read_log(tmp_path / "sa" / online.LOG_NAME)
  assert summary["student_kind"] == "standalone"
  assert not any("loss" in r for r in records)
  out = tmp_path / "fig3.png"
  online.plot_online({"BSN": setup["root"] / "bsn" / online.LOG_NAME, "standalone BSN": records},
                     out, smooth=3)
  assert out.exists() and out.stat().st_size > 1000
  with pytest.raises(ValueError, match="non-empty"):
    online.plot_online({"x": []}, tmp_path / "empty.png")


def test_inlier_only_adaptive_stream_and_fixed_threshold(setup, tmp_path):
  kwargs = setup["kwargs"]
  adaptive_stream = make_stream(blob_dataset(), [inliers_only(s) for s in SCENARIOS],
                                images_per_scenario=10 * STEPS_PER_SCENARIO, batch_size=10,
                                seed=1)
  config = run_config(routing={"rule": "fixed", "threshold": 0.3})
  summary = online.run_online(config, str(tmp_path / "il"), adaptive_stream=adaptive_stream,
                              **kwargs)
  records = online.read_log(tmp_path / "il" / online.LOG_NAME)
  adaptive = [r for r in records if r["phase"] == "adaptive"]
  inference = [r for r in records if r["phase"] == "inference"]
  assert adaptive and inference
  assert all(r["n_outliers"] == 0 for r in adaptive)  # the adaptive phase saw inliers only
  assert sum(r["n_outliers"] for r in inference) > 0  # the deployed stream has outliers
  assert {r["threshold"] for r in inference} == {float(np.float32(0.3))}
  assert [e["threshold"] for e in summary["scenarios"]] == [float(np.float32(0.3))] * 2
