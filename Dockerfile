# Multi-stage build of the Switchboard binaries. Targets:
#   gateway       - the gateway (entrypoint /usr/local/bin/gateway)
#   worker        - the worker (entrypoint /usr/local/bin/worker)
#   demo-backend  - the STAND-IN team backend with the demo page (not part of the product)
#   runtime       - all binaries, including the STUB mock-llm and mock-backend
# Runtime images are Debian slim, run as a non-root user, and hold only the binaries
# and CA certificates (for TLS to an LLM or a team backend).
FROM rust:1.95-slim-bookworm AS build
# gcc builds aws-lc (the one TLS and JWT crypto provider); no cmake needed.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
      -p switchboard-gateway -p switchboard-worker -p switchboard-loadtest \
      -p switchboard-demo-backend \
 && mkdir -p /out \
 && cp target/release/gateway target/release/worker target/release/mock-llm \
       target/release/mock-backend target/release/loadtest target/release/demo-backend /out/

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin switchboard
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001

FROM runtime AS gateway
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/gateway"]

FROM runtime AS worker
EXPOSE 9091
ENTRYPOINT ["/usr/local/bin/worker"]

# STAND-IN team backend: demo logins, teams, tasks, and the demo page with the
# JavaScript client (only the files the page loads; no node_modules).
FROM runtime AS demo-backend
COPY clients/demo/ /srv/clients/demo/
COPY clients/js/switchboard.js clients/js/switchboard.d.ts /srv/clients/js/
EXPOSE 18091
ENTRYPOINT ["/usr/local/bin/demo-backend", "--listen", "0.0.0.0:18091", "--static-dir", "/srv/clients"]
