"""Issue 22, point 6: the NetworkPolicies of every rendered overlay (docker/k8s/base/network-policies.yaml).

The namespace denies all traffic by default; the gateway is reached from the ingress controller's namespace (and
the monitoring one) only, and reaches DNS, Triton's gRPC port, the stores and the internet on 80/443 minus every
private, link-local (cloud metadata), loopback and cluster range; Triton is reached on gRPC from the gateways
only and on metrics from the monitoring namespace only. Checked two ways: on the policies' structure, and with a
small evaluator of the rules (ipBlock with `except`, ports, peers) asked about concrete addresses.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from gateway.settings import PROJECT_ROOT
from tests.deploy.test_manifests import (
    GATEWAY,
    TARGETS,
    TRITON,
    WORKLOADS,
    by_kind,
    container,
    labels_match,
    one,
    port_number,
    render,
)

Objects = tuple[dict[str, Any], ...]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

INGRESS_NAMESPACE = {"kubernetes.io/metadata.name": "ingress-nginx"}
MONITORING_NAMESPACE = {"kubernetes.io/metadata.name": "monitoring"}
TRITON_GRPC, TRITON_HTTP, TRITON_METRICS = 8001, 8000, 8002
INTERNET_PORTS = {80, 443}
# Never reachable from the gateway through an address, on any port.
NEVER = ["169.254.169.254", "169.254.170.23", "169.254.0.1", "127.0.0.1", "0.0.0.0", "::1", "fe80::1",
         "fd00:ec2::254", "::ffff:169.254.169.254", "::ffff:127.0.0.1"]  # fmt: skip
# Private and cluster-internal: never reachable on the internet ports (an operator may put a store there).
PRIVATE = ["10.0.0.1", "10.96.0.1", "10.244.1.7", "172.16.0.1", "172.31.255.254", "192.168.1.1", "100.64.0.1",
           "100.100.100.200", "fd12:3456::1", "fc00::1", "::ffff:10.0.0.1", "::ffff:192.168.0.1"]  # fmt: skip
PUBLIC = ["93.184.215.14", "8.8.8.8", "2606:2800:21f:cb07:6820:80da:af6b:8b2c", "2a00:1450:4001:80b::200e"]
# The ranges the gateway's internet egress must except, whatever the overlay.
REQUIRED_V4 = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8", "100.64.0.0/10"]
REQUIRED_V6 = ["fc00::/7", "fe80::/10", "::1/128", "::ffff:0:0/96"]
# The base's placeholders (docs/deployment.md names each) and what the example overlay sets in their place.
PLACEHOLDERS = ["10.244.0.0/16", "10.96.0.0/12", "2001:db8:244::/56", "2001:db8:96::/112", "192.0.2.10/32",
                "192.0.2.11/32", "192.0.2.12/32"]  # fmt: skip
EXAMPLE_CLUSTER_RANGES = ["198.18.0.0/16", "198.19.0.0/16", "2600:1f14:abc:de00::/56", "fd00:10:96::/112"]


def template_labels(objects: Objects, name: str) -> dict[str, str]:
    labels: dict[str, str] = one(objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
    return labels


def selecting(objects: Objects, labels: dict[str, str], direction: str) -> list[dict[str, Any]]:
    """The policies that select pods with these labels and isolate them in `direction` (Ingress / Egress)."""
    found = []
    for policy in by_kind(objects, "NetworkPolicy").values():
        spec = policy["spec"]
        if labels_match(spec["podSelector"].get("matchLabels", {}), labels) and direction in spec["policyTypes"]:
            found.append(policy)
    return found


def rules(objects: Objects, labels: dict[str, str], direction: str) -> list[dict[str, Any]]:
    key = "egress" if direction == "Egress" else "ingress"
    return [rule for policy in selecting(objects, labels, direction) for rule in policy["spec"].get(key, [])]


def covers_port(rule: dict[str, Any], port: int, ctr: dict[str, Any] | None = None, protocol: str = "TCP") -> bool:
    """Whether the rule's ports include `port` (no `ports`: every port). Named ports resolve on `ctr`."""
    if "ports" not in rule:
        return True
    for entry in rule["ports"]:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True
        number = port_number(ctr, entry["port"]) if ctr is not None else entry["port"]
        assert isinstance(number, int), f"a named port in an egress rule: {entry}"
        if number <= port <= entry.get("endPort", number):
            return True
    return False


def in_block(block: dict[str, Any], address: str) -> bool:
    ip = ipaddress.ip_address(address)
    cidr = ipaddress.ip_network(block["cidr"])
    if ip.version != cidr.version or ip not in cidr:
        return False
    return not any(ip in ipaddress.ip_network(e) for e in block.get("except", []))


def gateway_reaches(objects: Objects, address: str, port: int) -> bool:
    """Whether some egress rule of the gateway's policies lets it open `address`:`port` (TCP) by address."""
    for rule in rules(objects, template_labels(objects, GATEWAY), "Egress"):
        if not covers_port(rule, port):
            continue
        peers = rule.get("to")
        if not peers:
            return True  # no `to`: every destination
        if any("ipBlock" in peer and in_block(peer["ipBlock"], address) for peer in peers):
            return True
    return False


