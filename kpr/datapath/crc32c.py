"""CRC32c (Castagnoli), SCTP's checksum, and the table that lets tc.c fold a port change into it. Pure: no I/O.

A CRC is linear: for two packets of one length L that differ in their first 4 bytes by `word` (XOR, packet order),
crc(new) = crc(old) ^ (word * x^(8 L) mod P), in the bit-reflected representation where x^0 is the top bit (zlib's
crc32_combine works the same way). The datapath multiplies; it reads x^(8 L) as the product of two powers from
`crc32c_powers` (L's low byte, then its high byte), which the loader fills from `powers()` before any program runs.
"""

from __future__ import annotations

POLY = 0x82F63B78  # x^32 + x^28 + ... bit-reflected
ONE = 0x80000000  # x^0
POWERS = 512  # entries of the crc32c_powers map: [0, 256) x^(8 i), [256, 512) x^(8 * 256 j)


def multiply(a: int, b: int) -> int:
    """a(x) b(x) mod P, bit-reflected (mirrors crc32c_multiply in bpf/tc.c)."""
    product = 0
    for i in range(32):
        if a & (ONE >> i):
            product ^= b
        b = (b >> 1) ^ POLY if b & 1 else b >> 1
    return product


def _times_x8(value: int) -> int:
    for _ in range(8):
        value = (value >> 1) ^ POLY if value & 1 else value >> 1
    return value


def powers() -> list[int]:
    """x^(8 i) for i < 256, then x^(8 * 256 j) for j < 256: enough for any packet shorter than 64 KiB."""
    low = [ONE]
    for _ in range(255):
        low.append(_times_x8(low[-1]))
    step = _times_x8(low[255])  # x^(8 * 256)
    high = [ONE]
    for _ in range(255):
        high.append(multiply(high[-1], step))
    return low + high


def power(length: int, table: list[int] | None = None) -> int:
    """x^(8 length) mod P from the table, as the datapath computes it."""
    table = table or powers()
    return multiply(table[length & 0xFF], table[256 + (length >> 8 & 0xFF)])


def crc32c(data: bytes) -> int:
    """The standard CRC32c (b"123456789" -> 0xE3069283); SCTP stores it least significant byte first."""
    reg = 0xFFFFFFFF
    for byte in data:
        reg ^= byte
        for _ in range(8):
            reg = (reg >> 1) ^ POLY if reg & 1 else reg >> 1
    return reg ^ 0xFFFFFFFF
