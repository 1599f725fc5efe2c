"""deploy/ and the Vagrant lab, checked offline: nothing here is applied to a cluster or booted.

- every Kubernetes document validates against the OpenAPI schemas bundled in `kubernetes-validate` (strict: an
  unknown or misspelt field fails), with the network blocked so nothing can be fetched;
- what the schemas cannot see: the DaemonSet's args name only flags `kpr agent --help` lists, every $(VAR) they use
  is defined and every ConfigMap key exists, the API server's own rules (Bidirectional propagation only when
  privileged), the node access the agent needs (init containers for bpffs, cgroup2 and kpr-cni; spc_t; NET_RAW and
  the xtables lock for cleanup), and RBAC of exactly list/watch on Services, EndpointSlices and Nodes plus Events;
- the kustomization rendered by the real kustomize (`kubectl kustomize`): every object validates, the generated
  ConfigMap is the env file and every reference names it, a changed setting rolls the DaemonSet, the health port
  follows the ConfigMap into the probes, and `images:` retargets every container;
- `ruby -c Vagrantfile` and shellcheck on vagrant/*.sh;
- and each checker fails on a deliberately broken copy, so a green run means something.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from kpr.cli.main import main

pytestmark = pytest.mark.unit

kubernetes_validate = pytest.importorskip("kubernetes_validate")
kv_utils = pytest.importorskip("kubernetes_validate.utils")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
VAGRANT = ROOT / "vagrant"
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests are meant for
NAMESPACE = "kube-system"
CAPABILITIES = {"BPF", "NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_RESOURCE"}
IMAGE = "ghcr.io/kpr-project/kpr"
CONFIG_ENV = DEPLOY / "kpr-config.env"
KUBE_PROXY_PORTS = {"10256", "10249"}  # healthz, metrics
SHELL_SCRIPTS = sorted(VAGRANT.glob("*.sh"))


# ---- loading ----


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kube_manifests(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.yaml") if p.name != "kustomization.yaml")


def parse_env(path: Path) -> dict[str, str]:
    """An env file as kustomize's configMapGenerator reads it: KEY=value lines, # comments, values as they are."""
    data = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and key == key.strip(), f"{path}: {line!r}"
            data[key] = value
    return data


