"""Prometheus metrics of the server and its engine, in one registry per server (tests run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets from 5 ms to 2 min: inter-token latencies sit at the low end, long prefills at the top.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0)


class Metrics:
    """Every metric ternlm exports; names are the contract with deploy/grafana/ternlm-dashboard.json."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ternlm_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.request_latency = Histogram("ternlm_request_duration_seconds", "End-to-end request latency",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("ternlm_time_to_first_token_seconds", "Time from submission to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("ternlm_inter_token_latency_seconds", "Time between consecutive tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("ternlm_prompt_tokens", "Prompt tokens submitted", registry=r)
        self.generated_tokens = Counter("ternlm_generation_tokens", "Tokens generated", registry=r)
        self.cached_tokens = Counter("ternlm_prompt_cached_tokens", "Prompt tokens served from the prefix cache",
                                     registry=r)
        self.prefix_lookups = Counter("ternlm_prefix_cache_lookups", "Requests checked against the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("ternlm_prefix_cache_hits", "Requests that reused cached prompt tokens",
                                   registry=r)
        self.tokens_per_second = Gauge("ternlm_generation_tokens_per_second",
                                       "Tokens generated per second over the last engine steps", registry=r)
        self.queue_depth = Gauge("ternlm_queue_depth", "Requests waiting for a slot", registry=r)
        self.active_slots = Gauge("ternlm_active_slots", "Slots running a request", registry=r)
        self.slots = Gauge("ternlm_slots", "Slots (sequences decoded together)", registry=r)
        self.kv_used = Gauge("ternlm_kv_cache_usage_ratio",
                             "Fraction of KV-cache positions held by running requests", registry=r)

        self.auth_failures = Counter("ternlm_auth_failures", "Requests refused for a missing, unknown or "
                                     "insufficient API key", ["reason"], registry=r)
        self.rate_limited = Counter("ternlm_rate_limited", "Requests refused by a rate limit", registry=r)
        self.response_cache = Counter("ternlm_response_cache", "Response-cache lookups of deterministic requests",
                                      ["result"], registry=r)
        self.pii_masked = Counter("ternlm_pii_masked", "Personal data masked by the PII filter",
                                  ["kind", "direction"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
