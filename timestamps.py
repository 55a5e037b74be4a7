"""ISO-8601 timestamps <-> integer milliseconds since the epoch (UTC).

Payments are sent to the processors with millisecond `requestedAt` values and
stored as those integers, so a summary bound must be turned into the same unit
without rounding a record across it: `from` rounds up, `to` rounds down.
"""
import re
import time
from datetime import datetime, timezone

_FRACTION = re.compile(r"\.(\d+)")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def now_ms():
    return time.time_ns() // 1_000_000


def format_ms(ms):
    """1752150896789 -> '2025-07-10T12:34:56.789Z' (what JavaScript's toISOString prints)."""
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%03dZ" % millis


def _parse_ns(text):
    """Exact nanoseconds since the epoch; naive or date-only means UTC. ValueError if malformed."""
    if not isinstance(text, str) or not 10 <= len(text) <= 64:
        raise ValueError("not an ISO-8601 timestamp")
    fraction_ns = 0
    match = _FRACTION.search(text)
    if match:
        digits = match.group(1)
        # Digits beyond nanoseconds cannot change a millisecond bound except by
        # being non-zero; keep one extra nanosecond to stand for them.
        fraction_ns = int(digits[:9].ljust(9, "0")) + (1 if digits[9:].strip("0") else 0)
        text = text[: match.start()] + text[match.end():]
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    delta = parsed - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + fraction_ns


def parse_lower_bound_ms(text):
    """Smallest whole millisecond >= the timestamp (an inclusive `from`)."""
    return -((-_parse_ns(text)) // 1_000_000)


def parse_upper_bound_ms(text):
    """Largest whole millisecond <= the timestamp (an inclusive `to`)."""
    return _parse_ns(text) // 1_000_000
