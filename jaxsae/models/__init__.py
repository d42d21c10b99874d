"""Flax ports of the language models jaxsae hooks into, and their Hugging Face loading."""

from jaxsae.models.gemma import Gemma, GemmaConfig
from jaxsae.models.gpt_neox import GPTNeoX, GPTNeoXConfig
from jaxsae.models.hf import CheckpointError
from jaxsae.models.lm import LM, abstract_params, init_params, load_lm, param_axes, read_config

__all__ = ["LM", "load_lm", "init_params", "abstract_params", "param_axes", "read_config", "CheckpointError",
           "GPTNeoX", "GPTNeoXConfig", "Gemma", "GemmaConfig"]