def internet_blocks(objects: Objects) -> list[dict[str, Any]]:
    blocks = []
    for rule in rules(objects, template_labels(objects, GATEWAY), "Egress"):
        for peer in rule.get("to", []):
            if "ipBlock" in peer and ipaddress.ip_network(peer["ipBlock"]["cidr"]).prefixlen == 0:
                assert {p["port"] for p in rule.get("ports") or []} == INTERNET_PORTS, rule
                blocks.append(peer["ipBlock"])
    return blocks


def excepted(block: dict[str, Any], network: str) -> bool:
    wanted = ipaddress.ip_network(network)
    excepts: list[Network] = [ipaddress.ip_network(e) for e in block.get("except", [])]
    return any(e.version == wanted.version and wanted.subnet_of(e) for e in excepts)  # type: ignore[arg-type]


@pytest.mark.parametrize("target", TARGETS)
def test_the_namespace_denies_by_default(target: str) -> None:
    objects = render(target)
    deny = [
        p
        for p in by_kind(objects, "NetworkPolicy").values()
        if p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ]
    assert deny, "no default-deny policy (every pod, ingress and egress)"
    assert all(not p["spec"].get("ingress") and not p["spec"].get("egress") for p in deny), "a default deny allows"
    # Every workload's pods are isolated both ways, so what is not listed below is refused.
    for workload in (o for o in objects if o["kind"] in WORKLOADS):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selecting(objects, labels, "Ingress") and selecting(objects, labels, "Egress"), workload["metadata"]


@pytest.mark.parametrize("target", TARGETS)
def test_the_gateway_is_reached_from_the_ingress_controller_only(target: str) -> None:
    objects = render(target)
    gateway = one(objects, "Deployment", GATEWAY)
    ctr = container(gateway, "gateway")
    found = rules(objects, template_labels(objects, GATEWAY), "Ingress")
    assert found
    namespaces = []
    for rule in found:
        assert rule.get("from"), f"an ingress rule open to every source: {rule}"
        assert [port_number(ctr, p["port"]) for p in rule["ports"]] == [port_number(ctr, "http")], rule
        for peer in rule["from"]:
            assert set(peer) == {"namespaceSelector"} and peer["namespaceSelector"].get("matchLabels"), peer
            namespaces.append(peer["namespaceSelector"]["matchLabels"])
    assert MONITORING_NAMESPACE in namespaces  # /metrics
    if target != "examples/cluster-ranges":
        assert INGRESS_NAMESPACE in namespaces
    else:
        assert {"kubernetes.io/metadata.name": "traefik"} in namespaces and INGRESS_NAMESPACE not in namespaces


