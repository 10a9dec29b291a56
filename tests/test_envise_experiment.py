"""The ENVISE experiment: its nearest-centroid distance against a loop, its README's claims
flipping with the numbers, the committed README up to date, and (slow) the whole experiment on
the quick config."""
import copy
import json

import numpy as np
import pytest

from experiments.envise import make_readme, run


def test_nearest_centroid_distance_against_a_loop():
  rng = np.random.default_rng(0)
  features, centroids = rng.standard_normal((7, 5)), rng.standard_normal((3, 5))
  want = [min(np.sqrt(np.sum((f - c) ** 2)) for c in centroids) for f in features]
  np.testing.assert_allclose(run.nearest_centroid_distance(features, centroids), want,
                             rtol=1e-12)


def _main(envise_auroc, ld_auroc, bsn_steps, rvsn_steps):
  """A minimal main.json with two scenarios."""
  def gate(label, auroc):
    return {"label": label, "fpr95": 1 - auroc, "detection_error": 0.2, "auroc": auroc,
            "aupr_in": 0.8, "aupr_out": 0.7, "gie_at_tpr95": 0.3}

  def online(steps, agreement):
    return {"adaptive_steps": steps, "adaptive_end": "max_steps",
            "final_window_agreement": agreement, "threshold": 0.5, "inference_steps": 10,
            "student_accuracy": 0.8, "teacher_accuracy": 0.9, "combined_accuracy": 0.85,
            "inlier_routed": 0.05, "outlier_routed": 0.5, "gie_online": 0.3}

  per = []
  for name in ("s1", "s2"):
    per.append({"scenario": name,
                "gates": {"envise_gate": gate("ENVISE", envise_auroc),
                          "msp_gated": gate("MSP", ld_auroc)},
                "accuracy": {"envise_bsn": {"student": 0.8, "teacher": 0.9, "combined": 0.88,
                                            "routed": 0.05}},
                "online": {"envise_bsn": online(bsn_steps, 0.9),
                           "envise_rvsn": online(rvsn_steps, 0.9)}})
  means = {"gates": {g: {k: float(np.mean([e["gates"][g][k] for e in per]))
                         for k in (*make_readme.METRICS, "gie_at_tpr95")}
                     for g in ("envise_gate", "msp_gated")},
           "accuracy": {"envise_bsn": per[0]["accuracy"]["envise_bsn"]},
           "adaptive_steps": {"envise_bsn": bsn_steps, "envise_rvsn": rvsn_steps}}
  return {"teacher": "t", "student": "s", "dataset": "d", "scenarios": ["s1", "s2"],
          "stream_steps": 40, "runs": {"envise_bsn": "BSN", "envise_rvsn": "RvSN"},
          "flops": {"teacher": {"layer_total": 1e6, "binary": 0.0}}, "paper_mflops": {},
          "per_scenario": per, "means": means, "seconds": {"plots": 1.0}}


def test_claims_follow_the_numbers():
  text = make_readme.render(_main(0.8, 0.7, 10, 20), None, None, None)
  assert "**Does L_at improve outlier detection?** Yes" in text
  assert "the BSN does converge faster" in text
  text = make_readme.render(_main(0.7, 0.8, 30, 20), None, None, None)
  assert "**Does L_at improve outlier detection?** No" in text
  assert "the BSN does not converge faster" in text


def test_margin_claim_follows_the_numbers():
  def row(margin, auroc):
    return {"margin": margin, "fpr95": 0.5, "detection_error": 0.2, "auroc": auroc,
            "aupr_in": 0.8, "aupr_out": 0.7, "student_accuracy": 0.8, "final_attention": 0.01}

  rows = [row(m, a) for m, a in ((0.5, 0.6), (1.5, 0.9), (2.5, 0.7))]
  ablation = {"margins": [0.5, 1.5, 2.5], "seconds": 3.0, "mean_rows": rows,
              "scenarios": [{"scenario": "s1", "adaptive_steps": 10, "rows": rows}]}
  main = _main(0.8, 0.7, 10, 20)
  assert "δ = 1.5, is the best here" in make_readme.render(main, ablation, None, None)
  flipped = copy.deepcopy(ablation)
  flipped["mean_rows"][0]["auroc"] = 0.95
  text = make_readme.render(main, flipped, None, None)
  assert "best mean AUROC is at δ = 0.5" in text and "is not the best here" in text


def test_committed_readme_is_generated_from_results():
  if not (make_readme.HERE / "main.json").is_file():
    pytest.skip("no main.json yet")
  assert make_readme.main(["--check"]) == 0


@pytest.mark.slow
def test_quick_experiment_runs_end_to_end(tmp_path):
  """`experiments.envise.run --quick` on a fresh workdir: every part writes its file."""
  run.main(["--quick", "--workdir", str(tmp_path)])
  out = tmp_path / "experiment"
  main = json.loads((out / "main.json").read_text())
  assert [e["scenario"] for e in main["per_scenario"]] == ["zoo", "shop"]
  ablation = json.loads((out / "ablation.json").read_text())
  assert [r["margin"] for r in ablation["mean_rows"]] == list(run.MARGINS)
  assert [e["scenario"] for e in ablation["scenarios"]] == ["zoo", "shop"]
  separation = json.loads((out / "separation.json").read_text())
  assert set(separation["runs"]) == set(run.SEPARATION_RUNS)
  assert all(0.0 <= r["p_value"] <= 1.0 for r in separation["runs"].values())
  variants = json.loads((out / "variants.json").read_text())
  assert set(variants) == set(run.VARIANTS)
  assert all(len(v["rows"]) == 2 for v in variants.values())
  dead = json.loads((out / "dead_maps.json").read_text())
  assert all(0.0 <= f <= 1.0 for r in dead["runs"].values() for f in r["dead"].values())
  for name in ("README.md", "figure3.png", "gradcam_overlay.png", "separation.png"):
    assert (out / name).stat().st_size > 0
