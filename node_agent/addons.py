"""Cluster add-ons the initialiser applies once after ``kubeadm init``, from images pre-pulled into the AMI.

What is applied (one file per add-on, ``kubectl apply --server-side --force-conflicts -f <dir>``):

* ``10-calico.yaml``: Calico in manifest mode (Kubernetes datastore) with Typha, VXLAN encapsulation (the
  security groups open UDP 4789 and TCP 5473 between nodes, no BGP), the IPv4 pool = the agent's ``podCidr``
  (calico-node creates it from ``CALICO_IPV4POOL_CIDR`` on first start). Reduced from upstream's
  ``calico-typha.yaml``: the same objects, but the CustomResourceDefinitions carry an open schema
  (``x-kubernetes-preserve-unknown-fields``) instead of upstream's full OpenAPI validation (some 15,000 lines
  of generated schema). Calico stores and reads its resources the same way; what is lost is server-side
  validation of hand-written Calico objects (``calicoctl`` still validates). Left out: the calico-apiserver,
  the Windows variants, and the IPIP/BGP settings we do not use.
* ``20-aws-cloud-controller-manager.yaml``: cloud-provider-aws as a DaemonSet on control-plane nodes,
  ``hostNetwork`` (it runs before the CNI and uses the node's instance role through IMDS, hop limit 1),
  ``--cloud-provider=aws``, ``--cluster-name``, ``--configure-cloud-routes=false`` (Calico encapsulates), one
  service account for all its controllers (``--use-service-account-credentials=false``: upstream's superset-role
  overlay).
  It initialises nodes (provider IDs, addresses, zone labels, removes the ``uninitialized`` taint), deletes
  the Node objects of terminated instances (node lifecycle) and places Service load balancers.
* ``30-aws-node-termination-handler.yaml``: NTH in queue mode (SQS), a 2-replica Deployment on control-plane
  nodes with ``hostNetwork: true`` so it uses the control-plane instance role through IMDS (the launch
  templates' hop limit 1 blocks pods on the pod network).
* ``40-kubelet-csr-approver.yaml``: postfinance/kubelet-csr-approver approves kubelet *serving* certificates
  (the kubelet configuration sets ``serverTLSBootstrap``): RBAC lets it approve only for the
  ``kubernetes.io/kubelet-serving`` signer (the only signer it handles), ``PROVIDER_REGEX`` accepts only
  this region's EC2 resource-name node names, IP SANs must lie in the VPC CIDR, and DNS resolution is
  bypassed (the resource names resolve only inside the VPC, the approver's pod cannot rely on it).
* ``50-lifecycle-drainer-rbac.yaml``: the ClusterRole and ClusterRoleBinding of the lifecycle Lambda's drain
  identity, user ``dedicated-k8s:lifecycle-drainer`` (its client certificate is issued by the initialiser and
  stored in Secrets Manager): nodes get/list/patch/delete, pods list, pods/eviction create, daemonsets get.

With IRSA on, the initialiser adds ``60-pod-identity-webhook.yaml`` (:mod:`node_agent.pod_identity_webhook`: its serving
certificate is issued from the cluster CA when it is applied).

CoreDNS and kube-proxy are kubeadm's own add-ons (``kubeadm init`` installs them from the pre-pulled
images); they are not duplicated here.

**Who handles which termination** (two paths, never both for one event):

* ASG terminate lifecycle hooks (scale-in, instance refresh, replacement, a node the group terminates) go to
  the etcd lifecycle Lambda, which drains the node (and, for a control-plane node, removes its etcd member
  only after the drain) before it completes the hook. The termination handler's queue never receives an
  ASG lifecycle event (``stages/termination_handler.py`` has no such rule), so NTH never races the Lambda.
* Everything else EC2 announces goes to NTH through its queue: Spot interruption warnings, rebalance
  recommendations, instance state changes (a stop or terminate outside the group's hook), and AWS Health
  scheduled changes (retirement, maintenance). NTH cordons and drains the node it finds by provider ID;
  a message for an instance that is not a node of this cluster is deleted.

The images come from ``versions.json`` (the AMI bundle carries a copy beside this module, the build
pre-pulls exactly these into containerd), every container uses ``imagePullPolicy: IfNotPresent``: nothing
is ever pulled on a cluster node.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node_agent.config import AgentConfig
from node_agent.errors import AgentError
from node_agent.yamlgen import dump_documents

HERE = Path(__file__).resolve().parent
# In the AMI bundle: lib/node_agent/versions.json (imagebuilder/bundle.py); in the repository: imagebuilder/.
VERSIONS_CANDIDATES = (HERE / "versions.json", HERE.parent / "imagebuilder" / "versions.json")
NAMESPACE = "kube-system"
PULL_POLICY = "IfNotPresent"
KUBELET_SERVING_SIGNER = "kubernetes.io/kubelet-serving"
DRAINER_USER = "dedicated-k8s:lifecycle-drainer"
DRAINER_ROLE = "dedicated-k8s:lifecycle-drainer"
CONTROL_PLANE_LABEL = "node-role.kubernetes.io/control-plane"
LABELS = {"app.kubernetes.io/part-of": "dedicated-k8s", "app.kubernetes.io/managed-by": "dedicated-k8s-agent"}
ADDON_FILES = (
    "10-calico.yaml",
    "20-aws-cloud-controller-manager.yaml",
    "30-aws-node-termination-handler.yaml",
    "40-kubelet-csr-approver.yaml",
    "50-lifecycle-drainer-rbac.yaml",
)
CONTROL_PLANE_TOLERATIONS = [
    {"key": CONTROL_PLANE_LABEL, "operator": "Exists", "effect": "NoSchedule"},
    {"key": "CriticalAddonsOnly", "operator": "Exists"},
]
UNINITIALIZED_TOLERATION = {
    "key": "node.cloudprovider.kubernetes.io/uninitialized",
    "value": "true",
    "effect": "NoSchedule",
}
NOT_READY_TOLERATION = {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoSchedule"}


# ---- images ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddonImages:
    calico_cni: str
    calico_node: str
    calico_kube_controllers: str
    calico_typha: str
    cloud_controller_manager: str
    node_termination_handler: str
    kubelet_csr_approver: str
    cluster_autoscaler: str

    @classmethod
    def from_versions(cls, raw: Mapping[str, Any]) -> AddonImages:
        images = raw.get("images")
        if not isinstance(images, dict):
            raise AgentError("versions.json: 'images' is missing")
        cni = images.get("cni") or []

        def calico(name: str) -> str:
            found = [i for i in cni if isinstance(i, str) and i.rsplit(":", 1)[0].endswith(f"/calico/{name}")]
            if len(found) != 1:
                raise AgentError(f"versions.json: images.cni must name exactly one calico/{name} image")
            return found[0]

        def single(key: str) -> str:
            value = images.get(key)
            if not isinstance(value, str) or ":" not in value:
                raise AgentError(f"versions.json: images.{key} is missing")
            return value

        return cls(
            calico_cni=calico("cni"),
            calico_node=calico("node"),
            calico_kube_controllers=calico("kube-controllers"),
            calico_typha=calico("typha"),
            cloud_controller_manager=single("cloudControllerManager"),
            node_termination_handler=single("nodeTerminationHandler"),
            kubelet_csr_approver=single("kubeletCsrApprover"),
            cluster_autoscaler=single("clusterAutoscaler"),
        )

    def all(self) -> tuple[str, ...]:
        return tuple(getattr(self, name) for name in self.__dataclass_fields__)


def versions_file() -> Path:
    for candidate in VERSIONS_CANDIDATES:
        if candidate.is_file():
            return candidate
    raise AgentError(f"versions.json not found (looked in {', '.join(str(c) for c in VERSIONS_CANDIDATES)})")


def load_addon_images(path: Path | None = None) -> AddonImages:
    path = path or versions_file()
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AgentError(f"{path}: {err}") from err
    return AddonImages.from_versions(raw)


# ---- shared shapes --------------------------------------------------------------------------------------


def node_name_regex(region: str) -> str:
    """Our node names (:attr:`InstanceIdentity.node_name`): the EC2 resource name of an instance in ``region``."""
    suffix = r"\.ec2\.internal" if region == "us-east-1" else rf"\.{re.escape(region)}\.compute\.internal"
    return rf"^i-([0-9a-f]{{8}}|[0-9a-f]{{17}}){suffix}$"


def _meta(name: str, namespace: str | None = NAMESPACE, **labels: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = {**LABELS, **labels}
    return meta


def _rule(groups: list[str], resources: list[str], verbs: list[str], names: list[str] | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"apiGroups": groups, "resources": resources}
    if names:
        rule["resourceNames"] = names
    rule["verbs"] = verbs
    return rule


def _service_account(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name)}


def _cluster_role(name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": _meta(name, None),
        "rules": rules,
    }


def _binding(
    name: str, role: str, subject: dict[str, Any], *, namespace: str | None = None, role_kind: str = "ClusterRole"
) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding" if namespace else "ClusterRoleBinding",
        "metadata": _meta(name, namespace),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
        "subjects": [subject],
    }


def _sa_subject(name: str) -> dict[str, Any]:
    return {"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}


def _container(name: str, image: str, **spec: Any) -> dict[str, Any]:
    return {"name": name, "image": image, "imagePullPolicy": PULL_POLICY, **spec}


def _env(**values: str) -> list[dict[str, Any]]:
    return [{"name": k, "value": v} for k, v in values.items()]


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _config_env(name: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"configMapKeyRef": {"name": "calico-config", "key": key}}}


def _host_path(name: str, path: str, kind: str | None = None) -> dict[str, Any]:
    host: dict[str, Any] = {"path": path}
    if kind:
        host["type"] = kind
    return {"name": name, "hostPath": host}


def _mount(name: str, path: str, *, read_only: bool = False, **extra: Any) -> dict[str, Any]:
    mount: dict[str, Any] = {"name": name, "mountPath": path}
    if read_only:
        mount["readOnly"] = True
    return {**mount, **extra}


# ---- Calico -----------------------------------------------------------------------------------------------

# (plural, kind, namespaced) of every crd.projectcalico.org/v1 resource Calico 3.30 reads in manifest mode.
CALICO_CRDS = (
    ("bgpconfigurations", "BGPConfiguration", False),
    ("bgpfilters", "BGPFilter", False),
    ("bgppeers", "BGPPeer", False),
    ("blockaffinities", "BlockAffinity", False),
    ("caliconodestatuses", "CalicoNodeStatus", False),
    ("clusterinformations", "ClusterInformation", False),
    ("felixconfigurations", "FelixConfiguration", False),
    ("globalnetworkpolicies", "GlobalNetworkPolicy", False),
    ("globalnetworksets", "GlobalNetworkSet", False),
    ("hostendpoints", "HostEndpoint", False),
    ("ipamblocks", "IPAMBlock", False),
    ("ipamconfigs", "IPAMConfig", False),
    ("ipamhandles", "IPAMHandle", False),
    ("ippools", "IPPool", False),
    ("ipreservations", "IPReservation", False),
    ("kubecontrollersconfigurations", "KubeControllersConfiguration", False),
    ("networkpolicies", "NetworkPolicy", True),
    ("networksets", "NetworkSet", True),
    ("stagedglobalnetworkpolicies", "StagedGlobalNetworkPolicy", False),
    ("stagedkubernetesnetworkpolicies", "StagedKubernetesNetworkPolicy", True),
    ("stagednetworkpolicies", "StagedNetworkPolicy", True),
    ("tiers", "Tier", False),
)
# sigs.k8s.io/network-policy-api v1alpha1, watched by Felix since Calico 3.28.
ANP_CRDS = (
    ("adminnetworkpolicies", "AdminNetworkPolicy", "anp"),
    ("baselineadminnetworkpolicies", "BaselineAdminNetworkPolicy", "banp"),
)
CALICO_CNI_CONFIG = {
    "name": "k8s-pod-network",
    "cniVersion": "0.3.1",
    "plugins": [
        {
            "type": "calico",
            "log_level": "info",
            "log_file_path": "/var/log/calico/cni/cni.log",
            "datastore_type": "kubernetes",
            "nodename": "__KUBERNETES_NODE_NAME__",
            "mtu": "__CNI_MTU__",
            "ipam": {"type": "calico-ipam"},
            "policy": {"type": "k8s"},
            "kubernetes": {"kubeconfig": "__KUBECONFIG_FILEPATH__"},
        },
        {"type": "portmap", "snat": True, "capabilities": {"portMappings": True}},
        {"type": "bandwidth", "capabilities": {"bandwidth": True}},
    ],
}


def _open_crd(
    group: str,
    version: str,
    plural: str,
    kind: str,
    *,
    namespaced: bool,
    short_names: tuple[str, ...] = (),
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    names: dict[str, Any] = {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower()}
    if short_names:
        names["shortNames"] = list(short_names)
    metadata = _meta(f"{plural}.{group}", None)
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": metadata,
        "spec": {
            "group": group,
            "names": names,
            "scope": "Namespaced" if namespaced else "Cluster",
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                    **({"subresources": {"status": {}}} if group != "crd.projectcalico.org" else {}),
                }
            ],
        },
    }


def calico_crds() -> list[dict[str, Any]]:
    docs = [_open_crd("crd.projectcalico.org", "v1", p, k, namespaced=ns) for p, k, ns in CALICO_CRDS]
    # Kubernetes accepts a CRD in a *.k8s.io group only with this annotation; "unapproved" is the documented
    # value for an API that has not been through Kubernetes API review (upstream links the KEP's PR instead).
    approval = {"api-approved.kubernetes.io": "unapproved, sigs.k8s.io/network-policy-api v1alpha1"}
    docs += [
        _open_crd(
            "policy.networking.k8s.io", "v1alpha1", p, k, namespaced=False, short_names=(s,), annotations=approval
        )
        for p, k, s in ANP_CRDS
    ]
    return docs


def _calico_rbac() -> list[dict[str, Any]]:
    crd = ["crd.projectcalico.org"]
    node_rules = [
        _rule([""], ["pods", "nodes", "namespaces"], ["get"]),
        _rule(["discovery.k8s.io"], ["endpointslices"], ["watch", "list"]),
        _rule([""], ["endpoints", "services"], ["watch", "list", "get"]),
        _rule([""], ["configmaps"], ["get"]),
        _rule([""], ["nodes/status"], ["patch", "update"]),
        _rule(["networking.k8s.io"], ["networkpolicies"], ["watch", "list"]),
        _rule(
            ["policy.networking.k8s.io"], ["adminnetworkpolicies", "baselineadminnetworkpolicies"], ["watch", "list"]
        ),
        _rule([""], ["pods", "namespaces", "serviceaccounts"], ["list", "watch"]),
        _rule([""], ["pods/status"], ["patch"]),
        _rule(crd, [p for p, _, _ in CALICO_CRDS], ["get", "list", "watch"]),
        _rule(crd, ["ippools", "felixconfigurations", "clusterinformations", "tiers"], ["create", "update"]),
        _rule(crd, ["caliconodestatuses"], ["update"]),
        _rule([""], ["nodes"], ["get", "list", "watch"]),
        _rule(crd, ["bgpconfigurations", "bgppeers"], ["create", "update"]),
        _rule(crd, ["blockaffinities", "ipamblocks", "ipamhandles"], ["get", "list", "create", "update", "delete"]),
        _rule(crd, ["ipamconfigs"], ["get", "create"]),
        _rule(crd, ["blockaffinities"], ["watch"]),
        _rule(["apps"], ["daemonsets"], ["get"]),
        # calico-node writes the CNI plugin's kubeconfig with a token of the plugin's own service account.
        _rule([""], ["serviceaccounts/token"], ["create"], ["calico-cni-plugin"]),
    ]
    cni_rules = [
        _rule([""], ["pods", "nodes", "namespaces"], ["get"]),
        _rule([""], ["pods/status"], ["patch"]),
        _rule(
            crd,
            [
                "blockaffinities",
                "ipamblocks",
                "ipamhandles",
                "clusterinformations",
                "ippools",
                "ipreservations",
                "ipamconfigs",
            ],
            ["get", "list", "create", "update", "delete"],
        ),
    ]
    controllers_rules = [
        _rule([""], ["nodes"], ["watch", "list", "get"]),
        _rule([""], ["pods"], ["get", "list", "watch"]),
        _rule([""], ["services"], ["get", "list", "watch"]),
        _rule(["discovery.k8s.io"], ["endpointslices"], ["watch", "list"]),
        _rule(crd, ["ipreservations"], ["list"]),
        _rule(
            crd,
            ["blockaffinities", "ipamblocks", "ipamhandles"],
            ["get", "list", "create", "update", "delete", "watch"],
        ),
        _rule(crd, ["ippools"], ["list", "watch"]),
        _rule(crd, ["hostendpoints"], ["get", "list", "create", "update", "delete"]),
        _rule(crd, ["clusterinformations"], ["get", "list", "create", "update"]),
        _rule(crd, ["kubecontrollersconfigurations"], ["get", "create", "list", "update", "watch"]),
        _rule(crd, ["tiers"], ["get", "list", "watch", "create"]),
    ]
    docs: list[dict[str, Any]] = []
    for name, rules in (
        ("calico-node", node_rules),
        ("calico-cni-plugin", cni_rules),
        ("calico-kube-controllers", controllers_rules),
    ):
        docs += [_service_account(name), _cluster_role(name, rules), _binding(name, name, _sa_subject(name))]
    return docs


def _calico_node(images: AddonImages, cfg: AgentConfig) -> dict[str, Any]:
    privileged = {"privileged": True}
    common_env = [_field_env("KUBERNETES_NODE_NAME", "spec.nodeName")]
    services_endpoint = [{"configMapRef": {"name": "kubernetes-services-endpoint", "optional": True}}]
    init_containers = [
        _container(
            "upgrade-ipam",
            images.calico_cni,
            command=["/opt/cni/bin/calico-ipam", "-upgrade"],
            envFrom=services_endpoint,
            env=[*common_env, _config_env("CALICO_NETWORKING_BACKEND", "calico_backend")],
            volumeMounts=[
                _mount("host-local-net-dir", "/var/lib/cni/networks"),
                _mount("cni-bin-dir", "/host/opt/cni/bin"),
            ],
            securityContext=privileged,
        ),
        _container(
            "install-cni",
            images.calico_cni,
            command=["/opt/cni/bin/install"],
            envFrom=services_endpoint,
            env=[
                _env(CNI_CONF_NAME="10-calico.conflist")[0],
                _config_env("CNI_NETWORK_CONFIG", "cni_network_config"),
                *common_env,
                _config_env("CNI_MTU", "veth_mtu"),
                *_env(SLEEP="false"),
            ],
            volumeMounts=[_mount("cni-bin-dir", "/host/opt/cni/bin"), _mount("cni-net-dir", "/host/etc/cni/net.d")],
            securityContext=privileged,
        ),
        _container(
            "mount-bpffs",
            images.calico_node,
            command=["calico-node", "-init", "-best-effort"],
            volumeMounts=[
                _mount("sys-fs", "/sys/fs", mountPropagation="Bidirectional"),
                _mount("bpffs", "/sys/fs/bpf", mountPropagation="Bidirectional"),
                _mount("nodeproc", "/nodeproc", read_only=True),
            ],
            securityContext=privileged,
        ),
    ]
    env = [
        *_env(DATASTORE_TYPE="kubernetes"),
        _config_env("FELIX_TYPHAK8SSERVICENAME", "typha_service_name"),
        *_env(WAIT_FOR_DATASTORE="true"),
        _field_env("NODENAME", "spec.nodeName"),
        _config_env("CALICO_NETWORKING_BACKEND", "calico_backend"),
        *_env(
            CLUSTER_TYPE="k8s",
            IP="autodetect",
            IP_AUTODETECTION_METHOD=f"cidr={cfg.vpc_cidr}",
            CALICO_IPV4POOL_CIDR=cfg.pod_cidr,
            CALICO_IPV4POOL_IPIP="Never",
            CALICO_IPV4POOL_VXLAN="Always",
            CALICO_IPV4POOL_NAT_OUTGOING="true",
            CALICO_IPV6POOL_VXLAN="Never",
        ),
        _config_env("FELIX_VXLANMTU", "veth_mtu"),
        _config_env("FELIX_WIREGUARDMTU", "veth_mtu"),
        *_env(
            CALICO_DISABLE_FILE_LOGGING="true",
            FELIX_DEFAULTENDPOINTTOHOSTACTION="ACCEPT",
            FELIX_IPV6SUPPORT="false",
            FELIX_HEALTHENABLED="true",
        ),
    ]
    container = _container(
        "calico-node",
        images.calico_node,
        envFrom=services_endpoint,
        env=env,
        securityContext=privileged,
        resources={"requests": {"cpu": "250m"}},
        lifecycle={"preStop": {"exec": {"command": ["/bin/calico-node", "-shutdown"]}}},
        livenessProbe={
            "exec": {"command": ["/bin/calico-node", "-felix-live"]},
            "periodSeconds": 10,
            "initialDelaySeconds": 10,
            "failureThreshold": 6,
            "timeoutSeconds": 10,
        },
        readinessProbe={
            "exec": {"command": ["/bin/calico-node", "-felix-ready"]},
            "periodSeconds": 10,
            "timeoutSeconds": 10,
        },
        volumeMounts=[
            _mount("cni-net-dir", "/host/etc/cni/net.d"),
            _mount("lib-modules", "/lib/modules", read_only=True),
            _mount("xtables-lock", "/run/xtables.lock"),
            _mount("var-run-calico", "/var/run/calico"),
            _mount("var-lib-calico", "/var/lib/calico"),
            _mount("policysync", "/var/run/nodeagent"),
            _mount("bpffs", "/sys/fs/bpf"),
            _mount("cni-log-dir", "/var/log/calico/cni", read_only=True),
        ],
    )
    volumes = [
        _host_path("lib-modules", "/lib/modules"),
        _host_path("var-run-calico", "/var/run/calico", "DirectoryOrCreate"),
        _host_path("var-lib-calico", "/var/lib/calico", "DirectoryOrCreate"),
        _host_path("xtables-lock", "/run/xtables.lock", "FileOrCreate"),
        _host_path("sys-fs", "/sys/fs/", "DirectoryOrCreate"),
        _host_path("bpffs", "/sys/fs/bpf", "Directory"),
        _host_path("nodeproc", "/proc"),
        _host_path("cni-bin-dir", "/opt/cni/bin", "DirectoryOrCreate"),
        _host_path("cni-net-dir", "/etc/cni/net.d"),
        _host_path("cni-log-dir", "/var/log/calico/cni"),
        _host_path("host-local-net-dir", "/var/lib/cni/networks"),
        _host_path("policysync", "/var/run/nodeagent", "DirectoryOrCreate"),
    ]
    labels = {"k8s-app": "calico-node"}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta("calico-node", **labels),
        "spec": {
            "selector": {"matchLabels": labels},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "hostNetwork": True,
                    # Every node, whatever its taints (the CNI is what makes a node Ready).
                    "tolerations": [
                        {"effect": "NoSchedule", "operator": "Exists"},
                        {"key": "CriticalAddonsOnly", "operator": "Exists"},
                        {"effect": "NoExecute", "operator": "Exists"},
                    ],
                    "serviceAccountName": "calico-node",
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "terminationGracePeriodSeconds": 0,
                    "priorityClassName": "system-node-critical",
                    "initContainers": init_containers,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def _typha(images: AddonImages) -> list[dict[str, Any]]:
    labels = {"k8s-app": "calico-typha"}
    container = _container(
        "calico-typha",
        images.calico_typha,
        ports=[{"containerPort": 5473, "name": "calico-typha", "protocol": "TCP"}],
        envFrom=[{"configMapRef": {"name": "kubernetes-services-endpoint", "optional": True}}],
        env=_env(
            TYPHA_LOGSEVERITYSCREEN="info",
            TYPHA_LOGFILEPATH="none",
            TYPHA_LOGSEVERITYSYS="none",
            TYPHA_CONNECTIONREBALANCINGMODE="kubernetes",
            TYPHA_DATASTORETYPE="kubernetes",
            TYPHA_HEALTHENABLED="true",
            TYPHA_SHUTDOWNTIMEOUTSECS="300",
        ),
        livenessProbe={
            "httpGet": {"path": "/liveness", "port": 9098, "host": "localhost"},
            "periodSeconds": 30,
            "initialDelaySeconds": 30,
            "timeoutSeconds": 10,
        },
        readinessProbe={
            "httpGet": {"path": "/readiness", "port": 9098, "host": "localhost"},
            "periodSeconds": 10,
            "timeoutSeconds": 10,
        },
        securityContext={
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    )
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta("calico-typha", **labels),
            "spec": {
                "ports": [{"port": 5473, "protocol": "TCP", "targetPort": "calico-typha", "name": "calico-typha"}],
                "selector": labels,
            },
        },
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _meta("calico-typha", **labels),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta("calico-typha", **labels),
            "spec": {
                "replicas": 2,
                "revisionHistoryLimit": 2,
                "selector": {"matchLabels": labels},
                "strategy": {"rollingUpdate": {"maxSurge": "100%", "maxUnavailable": 1}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "nodeSelector": {"kubernetes.io/os": "linux"},
                        "hostNetwork": True,
                        "tolerations": [
                            {"key": "CriticalAddonsOnly", "operator": "Exists"},
                            {"effect": "NoSchedule", "operator": "Exists"},
                        ],
                        "affinity": _spread(labels),
                        "serviceAccountName": "calico-node",
                        "priorityClassName": "system-cluster-critical",
                        "securityContext": {"fsGroup": 65534},
                        "containers": [container],
                    },
                },
            },
        },
    ]


def _kube_controllers(images: AddonImages) -> dict[str, Any]:
    labels = {"k8s-app": "calico-kube-controllers"}
    container = _container(
        "calico-kube-controllers",
        images.calico_kube_controllers,
        env=_env(ENABLED_CONTROLLERS="node,loadbalancer", DATASTORE_TYPE="kubernetes"),
        livenessProbe={
            "exec": {"command": ["/usr/bin/check-status", "-l"]},
            "periodSeconds": 10,
            "initialDelaySeconds": 10,
            "failureThreshold": 6,
            "timeoutSeconds": 10,
        },
        readinessProbe={"exec": {"command": ["/usr/bin/check-status", "-r"]}, "periodSeconds": 10},
        securityContext={
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta("calico-kube-controllers", **labels),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "Recreate"},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "tolerations": [*CONTROL_PLANE_TOLERATIONS],
                    "serviceAccountName": "calico-kube-controllers",
                    "priorityClassName": "system-cluster-critical",
                    "containers": [container],
                },
            },
        },
    }


def calico(images: AddonImages, cfg: AgentConfig) -> list[dict[str, Any]]:
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta("calico-config"),
        "data": {
            "typha_service_name": "calico-typha",
            "calico_backend": "vxlan",  # no BGP: VXLAN between nodes (UDP 4789 in the security groups)
            "veth_mtu": "0",  # 0 = Calico detects the MTU (9001 on EC2, minus the VXLAN overhead)
            "cni_network_config": json.dumps(CALICO_CNI_CONFIG, indent=2).replace('"__CNI_MTU__"', "__CNI_MTU__"),
        },
    }
    return [
        *calico_crds(),
        config_map,
        *_calico_rbac(),
        *_typha(images),
        _calico_node(images, cfg),
        _kube_controllers(images),
    ]


def _spread(labels: Mapping[str, str]) -> dict[str, Any]:
    """One replica per node (hostNetwork pods would otherwise share ports)."""
    return {
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": dict(labels)}, "topologyKey": "kubernetes.io/hostname"}
            ]
        }
    }


def _control_plane_only() -> dict[str, Any]:
    return {"nodeSelector": {CONTROL_PLANE_LABEL: "", "kubernetes.io/os": "linux"}}


def _control_plane_deployment(
    name: str, labels: Mapping[str, str], replicas: int, container: dict[str, Any], **pod: Any
) -> dict[str, Any]:
    """A system-critical Deployment pinned to control-plane nodes (their taints tolerated); ``pod`` adds to the
    pod spec (affinity, host network, security context ...)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, **labels),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": dict(labels)},
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {
                    **_control_plane_only(),
                    "tolerations": [*CONTROL_PLANE_TOLERATIONS],
                    "serviceAccountName": name,
                    "priorityClassName": "system-cluster-critical",
                    **pod,
                    "containers": [container],
                },
            },
        },
    }


