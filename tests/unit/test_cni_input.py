"""kpr-cni against hostile input, run as a container runtime runs it (environment + stdin, a subprocess) with a
timeout: every path ends in a CNI result or a CNI error object on stdout and a non-zero exit, never a traceback, an
empty stdout or a hang. No root needed: nothing here gets as far as entering a namespace (tests/datapath/test_cni.py
has the rows that do).

Error codes are the CNI spec's well-known ones (SPEC.md, "Error" in section 5, Result Types): 1 incompatible
version, 4 invalid environment variable (the message names it), 5 I/O failure, 6 failed to decode content, 7 invalid
network config; 999 is libcni's ErrInternal, kpr-cni's code for everything else.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit

KPR_CNI = Path(sys.executable).with_name("kpr-cni")  # the console script of `pip install -e .`
TIMEOUT = 20.0  # seconds; the plugin answers these in well under one
DEEP = 200_000  # the tester's nesting depth
MiB = 1 << 20


@dataclass
class Invoked:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> dict[str, Any] | None:
        """stdout as the runtime reads it: one JSON object, or nothing."""
        if not self.stdout.strip():
            return None
        value = json.loads(self.stdout)
        assert isinstance(value, dict), self
        return value


def config(**changes: Any) -> dict[str, Any]:
    """A kpr-cni configuration as libcni derives it from a conflist (None removes a key)."""
    conf: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": "kpr-test",
        "type": "kpr-cni",
        "bpffsDir": "/sys/fs/bpf/kpr-unit-test-nonexistent",
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "aa:bb:cc:dd:ee:01"},
                {"name": "veth1234", "mac": "aa:bb:cc:dd:ee:02"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:03", "sandbox": "/run/netns/x"},
            ],
            "ips": [{"address": "10.244.1.200/24", "gateway": "10.244.1.1", "interface": 2}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {},
        },
    }
    conf.update(changes)
    return {k: v for k, v in conf.items() if v is not None}


@pytest.fixture
def nowhere(tmp_path: Path) -> str:
    """A CNI_NETNS that does not exist: what a runtime passes once the sandbox is gone."""
    return str(tmp_path / "no-such-netns")


def invoke(
    command: str | None,
    stdin: bytes | str | dict[str, Any] | None,
    netns: str,
    *,
    env: Mapping[str, str | bytes | None] | None = None,
    argv: list[str] | None = None,
    timeout: float = TIMEOUT,
) -> Invoked:
    """Execute kpr-cni as libcni does: a clean environment of CNI_* variables, the configuration on stdin."""
    variables: dict[str, str | bytes | None] = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "kprunittest1",
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
        **(env or {}),
    }
    data = json.dumps(stdin).encode() if isinstance(stdin, dict) else stdin
    data = data.encode() if isinstance(data, str) else data
    started = time.monotonic()
    proc = subprocess.run(
        argv or [str(KPR_CNI)],
        input=data if data is not None else b"",
        env={k: v for k, v in variables.items() if v is not None},  # type: ignore[misc]
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return Invoked(
        proc.returncode, proc.stdout.decode(), proc.stderr.decode(errors="replace"), time.monotonic() - started
    )


def assert_error(done: Invoked, code: int, *words: str, version: str = "1.0.0") -> dict[str, Any]:
    """A CNI error object (SPEC.md, section 5, "Error"): non-zero exit, {cniVersion, code, msg[, details]}."""
    assert "Traceback" not in done.stderr, done
    assert done.returncode != 0, done
    out = done.output
    assert out is not None, f"empty stdout: {done}"
    assert set(out) <= {"cniVersion", "code", "msg", "details"}, out
    assert out["cniVersion"] == version, out
    assert out["code"] == code, out
    assert isinstance(out["msg"], str) and out["msg"], out
    assert isinstance(out.get("details", ""), str), out
    for word in words:
        assert word in out["msg"], (word, out)
    return out


def assert_success(done: Invoked) -> None:
    """DEL and CHECK succeed with exit 0 and nothing on stdout."""
    assert "Traceback" not in done.stderr, done
    assert (done.returncode, done.stdout) == (0, ""), done


# ---- decoding: size and depth are bounded, and decoding never recurses deeply


def nested(depth: int, kind: str) -> str:
    """`depth` levels of arrays or objects; 200k of either fit in 1 MiB, so the depth check is what refuses them."""
    return "[" * depth + "]" * depth if kind == "array" else '{"":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("command", ["ADD", "CHECK", "DEL"])
@pytest.mark.parametrize("kind", ["array", "object"])
def test_a_200k_deep_document_is_a_decoding_error(nowhere: str, command: str, kind: str) -> None:
    document = nested(DEEP, kind)
    assert len(document) < MiB
    done = invoke(command, document, nowhere)
    out = assert_error(done, 6, "nested deeper than")
    assert str(DEEP) not in out["msg"]  # the scan stops at the limit, it does not measure the whole document
    assert done.seconds < 5, done


def test_deep_nesting_inside_a_valid_configuration_is_a_decoding_error(nowhere: str) -> None:
    conf = json.dumps(config(prevResult={"cniVersion": "1.0.0", "x": "@"}))
    deep = conf.replace('"@"', nested(200, "array"))
    assert_error(invoke("ADD", deep, nowhere), 6, "nested deeper than")
    # brackets inside strings are not nesting
    inside_a_string = json.dumps(config(args={"note": "[" * 10_000}))
    assert_error(invoke("ADD", inside_a_string, nowhere), 4, "CNI_NETNS")  # decoding passed


def test_stdin_larger_than_1_mib_is_a_decoding_error(nowhere: str) -> None:
    too_big = json.dumps(config(args={"padding": "x" * MiB}))
    assert_error(invoke("ADD", too_big, nowhere), 6, "larger than")
    just_spaces = json.dumps(config()) + " " * MiB
    assert_error(invoke("DEL", just_spaces, nowhere), 6, "larger than")


@pytest.mark.parametrize(
    ("case", "stdin"),
    [
        ("empty", b""),
        ("whitespace", b" \n\t "),
        ("truncated", b'{"cniVersion": "1.0.0", "name": "kpr-test",'),
        ("not UTF-8", b'{"cniVersion": "1.0.0", "name": "kpr-\xff"}'),
        ("a string", b'"kpr-cni"'),
        ("NaN", json.dumps(config(prevResult={"x": float("nan")})).encode()),
        ("Infinity", b'{"cniVersion": "1.0.0", "name": "kpr-test", "prevResult": {"x": -Infinity}}'),
        ("a float too large", b'{"cniVersion": "1.0.0", "name": "kpr-test", "prevResult": {"x": 1e999}}'),
        ("a 5000-digit integer", b'{"cniVersion": "1.0.0", "name": "kpr-test", "x": ' + b"7" * 5000 + b"}"),
        ("NUL", b'{"cniVersion": "1.0.0", "name": "kpr-test"}\x00'),
    ],
)
def test_undecodable_stdin_is_a_decoding_error(nowhere: str, case: str, stdin: bytes) -> None:
    assert_error(invoke("ADD", stdin, nowhere), 6)


def test_a_closed_stdin_is_an_io_error(nowhere: str) -> None:
    done = invoke("ADD", None, nowhere, argv=["sh", "-c", f'exec "{KPR_CNI}" <&-'])
    assert_error(done, 5, "stdin")


def test_a_stdin_nobody_closes_is_an_io_error_after_the_deadline(nowhere: str) -> None:
    """A runtime always closes the plugin's stdin; one that does not gets an error, not a plugin that waits forever
    (the deadline is 30 s; this test shortens it)."""
    script = "import kpr.cni.plugin as p; p.STDIN_TIMEOUT = 0.5; p.main()"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "kprunittest1",
        "CNI_NETNS": nowhere,
        "CNI_IFNAME": "eth0",
    }
    started = time.monotonic()
    with subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(b'{"cniVersion": "1.0.0", ')
        proc.stdin.flush()
        try:
            proc.wait(timeout=TIMEOUT)  # stdin stays open (communicate() would close it)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("kpr-cni waited for stdin for ever") from None
        stdout, stderr = proc.stdout.read(), proc.stderr.read()
    done = Invoked(proc.returncode, stdout.decode(), stderr.decode(), time.monotonic() - started)
    assert_error(done, 5, "stdin")
    assert done.seconds < 10, done


def test_a_closed_stdout_is_no_traceback(nowhere: str) -> None:
    done = invoke("ADD", json.dumps(config()), nowhere, argv=["sh", "-c", f'exec "{KPR_CNI}" >&-'])
    assert done.returncode != 0 and "Traceback" not in done.stderr, done


# ---- CNI_NETNS: checked to be a network namespace before it is used, without blocking


def _fifo(tmp_path: Path) -> str:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return str(path)


def _regular_file(tmp_path: Path) -> str:
    """What /run/netns/NAME is once its namespace is unmounted: an empty regular file."""
    path = tmp_path / "unmounted-netns"
    path.write_bytes(b"")
    return str(path)


def _directory(tmp_path: Path) -> str:
    return str(tmp_path)


def _missing(tmp_path: Path) -> str:
    return str(tmp_path / "gone")


def _under_a_file(tmp_path: Path) -> str:
    return _regular_file(tmp_path) + "/net"


def _char_device(tmp_path: Path) -> str:
    return "/dev/null"


def _mount_namespace(tmp_path: Path) -> str:
    """A namespace file, but not a network namespace."""
    return "/proc/self/ns/mnt"


def _symlink_loop(tmp_path: Path) -> str:
    path = tmp_path / "loop"
    path.symlink_to(path)
    return str(path)


def _too_long(tmp_path: Path) -> str:
    return "/" + "n" * 5000


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        s.listen()
        yield str(path)


NOT_NETNS = {
    "a FIFO": _fifo,
    "an unmounted netns file": _regular_file,
    "a directory": _directory,
    "a missing path": _missing,
    "a path under a regular file": _under_a_file,
    "a character device": _char_device,
    "a mount namespace": _mount_namespace,
    "a symlink loop": _symlink_loop,
    "a path too long": _too_long,
}


@pytest.mark.parametrize("command", ["ADD", "CHECK"])
@pytest.mark.parametrize("case", sorted(NOT_NETNS))
def test_add_and_check_refuse_a_cni_netns_that_is_not_a_network_namespace(
    tmp_path: Path, command: str, case: str
) -> None:
    netns = NOT_NETNS[case](tmp_path)
    done = invoke(command, config(), netns)
    out = assert_error(done, 4, "CNI_NETNS")
    assert done.seconds < 5, done
    assert "not a network namespace" in out["msg"] or "does not exist" in out["msg"], out


@pytest.mark.parametrize("case", sorted(NOT_NETNS))
def test_del_succeeds_when_cni_netns_is_not_a_network_namespace(tmp_path: Path, case: str) -> None:
    """Nothing of kpr's can be attached to a pod whose namespace is not there (SPEC.md, DEL: "return success if the
    interface in question, or any modifications added, are missing")."""
    done = invoke("DEL", config(), NOT_NETNS[case](tmp_path))
    assert_success(done)
    assert "nothing to do" in done.stderr, done


