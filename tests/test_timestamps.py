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
    # digits beyond microseconds are cut, as the processors cut them
    assert parse_lower_bound_ms("2025-07-10T12:34:56.7890000001Z") == MS
    assert parse_lower_bound_ms("2025-07-10T12:34:56.7890001Z") == MS


def test_whole_seconds_and_dates():
    assert parse_lower_bound_ms("2025-07-10T12:34:56Z") == MS - 789
    assert parse_lower_bound_ms("2025-07-10") == MS - (12 * 3600 + 34 * 60 + 56) * 1000 - 789


@pytest.mark.parametrize("text", ["", "yesterday", "2025-13-10T00:00:00Z", "2025-07-10T25:00:00Z",
                                  "2025-07-10T12:34:56.abcZ", "x" * 100, None, 12])
def test_malformed_rejected(text):
    with pytest.raises((ValueError, TypeError)):
        parse_lower_bound_ms(text)


# ----- one grammar: the processors' (simulator.parse_timestamp_us is the reference) --------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from simulator import parse_timestamp_us  # noqa: E402
from timestamps import parse_us  # noqa: E402


def two(lo, hi):
    return st.integers(lo, hi).map(lambda n: "%02d" % n)


dates = st.builds(lambda y, m, d: "%04d-%s-%s" % (y, m, d), st.integers(0, 9999), two(0, 13), two(0, 32))
times = st.one_of(
    st.just(""),
    st.builds(lambda sep, h, m: sep + h + ":" + m, st.sampled_from("Tt x"), two(0, 25), two(0, 61)),
    st.builds(lambda sep, h, m, s, frac: sep + h + ":" + m + ":" + s + frac, st.sampled_from("Tt "),
              two(0, 24), two(0, 60), two(0, 61),
              st.one_of(st.just(""), st.builds(lambda dot, digits: dot + digits, st.sampled_from(".,:"),
                                               st.text("0123456789", max_size=12)))))
zones = st.one_of(st.sampled_from(["", "Z", "z", "+00:00", "-00:00", "+05:30", "+0530", "+05", "-1200", "+24:00",
                                   "+05:60", "+5", "UTC", " Z", "Z "]),
                  st.builds(lambda sign, h, m: sign + h + m, st.sampled_from("+-"), two(0, 25),
                            st.one_of(st.just(""), two(0, 61), two(0, 61).map(lambda m: ":" + m))))
forms = st.builds(lambda d, t, z: d + t + z, dates, times, zones)
mutated = st.builds(lambda text, at, junk: text[:at] + junk + text[at:], forms, st.integers(0, 40),
                    st.text(max_size=2))
others = st.sampled_from(["20250710T123456Z", "2025-W28-4", "2025-191", "2025-07-10T12", "2025-07-10T1234",
                          "+2025-07-10", "2025-7-10", "٢٠٢٥-07-10", "2025-07-10T12:34:56.", "2025-07-10T12:34:56.789Zz"])


@settings(max_examples=4000, deadline=None)
@given(st.one_of(forms, mutated, others))
def test_a_bound_is_read_as_the_processors_read_it(text):
    try:
        theirs = parse_timestamp_us(text)
    except (ValueError, OverflowError):
        theirs = None
    try:
        ours = parse_us(text)
    except ValueError:
        ours = None
    assert ours == theirs, text


def test_forms_the_review_found():
    assert parse_lower_bound_ms("2025-07-10T12:34:56,789Z") == MS
    assert parse_lower_bound_ms("2025-07-10t12:34:56.789z") == MS
    for refused in ("20250710T123456Z", "2025-W28-4", "2025-191"):
        with pytest.raises(ValueError):
            parse_lower_bound_ms(refused)
