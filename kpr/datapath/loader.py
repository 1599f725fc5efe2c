"""Compile kpr's BPF programs with BCC, pin their maps, attach them to a cgroup, and take everything down again.

Attachment uses the cgroup's exclusive (non-multi) mode: attaching again replaces the program in one step, so an
agent restart or upgrade swaps programs without a moment where connects go untranslated. The maps are pinned under
the bpffs directory and reused (contents included) by the next load.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import errno
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

from kpr.datapath import abi, bpfsys, crc32c

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
    "KPR_CT_MAX": 262144,
    "KPR_SRC_RANGES_MAX": 16384,
    "KPR_NETNS_ADDRS_MAX": 16384,
    "KPR_NODEPORT_ADDRS_MAX": 4096,
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
    settings: DatapathSettings = field(default_factory=lambda: DatapathSettings())
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
        write_config(self.bpffs_dir, self.settings)
        if self.settings.socket_lb == "off":
            detach_all(self.cgroup)  # a previous agent's, if it ran in another mode
            return []
        cgroup_fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for hook, program in SOCKET_HOOKS.items():
                fn = bpf.load_func(program, BPF.CGROUP_SOCK_ADDR, attach_type=attach_types[hook])
                # Exclusive mode: replaces a previous kpr program on this hook atomically.
                BPF.attach_func(fn, cgroup_fd, attach_types[hook])
            return [p for p in bpfsys.cgroup_programs(cgroup_fd) if p.name.startswith(PROGRAM_PREFIX)]
        finally:
            os.close(cgroup_fd)


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
    with bpfsys.Map(str(bpffs_dir / "config"), abi.U32, abi.KprConfig) as config:
        entry = config.lookup(abi.U32(0))
    return DatapathSettings.from_config(entry) if entry is not None else DatapathSettings()


def write_config(bpffs_dir: Path, settings: DatapathSettings) -> None:
    """Tell the datapath its settings and which network namespace is the host's (this process's)."""
    with socket.socket() as s:
        cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    with bpfsys.Map(str(bpffs_dir / "config"), abi.U32, abi.KprConfig) as config:
        config.update(abi.U32(0), settings.config(cookie))


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
SO_NETNS_COOKIE = 71


@dataclass
class TcLB:
    """The north-south programs of one node: compiled against the same pinned maps, attached to `devices`."""

    bpffs_dir: Path
    devices: list[str]
    map_sizes: dict[str, int] = field(default_factory=dict)

    def load(self) -> tuple[Any, dict[str, Any]]:
        """Compile tc.c against the pinned maps, load every program, pin the pod programs and fill tc_tails.

        Attaches nothing. Returns the BCC object (keep it while the programs are used) and the programs by name,
        each with its `.fd`; packet-fixture tests run them with BPF_PROG_TEST_RUN (kpr.datapath.testrun).
        """
        import ctypes as ct

        from bcc import BPF

        cflags = [f'-DKPR_PIN_DIR="{self.bpffs_dir}"', f"-I{abi.BPF_DIR}", *map_size_flags(self.map_sizes)]
        try:
            bpf = BPF(src_file=str(abi.BPF_DIR / "tc.c"), cflags=cflags)
        except Exception as e:  # BCC raises a bare Exception on compile or pin errors
            raise DatapathError(f"compiling bpf/tc.c failed: {e}") from e
        with bpfsys.Map(str(self.bpffs_dir / "crc32c_powers"), abi.U32, abi.U32) as table:  # before any program runs
            for index, value in enumerate(crc32c.powers()):
                table.update(abi.U32(index), abi.U32(value))
        names = {name for name, _ in TC_FILTERS.values()} | set(TC_TAILS.values())
        names |= {program for _, program, _ in POD_PROGRAMS.values()}
        fns = {name: bpf.load_func(name, BPF.SCHED_CLS) for name in names}
        for pin, program, _ in POD_PROGRAMS.values():
            # Pin beside, then rename over: kpr-cni never finds the pin missing during an agent restart.
            # Veths attached earlier keep the programs they have.
            staging = self.bpffs_dir / f"{pin}_new"  # bpffs refuses names with a dot
            staging.unlink(missing_ok=True)
            bpfsys.obj_pin(fns[program].fd, str(staging))
            os.replace(staging, self.bpffs_dir / pin)
        tails = bpf.get_table("tc_tails")
        for index, name in TC_TAILS.items():
            tails[ct.c_int(index)] = ct.c_int(fns[name].fd)
        return bpf, fns

    def load_and_attach(self) -> list[dict[str, object]]:
        from pyroute2 import IPRoute

        _, fns = self.load()
        attached: list[dict[str, object]] = []
        devices_map = bpfsys.Map(str(self.bpffs_dir / "devices"), abi.U32, abi.DeviceInfo)
        with IPRoute() as ipr, devices_map:
            for device in self.devices:
                found = ipr.link_lookup(ifname=device)
                if not found:
                    raise DatapathError(f"device {device!r} (from --devices) does not exist in this network namespace")
                index = found[0]
                programs = {hook_proto: (fns[name].fd, name) for hook_proto, (name, _) in TC_FILTERS.items()}
                for hook, name in attach_filters(ipr, index, programs):
                    attached.append({"device": device, "hook": hook, "program": name})
                devices_map.update(abi.U32(index), _device_info(ipr, index))
        return attached


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
            left = ours = 0
            for parent in (TC_INGRESS, TC_EGRESS):
                for msg in ipr.get_filters(index=index, parent=parent):
                    options = msg.get_attr("TCA_OPTIONS")
                    prog = options.get_attr("TCA_BPF_NAME") if options else None
                    if prog is None:
                        continue  # a chain header, not a filter
                    if not prog.startswith(PROGRAM_PREFIX):
                        left += 1
                        continue
                    ipr.tc(
                        "del-filter",
                        "bpf",
                        index,
                        parent=parent,
                        prio=msg["info"] >> 16,
                        protocol=socket.ntohs(msg["info"] & 0xFFFF),
                        handle=1,
                    )
                    removed.append(f"{name} {'ingress' if parent == TC_INGRESS else 'egress'} {prog}")
                    ours += 1
            if ours and not left:
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
    for name in [*abi.MAPS, *(pin for pin, _, _ in POD_PROGRAMS.values())]:
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


@dataclass
class Attached:
    programs: list[bpfsys.AttachedProgram]  # on the cgroup
    tc: list[dict[str, object]]  # {"device", "hook", "program"}
    compile_seconds: float


def load_and_attach_isolated(
    bpffs_dir: Path,
    cgroup: Path,
    map_sizes: dict[str, int],
    devices: list[str] | None = None,
    settings: DatapathSettings | None = None,
) -> Attached:
    """Compile and attach in a child process, so BCC and LLVM (~130 MiB) never stay resident in the agent.

    The attachments and pinned maps outlive the child; the agent only ever touches them through bpf(2).
    `devices`: the node devices for the north-south tc programs (none: socket LB only).
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
        "--devices",
        ",".join(devices or []),
        "--settings",
        (settings or DatapathSettings()).to_json(),
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
    return Attached(programs, result["tc"], float(result["compile_seconds"]))