def test_a_socket_is_not_a_network_namespace(unix_socket: str) -> None:
    assert_error(invoke("ADD", config(), unix_socket), 4, "CNI_NETNS", "socket")
    assert_success(invoke("DEL", config(), unix_socket))


def test_a_fifo_with_a_writer_is_not_read_either(tmp_path: Path) -> None:
    """A FIFO someone writes to must not be read from or opened as a namespace."""
    fifo = _fifo(tmp_path)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # keeps a writer on it without blocking this test
    try:
        os.write(writer, b"data")
        assert_error(invoke("ADD", config(), fifo), 4, "CNI_NETNS", "FIFO")
    finally:
        os.close(writer)


# ---- the other environment variables (SPEC.md, section 2: what each command requires)


@pytest.mark.parametrize("command", ["ADD", "CHECK", "DEL"])
@pytest.mark.parametrize("variable", ["CNI_CONTAINERID", "CNI_IFNAME"])
def test_a_missing_required_variable_is_named(nowhere: str, command: str, variable: str) -> None:
    assert_error(invoke(command, config(), nowhere, env={variable: None}), 4, variable)
    assert_error(invoke(command, config(), nowhere, env={variable: ""}), 4, variable)


@pytest.mark.parametrize("command", ["ADD", "CHECK"])
def test_a_missing_netns_is_named_for_add_and_check_but_not_del(nowhere: str, command: str) -> None:
    assert_error(invoke(command, config(), nowhere, env={"CNI_NETNS": None}), 4, "CNI_NETNS")
    assert_success(invoke("DEL", config(), nowhere, env={"CNI_NETNS": None}))


