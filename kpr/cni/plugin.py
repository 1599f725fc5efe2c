"""kpr-cni: a CNI chained plugin (spec 1.0.0, also 0.3.0-0.4.0) that puts kpr's per-packet load balancing on a pod.

It runs after the plugin that creates the pod's interface (bridge, flannel, calico, ...), in the node's network
namespace, as every CNI plugin does:

- ADD: needs `prevResult`. Finds the pod's host-side veth from the kernel: it enters CNI_NETNS, reads the peer of
  CNI_IFNAME (IFLA_LINK, and IFLA_LINK_NETNSID, which must name the namespace kpr-cni runs in), then checks that the
  host link with that index is a veth whose own peer is CNI_IFNAME in that pod namespace. When prevResult lists
  host-side interfaces (those without "sandbox"), the veth must be one of them. Then it attaches the programs the
  agent pinned in `bpffsDir` (kpr.datapath.veth.attach; replace semantics, so a repeated ADD is harmless) and prints
  prevResult unchanged, with the configuration's cniVersion.
- DEL: detaches; succeeds when there is nothing to do (the namespace or the interface is gone: a veth dies with
  either end, and kpr's programs with it).
- CHECK: fails unless every program is attached to the pod's veth.
- VERSION: the versions above.

Configuration (stdin): cniVersion, name, type ("kpr-cni"), optional bpffsDir (default /sys/fs/bpf/kpr, the agent's
--bpffs-dir on the host), prevResult. Errors are CNI error objects on stdout with exit status 1; logs go to stderr.
Nothing is left attached when ADD fails.

Every invocation ends in a result or an error object, whatever the input (kpr/cni/inputs.py bounds stdin in size, time
and nesting, and checks CNI_NETNS is a network namespace before entering it); anything unexpected is error 999 with
its message. STATUS and GC (spec 1.1.0) are refused: kpr-cni speaks the versions above.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

from kpr.cni.errors import (
    ERR_DECODE,
    ERR_INCOMPATIBLE_VERSION,
    ERR_INVALID_CONFIG,
    ERR_INVALID_ENV,
    ERR_IO,
    ERR_KPR,
    ERR_TRY_AGAIN_LATER,
    CNIError,
    describe,
    error_json,
)
from kpr.cni.inputs import MAX_CONFIG_BYTES, NetnsError, decode_config, open_netns, read_stdin

__all__ = [
    "ERR_DECODE",
    "ERR_INCOMPATIBLE_VERSION",
    "ERR_INVALID_CONFIG",
    "ERR_INVALID_ENV",
    "ERR_IO",
    "ERR_KPR",
    "ERR_TRY_AGAIN_LATER",
    "CNIError",
    "main",
    "run",
]

CNI_VERSION = "1.0.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
NEWER_COMMANDS = {"STATUS": "1.1.0", "GC": "1.1.0"}  # spec version that defines them: refused, not unknown
DEFAULT_BPFFS_DIR = "/sys/fs/bpf/kpr"
STDIN_TIMEOUT = 30.0  # seconds for the runtime to write the configuration and close stdin

# SPEC.md, section 2: "Must start with an alphanumeric character, optionally followed by any combination of one or
# more alphanumeric characters, underscore, dot (.) or hyphen (-)" (for the container id and the network name).
_CONTAINER_ID_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
_NETWORK_NAME_RE = _CONTAINER_ID_RE
_IFNAMSIZ = 16
_NETNS_HINT = (
    "CNI_NETNS must name the pod's network namespace: a bind mount such as /run/netns/NAME, or /proc/PID/ns/net"
)


class _Gone(Exception):
    """The pod's namespace or interface does not exist (any more)."""


def _printable(text: str, limit: int = 200) -> str:
    """`text` for a log line: one line, ASCII, bounded."""
    clipped = text if len(text) <= limit else text[:limit] + "..."
    return clipped.encode("unicode_escape", errors="backslashreplace").decode("ascii")


def log(message: str) -> None:
    """One line on stderr (stdout is the CNI protocol); never fails, even with stderr closed."""
    stream = sys.stderr
    if stream is None:
        return
    try:
        stream.write(f"kpr-cni: {message[:4000]}\n")
        stream.flush()
    except (OSError, ValueError):
        pass


# --------------------------------------------------------------------------------------------------------------------
# input


