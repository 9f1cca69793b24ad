"""The manifests against the platforms' published JSON schemas, with the real
check-jsonschema CLI (tests/schemas/PROVENANCE.md says where each came from).

Each schema also rejects a broken copy of the same manifest: the validation
can fail, and it looks at the fields this bundle relies on.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.platforms import manifests as m

SCHEMAS = m.REPO / "tests" / "schemas"
CHECK = str(Path(sys.executable).with_name("check-jsonschema"))
KUSTOMIZATIONS = sorted((m.REPO / "deploy" / "k8s").rglob("kustomization.yaml"))

PAIRS = [
    ("fly.schema.json", m.FLY_TOML),
    ("fly-toplevel-checks.schema.json", m.FLY_TOML),
    ("render.schema.json", m.RENDER_YAML),
    ("heroku-app.heroku-mcp-server.schema.json", m.APP_JSON),
    ("heroku-app.schemastore-pr1092.schema.json", m.APP_JSON),
    *[("kustomization.schema.json", k) for k in KUSTOMIZATIONS],
]

# (schema, manifest, text to replace, replacement, what the error names)
BROKEN = [
    ("fly.schema.json", m.FLY_TOML, 'kill_signal = "SIGTERM"', 'kill_signal = "SIGTERMINATE"', "SIGTERMINATE"),
    ("fly.schema.json", m.FLY_TOML, 'auto_stop_machines = "off"', 'auto_stop_machines = "never"', "never"),
    ("fly.schema.json", m.FLY_TOML, '[metrics]\n  port = 9091', '[metrics]\n  port = "9091"', "9091"),
    ("fly-toplevel-checks.schema.json", m.FLY_TOML, 'path = "/readyz"', 'path = "/readyz"\n  hostHeader = "x"', "hostHeader"),
    ("fly-toplevel-checks.schema.json", m.FLY_TOML, '  type = "http"\n  port = 8000', '  type = "grpc"\n  port = 8000', "grpc"),
    ("render.schema.json", m.RENDER_YAML, "maxShutdownDelaySeconds: 30", "maxShutdownDelaySeconds: 301", "301"),
    ("render.schema.json", m.RENDER_YAML, "healthCheckPath: /startupz", "healthCheckPath: /startupz\n    healthCheckTimeout: 5",
     "healthCheckTimeout"),
    ("heroku-app.heroku-mcp-server.schema.json", m.APP_JSON, '"quantity": 1', '"quantity": "one"', "one"),
    ("heroku-app.schemastore-pr1092.schema.json", m.APP_JSON, '"quantity": 1', '"quantity": "one"', "one"),
    ("kustomization.schema.json", m.REPO / "deploy/k8s/kustomization.yaml", "configMapGenerator:", "configMapGenerators:",
     "configMapGenerators"),
]


def check(schema: str, document: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHECK, "--no-cache", "--schemafile", str(SCHEMAS / schema), str(document)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("schema,document", PAIRS, ids=[f"{s}:{d.relative_to(m.REPO)}" for s, d in PAIRS])
def test_manifest_validates_against_the_published_schema(schema, document):
    r = check(schema, document)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("schema,document,old,new,named", BROKEN, ids=[f"{b[0]}:{b[3][:30]}" for b in BROKEN])
def test_a_broken_copy_is_rejected(schema, document, old, new, named, tmp_path):
    text = document.read_text()
    assert old in text, f"{document.name} no longer contains {old!r}: update this negative control"
    broken = tmp_path / document.name
    broken.write_text(text.replace(old, new, 1))
    r = check(schema, broken)
    assert r.returncode != 0, f"{schema} accepted {new!r}"
    assert named in r.stdout + r.stderr, r.stdout + r.stderr


def test_the_vendored_schemas_are_the_shared_copies():
    """Byte-identical to the project's shared copies when those are present
    (a fresh clone validates with the vendored ones)."""
    shared = m.REPO.parent / "shared" / "schemas"
    if shared.is_dir():
        for path in SCHEMAS.glob("*.json"):
            original = shared / path.name
            if original.exists():
                assert original.read_bytes() == path.read_bytes(), f"{path.name} differs from {original}"
    provenance = (SCHEMAS / "PROVENANCE.md").read_text()
    for path in SCHEMAS.glob("*.json"):
        assert re.search(re.escape(path.name), provenance), f"{path.name} has no provenance"