@pytest.mark.parametrize("command", [None, "", "UPDATE", "add", "ADD ", "DEL\n"])
def test_an_unknown_or_missing_command_is_named(nowhere: str, command: str | None) -> None:
    out = assert_error(invoke(command, config(), nowhere), 4, "CNI_COMMAND")
    assert "VERSION" in out.get("details", "")


@pytest.mark.parametrize("command", ["STATUS", "GC"])
def test_status_and_gc_are_refused_cleanly(nowhere: str, command: str) -> None:
    """STATUS and GC came with spec 1.1.0, which kpr-cni does not speak: a 1.1.0 configuration is an incompatible
    version (as for ADD); a runtime that sends them with an older one gets the command named."""
    assert_error(invoke(command, config(cniVersion="1.1.0"), nowhere), 1, "1.1.0")
    out = assert_error(invoke(command, config(), nowhere), 4, "CNI_COMMAND", command)
    assert "1.1.0" in out["msg"]
    assert_error(invoke(command, "[" * DEEP, nowhere), 6)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CNI_CONTAINERID", "kpr\n"),
        ("CNI_CONTAINERID", "-kpr"),
        ("CNI_CONTAINERID", "kpr/../x"),
        ("CNI_CONTAINERID", b"kpr\xff"),
        ("CNI_IFNAME", "eth\r0"),
        ("CNI_IFNAME", "eth\x0b0"),
        ("CNI_IFNAME", "eth\u20030"),
        ("CNI_IFNAME", "eth0\n"),
        ("CNI_IFNAME", "."),
        ("CNI_IFNAME", "a:b"),
        ("CNI_IFNAME", "x" * 16),
        ("CNI_IFNAME", "\u00e9" * 8),  # 8 characters, 16 bytes: the kernel counts bytes
        ("CNI_IFNAME", b"eth\xff"),
        ("CNI_NETNS", "run/netns/x"),
    ],
)
def test_an_invalid_variable_is_named(nowhere: str, variable: str, value: str | bytes) -> None:
    for command in ("ADD", "DEL"):
        assert_error(invoke(command, config(), nowhere, env={variable: value}), 4, variable)


