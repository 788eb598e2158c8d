"""The shared wire contract: topics, payloads, bundle format, signatures, errors.

This package imports nothing else of the project: the server imports it, never the reverse.
"""

from .errors import BundleError, InvalidPayload, InvalidTopic, ProtocolError, SignatureError
from .messages import (
    TERMINAL_PHASES,
    DeploymentPhase,
    DesiredState,
    HardwareFacts,
    HealthWindow,
    Presence,
    Probation,
    Report,
    ServeMode,
    parse_payload,
    validate_payload,
)
from .topics import TopicKind, device_topic, is_valid_device_id, parse_topic

__all__ = [
    "TERMINAL_PHASES",
    "BundleError",
    "DeploymentPhase",
    "DesiredState",
    "HardwareFacts",
    "HealthWindow",
    "InvalidPayload",
    "InvalidTopic",
    "Presence",
    "Probation",
    "ProtocolError",
    "Report",
    "ServeMode",
    "SignatureError",
    "TopicKind",
    "device_topic",
    "is_valid_device_id",
    "parse_payload",
    "parse_topic",
    "validate_payload",
]
