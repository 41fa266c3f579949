"""Decoding: grammar, validity mask, strategies and the batched generation engine (numpy only).

Nothing here imports torch; models are driven through :class:`~app.decoding.model_api.StepModel`
(ONNX Runtime in :mod:`app.decoding.onnx_model`).
"""

from app.decoding.engine import Demographics, Engine, GenerationResult
from app.decoding.errors import (
                                 GenerationError,
                                 ImpossibleConstraintError,
                                 InvalidParametersError,
                                 PrivacyGuardError,
                                 UnknownCodeError,
)
from app.decoding.model_api import RandomStepModel, StepModel
from app.decoding.params import (
                                 STRATEGIES,
                                 CooccurrenceParams,
                                 PlainParams,
                                 RerankParams,
                                 RetrieveEditParams,
                                 parse_params,
)
from app.decoding.retrieval import RetrievalIndex
from app.decoding.strategies import CooccurrenceStats

__all__ = [
                                 "STRATEGIES",
                                 "CooccurrenceParams",
                                 "CooccurrenceStats",
                                 "Demographics",
                                 "Engine",
                                 "GenerationError",
                                 "GenerationResult",
                                 "ImpossibleConstraintError",
                                 "InvalidParametersError",
                                 "PlainParams",
                                 "PrivacyGuardError",
                                 "RandomStepModel",
                                 "RerankParams",
                                 "RetrievalIndex",
                                 "RetrieveEditParams",
                                 "StepModel",
                                 "UnknownCodeError",
                                 "parse_params",
]
