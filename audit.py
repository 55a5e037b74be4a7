"""The audit log: one JSON line per payment lifecycle event, written off the hot path.

Events: accepted, attempt, paid, retry, dead_lettered, handed_over, adopted.
Each line carries the correlationId, the event's wall-clock time (ms) and
what matters for it (processor, requestedAt, outcome). Recording an event
appends a tuple to a list; a timer writes the batch every flush_interval_s,
so a payment request never waits for a disk write.

AUDIT_LOG: a file path, "-" for stdout, empty for off.
"""
import sys

import orjson

from timestamps import now_ms


class AuditLog:
    def __init__(self, destination, loop, flush_interval_s=0.2):
        self.enabled = bool(destination)
        self._destination = destination
        self._loop = loop
        self._interval = flush_interval_s
        self._batch = []
        self._timer = None
        self._file = None

    def open(self):
        if not self.enabled:
            return
        self._file = sys.stdout.buffer if self._destination == "-" else open(self._destination, "ab")

    def record(self, event, correlation_id, **fields):
        if not self.enabled:
            return
        fields["event"] = event
        fields["correlationId"] = correlation_id
        fields["at"] = now_ms()
        self._batch.append(fields)
        if self._timer is None:
            self._timer = self._loop.call_later(self._interval, self.flush)

    def flush(self):
        self._timer = None
        batch, self._batch = self._batch, []
        if not batch or self._file is None:
            return
        self._file.write(b"".join(orjson.dumps(entry) + b"\n" for entry in batch))
        self._file.flush()

    def close(self):
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        if self._file is not None and self._file is not sys.stdout.buffer:
            self._file.close()


OFF = AuditLog("", None)   # for a book or dispatcher built without one (tests): records nothing
