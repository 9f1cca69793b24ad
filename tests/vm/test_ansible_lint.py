"""deploy/ansible passes ansible-lint's production profile (no hosts needed)."""
import subprocess

from tests.vm.lab import ANSIBLE_DIR, BIN


def test_ansible_lint_production_profile():
    result = subprocess.run(
        [str(BIN / "ansible-lint"), "--nocolor", "--profile", "production", "--strict"],
        cwd=ANSIBLE_DIR, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Profile 'production' was required, and it passed" in output, output


def test_playbook_syntax():
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), "--syntax-check", "-i", "inventory.example.ini", "site.yml"],
        cwd=ANSIBLE_DIR, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
