"""Compile kpr's BPF programs with BCC, pin their maps, attach them to a cgroup, and take everything down again.

Attachment uses the cgroup's exclusive (non-multi) mode: attaching again replaces the program in one step, so an
agent restart or upgrade swaps programs without a moment where connects go untranslated. The maps are pinned under
the bpffs directory and reused (contents included) by the next load.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kpr.datapath import abi, bpfsys

BPF_FS_MAGIC = 0xCAFE4A11
CGROUP2_SUPER_MAGIC = 0x63677270
PROGRAM_PREFIX = "kpr_"

# Hook name -> the program implementing it in bpf/sock.c.
SOCKET_HOOKS = {
    "connect4": "kpr_connect4",
    "sendmsg4": "kpr_sendmsg4",
    "recvmsg4": "kpr_recvmsg4",
    "getpeername4": "kpr_peername4",
    "connect6": "kpr_connect6",
    "sendmsg6": "kpr_sendmsg6",
    "recvmsg6": "kpr_recvmsg6",
    "getpeername6": "kpr_peername6",
}

# Map-size knobs of kpr.h, with the header's defaults.
DEFAULT_MAP_SIZES = {
    "KPR_SERVICES_MAX": 327680,
    "KPR_BACKENDS_MAX": 262144,
    "KPR_REV_NAT_MAX": 65536,
    "KPR_SOCK_REV_NAT_MAX": 262144,
    "KPR_AFFINITY_MAX": 65536,
}


class DatapathError(RuntimeError):
    """Something about the node stops kpr from loading; the message says what and how to fix it."""


def fs_magic(path: Path) -> int:
    buf = ctypes.create_string_buffer(128)  # struct statfs; f_type is the first long
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(str(path).encode(), buf) != 0:
        err = ctypes.get_errno()
        raise DatapathError(f"{path}: {os.strerror(err)}")
    return int.from_bytes(buf.raw[:8], "little")


def check_bpffs(bpffs_dir: Path) -> None:
    parent = bpffs_dir if bpffs_dir.exists() else bpffs_dir.parent
    if fs_magic(parent) != BPF_FS_MAGIC:
        raise DatapathError(
            f"{parent} is not on a bpf filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf` "
            "(or pass --bpffs-dir under an existing bpffs mount)"
        )


def check_cgroup2(cgroup: Path) -> None:
    if fs_magic(cgroup) != CGROUP2_SUPER_MAGIC:
        raise DatapathError(f"{cgroup} is not a cgroup v2 directory; pass the cgroup2 mount (or a directory in it)")


def check_kernel_headers() -> None:
    build = Path("/lib/modules") / os.uname().release / "build"
    if not build.exists():
        raise DatapathError(
            f"{build} is missing: BCC needs kernel headers. Install linux-headers for this kernel, or link {build} "
            "to a Debian linux-headers-*-amd64 tree (see README, 'Kernel headers')"
        )


def map_size_flags(sizes: dict[str, int]) -> list[str]:
    unknown = set(sizes) - set(DEFAULT_MAP_SIZES)
    if unknown:
        raise DatapathError(f"unknown map size settings: {', '.join(sorted(unknown))}")
    return [f"-D{name}={value}" for name, value in (DEFAULT_MAP_SIZES | sizes).items()]


@dataclass
class SocketLB:
    """The socket-LB programs of one node: compiled, pinned under `bpffs_dir`, attached to `cgroup`."""

    bpffs_dir: Path
    cgroup: Path
    map_sizes: dict[str, int] = field(default_factory=dict)
    compile_seconds: float = 0.0

    def load_and_attach(self) -> list[bpfsys.AttachedProgram]:
        check_kernel_headers()
        check_bpffs(self.bpffs_dir)
        check_cgroup2(self.cgroup)
        self.bpffs_dir.mkdir(mode=0o700, exist_ok=True)
        from bcc import BPF, BPFAttachType  # only the datapath imports bcc

        attach_types = {
            "connect4": BPFAttachType.CGROUP_INET4_CONNECT,
            "sendmsg4": BPFAttachType.CGROUP_UDP4_SENDMSG,
            "recvmsg4": BPFAttachType.CGROUP_UDP4_RECVMSG,
            "getpeername4": BPFAttachType.CGROUP_INET4_GETPEERNAME,
            "connect6": BPFAttachType.CGROUP_INET6_CONNECT,
            "sendmsg6": BPFAttachType.CGROUP_UDP6_SENDMSG,
            "recvmsg6": BPFAttachType.CGROUP_UDP6_RECVMSG,
            "getpeername6": BPFAttachType.CGROUP_INET6_GETPEERNAME,
        }
        cflags = [f'-DKPR_PIN_DIR="{self.bpffs_dir}"', f"-I{abi.BPF_DIR}", *map_size_flags(self.map_sizes)]
        started = time.monotonic()
        try:
            bpf = BPF(src_file=str(abi.BPF_DIR / "sock.c"), cflags=cflags)
        except Exception as e:  # BCC raises a bare Exception on compile or pin errors
            raise DatapathError(f"compiling bpf/sock.c failed: {e}") from e
        self.compile_seconds = time.monotonic() - started
        cgroup_fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for hook, program in SOCKET_HOOKS.items():
                fn = bpf.load_func(program, BPF.CGROUP_SOCK_ADDR, attach_type=attach_types[hook])
                # Exclusive mode: replaces a previous kpr program on this hook atomically.
                BPF.attach_func(fn, cgroup_fd, attach_types[hook])
            return [p for p in bpfsys.cgroup_programs(cgroup_fd) if p.name.startswith(PROGRAM_PREFIX)]
        finally:
            os.close(cgroup_fd)


def attached_programs(cgroup: Path) -> list[bpfsys.AttachedProgram]:
    cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return bpfsys.cgroup_programs(cgroup_fd)
    finally:
        os.close(cgroup_fd)


def detach_all(cgroup: Path) -> list[bpfsys.AttachedProgram]:
    """Detach every kpr program from the cgroup's hooks; programs of others are left alone."""
    if not cgroup.exists():
        return []
    cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    detached = []
    try:
        for prog in bpfsys.cgroup_programs(cgroup_fd):
            if prog.name.startswith(PROGRAM_PREFIX) and bpfsys.cgroup_detach(cgroup_fd, prog.hook, prog.id):
                detached.append(prog)
    finally:
        os.close(cgroup_fd)
    return detached