def config_map(env: Path = CONFIG_ENV, name: str = "kpr-config") -> dict[str, Any]:
    """The ConfigMap kustomization.yaml generates from the env file (under a hashed name)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app.kubernetes.io/name": "kpr"}},
        "data": parse_env(env),
    }


def by_kind(docs: list[dict[str, Any]], where: str) -> dict[str, dict[str, Any]]:
    objects: dict[str, dict[str, Any]] = {}
    for doc in docs:
        assert doc["kind"] not in objects, f"{doc['kind']} defined twice in {where}"
        objects[doc["kind"]] = doc
    return objects


def deploy_objects() -> dict[str, dict[str, Any]]:
    """Every object in deploy/, by kind (each kind appears once), the generated ConfigMap included."""
    docs = [doc for path in kube_manifests(DEPLOY) for doc in load_docs(path)]
    return by_kind([*docs, config_map()], "deploy/")


@pytest.fixture(scope="module")
def objects() -> dict[str, dict[str, Any]]:
    return deploy_objects()


@pytest.fixture(scope="module")
def agent_flags() -> set[str]:
    result = CliRunner().invoke(main, ["agent", "--help"])
    assert result.exit_code == 0, result.output
    flags = set(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9][a-z0-9-]*)", result.output, re.MULTILINE))
    assert {"--kubeconfig", "--node-name", "--healthz-bind-address"} <= flags, result.output
    return flags


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No connection and no name lookup succeeds: the schemas must come from the package."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted during validation: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ---- the checkers (each returns a list of problems; the "bites" tests feed them broken input) ----


def schema_errors(doc: dict[str, Any]) -> list[str]:
    name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{name}: {'.'.join(str(p) for p in e.path)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{name}: {e.message}"]
    return []


def unknown_flags(args: list[str], flags: set[str]) -> list[str]:
    """Flags in a `kpr agent` command line (after the `agent` word) that `kpr agent --help` does not list."""
    return [a for a in args if a.startswith("-") and a.split("=", 1)[0] not in flags]


def env_problems(container: dict[str, Any], configmap: dict[str, Any]) -> list[str]:
    problems = []
    env = {e["name"]: e for e in container.get("env", [])}
    for arg in container.get("args", []):
        problems += [
            f"{arg}: $({v}) is not in the container's env" for v in re.findall(r"\$\((\w+)\)", arg) if v not in env
        ]
    # an env value sees only the variables defined before it (Kubernetes expands $(VAR) in order)
    for i, e in enumerate(container.get("env", [])):
        earlier = {x["name"] for x in container["env"][:i]}
        problems += [
            f"env {e['name']}: $({v}) is not defined before it"
            for v in re.findall(r"\$\((\w+)\)", e.get("value", ""))
            if v not in earlier
        ]
    data = configmap.get("data") or {}
    used = set()
    for e in env.values():
        ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
        if ref is None:
            continue
        used.add(ref["key"])
        if ref["name"] != configmap["metadata"]["name"]:
            problems.append(f"env {e['name']}: ConfigMap {ref['name']!r} is not {configmap['metadata']['name']!r}")
        elif ref["key"] not in data:
            problems.append(f"env {e['name']}: ConfigMap key {ref['key']!r} does not exist")
    problems += [f"ConfigMap key {k!r} is used by nothing" for k in sorted(set(data) - used)]
    return problems


def agent_container(ds: dict[str, Any]) -> dict[str, Any]:
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "kpr"
    return dict(container)


def host_mounts(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The container's volume mounts of host paths, by host path (a path may be mounted more than once)."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts: dict[str, list[dict[str, Any]]] = {}
    for m in container.get("volumeMounts", []):
        host = (volumes.get(m["name"]) or {}).get("hostPath", {}).get("path")
        if host:
            mounts.setdefault(host, []).append(m)
    return mounts


def pod_problems(ds: dict[str, Any]) -> list[str]:
    """What the agent needs from the node, and API server rules that the OpenAPI schema cannot express."""
    problems = []
    pod = ds["spec"]["template"]["spec"]
    container = agent_container(ds)
    sc = container.get("securityContext") or {}
    privileged = bool(sc.get("privileged"))
    for c in [*pod.get("initContainers", []), container]:
        for m in c.get("volumeMounts", []):
            # pkg/apis/core/validation: "Bidirectional mount propagation is available only to privileged containers"
            if m.get("mountPropagation") == "Bidirectional" and not (c.get("securityContext") or {}).get("privileged"):
                problems.append(f"volumeMount {m['name']}: Bidirectional propagation needs a privileged container")
    if not privileged and set((sc.get("capabilities") or {}).get("add", [])) != CAPABILITIES:
        problems.append(f"capabilities.add is not exactly {sorted(CAPABILITIES)}")
    if not privileged and (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
        problems.append("capabilities.drop is not [ALL]")
    if (pod.get("securityContext") or {}).get("seLinuxOptions", {}).get("type") != "spc_t":
        problems.append("the pod's seLinuxOptions.type is not spc_t (RHEL-family nodes)")

    mounts = host_mounts(pod, container)
    for host, read_only in [
        ("/sys/fs/bpf", False),
        ("/run/kpr/cgroupv2", True),
        ("/lib/modules", True),
        ("/usr/src", True),
        ("/run/xtables.lock", False),
    ]:
        ms = mounts.get(host, [])
        if not ms:
            problems.append(f"the host's {host} is not mounted")
        elif read_only and not all(m.get("readOnly") for m in ms):
            problems.append(f"the host's {host} is mounted read-write")
        elif not read_only and all(m.get("readOnly") for m in ms):
            problems.append(f"the host's {host} is mounted read-only")
        elif host == "/lib/modules" and ms[0]["mountPath"] != host:
            problems.append("/lib/modules must keep its path: build/ links into /usr/src by absolute path")
        elif host == "/usr/src" and ms[0]["mountPath"] != host:
            problems.append("/usr/src must keep its path: /lib/modules/*/build links into it")
        elif host == "/run/xtables.lock" and ms[0]["mountPath"] != host:
            problems.append("/run/xtables.lock must keep its path: iptables takes the lock there")
    # kpr-cni runs in this container (the shim) and finds the pins at its default bpffsDir, /sys/fs/bpf/kpr
    if "/sys/fs/bpf" not in [m["mountPath"] for m in mounts.get("/sys/fs/bpf", [])]:
        problems.append("the host's bpffs is not at /sys/fs/bpf, where kpr-cni looks by default")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    if (volumes.get("xtables-lock") or {}).get("hostPath", {}).get("type") != "FileOrCreate":
        problems.append("/run/xtables.lock is not a FileOrCreate hostPath (iptables creates it on first use)")
    # The kubelet checks hostPath types before the first (init) container starts: what the init containers make
    # cannot be required to exist already.
    for v in pod.get("volumes", []):
        host = v.get("hostPath") or {}
        if host.get("path", "").startswith("/run/kpr") and host.get("type") != "DirectoryOrCreate":
            problems.append(f"volume {v['name']}: {host['path']} does not exist before mount-cgroup makes it")

    env = {e["name"]: e for e in container.get("env", [])}
    if (env.get("KPR_NODE_NAME") or {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "spec.nodeName":
        problems.append("KPR_NODE_NAME does not come from spec.nodeName")
    # --cgroup-root and --bpffs-dir (as env) must point into the host's cgroup2 and bpffs mounts.
    for var, host in [("KPR_CGROUP_ROOT", "/run/kpr/cgroupv2"), ("KPR_BPFFS_DIR", "/sys/fs/bpf")]:
        value = (env.get(var) or {}).get("value", "")
        writable = [m for m in mounts.get(host, []) if host != "/sys/fs/bpf" or not m.get("readOnly")]
        inside = any((value + "/").startswith(m["mountPath"].rstrip("/") + "/") for m in writable)
        if not inside:
            problems.append(f"{var}={value!r} is not inside the mount of the host's {host}")

    healthz = [a.split("=", 1)[1] for a in container.get("args", []) if a.startswith("--healthz-bind-address=")]
    if healthz != ["0.0.0.0:$(KPR_HEALTHZ_PORT)"]:
        problems.append(f"--healthz-bind-address is {healthz}, not 0.0.0.0:$(KPR_HEALTHZ_PORT)")
    if (env.get("KPR_HEALTHZ_ADDRESS") or {}).get("value") != "127.0.0.1:$(KPR_HEALTHZ_PORT)":
        problems.append("KPR_HEALTHZ_ADDRESS (kpr status in the container) is not 127.0.0.1:$(KPR_HEALTHZ_PORT)")
    if [p.get("name") for p in container.get("ports", [])] != ["healthz"]:
        problems.append("the container's ports are not exactly one named healthz")
    for probe, path in [("livenessProbe", "/livez"), ("readinessProbe", "/healthz")]:
        get = (container.get(probe) or {}).get("httpGet") or {}
        if (get.get("path"), get.get("port")) != (path, "healthz"):
            problems.append(f"{probe} is not GET healthz{path}")

    if not pod.get("hostNetwork"):
        problems.append("not hostNetwork")
    if pod.get("hostPID"):
        problems.append("hostPID is not needed (the init containers use the host's /proc, the shim nsenter)")
    if pod.get("priorityClassName") != "system-node-critical":
        problems.append("priorityClassName is not system-node-critical")
    if {"operator": "Exists"} not in pod.get("tolerations", []):
        problems.append("does not tolerate every taint")
    if ds["spec"].get("updateStrategy") != {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}:
        problems.append("updateStrategy is not RollingUpdate with maxUnavailable 1")
    if not (container.get("resources") or {}).get("requests"):
        problems.append("no resource requests")
    if (container.get("lifecycle") or {}).get("preStop"):
        problems.append("a preStop hook: SIGTERM already leaves the datapath in place")
    return problems + init_problems(ds)


# The init containers: name -> (`kpr node` command, privileged, the host paths it mounts and where).
INIT_CONTAINERS = {
    "mount-bpf-fs": (["node", "mount-bpffs", "--path=/sys/fs/bpf"], True, {"/proc": "/hostproc"}),
    "mount-cgroup": (["node", "mount-cgroup", "--path=/run/kpr/cgroupv2"], True, {"/proc": "/hostproc"}),
    "install-cni": (
        ["node", "install-cni", "--cni-bin-dir=/host/opt/cni/bin", "--host-bpffs-dir=/sys/fs/bpf/kpr"],
        False,
        {"/opt/cni/bin": "/host/opt/cni/bin"},
    ),
}


def init_problems(ds: dict[str, Any]) -> list[str]:
    """bpffs and cgroup2 made on the node before the agent starts, then the kpr-cni shim installed."""
    problems = []
    pod = ds["spec"]["template"]["spec"]
    agent = agent_container(ds)
    inits = pod.get("initContainers", [])
    if [c["name"] for c in inits] != list(INIT_CONTAINERS):
        problems.append(f"init containers are {[c['name'] for c in inits]}, not {list(INIT_CONTAINERS)}")
    for c in inits:
        if c["name"] not in INIT_CONTAINERS:
            continue
        args, privileged, paths = INIT_CONTAINERS[c["name"]]
        if c.get("args") != args or "command" in c:
            problems.append(f"init container {c['name']} does not run `kpr {' '.join(args)}`")
        if c.get("image") != agent.get("image"):
            problems.append(f"init container {c['name']} runs another image than the agent")
        sc = c.get("securityContext") or {}
        if bool(sc.get("privileged")) != privileged:
            problems.append(f"init container {c['name']} is {'not ' if privileged else ''}privileged")
        if not privileged and (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
            problems.append(f"init container {c['name']}: capabilities.drop is not [ALL]")
        mounted = {host: [m["mountPath"] for m in ms] for host, ms in host_mounts(pod, c).items()}
        if mounted != {host: [path] for host, path in paths.items()}:
            problems.append(f"init container {c['name']} mounts {mounted}, not {paths}")
    install = next((c for c in inits if c["name"] == "install-cni"), {})
    bpffs_dir = {e["name"]: e.get("value") for e in install.get("env", [])}.get("KPR_BPFFS_DIR")
    if bpffs_dir != {e["name"]: e.get("value") for e in agent.get("env", [])}.get("KPR_BPFFS_DIR"):
        problems.append("install-cni's KPR_BPFFS_DIR is not the agent's: the shim would not find the agent")
    return problems


def health_problems(ds: dict[str, Any], configmap: dict[str, Any]) -> list[str]:
    """The port the probes use (the container port named healthz) is the one the agent listens on."""
    ports = {p.get("name"): p.get("containerPort") for p in agent_container(ds).get("ports", [])}
    wanted = (configmap.get("data") or {}).get("KPR_HEALTHZ_PORT", "")
    if str(ports.get("healthz")) != wanted:
        return [f"the container port healthz is {ports.get('healthz')}, KPR_HEALTHZ_PORT is {wanted!r}"]
    return []


def rbac_problems(role: dict[str, Any]) -> list[str]:
    """The ClusterRole grants exactly list+watch on Services, EndpointSlices, Nodes and create+patch on Events."""
    granted = set()
    problems = []
    for rule in role.get("rules", []):
        if rule.get("resourceNames") or rule.get("nonResourceURLs"):
            problems.append(f"unexpected rule {rule}")
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                granted |= {(group, resource, verb) for verb in rule.get("verbs", [])}
    expected = {
        *(
            (group, resource, verb)
            for group, resource in [("", "services"), ("", "nodes"), ("discovery.k8s.io", "endpointslices")]
            for verb in ("list", "watch")
        ),
        *((group, "events", verb) for group in ("", "events.k8s.io") for verb in ("create", "patch")),
    }
    problems += [f"grants {g}" for g in sorted(granted - expected)]
    problems += [f"lacks {g}" for g in sorted(expected - granted)]
    return problems


def shellcheck(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["shellcheck", "--external-sources", str(path)], capture_output=True, text=True, cwd=path.parent, check=False
    )


def ruby_syntax(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ruby", "-c", str(path)], capture_output=True, text=True, check=False)


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (scripts/setup.sh installs it)")


# ---- deploy/ ----


def test_the_pinned_kubernetes_version_is_bundled() -> None:
    assert K8S_VERSION in {kv_utils.major_minor(v) for v in kv_utils.all_versions()}


@pytest.mark.parametrize("path", kube_manifests(DEPLOY) + kube_manifests(VAGRANT), ids=lambda p: p.name)
def test_every_document_validates_offline_against_the_schemas(path: Path, offline: None) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        assert schema_errors(doc) == []


def test_the_generated_configmap_validates_and_its_env_file_is_kustomize_syntax(offline: None) -> None:
    assert schema_errors(config_map()) == []
    for line in CONFIG_ENV.read_text().splitlines():
        value = line.partition("=")[2]
        # kustomize keeps quotes and spaces as part of the value
        assert line.startswith("#") or not (value[:1] in "\"' " and value), line


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = load_docs(DEPLOY / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(p.name for p in kube_manifests(DEPLOY))
    (generator,) = kustomization["configMapGenerator"]
    assert generator["envs"] == [CONFIG_ENV.name] and generator["name"] == "kpr-config"
    assert kustomization["images"] == [{"name": IMAGE, "newTag": "0.1.0"}]


def test_health_and_metrics_are_not_kube_proxys_ports_by_default(objects: dict[str, dict[str, Any]]) -> None:
    """So that kpr can run beside kube-proxy until every agent is Ready (README, "Replacing kube-proxy")."""
    data = objects["ConfigMap"]["data"]
    assert data["KPR_HEALTHZ_PORT"] not in KUBE_PROXY_PORTS
    assert data["KPR_METRICS_BIND_ADDRESS"].rsplit(":", 1)[1] not in KUBE_PROXY_PORTS
    assert health_problems(objects["DaemonSet"], objects["ConfigMap"]) == []


def test_everything_lives_in_kube_system(objects: dict[str, dict[str, Any]]) -> None:
    for kind, obj in objects.items():
        if kind not in {"ClusterRole", "ClusterRoleBinding"}:
            assert obj["metadata"]["namespace"] == NAMESPACE, kind


def test_daemonset_args_use_only_flags_the_agent_has(objects: dict[str, dict[str, Any]], agent_flags: set[str]) -> None:
    container = agent_container(objects["DaemonSet"])
    args = container["args"]
    assert "command" not in container, "the image's entrypoint is `kpr`"
    assert args[0] == "agent"
    assert unknown_flags(args[1:], agent_flags) == []
    # Every setting is `--flag=value`, so a value can never be mistaken for a flag or the other way round.
    assert all(a.startswith("--") and "=" in a for a in args[1:])


def test_daemonset_env_and_configmap_agree(objects: dict[str, dict[str, Any]]) -> None:
    assert env_problems(agent_container(objects["DaemonSet"]), objects["ConfigMap"]) == []


def test_init_containers_run_kpr_node_commands_that_exist() -> None:
    for args, _, _ in INIT_CONTAINERS.values():
        result = CliRunner().invoke(main, [*args[:2], "--help"])
        assert result.exit_code == 0, result.output
        flags = {a.split("=", 1)[0] for a in args[2:]}
        assert all(f"{flag} " in result.output for flag in flags), (flags, result.output)


def test_daemonset_gets_what_the_agent_needs_from_the_node(objects: dict[str, dict[str, Any]]) -> None:
    ds = objects["DaemonSet"]
    assert pod_problems(ds) == []
    pod = ds["spec"]["template"]["spec"]
    assert pod["containers"][0]["securityContext"]["privileged"] is False
    assert pod["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]
    assert {c["image"] for c in [*pod["initContainers"], *pod["containers"]]} == {f"{IMAGE}:0.1.0"}


def test_rbac_is_exactly_what_the_agent_uses(objects: dict[str, dict[str, Any]]) -> None:
    assert rbac_problems(objects["ClusterRole"]) == []
    binding = objects["ClusterRoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": objects["ClusterRole"]["metadata"]["name"],
    }
    sa = objects["ServiceAccount"]["metadata"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]


def test_containerfile() -> None:
    """Two stages: the build one makes the wheel and the kernel headers tree; the image installs the wheel (never
    editable, no source tree kept) and ships the headers where the DaemonSet's host mounts do not hide them."""
    text = (DEPLOY / "Containerfile").read_text()
    instructions = [
        line for line in re.sub(r"\\\n", " ", text).splitlines() if line.strip() and not line.startswith("#")
    ]
    keywords = [line.split()[0] for line in instructions]
    known = {"FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "USER", "LABEL", "ENTRYPOINT", "CMD", "EXPOSE"}
    assert set(keywords) <= known, keywords
    assert instructions[0] == "ARG BASE=debian:bookworm-slim"
    assert [i for i in instructions if i.startswith("FROM ")] == ["FROM ${BASE} AS build", "FROM ${BASE}"]
    final_from = instructions.index("FROM ${BASE}")
    build, image = instructions[:final_from], instructions[final_from:]

    for source in ("kpr", "bpf"):
        assert any(i.startswith(f"COPY {source} ") for i in build), source
    assert any(i.startswith("COPY pyproject.toml setup.py ") for i in build)
    assert re.search(r"pip wheel [^&]*/opt/kpr/src", " ".join(build))
    assert any("kernel-headers-tree.sh debian /opt/kpr/kernel-headers" in i for i in build)

    run = " ".join(i for i in image if i.startswith("RUN "))
    for package in ("python3-bpfcc", "libbpfcc", "python3-venv", "iproute2", "iptables", "nftables"):
        assert re.search(rf"apt-get install [^&]*\b{package}\b", run), package
    assert "ln -sfn /usr/lib/python3/dist-packages/bcc" in run
    assert re.search(r"pip install [^&]*/tmp/kpr-dist/kpr-\*\.whl", run)
    assert not re.search(r"pip install [^&]*(\s-e\s|--editable)", text), "the image installs the wheel, not a checkout"
    assert not re.search(r"pip install [^&]*\bbcc\b", run), "bcc comes from Debian, never PyPI"
    assert [i.split()[1] for i in image if i.startswith("COPY ")] == ["--from=build", "--from=build"]
    assert 'ENTRYPOINT ["kpr"]' in instructions

    # The shipped headers tree (kpr.datapath.toolchain's last fallback) is not under a host path the DaemonSet mounts.
    env = " ".join(i for i in image if i.startswith("ENV "))
    headers = re.search(r"KPR_KERNEL_HEADERS=(\S+)", env)
    assert headers and f"COPY --from=build {headers[1]} {headers[1]}" in image
    [daemonset] = [d for d in load_docs(DEPLOY / "daemonset.yaml") if d["kind"] == "DaemonSet"]
    [kpr] = [c for c in daemonset["spec"]["template"]["spec"]["containers"] if c["name"] == "kpr"]
    for mount in kpr.get("volumeMounts", []):
        assert not Path(headers[1]).is_relative_to(mount["mountPath"]), mount


# ---- deploy/ as kustomize renders it ----


def kubectl() -> str:
    """A kubectl, whose `kustomize` is the real kustomize: on PATH, or the one `make k8s` builds."""
    found = shutil.which("kubectl") or next(
        (str(p) for p in [ROOT / ".cache" / "k8s" / "bin" / "kubectl"] if p.is_file()), None
    )
    if found is None:
        pytest.skip("no kubectl (make k8s builds one into .cache/k8s/bin)")
    return found


def render(directory: Path) -> dict[str, dict[str, Any]]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return by_kind([d for d in yaml.safe_load_all(result.stdout) if d], str(directory))


def deploy_copy(tmp_path: Path, **settings: str) -> Path:
    """deploy/ copied, with some settings of kpr-config.env changed."""
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    env = copy / CONFIG_ENV.name
    text = env.read_text()
    for key, value in settings.items():
        text, n = re.subn(rf"^{key}=.*$", f"{key}={value}", text, flags=re.MULTILINE)
        assert n == 1, key
    env.write_text(text)
    return copy


def config_map_refs(ds: dict[str, Any]) -> set[str]:
    pod = ds["spec"]["template"]["spec"]
    return {
        e["valueFrom"]["configMapKeyRef"]["name"]
        for c in [*pod.get("initContainers", []), *pod["containers"]]
        for e in c.get("env", [])
        if "configMapKeyRef" in e.get("valueFrom", {})
    }


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, Any]]:
    return render(DEPLOY)


