"""What BCC compiles kpr's programs from: the BPF sources, package data of an installed kpr.

BPF sources. The repository keeps them in the top-level bpf/; a wheel maps that directory into the package as
kpr/bpf/ (setup.py), so an installed kpr finds them with importlib.resources, wherever it is installed. A checkout or
an editable install has no kpr/bpf/ and uses the repository's bpf/ beside the kpr package.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

# ---- the BPF sources ----


def bpf_sources() -> Path:
    """The directory holding sock.c, tc.c and their headers, as a real path (BCC takes it as -I and a src_file).

    An installed wheel has them as package data in kpr/bpf/; a checkout or an editable install, where kpr/ is the
    repository's own directory, has them in the repository's bpf/ next to it."""
    package = importlib.resources.files("kpr")
    if not isinstance(package, Path):  # a zip import: BCC needs files on disk
        raise RuntimeError(f"kpr is installed as {package!r}, not as files on disk; BCC needs its BPF sources as files")
    for candidate in (package / "bpf", package.parent / "bpf"):
        if (candidate / "kpr.h").is_file():
            return candidate.resolve()
    raise RuntimeError(
        f"kpr's BPF sources are neither in {package / 'bpf'} (an install) nor in {package.parent / 'bpf'}"
    )
