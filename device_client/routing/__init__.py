"""Hybrid edge/cloud routing: the edge model answers at once, unsure cases go to a cloud model
speaking the Open Inference Protocol, cached cloud answers cover for an unreachable cloud.

One job a file: router (the modes), call (what is sent and comes back, the deadline), oip (the
cloud client), confidence (reading and agreement), budget (token bucket), breaker, cache (on
disk), stats (health-window counters), background (bounded work off the caller's path),
factory (a router from a policy and the device) and table (the routers of the served models).
"""

from .factory import CloudConfigError, RoutingEnvironment, build_cloud_client, build_router, host_edge
from .oip import CloudAnswer, CloudFailure, OipClient
from .router import Answer, EdgeFn, Router
from .stats import RoutingStats
from .table import Routed, RoutingTable

__all__ = [
    "Answer",
    "CloudAnswer",
    "CloudConfigError",
    "CloudFailure",
    "EdgeFn",
    "OipClient",
    "Routed",
    "Router",
    "RoutingEnvironment",
    "RoutingStats",
    "RoutingTable",
    "build_cloud_client",
    "build_router",
    "host_edge",
]
