"""The body of POST /payments -> (correlationId, cents), or why it is refused.

Two rules beyond plain JSON make a payment mean one thing everywhere:
- each of correlationId and amount may be named once: a JSON parser keeps the
  last of two, HAProxy routes by the first, so a body naming one twice could be
  accepted by an instance that never sees the repeats of that id (400);
- the amount is rounded half-even on its decimal text, as the processors round
  it, never through a binary float (1.005000000000000000001 is 1.01).

The body every client sends ({"correlationId": "<uuid>", "amount": 19.9}, in
either order, any JSON whitespace) is matched by one regular expression; any
other body takes the general path: orjson for strict JSON, then the standard
library's decoder for the keys and the number's text.
"""
import json
import re
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

import orjson

_WS = rb"[ \t\n\r]*"
_UUID_TEXT = rb'"([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"'
_NUMBER = rb"(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)"
_ID_FIELD = rb'"correlationId"' + _WS + rb":" + _WS + _UUID_TEXT
_AMOUNT_FIELD = rb'"amount"' + _WS + rb":" + _WS + _NUMBER
_ID_FIRST = re.compile(_WS + rb"\{" + _WS + _ID_FIELD + _WS + rb"," + _WS + _AMOUNT_FIELD + _WS + rb"\}" + _WS + rb"\Z")
_AMOUNT_FIRST = re.compile(_WS + rb"\{" + _WS + _AMOUNT_FIELD + _WS + rb"," + _WS + _ID_FIELD + _WS + rb"\}" + _WS
                           + rb"\Z")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
_PLAIN_AMOUNT = re.compile(rb"(0|[1-9][0-9]{0,14})(?:\.([0-9]{1,2}))?\Z")
_CENT = Decimal("0.01")

# Why a body is refused (the router turns each into its 400 answer).
BAD_JSON, NO_ID, BAD_ID, NO_AMOUNT, BAD_AMOUNT, NOT_POSITIVE, TOO_LARGE, NAMED_TWICE = (
    "bad_json", "no_id", "bad_id", "no_amount", "bad_amount", "not_positive", "too_large", "named_twice")


class Refused(str):
    """A reason from the list above (a str, so it can key a table of answers)."""


def read(body, max_cents):
    """(correlationId in lower case, amount in cents), or a Refused reason."""
    if body[:18] == _COMPACT_HEAD and body[54:65] == _COMPACT_MIDDLE and body[-1:] == b"}" \
            and _UUID_BYTES.match(body, 18, 54) \
            and (body[65:-1] in _known_cents or _NUMBER_BYTES.match(body, 65, len(body) - 1)):
        # {"correlationId":"<36>","amount":<number>}: JSON.stringify's form, read by position
        correlation_id, amount = body[18:54], body[65:-1]
    else:
        match = _ID_FIRST.match(body)
        if match is not None:
            correlation_id, amount = match.groups()
        else:
            match = _AMOUNT_FIRST.match(body)
            if match is None:
                return _read_general(body, max_cents)
            amount, correlation_id = match.groups()
    cents = _known_cents.get(amount)
    if cents is None:
        cents = cents_of(amount, max_cents)
        if type(cents) is not int:
            return cents
        if len(_known_cents) >= 1024:
            _known_cents.clear()
        _known_cents[amount] = cents
    return correlation_id.decode().lower(), cents


_COMPACT_HEAD = b'{"correlationId":"'
_COMPACT_MIDDLE = b'","amount":'
_UUID_BYTES = re.compile(rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_NUMBER_BYTES = re.compile(_NUMBER + rb"\Z")
_known_cents = {}      # amount text -> cents, within max_cents: clients send the same few amounts


def cents_of(number, max_cents):
    """A JSON number's text (bytes) -> cents rounded half-even, or NOT_POSITIVE / TOO_LARGE."""
    plain = _PLAIN_AMOUNT.match(number)
    if plain is not None:                     # 19.9, 20, 0.01: no Decimal needed
        whole, fraction = plain.groups()
        cents = int(whole) * 100 + (int(fraction.ljust(2, b"0")) if fraction else 0)
    else:
        try:
            exact = Decimal(number.decode())
        except (InvalidOperation, UnicodeDecodeError):
            return Refused(BAD_AMOUNT)
        if exact <= 0:
            return Refused(NOT_POSITIVE)
        if exact > max_cents / 100:          # before quantize: 1e999999 has no cents to round to
            return Refused(TOO_LARGE)
        cents = int(exact.quantize(_CENT, rounding=ROUND_HALF_EVEN) * 100)
    if cents <= 0:
        return Refused(NOT_POSITIVE)
    if cents > max_cents:
        return Refused(TOO_LARGE)
    return cents


class _Number(bytes):
    """A JSON number, kept as its text."""


class _Fields(list):
    """A JSON object, kept as its (name, value) pairs in order, duplicates included."""


def _read_general(body, max_cents):
    try:
        orjson.loads(body)                    # strict JSON: no NaN, no BOM, valid UTF-8, nothing after
    except orjson.JSONDecodeError:
        return Refused(BAD_JSON)
    number = lambda text: _Number(text.encode())
    try:
        data = json.loads(body, object_pairs_hook=_Fields, parse_float=number, parse_int=number)
    except (ValueError, RecursionError):      # nesting orjson allows (1,024) beyond Python's limit
        return Refused(BAD_JSON)
    if type(data) is not _Fields:
        return Refused(BAD_JSON)
    names = [name for name, _ in data]
    if names.count("correlationId") > 1 or names.count("amount") > 1:
        return Refused(NAMED_TWICE)
    fields = dict(data)
    correlation_id = fields.get("correlationId")
    amount = fields.get("amount")
    if correlation_id is None:
        return Refused(NO_ID)
    if type(correlation_id) is not str or not _UUID.match(correlation_id):
        return Refused(BAD_ID)
    if amount is None:
        return Refused(NO_AMOUNT)
    if type(amount) is not _Number:           # a string, a bool, an object: not a number
        return Refused(BAD_AMOUNT)
    cents = cents_of(amount, max_cents)
    if type(cents) is not int:
        return cents
    return correlation_id.lower(), cents
