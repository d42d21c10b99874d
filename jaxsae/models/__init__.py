"""Flax ports of the language models jaxsae hooks into, and their Hugging Face loading.

Each family module registers itself with `jaxsae.models.family` on import; importing it here (one line
per family) is all the registration there is.
"""

from jaxsae.models import gemma, gpt_neox, llama  # noqa: F401 -- registers the families
from jaxsae.models.family import Family, family_for_model_type, family_of
from jaxsae.models.gemma import Gemma, GemmaConfig
from jaxsae.models.gpt_neox import GPTNeoX, GPTNeoXConfig
from jaxsae.models.hf import CheckpointError
from jaxsae.models.llama import Llama, LlamaConfig
from jaxsae.models.lm import LM, abstract_params, init_params, load_lm, param_axes, read_config

__all__ = ["LM", "load_lm", "init_params", "abstract_params", "param_axes", "read_config", "CheckpointError",
           "Family", "family_for_model_type", "family_of", "GPTNeoX", "GPTNeoXConfig", "Gemma", "GemmaConfig",
           "Llama", "LlamaConfig"]
