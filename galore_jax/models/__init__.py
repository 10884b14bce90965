"""Models for galore-jax: a Flax NNX Llama with Hugging Face weight interop."""

from galore_jax.models import hf, llama
from galore_jax.models.hf import from_hf, to_hf
from galore_jax.models.llama import PRESETS, KVCache, Llama, LlamaConfig, count_params, generate, init_cache, preset

__all__ = [
    "PRESETS",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "count_params",
    "from_hf",
    "generate",
    "hf",
    "init_cache",
    "llama",
    "preset",
    "to_hf",
]
