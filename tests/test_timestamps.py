import pytest

from timestamps import format_ms, parse_lower_bound_ms, parse_upper_bound_ms

MS = 1752150896789  # 2025-07-10T12:34:56.789Z


def test_format_is_javascript_toisostring():
    assert format_ms(MS) == "2025-07-10T12:34:56.789Z"
    assert format_ms(1752150896000) == "2025-07-10T12:34:56.000Z"


@pytest.mark.parametrize("text", ["2025-07-10T12:34:56.789Z", "2025-07-10T12:34:56.789000Z",
                                  "2025-07-10T14:34:56.789+02:00", "2025-07-10T12:34:56.789"])
def test_exact_millisecond_bounds_are_inclusive(text):
    assert parse_lower_bound_ms(text) == MS
    assert parse_upper_bound_ms(text) == MS


def test_sub_millisecond_bounds_round_inward():
    # from 56.7891 excludes a record at 56.789; to 56.7899 includes it.
    assert parse_lower_bound_ms("2025-07-10T12:34:56.7891Z") == MS + 1
    assert parse_upper_bound_ms("2025-07-10T12:34:56.7899Z") == MS
    # digits beyond microseconds still count
    assert parse_lower_bound_ms("2025-07-10T12:34:56.7890000001Z") == MS + 1


def test_whole_seconds_and_dates():
    assert parse_lower_bound_ms("2025-07-10T12:34:56Z") == MS - 789
    assert parse_lower_bound_ms("2025-07-10") == MS - (12 * 3600 + 34 * 60 + 56) * 1000 - 789


@pytest.mark.parametrize("text", ["", "yesterday", "2025-13-10T00:00:00Z", "2025-07-10T25:00:00Z",
                                  "2025-07-10T12:34:56.abcZ", "x" * 100, None, 12])
def test_malformed_rejected(text):
    with pytest.raises((ValueError, TypeError)):
        parse_lower_bound_ms(text)
