# The matrix-spoa agent (and the demo workers of docker-compose.yml).
FROM python:3.11.11-slim-bookworm

WORKDIR /src
COPY pyproject.toml README.md ./
COPY spoa ./spoa
RUN pip install --no-cache-dir . && rm -rf /src

# The bundled policies; mount your own directory over /etc/spoa/policies.
COPY policies /etc/spoa/policies

USER nobody
# SPOP for HAProxy, and the agent's HTTP endpoint (metrics, health, status).
EXPOSE 12345 9090
ENTRYPOINT ["spoa"]
CMD ["serve", "--policy", "/etc/spoa/policies/synapse-workers.yaml", \
     "--listen", "0.0.0.0:12345", "--http", "0.0.0.0:9090"]
