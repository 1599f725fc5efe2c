"""What BCC compiles kpr's programs from: the BPF sources (package data) and a kernel headers tree.

BPF sources. The repository keeps them in the top-level bpf/; a wheel maps that directory into the package as
kpr/bpf/ (setup.py), so an installed kpr finds them with importlib.resources, wherever it is installed. A checkout or
an editable install has no kpr/bpf/ and uses the repository's bpf/ beside the kpr package.

Kernel headers. BCC runs clang inside a kernel headers tree (-I include, arch/<arch>/include and their generated/
and uapi/ halves, -include include/linux/kconfig.h) even for programs that, like kpr's, use only UAPI structures,
because BCC's own helpers.h includes kernel headers. Those structures are stable across kernels, so any recent tree
serves; the one of the running kernel is only the most obvious. BCC itself (src/cc/frontends/clang/loader.cc)
compiles in $BCC_KERNEL_SOURCE when set, else in /lib/modules/$(uname -r)/source when both it and .../build are
directories, else in .../build; when that tree has no include/linux/kconfig.h it extracts /sys/kernel/kheaders.tar.xz
(CONFIG_IKHEADERS; it runs `modprobe kheaders` first when the file is missing). kpr decides before BCC does, in this
order, and says which tree it used:

1. `env`: $BCC_KERNEL_SOURCE, when the operator set it to a tree with include/linux/kconfig.h;
2. `node`: the node's headers, where BCC looks by default (the headers of exactly this kernel);
3. `kheaders`: the kernel's own archive, /sys/kernel/kheaders.tar.xz (loading the kheaders module if it is one),
   extracted by kpr into a cache directory (once per kernel release);
4. `image`: a tree shipped with kpr, $KPR_KERNEL_HEADERS (the container image sets it: deploy/Containerfile).

A tree that exists but does not compile (a leftover build directory, headers too new for BCC's clang) is no dead
end: compile() tries the next one and reports every failure only when none works.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from kpr import log

MODULES_DIR = Path("/lib/modules")
KHEADERS_ARCHIVE = Path("/sys/kernel/kheaders.tar.xz")
KHEADERS_CACHE = Path("/var/tmp/kpr")  # the container's own /var/tmp in the image
KCONFIG = Path("include/linux/kconfig.h")  # BCC's test of a usable tree (bcc PR 3588), and its -include
IMAGE_HEADERS_ENV = "KPR_KERNEL_HEADERS"  # a headers tree shipped with kpr (the image's /opt/kpr/kernel-headers)

T = TypeVar("T")


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


# ---- kernel headers ----


class NoKernelHeaders(RuntimeError):
    """No kernel headers tree for BCC; the message says where kpr looked and how to provide one."""


@dataclass(frozen=True, slots=True)
class KernelHeaders:
    """A kernel headers tree BCC can compile in."""

    source: str  # env | node | kheaders | image
    path: Path  # the tree (for `kheaders`, where it is extracted; prepare() does that)
    archive: Path | None = None  # kheaders: the archive to extract from
    module: bool = False  # kheaders: the archive appears once the kheaders module is loaded

    @property
    def bcc_kernel_source(self) -> str | None:
        """What BCC_KERNEL_SOURCE must be while compiling: None leaves BCC's own lookup, which finds the node's tree
        (with its split build/ and source/ halves, which BCC_KERNEL_SOURCE cannot express)."""
        return None if self.source == "node" else str(self.path)

    def describe(self) -> str:
        return f"{self.source} ({self.path})"


def node_headers_path(release: str, modules_dir: Path, environ: Mapping[str, str]) -> Path:
    """Where BCC looks without BCC_KERNEL_SOURCE: source/ when both build/ and source/ are directories, else
    build/ (or BCC_KERNEL_MODULES_SUFFIX), as get_kernel_path_info() in BCC's loader.cc."""
    kdir = modules_dir / release
    if (kdir / "build").is_dir() and (kdir / "source").is_dir():
        return kdir / "source"
    return kdir / environ.get("BCC_KERNEL_MODULES_SUFFIX", "build")


def _usable(tree: Path) -> bool:
    return (tree / KCONFIG).is_file()


def _kheaders_module(release: str, modules_dir: Path) -> bool:
    """Whether this kernel has kheaders as a loadable module (CONFIG_IKHEADERS=m), per modules.dep."""
    try:
        dep = (modules_dir / release / "modules.dep").read_text()
    except OSError:
        return False
    return any(line.split(":", 1)[0].rsplit("/", 1)[-1].startswith("kheaders.ko") for line in dep.splitlines())


def find_kernel_headers(
    release: str | None = None,
    environ: Mapping[str, str] | None = None,
    modules_dir: Path = MODULES_DIR,
    kheaders_archive: Path = KHEADERS_ARCHIVE,
    cache_dir: Path = KHEADERS_CACHE,
) -> tuple[list[KernelHeaders], list[str]]:
    """The trees BCC could compile in, best first, and why each missing one is missing. Only looks; no I/O but
    stat() and reading modules.dep (prepare() does the extracting and module loading)."""
    release = release or os.uname().release
    environ = os.environ if environ is None else environ
    found: list[KernelHeaders] = []
    missing: list[str] = []

    explicit = environ.get("BCC_KERNEL_SOURCE")
    if explicit:
        if _usable(Path(explicit)):
            found.append(KernelHeaders("env", Path(explicit)))
        else:
            missing.append(f"BCC_KERNEL_SOURCE={explicit} has no {KCONFIG}")

    node = node_headers_path(release, modules_dir, environ)
    if _usable(node):
        found.append(KernelHeaders("node", node))
    else:
        missing.append(f"no node headers ({node / KCONFIG} is missing)")

    extracted = cache_dir / f"kheaders-{release}"
    if kheaders_archive.is_file() or _usable(extracted):
        found.append(KernelHeaders("kheaders", extracted, archive=kheaders_archive))
    elif _kheaders_module(release, modules_dir):
        found.append(KernelHeaders("kheaders", extracted, archive=kheaders_archive, module=True))
    else:
        missing.append(f"no {kheaders_archive} (a kernel built with CONFIG_IKHEADERS has it)")

    shipped = environ.get(IMAGE_HEADERS_ENV)
    if shipped and _usable(Path(shipped)):
        found.append(KernelHeaders("image", Path(shipped)))
    else:
        missing.append(f"{IMAGE_HEADERS_ENV}={shipped} has no {KCONFIG}" if shipped else f"{IMAGE_HEADERS_ENV} unset")
    return found, missing