def test_every_rendered_object_validates_and_is_what_the_files_say(
    rendered: dict[str, dict[str, Any]], offline: None
) -> None:
    assert set(rendered) == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"}
    for obj in rendered.values():
        assert schema_errors(obj) == []
    ds, cm = rendered["DaemonSet"], rendered["ConfigMap"]
    assert pod_problems(ds) == [] and health_problems(ds, cm) == []
    assert env_problems(agent_container(ds), cm) == []
    assert rbac_problems(rendered["ClusterRole"]) == []


def test_the_generated_configmap_is_the_env_file_and_the_daemonset_names_it(
    rendered: dict[str, dict[str, Any]],
) -> None:
    cm = rendered["ConfigMap"]
    assert re.fullmatch(r"kpr-config-[a-z0-9]{10}", cm["metadata"]["name"]), cm["metadata"]
    assert cm["data"] == parse_env(CONFIG_ENV) == config_map()["data"]
    assert cm["metadata"]["namespace"] == NAMESPACE and cm["metadata"]["labels"] == {"app.kubernetes.io/name": "kpr"}
    assert config_map_refs(rendered["DaemonSet"]) == {cm["metadata"]["name"]}


def test_a_changed_setting_rolls_the_daemonset(tmp_path: Path, rendered: dict[str, dict[str, Any]]) -> None:
    changed = render(deploy_copy(tmp_path, KPR_LOG_LEVEL="debug"))
    old_name, new_name = rendered["ConfigMap"]["metadata"]["name"], changed["ConfigMap"]["metadata"]["name"]
    assert new_name != old_name
    assert config_map_refs(changed["DaemonSet"]) == {new_name}
    # a changed pod template is what makes the DaemonSet controller replace the pods
    assert changed["DaemonSet"]["spec"]["template"] != rendered["DaemonSet"]["spec"]["template"]


