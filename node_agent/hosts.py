"""A control-plane node reaches its OWN API server by the cluster's endpoint name (invariant 9).

``controlPlaneEndpoint`` is the internal NLB's DNS name: admin.conf, kubelet.conf and every kubeadm/kubectl
call the agent makes on a control-plane node name it. Through the NLB such a node fails in two ways:

* before its launch hook completes it is not a target at all (an Auto Scaling group registers an instance
  with its target groups only when the hook completes), so ``kubeadm init`` on the first node meets an NLB
  with no healthy target: upload-config times out, the launch abandons and the group loops;
* once registered, about 1/N of its connections come back to itself, and an internal NLB with client IP
  preservation drops those (ELB, "Troubleshoot your Network Load Balancer": a target's requests to its load
  balancer time out when routed to itself). Turning preservation off fixes only the second.

So the node maps the endpoint name to its own private IP in the hosts file, in one managed block
(:func:`map_endpoint`). This is kubeadm's own HA guidance for a controlPlaneEndpoint name ("Creating a cluster
with kubeadm", "Considerations about apiserver-advertise-address and ControlPlaneEndpoint": map the name to
the node's address in /etc/hosts, point it at the load balancer later) and the reason kubeadm itself moved the
control plane's own clients to the local API server (KEP-4471, ``ControlPlaneKubeletLocalMode``: the joining
control plane's kubelet talks to the local API server, kubernetes/enhancements#4471; ``wait-control-plane``
polls ``https://<advertiseAddress>:<bindPort>``). The initialiser maps it
before ``kubeadm init``/restore; a joiner maps it right after ``kubeadm join``, because during the join its
discovery and etcd member add must reach the EXISTING members through the NLB (:func:`unmap_endpoint` first,
so a retried join never discovers itself). Workers never map it: they have no local API server.

Why not the alternatives: per-command ``--server`` flags miss everything the agent does not run itself
(kube-proxy's and the kubelet's kubeconfigs, ``kubeadm certs renew`` and ``kubeadm upgrade node``, which
read kubeadm-config through admin.conf), and kubeadm's ``ControlPlaneKubeletLocalMode`` covers only the
kubelet's kubeconfig on joins. One hosts line covers every client on the node. TLS holds: the API server's
certificate carries the endpoint name (``certSANs`` in :func:`node_agent.kubeadm.cluster_configuration`;
kubeadm adds the controlPlaneEndpoint host itself too), whichever node's API server answers to it.

The block is the only thing written: other lines are kept byte for byte, the write is atomic (a temporary
file in the same directory, fsync, rename) and keeps the file's mode, and a second call with the same mapping
changes nothing. :func:`resolve` is the files-backend lookup (first matching line in file order, as glibc
does), used by the tests' kubeadm emulator to send a call where the node's resolver would.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from pathlib import Path

BEGIN = "# BEGIN dedicated-k8s: control-plane endpoint -> this node's API server (node_agent.hosts)"
END = "# END dedicated-k8s"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_NAME = re.compile(rf"^(?=.{{1,253}}$)({_LABEL}\.)*{_LABEL}$")


class HostsFileError(ValueError):
    """The hosts file or a mapping for it is invalid; the message names the bad input."""


def _validate(name: str, ip: str) -> None:
    if not _NAME.match(name):
        raise HostsFileError(f"endpoint name {name!r}: must be a DNS name")
    try:
        ipaddress.ip_address(ip)
    except ValueError as err:
        raise HostsFileError(f"address {ip!r} for {name}: must be an IP address") from err


def _without_block(lines: list[str], path: Path) -> list[str]:
    begins = [i for i, line in enumerate(lines) if line.rstrip("\n") == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.rstrip("\n") == END]
    if not begins and not ends:
        return lines
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise HostsFileError(f"{path}: the dedicated-k8s block markers are damaged (begin {begins}, end {ends}); "
                             "fix the file by hand, nothing was changed")  # fmt: skip
    return lines[: begins[0]] + lines[ends[0] + 1 :]


def _read(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return []


def _write_atomically(path: Path, lines: list[str]) -> None:
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def map_endpoint(path: Path, name: str, ip: str) -> bool:
    """``name`` -> ``ip`` in the managed block (replacing an earlier block); False if it already said so."""
    _validate(name, ip)
    lines = _read(path)
    kept = _without_block(lines, path)
    if kept and not kept[-1].endswith("\n"):
        kept[-1] += "\n"
    wanted = [*kept, BEGIN + "\n", f"{ip} {name}\n", END + "\n"]
    if wanted == lines:
        return False
    _write_atomically(path, wanted)
    return True


def unmap_endpoint(path: Path) -> bool:
    """Remove the managed block (the name resolves through DNS again); False if there was none."""
    lines = _read(path)
    kept = _without_block(lines, path)
    if kept == lines:
        return False
    _write_atomically(path, kept)
    return True


def mapped_address(path: Path) -> str | None:
    """The address the managed block maps the endpoint to, or None without a block."""
    lines = _read(path)
    if BEGIN + "\n" not in lines:
        return None
    start = lines.index(BEGIN + "\n") + 1
    line = lines[start] if start < len(lines) else ""
    return None if line.startswith("#") or not line.split() else line.split()[0]


def resolve(path: Path, name: str) -> str | None:
    """The hosts-file answer for ``name``: the first line (file order) that lists it, or None (DNS decides)."""
    wanted = name.lower()
    for line in _read(path):
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and wanted in (f.lower() for f in fields[1:]):
            return fields[0]
    return None
