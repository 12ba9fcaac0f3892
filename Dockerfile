# One image for every CRM Bridge process; the command picks the role (see docs/deploy.md):
#   console    python server.py                 (port 8501, behind the reverse proxy)
#   worker     crmbridge sync worker            (any number; PostgreSQL)
#   scheduler  crmbridge scheduler              (one, or a few for availability)
#   migrate    crmbridge db upgrade             (once per deploy, before the others start)
# Build: docker build -t crmbridge:VERSION .
FROM python:3.12-slim-bookworm AS build
# xmlsec (python3-saml's signatures) builds against libxmlsec1 where no wheel fits the platform
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config libxml2-dev libxmlsec1-dev libxmlsec1-openssl \
 && rm -rf /var/lib/apt/lists/*
# Exactly uv.lock (hashes checked, nothing re-resolved), as `make` installs it; uv pinned as in the Makefile.
RUN pip install --no-cache-dir "uv==0.13.9"
ENV UV_PROJECT_ENVIRONMENT=/opt/venv UV_PYTHON_DOWNLOADS=never UV_COMPILE_BYTECODE=1
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
COPY core ./core
COPY sandbox ./sandbox
# Editable on purpose: the project runs from /app (migrations/, alembic.ini, server.py, pages/ live there),
# and the `crmbridge` command imports the same /app/core.
RUN uv sync --frozen --no-cache --python /usr/local/bin/python

FROM python:3.12-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends libxml2 libxmlsec1 libxmlsec1-openssl tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin crmbridge
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=root:root . /app
# Production settings: no demo, listen on every interface of the container (the proxy is in front).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CRMBRIDGE_DEMO=0 \
    CRMBRIDGE_BIND_ADDRESS=0.0.0.0 \
    CRMBRIDGE_PORT=8501
USER crmbridge
EXPOSE 8501
# The console answers GET /healthz (200 when the database answers); compose checks it (workers and the
# scheduler serve no HTTP: watch `crmbridge scheduler status` and the Overview instead).
# tini forwards SIGTERM so a worker or scheduler finishes the job in hand before it exits
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "server.py"]
