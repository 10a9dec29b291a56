"""VMDLS: a variational and metric latent space for OOD detection (Dinari & Freifeld 2022).

    encoder, state, _ = train_vmdls(config, workdir, backbone=get_model("small_cnn", 10),
                                    train_ds=train)                       # Sec. 3.1, Eq. 7
    fitted = scoring.fit_vmdls(encoder, variables, train)                 # class Gaussians
    scores, c_max = scoring.score_vmdls_b(encoder, variables, fitted, x)  # VMDLS_b, Sec. 3.2

Modules: `losses` (Eqs. 2-7, pure per-example functions), `model` (the generator of Eq. 1
around any zoo backbone), `train` (the class-mean state, the step, the autoencoder),
`gaussians` (per-class Gaussians in float64, Cholesky log-likelihoods), `scoring` (Eq. 8's
ensemble, VMDLS_b and the reconstruction weighting of Sec. 3.3). The registry entries
"vmdls_b" and "vmdls" (`oodjax.detectors.REGISTRY`) evaluate it like any detector; open-set F1
is `oodjax.metrics.open_set_f1`.
"""
from oodjax.vmdls import gaussians, losses, scoring
from oodjax.vmdls.model import VMDLSEncoder
from oodjax.vmdls.train import (VMDLSTrainState, autoencoder_config, train_autoencoder,
                                train_vmdls, vmdls_config)

__all__ = ["VMDLSEncoder", "VMDLSTrainState", "autoencoder_config", "gaussians", "losses",
           "scoring", "train_autoencoder", "train_vmdls", "vmdls_config"]
