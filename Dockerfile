# The production image: `docker build -t chat .` then run it with the
# environment described in the README (DATABASE_URL, REDIS_URL, SECRET_KEY,
# ALLOWED_HOSTS). It runs as a non-root numeric UID on a read-only root file
# system (only /tmp must be writable) and serves with the bare `gunicorn`
# command, which reads gunicorn.conf.py (port from $PORT, default 8000).
#
# PYTHON_IMAGE may point at any Debian-based Python 3.13 image, e.g. a local
# mirror: docker build --build-arg PYTHON_IMAGE=registry.example/python:3.13-slim-trixie .
ARG PYTHON_IMAGE=python:3.13-slim-trixie

# --- build: a virtualenv with the production lock, then collectstatic -------
FROM ${PYTHON_IMAGE} AS build
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /app
# The lock alone first: this layer stays cached until requirements.txt changes.
# Every line carries --hash, so pip verifies each download (hash-checking mode).
COPY requirements.txt ./
RUN pip install --no-deps --require-hashes -r requirements.txt \
 && pip uninstall -y pip \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +
COPY . .
# Throwaway settings: no secret, database or Redis is needed (or baked in).
RUN DJANGO_SETTINGS_MODULE=app.settings_build python manage.py collectstatic --noinput \
 && python -m compileall -q -j 0 /app/app /opt/venv/lib \
 && rm -f db.sqlite3

# --- runtime: the interpreter, the venv and the app; no pip, no compilers --
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DJANGO_SETTINGS_MODULE=app.settings \
    DEBUG=False \
    PORT=8000
RUN groupadd --system --gid 10001 chat \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin chat
# Owned by root and not writable by the app user: the code cannot be changed at run time.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
USER 10001:10001
EXPOSE 8000
# Liveness without curl: /healthz answers whatever the Host (app/probes.py).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os,sys,urllib.request as u; r=u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT','8000'), timeout=4); sys.exit(0 if r.status == 200 else 1)"]
CMD ["gunicorn"]
