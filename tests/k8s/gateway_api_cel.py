"""The Gateway API CRDs' CEL rules (x-kubernetes-validations) that this
bundle's Gateway and HTTPRoutes reach, restated as Python checks.

Neither the schema validators (gateway_api.py) nor anything else in the test
environment evaluates CEL; the API server does at `kubectl apply`. These are
targeted re-statements, not a CEL engine: only the rules an object of this
bundle reaches (listed in tests/k8s/gateway-api-validate/PROVENANCE.md, with
their CEL text), each with the defaults the API server fills in first. A rule
added to the CRDs later is not checked until it is added here.
"""
from __future__ import annotations

import re

GROUP = "gateway.networking.k8s.io"
_DURATION = re.compile(r"([0-9]{1,5})(h|m|s|ms)")
_PATH_CHARS = re.compile(r"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$")
_FILTER_FIELDS = {"RequestHeaderModifier": "requestHeaderModifier", "ResponseHeaderModifier": "responseHeaderModifier",
                  "RequestMirror": "requestMirror", "RequestRedirect": "requestRedirect", "URLRewrite": "urlRewrite",
                  "ExtensionRef": "extensionRef"}


def _seconds(duration: str) -> float:
    """GEP-2257 duration (the schema's pattern already holds)."""
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(int(n) * scale[unit] for n, unit in _DURATION.findall(duration))


def gateway_violations(gateway: dict) -> list[str]:
    out = []
    listeners = gateway["spec"].get("listeners", [])
    for i, l in enumerate(listeners):
        proto, where = l.get("protocol", ""), f"/spec/listeners/{i}"
        # self.all(l, l.protocol.matches('(?i)^(HTTP|TCP|UDP)$') ? !has(l.tls) : true)
        if re.fullmatch(r"(?i)HTTP|TCP|UDP", proto) and "tls" in l:
            out.append(f"{where}: tls must not be specified for protocol {proto}")
        # (HTTPS && has(tls)) ? (tls.mode == '' || tls.mode == 'Terminate') : true   (mode defaults to Terminate)
        if re.fullmatch(r"(?i)HTTPS", proto) and "tls" in l and l["tls"].get("mode", "Terminate") not in ("", "Terminate"):
            out.append(f"{where}: tls.mode must be Terminate for HTTPS")
        # TLS ? has(l.tls) && has(l.tls.mode) && l.tls.mode != ''
        if re.fullmatch(r"(?i)TLS", proto) and ("tls" not in l or l["tls"].get("mode", "Terminate") == ""):
            out.append(f"{where}: tls.mode must be set for TLS")
        # (TCP|UDP) ? (!has(l.hostname) || l.hostname == '')
        if re.fullmatch(r"(?i)TCP|UDP", proto) and l.get("hostname"):
            out.append(f"{where}: hostname must not be specified for protocol {proto}")
        # tls: self.mode == 'Terminate' ? size(self.certificateRefs) > 0 || size(self.options) > 0 : true
        tls = l.get("tls")
        if tls is not None and tls.get("mode", "Terminate") == "Terminate" and not (tls.get("certificateRefs") or tls.get("options")):
            out.append(f"{where}/tls: certificateRefs or options must be specified when mode is Terminate")
    # self.all(l1, self.exists_one(l2, l1.name == l2.name))
    names = [l.get("name") for l in listeners]
    out += [f"/spec/listeners: listener name {n!r} must be unique" for n in sorted({n for n in names if names.count(n) > 1})]
    # self.all(l1, self.exists_one(l2, port, protocol and hostname (both unset or equal) are the same))
    combos = [(l.get("port"), l.get("protocol"), l.get("hostname")) for l in listeners]
    out += [f"/spec/listeners: port, protocol and hostname {c} must be unique" for c in sorted({c for c in combos if combos.count(c) > 1}, key=str)]
    return out


