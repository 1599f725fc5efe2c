"""The CRC32c arithmetic tc.c uses to keep SCTP checksums right after a port rewrite, checked against the CRC itself."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kpr.datapath import crc32c

pytestmark = pytest.mark.unit

TABLE = crc32c.powers()


def test_crc32c_check_value() -> None:
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # the catalogue's check value for CRC-32C
    assert crc32c.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros


def test_powers_table_holds_the_powers_of_x() -> None:
    assert len(TABLE) == crc32c.POWERS
    assert TABLE[0] == TABLE[256] == crc32c.ONE
    assert TABLE[1] == crc32c.ONE >> 8  # x^8
    assert crc32c.power(300) == crc32c.multiply(crc32c.power(44), crc32c.power(256))


@given(
    packet=st.binary(min_size=16, max_size=3000),
    new_ports=st.binary(min_size=4, max_size=4),
)
def test_a_port_change_folds_into_the_crc_without_reading_the_packet(packet: bytes, new_ports: bytes) -> None:
    old = packet[:8] + bytes(4) + packet[12:]  # the checksum field counts as zeros
    new = new_ports + old[4:]
    word = int.from_bytes(bytes(a ^ b for a, b in zip(old[:4], new[:4], strict=True)), "little")
    fix = crc32c.multiply(word, crc32c.power(len(old), TABLE))
    assert crc32c.crc32c(new) == crc32c.crc32c(old) ^ fix
