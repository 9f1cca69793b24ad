"""A small evaluator of networking.k8s.io/v1 NetworkPolicy semantics.

Docker does not enforce NetworkPolicies, so the policies are proven by
evaluating them: `allowed(policies, src, dst, port)` answers whether a TCP/UDP
connection from peer `src` to peer `dst` on `port` is admitted, following the
API's rules: a pod is isolated for a direction when any policy with that
policyType selects it; then at least one rule of one such policy must match
the peer (podSelector alone = same namespace; namespaceSelector alone = any pod
there; both = AND; ipBlock = addresses outside the cluster) and the port
(a named port is looked up in the destination pod's container ports).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from tests.k8s.kube import selector_matches


@dataclass
class Peer:
    name: str
    namespace: str | None = None          # None: outside the cluster
    labels: dict = field(default_factory=dict)
    namespace_labels: dict = field(default_factory=dict)
    ip: str | None = None
    ports: dict = field(default_factory=dict)   # named container ports -> (number, protocol)

    @property
    def in_cluster(self) -> bool:
        return self.namespace is not None


def _policies_for(policies, pod: Peer, direction: str):
    return [p for p in policies
            if pod.in_cluster and p["metadata"].get("namespace") == pod.namespace
            and direction in p["spec"].get("policyTypes", ["Ingress"])
            and selector_matches(p["spec"].get("podSelector", {}), pod.labels)]


def _peer_matches(rule_peer: dict, policy_ns: str, other: Peer) -> bool:
    if "ipBlock" in rule_peer:
        if other.in_cluster or not other.ip:
            return False  # ipBlock is meant for cluster-external addresses
        block = rule_peer["ipBlock"]
        addr = ipaddress.ip_address(other.ip)
        net = ipaddress.ip_network(block["cidr"])
        if addr.version != net.version or addr not in net:
            return False
        return not any(addr in ipaddress.ip_network(e) for e in block.get("except", [])
                       if ipaddress.ip_network(e).version == addr.version)
    if not other.in_cluster:
        return False
    ns_sel, pod_sel = rule_peer.get("namespaceSelector"), rule_peer.get("podSelector")
    if ns_sel is None:
        if other.namespace != policy_ns:
            return False
    elif not selector_matches(ns_sel, other.namespace_labels):
        return False
    return pod_sel is None or selector_matches(pod_sel, other.labels)


def _port_matches(rule_ports, dst: Peer, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    for rp in rule_ports:
        if rp.get("protocol", "TCP") != protocol:
            continue
        if "port" not in rp:
            return True
        value = rp["port"]
        if isinstance(value, str):
            number = dst.ports.get(value, (None, None))
            if number[0] == port and number[1] == protocol:
                return True
        elif value == port or (rp.get("endPort") and value <= port <= rp["endPort"]):
            return True
    return False


def _admitted(policies, pod: Peer, other: Peer, dst: Peer, port: int, protocol: str, direction: str) -> bool:
    selecting = _policies_for(policies, pod, direction)
    if not selecting:
        return True
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in selecting:
        for rule in policy["spec"].get(key) or []:
            peers = rule.get(peers_key)
            peer_ok = not peers or any(_peer_matches(p, policy["metadata"]["namespace"], other) for p in peers)
            if peer_ok and _port_matches(rule.get("ports"), dst, port, protocol):
                return True
    return False


def allowed(policies: list[dict], src: Peer, dst: Peer, port: int, protocol: str = "TCP") -> bool:
    egress = _admitted(policies, src, dst, dst, port, protocol, "Egress") if src.in_cluster else True
    ingress = _admitted(policies, dst, src, dst, port, protocol, "Ingress") if dst.in_cluster else True
    return egress and ingress


def pod_peer(name: str, template: dict, namespace: str, namespace_labels: dict) -> Peer:
    ports = {}
    for c in template["spec"].get("containers", []):
        for p in c.get("ports", []):
            if p.get("name"):
                ports[p["name"]] = (p["containerPort"], p.get("protocol", "TCP"))
    return Peer(name, namespace, dict(template["metadata"].get("labels", {})), namespace_labels, None, ports)