# ---- the configuration and prevResult


@pytest.mark.parametrize(
    ("case", "changes", "code"),
    [
        ("a name with a newline", {"name": "kpr-test\n"}, 7),
        ("a name that is a number", {"name": 5}, 7),
        ("a cniVersion that is a list", {"cniVersion": ["1.0.0"]}, 7),
        ("a bpffsDir with a NUL", {"bpffsDir": "/sys/fs/bpf/kpr\u0000x"}, 7),
        ("a relative bpffsDir", {"bpffsDir": "sys/fs/bpf/kpr"}, 7),
        ("an unsupported cniVersion", {"cniVersion": "9.9.9"}, 1),
    ],
)
def test_an_invalid_configuration_is_refused(nowhere: str, case: str, changes: dict[str, Any], code: int) -> None:
    assert_error(invoke("ADD", config(**changes), nowhere), code)


MALFORMED_PREV_RESULTS: dict[str, Any] = {
    "a list": ["veth1234"],
    "a string": "veth1234",
    "interfaces that are a string": {"interfaces": "veth1234"},
    "an interface that is a string": {"interfaces": ["veth1234"]},
    "an interface without a name": {"interfaces": [{"mac": "aa:bb:cc:dd:ee:ff"}]},
    "an interface named by a number": {"interfaces": [{"name": 5}]},
    "a sandbox that is a number": {"interfaces": [{"name": "eth0", "sandbox": 5}]},
    "ips that are an object": {"ips": {"address": "10.0.0.1/24"}},
    "an ip that is a string": {"ips": ["10.0.0.1/24"]},
    "routes that are a string": {"routes": "0.0.0.0/0"},
    "dns that is a list": {"dns": ["10.96.0.10"]},
}


@pytest.mark.parametrize("command", ["ADD", "CHECK"])
@pytest.mark.parametrize("case", sorted(MALFORMED_PREV_RESULTS))
def test_a_malformed_prev_result_is_an_invalid_configuration(nowhere: str, command: str, case: str) -> None:
    out = assert_error(invoke(command, config(prevResult=MALFORMED_PREV_RESULTS[case]), nowhere), 7, "prevResult")
    assert len(out["msg"]) + len(out.get("details", "")) < 2000


@pytest.mark.parametrize("case", sorted(MALFORMED_PREV_RESULTS))
def test_del_does_not_need_a_well_formed_prev_result(nowhere: str, case: str) -> None:
    """DEL never reads prevResult: a malformed one is logged, not a reason to leave the pod undeleted."""
    assert_success(invoke("DEL", config(prevResult=MALFORMED_PREV_RESULTS[case]), nowhere))


def test_an_error_carries_the_configurations_cni_version(nowhere: str) -> None:
    assert_error(invoke("ADD", config(cniVersion="0.4.0", name="bad name"), nowhere), 7, version="0.4.0")
    assert_error(invoke("ADD", config(cniVersion="0.4.0"), nowhere, env={"CNI_IFNAME": ""}), 4, version="0.4.0")


