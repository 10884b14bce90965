"""galore-jax: GaLore (gradient low-rank projection) as optax transformations."""

from galore_jax.adam import decay_updated_weights, scale_by_adam_hf
from galore_jax.projection import (
    Basis,
    ExactRefresh,
    RandomizedRefresh,
    Sides,
    Sketch,
    align_signs,
    captured_energy,
    choose_sides,
    exact_refresh,
    finish_sketch,
    randomized_sketch,
    randomized_svd_basis,
    project,
    project_back,
    subspace_overlap,
    svd_basis,
)
from galore_jax.transform import (
    AdaptiveGap,
    GaLoreDimensionNumbers,
    GaLoreState,
    galore,
    galore_adamw,
    plan_leaves,
    refresh_offsets,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptiveGap",
    "Basis",
    "ExactRefresh",
    "RandomizedRefresh",
    "GaLoreDimensionNumbers",
    "GaLoreState",
    "Sides",
    "Sketch",
    "align_signs",
    "captured_energy",
    "choose_sides",
    "exact_refresh",
    "finish_sketch",
    "galore",
    "galore_adamw",
    "plan_leaves",
    "project",
    "project_back",
    "randomized_sketch",
    "randomized_svd_basis",
    "refresh_offsets",
    "decay_updated_weights",
    "scale_by_adam_hf",
    "subspace_overlap",
    "svd_basis",
]

from galore_jax.adam8bit import (  # noqa: E402
    QuantizedMoment,
    ScaleByAdam8bitState,
    galore_adamw_8bit,
    scale_by_adam_8bit,
)

__all__ += ["QuantizedMoment", "ScaleByAdam8bitState", "galore_adamw_8bit", "scale_by_adam_8bit"]

from galore_jax.adafactor import (  # noqa: E402
    GaLoreAdafactorState,
    ScaleByAdafactorHFState,
    galore_adafactor,
    scale_by_adafactor_hf,
)

__all__ += ["GaLoreAdafactorState", "ScaleByAdafactorHFState", "galore_adafactor", "scale_by_adafactor_hf"]