def test_moving_to_kube_proxys_ports_moves_the_probes_too(tmp_path: Path, offline: None) -> None:
    moved = render(deploy_copy(tmp_path, KPR_HEALTHZ_PORT="10256", KPR_METRICS_BIND_ADDRESS="127.0.0.1:10249"))
    ds = moved["DaemonSet"]
    assert agent_container(ds)["ports"] == [{"name": "healthz", "containerPort": 10256, "protocol": "TCP"}]
    assert health_problems(ds, moved["ConfigMap"]) == [] and pod_problems(ds) == []
    assert schema_errors(ds) == []  # an integer port, not the ConfigMap's string


def test_images_retarget_every_container(tmp_path: Path) -> None:
    overlay = tmp_path / "mirror"
    overlay.mkdir()
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    (overlay / "kustomization.yaml").write_text(
        "resources: [../deploy]\n"
        f"images: [{{name: {IMAGE}, newName: registry.example.com/mirror/kpr, newTag: 0.1.1}}]\n"
    )
    pod = render(overlay)["DaemonSet"]["spec"]["template"]["spec"]
    images = [c["image"] for c in [*pod["initContainers"], *pod["containers"]]]
    assert images == ["registry.example.com/mirror/kpr:0.1.1"] * 4


def test_the_example_conflist_finds_the_agents_pins_in_the_agents_container(
    rendered: dict[str, dict[str, Any]],
) -> None:
    """kpr-cni runs in the agent's container (the install-cni shim): its bpffsDir, default /sys/fs/bpf/kpr, must be
    the agent's --bpffs-dir there, through the bpffs mounted at /sys/fs/bpf."""
    conflist = json.loads((DEPLOY / "cni" / "10-kpr-chained.conflist").read_text())
    (kpr_cni,) = [p for p in conflist["plugins"] if p["type"] == "kpr-cni"]
    bpffs_dir = kpr_cni.get("bpffsDir", "/sys/fs/bpf/kpr")
    ds = rendered["DaemonSet"]
    agent = agent_container(ds)
    agent_dir = {e["name"]: e.get("value") for e in agent["env"]}["KPR_BPFFS_DIR"]
    mounts = host_mounts(ds["spec"]["template"]["spec"], agent)["/sys/fs/bpf"]
    seen = {m["mountPath"].rstrip("/") for m in mounts}
    assert seen == {"/run/kpr/bpffs", "/sys/fs/bpf"}
    assert agent_dir.startswith("/run/kpr/bpffs/")
    assert bpffs_dir == "/sys/fs/bpf/" + agent_dir.removeprefix("/run/kpr/bpffs/")


