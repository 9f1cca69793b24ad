"""Every target runs exactly `gunicorn`: the settings live in gunicorn.conf.py.

Scans every file in the repository (tracked or new, not ignored; the test
harness too: it runs the same bare gunicorn) for a gunicorn command that carries flags or an app path of its own, in
any spelling a manifest, unit, script or Python module may use: a command
line (also split over lines with `\\`), a JSON/YAML/Python list, a YAML block
list, `args:` with gunicorn's options, and GUNICORN_CMD_ARGS (gunicorn reads
flags from that variable too: an env file, a Dockerfile ENV or an Ansible
template could set them there). A file that is not UTF-8 text fails the scan
(named), unless its suffix marks it as binary.
"""
from __future__ import annotations

import re
import subprocess

import pytest

from tests.harness.services import REPO

# gunicorn as a command word: `gunicorn`, `/srv/venv/bin/gunicorn`, "gunicorn", 'gunicorn'.
_CMD = r"""["']?(?:[\w.~-]*/)*gunicorn["']?"""
# An argument that is a flag or an app path (module:callable).
_ARG = r"""["']?(?:-|[\w.]+:[\w.]+)"""
LINE_RULES = [
    # `gunicorn -w 4`, `exec gunicorn --config x`, `gunicorn app.asgi:application`
    ("command line", re.compile(rf"""(?<![\w.-])gunicorn[ \t]+(?:-|[\w.]+:[\w.]+)""")),
    # ["gunicorn", "--bind", ...], ("gunicorn", "app.asgi:application"), [str(VENV / "gunicorn"), "-w", "4"]
    ("list", re.compile(rf"""["'](?:[\w.~-]*/)*gunicorn["']\s*\)*\s*,\s*{_ARG}""")),
    # YAML flow lists, unquoted: [gunicorn, --workers, "4"]
    ("list", re.compile(rf"""[\[,]\s*(?:[\w.~-]*/)*gunicorn\s*,\s*{_ARG}""")),
    # `gunicorn ... --workers 4` further along the line
    ("command line", re.compile(r"""(?<![\w.-])gunicorn\b[^\n]*\s--(?:workers|bind|worker-class|config|timeout|threads)\b""")),
    # GUNICORN_CMD_ARGS set anywhere: NAME=..., NAME: ..., ENV NAME ..., export NAME, - name: NAME,
    # key: NAME (Render), os.environ["NAME"], setdefault("NAME", ...), {"NAME": ...}; prose may name it.
    ("GUNICORN_CMD_ARGS", re.compile(
        r"""(?:\b(?:ENV|export|name:|key:)\s*["']?|[\[({]\s*["'])GUNICORN_CMD_ARGS\b|\bGUNICORN_CMD_ARGS["']?\s*[:=]""")),
    # a YAML list item that is one of gunicorn's own options (k8s `args:` for an image whose command is gunicorn)
    ("option as a list item", re.compile(
        r"""^\s*-\s+["']?--(?:workers|worker-class|worker-connections|bind|graceful-timeout|keep-alive|max-requests"""
        r"""|forwarded-allow-ips|preload|threads|config)\b""")),
]
# A YAML block list whose item is gunicorn, followed by another item of the same list.
BLOCK_LIST = re.compile(rf"""^(?P<indent>[ \t]*)-[ \t]+{_CMD}[ \t]*(?:#.*)?\n(?:[ \t]*(?:#.*)?\n)*(?P=indent)-[ \t]+\S.*""", re.M)

# The one file that spells the forbidden forms on purpose: this checker.
SKIP = {"tests/unit/test_one_runtime.py"}
BINARY_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".ico", ".webp", ".woff", ".woff2", ".gz", ".zip")


def join_continuations(text: str) -> str:
    """Shell, Dockerfile and systemd lines ending in a backslash, joined."""
    return re.sub(r"\\[ \t]*\r?\n[ \t]*", " ", text)


def offending_lines(text: str) -> list[str]:
    """What in `text` gives gunicorn flags of its own (empty: nothing)."""
    found = []
    for line in join_continuations(text).splitlines():
        for what, rx in LINE_RULES:
            if rx.search(line):
                found.append(f"{what}: {line.strip()}")
                break
    for match in BLOCK_LIST.finditer(text):
        found.append("YAML list command: " + " | ".join(part.strip() for part in match.group(0).splitlines() if part.strip()))
    return found


def repo_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True)
    return [p for p in out.stdout.splitlines() if p not in SKIP and (REPO / p).is_file()]


def scan(paths) -> tuple[dict[str, list[str]], list[str]]:
    """(offending lines by file, files that are not UTF-8 text)."""
    bad, undecodable = {}, []
    for path in paths:
        if path.lower().endswith(BINARY_SUFFIXES):
            continue
        try:
            text = (REPO / path).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            undecodable.append(f"{path} ({exc.reason} at byte {exc.start})")
            continue
        if lines := offending_lines(text):
            bad[path] = lines
    return bad, undecodable


