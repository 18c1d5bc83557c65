"""``GET /metrics``: the telemetry's latest snapshot in Prometheus text format.

A custom collector on a registry of the app's own (not the process-global one), so several apps
in one process (tests) never collide, and every scrape reads one consistent snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .telemetry import Telemetry


class EngineCollector(Collector):
    def __init__(self, telemetry: Telemetry) -> None:
        self.t = telemetry

    def collect(self) -> Iterator[Metric]:
        new, _ = self.t.latest()
        v = self.t.view()
        tot = v["total"]
        yield CounterMetricFamily("mer_tokens", "Tokens sampled, all requests", value=new.tokens)
        yield GaugeMetricFamily("mer_tokens_per_second", "Tokens sampled per second (recent)",
                                value=tot["tokens_per_s"])  # fmt: skip
        yield CounterMetricFamily("mer_decode_steps", "Batched decode steps",
                                  value=new.decode_steps)  # fmt: skip
        yield GaugeMetricFamily("mer_queue_length", "Requests waiting to join the batch",
                                value=new.queued)  # fmt: skip
        yield GaugeMetricFamily("mer_running_requests", "Requests in the batch", value=new.running)
        yield CounterMetricFamily("mer_requests_finished", "Requests finished or failed",
                                  value=new.finished)  # fmt: skip
        yield GaugeMetricFamily("mer_batch_size", "Mean batch of recent decode steps",
                                value=new.batch)  # fmt: skip
        yield GaugeMetricFamily("mer_experts_per_layer", "Mean experts read per MoE layer in "
                                "recent decode steps (the batch's union)",
                                value=new.union_per_layer)  # fmt: skip
        yield GaugeMetricFamily("mer_kv_bytes", "Bytes of KV cache held by running requests",
                                value=new.kv_bytes)  # fmt: skip
        yield CounterMetricFamily("mer_expert_hits", "Expert cache hits", value=new.hits)
        yield CounterMetricFamily("mer_expert_misses", "Expert cache misses", value=new.misses)
        yield CounterMetricFamily("mer_bytes_read", "Bytes read from the expert store",
                                  value=new.bytes_read)  # fmt: skip
        yield CounterMetricFamily("mer_io_wait_seconds", "Time compute waited on reads",
                                  value=new.io_wait_s)  # fmt: skip
        yield CounterMetricFamily("mer_prefetch_hits", "Misses a prefetch had already read",
                                  value=new.prefetch_hits)  # fmt: skip
        rate = GaugeMetricFamily("mer_layer_hit_rate", "Expert cache hit rate per MoE layer",
                                 labels=["layer"])  # fmt: skip
        for layer, r in zip(new.layers, v["layer"]["hit_rate"], strict=True):
            rate.add_metric([str(layer)], r)
        yield rate
        if new.pool_total is not None:
            yield GaugeMetricFamily("mer_pool_free_slots", "Free expert buffer-pool slots",
                                    value=new.pool_free)  # fmt: skip
            yield GaugeMetricFamily("mer_pool_slots", "Expert buffer-pool slots",
                                    value=new.pool_total)  # fmt: skip


def registry(telemetry: Telemetry) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(EngineCollector(telemetry))
    return reg
