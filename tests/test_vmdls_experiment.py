"""The VMDLS experiment: its cluster statistics on hand-made clusters, its README up to date, and
(slow) the whole experiment on slices."""
import json

import numpy as np
import pytest

from experiments.vmdls import make_readme, run


def _clusters(scales, centres, n=400, seed=0):
  rng = np.random.default_rng(seed)
  mu = np.concatenate([c + rng.standard_normal((n, 2)) * s for c, s in zip(centres, scales)])
  return mu, np.repeat(np.arange(len(centres)), n)


def test_cluster_shape_of_round_far_clusters():
  """Two unit-variance round clusters 20 apart: radius sqrt(2), separation 20/sqrt(2)."""
  mu, labels = _clusters([(1.0, 1.0), (1.0, 1.0)], [(0.0, 0.0), (20.0, 0.0)], n=20_000)
  shape = run.cluster_shape(mu, labels, 2)
  assert shape["separation"] == pytest.approx(20 / np.sqrt(2), rel=0.02)
  assert shape["isotropy"] == pytest.approx(1.0, abs=0.05)
  assert shape["size_spread"] == pytest.approx(1.0, abs=0.05)


def test_cluster_shape_of_elongated_unequal_clusters():
  """Standard deviations (3, 0.3) and (0.5, 0.5): eigenvalue ratio 0.01 and 1, radii
  sqrt(9.09) and sqrt(0.5)."""
  mu, labels = _clusters([(3.0, 0.3), (0.5, 0.5)], [(0.0, 0.0), (0.0, 5.0)], n=20_000)
  shape = run.cluster_shape(mu, labels, 2)
  assert shape["isotropy"] == pytest.approx((0.01 + 1.0) / 2, abs=0.03)
  assert shape["size_spread"] == pytest.approx(np.sqrt(9.09 / 0.5), rel=0.03)
  radius = (np.sqrt(9.09) + np.sqrt(0.5)) / 2
  assert shape["separation"] == pytest.approx(5.0 / radius, rel=0.03)


def test_order_facts_follow_the_numbers():
  """The README's ordering claims are computed: swap two F1 values and the claim flips."""
  sets = ["embedded/animal_mnist", "embedded/digits"]

  def ablation(f1):
    return {"ood_sets": sets, "variants": {
        name: {"detectors": {s: {"open_set_f1": value, "auroc": 0.5} for s in sets},
               "clusters": {"separation": value, "isotropy": 1.0, "size_spread": 1.0}}
        for name, value in f1.items()}}

  f1 = dict(zip(make_readme.PAPER_TABLE4, (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)))
  _, facts = make_readme.table4(ablation(f1))
  assert any(f.startswith("Both proposed losses") and "yes" in f for f in facts)
  assert any(f.startswith("M_d = 32 above M_d = 1") and ": yes" in f for f in facts)
  f1["L_KL + L_t + L_d (M_d = 32)"], f1["L_KL + L_t"] = 0.7, 0.9
  _, facts = make_readme.table4(ablation(f1))
  assert any(f.startswith("Both proposed losses") and ": no" in f for f in facts)
  assert any(f.startswith("M_d = 32 above M_d = 1") and ": no" in f for f in facts)


def test_committed_readme_is_generated_from_results():
  if not (make_readme.HERE / "ablation.json").is_file():
    pytest.skip("no ablation.json yet")
  assert make_readme.main(["--check"]) == 0


@pytest.mark.slow
def test_quick_run_trains_the_variants_and_scores_every_subset(tmp_path, monkeypatch):
  """`run.py --quick` end to end (about 2 minutes): six variants, five ensemble subsets."""
  monkeypatch.setattr(run, "ROOT", tmp_path)
  assert run.main(["--quick"]) == 0
  out = tmp_path / "runs" / "vmdls_quick"
  ablation = json.loads((out / "ablation.json").read_text())
  assert list(ablation["variants"]) == list(run.VARIANTS)
  for variant in ablation["variants"].values():
    for row in variant["detectors"].values():
      assert 0.0 <= row["open_set_f1"] <= 1.0 and 0.0 <= row["auroc"] <= 1.0
    assert np.isfinite(np.asarray(variant["mu"])).all()
  ensemble = json.loads((out / "ensemble.json").read_text())
  assert len(ensemble["subsets"]) == len(ensemble["members"])
  dims = ensemble["member_dims"]
  assert [s["dim"] for s in ensemble["subsets"].values()] == [
      sum(dims[i] for i in subset) for subset in run.subsets(len(dims))]
  assert (out / "README.md").read_text().count("| L_") == len(run.VARIANTS)