@dataclass(frozen=True)
class NetConf:
    cni_version: str
    name: str
    bpffs_dir: Path
    prev_result: dict[str, Any] | None


@dataclass(frozen=True)
class Invocation:
    command: str
    container_id: str
    netns: str  # "" when absent (allowed for DEL only)
    ifname: str


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number"}
    return "null" if value is None else names.get(type(value), "a number")


# The keys of a CNI result whose shape kpr-cni relies on (host_interfaces) or could not print back otherwise.
_RESULT_SHAPES = (
    ("interfaces", list, "an array"),
    ("ips", list, "an array"),
    ("routes", list, "an array"),
    ("dns", dict, "an object"),
)


def prev_result_problem(prev: Any) -> str | None:
    """What makes `prev` unusable as a CNI result (SPEC.md, section 5, "Success"), or None. Only the shape kpr-cni
    relies on or passes back is checked; extra keys are the previous plugins' business."""
    if not isinstance(prev, dict):
        return f"it is {_json_type(prev)}, not an object"
    for key, kind, what in _RESULT_SHAPES:
        value = prev.get(key)
        if value is not None and not isinstance(value, kind):
            return f"{key} is {_json_type(value)}, not {what}"
    for i, interface in enumerate(prev.get("interfaces") or []):
        if not isinstance(interface, dict):
            return f"interfaces[{i}] is {_json_type(interface)}, not an object"
        name, sandbox = interface.get("name"), interface.get("sandbox")
        if not isinstance(name, str) or not name:
            return f"interfaces[{i}] has no name"
        if sandbox is not None and not isinstance(sandbox, str):
            return f"interfaces[{i}].sandbox is {_json_type(sandbox)}, not a string"
    for key in ("ips", "routes"):
        for i, item in enumerate(prev.get(key) or []):
            if not isinstance(item, dict):
                return f"{key}[{i}] is {_json_type(item)}, not an object"
    return None


def reply_version(conf: Any) -> str:
    """The cniVersion of an answer: the configuration's, when it is one kpr-cni speaks (SPEC.md, section 5)."""
    version = conf.get("cniVersion") if isinstance(conf, dict) else None
    return version if isinstance(version, str) and version in SUPPORTED_VERSIONS else CNI_VERSION


def parse_config(conf: Any, command: str = "ADD") -> NetConf:
    """The network configuration, decoded from stdin; CNIError 6 (not an object), 7 (invalid) or 1 (unsupported
    cniVersion). DEL ignores a malformed prevResult (it does not use it), the other commands refuse it."""
    if not isinstance(conf, dict):
        raise CNIError(ERR_DECODE, "the network configuration on stdin is not a JSON object", _json_type(conf))
    version = conf.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CNIError(ERR_INVALID_CONFIG, "the network configuration has no cniVersion", repr(version)[:200])
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(
            ERR_INCOMPATIBLE_VERSION,
            f"incompatible CNI version {json.dumps(version[:50])}",
            f"kpr-cni supports {', '.join(SUPPORTED_VERSIONS)}",
        )
    name = conf.get("name")
    if not isinstance(name, str) or not _NETWORK_NAME_RE.fullmatch(name):
        raise CNIError(ERR_INVALID_CONFIG, "the network configuration needs a valid name", repr(name)[:200])
    bpffs_dir = conf.get("bpffsDir", DEFAULT_BPFFS_DIR)
    if not isinstance(bpffs_dir, str) or not os.path.isabs(bpffs_dir) or "\0" in bpffs_dir:
        raise CNIError(ERR_INVALID_CONFIG, "bpffsDir must be an absolute path", f"bpffsDir={bpffs_dir!r}"[:300])
    prev = conf.get("prevResult")
    problem = None if prev is None else prev_result_problem(prev)
    if problem is not None:
        if command != "DEL":
            raise CNIError(
                ERR_INVALID_CONFIG,
                f"prevResult is not a CNI result: {problem}",
                f"prevResult={json.dumps(prev)}"[:300],
            )
        log(f"DEL: ignoring a malformed prevResult ({problem}); DEL does not need it")
        prev = None
    return NetConf(version, name, Path(bpffs_dir), prev)


