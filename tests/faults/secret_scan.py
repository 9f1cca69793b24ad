"""A detector for secret values committed to deployment files or printed in logs.

What counts as a committed secret (issue [F]):
- a literal value that looks random (no whitespace, at least 12 characters,
  at least two of lower case / upper case / digits, Shannon entropy of at
  3 bits per character, 2.5 from 16 characters on, and not just words and
  short numbers joined by punctuation) under a name that says secret:
  *SECRET*, *PASS* (password, requirepass), *TOKEN*, *KEY*, *CREDENTIAL*, *AUTH*;
- a URL with an inline password (scheme://user:PASSWORD@host) that is not a
  placeholder (USER:PASSWORD, <...>, {{ jinja }}, $(VAR), ${VAR}, $VAR);
- a PEM private key with a body;
- any value in the data/stringData of a Kubernetes Secret that is not a
  placeholder.

Values that are references, not secrets, pass: Jinja (`{{ vault_x }}`),
kubelet/shell expansion (`$(REDIS_PASSWORD)`, `$SECRET_KEY`), placeholders
(`<generate: ...>`), prose with spaces ("replace with: ..."), identifiers
(`SECRET_KEY`, `chat-secrets`), booleans (`generateValue: true`).

Structured files are parsed (YAML, TOML, JSON, kustomize output) so that a
value is judged under the name it is assigned to, including the
`{name: X, value: V}` / `{key: X, value: V}` list items of Kubernetes env
and Render envVars; every file is also scanned as text (comments too) for
URLs with passwords, private keys and NAME=value / NAME: value pairs.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import re
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

SECRET_NAME = re.compile(r"secret|pass|token|credential|key|auth", re.I)
# Structural field names that say "secret" but hold names, not values.
STRUCTURAL = {"key", "keys", "keywords", "name", "secretkeyref", "secretref", "secretname", "generator",
              "generatevalue", "secretgenerator", "sync"}
VALUE_FIELDS = {"value", "default", "stringvalue"}

JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.S)
URL_PASSWORD = re.compile(r"\b([a-z][a-z0-9+.-]*)://([^\s/:@\"'<>]*):([^\s/@\"']+)@", re.I)
PRIVATE_KEY = re.compile(r"-----BEGIN ([A-Z ]*)PRIVATE KEY-----\s*\n\s*#?\s*([A-Za-z0-9+/=]{40,})")
# NAME=value, NAME: value, NAME = "value", name value (config directives)
TEXT_PAIR = re.compile(r"""(?P<name>[A-Za-z_][\w.-]*)["']?\s*(?:[:=]|\s)\s*["']?(?P<value>[^\s"',;#]+)""")
# In source code only a quoted literal is a value (`KEY = "..."`, `{"KEY": "..."}`,
# `setdefault("KEY", "...")`); `key = obj.attr(...)` is an expression.
QUOTED_PAIR = re.compile(r"""(?P<name>[A-Za-z_][\w.-]*)["']?\s*[:=,]\s*(?P<q>["'])(?P<value>[^\s"']+)(?P=q)""")
CODE_SUFFIXES = (".py", ".pyi", ".js", ".mjs", ".css", ".html", ".json", ".map", ".svg")
PLACEHOLDER_WORDS = {"password", "pass", "passwd", "pw", "pwd", "secret"}


@dataclass(frozen=True)
class Finding:
    where: str
    name: str
    value: str
    why: str

    def __str__(self) -> str:
        shown = self.value if len(self.value) <= 12 else f"{self.value[:4]}...{self.value[-2:]} ({len(self.value)} chars)"
        return f"{self.where}: {self.name} = {shown!r} ({self.why})"


def entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def is_reference(value: str) -> bool:
    """A template, an expansion or a placeholder: not a value."""
    return bool(JINJA.search(value) or "{%" in value or "$(" in value or "${" in value or re.match(r"^\$\w+$", value)
                or value.startswith("<") or value.endswith(">") or "%(" in value)


def looks_random(value: str) -> bool:
    if len(value) < 12 or re.search(r"\s", value) or is_reference(value):
        return False
    classes = sum(bool(re.search(p, value)) for p in (r"[a-z]", r"[A-Z]", r"[0-9]"))
    # Words and short numbers joined by punctuation are names (scram-sha-256, python:3.13-slim), not keys.
    parts = [p for p in re.split(r"[^A-Za-z0-9]+", value) if p]
    wordy = all(re.fullmatch(r"[a-z]{1,10}|[A-Z]{1,10}|[A-Z][a-z]{1,10}|[0-9]{1,4}", p) for p in parts)
    return classes >= 2 and not wordy and entropy(value) >= (2.5 if len(value) >= 16 else 3.0)


def url_password_is_placeholder(password: str) -> bool:
    return (is_reference(password) or "{{" in password or password.lower() in PLACEHOLDER_WORDS
            or bool(re.fullmatch(r"[A-Z][A-Z0-9_]*", password)) or bool(re.fullmatch(r"[*.xX]+", password)))


def secret_name(names) -> str | None:
    """The secret-sounding name among the (innermost) names a value sits under."""
    for name in names:
        if name and name.lower() not in STRUCTURAL and name.lower() not in VALUE_FIELDS and SECRET_NAME.search(name):
            return name
    return None


# --- scanners -----------------------------------------------------------------------

def scan_text(text: str, where: str, code: bool = False) -> list[Finding]:
    """URLs with passwords, private keys and NAME=value pairs anywhere in the text (comments included);
    in source code (`code`), only quoted values count as values."""
    found = []
    pair = QUOTED_PAIR if code else TEXT_PAIR
    flat = JINJA.sub("{{T}}", text)
    for match in URL_PASSWORD.finditer(flat):
        if not url_password_is_placeholder(match.group(3)):
            found.append(Finding(where, f"{match.group(1)}:// URL", match.group(3), "URL with an inline password"))
    for match in PRIVATE_KEY.finditer(text):
        found.append(Finding(where, f"{match.group(1)}PRIVATE KEY", match.group(2), "PEM private key"))
    for number, line in enumerate(flat.splitlines(), 1):
        for match in pair.finditer(line):
            name, value = match.group("name"), match.group("value")
            if SECRET_NAME.search(name) and name.lower() not in STRUCTURAL and looks_random(value):
                found.append(Finding(f"{where}:{number}", name, value, "random-looking value under a secret name"))
    return found


def scan_tree(tree, where: str) -> list[Finding]:
    """Every string of a parsed document, judged under the names it is assigned to."""
    found = []

    def walk(node, names: tuple[str, ...]):
        if isinstance(node, dict):
            # {name: X, value: V} (k8s env), {key: X, value: V} (Render envVars)
            label = next((node[k] for k in ("name", "key", "envVarName") if isinstance(node.get(k), str)), None)
            for key, value in node.items():
                key = str(key)
                walk(value, (*names, label, key) if label and key.lower() in VALUE_FIELDS else (*names, key))
        elif isinstance(node, list):
            for item in node:
                walk(item, names)
        elif isinstance(node, str):
            name = secret_name(reversed(names[-3:]))
            shown = ".".join(names[-3:]) or "(top)"
            if name and looks_random(node):
                found.append(Finding(where, shown, node, "random-looking value under a secret name"))
            for match in URL_PASSWORD.finditer(JINJA.sub("{{T}}", node)):
                if not url_password_is_placeholder(match.group(3)):
                    found.append(Finding(where, shown, match.group(3), "URL with an inline password"))

    walk(tree, ())
    return found


def scan_kubernetes(objects: list[dict], where: str) -> list[Finding]:
    found = []
    for obj in objects:
        ident = f"{where}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        found += scan_tree(obj, ident)
        if obj.get("kind") == "Secret":
            values = dict(obj.get("stringData") or {})
            for key, encoded in (obj.get("data") or {}).items():
                try:
                    values[key] = base64.b64decode(encoded, validate=True).decode("utf-8", "replace")
                except (binascii.Error, ValueError):
                    values[key] = str(encoded)
            for key, value in values.items():
                if value and not is_reference(str(value)):
                    found.append(Finding(ident, key, str(value), "a value in a Secret object"))
    return found


class _AnyTagLoader(yaml.SafeLoader):
    """SafeLoader that keeps unknown tags (e.g. Ansible's !vault, !unsafe) as their text."""


def _construct_any(loader, _suffix, node):
    if isinstance(node, yaml.ScalarNode):
        return "<tagged>" if "vault" in (node.tag or "") else loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    return loader.construct_mapping(node)


_AnyTagLoader.add_multi_constructor("!", _construct_any)


def parse(path: Path):
    text = path.read_text()
    if path.suffix in (".yml", ".yaml") or path.name.endswith((".yml.example", ".yaml.example")):
        return [doc for doc in yaml.load_all(text, Loader=_AnyTagLoader) if doc is not None]
    if path.suffix == ".toml":
        return [tomllib.loads(text)]
    if path.suffix == ".json":
        return [json.loads(text)]
    return None


def scan_file(path: Path, label: str | None = None) -> list[Finding]:
    """A file as text, and (YAML/TOML/JSON) as parsed documents."""
    where = label or str(path)
    found = scan_text(path.read_text(), where)
    documents = parse(path)
    for document in documents or []:
        found += scan_tree(document, where)
    return found


def leaks_in_log(text: str, secrets: dict[str, str]) -> list[str]:
    """Which of the named secret values appear in a log, verbatim or URL-encoded."""
    from urllib.parse import quote, quote_plus

    out = []
    for name, value in secrets.items():
        if not value:
            continue
        forms = {value, quote(value, safe=""), quote_plus(value)}
        hits = [line for line in text.splitlines() if any(form in line for form in forms)]
        if hits:
            out.append(f"{name} appears in {len(hits)} log line(s), e.g. {hits[0][:160]!r}")
    return out


# --- container images -------------------------------------------------------------

# Files that should never be baked into an image, whatever they contain.
SECRET_FILE_NAME = re.compile(
    r"(^|/)(\.env(\.[^/]*)?|id_(rsa|dsa|ecdsa|ed25519)|[^/]*\.(pem|key|p12|pfx)|db\.sqlite3|\.git|\.netrc|\.pgpass"
    r"|\.pypirc|\.git-credentials|\.dockercfg|\.docker/config\.json)$")
TEXT_SIZE_LIMIT = 2_000_000


@dataclass
class ImageScan:
    findings: list[Finding]
    layers: int  # layers scanned (not counting skipped base layers)
    files: int  # text files whose contents were scanned
    names: int  # entries whose names were checked


def scan_image_archive(archive: bytes, *, skip_diff_ids=frozenset(), names_only=()) -> ImageScan:
    """Everything a `docker save` archive holds that a build can bake a secret into:
    the image config (Env, Labels, Cmd, Entrypoint, Healthcheck, ...), the
    history (every Dockerfile instruction as recorded), and every file of every
    layer: a file added in one layer and deleted in a later one is still in
    the image. It looks for secrets by their shape (the text scanners above)
    and for file names that are secrets by nature; it is not told the values.

    `skip_diff_ids`: layers of the base image (not built here); `names_only`:
    path prefixes whose files are checked by name but not read (third-party
    packages installed from the hash-locked lock)."""
    import io
    import tarfile

    outer = tarfile.open(fileobj=io.BytesIO(archive))

    def read(name: str) -> bytes:
        member = outer.extractfile(outer.getmember(name))
        assert member is not None, name
        return member.read()

    manifest = json.loads(read("manifest.json"))
    assert len(manifest) == 1, "one image per archive"
    config = json.loads(read(manifest[0]["Config"]))
    found: list[Finding] = []
    for key, value in (config.get("config") or {}).items():
        if value:
            found += scan_text("\n".join(value) if key == "Env" else json.dumps(value), f"config {key}")
    for number, step in enumerate(config.get("history") or []):
        found += scan_text(step.get("created_by", ""), f"history step {number}")
    scan = ImageScan(found, 0, 0, 0)
    diff_ids = config["rootfs"]["diff_ids"]
    assert len(diff_ids) == len(manifest[0]["Layers"]), "manifest and config disagree on the layers"
    for path, diff_id in zip(manifest[0]["Layers"], diff_ids):
        if diff_id in skip_diff_ids:
            continue
        scan.layers += 1
        layer = tarfile.open(fileobj=io.BytesIO(read(path)))
        for entry in layer:
            name = entry.name.removeprefix("./")
            base = name.rsplit("/", 1)[-1]
            if base.startswith(".wh."):
                continue  # a deletion marker: the file it hides is still in its own layer
            scan.names += 1
            where = f"layer {diff_id[7:19]}: /{name}"
            if SECRET_FILE_NAME.search(name):
                found.append(Finding(where, "file name", base, "a file that holds secrets by nature"))
            if not entry.isfile() or entry.size > TEXT_SIZE_LIMIT or name.startswith(tuple(names_only)):
                continue
            body = layer.extractfile(entry).read()
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                if b"PRIVATE KEY-----" in body:
                    found.append(Finding(where, "PRIVATE KEY", "(binary)", "PEM private key marker in a binary file"))
                continue
            scan.files += 1
            found += scan_text(text, where, code=name.endswith(CODE_SUFFIXES))
    return scan
