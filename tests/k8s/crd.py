"""Gateway API objects against the CRDs' published OpenAPI schemas.

The schemas are extracts of the Gateway API project's CRD YAML (the `v1`
openAPIV3Schema of the standard channel; tests/k8s/schemas/PROVENANCE.md).
They are checked as the API server checks a structural schema with
`kubectl apply`'s default strict field validation: types, required fields,
enums, patterns, lengths and item counts, and unknown fields rejected
(additionalProperties: false wherever a schema lists properties). The CEL
rules (x-kubernetes-validations) need a CEL evaluator, which the dev lock
does not have: `cel_rules()` lists the ones an object reaches, and the tests
assert what those rules say for the fields this bundle sets.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import yaml

GROUP = "gateway.networking.k8s.io"
SCHEMAS = Path(__file__).with_name("schemas")
FILES = {
    ("Gateway", "v1"): "gateway.networking.k8s.io_gateways.v1.spec.yaml",
    ("HTTPRoute", "v1"): "gateway.networking.k8s.io_httproutes.v1.spec.yaml",
}


def _strict(node):
    """OpenAPI v3 (structural) -> JSON Schema as the API server applies it."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "default":
            continue
        if key == "properties":
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        else:
            out[key] = _strict(value)
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def schema(kind: str, version: str) -> dict:
    raw = yaml.safe_load((SCHEMAS / FILES[(kind, version)]).read_text())
    converted = _strict(raw)
    converted["properties"]["metadata"] = {"type": "object"}  # validated by the API server's own rules
    converted["properties"]["status"] = {"type": "object"}    # left out of the extract: controller-written
    return converted


def errors(obj: dict) -> list[str]:
    group, _, version = obj["apiVersion"].partition("/")
    assert group == GROUP, obj["apiVersion"]
    key = (obj["kind"], version)
    if key not in FILES:
        return [f"no vendored schema for {obj['kind']} {obj['apiVersion']}"]
    validator = jsonschema.Draft7Validator(schema(*key), format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    name = f"{obj['kind']}/{obj.get('metadata', {}).get('name')}"
    return [f"{name}: {e.message} at {'/'.join(map(str, e.absolute_path))}" for e in validator.iter_errors(obj)]


def cel_rules(obj: dict) -> list[tuple[str, str]]:
    """(path, CEL rule) for every x-kubernetes-validations rule the object reaches."""
    group, _, version = obj["apiVersion"].partition("/")
    raw = yaml.safe_load((SCHEMAS / FILES[(obj["kind"], version)]).read_text())
    found = []

    def walk(node, value, path):
        for rule in node.get("x-kubernetes-validations", []):
            found.append((path or "/", rule["rule"]))
        if isinstance(value, dict):
            for key, sub in value.items():
                if key in node.get("properties", {}):
                    walk(node["properties"][key], sub, f"{path}/{key}")
        elif isinstance(value, list) and "items" in node:
            for i, item in enumerate(value):
                walk(node["items"], item, f"{path}/{i}")

    walk(raw, copy.deepcopy(obj), "")
    return found