@pytest.mark.parametrize("target", TARGETS)
def test_the_gateway_reaches_dns_triton_and_the_stores(target: str) -> None:
    objects = render(target)
    egress = rules(objects, template_labels(objects, GATEWAY), "Egress")
    dns = [
        r
        for r in egress
        if {"port": 53, "protocol": "UDP"} in r["ports"] and {"port": 53, "protocol": "TCP"} in r["ports"]
    ]
    (rule,) = dns
    assert rule["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]
    # Triton: its gRPC port, its pods in this namespace (a podSelector alone), nothing else of it.
    triton_labels = template_labels(objects, TRITON)
    to_triton = [r for r in egress if any(labels_match(p.get("podSelector", {}).get("matchLabels", {"-": "-"}),
                                                          triton_labels) for p in r.get("to", []))]  # fmt: skip
    (rule,) = to_triton
    assert all(set(p) == {"podSelector"} for p in rule["to"])
    assert [p["port"] for p in rule["ports"]] == [TRITON_GRPC]
    assert port_number(container(one(objects, "Deployment", TRITON), "triton"), "grpc") == TRITON_GRPC
    # The stores: PostgreSQL, Redis (in the cluster by label, or at the operator's address), S3 (MinIO by label,
    # a private endpoint by address; a public one through the internet rule).
    for port, name in ((5432, "postgresql"), (6379, "redis"), (9000, "minio")):
        (rule,) = [r for r in egress if r["ports"] == [{"port": port, "protocol": "TCP"}]]
        labels = [p["podSelector"]["matchLabels"] for p in rule["to"] if "podSelector" in p]
        assert labels == [{"app.kubernetes.io/name": name}], name
        for peer in rule["to"]:
            if "ipBlock" in peer:
                assert ipaddress.ip_network(peer["ipBlock"]["cidr"]).num_addresses <= 256, "an address, not a range"
    assert [r for r in egress if r["ports"] == [{"port": 443, "protocol": "TCP"}] and "ipBlock" in r["to"][0]]


@pytest.mark.parametrize("target", TARGETS)
def test_the_gateway_internet_egress_excludes_private_link_local_and_cluster_ranges(target: str) -> None:
    objects = render(target)
    blocks = internet_blocks(objects)
    assert sorted(b["cidr"] for b in blocks) == ["0.0.0.0/0", "::/0"], "IPv4 and IPv6, 80 and 443 only"
    for block in blocks:
        required = REQUIRED_V4 if ":" not in block["cidr"] else REQUIRED_V6
        for network in required:
            assert excepted(block, network), f"{network} is not excepted from {block['cidr']}"
        assert len(block["except"]) >= len(required) + 2, "the cluster's pod and Service CIDRs"
    cluster = EXAMPLE_CLUSTER_RANGES if target == "examples/cluster-ranges" else PLACEHOLDERS[:4]
    for network in cluster:
        assert any(excepted(b, network) for b in blocks if (":" in b["cidr"]) == (":" in network)), network
    # The same, asked of the rules: no metadata, link-local or loopback address on any port, nothing private or
    # cluster-internal on the internet ports, the public internet on exactly those.
    for address in NEVER:
        for port in (80, 443, 53, 5432, 6379, 8001, 9000, 6443, 10250):
            assert not gateway_reaches(objects, address, port), f"{address}:{port}"
    for address in [*PRIVATE, *(str(ipaddress.ip_network(n)[1]) for n in cluster)]:
        for port in INTERNET_PORTS:
            assert not gateway_reaches(objects, address, port), f"{address}:{port}"
    for address in PUBLIC:
        assert all(gateway_reaches(objects, address, port) for port in INTERNET_PORTS), address
        assert not any(gateway_reaches(objects, address, port) for port in (22, 25, 5432, 6379, 8080)), address


@pytest.mark.parametrize("target", TARGETS)
def test_triton_is_reached_by_the_gateways_and_monitoring_only(target: str) -> None:
    objects = render(target)
    triton = one(objects, "Deployment", TRITON)
    ctr = container(triton, "triton")
    found = rules(objects, template_labels(objects, TRITON), "Ingress")
    assert found
    sources: dict[int, list[dict[str, Any]]] = {}
    for rule in found:
        assert rule.get("from"), f"a Triton ingress rule open to every source: {rule}"
        assert rule.get("ports"), f"a Triton ingress rule on every port: {rule}"
        for port in (TRITON_GRPC, TRITON_HTTP, TRITON_METRICS):
            if covers_port(rule, port, ctr):
                sources.setdefault(port, []).extend(rule["from"])
    gateway_labels = template_labels(objects, GATEWAY)
    # gRPC: the gateway pods of this namespace (a podSelector without a namespaceSelector), nothing else.
    assert sources[TRITON_GRPC]
    for peer in sources[TRITON_GRPC]:
        assert set(peer) == {"podSelector"} and labels_match(peer["podSelector"]["matchLabels"], gateway_labels)
    # Metrics: the monitoring namespace only, never every namespace (`namespaceSelector: {}`) nor an ipBlock.
    assert sources[TRITON_METRICS] == [{"namespaceSelector": {"matchLabels": MONITORING_NAMESPACE}}]
    # HTTP: the kubelet's probes only, which come from the node (always allowed): no rule opens it.
    assert TRITON_HTTP not in sources


@pytest.mark.parametrize("target", TARGETS)
def test_triton_and_the_jobs_reach_nothing(target: str) -> None:
    """Only the gateway has egress rules: Triton, the export Job and the TensorRT build need no network."""
    objects = render(target)
    gateway_labels = template_labels(objects, GATEWAY)
    for workload in (o for o in objects if o["kind"] in WORKLOADS):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        if labels == gateway_labels:
            continue
        assert selecting(objects, labels, "Egress"), f"{workload['metadata']['name']}: egress not isolated"
        assert rules(objects, labels, "Egress") == [], workload["metadata"]["name"]


def test_the_example_overlay_replaces_every_placeholder() -> None:
    """The operator's overlay, as docker/k8s/examples/cluster-ranges shows it: the patches (by list index) land on
    the placeholders, so none is left and the fixed ranges all stay."""
    rendered = str(render("examples/cluster-ranges"))
    for placeholder in PLACEHOLDERS:
        assert placeholder not in rendered, placeholder
        assert placeholder in str(render("overlays/gpu")), placeholder
    objects = render("examples/cluster-ranges")
    assert gateway_reaches(objects, "10.20.0.5", 5432) and gateway_reaches(objects, "10.20.0.6", 6379)
    assert gateway_reaches(objects, "10.20.1.9", 443)
    assert not gateway_reaches(objects, "10.20.0.5", 6379) and not gateway_reaches(objects, "10.20.2.1", 443)
    for address in ("198.18.3.4", "198.19.0.10", "2600:1f14:abc:de00::17", "fd00:10:96::1"):
        assert not any(gateway_reaches(objects, address, port) for port in (80, 443, 5432, 6379)), address


def test_the_manual_documents_the_policies_and_their_placeholders() -> None:
    manual = (PROJECT_ROOT / "docs" / "deployment.md").read_text()
    for needle in [*PLACEHOLDERS, "ingress-nginx", "monitoring", "kube-dns", "169.254.169.254", "default-deny",
                   "docker/k8s/examples/cluster-ranges", "5432", "6379", "9000"]:  # fmt: skip
        assert needle in manual, needle
