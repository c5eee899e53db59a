"""What the service counts, in Prometheus' text format (GET /metrics), one registry per gateway replica:

stt_fast_requests_total{status}       requests answered, by HTTP status
stt_fast_request_seconds              latency from the request's arrival to its answer (histogram)
stt_fast_batch_size                   clips in the forward pass each answered clip rode in (histogram)
stt_fast_in_flight                    requests inside the gateway now: decoding, queued or in a batch
"""

from __future__ import annotations

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServiceMetrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # the *_created series say when the process started: noise here

        self.registry = CollectorRegistry()
        self.requests = Counter("stt_fast_requests", "Requests answered, by HTTP status", ["status"],
                                registry=self.registry)
        self.latency = Histogram("stt_fast_request_seconds", "Seconds from a request's arrival to its answer",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("stt_fast_batch_size", "Clips in the forward pass of each answered clip",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("stt_fast_in_flight", "Requests inside the gateway now", registry=self.registry)

    def answered(self, status: int, seconds: float, batch_size: int | None = None) -> None:
        self.requests.labels(status=str(status)).inc()
        self.latency.observe(seconds)
        if batch_size is not None:
            self.batch_size.observe(batch_size)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def read_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name with its labels: value} (for the load generator and the tests)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples
