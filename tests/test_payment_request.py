"""Reading a POST /payments body: exact cents against a decimal oracle, one reading of each key."""
import json
import uuid
from decimal import ROUND_HALF_EVEN, Decimal

from hypothesis import given, settings, strategies as st

import payment_request
from payment_request import BAD_AMOUNT, BAD_ID, BAD_JSON, NAMED_TWICE, NO_AMOUNT, NO_ID, NOT_POSITIVE, TOO_LARGE, read

MAX_CENTS = 100_000_000_000          # MAX_AMOUNT 1,000,000,000
ID = "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3"


def oracle(text):
    """The processors' rounding: half-even on the exact decimal value of the number's text."""
    exact = Decimal(text)
    if exact <= 0:
        return NOT_POSITIVE
    if exact > MAX_CENTS / 100:
        return TOO_LARGE
    cents = int(exact.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN) * 100)
    return NOT_POSITIVE if cents <= 0 else TOO_LARGE if cents > MAX_CENTS else cents


json_numbers = st.builds(
    lambda sign, whole, fraction, exponent: sign + whole + fraction + exponent,
    st.sampled_from(["", "", "-"]),
    st.one_of(st.just("0"), st.integers(1, 10 ** 12).map(str)),
    st.one_of(st.just(""), st.text("0123456789", min_size=1, max_size=30).map(lambda d: "." + d)),
    st.one_of(st.just(""), st.builds(lambda e, s, d: e + s + str(d), st.sampled_from("eE"),
                                     st.sampled_from(["", "+", "-"]), st.integers(0, 40))))


@settings(max_examples=3000, deadline=None)
@given(json_numbers, st.booleans())
def test_cents_are_the_half_even_rounding_of_the_decimal_text(number, amount_first):
    fields = ['"correlationId":"%s"' % ID, '"amount":%s' % number]
    if amount_first:
        fields.reverse()
    answer = read(("{" + ",".join(fields) + "}").encode(), MAX_CENTS)
    expected = oracle(number)
    assert answer == expected if type(expected) is not int else answer == (ID, expected)


@settings(max_examples=1000, deadline=None)
@given(json_numbers, st.sampled_from(["", " ", "\n", "\t ", "\r\n"]), st.dictionaries(
    st.text(min_size=1, max_size=5).filter(lambda k: k not in ("correlationId", "amount")),
    st.one_of(st.integers(), st.text(max_size=5), st.none()), max_size=2))
def test_every_path_reads_the_same(number, ws, extra):
    """The compact form, the spaced form and the general path (extra fields) agree."""
    compact = '{"correlationId":"%s","amount":%s}' % (ID, number)
    spaced = ws.join(["{", '"correlationId"', ":", '"%s"' % ID, ",", '"amount"', ":", number, "}"])
    with_extra = compact[:-1] + "".join(",%s:%s" % (json.dumps(k), json.dumps(v)) for k, v in extra.items()) + "}"
    answers = {read(body.encode(), MAX_CENTS) for body in (compact, spaced, with_extra)}
    assert len(answers) == 1, answers


def test_a_key_named_twice_is_refused_whichever_comes_first():
    other = str(uuid.uuid4())
    for body in ('{"correlationId":"%s","correlationId":"%s","amount":1}' % (ID, other),
                 '{"correlationId":"%s","amount":1,"correlationId":"%s"}' % (ID, ID),
                 '{"correlationId":"%s","amount":1,"amount":2}' % ID,
                 '{"correlation\\u0049d":"%s","correlationId":"%s","amount":1}' % (other, ID),
                 '{"amount":1,"correlationId":"%s","am\\u006fun\\u0074":1}' % ID):
        assert read(body.encode(), MAX_CENTS) == NAMED_TWICE, body


def test_nested_and_quoted_names_are_not_the_payments_own():
    nested = '{"meta":{"correlationId":"%s","amount":5},"correlationId":"%s","amount":1}' % (uuid.uuid4(), ID)
    quoted = '{"note":"\\"correlationId\\":\\"x\\"","correlationId":"%s","amount":1}' % ID
    assert read(nested.encode(), MAX_CENTS) == (ID, 100)
    assert read(quoted.encode(), MAX_CENTS) == (ID, 100)


def test_each_refusal():
    cases = {
        b"": BAD_JSON, b"{": BAD_JSON, b"[1]": BAD_JSON, b'{"amount":1}': NO_ID,
        b'{"correlationId":"%s"}' % ID.encode(): NO_AMOUNT,
        b'{"correlationId":"%s","amount":"1"}' % ID.encode(): BAD_AMOUNT,
        b'{"correlationId":"%s","amount":true}' % ID.encode(): BAD_AMOUNT,
        b'{"correlationId":"%s","amount":null}' % ID.encode(): NO_AMOUNT,
        b'{"correlationId":"x","amount":1}': BAD_ID, b'{"correlationId":7,"amount":1}': BAD_ID,
        b'{"correlationId":"%s","amount":0.004}' % ID.encode(): NOT_POSITIVE,
        b'{"correlationId":"%s","amount":1e10}' % ID.encode(): TOO_LARGE,
        b'{"correlationId":"%s","amount":1e999}' % ID.encode(): TOO_LARGE,
        b'{"correlationId":"%s","amount":1e999,"x":0}' % ID.encode(): BAD_JSON,   # orjson: not a double
        b'{"correlationId":"%s","amount":NaN}' % ID.encode(): BAD_JSON,
        b'\xef\xbb\xbf{"correlationId":"%s","amount":1}' % ID.encode(): BAD_JSON,
        b"[" * 1020 + b"]" * 1020: BAD_JSON,
    }
    for body, reason in cases.items():
        assert read(body, MAX_CENTS) == reason, body[:80]


def test_the_id_is_read_in_lower_case():
    assert read(b'{"correlationId":"%s","amount":19.9}' % ID.upper().encode(), MAX_CENTS) == (ID, 1990)
    assert payment_request.read(b' {"amount" : 19.90 , "correlationId" : "%s" } ' % ID.encode(), MAX_CENTS) \
        == (ID, 1990)
