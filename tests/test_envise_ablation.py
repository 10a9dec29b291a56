"""Tests of the vmapped margin ablation and of the Grad-CAM overlay figure."""
import dataclasses

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from oodjax.data.core import ImageDataset
from oodjax.envise import ablation, online, students, visualize
from oodjax.envise.scenarios import Scenario
from oodjax.envise.stream import batch_at, make_stream
from oodjax.models import get_model

K = 6
NAMES = tuple(f"c{k}" for k in range(K))
HW = 16
MARGINS = (0.0, 1.5, 3.9)  # 0: hinge off where d_p < d_n; 3.9: on almost always (d in [0, 4])


def blob_dataset(per_class: int = 6, seed: int = 0) -> ImageDataset:
  """16x16x1 images; class k is a bright 5x5 square at cell k of a 2x3 grid on dim noise."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(K), per_class).astype(np.int32)
  images = rng.integers(0, 60, (len(labels), HW, HW, 1))
  for i, k in enumerate(labels):
    r, c = divmod(int(k), 3)
    images[i, 2 + 7 * r:7 + 7 * r, 5 * c:5 * c + 5] += 180
  return ImageDataset(np.clip(images, 0, 255).astype(np.uint8), labels, (0.3,), (0.3,), NAMES,
                      "blobs")


@pytest.fixture(scope="module")
def setup():
  ds = blob_dataset()
  stream = make_stream(ds, [Scenario("a", NAMES[:4], NAMES[4:], inlier_probability=0.8)],
                       images_per_scenario=8 * 10, batch_size=8, seed=3)
  teacher = get_model("small_cnn_tiny", K)
  # Jitted: initialising op by op takes seconds.
  teacher_vars = jax.jit(teacher.init)(jax.random.key(1), jnp.zeros((1, HW, HW, 1)))
  student = students.get_student("binary_tiny", K)
  # SGD, not Adam: Adam divides by sqrt(v), which blows rounding noise in near-zero gradients
  # (batched vs single program) up to full steps. The real twin ("rvsn"), not the BSN: the
  # binary student's max-pools see exact ties among its +-alpha sums, which rounding breaks
  # differently in the two programs, so their gradients (not their losses) can jump apart.
  # The ablation's code path is the same for every student kind.
  config = online.online_config(student_kind="rvsn", batch_size=8,
                                optimizer={"name": "sgd", "learning_rate": 0.05},
                                adaptive={"window": 2})
  # The variables train_margin_variants starts from (the spec's jitted init is shared with it);
  # the BSN and its real twin have one parameter tree.
  spec = online.step_spec(config, online.student_modules(student, "rvsn")[0], teacher)
  init = online.create_student_state(spec, jax.random.key(0), jnp.zeros((1, HW, HW, 1)))
  return {"stream": stream, "teacher": teacher, "teacher_vars": teacher_vars,
          "student": student, "config": config, "spec": spec, "init": init}


def test_vmapped_margins_equal_single_margin_runs(setup):
  s = setup
  num_steps = 3
  states, metrics = ablation.train_margin_variants(
      s["config"], teacher=s["teacher"], teacher_variables=s["teacher_vars"],
      student=s["student"], stream=s["stream"], margins=MARGINS, num_steps=num_steps,
      inference_steps=2)
  assert metrics["loss"].shape == (num_steps, len(MARGINS))
  spec, init = s["spec"], s["init"]
  trained = spec.student

  # The hinge is active for some examples at one margin and not at another, at step 0, so the
  # margins must lead to different parameters (else the equality check below proves little).
  x0 = batch_at(s["stream"], 0)["image"]
  loss_fn = jax.jit(online.adaptive_loss, static_argnums=0)
  _, (_, aux) = loss_fn(spec, init.params, init.batch_stats, s["teacher_vars"], x0)
  gap = np.asarray(aux["d_pos"] - aux["d_neg"])  # [B]
  assert ((gap + MARGINS[0] > 0) != (gap + MARGINS[-1] > 0)).any()

  # Single runs through online.adaptive_step (margin static there: one compile per margin, so
  # only the extreme two are rerun alone).
  singles = []
  for v, margin in ((0, MARGINS[0]), (len(MARGINS) - 1, MARGINS[-1])):
    single_spec = dataclasses.replace(spec, margin=float(margin))
    state = init
    for t in range(num_steps):
      state, m = online.adaptive_step(single_spec, state, s["teacher_vars"],
                                      batch_at(s["stream"], t)["image"])
      np.testing.assert_allclose(metrics["loss"][t, v], m["loss"], rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(metrics["attention"][t, v], m["attention"], rtol=1e-5,
                                 atol=1e-5)
    got = ablation.variant(states, v)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 got.params, state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 got.batch_stats, state.batch_stats)
    singles.append(state)
  # Margins 0 and 3.9 end with different weights.
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                      singles[0].params, singles[-1].params)
  assert max(jax.tree.leaves(diff)) > 1e-4

  # Routing: counts per variant add up and tau is the quantile of that variant's confidences.
  assert len(metrics["inference"]) == len(MARGINS) and metrics["threshold"].shape == (3,)
  for row in metrics["inference"]:
    assert row["n"] == 2 * 8 and row["routed"] == row["routed_inliers"] + row["routed_outliers"]
  var0 = {"params": singles[0].params, "batch_stats": singles[0].batch_stats}
  conf = np.concatenate([np.asarray(online.confidence(trained.apply(
      var0, batch_at(s["stream"], t)["image"], train=False))) for t in (1, 2)])
  np.testing.assert_allclose(metrics["threshold"][0], np.sort(conf)[0], rtol=1e-5)  # m = 0
  # Hand-count variant 0's routing on inference step 3 against its threshold.
  x3 = batch_at(s["stream"], 3)
  c3 = np.asarray(online.confidence(trained.apply(var0, x3["image"], train=False)))
  x4 = batch_at(s["stream"], 4)
  c4 = np.asarray(online.confidence(trained.apply(var0, x4["image"], train=False)))
  expected = int(np.sum(c3 < metrics["threshold"][0]) + np.sum(c4 < metrics["threshold"][0]))
  assert metrics["inference"][0]["routed"] == expected
  rows = ablation.margin_table(metrics)
  assert [r["margin"] for r in rows] == pytest.approx(list(MARGINS))


def test_one_compilation_for_all_variants(setup, monkeypatch):
  s = setup
  traces = []
  original = online.adaptive_loss

  def counting(*args, **kwargs):
    traces.append(1)
    return original(*args, **kwargs)

  monkeypatch.setattr(online, "adaptive_loss", counting)
  # A learning rate no other test uses: a fresh spec, so nothing is cached.
  config = online.online_config(batch_size=8, optimizer={"name": "sgd", "learning_rate": 0.0123})
  _, metrics = ablation.train_margin_variants(
      config, teacher=s["teacher"], teacher_variables=s["teacher_vars"], student=s["student"],
      stream=s["stream"], margins=(0.5, 1.0, 1.5, 2.0, 2.5), num_steps=3,
      student_variables={"params": s["init"].params, "batch_stats": s["init"].batch_stats})
  assert len(traces) == 1
  assert metrics["loss"].shape == (3, 5) and np.isfinite(metrics["loss"]).all()
  assert metrics["inference"] == []


@pytest.mark.parametrize("kwargs, match", [
    ({"margins": ()}, "empty"),
    ({"margins": (1.0, -0.5)}, ">= 0"),
    ({"margins": (1.0, float("nan"))}, ">= 0"),
    ({"num_steps": 0}, "num_steps"),
    ({"num_steps": 9, "inference_steps": 5}, "do not fit"),
])
def test_bad_inputs(setup, kwargs, match):
  s = setup
  args = {"teacher": s["teacher"], "teacher_variables": s["teacher_vars"],
          "student": s["student"], "stream": s["stream"], "margins": (1.0,), "num_steps": 1}
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    ablation.train_margin_variants(s["config"], **args)


def test_margin_ablation_needs_the_triplet_loss(setup):
  s = setup
  config = online.online_config(batch_size=8, loss={"attention": "l2"})
  with pytest.raises(ValueError, match="triplet"):
    ablation.train_margin_variants(
        config, teacher=s["teacher"], teacher_variables=s["teacher_vars"],
        student=s["student"], stream=s["stream"], margins=(1.0,), num_steps=1)


def test_gradcam_overlay_png(setup, tmp_path):
  s = setup
  images = batch_at(s["stream"], 0)["image"][:3]
  student_vars = {"params": s["init"].params, "batch_stats": s["init"].batch_stats}
  out = tmp_path / "overlay.png"
  maps = visualize.gradcam_overlay_png(s["teacher"], s["teacher_vars"], s["student"],
                                       student_vars, images, out, class_names=NAMES,
                                       cell_inches=1.0, dpi=50)
  png = matplotlib.image.imread(out)
  assert png.shape[:2] == (3 * 50, 4 * 50)  # rows x 4 columns of 50-pixel cells
  t_logits = jax.jit(s["teacher"].apply)(s["teacher_vars"], images)
  np.testing.assert_array_equal(maps["teacher_labels"], np.argmax(t_logits, axis=-1))
  assert (maps["negative_classes"] != maps["teacher_labels"]).all()
  for key in ("teacher", "positive", "negative"):
    assert maps[key].shape == (3, HW, HW) and (maps[key] >= 0).all()
  with pytest.raises(ValueError, match="images must be"):
    visualize.gradcam_overlay_png(s["teacher"], s["teacher_vars"], s["student"], student_vars,
                                  images[0], tmp_path / "bad.png")
