"""The kpr-cni shim (kpr/cli/cnishim.py) that `kpr node install-cni` writes to the node's CNI bin directory.

Run for real as a runtime runs a plugin (a subprocess with CNI_* in its environment and the configuration on stdin),
without root: the "agent" is this test process holding the lock on a directory, as the agent holds it on its bpffs
directory, and `nsenter` is a stand-in on PATH that records its arguments and runs what it was given, here a stub
kpr-cni. tests/datapath/test_node_prepare.py runs the shim with the real nsenter into an agent's own mount and pid
namespaces, and with the real kpr-cni and agent on a lab pod.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kpr.cli import cnishim
from kpr.cli.main import main

pytestmark = pytest.mark.unit

KPR_CNI = Path(sys.executable).with_name("kpr-cni")  # the console script of `pip install -e .`
CONF = {"cniVersion": "0.4.0", "name": "k8s-pod-network", "prevResult": {"cniVersion": "1.0.0", "ips": []}}

FAKE_NSENTER = """#!/bin/sh
printf '%s\\n' "$@" > "$FAKE_LOG"
if [ "${FAKE_NSENTER:-}" = fail ]; then
    echo "nsenter: reassociate to namespace 'ns/mnt' failed: No such process" >&2
    exit 1
fi
shift 5  # --target PID --mount --pid --
exec "$@"
"""
STUB_KPR_CNI = """#!/bin/sh
env | grep '^CNI_' | sort > "$STUB_DIR/env"
cat > "$STUB_DIR/stdin"
if [ "${STUB_EXIT:-0}" != 0 ]; then
    echo '{"cniVersion":"0.4.0","code":7,"msg":"from the stub"}'
    exit "$STUB_EXIT"
fi
echo '{"cniVersion":"0.4.0","ips":[]}'
"""


@dataclass
class Node:
    """A stand-in node: the shim, the agent's bpffs directory, a bin directory with the fake nsenter."""

    dir: Path
    shim: Path
    bpffs_dir: Path
    bin: Path
    stub_dir: Path

    def run(
        self, command: str, conf: dict[str, Any] | None = None, *, path: str | None = None, **env: str
    ) -> subprocess.CompletedProcess[str]:
        variables = {
            "PATH": path if path is not None else f"{self.bin}:/usr/sbin:/usr/bin:/sbin:/bin",
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": "abc123",
            "CNI_NETNS": "/run/netns/cni-1234",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": "/opt/cni/bin",
            "FAKE_LOG": str(self.dir / "nsenter.log"),
            "STUB_DIR": str(self.stub_dir),
            **env,
        }
        stdin = json.dumps(conf if conf is not None else CONF)
        return subprocess.run(
            [str(self.shim)], input=stdin, env=variables, capture_output=True, text=True, timeout=30, check=False
        )

    def nsenter_argv(self) -> list[str] | None:
        log = self.dir / "nsenter.log"
        return log.read_text().splitlines() if log.exists() else None


def version_info() -> tuple[str, tuple[str, ...]]:
    return cnishim.version_of(KPR_CNI)


def make_node(tmp_path: Path, agent_bpffs_dir: Path | None = None) -> Node:
    bpffs_dir = tmp_path / "bpffs" / "kpr"
    bpffs_dir.mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nsenter").write_text(FAKE_NSENTER)
    (bin_dir / "nsenter").chmod(0o755)
    stub = tmp_path / "image" / "kpr-cni"
    stub.parent.mkdir()
    stub.write_text(STUB_KPR_CNI)
    stub.chmod(0o755)
    stub_dir = tmp_path / "seen"
    stub_dir.mkdir()
    info, versions = version_info()
    text = cnishim.render(
        cnishim.ShimSettings(str(bpffs_dir), str(agent_bpffs_dir or bpffs_dir), str(stub), info, versions)
    )
    shim = cnishim.install(tmp_path, text)
    return Node(tmp_path, shim, bpffs_dir, bin_dir, stub_dir)


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return make_node(tmp_path)


