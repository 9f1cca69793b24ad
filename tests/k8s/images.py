"""Images the rendered pod specs name, built here (no registry is reachable).

The web and migration pods run the product image (tests.harness.app_image).
The Redis pod spec names the official `redis:8.0` image; `redis_image()`
builds a local stand-in carrying exactly that name:tag, so the rendered spec
runs unmodified: Debian 13's redis-server 8.0 on the local Debian base, with
the official image's uid/gid 999 "redis" and working directory /data. It is
not the official image (different base distribution, same Redis major.minor,
same command-line interface).
"""
from __future__ import annotations

import os
import subprocess

from tests.harness.debian_image import building, image_exists, python_base_image

DOCKERFILE = """\
FROM {base}
LABEL org.opencontainers.image.description="local stand-in for {tag} (tests/k8s/images.py): Debian 13 redis-server"
RUN groupadd --system --gid 999 redis \\
 && useradd --system --uid 999 --gid 999 --home-dir /data --no-create-home --shell /usr/sbin/nologin redis \\
 && apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server redis-tools \\
 && rm -rf /var/lib/apt/lists/* \\
 && mkdir -p /data && chown redis:redis /data
WORKDIR /data
EXPOSE 6379
CMD ["redis-server"]
"""


def redis_image(tag: str) -> str:
    """Build (once, cached by tag) a local image called `tag` with redis-server."""
    if image_exists(tag):
        return tag
    base = python_base_image()
    env = dict(os.environ, DOCKER_BUILDKIT="0")
    with building(tag):
        if image_exists(tag):  # built by another session while this one waited
            return tag
        r = subprocess.run(["docker", "build", "--network", "host", "-t", tag, "-"],
                           input=DOCKERFILE.format(base=base, tag=tag).encode(), env=env, capture_output=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"building {tag} failed:\n{r.stdout.decode()[-3000:]}\n{r.stderr.decode()[-3000:]}")
    return tag
