# syntax=docker/dockerfile:1
# qkdproxy container image: installs only from PyPI and Debian, runs as a non-root user.
#
#   docker build -t qkdproxy:latest .
#   docker run --rm -v $PWD/conf:/etc/qkdproxy:ro -p 9443:9443 -p 9100:9100 qkdproxy:latest
#
# Kubernetes: load the image into the cluster's nodes (kind load docker-image
# qkdproxy:latest; minikube image load qkdproxy:latest) or push it to your registry; the
# manifests in deploy/kubernetes use qkdproxy:latest with imagePullPolicy IfNotPresent.
#
# Volumes: /etc/qkdproxy (read-only): qkdproxy.toml and the PEM files it names.
# Ports (as configured): 8443 plaintext of a client tunnel, 9443 TLS of a server tunnel,
# 9100 status (/metrics /healthz /readyz /status).
# Inside a container, loopback is the container's own:
# - the status listener must listen on 0.0.0.0:9100 with `allow_public = true` to be
#   reachable by the HEALTHCHECK's peers, probes and Prometheus (the HEALTHCHECK itself
#   calls 127.0.0.1:$QKDPROXY_STATUS_PORT; set it if your [status] port is not 9100, e.g.
#   -e QKDPROXY_STATUS_PORT=9102 for etc/qkdproxy-client.toml);
# - a client tunnel whose application runs in another container must listen on 0.0.0.0
#   and set `allow_public_plaintext = true`: plaintext then leaves the container, so only
#   publish that port to the application (a Kubernetes sidecar needs neither: the pod
#   shares 127.0.0.1).

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
    PYTHONUNBUFFERED=1 \
    QKDPROXY_STATUS_PORT=9100
# Private keys bind-mounted into /etc/qkdproxy must be readable by uid 10001
# (chown 10001 key.pem; keep mode 0600). Kubernetes: fsGroup 10001, defaultMode 0440.
USER 10001:10001
VOLUME ["/etc/qkdproxy"]
EXPOSE 8443 9443 9100
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['QKDPROXY_STATUS_PORT'], timeout=2)"]
ENTRYPOINT ["qkdproxy"]
CMD ["run", "--config", "/etc/qkdproxy/qkdproxy.toml"]
