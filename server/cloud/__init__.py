"""The cloud inference tier (`fleet cloud serve`): an Open Inference Protocol v2 server for the
models the catalog ships, installed from the image repository exactly as a device installs them.

One job a file: ``serve`` (the process), ``app`` (the REST endpoints), ``service`` (use cases and
wiring), ``sync`` (repository refreshes, installs, hot-swaps), ``selection`` (which models),
``registry`` (what serves now), ``batcher`` (micro-batching, the bounded queue), ``auth`` (device
callers), ``tensors`` (the JSON and binary tensor codec), ``tls``, ``metrics``, ``errors``,
``embedded`` (the tier as a supervised child of ``fleet server run``).
"""