def _child_main() -> int:
    parser = argparse.ArgumentParser(description="compile and attach kpr's programs (used by the agent)")
    parser.add_argument("--bpffs-dir", type=Path, required=True)
    parser.add_argument("--cgroup", type=Path, required=True)
    parser.add_argument("--map-sizes", default="{}")
    parser.add_argument("--devices", default="")
    parser.add_argument("--settings", default=DatapathSettings().to_json())
    args = parser.parse_args()
    sizes = json.loads(args.map_sizes)
    settings = DatapathSettings.from_json(args.settings)
    lb = SocketLB(args.bpffs_dir, args.cgroup, sizes, settings)
    try:
        programs = lb.load_and_attach()
        started = time.monotonic()
        devices = [d for d in args.devices.split(",") if d]
        # tc.c also holds the per-packet programs chained pods need (pinned for kpr-cni) when sockets are not served
        wanted = bool(devices) or settings.socket_lb != "full"
        tc = TcLB(args.bpffs_dir, devices, sizes).load_and_attach() if wanted else []
        compile_seconds = lb.compile_seconds + time.monotonic() - started
    except DatapathError as e:
        print(json.dumps({"error": str(e)}))
        return 1
    print(
        json.dumps(
            {"programs": [dataclasses.asdict(p) for p in programs], "tc": tc, "compile_seconds": compile_seconds}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
