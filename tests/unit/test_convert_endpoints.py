"""convert._endpoint's inline reading of the common shapes gives what the field-by-field reading gives (the result or
the same InvalidObject message), on any endpoint a list may carry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kpr.model.types import Endpoint
from kpr.objects import convert
from kpr.objects.convert import InvalidObject

pytestmark = pytest.mark.unit


def reference(obj: str, index: int, e: Mapping[str, Any], address_type: str) -> Endpoint:
    """_endpoint as it read every field through the helpers (before the inline fast path)."""
    raw_addresses = convert._seq(e.get("addresses"))
    if address_type == "FQDN":
        addresses = tuple(convert._str(a) for a in raw_addresses)
    else:
        addresses = convert._addresses(obj, index, raw_addresses, address_type)
    conditions = convert._map(e.get("conditions"))
    ready_raw = convert._condition(obj, index, conditions, "ready")
    serving_raw = convert._condition(obj, index, conditions, "serving")
    terminating_raw = convert._condition(obj, index, conditions, "terminating")
    hints = e.get("hints")
    return Endpoint(
        addresses=addresses,
        ready=ready_raw is None or ready_raw,
        serving=serving_raw is None or serving_raw,
        terminating=bool(terminating_raw),
        node_name=convert._str(e.get("nodeName")),
        zone=convert._str(e.get("zone")),
        hint_zones=convert._hint_names(hints, "forZones"),
        hint_nodes=convert._hint_names(hints, "forNodes"),
    )


ADDRESS = st.sampled_from(["10.0.0.1", "010.0.0.1", "fd00::1", "FD00:0::1", "::ffff:1.2.3.4", "nope", "", "a.b.c"])
CONDITION = st.one_of(st.none(), st.booleans(), st.sampled_from(["true", 1, 0]))
ENDPOINT = st.fixed_dictionaries(
    {},
    optional={
        "addresses": st.one_of(st.lists(ADDRESS, max_size=3), st.none(), st.just("10.0.0.1"), st.lists(st.integers())),
        "conditions": st.one_of(
            st.none(),
            st.just([]),
            st.fixed_dictionaries({}, optional={"ready": CONDITION, "serving": CONDITION, "terminating": CONDITION}),
        ),
        "nodeName": st.one_of(st.none(), st.sampled_from(["node1", ""]), st.integers()),
        "zone": st.one_of(st.none(), st.just("zone-a"), st.integers()),
        "hints": st.one_of(
            st.none(),
            st.just({}),
            st.just({"forZones": [{"name": "zone-a"}, {"name": "zone-a"}], "forNodes": [{"name": "node1"}]}),
        ),
    },
)


def outcome(f: Any, *args: Any) -> Endpoint | str:
    try:
        return f(*args)  # type: ignore[no-any-return]
    except InvalidObject as e:
        return f"InvalidObject: {e}"


@settings(max_examples=500, deadline=None)
@given(ENDPOINT, st.sampled_from(["IPv4", "IPv6", "FQDN"]))
def test_the_inline_reading_is_the_field_by_field_reading(e: dict[str, Any], address_type: str) -> None:
    assert outcome(convert._endpoint, "EndpointSlice ns/x", 3, e, address_type) == outcome(
        reference, "EndpointSlice ns/x", 3, e, address_type
    )