# ---- the Vagrant lab ----


def test_vagrantfile_is_valid_ruby() -> None:
    need("ruby")
    result = ruby_syntax(ROOT / "Vagrantfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_vagrantfile_builds_the_promised_cluster() -> None:
    text = (ROOT / "Vagrantfile").read_text()
    assert (
        len(re.findall(r'\{ name: "\w+", ip: "[\d.]+", pod_cidr: "[\d./]+", role: "(?:control-plane|worker)" \}', text))
        == 3
    )
    assert text.count('role: "control-plane"') == 1
    assert "provider :libvirt" in text and "provider :virtualbox" in text
    assert 'ENV.fetch("KPR_CNI_MODE"' in text
    for script in re.findall(r'"(vagrant/[\w-]+\.sh)"', text):
        assert (ROOT / script).is_file(), script
    assert "--skip-phases=addon/kube-proxy" in (VAGRANT / "control-plane.sh").read_text()


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_provisioning_scripts_pass_shellcheck(path: Path) -> None:
    need("shellcheck")
    lines = path.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines
    result = shellcheck(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kpr_service_unit_uses_only_flags_the_agent_has(agent_flags: set[str]) -> None:
    unit = (VAGRANT / "kpr.service").read_text()
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", unit, re.MULTILINE)
    argv = shlex.split(exec_start)
    assert argv[:2] == ["/opt/kpr/venv/bin/kpr", "agent"]
    assert unknown_flags([a for a in argv[2:] if not a.startswith("$")], agent_flags) == []
    assert "--kubeconfig" in argv


def test_chained_cni_mode_writes_kpr_cni_after_bridge() -> None:
    common = (VAGRANT / "common.sh").read_text()
    conflist = common[common.index('"plugins": [') :]
    assert conflist.index('"type": "bridge"') < conflist.index("$chained")
    assert re.search(r'chained\) chained=\'[^\']*"type": "kpr-cni"', common)


# ---- the checkers bite ----


def broken(doc: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(doc)


def test_schema_validation_rejects_broken_documents(objects: dict[str, dict[str, Any]], offline: None) -> None:
    ds = broken(objects["DaemonSet"])
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True  # a typo: only strict validation sees it
    assert schema_errors(ds)
    ds = broken(objects["DaemonSet"])
    ds["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["periodSeconds"] = "often"
    assert schema_errors(ds)
    cm = broken(objects["ConfigMap"])
    cm["data"]["KPR_MIN_SYNC_PERIOD"] = 0.1  # unquoted in YAML: not a string
    assert schema_errors(cm)
    role = broken(objects["ClusterRole"])
    role["rules"][0]["verbs"] = "list"
    assert schema_errors(role)
    assert schema_errors({"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "x"}})


def test_a_broken_manifest_file_fails_validation(tmp_path: Path, offline: None) -> None:
    text = (DEPLOY / "daemonset.yaml").read_text().replace("hostNetwork: true", "hostNetwork: yes please")
    copy_path = tmp_path / "daemonset.yaml"
    copy_path.write_text(text)
    assert any(schema_errors(doc) for doc in load_docs(copy_path))


def test_flag_check_rejects_unknown_flags(agent_flags: set[str]) -> None:
    assert unknown_flags(["--healthz-bind-address=:1", "--proxy-mode=ipvs", "--nodeport-addresses"], agent_flags) == [
        "--proxy-mode=ipvs"
    ]


def test_env_check_rejects_dangling_references(objects: dict[str, dict[str, Any]]) -> None:
    container = agent_container(broken(objects["DaemonSet"]))
    container["args"].append("--log-level=$(KPR_VERBOSITY)")
    container["env"].append({"name": "X", "valueFrom": {"configMapKeyRef": {"name": "kpr-config", "key": "NOPE"}}})
    container["env"].insert(0, {"name": "EARLY", "value": "127.0.0.1:$(KPR_HEALTHZ_PORT)"})  # defined only later
    problems = env_problems(container, objects["ConfigMap"])
    assert any("KPR_VERBOSITY" in p for p in problems) and any("NOPE" in p for p in problems)
    assert any("env EARLY: $(KPR_HEALTHZ_PORT) is not defined before it" in p for p in problems)


def test_pod_check_rejects_what_the_api_server_or_the_node_would(objects: dict[str, dict[str, Any]]) -> None:
    ds = broken(objects["DaemonSet"])
    container = ds["spec"]["template"]["spec"]["containers"][0]
    for m in container["volumeMounts"]:
        if m["name"] == "bpffs":
            m["mountPropagation"] = "Bidirectional"
    container["securityContext"]["capabilities"]["add"].remove("NET_RAW")
    container["readinessProbe"]["httpGet"]["port"] = 10256
    pod = ds["spec"]["template"]["spec"]
    pod["volumes"] = [v for v in pod["volumes"] if v["name"] not in ("usr-src", "xtables-lock")]
    del pod["securityContext"]["seLinuxOptions"]
    pod["initContainers"][1]["securityContext"]["privileged"] = False
    pod["initContainers"][2]["env"][0]["value"] = "/sys/fs/bpf/kpr"
    del pod["initContainers"][0]
    next(v for v in pod["volumes"] if v["name"] == "cgroup2")["hostPath"]["type"] = "Directory"
    problems = pod_problems(ds)
    assert any("Bidirectional" in p for p in problems)
    assert any("capabilities.add" in p for p in problems)
    assert any("readinessProbe" in p for p in problems)
    assert any("/usr/src" in p for p in problems) and any("/run/xtables.lock" in p for p in problems)
    assert any("spc_t" in p for p in problems)
    assert any("init containers are ['mount-cgroup', 'install-cni']" in p for p in problems)
    assert "init container mount-cgroup is not privileged" in problems
    assert any("install-cni's KPR_BPFFS_DIR is not the agent's" in p for p in problems)
    assert "volume cgroup2: /run/kpr/cgroupv2 does not exist before mount-cgroup makes it" in problems
    cm = broken(objects["ConfigMap"])
    cm["data"]["KPR_HEALTHZ_PORT"] = "10256"  # the agent moved, the probes did not
    assert health_problems(ds, cm) == ["the container port healthz is 10356, KPR_HEALTHZ_PORT is '10256'"]


def test_rbac_check_rejects_more_or_less(objects: dict[str, dict[str, Any]]) -> None:
    role = broken(objects["ClusterRole"])
    role["rules"][0]["verbs"].append("get")
    role["rules"][1]["verbs"] = ["list"]
    role["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]})
    problems = rbac_problems(role)
    assert "grants ('', 'services', 'get')" in problems
    assert "grants ('', 'secrets', 'list')" in problems
    assert "lacks ('discovery.k8s.io', 'endpointslices', 'watch')" in problems


def test_shellcheck_rejects_a_broken_script(tmp_path: Path) -> None:
    need("shellcheck")
    script = tmp_path / "broken.sh"
    script.write_text("#!/usr/bin/env bash\nset -euo pipefail\nfor n in `seq 3`; do rm -rf /tmp/$n; done\n")
    result = shellcheck(script)
    assert result.returncode != 0
    assert "SC2006" in result.stdout and "SC2086" in result.stdout  # the backticks, the unquoted $n


def test_ruby_check_rejects_a_broken_vagrantfile(tmp_path: Path) -> None:
    need("ruby")
    text = (ROOT / "Vagrantfile").read_text()
    copy_path = tmp_path / "Vagrantfile"
    copy_path.write_text(text[: text.rindex("end")])  # the last `end` gone
    assert ruby_syntax(copy_path).returncode != 0
