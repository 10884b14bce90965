"""The training app's pieces, used by ``train.py`` and ``eval.py``: one concept per module.

``config`` (a run's config → model, schedule, optimizer), ``data`` (corpus, tokenizer, batches),
``steps`` (the jitted train / eval steps), ``layerwise`` (updates inside the backward sweep),
``sharding`` (data × FSDP mesh), ``checkpoint`` (orbax), ``metrics`` (metrics.jsonl), ``dry_run``
(will it fit), ``divergence`` (non-finite steps, collapse), ``workdir`` (one run per workdir, atomic files).
The app depends on :mod:`galore_jax.optim` and :mod:`galore_jax.models`, never the reverse.
"""