def unpin_all(bpffs_dir: Path) -> list[str]:
    """Remove kpr's pinned maps and the directory (only names kpr pins; anything else is left and reported)."""
    if not bpffs_dir.exists():
        return []
    removed = []
    for name in abi.MAPS:
        pin = bpffs_dir / name
        if pin.exists():
            pin.unlink()
            removed.append(name)
    try:
        bpffs_dir.rmdir()
    except OSError as e:
        raise DatapathError(f"{bpffs_dir} still holds {sorted(os.listdir(bpffs_dir))}: {e.strerror}") from e
    return removed


def pinned_maps(bpffs_dir: Path) -> list[str]:
    return sorted(n for n in abi.MAPS if (bpffs_dir / n).exists())


def default_cgroup_root() -> Path:
    """The cgroup v2 mount: /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on hybrid ones."""
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return Path(fields[1])
    return Path("/sys/fs/cgroup")


def load_and_attach_isolated(
    bpffs_dir: Path, cgroup: Path, map_sizes: dict[str, int]
) -> tuple[list[bpfsys.AttachedProgram], float]:
    """Compile and attach in a child process, so BCC and LLVM (~130 MiB) never stay resident in the agent.

    The attachments and pinned maps outlive the child; the agent only ever touches them through bpf(2).
    """
    argv = [
        sys.executable,
        "-m",
        "kpr.datapath.loader",
        "--bpffs-dir",
        str(bpffs_dir),
        "--cgroup",
        str(cgroup),
        "--map-sizes",
        json.dumps(map_sizes),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except ValueError:
        result = {}
    if proc.returncode != 0 or "programs" not in result:
        raise DatapathError(result.get("error") or f"loading the BPF programs failed: {proc.stderr.strip()[-2000:]}")
    programs = [bpfsys.AttachedProgram(**p) for p in result["programs"]]
    return programs, float(result["compile_seconds"])


def _child_main() -> int:
    parser = argparse.ArgumentParser(description="compile and attach kpr's socket programs (used by the agent)")
    parser.add_argument("--bpffs-dir", type=Path, required=True)
    parser.add_argument("--cgroup", type=Path, required=True)
    parser.add_argument("--map-sizes", default="{}")
    args = parser.parse_args()
    lb = SocketLB(args.bpffs_dir, args.cgroup, json.loads(args.map_sizes))
    try:
        programs = lb.load_and_attach()
    except DatapathError as e:
        print(json.dumps({"error": str(e)}))
        return 1
    print(json.dumps({"programs": [dataclasses.asdict(p) for p in programs], "compile_seconds": lb.compile_seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
