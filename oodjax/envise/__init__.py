"""ENVISE: online distillation from a teacher into a binary student (Sharma et al., ICLR 2021
submission), with Grad-CAM attention triplet loss, outlier gating back to the teacher, and Gain
in Efficiency.

Modules:
  binary      `sign_ste`, the XNOR weight approximation, binary Conv/Dense layers.
  students    binary students (BSN) built from the zoo's architectures, and their real twins (RvSN).
  packed      export of a trained student to packed sign bits; XNOR-popcount inference.
  gradcam     Grad-CAM maps, differentiable in the parameters.
  losses      distillation L_d, attention triplet L_at (Eq. 5), the ablation L_a (Eq. 21).
  efficiency  FLOPs from compiled programs, RFL (Eq. 7) and Gain in Efficiency (Eq. 8).
  scenarios   deployment scenarios (C1-C6, T1-T5, embedded) and their validation.
  stream      the image-stream simulator.
  online      the online distillation loop: adaptive phase, routing to the teacher, logs,
              the Figure 3 plot.
  ablation    the margin ablation (Table 3) as one vmapped program over the margins.
  visualize   Grad-CAM overlays: teacher vs student maps on stream images.
"""
