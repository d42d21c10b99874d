"""Analysis of a trained SAE from its run directory: feature activations on any text, top activating
contexts, feature density and the decoder's direct logit effects, written as markdown or HTML pages.

    python -m jaxsae.analysis runs/demo --features 3 17 42

Library use:

    info = inspect_run("runs/demo")
    enc = FeatureEncoder(load_lm(info.model_path), jaxsae.load_sae("runs/demo"), info.layer)
    enc.encode_text("def f(x):\\n    return x")   # tokens, decoded pieces, f32[t, d_sae]
"""

from jaxsae.analysis.activations import FeatureEncoder, TextActivations, feature_activations, top_k_sparse
from jaxsae.analysis.density import DensityCounter, plot_density
from jaxsae.analysis.logits import Unembedding, feature_logit_effects, logit_effect, unembedding
from jaxsae.analysis.pipeline import Request, analyze, check
from jaxsae.analysis.runinfo import AnalysisError, RunInfo, check_features, inspect_run
from jaxsae.analysis.contexts import Example, TopContexts

__all__ = [
    "AnalysisError", "DensityCounter", "Example", "FeatureEncoder", "Request", "RunInfo", "TextActivations",
    "TopContexts", "Unembedding", "analyze", "check", "check_features", "feature_activations",
    "feature_logit_effects", "inspect_run", "logit_effect", "plot_density", "top_k_sparse", "unembedding",
]