def _ifname_problem(ifname: str) -> str | None:
    """Why `ifname` cannot be an interface name (SPEC.md, section 2, and the kernel's dev_valid_name), or None."""
    try:
        size = len(ifname.encode())
    except UnicodeEncodeError:
        return "not UTF-8"
    if size >= _IFNAMSIZ:
        return f"{size} bytes; at most {_IFNAMSIZ - 1}"
    if ifname in (".", ".."):
        return "not a name"
    if any(c in "/:" or c.isspace() for c in ifname):
        return "contains '/', ':' or whitespace"
    return None


def parse_environment(env: Mapping[str, str], command: str) -> Invocation:
    """The CNI_* parameters the command needs; CNIError 4 naming every missing or invalid variable."""
    required = ["CNI_CONTAINERID", "CNI_IFNAME"] + (["CNI_NETNS"] if command in ("ADD", "CHECK") else [])
    missing = [name for name in required if not env.get(name)]
    if missing:
        raise CNIError(ERR_INVALID_ENV, f"missing environment variable(s) {', '.join(missing)} for {command}")
    container_id, ifname, netns = env["CNI_CONTAINERID"], env["CNI_IFNAME"], env.get("CNI_NETNS", "")
    invalid = []
    if not _CONTAINER_ID_RE.fullmatch(container_id):
        invalid.append(f"CNI_CONTAINERID={container_id[:100]!r}")
    problem = _ifname_problem(ifname)
    if problem:
        invalid.append(f"CNI_IFNAME={ifname[:100]!r} ({problem})")
    if netns and not os.path.isabs(netns):
        invalid.append(f"CNI_NETNS={netns[:200]!r} (must be an absolute path)")
    if invalid:
        raise CNIError(ERR_INVALID_ENV, f"invalid environment variable(s): {', '.join(invalid)}")
    return Invocation(command, container_id, netns, ifname)


# --------------------------------------------------------------------------------------------------------------------
# finding the pod's host-side veth


def find_host_veth(netns: str, ifname: str) -> str:
    """The name, in this (the node's) namespace, of the veth whose peer is `ifname` in the pod namespace `netns`.

    Raises NetnsError when `netns` is not a network namespace (a FIFO, a file, a directory, nothing: checked before
    anything enters it, without blocking), _Gone when the interface does not exist, CNIError when the interface is
    not a veth to this namespace. The netlink reading is kpr.datapath.veth's (pod_end, host_end); the rules are here.
    """
    from kpr.datapath import veth

    ns_fd = open_netns(netns)
    try:
        try:
            pod = veth.pod_end(ns_fd, ifname)
        except OSError as e:
            if e.errno == errno.EINVAL:  # the path exists but is no longer a namespace (unmounted)
                raise _Gone(f"{netns} is not a network namespace (any more)") from None
            raise
        if pod is None:
            raise _Gone(f"{ifname} does not exist in {netns}")
        where = f"{ifname} in {netns}"
        if pod.kind != "veth":
            raise CNIError(
                ERR_KPR,
                f"{where} is a {pod.kind or 'device of unknown kind'}, not a veth",
                "kpr-cni chains after plugins that connect the pod with a veth pair (bridge, ptp, flannel, calico)",
            )
        if pod.peer_index is None or pod.peer_nsid is None or pod.peer_nsid != pod.our_nsid:
            raise CNIError(
                ERR_KPR,
                f"the peer of {where} is not in the network namespace kpr-cni runs in",
                f"IFLA_LINK={pod.peer_index} IFLA_LINK_NETNSID={pod.peer_nsid}, this namespace's id there: "
                f"{pod.our_nsid}; run kpr-cni in the node's namespace, as the container runtime does",
            )
        host = veth.host_end(pod.peer_index, ns_fd)
        if host is None:
            raise _Gone(f"the peer (ifindex {pod.peer_index}) of {where} is gone")
        if host.kind != "veth" or host.peer_index != pod.index or host.peer_nsid != host.pod_nsid:
            raise CNIError(
                ERR_KPR,
                f"the host link with ifindex {pod.peer_index} ({host.name}) is not the peer of {where}",
                f"its kind {host.kind}, IFLA_LINK {host.peer_index}, IFLA_LINK_NETNSID "
                f"{host.peer_nsid}; expected veth, {pod.index}, {host.pod_nsid}",
            )
        return host.name
    finally:
        os.close(ns_fd)


