"""Service settings: one :class:`Settings` object, read from the environment.

Every field can be set as ``SYNTHEHR_<FIELD>`` (for example ``SYNTHEHR_BUNDLE=models/demo``);
the Redis URL is also accepted as plain ``REDIS_URL``, the convention of most hosting setups.
Without a Redis URL the service runs an embedded (in-process) job store and worker and says so
in its log.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """Configuration of the API and the worker (environment prefix ``SYNTHEHR_``)."""

    model_config = SettingsConfigDict(env_prefix="SYNTHEHR_", extra="ignore",
                                      populate_by_name=True)

    # -- model and store --------------------------------------------------------------------
    bundle: Path = Field(Path("models/demo"),
                         description="Folder of the runtime bundle to serve (models/<name>/).")
    bundles: str | None = Field(
        None, description="Several bundles in one service: a comma-separated list of bundle "
                          "folders, or one folder whose sub-folders are bundles. Requests pick "
                          "one with `model` (its folder name; default: the first). Overrides "
                          "`bundle` when set.")
    redis_url: str | None = Field(
        None, validation_alias=AliasChoices("SYNTHEHR_REDIS_URL", "REDIS_URL", "redis_url"),
        description="Redis URL of the job store (queue, progress, results). None: an embedded "
                    "in-process store and worker (one process only; jobs die with it).")
    key_prefix: str = Field("synthehr", description="Prefix of every Redis key this service owns.")
    athena_vocabulary: Path | None = Field(
        None, description="Folder of an OHDSI Athena vocabulary download (CONCEPT.csv, "
                          "CONCEPT_RELATIONSHIP.csv) used to fill the OMOP export's concept ids; "
                          "None: they are 0. Read once at start-up.")

    # -- access -----------------------------------------------------------------------------
    api_key: str | None = Field(None, description="When set, every /v1 request must carry it "
                                                  "in the X-API-Key header.")
    rate_limit_per_minute: int = Field(6000, ge=0, description="Requests per minute per client "
                                                              "(API key or address); 0: no limit.")
    rate_limit_burst: int = Field(200, ge=1, description="Requests a client may send at once.")

    # -- limits -----------------------------------------------------------------------------
    max_patients_per_request: int = Field(100, ge=1, le=10_000,
                                          description="Patients in one POST /v1/patients.")
    max_cohort_size: int = Field(100_000, ge=1, description="Patients in one cohort job.")
    max_visits: int = Field(32, ge=1, description="Upper bound of visits per patient a caller "
                                                  "may ask for.")
    max_codes_per_visit: int = Field(64, ge=1, description="Upper bound of codes per visit a "
                                                           "caller may ask for.")
    max_request_bytes: int = Field(1_000_000, ge=1_024, description="Largest request body.")

    # -- work budget (app.decoding.params.work_of counts a request's work) --------------------
    max_decoded_rows: int = Field(
        1_000, ge=1, description="Rows one POST /v1/patients may decode: patients x "
        "`candidates` for rerank, patients otherwise (100 patients x 10 candidates).")
    max_retries_per_request: int = Field(
        2_000, ge=0, description="retrieve_edit privacy-guard retries one POST /v1/patients may "
        "ask for: patients x `max_retries` (100 patients x the default 20).")
    max_retries: int = Field(50, ge=0, le=1000, description="Upper bound of a request's "
                             "`max_retries` (each retry decodes its rejected rows once more).")
    max_cohort_decoded_rows: int = Field(
        400_000, ge=1, description="Rows one cohort may decode: size x `candidates` for "
        "rerank, size otherwise (100,000 patients x 4 candidates).")
    max_cohort_retries: int = Field(
        2_000_000, ge=0, description="retrieve_edit retries one cohort may ask for: size x "
        "`max_retries` (100,000 patients x the default 20).")
    request_timeout_s: float = Field(
        30.0, gt=0, description="POST /v1/patients answers 504 past this and stops its "
        "generation; generation also stops when the client disconnects.")
    max_active_cohorts_per_client: int = Field(
        4, ge=0, description="Unfinished (queued or running) cohorts one client (API key or "
        "address, as the rate limit counts) may have; more get 429. 0: no limit.")

    # -- jobs -------------------------------------------------------------------------------
    cache_ttl_s: int = Field(7 * 24 * 3600, ge=1, description="How long a finished cohort (and "
                                                              "its result) stays cached.")
    chunk_size: int = Field(500, ge=1, le=100_000, description="Patients a worker generates "
                                                               "per chunk (the unit of progress).")
    lease_s: float = Field(15.0, gt=0, description="A worker heartbeat older than this frees "
                                                   "its job for another worker; with no worker "
                                                   "seen for this long, /ready and the status "
                                                   "of unfinished cohorts say so.")
    result_grace_s: int = Field(3600, ge=1, description="A download of a cohort keeps its "
                                "result in the store at least this long (seconds) from its "
                                "start, so it cannot expire mid-download.")
    worker_poll_s: float = Field(0.2, gt=0, description="Idle worker's queue poll interval.")
    results_url: str | None = Field(
        None, description="Folder or fsspec URL (e.g. /var/lib/synthehr/results, "
        "s3://bucket/prefix with s3fs installed) where workers write the result of every cohort "
        "above result_inline_max_patients, one file per chunk, served from there; the API and "
        "every worker must see the same location. None: every result is kept in the job store.")
    result_inline_max_patients: int = Field(
        20_000, ge=0, description="Cohorts up to this many patients keep their result in the "
        "job store (about 2-3 MB of Redis memory per 20,000 patients on the demo bundle); "
        "larger ones go to results_url when it is set.")
    results_sweep_s: float = Field(
        600.0, gt=0, description="An idle worker deletes, at most this often, the result "
        "folders under results_url of jobs the store no longer has (expired or lost).")
    embedded_workers: int = Field(1, ge=0, description="In-process workers of the embedded store.")

    # -- inference --------------------------------------------------------------------------
    ort_threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads per session.")
    inference_threads: int = Field(2, ge=1, description="Concurrent generate() calls in the API.")
    generation_batch: int = Field(64, ge=1, description="Patients per engine call in jobs.")
    batch_window_ms: float = Field(
        5.0, ge=0, le=1000,
        description="POST /v1/patients micro-batching: while the engine is busy, concurrent "
                    "requests of equal strategy, params and validity flag wait up to this long "
                    "to share one engine call (outputs are unchanged; a request that finds the "
                    "engine idle runs at once); 0 turns batching off.")
    max_batch_patients: int = Field(64, ge=1, le=10_000,
                                    description="Patients in one micro-batched engine call.")
    batch_concurrency: int = Field(
        1, ge=1, description="Micro-batches decoded at once (at most inference_threads). The "
                             "decoding loop is mostly GIL-bound Python/numpy: one batch at a time "
                             "gave bigger batches and ~30% more requests/s than two on 2 cores "
                             "(bench/load_results.md).")

    # -- logs -------------------------------------------------------------------------------
    log_level: str = Field("INFO", description="Python logging level.")
    json_logs: bool = Field(True, description="One JSON object per log line.")


def get_settings(**overrides) -> Settings:
    """Settings from the environment with ``overrides`` on top."""
    return Settings(**overrides)
