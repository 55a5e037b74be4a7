"""ISO-8601 timestamps <-> integer milliseconds since the epoch (UTC), read as the processors read them.

Payments are sent to the processors with millisecond `requestedAt` values and
stored as those integers. A summary bound is read with the processors' own
grammar (the one simulator.py models), so that a window means the same set of
payments here and there:

    YYYY-MM-DD [(T|t|space) hh:mm [:ss [(.|,) fraction]]] [Z | z | (+|-)hh[[:]mm]]

no zone meaning UTC, ASCII digits only, the fraction cut to microseconds (the
processors keep microseconds). Anything else (basic format, week or ordinal
dates, hour 24, second 60) is refused. A bound is then turned into whole
milliseconds without moving a record across it: `from` rounds up, `to` down.
"""
import re
import time
from datetime import date

_TIMESTAMP = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
    r"(?:[Tt ]([0-9]{2}):([0-9]{2})(?::([0-9]{2})(?:[.,]([0-9]+))?)?)?"
    r"(?:([Zz])|([+-])([0-9]{2})(?::?([0-9]{2}))?)?\Z")
_EPOCH_DAY = date(1970, 1, 1).toordinal()


def now_ms():
    return time.time_ns() // 1_000_000


def format_ms(ms):
    """1752150896789 -> '2025-07-10T12:34:56.789Z' (what JavaScript's toISOString prints)."""
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%03dZ" % millis


def parse_us(text):
    """Microseconds since the epoch; ValueError when the processors would refuse the text."""
    match = _TIMESTAMP.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError("not an ISO-8601 timestamp")
    year, month, day, hour, minute, second, fraction, _, sign, offset_h, offset_m = match.groups()
    days = date(int(year), int(month), int(day)).toordinal() - _EPOCH_DAY    # ValueError: no such day
    hour, minute, second = int(hour or 0), int(minute or 0), int(second or 0)
    if hour > 23 or minute > 59 or second > 59:
        raise ValueError("time of day out of range")
    seconds = days * 86_400 + hour * 3600 + minute * 60 + second
    if sign:
        offset_h, offset_m = int(offset_h), int(offset_m or 0)
        if offset_h > 23 or offset_m > 59:
            raise ValueError("offset out of range")
        offset = offset_h * 3600 + offset_m * 60
        seconds += -offset if sign == "+" else offset
    micros = int(fraction[:6].ljust(6, "0")) if fraction else 0
    return seconds * 1_000_000 + micros


def parse_lower_bound_ms(text):
    """Smallest whole millisecond >= the timestamp (an inclusive `from`)."""
    return -((-parse_us(text)) // 1000)


def parse_upper_bound_ms(text):
    """Largest whole millisecond <= the timestamp (an inclusive `to`)."""
    return parse_us(text) // 1000
