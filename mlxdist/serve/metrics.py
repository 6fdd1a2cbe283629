"""The front door's Prometheus metrics (``GET /metrics``), with prometheus_client.

Each front door has a registry of its own (several can live in one
process). Names and labels (all prefixed ``mlxdist_``):

- ``requests_total{endpoint, status}``: answered requests by HTTP status.
- ``prompt_tokens_total``, ``generated_tokens_total``.
- ``prompt_cache_hits_total``: requests whose prompt reused cached tokens
  (counted through :meth:`ServeMetrics.prompt_cache_hit`).
- ``time_to_first_token_seconds``, ``inter_token_seconds``: histograms.
- ``queue_depth``: admitted requests that have no token yet;
  ``in_flight``: admitted requests not finished.
- ``re_formings_total``: worlds re-formed after a loss; ``ranks_up``: the
  current world's ranks (0 while loading, re-forming or failed).
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["ServeMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class ServeMetrics:
    """One front door's metrics.

    Args:
        in_flight: Reads the number of requests admitted and not finished.
        queued: Reads the number of admitted requests with no token yet.
        ranks_up: Reads the current world's number of ready ranks.
    """

    def __init__(self, *, in_flight: Callable[[], int], queued: Callable[[], int],
                 ranks_up: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("mlxdist_requests", "Requests answered, by endpoint and HTTP status",
                                ("endpoint", "status"), registry=r)
        self.prompt_tokens = Counter("mlxdist_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("mlxdist_generated_tokens", "Tokens generated", registry=r)
        self.cache_hits = Counter("mlxdist_prompt_cache_hits", "Requests whose prompt reused cached tokens",
                                  registry=r)
        self.ttft = Histogram("mlxdist_time_to_first_token_seconds", "From admission to the first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token = Histogram("mlxdist_inter_token_seconds", "Between a request's consecutive tokens",
                                     buckets=_ITL_BUCKETS, registry=r)
        self.re_formings = Counter("mlxdist_re_formings", "Worlds re-formed after losing ranks", registry=r)
        Gauge("mlxdist_queue_depth", "Admitted requests with no token yet", registry=r).set_function(queued)
        Gauge("mlxdist_in_flight", "Admitted requests not finished", registry=r).set_function(in_flight)
        Gauge("mlxdist_ranks_up", "Ranks of the current world (0 unless ready)", registry=r).set_function(ranks_up)

    def answered(self, endpoint: str, status: int) -> None:
        """Count one answered request."""
        self.requests.labels(endpoint, str(status)).inc()

    def prompt_cache_hit(self, cached_tokens: int = 1) -> None:
        """Count a request whose prompt reused cached tokens (a no-op for 0 tokens).

        Args:
            cached_tokens: The tokens reused (``usage.prompt_tokens_details.cached_tokens``).
        """
        if cached_tokens > 0:
            self.cache_hits.inc()

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
