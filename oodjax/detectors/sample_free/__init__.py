"""Sample-free white-box indicators (Begon & Geurts, CVPR-W 2021) and what is built on them.

* `whitebox`: the nineteen indicators from one forward pass (Eqs. 7-30), ODIN at the paper's
  fixed setting (`odin_indicator`).
* `onecsum`: 1C-Sum (Eq. 31), each indicator standardised by its statistics on uniform noise.
* `supervised`: the paper's supervised upper bound, a linear classifier on every indicator.
* `thresholds`: Section 5's practical thresholds for a deployed score.
"""
from oodjax.detectors.sample_free.whitebox import (ALL_INDICATORS, available_indicators,
                                                     indicators, odin_indicator)
from oodjax.detectors.sample_free.onecsum import (ONE_C_SUM_INDICATORS, fit_noise_stats,
                                                  load_noise_stats, one_c_sum,
                                                  save_noise_stats)
from oodjax.detectors.sample_free.supervised import fit_supervised, supervised_score
from oodjax.detectors.sample_free.thresholds import (threshold_from_labels,
                                                     threshold_from_proportion,
                                                     threshold_two_groups)

__all__ = ["ALL_INDICATORS", "ONE_C_SUM_INDICATORS", "available_indicators", "fit_noise_stats",
           "fit_supervised", "indicators", "load_noise_stats", "odin_indicator", "one_c_sum",
           "save_noise_stats", "supervised_score", "threshold_from_labels",
           "threshold_from_proportion", "threshold_two_groups"]
