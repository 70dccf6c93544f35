"""Helpers shared by the v1 wire protocol's tests (test_protocol_codec.py, test_protocol_grant_fields.py,
test_protocol_fuzz.py): a raw message or grant with exactly the given fields, and the checks that one is
refused (with its code) or decodes to a grant."""

from __future__ import annotations

import json
from typing import Any

import pytest

from xskbroker.wire.protocol import Grant, ProtocolError, decode_request

DROP = object()  # a field value meaning "leave the field out"


def raw(**fields: Any) -> bytes:
    """A version 1 message with exactly these fields (DROP removes one); not validated."""
    return json.dumps({"v": 1, **{k: v for k, v in fields.items() if v is not DROP}}).encode()


def grant_msg(**fields: Any) -> bytes:
    base: dict[str, Any] = {"op": "grant", "id": 42, "interface": "eth0", "queues": [0]}
    return raw(**{**base, **fields})


def refused(data: bytes, **kw: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_request(data, **kw)
    return info.value


def bad_grant(**fields: Any) -> ProtocolError:
    """A grant that must be refused as bad-request, carrying op and id."""
    err = refused(grant_msg(**fields))
    assert err.code == "bad-request", (fields, err.code, err.message)
    assert (err.op, err.req_id) == ("grant", 42)
    assert err.message
    return err


def good_grant(**fields: Any) -> Grant:
    req = decode_request(grant_msg(**fields))
    assert isinstance(req, Grant)
    return req