# ---- AWS cloud controller manager ------------------------------------------------------------------------


def cloud_controller_manager(images: AddonImages, cfg: AgentConfig) -> list[dict[str, Any]]:
    sa = "cloud-controller-manager"
    core = [""]
    rules = [
        _rule(core, ["events"], ["create", "patch", "update"]),
        _rule(core, ["nodes"], ["*"]),
        _rule(core, ["nodes/status"], ["patch"]),
        _rule(core, ["services"], ["list", "patch", "update", "watch"]),
        _rule(core, ["services/status"], ["list", "patch", "update", "watch"]),
        _rule(core, ["serviceaccounts"], ["create", "get", "list", "watch"]),
        _rule(core, ["persistentvolumes"], ["get", "list", "update", "watch"]),
        _rule(core, ["endpoints"], ["create", "get", "list", "watch", "update"]),
        _rule(["coordination.k8s.io"], ["leases"], ["create", "get", "list", "watch", "update"]),
        _rule(core, ["serviceaccounts/token"], ["create"]),
    ]
    labels = {"k8s-app": "aws-cloud-controller-manager"}
    container = _container(
        "aws-cloud-controller-manager",
        images.cloud_controller_manager,
        args=[
            "--v=2",
            "--cloud-provider=aws",
            # The cluster ID in the kubernetes.io/cluster/<name> tags the control-plane role's CCM statements
            # require (the instances carry it too; explicit, so load balancers are never tagged "kubernetes").
            f"--cluster-name={cfg.cluster_name}",
            "--use-service-account-credentials=false",
            "--configure-cloud-routes=false",
        ],
        resources={"requests": {"cpu": "200m"}},
    )
    daemonset = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta("aws-cloud-controller-manager", **labels),
        "spec": {
            "selector": {"matchLabels": labels},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    **_control_plane_only(),
                    "tolerations": [UNINITIALIZED_TOLERATION, NOT_READY_TOLERATION, *CONTROL_PLANE_TOLERATIONS],
                    "serviceAccountName": sa,
                    "priorityClassName": "system-node-critical",
                    "hostNetwork": True,
                    "dnsPolicy": "Default",
                    "containers": [container],
                },
            },
        },
    }
    return [
        _service_account(sa),
        _cluster_role("system:cloud-controller-manager", rules),
        _binding("system:cloud-controller-manager", "system:cloud-controller-manager", _sa_subject(sa)),
        _binding(
            "cloud-controller-manager:apiserver-authentication-reader",
            "extension-apiserver-authentication-reader",
            _sa_subject(sa),
            namespace=NAMESPACE,
            role_kind="Role",
        ),
        daemonset,
    ]


