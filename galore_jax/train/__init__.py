"""The training app's pieces, used by ``train.py`` and ``eval.py``: one concept per module.

``config`` (a run's config → model, schedule, optimizer), ``data`` (corpus, tokenizer, batches),
``steps`` (the jitted train / eval steps), ``layerwise`` (updates inside the backward sweep),
``sharding`` (data × FSDP mesh), ``checkpoint`` (orbax), ``metrics`` (metrics.jsonl), ``dry_run``
(will it fit), ``divergence`` (non-finite steps, collapse), ``workdir`` (one run per workdir, atomic files),
``base_model`` (a fine-tune's own copy of its base config and tokenizer), ``restore`` (a run's checkpoint
as a model: ``load_model(workdir, step=None) -> (model, config)``, importable from here). The app depends
on :mod:`galore_jax.optim` and :mod:`galore_jax.models`, never the reverse.
"""

_RESTORE = ("load_model", "load_run_config", "RunNotLoadable")


def __getattr__(name: str):
  """``galore_jax.train.load_model`` & co., imported on first use: importing the package stays free of jax."""
  if name in _RESTORE:
    from galore_jax.train import restore

    return getattr(restore, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
