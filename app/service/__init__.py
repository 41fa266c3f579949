"""The REST service and its cohort jobs, over the runtime's generation service.

HTTP: :mod:`~app.service.api` (the app factory), :mod:`~app.service.middleware`,
:mod:`~app.service.dependencies`, :mod:`~app.service.errors`, :mod:`~app.service.state`,
:mod:`~app.service.routes` (one module per resource), :mod:`~app.service.schemas`. Cohort jobs,
which import no HTTP: :mod:`~app.service.jobs` (plan and chunks), :mod:`~app.service.store`,
:mod:`~app.service.worker`, :mod:`~app.service.results`. Outputs: :mod:`~app.service.exports`
and its formats, :mod:`~app.service.cohort_report`, :mod:`~app.service.cohort_file`.
"""
