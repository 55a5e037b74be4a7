"""Summary latency of the store at 10^4, 10^5 and 10^6 stored payments, and memory per payment.

    .venv/bin/python bench/store_bench.py

Payments arrive at 500/s with requestedAt jittered by up to 2 s (retries land
out of order). The windows asked are the official test's: 13.5 s windows
(checker), the last 70 s (final summary), and everything with bounds.
"""
import os
import random
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from store import PaymentStore  # noqa: E402

T0 = 1752150896000
RATE_PER_S = 500


def fill(store, count, rng):
    for i in range(count):
        ts = T0 + i * 1000 // RATE_PER_S + rng.randint(-2000, 0)
        store.record_local("%032x" % rng.getrandbits(128), ts, 1990, 0 if rng.random() < 0.9 else 1)
    return T0 + count * 1000 // RATE_PER_S


def time_query(store, lo, hi, repeat=200):
    started = time.perf_counter()
    for _ in range(repeat):
        store.summary(lo, hi)
    return (time.perf_counter() - started) / repeat * 1e6


def main():
    rng = random.Random(1)
    print("%10s %14s %14s %14s %14s" % ("payments", "13.5 s window", "last 70 s", "all, bounded", "unbounded"))
    for count in (10_000, 100_000, 1_000_000):
        store = PaymentStore(count, "bench")
        end = fill(store, count, rng)
        print("%10d %11.1f us %11.1f us %11.1f us %11.1f us" % (
            count,
            time_query(store, end - 15_000, end - 1_500),
            time_query(store, end - 70_000, end),
            time_query(store, T0 - 10_000, end + 10_000, repeat=20),
            time_query(store, None, None)))
    tracemalloc.start()
    store = PaymentStore(100_000, "bench")
    fill(store, 100_000, rng)
    current, _ = tracemalloc.get_traced_memory()
    print("memory per stored payment: %.1f bytes (capacity 100,000, full)" % (current / 100_000))


if __name__ == "__main__":
    main()