def extract_kheaders(archive: Path, into: Path) -> None:
    """Extract the kernel's headers archive to `into`, all or nothing: into a sibling, then renamed into place, so
    a killed extraction never leaves a tree that looks usable."""
    into.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{into.name}-", dir=into.parent))
    try:
        with tarfile.open(archive, "r:xz") as tar:
            _extract_within(tar, staging)
        if not _usable(staging):
            raise NoKernelHeaders(f"{archive} holds no {KCONFIG}")
        if into.exists() and not _usable(into):
            shutil.rmtree(into)  # what an older, interrupted extraction left
        try:
            staging.rename(into)
        except OSError:  # another loader got there first
            if not _usable(into):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_within(tar: tarfile.TarFile, into: Path) -> None:
    """extractall, refusing what could land outside `into`: tarfile's "data" filter where this Python has it (3.11.4
    and later, and Debian's backport), else the same refusal by hand."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(into, filter="data")
        return
    members = tar.getmembers()
    for member in members:
        target = Path(os.path.normpath(into / member.name))
        if member.issym():
            points_to = Path(os.path.normpath(target.parent / member.linkname))
        elif member.islnk():
            points_to = Path(os.path.normpath(into / member.linkname))
        else:
            points_to = target
        if member.isdev() or not (target.is_relative_to(into) and points_to.is_relative_to(into)):
            raise NoKernelHeaders(f"refusing archive member {member.name!r}")
    tar.extractall(into, members=members)


def prepare(headers: KernelHeaders) -> None:
    """Make the tree exist: for `kheaders`, load the module if the archive needs it and extract the archive."""
    if headers.source != "kheaders" or _usable(headers.path):
        return
    assert headers.archive is not None
    if headers.module and not headers.archive.is_file() and shutil.which("modprobe"):
        subprocess.run(["modprobe", "-q", "kheaders"], capture_output=True, timeout=60, check=False)
    if not headers.archive.is_file():
        raise NoKernelHeaders(f"{headers.archive} is missing (`modprobe kheaders` did not provide it)")
    try:
        extract_kheaders(headers.archive, headers.path)
    except (OSError, tarfile.TarError, lzma.LZMAError) as e:
        raise NoKernelHeaders(f"extracting {headers.archive} into {headers.path}: {e}") from e


@contextlib.contextmanager
def bcc_environment(headers: KernelHeaders) -> Iterator[None]:
    """BCC_KERNEL_SOURCE as `headers` needs it for the duration of a compile (BCC reads it with getenv)."""
    before = os.environ.get("BCC_KERNEL_SOURCE")
    wanted = headers.bcc_kernel_source
    if wanted is None:
        os.environ.pop("BCC_KERNEL_SOURCE", None)
    else:
        os.environ["BCC_KERNEL_SOURCE"] = wanted
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("BCC_KERNEL_SOURCE", None)
        else:
            os.environ["BCC_KERNEL_SOURCE"] = before


HOW_TO_FIX = (
    "install the kernel headers package of this kernel (or run scripts/kernel-headers.sh), use a kernel built with "
    f"CONFIG_IKHEADERS, or point {IMAGE_HEADERS_ENV} at any recent kernel headers tree (the kpr image ships one); "
    "see README, 'Kernel headers'"
)


def compile_bpf(
    build: Callable[[], T], what: str, candidates: list[KernelHeaders] | None = None
) -> tuple[T, KernelHeaders]:
    """Run `build` (a BCC compile) against the first kernel headers tree that works; returns its result and the tree.
    Only a tree that cannot be prepared or that clang fails in is passed over: any other failure (a map that cannot
    be pinned, a program the kernel refuses) is the same with every tree and is raised at once. Raises
    NoKernelHeaders when there is no tree, and a RuntimeError naming each tree with its failure when none compiles."""
    missing: list[str] = []
    if candidates is None:
        candidates, missing = find_kernel_headers()
    if not candidates:
        raise NoKernelHeaders(f"BCC needs kernel headers to compile {what}: {'; '.join(missing)}. To fix: {HOW_TO_FIX}")
    logger = log.get("kpr.toolchain")
    failures: list[str] = []
    for headers in candidates:
        try:
            prepare(headers)
            with bcc_environment(headers):
                result = build()
        except Exception as e:  # BCC raises a bare Exception, whatever failed
            if not (isinstance(e, NoKernelHeaders) or _clang_failed(e)):
                raise
            failures.append(f"{headers.describe()}: {e}")
            logger.warning(
                "compiling with these kernel headers failed", what=what, headers=headers.describe(), error=str(e)
            )
            continue
        logger.info("compiled", what=what, kernel_headers=headers.describe(), passed_over=failures or None)
        return result, headers
    raise RuntimeError(" | ".join(failures))  # the caller says what it was compiling


def _clang_failed(e: Exception) -> bool:
    """Whether BCC's clang step failed ("Failed to compile BPF module ..."): the one failure a headers tree causes."""
    return str(e).startswith("Failed to compile BPF")
