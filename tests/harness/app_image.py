"""The product image, built here from the local Debian 13 base.

No registry is reachable, so the Dockerfile's `PYTHON_IMAGE` build argument
points at `chat-test/debian-python:trixie` (Python 3.13, like
python:3.13-slim-trixie). `docker build` reuses its layer cache, so a second
call costs a second or two; pass `rebuild=False` to skip even that when the tag
exists.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.harness.debian_image import building, image_exists, python_base_image

REPO = Path(__file__).resolve().parents[2]
DOCKER = os.environ.get("CHAT_TEST_DOCKER", "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else "docker")


def build_app_image(tag: str = "chat-test/app:latest", *, dockerfile: str | os.PathLike | None = None,
                    context: str | os.PathLike | None = None, rebuild: bool = True) -> str:
    """Build the product Dockerfile (cached by Docker's layer cache) and return `tag`.

    `dockerfile`/`context` default to the repository's Dockerfile and root;
    the Fly emulation passes the path it resolved from fly.toml.
    """
    if not rebuild and image_exists(tag):
        return tag
    base = python_base_image()
    cmd = [DOCKER, "build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={base}",
           "-f", str(dockerfile or REPO / "Dockerfile"), "-t", tag, str(context or REPO)]
    env = dict(os.environ, DOCKER_BUILDKIT="0" if DOCKER != "/usr/bin/docker" else os.environ.get("DOCKER_BUILDKIT", "1"))
    with building(tag):  # the other lane of `make test` may build the same tag
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"docker build failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return tag


if __name__ == "__main__":
    print(build_app_image())
