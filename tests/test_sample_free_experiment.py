"""The sample-free experiment's README generator: ranks worked out by hand, README up to date."""
import importlib.util
import pathlib

import numpy as np
import pytest

DIR = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "sample_free"


def _load_make_readme():
  spec = importlib.util.spec_from_file_location("sample_free_make_readme",
                                                DIR / "make_readme.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_ranks_by_hand():
  """One seed, two sets; ties share the average rank, a row absent from the run is skipped."""
  make_readme = _load_make_readme()
  arch = {"auroc": {"ind:MP": {"a": [0.9], "b": [0.5]},
                    "1c_sum": {"a": [0.8], "b": [0.5]},
                    "supervised": {"a": [1.0], "b": [0.7]}}}
  ranks = make_readme.ranks(arch, ["a", "b"])
  assert sorted(ranks) == ["1C-Sum", "MP", "supervised"]
  np.testing.assert_allclose(ranks["supervised"], [[1.0, 1.0]])
  np.testing.assert_allclose(ranks["MP"], [[2.0, 2.5]])
  np.testing.assert_allclose(ranks["1C-Sum"], [[3.0, 2.5]])


def test_committed_readme_is_generated_from_results():
  if not (DIR / "results.json").is_file():
    pytest.skip("no results.json yet")
  assert _load_make_readme().main(["--check"]) == 0