@pytest.fixture
def agent(node: Node) -> Iterator[int]:
    """This process as the running agent: it holds the lock on the bpffs directory, as lock_bpffs takes it."""
    fd = os.open(node.bpffs_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    yield os.getpid()
    os.close(fd)


def answer(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.stdout.count("\n") == 1, result
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


# ---- the script itself


def test_the_shim_is_posix_sh(node: Node) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (scripts/setup.sh installs it)")
    check = subprocess.run(["shellcheck", "-s", "sh", str(node.shim)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout
    for shell in ("dash", "bash", "busybox"):
        if shutil.which(shell):
            argv = [shell, "sh", "-n"] if shell == "busybox" else [shell, "-n"]
            assert subprocess.run([*argv, str(node.shim)], capture_output=True, check=False).returncode == 0, shell
    assert node.shim.read_text().startswith("#!/bin/sh\n" + cnishim.SHIM_MARKER)
    assert node.shim.stat().st_mode & 0o777 == 0o755


def test_render_refuses_what_it_cannot_paste_into_sh() -> None:
    info, versions = version_info()
    for bad in ("/sys/fs/bpf/my kpr", "relative/kpr", "/x/$(reboot)", "/x/'"):
        with pytest.raises(cnishim.ShimError, match="only absolute paths"):
            cnishim.render(cnishim.ShimSettings(bad, "/run/kpr/bpffs/kpr", "/opt/kpr-cni", info, versions))
    with pytest.raises(cnishim.ShimError, match="cannot be quoted"):
        cnishim.render(cnishim.ShimSettings("/a", "/b", "/c", info.replace("0.3.0", "0.3.0'"), versions))


# ---- without an agent


def test_version_is_answered_as_kpr_cni_answers_it_agent_or_not(node: Node) -> None:
    real = subprocess.run(
        [str(KPR_CNI)], input='{"cniVersion":"1.0.0"}', env={**os.environ, "CNI_COMMAND": "VERSION"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = node.run("VERSION", {"cniVersion": "1.0.0"})
    assert result.returncode == 0 and answer(result) == json.loads(real.stdout)
    assert node.nsenter_argv() is None


@pytest.mark.parametrize("command", ["ADD", "CHECK", "GC", ""])
def test_without_an_agent_anything_but_del_is_try_again_later(node: Node, command: str) -> None:
    result = node.run(command)
    assert result.returncode == 1
    error = answer(result)
    assert error["code"] == 11 and error["msg"] == "the kpr agent is not running on this node"
    assert error["cniVersion"] == "0.4.0"  # the configuration's, not prevResult's
    assert str(node.bpffs_dir) in error["details"]
    assert node.nsenter_argv() is None


@pytest.mark.parametrize(
    ("version", "replied"), [("0.3.1", "0.3.1"), ("9.9.9", "1.0.0"), ("", "1.0.0"), (None, "1.0.0")]
)
def test_the_error_speaks_the_configurations_version_when_kpr_cni_does(node: Node, version: Any, replied: str) -> None:
    conf = {"name": "x"} if version is None else {"cniVersion": version, "name": "x"}
    assert answer(node.run("ADD", conf))["cniVersion"] == replied


def test_without_an_agent_del_succeeds_and_says_why(node: Node) -> None:
    result = node.run("DEL")
    assert (result.returncode, result.stdout) == (0, "")
    assert "DEL abc123: no kpr agent runs here" in result.stderr
    assert node.nsenter_argv() is None


def test_a_lock_holder_that_does_not_see_the_agents_directory_is_not_the_agent(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    node = make_node(tmp_path, agent_bpffs_dir=elsewhere)
    fd = os.open(node.bpffs_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert answer(node.run("ADD"))["code"] == 11
    finally:
        os.close(fd)
    assert node.nsenter_argv() is None


# ---- with an agent


def test_kpr_cni_runs_in_the_agents_namespaces_with_environment_and_stdin(node: Node, agent: int) -> None:
    result = node.run("ADD")
    assert result.returncode == 0, result
    assert answer(result) == {"cniVersion": "0.4.0", "ips": []}  # kpr-cni's answer, as it printed it
    assert node.nsenter_argv() == ["--target", str(agent), "--mount", "--pid", "--", str(node.dir / "image/kpr-cni")]
    seen = (node.stub_dir / "env").read_text().splitlines()
    assert seen == [
        "CNI_COMMAND=ADD",
        "CNI_CONTAINERID=abc123",
        "CNI_IFNAME=eth0",
        "CNI_NETNS=/run/netns/cni-1234",
        "CNI_PATH=/opt/cni/bin",
    ]
    assert json.loads((node.stub_dir / "stdin").read_text()) == CONF


@pytest.mark.parametrize("command", ["DEL", "CHECK"])
def test_an_empty_success_stays_empty(node: Node, agent: int, command: str) -> None:
    (node.dir / "image/kpr-cni").write_text("#!/bin/sh\ncat >/dev/null\n")
    result = node.run(command)
    assert (result.returncode, result.stdout) == (0, "")


def test_kpr_cnis_errors_pass_through_with_their_status(node: Node, agent: int) -> None:
    result = node.run("ADD", STUB_EXIT="1")
    assert result.returncode == 1
    assert answer(result) == {"cniVersion": "0.4.0", "code": 7, "msg": "from the stub"}


def test_nsenter_failing_before_kpr_cni_answers_is_still_a_cni_answer(node: Node, agent: int) -> None:
    result = node.run("ADD", FAKE_NSENTER="fail")
    assert result.returncode == 1
    error = answer(result)
    assert error["code"] == 11 and f"(pid {agent}, exit status 1)" in error["msg"]
    assert error["cniVersion"] == "0.4.0"  # stdin was not read by anyone yet
    assert "reassociate to namespace" in result.stderr  # nsenter's own message reaches the runtime's log
    deleted = node.run("DEL", FAKE_NSENTER="fail")
    assert (deleted.returncode, deleted.stdout) == (0, "")


def test_a_node_without_nsenter_is_told_so(node: Node, agent: int, tmp_path: Path) -> None:
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("ls", "dd", "tr"):
        (tools / tool).symlink_to(shutil.which(tool) or f"/bin/{tool}")
    result = node.run("ADD", path=str(tools))
    error = answer(result)
    assert (result.returncode, error["code"]) == (1, 999)
    assert error["msg"] == "nsenter (util-linux) is not installed on this node"


# ---- kpr node install-cni


def test_install_cni_writes_the_shim_and_says_what_it_replaced(tmp_path: Path) -> None:
    runner = CliRunner()
    argv = ["node", "install-cni", "--cni-bin-dir", str(tmp_path), "--kpr-cni", str(KPR_CNI)]
    argv += ["--bpffs-dir", "/run/kpr/bpffs/kpr", "--host-bpffs-dir", "/sys/fs/bpf/kpr"]
    (tmp_path / "kpr-cni").symlink_to("/opt/kpr/bin/kpr-cni")  # the old way: a venv on every node
    first = runner.invoke(main, argv)
    assert first.exit_code == 0, first.output
    assert "(was a link to /opt/kpr/bin/kpr-cni)" in first.output and "CNI versions 0.3.0, 0.3.1" in first.output
    shim = tmp_path / "kpr-cni"
    assert not shim.is_symlink() and shim.stat().st_mode & 0o777 == 0o755
    text = shim.read_text()
    assert "host_bpffs_dir=/sys/fs/bpf/kpr\n" in text and "agent_bpffs_dir=/run/kpr/bpffs/kpr\n" in text
    assert f"kpr_cni={KPR_CNI.resolve()}\n" in text
    again = runner.invoke(main, argv)
    assert again.exit_code == 0 and "(was a previous shim)" in again.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kpr-cni"]  # no staging file left behind


def test_install_cni_fails_the_init_container_when_kpr_cni_does_not_work(tmp_path: Path) -> None:
    broken = tmp_path / "broken-kpr-cni"
    broken.write_text("#!/bin/sh\necho 'Traceback: no module named kpr' >&2\nexit 1\n")
    broken.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    result = CliRunner().invoke(main, ["node", "install-cni", "--cni-bin-dir", str(bin_dir), "--kpr-cni", str(broken)])
    assert result.exit_code == 1 and "answered VERSION with exit status 1" in result.output
    assert "no module named kpr" in result.output and list(bin_dir.iterdir()) == []
    missing = CliRunner().invoke(main, ["node", "install-cni", "--cni-bin-dir", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "is not a directory" in missing.output
