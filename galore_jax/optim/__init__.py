"""The GaLore optimizer library: optax transformations that need only jax, optax, chex and numpy.

Modules, in the order a step uses them: ``plan`` (which leaves, as which matrices), ``schedule``
(when each refreshes), ``refresh`` and ``linalg`` (how a basis is recomputed), ``executors`` (how
the due refreshes run inside a ``lax.cond``), ``moments`` (the inner state carried across a
refresh), ``basis`` (project and project back), ``rules`` (the full-rank update from the inner
one), ``transform`` (``galore`` itself). Inner
optimizers: ``adam``, ``adam8bit``, ``adafactor``; ready optimizers: ``alias``. ``options`` holds
the options every one of them shares; ``guard`` lets a step that is not finite keep the state
(``finite=``); ``introspect`` and ``partition`` read a state from outside.
"""

from galore_jax.optim.adafactor import ScaleByAdafactorHFState, scale_by_adafactor_hf
from galore_jax.optim.adam import decay_updated_weights, scale_by_adam_hf, scale_by_bias_correction
from galore_jax.optim.adam8bit import (
    QuantizedMoment,
    ScaleByAdam8bitState,
    scale_by_adam_8bit,
)
from galore_jax.optim.alias import (
    GaLoreAdafactorState,
    apollo_adamw,
    apollo_mini,
    fira_adamw,
    galore_adafactor,
    galore_adamw,
    galore_adamw_8bit,
    golore_adamw,
    q_galore_adamw,
)
from galore_jax.optim.apollo import ApolloRule, apollo
from galore_jax.optim.basis import (
    Basis,
    QuantizedBasis,
    Sides,
    dequantize_basis,
    quantize_basis,
    align_signs,
    captured_energy,
    choose_sides,
    project,
    project_back,
    subspace_overlap,
)
from galore_jax.optim.fira import FiraRule, fira
from galore_jax.optim.options import GaLoreOptions
from galore_jax.optim.plan import (
    GaLoreDimensionNumbers,
    NothingTargetedWarning,
    plan_leaves,
)
from galore_jax.optim.refresh import (
    GRAM_DEFLATIONS,
    ExactRefresh,
    GoLoreRefresh,
    GramSketch,
    RandomizedRefresh,
    RandomProjection,
    Sketch,
    deflated_eigenvectors,
    exact_refresh,
    finish_gram,
    finish_sketch,
    gram_basis,
    gram_sketch,
    randomized_sketch,
    randomized_svd_basis,
    svd_basis,
)
from galore_jax.optim.rules import ProjectBack, limit_norm_growth
from galore_jax.optim.schedule import AdaptiveGap, refresh_offsets
from galore_jax.optim.transform import GaLoreState, galore

__all__ = [
    "GRAM_DEFLATIONS",
    "AdaptiveGap",
    "ApolloRule",
    "Basis",
    "ExactRefresh",
    "FiraRule",
    "GaLoreAdafactorState",
    "GaLoreDimensionNumbers",
    "GaLoreOptions",
    "GaLoreState",
    "GoLoreRefresh",
    "GramSketch",
    "NothingTargetedWarning",
    "ProjectBack",
    "QuantizedBasis",
    "QuantizedMoment",
    "RandomProjection",
    "RandomizedRefresh",
    "ScaleByAdafactorHFState",
    "ScaleByAdam8bitState",
    "Sides",
    "Sketch",
    "align_signs",
    "apollo",
    "apollo_adamw",
    "apollo_mini",
    "captured_energy",
    "choose_sides",
    "decay_updated_weights",
    "dequantize_basis",
    "deflated_eigenvectors",
    "exact_refresh",
    "finish_gram",
    "finish_sketch",
    "fira",
    "fira_adamw",
    "galore",
    "galore_adafactor",
    "galore_adamw",
    "galore_adamw_8bit",
    "golore_adamw",
    "gram_basis",
    "gram_sketch",
    "limit_norm_growth",
    "plan_leaves",
    "project",
    "project_back",
    "q_galore_adamw",
    "quantize_basis",
    "randomized_sketch",
    "randomized_svd_basis",
    "refresh_offsets",
    "scale_by_adafactor_hf",
    "scale_by_adam_8bit",
    "scale_by_adam_hf",
    "scale_by_bias_correction",
    "subspace_overlap",
    "svd_basis",
]
