"""Compile kpr's BPF programs with BCC, pin them and their maps, attach them, and take everything down again.

Loading and attaching are two steps. A short-lived child process compiles (BCC and LLVM never stay in the agent),
pins the maps (reusing pinned ones, contents included) and pins every program under the bpffs directory; the agent
attaches the pinned programs only once the maps hold its first full sync, so a program never runs against empty maps
(until then a previous agent's programs, if any, keep serving from the same maps). Attachment uses the cgroup's
exclusive (non-multi) mode and tc's replace-filter: attaching again swaps the program in one step, so an agent restart
or upgrade never leaves a moment where traffic goes untranslated. One agent owns a bpffs directory at a time: it holds
an exclusive flock on the directory (lock_bpffs).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import fcntl
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kpr import log
from kpr.datapath import abi, bpfsys, crc32c, hostmounts, migrate, netns, statfs, toolchain
from kpr.datapath.statfs import BPF_FS_MAGIC

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
    "KPR_CT_MAX": 262144,
    "KPR_SRC_RANGES_MAX": 16384,
    "KPR_NETNS_ADDRS_MAX": 16384,
    "KPR_NODEPORT_ADDRS_MAX": 4096,
}


class DatapathError(RuntimeError):
    """Something about the node stops kpr from loading; the message says what and how to fix it."""


def fs_magic(path: Path) -> int:
    try:
        return statfs.fs_type(path)
    except OSError as e:
        raise DatapathError(f"{path}: {os.strerror(e.errno or 0)}") from None


def check_bpffs(bpffs_dir: Path) -> None:
    parent = bpffs_dir if bpffs_dir.exists() else bpffs_dir.parent
    if fs_magic(parent) != BPF_FS_MAGIC:
        raise DatapathError(
            f"{parent} is not on a bpf filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf` "
            "(or pass --bpffs-dir under an existing bpffs mount)"
        )


def check_cgroup2(cgroup: Path) -> None:
    """The socket programs attach to a cgroup v2 directory; on v1 and hybrid nodes the message says where one is."""
    problem = hostmounts.cgroup2_problem(cgroup)
    if problem is not None:
        raise DatapathError(problem)


def map_size_flags(sizes: dict[str, int]) -> list[str]:
    unknown = set(sizes) - set(DEFAULT_MAP_SIZES)
    if unknown:
        raise DatapathError(f"unknown map size settings: {', '.join(sorted(unknown))}")
    return [f"-D{name}={value}" for name, value in (DEFAULT_MAP_SIZES | sizes).items()]


def pin_program(fd: int, bpffs_dir: Path, pin: str) -> None:
    """Pin a program beside, then rename over: an attacher never finds the pin missing while a new one replaces it."""
    staging = bpffs_dir / f"{pin}_new"  # bpffs refuses names with a dot
    staging.unlink(missing_ok=True)
    bpfsys.obj_pin(fd, str(staging))
    os.replace(staging, bpffs_dir / pin)


def lock_bpffs(bpffs_dir: Path) -> int:
    """Make (if needed) and lock the bpffs directory for this process; the returned fd holds the lock until closed.

    Two agents on one directory would "repair" each other's writes forever; the second one is refused instead."""
    check_bpffs(bpffs_dir)
    bpffs_dir.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(bpffs_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = bpffs_lock_holder(bpffs_dir)
        raise DatapathError(
            f"another kpr agent{f' (pid {holder})' if holder else ''} owns {bpffs_dir}; "
            "stop it first, or give this one its own --bpffs-dir"
        ) from None
    return fd


def bpffs_lock_holder(bpffs_dir: Path) -> int | None:
    """The pid holding lock_bpffs's lock on the directory (from /proc/locks), None when nobody does."""
    try:
        st = os.stat(bpffs_dir)
        with open("/proc/locks") as f:
            lines = f.readlines()
    except OSError:
        return None
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode:
            return int(fields[4])
    return None


@dataclass
class SocketLB:
    """The socket-LB programs of one node: compiled, pinned under `bpffs_dir` (attach_socket_programs attaches them)."""

    bpffs_dir: Path
    map_sizes: dict[str, int] = field(default_factory=dict)
    settings: DatapathSettings = field(default_factory=lambda: DatapathSettings())
    compile_seconds: float = 0.0
    headers: toolchain.KernelHeaders | None = None  # the tree BCC compiled in (toolchain.compile_bpf)

    def load(self) -> None:
        check_bpffs(self.bpffs_dir)
        self.bpffs_dir.mkdir(mode=0o700, exist_ok=True)
        from bcc import BPF, BPFAttachType  # only the loader child imports bcc

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
            bpf, self.headers = toolchain.compile_bpf(
                lambda: BPF(src_file=str(abi.BPF_DIR / "sock.c"), cflags=cflags), "bpf/sock.c"
            )
        except Exception as e:  # BCC raises a bare Exception on compile or pin errors
            raise DatapathError(f"compiling bpf/sock.c failed: {e}") from e
        self.compile_seconds = time.monotonic() - started
        write_config(self.bpffs_dir, self.settings)
        for hook, program in SOCKET_HOOKS.items():
            fn = bpf.load_func(program, BPF.CGROUP_SOCK_ADDR, attach_type=attach_types[hook])
            pin_program(fn.fd, self.bpffs_dir, SOCKET_PINS[hook])


@dataclass(frozen=True)
class DatapathSettings:
    """What the agent's flags tell the programs, through the config map (struct kpr_config)."""

    socket_lb: str = "full"  # full | hostns-only | off (compiled for its maps, not attached)
    external_cluster_ip: bool = False  # tc serves ClusterIPs to packets arriving on node devices
    cluster_cidrs: tuple[str, ...] = ()  # detect-local (--cluster-cidr): at most one per family

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DatapathSettings:
        raw = json.loads(text)
        return cls(raw["socket_lb"], raw["external_cluster_ip"], tuple(raw["cluster_cidrs"]))

    def config(self, host_netns_cookie: int) -> abi.KprConfig:
        if self.socket_lb not in SOCKET_LB_MODES:
            raise DatapathError(f"--socket-lb must be one of {', '.join(SOCKET_LB_MODES)}, not {self.socket_lb!r}")
        out = abi.KprConfig(host_netns_cookie=host_netns_cookie, socket_lb=SOCKET_LB_MODES[self.socket_lb])
        out.flags = abi.CONFIG_F_EXTERNAL_CLUSTER_IP if self.external_cluster_ip else 0
        for cidr in map(ipaddress.ip_network, self.cluster_cidrs):
            if cidr.version == 4:
                out.cluster_cidr4 = abi.be32_of_ipv4(str(cidr.network_address))
                out.cluster_prefix4 = cidr.prefixlen
            else:
                out.cluster_cidr6 = abi.be32x4_of_ipv6(str(cidr.network_address))
                out.cluster_prefix6 = cidr.prefixlen
        return out

    @classmethod
    def from_config(cls, config: abi.KprConfig) -> DatapathSettings:
        """What a config map entry says (an agent's flags, read back by `kpr explain` and `kpr status`)."""
        cidrs = []
        if config.cluster_prefix4:
            cidrs.append(f"{abi.ipv4_of_be32(config.cluster_cidr4)}/{config.cluster_prefix4}")
        if config.cluster_prefix6:
            cidrs.append(f"{abi.ipv6_of_be32x4(config.cluster_cidr6)}/{config.cluster_prefix6}")
        socket_lb = "hostns-only" if config.socket_lb == abi.SOCKET_LB_HOSTNS_ONLY else "full"
        return cls(socket_lb, bool(config.flags & abi.CONFIG_F_EXTERNAL_CLUSTER_IP), tuple(cidrs))


def read_config(bpffs_dir: Path) -> DatapathSettings:
    """The settings the agent last wrote into the pinned config map."""
    with bpfsys.Map(str(abi.map_pin(bpffs_dir, "config")), abi.U32, abi.KprConfig) as config:
        entry = config.lookup(abi.U32(0))
    return DatapathSettings.from_config(entry) if entry is not None else DatapathSettings()


def write_config(bpffs_dir: Path, settings: DatapathSettings) -> None:
    """Tell the datapath its settings and which network namespace is the host's (this process's)."""
    with bpfsys.Map(str(abi.map_pin(bpffs_dir, "config")), abi.U32, abi.KprConfig) as config:
        config.update(abi.U32(0), settings.config(netns.cookie()))


# tc filters: (hook, protocol) -> (program, priority). One filter per family keeps each program's stack its own.
TC_INGRESS, TC_EGRESS = 0xFFFFFFF2, 0xFFFFFFF3  # clsact's ingress and egress parents
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
TC_FILTERS = {
    ("ingress", ETH_P_IP): ("kpr_tc_in4", 10),
    ("ingress", ETH_P_IPV6): ("kpr_tc_in6", 11),
    ("egress", ETH_P_IP): ("kpr_tc_out4", 10),
    ("egress", ETH_P_IPV6): ("kpr_tc_out6", 11),
}
TC_TAILS = {  # KPR_TAIL_* in kpr.h
    abi.TAIL_REJECT4: "kpr_tc_rej4",
    abi.TAIL_REJECT6: "kpr_tc_rej6",
    abi.TAIL_ICMP4_IN: "kpr_tc_icmp4_in",
    abi.TAIL_ICMP6_IN: "kpr_tc_icmp6_in",
    abi.TAIL_ICMP4_OUT: "kpr_tc_icmp4_out",
    abi.TAIL_ICMP6_OUT: "kpr_tc_icmp6_out",
    abi.TAIL_TOOBIG4: "kpr_tc_toobig4",
    abi.TAIL_TOOBIG6: "kpr_tc_toobig6",
}
# Programs pinned for kpr-cni (CNI chaining): (hook, protocol) -> (pin in the bpffs dir, program, filter name).
# Toward the pod, the node devices' egress program does the job; its filter is named for where it sits.
POD_PROGRAMS = {
    ("ingress", ETH_P_IP): ("prog_pod_in4", "kpr_pod_in4", "kpr_pod_in4"),
    ("ingress", ETH_P_IPV6): ("prog_pod_in6", "kpr_pod_in6", "kpr_pod_in6"),
    ("egress", ETH_P_IP): ("prog_pod_out4", "kpr_tc_out4", "kpr_pod_out4"),
    ("egress", ETH_P_IPV6): ("prog_pod_out6", "kpr_tc_out6", "kpr_pod_out6"),
}
SOCKET_LB_MODES = {"full": abi.SOCKET_LB_FULL, "hostns-only": abi.SOCKET_LB_HOSTNS_ONLY, "off": abi.SOCKET_LB_FULL}
# Where the loader pins each program for attaching later: the socket hooks' and the node devices' tc programs.
SOCKET_PINS = {hook: f"prog_{hook}" for hook in SOCKET_HOOKS}
TC_PINS = {hook_proto: f"prog_{name.removeprefix(PROGRAM_PREFIX)}" for hook_proto, (name, _) in TC_FILTERS.items()}


@dataclass
class TcLB:
    """The north-south programs of one node: compiled against the same pinned maps and pinned (attach_tc_programs
    attaches them to the node devices; kpr-cni attaches the pod programs to chained pods' veths)."""

    bpffs_dir: Path
    map_sizes: dict[str, int] = field(default_factory=dict)
    headers: toolchain.KernelHeaders | None = None  # the tree to compile in (SocketLB's); None: look for one

    def load(self) -> tuple[Any, dict[str, Any]]:
        """Compile tc.c against the pinned maps, load every program, pin them and fill tc_tails.

        Attaches nothing. Returns the BCC object (keep it while the programs are used) and the programs by name,
        each with its `.fd`; packet-fixture tests run them with BPF_PROG_TEST_RUN (kpr.datapath.testrun).
        """
        import ctypes as ct

        from bcc import BPF

        cflags = [f'-DKPR_PIN_DIR="{self.bpffs_dir}"', f"-I{abi.BPF_DIR}", *map_size_flags(self.map_sizes)]
        try:
            bpf, self.headers = toolchain.compile_bpf(
                lambda: BPF(src_file=str(abi.BPF_DIR / "tc.c"), cflags=cflags),
                "bpf/tc.c",
                [self.headers] if self.headers else None,  # the tree sock.c compiled in
            )
        except Exception as e:  # BCC raises a bare Exception on compile or pin errors
            raise DatapathError(f"compiling bpf/tc.c failed: {e}") from e
        powers = abi.map_pin(self.bpffs_dir, "crc32c_powers")
        with bpfsys.Map(str(powers), abi.U32, abi.U32) as table:  # before any program runs
            for index, value in enumerate(crc32c.powers()):
                table.update(abi.U32(index), abi.U32(value))
        names = {name for name, _ in TC_FILTERS.values()} | set(TC_TAILS.values())
        names |= {program for _, program, _ in POD_PROGRAMS.values()}
        fns = {name: bpf.load_func(name, BPF.SCHED_CLS) for name in names}
        for pin, program, _ in POD_PROGRAMS.values():  # kpr-cni attaches these; veths keep the programs they have
            pin_program(fns[program].fd, self.bpffs_dir, pin)
        for hook_proto, (program, _) in TC_FILTERS.items():
            pin_program(fns[program].fd, self.bpffs_dir, TC_PINS[hook_proto])
        tails = bpf.get_table("tc_tails")
        for index, name in TC_TAILS.items():
            tails[ct.c_int(index)] = ct.c_int(fns[name].fd)
        return bpf, fns


def attach_filters(ipr: Any, index: int, programs: dict[tuple[str, int], tuple[int, str]]) -> list[tuple[str, str]]:
    """Attach {(hook, protocol): (program fd, filter name)} to a device's clsact; returns (hook, name) pairs.

    replace-filter swaps a program in one step, so an agent restart or a repeated CNI ADD never leaves a gap.
    """
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        ipr.tc("add", "clsact", index)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise
    done = []
    for (hook, protocol), (fd, name) in programs.items():
        _, prio = TC_FILTERS[(hook, protocol)]
        ipr.tc(
            "replace-filter",
            "bpf",
            index,
            handle=1,
            fd=fd,
            name=name,
            parent=TC_INGRESS if hook == "ingress" else TC_EGRESS,
            protocol=protocol,
            prio=prio,
            classid=1,
            direct_action=True,
        )
        done.append((hook, name))
    return done


def _device_info(ipr: object, index: int) -> abi.DeviceInfo:
    """The addresses masquerading uses on a device: its first IPv4 and first global IPv6 address."""
    import ipaddress

    info = abi.DeviceInfo()
    for msg in ipr.get_addr(index=index):  # type: ignore[attr-defined]
        addr = msg.get_attr("IFA_ADDRESS")
        ip = ipaddress.ip_address(addr)
        if ip.version == 4 and not info.addr4:
            info.addr4 = abi.be32_of_ipv4(addr)
        elif ip.version == 6 and not ip.is_link_local and not any(info.addr6):
            info.addr6 = abi.be32x4_of_ipv6(addr)
    return info


def default_route_devices() -> list[str]:
    """The devices of the default routes (IPv4 and IPv6): where north-south traffic arrives by default."""
    from pyroute2 import IPRoute

    devices: list[str] = []
    with IPRoute() as ipr:
        for family in (2, 10):  # AF_INET, AF_INET6
            for route in ipr.get_default_routes(family=family):
                oif = route.get_attr("RTA_OIF")
                if oif:
                    name = ipr.get_links(oif)[0].get_attr("IFLA_IFNAME")
                    if name not in devices:
                        devices.append(name)
    return devices


def _bpf_filters(ipr: Any, index: int) -> list[tuple[int, int, int, str]]:
    """Every bpf tc filter on a device's clsact: (parent, prio, protocol, program name)."""
    found = []
    for parent in (TC_INGRESS, TC_EGRESS):
        for msg in ipr.get_filters(index=index, parent=parent):
            options = msg.get_attr("TCA_OPTIONS")
            prog = options.get_attr("TCA_BPF_NAME") if options else None
            if prog is not None:  # else a chain header, not a filter
                found.append((parent, msg["info"] >> 16, socket.ntohs(msg["info"] & 0xFFFF), prog))
    return found


def attached_tc_filters(devices: list[str]) -> dict[str, int]:
    """How many of kpr's tc filters each device carries (4 when fully attached)."""
    from pyroute2 import IPRoute

    counts = {}
    with IPRoute() as ipr:
        for device in devices:
            found = ipr.link_lookup(ifname=device)
            filters = _bpf_filters(ipr, found[0]) if found else []
            counts[device] = sum(name.startswith(PROGRAM_PREFIX) for *_, name in filters)
    return counts


def detach_tc(devices: list[str] | None = None) -> list[str]:
    """Remove kpr's tc filters (from `devices`, or every device of this namespace) and their clsact when emptied."""
    from pyroute2 import IPRoute

    removed = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if devices is not None and name not in devices:
                continue
            index = link["index"]
            filters = _bpf_filters(ipr, index)
            ours = [f for f in filters if f[3].startswith(PROGRAM_PREFIX)]
            for parent, prio, protocol, prog in ours:
                ipr.tc("del-filter", "bpf", index, parent=parent, prio=prio, protocol=protocol, handle=1)
                removed.append(f"{name} {'ingress' if parent == TC_INGRESS else 'egress'} {prog}")
            if ours and len(ours) == len(filters):
                ipr.tc("del", "clsact", index)
    return removed


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
    program_pins = [*SOCKET_PINS.values(), *TC_PINS.values(), *(pin for pin, _, _ in POD_PROGRAMS.values())]
    for pin in [*migrate.kpr_map_pins(bpffs_dir), *(bpffs_dir / name for name in program_pins)]:
        if pin.exists():
            pin.unlink()
            removed.append(pin.name)
    try:
        bpffs_dir.rmdir()
    except OSError as e:
        raise DatapathError(f"{bpffs_dir} still holds {sorted(os.listdir(bpffs_dir))}: {e.strerror}") from e
    return removed


def pinned_maps(bpffs_dir: Path) -> list[str]:
    """The maps of this kpr's layouts pinned in the directory, by name."""
    return sorted(n for n in abi.MAPS if abi.map_pin(bpffs_dir, n).exists())


def default_cgroup_root() -> Path:
    """The cgroup v2 mount: /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on hybrid ones."""
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return Path(fields[1])
    return Path("/sys/fs/cgroup")


@dataclass
class Attached:
    programs: list[bpfsys.AttachedProgram]  # on the cgroup
    tc: list[dict[str, object]]  # {"device", "hook", "program"}


@dataclass
class Loaded:
    compile_seconds: float
    migrated: dict[str, str]  # maps moved aside because their shape changed, and why (kpr.datapath.migrate)
    copied: list[str]  # those of them whose entries were copied (and are copied again after attaching)
    kernel_headers: str = ""  # the kernel headers tree BCC compiled in (kpr.datapath.toolchain)


def load_isolated(bpffs_dir: Path, map_sizes: dict[str, int], settings: DatapathSettings, tc: bool) -> Loaded:
    """Compile and pin every program (and the maps) in a child process, so BCC and LLVM (~130 MiB) never stay resident
    in the agent; attaches nothing. `tc`: also tc.c (node devices, or chained pods)."""
    argv = [
        sys.executable,
        "-m",
        "kpr.datapath.loader",
        "--bpffs-dir",
        str(bpffs_dir),
        "--map-sizes",
        json.dumps(map_sizes),
        "--settings",
        settings.to_json(),
        *(["--tc"] if tc else []),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except ValueError:
        result = {}
    if proc.returncode != 0 or "compile_seconds" not in result:
        raise DatapathError(result.get("error") or f"loading the BPF programs failed: {proc.stderr.strip()[-2000:]}")
    loaded = Loaded(float(result["compile_seconds"]), result["migrated"], result["copied"], result["kernel_headers"])
    log.get("kpr.loader").info("BPF programs compiled", kernel_headers=loaded.kernel_headers)
    return loaded


def attach_socket_programs(bpffs_dir: Path, cgroup: Path, socket_lb: str) -> list[bpfsys.AttachedProgram]:
    """Attach the pinned socket programs to the cgroup (replacing kpr's previous ones in one step); with
    --socket-lb off, detach them instead."""
    check_cgroup2(cgroup)
    if socket_lb == "off":
        detach_all(cgroup)  # a previous agent's, if it ran in another mode
        return []
    cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for hook, pin in SOCKET_PINS.items():
            prog_fd = bpfsys.obj_get(str(bpffs_dir / pin))
            try:
                bpfsys.cgroup_attach(cgroup_fd, hook, prog_fd)
            finally:
                os.close(prog_fd)
        return [p for p in bpfsys.cgroup_programs(cgroup_fd) if p.name.startswith(PROGRAM_PREFIX)]
    finally:
        os.close(cgroup_fd)


def attach_tc_programs(bpffs_dir: Path, devices: list[str]) -> list[dict[str, object]]:
    """Attach the pinned tc programs to each device (replace-filter: one step) and record the addresses masquerading
    uses on it in the devices map."""
    from pyroute2 import IPRoute

    attached: list[dict[str, object]] = []
    fds = {hook_proto: bpfsys.obj_get(str(bpffs_dir / pin)) for hook_proto, pin in TC_PINS.items()}
    try:
        with (
            IPRoute() as ipr,
            bpfsys.Map(str(abi.map_pin(bpffs_dir, "devices")), abi.U32, abi.DeviceInfo) as devices_map,
        ):
            for device in devices:
                found = ipr.link_lookup(ifname=device)
                if not found:
                    raise DatapathError(f"device {device!r} (from --devices) does not exist in this network namespace")
                index = found[0]
                devices_map.update(abi.U32(index), _device_info(ipr, index))  # before a program can look for it
                programs = {hook_proto: (fds[hook_proto], name) for hook_proto, (name, _) in TC_FILTERS.items()}
                for hook, name in attach_filters(ipr, index, programs):
                    attached.append({"device": device, "hook": hook, "program": name})
    finally:
        for fd in fds.values():
            os.close(fd)
    return attached


def _child_main() -> int:
    parser = argparse.ArgumentParser(description="compile and pin kpr's programs and maps (used by the agent)")
    parser.add_argument("--bpffs-dir", type=Path, required=True)
    parser.add_argument("--map-sizes", default="{}")
    parser.add_argument("--settings", default=DatapathSettings().to_json())
    parser.add_argument("--tc", action="store_true", help="also tc.c")
    args = parser.parse_args()
    log.configure("json")  # stdout carries the result, the last line; logs go to stderr
    sizes = json.loads(args.map_sizes)
    lb = SocketLB(args.bpffs_dir, sizes, DatapathSettings.from_json(args.settings))
    try:
        check_bpffs(args.bpffs_dir)
        try:
            plan = migrate.prepare(args.bpffs_dir, DEFAULT_MAP_SIZES | sizes) if args.bpffs_dir.exists() else None
        except ValueError as e:
            raise DatapathError(str(e)) from e
        lb.load()
        started = time.monotonic()
        if args.tc:
            TcLB(args.bpffs_dir, sizes, headers=lb.headers).load()
        compile_seconds = lb.compile_seconds + time.monotonic() - started
        if plan is not None:
            migrate.copy_entries(args.bpffs_dir, plan.copied)
    except DatapathError as e:
        print(json.dumps({"error": str(e)}))
        return 1
    moved, copied = (plan.moved, sorted(plan.copied)) if plan else ({}, [])
    headers = lb.headers.describe() if lb.headers else ""
    print(
        json.dumps({"compile_seconds": compile_seconds, "migrated": moved, "copied": copied, "kernel_headers": headers})
    )
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
