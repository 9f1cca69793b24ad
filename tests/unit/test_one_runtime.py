"""Every target runs exactly `gunicorn`: the settings live in gunicorn.conf.py.

Scans every manifest, unit, template and script in the repository (tracked or
new, not ignored; Python modules are code, not manifests) outside the tests
for a gunicorn command line that carries flags or an app path of its own.
"""
import re
import subprocess

from tests.harness.services import REPO

# `gunicorn -w 4`, `gunicorn app.asgi:application`, `["gunicorn", "--bind", ...]`,
# `exec gunicorn --config x` ... but not prose such as "gunicorn with Uvicorn workers".
FLAGGED = [
    re.compile(r"""\bgunicorn[ \t]+(-|[\w.]+:[\w.]+)"""),
    re.compile(r"""["']gunicorn["']\s*,\s*["']"""),
    re.compile(r"""\bgunicorn\b[^\n]*\s--(workers|bind|worker-class|config|timeout|threads)\b"""),
]
SKIP = ("tests/", "requirements", "README.md", "gunicorn.conf.py")


def repo_files():
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True)
    return [p for p in out.stdout.splitlines() if not p.startswith(SKIP) and not p.endswith(".py") and (REPO / p).is_file()]


def offending_lines(text):
    return [line.strip() for line in text.splitlines() for rx in FLAGGED if rx.search(line)]


def test_detector_catches_flags():
    assert offending_lines("web: gunicorn -w 4 app.asgi:application")
    assert offending_lines('command: ["gunicorn", "--bind", "0.0.0.0:8000"]')
    assert offending_lines("ExecStart=/srv/venv/bin/gunicorn app.asgi:application")
    assert not offending_lines("web: gunicorn\nrelease: python manage.py migrate --noinput")
    assert not offending_lines('CMD ["gunicorn"]')


def test_no_manifest_spells_gunicorn_flags():
    bad = {}
    for path in repo_files():
        try:
            text = (REPO / path).read_text()
        except UnicodeDecodeError:
            continue
        if lines := offending_lines(text):
            bad[path] = lines
    assert not bad, f"gunicorn settings belong in gunicorn.conf.py only: {bad}"
