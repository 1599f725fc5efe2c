"""The CNI error result (CNI SPEC.md, section 5 "Result Types", "Error"): what kpr-cni prints on stdout, with a
non-zero exit status, whenever a command fails.

Codes 1-99 are the spec's well-known ones and must not be used otherwise; 100 and up are free for plugins. kpr-cni's
own failures use 999, the code libcni's `types.ErrInternal` gives any error a Go plugin returns untyped.
"""

from __future__ import annotations

import json
from typing import Any

ERR_INCOMPATIBLE_VERSION = 1  # "Incompatible CNI version"
ERR_INVALID_ENV = 4  # "Invalid necessary environment variables": the message must name them
ERR_IO = 5  # "I/O failure. For example, failed to read network config bytes from stdin."
ERR_DECODE = 6  # "Failed to decode content. For example, failed to unmarshal network config from bytes"
ERR_INVALID_CONFIG = 7  # "Invalid network config": a validation of the network configuration did not pass
ERR_TRY_AGAIN_LATER = 11  # "Try again later": a transient condition (the agent has not pinned its programs yet)
ERR_KPR = 999  # anything else: the message says what

MAX_TEXT = 2000  # characters of msg and of details: an error object stays readable whatever the input was


class CNIError(Exception):
    """A failure reported to the runtime as a CNI error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


def error_json(error: CNIError, cni_version: str) -> str:
    """The error object; ASCII only (json.dumps escapes the rest), so printing it cannot fail on encoding."""
    body: dict[str, Any] = {"cniVersion": cni_version, "code": error.code, "msg": _clip(error.msg)}
    if error.details:
        body["details"] = _clip(error.details)
    return json.dumps(body)


def describe(e: BaseException) -> str:
    """`Type: message` of any exception, even one whose str() fails."""
    try:
        text = str(e)
    except Exception:
        text = "(no message)"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
