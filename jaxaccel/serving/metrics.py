"""The server's Prometheus metrics (vLLM's names under the `jaxaccel:` prefix), in a registry
of their own so that several servers in one process (tests) do not collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds; vLLM's buckets for the same histograms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("jaxaccel:num_requests_running", "Requests in the running batch",
                             registry=r)
        self.waiting = Gauge("jaxaccel:num_requests_waiting", "Requests queued", registry=r)
        self.prompt_tokens = Counter("jaxaccel:prompt_tokens", "Prompt tokens received",
                                     registry=r)
        self.generation_tokens = Counter("jaxaccel:generation_tokens",
                                         "Tokens generated", registry=r)
        self.ttft = Histogram("jaxaccel:time_to_first_token_seconds",
                              "Time from arrival to the first new token", registry=r,
                              buckets=TTFT_BUCKETS)
        self.tpot = Histogram("jaxaccel:time_per_output_token_seconds",
                              "Time per new token after the first", registry=r,
                              buckets=TPOT_BUCKETS)
        self.kv_pages_used = Gauge("jaxaccel:kv_cache_pages_used",
                                   "KV cache pages held by requests", registry=r)
        self.kv_pages_total = Gauge("jaxaccel:kv_cache_pages_total",
                                    "KV cache pages in the pool (null page excluded)",
                                    registry=r)
        self.prefix_hit_rate = Gauge("jaxaccel:prefix_cache_hit_rate",
                                     "Prompt tokens served from the prefix cache / prompt "
                                     "tokens scheduled", registry=r)
        self.preemptions = Gauge("jaxaccel:num_preemptions_total",
                                 "Sequences preempted (recomputed later) so far", registry=r)
        self.requests = Counter("jaxaccel:request_success", "Requests finished",
                                ["finished_reason"], registry=r)

    def observe_engine(self, engine) -> None:
        """Gauges from the engine's state (called by the engine thread after each step)."""
        self.running.set(engine.num_running)
        self.waiting.set(engine.num_waiting)
        self.kv_pages_used.set(engine.pool.used_count)
        self.kv_pages_total.set(engine.pool.num_pages - 1)
        stats = engine.stats()
        self.preemptions.set(stats["preemptions"])
        hit = stats["prefix_hit_pages"] * stats["page_size"]
        asked = hit + stats["prefill_tokens"]
        self.prefix_hit_rate.set(hit / asked if asked else 0.0)

    def text(self) -> bytes:
        return generate_latest(self.registry)
