"""ODIN (Liang, Li & Srikant, ICLR 2018): temperature scaling and input preprocessing.

* `preprocessing`: the detector, `odin_score` (eqs. 1-2), and the perturbation direction.
* `grid`: every (T, ε) of a grid in one compiled program, T backward passes.
* `tuning`: the paper's protocol (Sec. 4.4): held-out split, (T, ε) selection, and the
  OOD-free variant.
"""
from oodjax.detectors.odin.grid import odin_grid
from oodjax.detectors.odin.preprocessing import (odin_input_gradient, odin_perturbation,
                                                 odin_score)
from oodjax.detectors.odin.tuning import (PAPER_EPSILONS, PAPER_HOLDOUT, PAPER_TEMPERATURES,
                                          odin_scores, select_from_grid, select_from_scores,
                                          split_holdout, split_holdout_in, tune_odin,
                                          tune_odin_without_ood, tune_on_heldout,
                                          tune_without_ood_on_heldout)

__all__ = ["PAPER_EPSILONS", "PAPER_HOLDOUT", "PAPER_TEMPERATURES", "odin_grid",
           "odin_input_gradient", "odin_perturbation", "odin_score", "odin_scores",
           "select_from_grid", "select_from_scores", "split_holdout", "split_holdout_in",
           "tune_odin", "tune_odin_without_ood", "tune_on_heldout",
           "tune_without_ood_on_heldout"]