def httproute_violations(route: dict) -> list[str]:
    out = []
    spec = route["spec"]
    # parentRefs: one parent (group, kind, namespace, name) is referenced either always or never
    # with a sectionName, and each reference appears once (defaults: group GROUP, kind Gateway).
    refs = [(p.get("group", GROUP), p.get("kind", "Gateway"), p.get("namespace", ""), p["name"], p.get("sectionName", ""))
            for p in spec.get("parentRefs", [])]
    for ref in refs:
        same_parent = [r for r in refs if r[:4] == ref[:4]]
        if len({bool(r[4]) for r in same_parent}) > 1:
            out.append(f"/spec/parentRefs: sectionName must be specified when parentRefs includes 2 or more references to {ref[3]}")
        if refs.count(ref) > 1:
            out.append(f"/spec/parentRefs: sectionName must be unique when parentRefs includes 2 or more references to {ref[3]}")
    rules = spec.get("rules", [{}])
    # (self.size() > 0 ? self[0].matches.size() : 0) + ... <= 128
    if sum(len(r.get("matches", [{}])) for r in rules) > 128:
        out.append("/spec/rules: while 16 rules and 64 matches per rule are allowed, the total number of matches across all rules in a route must be less than 128")
    for i, rule in enumerate(rules):
        where = f"/spec/rules/{i}"
        matches = rule.get("matches", [{"path": {"type": "PathPrefix", "value": "/"}}])
        filters = rule.get("filters", [])
        backends = rule.get("backendRefs", [])
        # has(backendRefs) && size > 0 ? filters.all(f, !has(f.requestRedirect))
        if backends and any("requestRedirect" in f for f in filters):
            out.append(f"{where}: RequestRedirect filter must not be used together with backendRefs")
        # a ReplacePrefixMatch redirect/rewrite (on the rule or a backendRef) needs exactly one PathPrefix match
        rewrites = [f for f in [*filters, *(x for b in backends for x in b.get("filters", []))]
                    for kind in ("requestRedirect", "urlRewrite")
                    if f.get(kind, {}).get("path", {}).get("type") == "ReplacePrefixMatch"]
        if rewrites and (len(matches) != 1 or matches[0].get("path", {}).get("type", "PathPrefix") != "PathPrefix"):
            out.append(f"{where}: ReplacePrefixMatch needs exactly one PathPrefix match")
        for j, b in enumerate(backends):
            # (size(self.group) == 0 && self.kind == 'Service') ? has(self.port) : true
            if b.get("group", "") == "" and b.get("kind", "Service") == "Service" and "port" not in b:
                out.append(f"{where}/backendRefs/{j}: must specify port for Service")
        for j, m in enumerate(matches):
            path = m.get("path", {"type": "PathPrefix", "value": "/"})
            ptype, value = path.get("type", "PathPrefix"), path.get("value", "/")
            if not (ptype in ("Exact", "PathPrefix", "RegularExpression") or re.fullmatch(r"[^/]+/.+", ptype)):
                out.append(f"{where}/matches/{j}/path: type {ptype!r} is not allowed")
            if ptype in ("Exact", "PathPrefix"):
                bad = (not value.startswith("/") or any(s in value for s in ("//", "/./", "/../", "%2f", "%2F", "#"))
                       or value.endswith(("/..", "/.")) or not _PATH_CHARS.match(value))
                if bad:
                    out.append(f"{where}/matches/{j}/path: value {value!r} is not an absolute, normalised path")
        # !(has(request) && has(backendRequest) && request != 0s && backendRequest > request)
        t = rule.get("timeouts", {})
        if "request" in t and "backendRequest" in t and _seconds(t["request"]) != 0 and _seconds(t["backendRequest"]) > _seconds(t["request"]):
            out.append(f"{where}/timeouts: backendRequest timeout cannot be longer than request timeout")
        types = [f.get("type") for f in filters]
        # !(exists RequestRedirect && exists URLRewrite); at most one of each header modifier, redirect, rewrite
        if "RequestRedirect" in types and "URLRewrite" in types:
            out.append(f"{where}/filters: may specify either RequestRedirect or URLRewrite, but not both")
        for kind in ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect", "URLRewrite"):
            if types.count(kind) > 1:
                out.append(f"{where}/filters: {kind} filter cannot be repeated")
        for j, f in enumerate(filters):
            # !(has(self.X) && self.type != 'X') and !(!has(self.X) && self.type == 'X'), per filter kind
            for kind, field in _FILTER_FIELDS.items():
                if (field in f) != (f.get("type") == kind):
                    out.append(f"{where}/filters/{j}: {field} must be specified exactly when type is {kind}")
    return out


def violations(obj: dict) -> list[str]:
    check = {"Gateway": gateway_violations, "HTTPRoute": httproute_violations}.get(obj["kind"])
    assert check, f"no CEL rules restated for {obj['kind']}: add them before shipping one"
    return [f"{obj['kind']}/{obj['metadata']['name']}: {v}" for v in check(obj)]