# ---- aws-node-termination-handler (queue mode) -----------------------------------------------------------


def node_termination_handler(images: AddonImages, cfg: AgentConfig) -> list[dict[str, Any]]:
    name = "aws-node-termination-handler"
    # The chart's ClusterRole (config/helm/aws-node-termination-handler/templates/clusterrole.yaml).
    rules = [
        _rule([""], ["nodes"], ["get", "list", "patch", "update"]),
        _rule([""], ["pods"], ["list", "get"]),
        _rule([""], ["pods/eviction"], ["create"]),
        _rule(["extensions"], ["daemonsets"], ["get"]),
        _rule(["apps"], ["daemonsets"], ["get"]),
        _rule([""], ["events"], ["create"]),
    ]
    labels = {"app.kubernetes.io/name": name, "k8s-app": name}
    env = [
        _field_env("NODE_NAME", "spec.nodeName"),
        _field_env("POD_NAME", "metadata.name"),
        _field_env("NAMESPACE", "metadata.namespace"),
        *_env(
            ENABLE_SQS_TERMINATION_DRAINING="true",
            QUEUE_URL=cfg.termination_handler_queue_url,
            AWS_REGION=cfg.region,
            USE_PROVIDER_ID="true",
            DELETE_SQS_MSG_IF_NODE_NOT_FOUND="true",
            # Membership is decided by the provider ID (a node of this cluster) and every rule of this
            # cluster's queue: no extra ASG tag is required (NTH would otherwise skip untagged groups).
            CHECK_TAG_BEFORE_DRAINING="false",
            # IMDS-mode monitors are off in queue mode (as the chart's Deployment sets them).
            ENABLE_SPOT_INTERRUPTION_DRAINING="false",
            ENABLE_SCHEDULED_EVENT_DRAINING="false",
            ENABLE_REBALANCE_MONITORING="false",
            ENABLE_REBALANCE_DRAINING="false",
            DELETE_LOCAL_DATA="true",
            IGNORE_DAEMON_SETS="true",
            POD_TERMINATION_GRACE_PERIOD="-1",
            NODE_TERMINATION_GRACE_PERIOD="120",
            TAINT_NODE="true",
            JSON_LOGGING="true",
            EMIT_KUBERNETES_EVENTS="true",
            ENABLE_PROMETHEUS_SERVER="false",
            ENABLE_PROBES_SERVER="true",
            PROBES_SERVER_PORT="8080",
            PROBES_SERVER_ENDPOINT="/healthz",
            WORKERS="10",
        ),
    ]
    container = _container(
        name,
        images.node_termination_handler,
        env=env,
        ports=[{"containerPort": 8080, "name": "liveness-probe", "protocol": "TCP"}],
        livenessProbe={"httpGet": {"path": "/healthz", "port": 8080}, "initialDelaySeconds": 5, "periodSeconds": 5},
        resources={"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
        securityContext={
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "allowPrivilegeEscalation": False,
        },
    )
    deployment = _control_plane_deployment(
        name,
        labels,
        2,
        container,
        affinity=_spread(labels),
        # The control-plane instance role through IMDS (hop limit 1): only host-network pods reach it.
        hostNetwork=True,
        dnsPolicy="Default",  # the VPC resolver: sqs.<region>.amazonaws.com -> the VPC endpoint
    )
    return [_service_account(name), _cluster_role(name, rules), _binding(name, name, _sa_subject(name)), deployment]


# ---- kubelet-csr-approver ---------------------------------------------------------------------------------


def kubelet_csr_approver(images: AddonImages, cfg: AgentConfig) -> list[dict[str, Any]]:
    name = "kubelet-csr-approver"
    rules = [
        _rule(["certificates.k8s.io"], ["certificatesigningrequests"], ["get", "list", "watch"]),
        _rule(["certificates.k8s.io"], ["certificatesigningrequests/approval"], ["update"]),
        # The only signer it may approve for (and the only one it handles).
        _rule(["certificates.k8s.io"], ["signers"], ["approve"], [KUBELET_SERVING_SIGNER]),
    ]
    labels = {"app.kubernetes.io/name": name}
    container = _container(
        name,
        images.kubelet_csr_approver,
        args=["-metrics-bind-address", ":8080", "-health-probe-bind-address", ":8081"],
        env=_env(
            PROVIDER_REGEX=node_name_regex(cfg.region), PROVIDER_IP_PREFIXES=cfg.vpc_cidr, BYPASS_DNS_RESOLUTION="true"
        ),
        livenessProbe={"httpGet": {"path": "/healthz", "port": 8081}},
        resources={"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
        securityContext={
            "runAsUser": 65532,
            "runAsNonRoot": True,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    )
    deployment = _control_plane_deployment(
        name,
        labels,
        1,
        container,
    )
    return [_service_account(name), _cluster_role(name, rules), _binding(name, name, _sa_subject(name)), deployment]


# ---- the lifecycle drainer's RBAC ---------------------------------------------------------------------------


def drainer_rbac() -> list[dict[str, Any]]:
    """What the lifecycle Lambda's drain needs, and nothing more (cordon = patch, delete = the gone node)."""
    rules = [
        _rule([""], ["nodes"], ["get", "list", "patch", "delete"]),
        _rule([""], ["pods"], ["list"]),
        _rule([""], ["pods/eviction"], ["create"]),
        _rule(["apps"], ["daemonsets"], ["get"]),
    ]
    user = {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": DRAINER_USER}
    return [_cluster_role(DRAINER_ROLE, rules), _binding(DRAINER_ROLE, DRAINER_ROLE, user)]


# ---- render / apply -----------------------------------------------------------------------------------------


# ---- cluster-autoscaler (optional) ------------------------------------------------------------------------

AUTOSCALER_DISCOVERY_TAG = "k8s.io/cluster-autoscaler/enabled"


def autoscaler_owner_tag(cluster_name: str) -> str:
    """The second auto-discovery tag: only this cluster's worker groups (blue/green clusters share a VPC)."""
    return f"k8s.io/cluster-autoscaler/{cluster_name}"


def cluster_autoscaler(images: AddonImages, cfg: AgentConfig) -> list[dict[str, Any]]:
    """cluster-autoscaler for AWS with ASG auto-discovery: it scales the worker groups that carry both tags
    (stages/workers.py sets them when ``clusterAutoscaler`` is on); the control-plane groups never do."""
    name = "cluster-autoscaler"
    # The upstream AWS example's RBAC (cluster-autoscaler/cloudprovider/aws/examples), plus the DRA read
    # access the 1.34 autoscaler's scheduler framework lists.
    rules = [
        _rule([""], ["events", "endpoints"], ["create", "patch"]),
        _rule([""], ["pods/eviction"], ["create"]),
        _rule([""], ["pods/status"], ["update"]),
        _rule([""], ["endpoints"], ["get", "update"], names=[name]),
        _rule([""], ["nodes"], ["watch", "list", "get", "update"]),
        _rule(
            [""],
            ["namespaces", "pods", "services", "replicationcontrollers", "persistentvolumeclaims", "persistentvolumes"],
            ["watch", "list", "get"],
        ),
        _rule(["extensions"], ["replicasets", "daemonsets"], ["watch", "list", "get"]),
        _rule(["policy"], ["poddisruptionbudgets"], ["watch", "list"]),
        _rule(["apps"], ["statefulsets", "replicasets", "daemonsets"], ["watch", "list", "get"]),
        _rule(
            ["storage.k8s.io"],
            ["storageclasses", "csinodes", "csidrivers", "csistoragecapacities", "volumeattachments"],
            ["watch", "list", "get"],
        ),
        _rule(["batch", "extensions"], ["jobs"], ["get", "list", "watch", "patch"]),
        _rule(["batch"], ["cronjobs"], ["get", "list", "watch"]),
        _rule(["coordination.k8s.io"], ["leases"], ["create"]),
        _rule(["coordination.k8s.io"], ["leases"], ["get", "update"], names=[name]),
        _rule(["resource.k8s.io"], ["resourceclaims", "resourceslices", "deviceclasses"], ["get", "list", "watch"]),
    ]
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(name),
        "rules": [
            _rule([""], ["configmaps"], ["create", "list", "watch"]),
            _rule(
                [""],
                ["configmaps"],
                ["delete", "get", "update", "watch"],
                names=["cluster-autoscaler-status", "cluster-autoscaler-priority-expander"],
            ),
        ],
    }
    labels = {"app.kubernetes.io/name": name, "k8s-app": name}
    command = [
        "./cluster-autoscaler",
        "--cloud-provider=aws",
        f"--namespace={NAMESPACE}",
        f"--node-group-auto-discovery=asg:tag={AUTOSCALER_DISCOVERY_TAG},{autoscaler_owner_tag(cfg.cluster_name)}",
        "--balance-similar-node-groups",
        "--expander=least-waste",
        "--skip-nodes-with-system-pods=false",
        "--logtostderr=true",
        "--v=2",
    ]
    container = _container(
        name,
        images.cluster_autoscaler,
        command=command,
        env=_env(AWS_REGION=cfg.region, AWS_STS_REGIONAL_ENDPOINTS="regional"),
        resources={"requests": {"cpu": "100m", "memory": "300Mi"}, "limits": {"memory": "600Mi"}},
        securityContext={
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    )
    deployment = _control_plane_deployment(
        name,
        labels,
        1,
        container,
        # The control-plane instance role (scoped to the worker groups) through IMDS, as NTH does.
        hostNetwork=True,
        dnsPolicy="Default",
        securityContext={"runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534},
    )
    return [
        _service_account(name),
        _cluster_role(name, rules),
        _binding(name, name, _sa_subject(name)),
        role,
        _binding(name, name, _sa_subject(name), namespace=NAMESPACE, role_kind="Role"),
        deployment,
    ]


def render_addons(cfg: AgentConfig, images: AddonImages | None = None) -> dict[str, list[dict[str, Any]]]:
    """File name -> the documents of that add-on, in apply order."""
    images = images or load_addon_images()
    missing = [
        k
        for k, v in (("terminationHandlerQueueUrl", cfg.termination_handler_queue_url), ("vpcCidr", cfg.vpc_cidr))
        if not v
    ]
    if missing:
        raise AgentError(f"the add-ons need {', '.join(missing)} in the agent configuration")
    rendered = {
        "10-calico.yaml": calico(images, cfg),
        "20-aws-cloud-controller-manager.yaml": cloud_controller_manager(images, cfg),
        "30-aws-node-termination-handler.yaml": node_termination_handler(images, cfg),
        "40-kubelet-csr-approver.yaml": kubelet_csr_approver(images, cfg),
        "50-lifecycle-drainer-rbac.yaml": drainer_rbac(),
    }
    if cfg.cluster_autoscaler:  # optional: only when the worker groups carry the auto-discovery tags
        rendered["60-cluster-autoscaler.yaml"] = cluster_autoscaler(images, cfg)
    assert tuple(rendered)[: len(ADDON_FILES)] == ADDON_FILES
    return rendered


def write_addons(out_dir: Path, rendered: Mapping[str, list[dict[str, Any]]]) -> Path:
    """Write one YAML file per add-on into ``out_dir`` (stale add-on files from an earlier attempt removed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.yaml"):
        stale.unlink()
    for name, docs in rendered.items():
        (out_dir / name).write_text(dump_documents(docs))
    return out_dir


def kubectl_apply_argv(admin_conf: str, directory: Path) -> list[str]:
    """Server-side apply (the agent owns these fields; a re-apply after a restore or an upgrade wins)."""
    return ["kubectl", "--kubeconfig", admin_conf, "apply", "--server-side", "--force-conflicts", "-f", str(directory)]
