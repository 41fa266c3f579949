"""The REST service: FastAPI app, job store, worker, exports."""
