# One image for the relay (`continuum`, the default command) and the oracle
# (`continuum-oracle serve`); charts/continuum runs both from it.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Both services default to 127.0.0.1, which nothing outside the container reaches.
ENV CONTINUUM_HOST=0.0.0.0 \
    CONTINUUM_ORACLE_HOST=0.0.0.0

# Only what `pip install .` needs: the packages pyproject.toml lists, and the
# README it names as the long description. Tests and benchmarks stay out.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY runtime ./runtime
COPY continuum ./continuum
COPY client ./client
COPY oracle ./oracle
COPY demo ./demo
# The runtime dependencies only: the `test` extra (pytest, playwright, helm…) is not for production.
RUN pip install . && rm -rf /src

# A numeric user, so Kubernetes' runAsNonRoot can verify it (the chart runs as
# the same uid). The working directory is its own: run without the chart, the
# oracle keeps its default oracle.key and oracle.db there.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /var/lib/continuum \
        --shell /usr/sbin/nologin continuum \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/continuum
WORKDIR /var/lib/continuum
USER 10001:10001

# 8470: relay WebSocket, /healthz and /metrics; 8480: oracle dashboard and API.
EXPOSE 8470 8480
CMD ["continuum"]