def host_interfaces(prev: Mapping[str, Any]) -> list[str]:
    """The host-side interfaces a previous result lists (those without a sandbox)."""
    interfaces = prev.get("interfaces")
    if not isinstance(interfaces, list):
        return []
    return [
        i["name"] for i in interfaces if isinstance(i, dict) and isinstance(i.get("name"), str) and not i.get("sandbox")
    ]


def locate(conf: NetConf, inv: Invocation) -> str:
    """ADD and CHECK: the pod's host-side veth, cross-checked against prevResult."""
    try:
        veth = find_host_veth(inv.netns, inv.ifname)
    except NetnsError as e:
        what = "does not exist" if e.missing else f"is not a network namespace: {e.reason}"
        raise CNIError(ERR_INVALID_ENV, f"CNI_NETNS={inv.netns[:200]!r} {what}", _NETNS_HINT) from None
    except _Gone as e:
        raise CNIError(ERR_KPR, f"cannot find the pod's interface: {e}") from None
    listed = host_interfaces(conf.prev_result or {})
    if listed and veth not in listed:
        raise CNIError(
            ERR_INVALID_CONFIG,
            f"prevResult does not describe this pod: the peer of {inv.ifname} in {inv.netns} is {veth}, "
            f"but prevResult lists the host interfaces {', '.join(listed)}",
            "kpr-cni must come right after the plugin that creates the pod's veth, in the same conflist",
        )
    return veth


# --------------------------------------------------------------------------------------------------------------------
# commands


def _missing_pins(bpffs_dir: Path) -> list[str]:
    from kpr.datapath.veth import POD_PINS

    return sorted(pin for pin in POD_PINS.values() if not (bpffs_dir / pin).exists())


def _no_pins_error(bpffs_dir: Path, missing: list[str]) -> CNIError:
    return CNIError(
        ERR_TRY_AGAIN_LATER,
        f"kpr's per-packet programs are not pinned in {bpffs_dir} (missing {', '.join(missing)})",
        "is the kpr agent running on this node with --socket-lb=hostns-only and --bpffs-dir "
        f"{bpffs_dir}? kpr-cni attaches what the agent pinned (set bpffsDir in the conflist to match)",
    )


def cmd_add(conf: NetConf, inv: Invocation) -> str:
    from kpr.datapath import veth as datapath
    from kpr.datapath.loader import DatapathError

    if conf.prev_result is None:
        raise CNIError(
            ERR_INVALID_CONFIG,
            "kpr-cni is a chained plugin and got no prevResult",
            "put it after the plugin that creates the pod's interface (bridge, flannel, calico) in a conflist",
        )
    veth = locate(conf, inv)
    missing = _missing_pins(conf.bpffs_dir)
    if missing:
        raise _no_pins_error(conf.bpffs_dir, missing)
    try:
        attached = datapath.attach(veth, conf.bpffs_dir)
    except Exception as e:
        _undo(veth)
        missing = _missing_pins(conf.bpffs_dir)
        if missing:  # the agent replaced its pins meanwhile
            raise _no_pins_error(conf.bpffs_dir, missing) from None
        if isinstance(e, DatapathError):
            raise CNIError(ERR_KPR, f"attaching kpr's programs to {veth} failed: {e}") from None
        raise
    log(f"ADD {inv.container_id}: {veth} (peer of {inv.ifname} in {inv.netns}): {', '.join(attached)}")
    result = dict(conf.prev_result)
    result["cniVersion"] = conf.cni_version
    return json.dumps(result)


def _undo(veth: str) -> None:
    from kpr.datapath import veth as datapath

    try:
        datapath.detach(veth)
    except Exception as e:  # the original error is what the runtime needs to see
        log(f"could not remove a partial attachment from {veth}: {e}")


def cmd_del(conf: NetConf, inv: Invocation) -> str:
    from kpr.datapath import veth as datapath

    if not inv.netns:
        log(f"DEL {inv.container_id}: no CNI_NETNS, so the pod's veth is gone; nothing to do")
        return ""
    try:
        veth = find_host_veth(inv.netns, inv.ifname)
    except NetnsError as e:  # kpr's programs live on the pod's veth, which dies with the pod's namespace
        log(f"DEL {inv.container_id}: CNI_NETNS {_printable(str(e))}; nothing to do")
        return ""
    except _Gone as e:
        log(f"DEL {inv.container_id}: {e}; nothing to do")
        return ""
    except CNIError as e:  # not a veth to this namespace: kpr-cni never attached anything for it
        log(f"DEL {inv.container_id}: {e.msg}; nothing to do")
        return ""
    removed = datapath.detach(veth)
    log(f"DEL {inv.container_id}: {veth}: removed {', '.join(removed) or 'nothing'}")
    return ""


