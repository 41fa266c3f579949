"""The runtime: loaded bundles and the one generation service every caller goes through.

* :mod:`app.runtime.requests`: typed generation requests (patients, cohorts).
* :mod:`app.runtime.generation`: :class:`~app.runtime.generation.GenerationService`, which
  checks a request once, owns the micro-batching queue and decodes; used by the API, the
  cohort worker, ``synthehr generate`` and the evaluator alike.
* :mod:`app.runtime.batcher`: the micro-batching queue.
* :mod:`app.runtime.generators`: a bundle loaded with its decoding engine.
* :mod:`app.runtime.bundles`: the bundles a process serves (one, or several by name).
* :mod:`app.runtime.redact`: filesystem paths kept out of anything served.

Nothing here imports the HTTP layer (FastAPI, Starlette, :mod:`app.service`); the import
contracts in ``pyproject.toml`` hold it.
"""
