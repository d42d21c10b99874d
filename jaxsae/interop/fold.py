"""Moving an SAE between activation scales without changing what it computes.

jaxsae trains on x / s (s = the store's scale, so that E||x/s||^2 = 1) and `LoadedSAE` divides
by s going in and multiplies by s coming out. SAELens and dictionary_learning files hold SAEs that act
on raw activations. Two exact re-parametrisations move s into the weights (every kind computes
pre = (x - b_dec) @ W_enc + b_enc, f = act(pre), x_hat = f @ W_dec + b_dec):

- `to_raw` (used for export) keeps the latents: W_enc / s, W_dec * s, b_dec * s; b_enc and thresholds
  unchanged. pre, and so the top-k set, the ReLU and every JumpReLU gate, are exactly jaxsae's.
- `to_scale` (used to start a fine-tune) keeps the decoder: b_enc, b_dec and thresholds times a / b
  (dictionary_learning's `scale_biases`). pre and f scale by a / b > 0, which no kind's activation
  notices (top-k, ReLU and thresholds are positively homogeneous), and W_dec keeps its row norms, which
  the TopK fine-tune holds at 1.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxsae.sae.config import SAEConfig
from jaxsae.sae.kinds import kind_of
from jaxsae.sae.load import LoadedSAE

# Smallest JumpReLU threshold jaxsae stores (it keeps log(theta)); a file's theta <= 0 gates like ReLU,
# which this reproduces except for pre-activations in (0, 1e-30].
MIN_THRESHOLD = 1e-30


def _f32(p: dict) -> dict:
    return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


def to_raw(cfg: SAEConfig, params: dict, scale: float) -> dict:
    """Params acting on x/scale -> params acting on raw x with identical latents."""
    p = _f32(params)
    s = float(scale)
    return {**p, "W_enc": p["W_enc"] / s, "W_dec": p["W_dec"] * s, "b_dec": p["b_dec"] * s}


def unit_rows(cfg: SAEConfig, params: dict, tol: float = 1e-3) -> dict:
    """For SAEs trained with unit-norm decoder rows (`cfg.unit_norm_decoder`: topk, the batchtopk kinds, jumprelu
    with sae.decoder_unit_norm): fold the rows' common norm c into the encoder (W_dec / c, W_enc, b_enc,
    threshold * c). This is exact only because c is one number for
    every latent (a per-latent factor would reorder the top-k), so rows whose norms differ by more than
    `tol` are refused: the fine-tune's renormalisation would change which latents fire."""
    p = _f32(params)
    if not cfg.unit_norm_decoder:
        return p
    norms = np.asarray(jnp.linalg.norm(p["W_dec"], axis=-1))
    c = float(norms.mean())
    if c <= 0 or np.max(np.abs(norms / c - 1.0)) > tol:
        raise ValueError(
            f"the {cfg.kind} SAE's decoder rows have norms {norms.min():.4g}..{norms.max():.4g}, not one common "
            f"norm: jaxsae's {cfg.kind} fine-tune keeps rows at unit norm, which would change this SAE's choice of "
            "latents; fine-tune it as another kind or normalise its decoder first")
    out = {**p, "W_dec": p["W_dec"] / c, "W_enc": p["W_enc"] * c, "b_enc": p["b_enc"] * c}
    if "threshold" in out:
        out["threshold"] = out["threshold"] * c
    if "log_threshold" in out:  # jumprelu: pre scales by c, so must theta
        out["log_threshold"] = out["log_threshold"] + np.log(c)
    return out


def to_scale(sae: LoadedSAE, scale: float) -> dict:
    """Params of `sae` re-expressed for inputs x/scale (see module docstring); decoder rows made unit
    norm for unit-norm-decoder kinds. `LoadedSAE(sae.cfg, to_scale(sae, b), b, ...)` computes what `sae` does."""
    p = unit_rows(sae.cfg, sae.params)
    r = float(sae.scale) / float(scale)
    out = {**p, "b_enc": p["b_enc"] * r, "b_dec": p["b_dec"] * r}
    if "threshold" in out:  # the batchtopk kinds; an uncalibrated (< 0) one stays < 0
        out["threshold"] = out["threshold"] * r
    if "log_threshold" in out:  # jumprelu
        out["log_threshold"] = out["log_threshold"] + np.log(r)
    return out


def threshold_of(cfg: SAEConfig, params: dict) -> np.ndarray | None:
    """f32[d_sae] inference threshold theta with f = pre * (pre > theta) (jumprelu and the batchtopk kinds,
    whose uncalibrated threshold gates at 0), else None."""
    return kind_of(cfg).inference_threshold(cfg, params)


def log_threshold(theta) -> jnp.ndarray:
    """jaxsae's JumpReLU parameter from a file's threshold f32[d_sae]."""
    return jnp.log(jnp.maximum(jnp.asarray(theta, jnp.float32), MIN_THRESHOLD))
