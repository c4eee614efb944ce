# The matrix-spoa agent (and the demo workers of docker-compose.yml).

# The Python base image; a machine that cannot pull it builds a stand-in
# (deploy/compose/python.Containerfile) and passes --build-arg PYTHON_IMAGE=...
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# Build the wheel, with the optional C speedup of the SPOP codec.
FROM ${PYTHON_IMAGE} AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY spoa ./spoa
# The bundled policies go into the wheel ("extends: synapse-workers" finds them).
COPY policies ./policies
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && python -c "import spoa.spop.codec as c; assert c.SPEEDUPS, 'C speedup missing'" \
    && python -c "from spoa.policy.loader import bundled_names as b; assert 'synapse-workers' in b()"

# The bundled policies; mount your own directory over /etc/spoa/policies.
COPY policies /etc/spoa/policies
# Where the agent writes the fallback's map for HAProxy and HAProxy makes its
# runtime API socket (a volume both share): the agent's, and writable by
# HAProxy's group (99, the official image's haproxy user); a new volume
# copies this directory.
RUN mkdir -p /run/matrix-spoa && chown nobody:99 /run/matrix-spoa \
    && chmod 2775 /run/matrix-spoa

USER nobody
# SPOP for HAProxy, and the agent's HTTP endpoint (metrics, health, status page).
EXPOSE 12345 12346
ENTRYPOINT ["spoa"]
CMD ["serve", "--policy", "/etc/spoa/policies/synapse-workers.yaml", \
     "--listen", "0.0.0.0:12345", "--http", "0.0.0.0:12346", \
     "--fallback-map", "/run/matrix-spoa/fallback.map", \
     "--haproxy-socket", "/run/matrix-spoa/haproxy.sock"]
