"""The real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) in a lab namespace.

Everything runs inside one external namespace `<prefix>-<name>` on the underlay, so the nodes reach the API server at
its underlay address and nothing listens in the root network namespace. etcd listens on that namespace's loopback
only; the API server listens on every address of the namespace (underlay v4 and v6, and loopback). Certificates,
kubeconfigs, etcd's data and the component logs live in `lab.run_dir / name`, which lab.close() removes.

The binaries are the ones scripts/k8s-build.sh builds into .cache/k8s/bin/. The configuration is lean on purpose:
only the controllers a cluster of Deployments and Services needs, no leader election, no serving ports besides the
API server's, and no node lifecycle (the lab's nodes post no heartbeats, so it would taint and evict them).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from kpr.datapath import netns
from kpr.lab.errors import LabError
from kpr.lab.lab import Lab
from kpr.lab.layout import External
from kpr.lab.plumbing import NETNS_DIR

K8S_BIN_DIR = Path(__file__).resolve().parents[2] / ".cache" / "k8s" / "bin"

APISERVER_PORT = 6443
ETCD_CLIENT_URL = "http://127.0.0.1:2379"
ETCD_PEER_URL = "http://127.0.0.1:2380"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
CERT_DAYS = 30
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")

# What a cluster of Deployments and Services needs; the aliases are those of cmd/kube-controller-manager/app.
# root-ca-cert-publisher makes the kube-root-ca.crt ConfigMap that every pod's service-account volume refers to.
CONTROLLERS = (
    "serviceaccount-token",
    "serviceaccount",
    "namespace",
    "garbagecollector",
    "deployment",
    "replicaset",
    "endpointslice",
    "endpointslicemirroring",
    "root-ca-cert-publisher",
)

# A minimal openssl configuration, so that the host's openssl.cnf adds no extensions of its own.
_OPENSSL_CNF = """\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
authorityKeyIdentifier = keyid
subjectAltName = {sans}
"""

# client certificate name -> subject; the identities the bootstrap RBAC policy knows
_CLIENTS = {
    "admin": "/O=system:masters/CN=kubernetes-admin",
    "kube-controller-manager": "/CN=system:kube-controller-manager",
    "kube-scheduler": "/CN=system:kube-scheduler",
}


def k8s_binary(name: str) -> Path:
    """The path of a Kubernetes binary built by scripts/k8s-build.sh; LabError if it is not there."""
    path = K8S_BIN_DIR / name
    if not os.access(path, os.X_OK):
        raise LabError(
            f"{path} is missing: run scripts/k8s-build.sh (make setup does) to build the Kubernetes binaries"
        )
    return path


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise LabError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip() or "(empty log)"
    except OSError:
        return "(no log)"


class ControlPlane:
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler in the lab namespace `<prefix>-<name>`."""

    def __init__(
        self,
        lab: Lab,
        name: str = "cp",
        *,
        service_cidrs: tuple[str, ...] = ("10.96.0.0/16", "fd00:96::/108"),
        node_port_range: str = "30000-32767",
        watch_cache: bool = True,
    ) -> None:
        networks = [ipaddress.ip_network(cidr) for cidr in service_cidrs]
        if (
            not 1 <= len(networks) <= 2
            or networks[0].version != 4
            or len({n.version for n in networks}) != len(networks)
        ):
            # The API server wants the primary service family to match its advertise address, which is IPv4.
            raise LabError(
                f"service_cidrs must be one IPv4 range, optionally followed by one IPv6 range: {service_cidrs}"
            )
        self.lab = lab
        self.name = name
        self.service_cidrs = tuple(str(n) for n in networks)
        self.node_port_range = node_port_range
        # With the watch cache (the default, as in every real cluster) watches and most lists are served from the
        # API server's memory, so compact_etcd() alone does not expire a watch's resourceVersion: the cache keeps
        # serving it until the API server restarts or the cache's window moves past it. Without it, every watch
        # reads etcd and a compaction turns an older resourceVersion into 410 Gone at once.
        self.watch_cache = watch_cache
        self.dir = lab.run_dir / name
        self.start_seconds: float | None = None  # how long start() took
        self.timings: dict[str, float] = {}  # seconds since start() began at which each phase ended
        self._ns: External | None = None
        self._procs: dict[str, subprocess.Popen[Any]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    # ---- where it runs

    @property
    def ns(self) -> External:
        if self._ns is None:
            raise LabError(f"control plane {self.name} is not started")
        return self._ns

    @property
    def address(self) -> str:
        return self.ns.ipv4

    @property
    def address6(self) -> str:
        return self.ns.ipv6

    @property
    def server(self) -> str:
        return f"https://{self.address}:{APISERVER_PORT}"

    def __repr__(self) -> str:
        where = self.server if self._ns is not None else "not started"
        return f"ControlPlane({self.name!r}, {where})"

    # ---- lifecycle

    def start(self, timeout: float = 90) -> ControlPlane:
        """Start everything; return once pods can be created (/readyz, default ServiceAccount, kubernetes Service)."""
        if self._ns is not None:
            raise LabError(f"control plane {self.name} was already started")
        for binary in COMPONENTS:
            k8s_binary(binary)
        k8s_binary("kubectl")
        began = time.monotonic()
        deadline = began + timeout
        self._ns = self.lab.add_external(self.name)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._make_pki()
            self._write_kubeconfigs()
            self.timings["pki"] = time.monotonic() - began
            self._spawn("etcd", self._etcd_argv())
            # The API server's first etcd dial retries only after a second: start it once etcd answers.
            self._wait(deadline, "etcd to answer /health", self._etcd_healthy)
            self.timings["etcd"] = time.monotonic() - began
            self._spawn("kube-apiserver", self._apiserver_argv())
            self._wait(deadline, "kube-apiserver's /readyz", self._apiserver_ready)
            self.timings["apiserver"] = time.monotonic() - began
            self._spawn("kube-controller-manager", self._controller_manager_argv())
            self._spawn("kube-scheduler", self._scheduler_argv())
            self._wait(deadline, "the default ServiceAccount and the kubernetes Service", self._cluster_usable)
            self.timings["ready"] = time.monotonic() - began
        except BaseException:
            self.close()
            raise
        self.start_seconds = self.timings["ready"]
        return self

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver (gracefully, as a rolling restart would); etcd and the controllers keep running."""
        proc = self._procs.pop("kube-apiserver", None)
        if proc is not None:
            _stop(proc)

    def start_apiserver(self, timeout: float = 60) -> None:
        """Start kube-apiserver again on the same etcd data and wait for /readyz."""
        if "kube-apiserver" in self._procs:
            raise LabError("kube-apiserver is already running")
        self._spawn("kube-apiserver", self._apiserver_argv())
        self._wait(time.monotonic() + timeout, "kube-apiserver's /readyz", self._apiserver_ready)

    def close(self) -> None:
        """Stop every component (lab.close() would kill them too). Idempotent."""
        self._closed = True
        procs, self._procs = self._procs, {}
        etcd = procs.pop("etcd", None)
        _stop(*procs.values())  # before etcd: a stopping API server still writes (its endpoint, its lease)
        if etcd is not None:
            _stop(etcd)

    # ---- using it

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl as cluster admin inside the control plane's namespace (a --kubeconfig in args overrides).

        With check=True a failure raises kpr.lab.RunError, whose message includes kubectl's stderr.
        """
        argv = [*self._clean_env(KUBECONFIG=str(self.admin_kubeconfig())), str(k8s_binary("kubectl")), *args]
        return self.lab.run(self.ns, argv, timeout=timeout, check=check, input=input)

    def admin_kubeconfig(self) -> Path:
        """A kubeconfig for user kubernetes-admin (group system:masters) that talks to self.server."""
        return self.dir / "admin.kubeconfig"

    def service_account_kubeconfig(
        self, namespace: str, name: str, path: Path | None = None, duration: str = "24h"
    ) -> Path:
        """A kubeconfig with a bound token of ServiceAccount namespace/name (TokenRequest API), CA embedded."""
        token = self.kubectl("create", "token", name, "--namespace", namespace, "--duration", duration).stdout.strip()
        path = path or self.dir / f"sa-{namespace}-{name}.kubeconfig"
        ca = base64.b64encode((self.dir / "ca.crt").read_bytes()).decode()
        _write_kubeconfig(
            path, self.server, f"{namespace}-{name}", {"token": token}, {"certificate-authority-data": ca}
        )
        return path

    def compact_etcd(self) -> int:
        """Compact etcd's history up to its current revision (physically) and return that revision.

        Afterwards a list or watch from an older resourceVersion that etcd serves fails with 410 Gone. With the watch
        cache on (the default), the API server keeps serving watches from memory and does not even learn of this
        compaction: clients see 410 only once it re-lists (after a restart). Uses etcd's gRPC gateway (no etcdctl).
        """
        header = self._etcd_call("/v3/kv/range", {"key": base64.b64encode(b"\0").decode()})["header"]
        revision = int(header["revision"])
        try:
            self._etcd_call("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        except LabError as exc:
            # The API server's own compactor (every 5 minutes) may have got there first.
            if "has been compacted" not in str(exc):
                raise
        return revision

    def log(self, component: str) -> str:
        """The log text of etcd, kube-apiserver, kube-controller-manager or kube-scheduler."""
        if component not in COMPONENTS:
            raise LabError(f"no component {component!r}; choose from {', '.join(COMPONENTS)}")
        path = self._log_path(component)
        return path.read_text(errors="replace") if path.exists() else ""

    # ---- command lines

    def _etcd_argv(self) -> list[str]:
        return [
            str(k8s_binary("etcd")),
            "--name=lab",
            f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls={ETCD_CLIENT_URL}",
            f"--advertise-client-urls={ETCD_CLIENT_URL}",
            f"--listen-peer-urls={ETCD_PEER_URL}",
            f"--initial-advertise-peer-urls={ETCD_PEER_URL}",
            f"--initial-cluster=lab={ETCD_PEER_URL}",
            "--enable-grpc-gateway",  # compact_etcd() speaks HTTP JSON
            "--unsafe-no-fsync",  # a lab's etcd lives as long as the lab; fsync only slows every write
            # One member on loopback: elect it at once (the default 1 s election timeout is most of etcd's start).
            "--heartbeat-interval=10",
            "--election-timeout=100",
            "--log-level=warn",
        ]

    def _apiserver_argv(self) -> list[str]:
        d = self.dir
        return [
            str(k8s_binary("kube-apiserver")),
            f"--etcd-servers={ETCD_CLIENT_URL}",
            "--bind-address=::",  # every address of the cp namespace: underlay v4 and v6, and loopback
            f"--advertise-address={self.address}",  # the kubernetes Service's endpoint
            f"--secure-port={APISERVER_PORT}",
            f"--tls-cert-file={d / 'apiserver.crt'}",
            f"--tls-private-key-file={d / 'apiserver.key'}",
            f"--client-ca-file={d / 'ca.crt'}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            f"--service-cluster-ip-range={','.join(self.service_cidrs)}",
            f"--service-node-port-range={self.node_port_range}",
            "--allow-privileged=true",
            # Without the node lifecycle controller nothing would ever lift the not-ready taint this plugin puts on
            # every new Node, and no pod would be scheduled.
            "--disable-admission-plugins=TaintNodesByCondition",
            # On SIGTERM close the watches (clients see them end, as in a rolling restart) instead of waiting
            # --request-timeout (60 s) for the controllers' watches to finish by themselves.
            "--shutdown-watch-termination-grace-period=2s",
            "--profiling=false",
            *([] if self.watch_cache else ["--watch-cache=false"]),
        ]

    def _controller_manager_argv(self) -> list[str]:
        d = self.dir
        return [
            str(k8s_binary("kube-controller-manager")),
            f"--kubeconfig={d / 'kube-controller-manager.kubeconfig'}",
            "--leader-elect=false",
            "--secure-port=0",  # no serving: nothing scrapes it, and it saves the delegated-authn lookups
            f"--controllers={','.join(CONTROLLERS)}",
            # Each controller acts as its own ServiceAccount with the bootstrap system:controller:* role (as kubeadm
            # does); the system:kube-controller-manager user may not, for example, create pods.
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={d / 'sa.key'}",
            f"--root-ca-file={d / 'ca.crt'}",
            "--profiling=false",
        ]

    def _scheduler_argv(self) -> list[str]:
        return [
            str(k8s_binary("kube-scheduler")),
            f"--kubeconfig={self.dir / 'kube-scheduler.kubeconfig'}",
            "--leader-elect=false",
            "--secure-port=0",
            "--profiling=false",
        ]

    # ---- certificates and kubeconfigs

    def _make_pki(self) -> None:
        """A CA, the API server's serving certificate, three client certificates and the service-account key pair.

        EC P-256 keys, because RSA key generation alone would take longer than the rest of the setup.
        """
        d = self.dir
        sans = [f"IP:{self.address}", f"IP:{self.address6}", "IP:127.0.0.1", "IP:::1"]
        sans += [f"IP:{next(ipaddress.ip_network(cidr).hosts())}" for cidr in self.service_cidrs]
        sans += ["DNS:" + dns for dns in _kubernetes_names()] + ["DNS:localhost"]
        cnf = d / "openssl.cnf"
        cnf.write_text(_OPENSSL_CNF.format(sans=",".join(sans)))
        ec = ["-pkeyopt", "ec_paramgen_curve:prime256v1"]

        def req(extensions: str, subject: str, name: str, *signer: str) -> list[str]:
            """A key and a certificate in one openssl run (OpenSSL 3's `req -x509 -CA` signs with the CA)."""
            return [
                *("req", "-x509", "-config", str(cnf), "-extensions", extensions, "-subj", subject),
                *("-days", str(CERT_DAYS), "-newkey", "ec", *ec, "-nodes", *signer),
                *("-keyout", f"{d}/{name}.key", "-out", f"{d}/{name}.crt"),
            ]

        _openssl(*req("ca", "/CN=kpr-lab-ca", "ca"))
        ca = ("-CA", f"{d}/ca.crt", "-CAkey", f"{d}/ca.key")
        jobs = [req("server", "/CN=kube-apiserver", "apiserver", *ca)]
        jobs += [req("client", subject, client, *ca) for client, subject in _CLIENTS.items()]
        jobs.append(["genpkey", "-algorithm", "ec", *ec, "-out", f"{d}/sa.key"])
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            for future in [pool.submit(_openssl, *job) for job in jobs]:
                future.result()
        _openssl("pkey", "-in", f"{d}/sa.key", "-pubout", "-out", f"{d}/sa.pub")
        for key in d.glob("*.key"):
            key.chmod(0o600)

    def _write_kubeconfigs(self) -> None:
        d = self.dir
        for client in _CLIENTS:
            user = {"client-certificate": f"{d}/{client}.crt", "client-key": f"{d}/{client}.key"}
            _write_kubeconfig(
                d / f"{client}.kubeconfig", self.server, client, user, {"certificate-authority": f"{d}/ca.crt"}
            )

    # ---- processes

    def _log_path(self, component: str) -> Path:
        return self.dir / f"{component}.log"

    def _clean_env(self, **extra: str) -> list[str]:
        """`env -i …`: no proxy settings or kubeconfig of the host reach the components or kubectl."""
        path = os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        return ["env", "-i", f"PATH={path}", f"HOME={self.dir}", *(f"{k}={v}" for k, v in extra.items())]

    def _spawn(self, component: str, argv: list[str]) -> None:
        if self._closed:
            raise LabError(f"control plane {self.name} is closed")
        with open(self._log_path(component), "ab") as log:
            log.write(f"---- {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
            log.flush()
            self._procs[component] = self.lab.spawn(self.ns, [*self._clean_env(), *argv], stdout=log, stderr=log)

    def _check_alive(self) -> None:
        for component, proc in self._procs.items():
            if proc.poll() is not None:
                raise LabError(
                    f"{component} exited early with status {proc.returncode}; its log ends with:\n"
                    + _tail(self._log_path(component))
                )

    def _wait(self, deadline: float, what: str, ready: Any) -> None:
        """Poll ready() until it is true; LabError if a component exits or the deadline passes."""
        delay = 0.02
        while True:
            self._check_alive()
            if ready():
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"== {c}:\n{_tail(self._log_path(c), 1500)}" for c in self._procs)
                raise LabError(f"timed out waiting for {what}; logs:\n{logs}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.1)

    # ---- talking to etcd and the API server from inside the namespace

    def _netns_path(self) -> str:
        return str(NETNS_DIR / self.ns.netns)

    def _request(self, conn_factory: Any, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        def call() -> tuple[int, bytes]:
            conn = conn_factory()
            try:
                conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
                response = conn.getresponse()
                return response.status, response.read()
            finally:
                conn.close()

        return netns.run_in(self._netns_path(), call, name=f"kpr-{self.name}")

    def _api_get(self, path: str) -> int:
        """The HTTP status of GET path as cluster admin (0 if the API server does not answer)."""
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=str(self.dir / "ca.crt"))
            self._ssl.load_cert_chain(str(self.dir / "admin.crt"), str(self.dir / "admin.key"))
        context = self._ssl
        try:
            status, _ = self._request(
                lambda: http.client.HTTPSConnection(self.address, APISERVER_PORT, context=context, timeout=5),
                "GET",
                path,
            )
        except OSError:
            return 0
        return status

    def _etcd_call(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            status, body = self._request(
                lambda: http.client.HTTPConnection("127.0.0.1", 2379, timeout=30),
                "POST",
                path,
                json.dumps(payload).encode(),
            )
        except OSError as exc:
            raise LabError(f"etcd {path}: {exc}") from exc
        if status != 200:
            raise LabError(f"etcd {path} answered {status}: {body.decode(errors='replace')}")
        result: dict[str, Any] = json.loads(body)
        return result

    def _etcd_healthy(self) -> bool:
        try:
            status, body = self._request(
                lambda: http.client.HTTPConnection("127.0.0.1", 2379, timeout=2), "GET", "/health"
            )
        except OSError:
            return False
        return status == 200 and json.loads(body).get("health") == "true"

    def _apiserver_ready(self) -> bool:
        return self._api_get("/readyz") == 200

    def _cluster_usable(self) -> bool:
        return (
            self._api_get("/api/v1/namespaces/default/serviceaccounts/default") == 200
            and self._api_get("/api/v1/namespaces/default/services/kubernetes") == 200
        )


def _kubernetes_names() -> list[str]:
    return ["kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"]


def _write_kubeconfig(path: Path, server: str, user: str, credentials: dict[str, str], ca: dict[str, str]) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "lab", "cluster": {"server": server, **ca}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": user, "context": {"cluster": "lab", "user": user}}],
        "current-context": user,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.chmod(0o600)
    os.replace(tmp, path)


def _stop(*procs: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM each process group, SIGKILL what is left after `grace` seconds, reap them all."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + wait
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
