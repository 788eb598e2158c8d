"""The onnxruntime host: load, validate, warm (:mod:`.loader`, at low CPU priority:
:mod:`.priority`), hot-swap and roll back (:mod:`.host`), shadow (:mod:`.shadow`)."""

from .host import InferenceError, InferenceResult, ModelHost, NoModel
from .loader import BadInput, LoadedModel, ModelRejected, load_slot
from .shadow import outputs_agree

__all__ = [
    "BadInput",
    "InferenceError",
    "InferenceResult",
    "LoadedModel",
    "ModelHost",
    "ModelRejected",
    "NoModel",
    "load_slot",
    "outputs_agree",
]
