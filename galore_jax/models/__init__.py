"""Models for galore-jax: a Flax NNX Llama with Hugging Face weight interop."""

from galore_jax.models import llama
from galore_jax.models.llama import (
    PRESETS,
    KVCache,
    Llama,
    LlamaConfig,
    count_params,
    from_hf,
    generate,
    init_cache,
    preset,
    to_hf,
)

__all__ = [
    "PRESETS",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "count_params",
    "from_hf",
    "generate",
    "init_cache",
    "llama",
    "preset",
    "to_hf",
]
