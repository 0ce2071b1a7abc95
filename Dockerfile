# syntax=docker/dockerfile:1
# qkdproxy container image: installs only from PyPI and Debian, runs as a non-root user.
#
#   docker build -t qkdproxy .
#   docker run --rm -v $PWD/conf:/etc/qkdproxy:ro -p 9443:9443 -p 9100:9100 qkdproxy
#
# Volumes: /etc/qkdproxy (read-only): qkdproxy.toml and the PEM files it names.
# Ports (as configured): 8443 plaintext of a client tunnel, 9443 TLS of a server tunnel,
# 9100 status (/metrics /healthz /readyz /status). Inside a container the status listener
# must listen on 0.0.0.0 with `allow_public = true` to be reachable by probes and Prometheus.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY qkdproxy ./qkdproxy
RUN python -m venv /opt/qkdproxy \
 && /opt/qkdproxy/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/qkdproxy/bin/pip install --no-cache-dir .

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin qkdproxy
COPY --from=build /opt/qkdproxy /opt/qkdproxy
ENV PATH=/opt/qkdproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Private keys bind-mounted into /etc/qkdproxy must be readable by uid 10001
# (chown 10001 key.pem; keep mode 0600). Kubernetes: fsGroup 10001, defaultMode 0440.
USER 10001:10001
VOLUME ["/etc/qkdproxy"]
EXPOSE 8443 9443 9100
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=2)"]
ENTRYPOINT ["qkdproxy"]
CMD ["run", "--config", "/etc/qkdproxy/qkdproxy.toml"]
