"""ENVISE scenarios and the image-stream simulator.

References: scipy.ndimage.affine_transform (float64, its own bilinear interpolation) and np.rot90
for the augmentation geometry, hand-worked interpolation weights for the crop, scipy's
chi-square test and binomial standard deviations for the sampled class frequencies, and class
counts read off the paper's Tables 1, 7 and 8 by hand.

Sampling tests use fixed seeds, so they are deterministic; their thresholds (chi-square
p > 1e-3, 5 binomial standard deviations) would pass for nearly every seed if the sampler is
right, while the power checks show that a wrong prior is rejected by a wide margin.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from scipy import ndimage, stats

from oodjax import data
from oodjax.envise import scenarios as sc
from oodjax.envise import stream as st

# ---------------------------------------------------------------------------------------------
# Augmentation geometry


def scipy_rotate_crop(image, angle, crop):
  """float64 reference: output o reads input M (o - c) + c, M = s [[cos, sin], [-sin, cos]]."""
  h, w = image.shape
  centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
  t = np.deg2rad(angle)
  m = crop * np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
  # "grid-constant": zeros beyond the edge take part in the interpolation, as in JAX's
  # map_coordinates(mode="constant").
  return ndimage.affine_transform(image.astype(np.float64), m, offset=centre - m @ centre,
                                  order=1, mode="grid-constant", cval=0.0)


def test_angle_zero_crop_one_is_identity():
  images = np.random.default_rng(0).random((3, 6, 5, 2)).astype(np.float32)
  out = st.augment_batch(images, np.zeros(3, np.float32), np.ones(3, np.float32))
  np.testing.assert_array_equal(np.asarray(out), images)


@pytest.mark.parametrize("angle,k", [(90.0, 1), (-90.0, -1), (180.0, 2)])
def test_quarter_turns_match_rot90(angle, k):
  # Positive angles turn the content counter-clockwise as displayed, like np.rot90 (and like
  # scipy.ndimage.rotate); cos 90 is not exactly 0 in float32, hence the tolerance.
  image = np.random.default_rng(1).random((7, 7, 3)).astype(np.float32)
  out = st.rotate_crop(image, np.float32(angle), np.float32(1.0))
  np.testing.assert_allclose(np.asarray(out), np.rot90(image, k, axes=(0, 1)), atol=1e-5)
  if k == 1:  # the direction matters: the clockwise turn is far off
    assert np.abs(np.asarray(out) - np.rot90(image, -1, axes=(0, 1))).max() > 0.1


def test_centre_crop_hand_worked():
  # 4x4, crop 0.5, centre 1.5: output rows/cols read input 1.5 + 0.5 (i - 1.5) =
  # 0.75, 1.25, 1.75, 2.25. A single 1 at (1, 1) gets the bilinear weights
  # 1 - |t - 1| = 0.75, 0.75, 0.25, 0 along each axis.
  image = np.zeros((4, 4, 1), np.float32)
  image[1, 1, 0] = 1.0
  w = np.array([0.75, 0.75, 0.25, 0.0])
  out = st.rotate_crop(image, np.float32(0.0), np.float32(0.5))
  np.testing.assert_allclose(np.asarray(out)[..., 0], np.outer(w, w), atol=1e-6)
  # A ramp 4 r + c is linear, so the crop reads it exactly at the source coordinates.
  ramp = (4.0 * np.arange(4)[:, None] + np.arange(4)[None, :]).astype(np.float32)[..., None]
  t = np.array([0.75, 1.25, 1.75, 2.25])
  out = st.rotate_crop(ramp, np.float32(0.0), np.float32(0.5))
  np.testing.assert_allclose(np.asarray(out)[..., 0], 4.0 * t[:, None] + t[None, :], atol=1e-5)


def test_batch_matches_scipy_affine_reference():
  rng = np.random.default_rng(2)
  images = rng.random((4, 9, 7, 2)).astype(np.float32)  # non-square, two channels
  angles = np.array([10.0, -15.0, 37.0, 0.0], np.float32)
  crops = np.array([0.85, 1.0, 0.6, 0.8], np.float32)
  out = np.asarray(jax.jit(st.augment_batch)(images, angles, crops))
  for b in range(4):
    for c in range(2):
      ref = scipy_rotate_crop(images[b, ..., c], float(angles[b]), float(crops[b]))
      np.testing.assert_allclose(out[b, ..., c], ref, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# Scenario validation

NAMES = ("a", "b", "c", "d", "e", "f")


@pytest.mark.parametrize("scenario,message", [
    (sc.Scenario("s", ("a", "x"), ("d",), inlier_probability=0.9), "unknown class 'x'"),
    (sc.Scenario("s", ("a", "b"), ("b", "d"), inlier_probability=0.9), "both inliers and"),
    (sc.Scenario("s", ("a", "b"), ("d",), priors=(0.5, 0.3, 0.1)), "do not sum to 1"),
    (sc.Scenario("s", ("a", "b"), ("d",), priors=(0.7, 0.5, -0.2)), "must be >= 0"),
    (sc.Scenario("s", ("a", "b"), ("d",), inlier_probability=1.2), "in [0, 1]"),
    (sc.Scenario("s", ("a", "b"), ("d",), inlier_probability=-0.1), "in [0, 1]"),
    (sc.Scenario("s", ("a", "b"), ("d",), inlier_probability=float("nan")), "in [0, 1]"),
    (sc.Scenario("s", ("a", "b"), (), inlier_probability=0.9), "do not sum to 1"),
    (sc.Scenario("s", ("a",), ("d",), priors=(0.5, 0.3, 0.2)), "one value per class"),
    (sc.Scenario("s", ("a",), ("d",)), "exactly one of"),
    (sc.Scenario("s", ("a",), ("d",), inlier_probability=0.5, priors=(0.5, 0.5)),
     "exactly one of"),
    (sc.Scenario("s", ("a", "a"), ("d",), inlier_probability=0.9), "listed twice"),
    (sc.Scenario("s", (), ("d",), inlier_probability=0.9), "at least one inlier"),
])
def test_validate_rejects(scenario, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
    sc.validate(scenario, NAMES)


def test_validate_suggests_close_names():
  with pytest.raises(ValueError, match="did you mean 'elephant'"):
    sc.validate(sc.Scenario("s", ("elephnt",), (), inlier_probability=1.0),
                sc.ANIMAL_MNIST_CLASSES)


def test_class_probabilities_and_inliers_only():
  s = sc.Scenario("s", ("b", "c"), ("e",), inlier_probability=0.8)
  np.testing.assert_allclose(sc.class_probabilities(s, NAMES), [0, 0.4, 0.4, 0, 0.2, 0])
  np.testing.assert_array_equal(sc.inlier_mask(s, NAMES), [0, 1, 1, 0, 0, 0])
  np.testing.assert_allclose(sc.class_probabilities(sc.inliers_only(s), NAMES),
                             [0, 0.5, 0.5, 0, 0, 0])
  p = sc.Scenario("p", ("b", "c"), ("e",), priors=(0.6, 0.2, 0.2))
  np.testing.assert_allclose(sc.class_probabilities(sc.inliers_only(p), NAMES),
                             [0, 0.75, 0.25, 0, 0, 0])


# ---------------------------------------------------------------------------------------------
# The stream

# Class sizes differ on purpose (the within-class draw must use each class's own count); class
# "f" has no images.
CLASS_SIZES = (3, 5, 2, 4, 1, 0)
PRIORS = sc.Scenario("priors", ("a", "b", "c"), ("d", "e"), priors=(0.5, 0.25, 0.15, 0.06, 0.04))
UNIFORM = sc.Scenario("uniform", ("d", "e"), ("a",), inlier_probability=0.7)


def tiny_dataset():
  labels = np.repeat(np.arange(6), CLASS_SIZES).astype(np.int32)
  images = np.random.default_rng(3).integers(0, 256, (len(labels), 5, 5, 1), dtype=np.uint8)
  return data.from_arrays(images, labels, class_names=NAMES, name="tiny")


def collect(stream, start=0, stop=None):
  batches = [jax.device_get(b) for b in st.iterate(stream, start, stop)]
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


@pytest.fixture(scope="module")
def frequency_draws():
  ds = tiny_dataset()
  stream = st.make_stream(ds, [PRIORS, UNIFORM], images_per_scenario=[12_000, 12_000],
                          batch_size=200, seed=0)
  return ds, stream, collect(stream)


def test_class_frequencies_match_priors(frequency_draws):
  ds, stream, draws = frequency_draws
  assert stream.steps_per_scenario == (60, 60)
  for s, scenario in enumerate((PRIORS, UNIFORM)):
    labels = draws["label"][draws["scenario"][:, 0] == s].ravel()  # 12,000 draws
    p = sc.class_probabilities(scenario, NAMES)
    observed = np.bincount(labels, minlength=6)
    assert observed[p == 0].sum() == 0  # classes outside the scenario never appear
    keep = p > 0
    expected = p[keep] * len(labels)
    assert stats.chisquare(observed[keep], expected).pvalue > 1e-3
    # Power: the same counts are far from uniform over the scenario's classes.
    uniform = np.full(keep.sum(), len(labels) / keep.sum())
    assert stats.chisquare(observed[keep], uniform).pvalue < 1e-10
  # Inlier share of the second scenario: binomial, 5 standard deviations.
  inlier = draws["inlier"][draws["scenario"][:, 0] == 1].ravel()
  n = inlier.size
  assert abs(inlier.mean() - 0.7) < 5 * np.sqrt(0.7 * 0.3 / n)


def test_images_within_a_class_are_uniform_and_records_consistent(frequency_draws):
  ds, stream, draws = frequency_draws
  index, label = draws["index"].ravel(), draws["label"].ravel()
  np.testing.assert_array_equal(ds.labels[index], label)  # the image has the recorded class
  for k in (0, 1, 3):  # classes with several images in scenario 0
    members = np.flatnonzero(ds.labels == k)
    hits = np.array([(index == m).sum() for m in members])
    assert stats.chisquare(hits).pvalue > 1e-3
  inlier_sets = [set(PRIORS.inliers), set(UNIFORM.inliers)]
  scenario = draws["scenario"].ravel()
  expected = [NAMES[c] in inlier_sets[s] for c, s in zip(label, scenario)]
  np.testing.assert_array_equal(draws["inlier"].ravel(), expected)
  np.testing.assert_array_equal(draws["scenario"][:, 0], np.repeat([0, 1], 60))
  assert np.all(np.abs(draws["angle"]) <= 15.0)
  assert np.all((draws["crop"] >= 0.8) & (draws["crop"] <= 1.0))


def test_images_are_the_augmented_normalised_sources():
  ds = tiny_dataset()
  stream = st.make_stream(ds, [PRIORS], images_per_scenario=10, batch_size=10, seed=5)
  b = jax.device_get(st.batch_at(stream, 0))
  for i in range(10):
    raw = ds.images[b["index"][i], ..., 0].astype(np.float64) / 255.0
    ref = (scipy_rotate_crop(raw, float(b["angle"][i]), float(b["crop"][i])) - ds.mean[0]) \
        / ds.std[0]
    np.testing.assert_allclose(b["image"][i, ..., 0], ref, atol=1e-4)
  plain = st.make_stream(ds, [PRIORS], images_per_scenario=10, batch_size=10, seed=5,
                         augment=False)
  b = jax.device_get(st.batch_at(plain, 0))
  np.testing.assert_allclose(b["image"], data.normalize(ds.images[b["index"]], ds.mean, ds.std),
                             atol=1e-6)


def test_seeded_reproducible_and_resumable():
  ds = tiny_dataset()
  kwargs = dict(images_per_scenario=[40, 60], batch_size=10)
  full = collect(st.make_stream(ds, [PRIORS, UNIFORM], seed=7, **kwargs))
  again = collect(st.make_stream(ds, [PRIORS, UNIFORM], seed=7, **kwargs))
  resumed = collect(st.make_stream(ds, [PRIORS, UNIFORM], seed=7, **kwargs), start=6)
  other = collect(st.make_stream(ds, [PRIORS, UNIFORM], seed=8, **kwargs))
  for key in full:
    np.testing.assert_array_equal(again[key], full[key])
    np.testing.assert_array_equal(resumed[key], full[key][6:])
  assert not np.array_equal(other["index"], full["index"])
  np.testing.assert_array_equal(full["step"], np.arange(10))


def test_schedule_in_epochs():
  stream = st.make_stream(tiny_dataset(), [PRIORS, UNIFORM, PRIORS], epochs_per_scenario=[4, 2, 1],
                          epoch_size=30, batch_size=10)
  assert stream.steps_per_scenario == (12, 6, 3)
  assert [stream.scenario_at(t) for t in (0, 11, 12, 17, 18, 20)] == [0, 0, 1, 1, 2, 2]
  assert stream.first_step(2) == 18 and stream.num_steps == 21
  with pytest.raises(ValueError, match="outside"):
    stream.scenario_at(21)


@pytest.mark.parametrize("kwargs,message", [
    (dict(images_per_scenario=25, batch_size=10), "not a positive multiple"),
    (dict(images_per_scenario=[10, 20], batch_size=10), "one per scenario"),
    (dict(images_per_scenario=10, epochs_per_scenario=1, epoch_size=10), "not both"),
    (dict(epochs_per_scenario=2), "both epochs_per_scenario and epoch_size"),
    (dict(images_per_scenario=10, batch_size=0), "batch_size"),
    (dict(images_per_scenario=10, crop_range=(0.0, 1.0)), "crop_range"),
    (dict(images_per_scenario=10, crop_range=(0.9, 1.1)), "crop_range"),
    (dict(images_per_scenario=10, max_angle=-1.0), "max_angle"),
])
def test_make_stream_rejects(kwargs, message):
  with pytest.raises(ValueError, match=message):
    st.make_stream(tiny_dataset(), [PRIORS], **kwargs)


def test_make_stream_rejects_bad_data_and_scenarios():
  ds = tiny_dataset()
  no_images = sc.Scenario("f", ("a",), ("f",), inlier_probability=0.9)  # "f" has no images
  with pytest.raises(ValueError, match=r"\['f'\] have positive probability but no images"):
    st.make_stream(ds, [no_images], images_per_scenario=10)
  with pytest.raises(ValueError, match="unknown class"):
    st.make_stream(ds, [sc.EMBEDDED_SCENARIOS["zoo"]], images_per_scenario=10)
  with pytest.raises(ValueError, match="at least one scenario"):
    st.make_stream(ds, [], images_per_scenario=10)
  unlabelled = data.from_arrays(ds.images)
  with pytest.raises(ValueError, match="labels are required"):
    st.make_stream(unlabelled, [PRIORS], images_per_scenario=10)


# ---------------------------------------------------------------------------------------------
# The paper's scenario tables

# Counted by hand from Tables 7 and 8 (names as printed, after splitting run-together names).
LISTED = {"C1": (12, 5), "C2": (10, 5), "C3": (5, 5), "C4": (8, 5), "C5": (25, 5), "C6": (5, 10),
          "T1": (22, 18), "T2": (18, 16), "T3": (12, 5), "T4": (40, 14), "T5": (15, 37)}
# Read by hand from Table 1: # IL test / per-class and # OL test / per-class.
IMPLIED = {"C1": (12, 5), "C2": (9, 5), "C3": (5, 5), "C4": (8, 5), "C5": (25, 5), "C6": (6, 10),
           "T1": (25, 18), "T2": (18, 16), "T3": (12, 5), "T4": (41, 14), "T5": (15, 36)}
PAPER = {**sc.CIFAR100_SCENARIOS, **sc.TINY_IMAGENET_SCENARIOS}


def test_cifar100_fine_labels():
  labels = sc.CIFAR100_FINE_LABELS
  assert len(labels) == 100 and len(set(labels)) == 100
  assert list(labels) == sorted(labels)  # CIFAR-100's label order is alphabetical
  assert labels[0] == "apple" and labels[3] == "bear" and labels[99] == "worm"


def test_paper_scenarios_valid_and_disjoint():
  assert sorted(sc.CIFAR100_SCENARIOS) == ["C1", "C2", "C3", "C4", "C5", "C6"]
  assert sorted(sc.TINY_IMAGENET_SCENARIOS) == ["T1", "T2", "T3", "T4", "T5"]
  for s in sc.CIFAR100_SCENARIOS.values():
    sc.validate(s, sc.CIFAR100_FINE_LABELS)  # names valid, IL and OL disjoint, sums to 1
  for s in sc.TINY_IMAGENET_SCENARIOS.values():
    sc.validate(s, sc.TINY_IMAGENET_NAMES)
  # The six CIFAR-100 pairs use every fine class exactly once.
  used = [c for s in sc.CIFAR100_SCENARIOS.values() for c in s.classes]
  assert sorted(used) == sorted(sc.CIFAR100_FINE_LABELS)
  # The five Tiny-ImageNet pairs use 197 of the 200 classes, once each.
  used = [c for s in sc.TINY_IMAGENET_SCENARIOS.values() for c in s.classes]
  assert len(used) == len(set(used)) == 197
  assert set(sc.TINY_IMAGENET_NAMES) - set(used) == {"tabby", "brown bear", "Arabian camel"}
  assert len(set(sc.TINY_IMAGENET_NAMES)) == 200


def test_class_counts_against_table1():
  for name, s in PAPER.items():
    row = sc.TABLE1[name]
    assert (len(s.inliers), len(s.outliers)) == LISTED[name], name
    assert row.implied_class_counts == IMPLIED[name], name
    assert sum(IMPLIED[name]) == row.total_classes, name  # Table 1 agrees with itself
    assert row.ol_train == 0
    if name != "T4":  # "# IL train" is 70% of "# IL test", except T4's 1432 (0.7 * 2050 = 1435)
      assert row.il_train * 10 == row.il_test * 7, name
    assert s.inlier_probability == pytest.approx(row.il_test / (row.il_test + row.ol_test))
  mismatches = {n: (LISTED[n], IMPLIED[n]) for n in PAPER if LISTED[n] != IMPLIED[n]}
  assert mismatches == sc.TABLE1_COUNT_MISMATCHES
  # Table 1 implies all 100 CIFAR-100 classes and all 200 Tiny-ImageNet classes.
  assert sum(sum(IMPLIED[f"C{i}"]) for i in range(1, 7)) == 100
  assert sum(sum(IMPLIED[f"T{i}"]) for i in range(1, 6)) == 200
  assert sc.CIFAR100_SCENARIOS["C1"].inlier_probability == pytest.approx(1200 / 1700)


# ---------------------------------------------------------------------------------------------
# The embedded 20-class set and its scenarios


def test_fashion_animal_dataset():
  fashion = data.load("embedded/fashion_mnist", "test")
  animal = data.load("embedded/animal_mnist")
  train, test = sc.fashion_animal_dataset("train"), sc.fashion_animal_dataset("test")
  assert train.class_names == test.class_names == fashion.class_names + animal.class_names
  assert train.class_names == sc.FASHION_ANIMAL_CLASSES
  np.testing.assert_array_equal(np.bincount(train.labels), [2000] * 10 + [700] * 10)
  np.testing.assert_array_equal(np.bincount(test.labels), [300] * 20)
  assert train.image_shape == test.image_shape == (28, 28, 1)
  assert train.mean == test.mean and train.std == test.std
  # Fashion-MNIST test images come first, unchanged; Animal-MNIST "cat" (2) is label 12 and its
  # last 300 images (file order) are the test ones.
  np.testing.assert_array_equal(test.images[:3000], fashion.images)
  cats = animal.images[animal.labels == 2]
  np.testing.assert_array_equal(test.images[test.labels == 12], cats[700:])
  np.testing.assert_array_equal(train.images[train.labels == 12], cats[:700])
  with pytest.raises(ValueError, match="splits"):
    sc.fashion_animal_dataset("validation")


def test_embedded_scenarios_stream():
  train = sc.fashion_animal_dataset("train")
  for s in sc.EMBEDDED_SCENARIOS.values():
    sc.validate(s, train.class_names)
    assert s.inlier_probability == 0.9
  assert set(sc.EMBEDDED_SCENARIOS["zoo"].inliers) == set(sc.ANIMAL_MNIST_CLASSES)
  assert set(sc.EMBEDDED_SCENARIOS["shop"].inliers) == set(sc.FASHION_MNIST_CLASSES)
  stream = st.make_stream(train, [sc.EMBEDDED_SCENARIOS["zoo"], sc.EMBEDDED_SCENARIOS["shop"]],
                          images_per_scenario=20, batch_size=10, seed=0)
  draws = collect(stream)
  assert draws["image"].shape == (4, 10, 28, 28, 1) and np.all(np.isfinite(draws["image"]))
  zoo = draws["label"][:2].ravel()
  np.testing.assert_array_equal(draws["inlier"][:2].ravel(), zoo >= 10)
  shop = draws["label"][2:].ravel()
  np.testing.assert_array_equal(draws["inlier"][2:].ravel(), shop < 10)


def test_scenario_is_frozen_data():
  s = sc.EMBEDDED_SCENARIOS["zoo"]
  with pytest.raises(dataclasses.FrozenInstanceError):
    s.name = "other"