def cmd_check(conf: NetConf, inv: Invocation) -> str:
    from kpr.datapath import veth as datapath

    if conf.cni_version in ("0.3.0", "0.3.1"):
        raise CNIError(ERR_INCOMPATIBLE_VERSION, f"CHECK is not defined for cniVersion {conf.cni_version}")
    if conf.prev_result is None:
        raise CNIError(ERR_INVALID_CONFIG, "CHECK needs the prevResult of the pod's ADD")
    veth = locate(conf, inv)
    missing = datapath.check(veth)
    if missing:
        raise CNIError(
            ERR_KPR,
            f"kpr's programs are not attached to {veth} (peer of {inv.ifname} in {inv.netns}): missing "
            + ", ".join(missing),
            "something removed them; delete and re-add the pod (or run its CNI ADD again)",
        )
    return ""


COMMANDS: dict[str, Callable[[NetConf, Invocation], str]] = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check}


def version_info() -> str:
    return json.dumps({"cniVersion": CNI_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)})


def run(env: Mapping[str, str], stdin: IO[bytes] | None) -> tuple[int, str]:
    """One plugin invocation: (exit status, what to print on stdout). Never raises: every failure is an error
    object, with the configuration's cniVersion once it is known."""
    command = env.get("CNI_COMMAND", "")
    if command == "VERSION":
        return 0, version_info()
    version = CNI_VERSION
    try:
        if command not in COMMANDS and command not in NEWER_COMMANDS:
            what = f"unknown CNI_COMMAND {command[:50]!r}" if command else "missing environment variable CNI_COMMAND"
            raise CNIError(ERR_INVALID_ENV, what, f"kpr-cni supports {', '.join([*COMMANDS, 'VERSION'])}")
        document = decode_config(read_stdin(stdin, MAX_CONFIG_BYTES, STDIN_TIMEOUT))
        version = reply_version(document)
        conf = parse_config(document, command)
        if command in NEWER_COMMANDS:
            raise CNIError(
                ERR_INVALID_ENV,
                f"CNI_COMMAND {command} is defined by CNI spec {NEWER_COMMANDS[command]}, which kpr-cni does not "
                f"implement (cniVersion {conf.cni_version})",
                f"kpr-cni supports {', '.join([*COMMANDS, 'VERSION'])} and cniVersion {', '.join(SUPPORTED_VERSIONS)}",
            )
        inv = parse_environment(env, command)
        output = COMMANDS[command](conf, inv)
        if not isinstance(output, str):
            raise TypeError(f"{command} returned {type(output).__name__}, not str")
        return 0, output
    except CNIError as e:
        log(f"{_printable(command) or '?'} {_printable(env.get('CNI_CONTAINERID', ''))}: error {e.code}: {e.msg}")
        return 1, error_json(e, version)
    except BaseException as e:  # anything else, KeyboardInterrupt included: still an answer the runtime can read
        log(f"{_printable(command)} {_printable(env.get('CNI_CONTAINERID', ''))}: unexpected {describe(e)}")
        return 1, error_json(CNIError(ERR_KPR, f"kpr-cni {command} failed: {describe(e)}"), version)


def _print(status: int, output: str) -> int:
    """Print the answer; the exit status (non-zero when the answer could not be printed)."""
    if not output:
        return status
    try:
        if sys.stdout is None:
            raise OSError(errno.EBADF, "stdout is closed")
        sys.stdout.write(output + "\n")
        sys.stdout.flush()
    except (OSError, ValueError) as e:
        log(f"cannot print the answer on stdout: {describe(e)}")
        try:  # so that the interpreter's own flush at exit finds nothing to complain about
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass
        return status or 1
    return status


def main() -> NoReturn:
    try:
        status, output = run(os.environ, sys.stdin.buffer if sys.stdin is not None else None)
    except BaseException as e:  # run() answers everything itself; this is the last resort
        log(f"unexpected {describe(e)}")
        status, output = 1, error_json(CNIError(ERR_KPR, f"kpr-cni failed: {describe(e)}"), CNI_VERSION)
    sys.exit(_print(status, output))


if __name__ == "__main__":
    main()