PLANTED = {
    "Procfile": "web: gunicorn -w 4 app.asgi:application",
    "app path only": "ExecStart=/srv/venv/bin/gunicorn app.asgi:application",
    "JSON list": 'command: ["gunicorn", "--bind", "0.0.0.0:8000"]',
    "YAML flow list, unquoted": "command: [gunicorn, --workers, '4']",
    "YAML block list": "containers:\n  - name: web\n    command:\n      - gunicorn\n      - --workers\n      - \"4\"\n",
    "YAML block list, path and comment": "    command:\n      - /app/.venv/bin/gunicorn  # the runtime\n\n      - app.asgi:application\n",
    "k8s args for the image's gunicorn": "        args:\n          - --workers=4\n",
    "config.env": "DEBUG=False\nGUNICORN_CMD_ARGS=--workers 4\n",
    "Ansible env template": "# {{ ansible_managed }}\nGUNICORN_CMD_ARGS={{ app_gunicorn_args }}\n",
    "Dockerfile ENV": 'FROM x\nENV GUNICORN_CMD_ARGS="--workers 4"\nCMD ["gunicorn"]\n',
    "k8s env entry": "        env:\n          - name: GUNICORN_CMD_ARGS\n            value: --workers 4\n",
    "Dockerfile continuation": "CMD exec gunicorn \\\n    --workers 4\n",
    "shell continuation, app path": "exec /srv/venv/bin/gunicorn \\\n  app.asgi:application\n",
    "systemd continuation": "ExecStart=/srv/venv/bin/gunicorn \\\n          -c /etc/gunicorn.py\n",
    "Python argv": 'subprocess.run(["gunicorn", "--workers", "4"], check=True)\n',
    "Python argv, path built": 'subprocess.Popen([str(VENV / "bin" / "gunicorn"), "--workers", "4"])\n',
    "Python -m": 'os.execvp(sys.executable, [sys.executable, "-m", "gunicorn", "-w", "4"])\n',
    "Python env": 'os.environ["GUNICORN_CMD_ARGS"] = "--workers 4"\n',
    "Python setdefault": 'os.environ.setdefault("GUNICORN_CMD_ARGS", "--workers 4")\n',
    "Dockerfile ENV, old form": "ENV GUNICORN_CMD_ARGS --workers 4\n",
    "fly.toml [env]": '[env]\n  GUNICORN_CMD_ARGS = "--workers 4"\n',
    "render.yaml envVars": "    envVars:\n      - key: GUNICORN_CMD_ARGS\n        value: --workers 4\n",
    "app.json env": '{"env": {"GUNICORN_CMD_ARGS": {"value": "--workers 4"}}}\n',
    "shell export": "export GUNICORN_CMD_ARGS\n",
}
CLEAN = {
    "Procfile": "web: gunicorn\nrelease: python manage.py migrate --noinput",
    "Dockerfile": 'CMD ["gunicorn"]\n',
    "YAML block list": "    command:\n      - gunicorn\n    ports:\n      - containerPort: 8000\n",
    "YAML flow list": "    command: [gunicorn]\n",
    "systemd": "ExecStart=/srv/chat/current/.venv/bin/gunicorn\n",
    "prose": "gunicorn with Uvicorn workers; the gunicorn.conf.py settings\n",
    "prose naming the variable": "no file sets `GUNICORN_CMD_ARGS` (gunicorn would read flags from it)\n",
    "Python package list": 'versions = {p: v for p in ("gunicorn", "websockets", "uvloop")}\n',
    "other tools' options": "kubectl rollout status deployment/chat-web --timeout=5m\n  - --namespace\n",
    "a continuation after gunicorn's line": "ExecStart=/srv/venv/bin/gunicorn\nExecReload=/bin/kill -HUP $MAINPID \\\n  --signal\n",
}


@pytest.mark.parametrize("name", PLANTED)
def test_detector_catches_each_planted_spelling(name):
    assert offending_lines(PLANTED[name]), f"not caught: {PLANTED[name]!r}"


@pytest.mark.parametrize("name", CLEAN)
def test_detector_passes_a_bare_gunicorn(name):
    assert offending_lines(CLEAN[name]) == []


def test_scan_reports_planted_files_and_fails_on_undecodable(tmp_path, monkeypatch):
    """scan() on real files: a planted manifest and a Latin-1 file are named."""
    import tests.unit.test_one_runtime as module

    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy/config.env").write_text("GUNICORN_CMD_ARGS=--workers 4\n")
    (tmp_path / "deploy/ok.yaml").write_text(CLEAN["YAML block list"])
    (tmp_path / "deploy/notes.txt").write_bytes("caf\xe9 gunicorn -w 4\n".encode("latin-1"))
    (tmp_path / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff")
    monkeypatch.setattr(module, "REPO", tmp_path)
    bad, undecodable = scan(["deploy/config.env", "deploy/ok.yaml", "deploy/notes.txt", "plot.png"])
    assert list(bad) == ["deploy/config.env"]
    assert [u.split()[0] for u in undecodable] == ["deploy/notes.txt"]


def test_no_file_spells_gunicorn_flags():
    files = repo_files()
    assert any(p.startswith("deploy/k8s/") for p in files) and "Dockerfile" in files and "Procfile" in files, files
    bad, undecodable = scan(files)
    assert not undecodable, f"not UTF-8 text, so not scanned (binary? add its suffix to BINARY_SUFFIXES): {undecodable}"
    assert not bad, f"gunicorn settings belong in gunicorn.conf.py only: {bad}"
