# The matrix-spoa agent (and the demo workers of docker-compose.yml).

# Build the wheel, with the optional C speedup of the SPOP codec.
FROM python:3.11.11-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY spoa ./spoa
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11.11-slim-bookworm
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && python -c "import spoa.spop.codec as c; assert c.SPEEDUPS, 'C speedup missing'"

# The bundled policies; mount your own directory over /etc/spoa/policies.
COPY policies /etc/spoa/policies

USER nobody
# SPOP for HAProxy, and the agent's HTTP endpoint (metrics, health, status page).
EXPOSE 12345 12346
ENTRYPOINT ["spoa"]
CMD ["serve", "--policy", "/etc/spoa/policies/synapse-workers.yaml", \
     "--listen", "0.0.0.0:12345", "--http", "0.0.0.0:12346"]