def test_version_needs_nothing_and_never_fails(nowhere: str) -> None:
    expected = {"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}
    for stdin in (b"", b'{"cniVersion": "1.0.0"}', nested(DEEP, "array").encode()):
        done = invoke("VERSION", stdin, nowhere, env={"CNI_CONTAINERID": None, "CNI_IFNAME": None})
        assert (done.returncode, done.output) == (0, expected), done
    closed = invoke("VERSION", None, nowhere, argv=["sh", "-c", f'exec "{KPR_CNI}" <&-'])
    assert (closed.returncode, closed.output) == (0, expected), closed


# ---- anything unexpected is CNI error 999 with its message, and a log line


def _patched(body: str) -> list[str]:
    """kpr-cni with its ADD replaced by `body` (a function of conf, inv), run as the console script runs it."""
    script = f"import kpr.cni.plugin as p\ndef boom(conf, inv):\n    {body}\np.COMMANDS['ADD'] = boom\np.main()\n"
    return [sys.executable, "-c", script]


@pytest.mark.parametrize(
    ("body", "name"),
    [
        ("raise RuntimeError('boom')", "RuntimeError"),
        ("raise RecursionError('boom')", "RecursionError"),
        ("raise KeyboardInterrupt('boom')", "KeyboardInterrupt"),
        ("raise MemoryError('boom')", "MemoryError"),
        ("return 5", "TypeError"),  # a command returning something other than str
    ],
)
def test_an_unexpected_exception_is_error_999(nowhere: str, body: str, name: str) -> None:
    done = invoke("ADD", config(), nowhere, argv=_patched(body))
    assert_error(done, 999, name)
    assert "kpr-cni:" in done.stderr and name in done.stderr, done  # the log line


# ---- in process: the limits exactly, and anything at all on stdin


def test_depth_limit_is_exact() -> None:
    from kpr.cni.errors import CNIError
    from kpr.cni.inputs import MAX_JSON_DEPTH, decode_config, json_depth

    assert json_depth('{"a": [1, {"b": "]]]}}}"}], "c": "\\"[["}') == 3
    assert json_depth("[" * 1000) == 1000 and json_depth("[]" * 1000) == 1 and json_depth("") == 0
    ok = nested(MAX_JSON_DEPTH - 1, "object").replace("1", "{}", 1)
    assert decode_config(ok.encode()) is not None
    with pytest.raises(CNIError) as too_deep:
        decode_config(nested(MAX_JSON_DEPTH, "object").replace("1", "{}", 1).encode())
    assert too_deep.value.code == 6


def test_size_limit_is_exact() -> None:
    from kpr.cni.errors import CNIError
    from kpr.cni.inputs import MAX_CONFIG_BYTES, read_stdin

    body = b"{}" + b" " * (MAX_CONFIG_BYTES - 2)
    assert read_stdin(io.BytesIO(body), MAX_CONFIG_BYTES, 1.0) == body
    with pytest.raises(CNIError) as too_big:
        read_stdin(io.BytesIO(body + b" "), MAX_CONFIG_BYTES, 1.0)
    assert too_big.value.code == 6


def test_open_netns_accepts_a_network_namespace() -> None:
    from kpr.cni.inputs import NetnsError, open_netns

    fd = open_netns("/proc/self/ns/net")
    try:
        assert os.fstat(fd).st_ino == os.stat("/proc/self/ns/net").st_ino
    finally:
        os.close(fd)
    with pytest.raises(NetnsError) as mnt:
        open_netns("/proc/self/ns/mnt")
    assert not mnt.value.missing and "another kind" in str(mnt.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    command=st.sampled_from(["ADD", "CHECK", "DEL", "STATUS", "GC", "NOPE"]),
    stdin=st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.builds(lambda p: json.dumps(config(prevResult=p)).encode(), json_values),
        st.builds(
            lambda k, v: json.dumps(config(**{k: v})).encode(), st.sampled_from(["cniVersion", "name"]), json_values
        ),
    ),
)
def test_anything_on_stdin_is_a_cni_answer(tmp_path: Path, command: str, stdin: bytes) -> None:
    """Property: whatever the bytes, run() returns an exit status and a well-formed CNI answer, raising nothing."""
    from kpr.cni import plugin

    fifo = tmp_path / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "kprunittest1", "CNI_NETNS": str(fifo), "CNI_IFNAME": "eth0"}
    status, output = plugin.run(env, io.BytesIO(stdin))
    if status == 0:
        assert command == "DEL" and output == ""
        return
    answer = json.loads(output)
    assert set(answer) <= {"cniVersion", "code", "msg", "details"} and answer["code"] in {1, 4, 6, 7}, answer
    assert answer["cniVersion"] in plugin.SUPPORTED_VERSIONS and answer["msg"], answer
