"""Every setting of an instance, read once from the environment.

Each field's default is the value used by docker-compose.yml and `make up`
unless they override it; README.md lists them all.
"""
import os
from dataclasses import dataclass, fields


def _env(name, default, cast=str):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if cast is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return cast(raw)


@dataclass(frozen=True)
class Settings:
    instance_id: int = 1
    # Where HAProxy reaches this instance, and an optional TCP port for curl.
    socket_path: str = "/tmp/rinha-api1.sock"
    http_port: int = 0
    # The peer link: this instance listens on peer_listen, dials peer_connect.
    peer_listen: str = ""
    peer_connect: str = ""
    # A peer that reads nothing for this long is dropped (payments wait at most this long for
    # their acceptance to reach it, then 503); and how long a (re)started instance waits for the
    # peer's records before it answers summaries anyway.
    peer_stall_s: float = 1.0
    peer_sync_timeout_s: float = 10.0

    processor_default_url: str = "http://payment-processor-default:8080"
    processor_fallback_url: str = "http://payment-processor-fallback:8080"

    # HTTP server limits.
    max_head_bytes: int = 8 * 1024
    max_body_bytes: int = 16 * 1024
    request_timeout_s: float = 10.0     # a started request must complete within this
    keepalive_timeout_s: float = 75.0   # idle keep-alive connections are closed after this

    # Payments.
    queue_capacity: int = 50_000        # pending payments per instance; beyond it: 503
    max_amount: float = 1_000_000_000.0 # largest accepted amount (documented bound)
    store_capacity: int = 1_000_000     # paid records kept per instance (ring buffer)
    index_capacity: int = 1_000_000     # correlationIds remembered for idempotency
    purge_enabled: bool = False         # POST /purge-payments: off unless configured (compose turns it on)

    # Paying.
    # Concurrent requests to each processor, per instance. A slow processor needs many in flight
    # (Little's law: 550 payments/s at 1 s each is 550 at once); both instances together stay
    # under the processor's 800 served at once. Measured in docs/PERFORMANCE.md ("Other schedules").
    max_in_flight_default: int = 256
    max_in_flight_fallback: int = 64
    dispatch_rate: float = 1500.0       # new attempts per second at most (spreads a backlog's drain)
    dispatch_burst: int = 16
    dispatch_delay_s: float = 0.002     # an accepted payment is sent this long after its 202 (see processors.py)
    request_timeout_processor_s: float = 15.0  # > the slowest processor delay (5 s) by a margin
    connect_timeout_s: float = 2.0
    retry_base_s: float = 0.05
    retry_max_s: float = 2.0
    breaker_failures: int = 3           # consecutive definite failures that open a breaker
    breaker_probe_s: float = 0.5        # first probe after opening; doubles up to breaker_probe_max_s
    breaker_probe_max_s: float = 2.0
    # Fee-aware routing: "never" (default only), "patient" (fallback only after the
    # default has failed for fallback_after_s, or has no free slot while the head of the
    # queue has waited fallback_wait_s, or the queue is nearly full), "eager" (fallback
    # whenever the default's breaker is open).
    fallback_policy: str = "patient"
    fallback_after_s: float = 30.0
    fallback_wait_s: float = 2.0
    fallback_queue_ratio: float = 0.8

    # Health monitor: never more than one call per processor per health_interval_s
    # across both instances (the processors allow one per 5 s).
    health_enabled: bool = True
    health_interval_s: float = 5.5

    # Fees the processors charge (for /metrics, /report and the dashboard; routing does not use them).
    fee_default: float = 0.05
    fee_fallback: float = 0.15
    # X-Rinha-Token of the processors' admin API: when set, GET /report audits against their books.
    processor_admin_token: str = ""

    # Operations.
    shutdown_grace_s: float = 5.0       # on SIGTERM: time to finish pending payments before handing them to the peer
    audit_log: str = ""                 # audit log destination: a path, "-" for stdout, empty for off
    admin_token: str = ""               # when set, purge and dead-letter replay need header X-Admin-Token

    log_level: str = "INFO"

    @classmethod
    def from_env(cls):
        values = {}
        for f in fields(cls):
            cast = type(f.default)
            values[f.name] = _env(f.name.upper(), f.default, cast)
        return cls(**values)

    def public(self):
        """The effective configuration, for the startup log line."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
