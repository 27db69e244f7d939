"""Prometheus metrics of one API app (a registry per app, so tests can run several).

What it is: latency histograms the API process observes itself (it sees each token arrive)
and a collector that reads the engine's latest `EngineStats` at scrape time: gauges for the
queue and KV pool (and the API's own count of requests it still streams), the kernel each op
runs (`tsrun_kernel_info{op, backend}`, from EngineReady), counters from the
engine's cumulative totals (exported as-is, so a restarted API process never double counts).
Names carry the `tsrun_` prefix, e.g. `tsrun_time_to_first_token_seconds`,
`tsrun_prompt_tokens_total`.
What it is not: the engine's own step timings (the engine process owns those).
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tscompile.runtime.server.engine_client import EngineClient

PREFIX = "tsrun_"
# Buckets follow vLLM's, so dashboards built for it read ours the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineStatsCollector(Collector):
    def __init__(self, client: EngineClient):
        self.client = client

    def collect(self) -> Iterator[Metric]:
        s = self.client.stats
        running, waiting = (s.running, s.waiting) if s else (0, 0)
        usage = s.kv_blocks_used / s.kv_blocks_total if s and s.kv_blocks_total else 0.0
        yield GaugeMetricFamily(PREFIX + "num_requests_running",
                                "Requests in the engine's running batch", value=running)
        yield GaugeMetricFamily(PREFIX + "num_requests_waiting",
                                "Requests queued in the engine", value=waiting)
        yield GaugeMetricFamily(PREFIX + "kv_cache_usage_perc",
                                "Fraction of KV cache blocks in use (1 = full)", value=usage)
        kernels = GaugeMetricFamily(PREFIX + "kernel_info",
                                    "The kernel backend each op runs (value 1)",
                                    labels=("op", "backend"))
        for op, backend in self.client.ready.kernels if self.client.ready else ():
            kernels.add_metric((op, backend), 1)
        yield kernels
        yield GaugeMetricFamily(PREFIX + "api_requests_pending",
                                "Engine requests the API process is still streaming",
                                value=self.client.num_pending)
        for name, doc, attr in (
                ("prompt_tokens", "Prefill tokens processed", "prompt_tokens"),
                ("generation_tokens", "Tokens generated", "generation_tokens"),
                ("prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                 "prefix_hit_tokens"),
                ("num_preemptions", "Requests preempted by the scheduler", "preemptions"),
                ("steps", "Engine forward steps", "steps"),
                ("eager_steps", "Engine steps run eagerly: no CUDA-graph bucket held them "
                                "(or no graphs: CPU, --enforce-eager)", "eager_steps"),
                ("spec_verify_steps", "Speculative verify rows (a decode with drafts)",
                 "spec_verify_steps"),
                ("spec_draft_tokens", "Draft tokens sent to verification",
                 "spec_draft_tokens"),
                ("spec_accepted_tokens", "Draft tokens the target accepted",
                 "spec_accepted_tokens")):
            yield CounterMetricFamily(PREFIX + name, doc, value=getattr(s, attr) if s else 0)


class Metrics:
    def __init__(self, client: EngineClient):
        self.registry = CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Arrival to first generated token",
            buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between consecutive engine outputs of one request", buckets=ITL_BUCKETS,
            registry=r)
        self.e2e_request_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Arrival to finish of one engine request",
            buckets=E2E_BUCKETS, registry=r)
        self.request_success = Counter(
            PREFIX + "request_success", "Finished engine requests", ["finish_reason"],
            registry=r)
        r.register(_EngineStatsCollector(client))

    def render(self) -> bytes:
        return generate_latest(self.registry)
