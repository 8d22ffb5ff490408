# The benchmark cluster, shared by scripts/smoke and loadtest/scripts/*: the cluster
# launcher (sb-cluster, faults/src/cluster.rs; the one scripts/cluster and the fault
# suite use) on free loopback ports in a fresh run directory, stopped on exit
# (KEEP=<dir> keeps the logs). Sourced after scripts/lib.sh, not run. Binaries come
# from $BENCH_BIN (target/<profile>).

# bench_begin NAME — the run directory and the exit trap.
bench_begin() {
    ensure_apt nats-server:nats-server redis-server:redis-server haproxy:haproxy curl:curl
    BENCH_RUN=$(mktemp -d)
    trap bench_end EXIT
}

bench_end() {
    if [ -x "${BENCH_BIN:-}/sb-cluster" ]; then
        "$BENCH_BIN/sb-cluster" --run "$BENCH_RUN" stop >/dev/null || true
    fi
    if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp -r "$BENCH_RUN"/. "$KEEP"/; fi
    rm -rf "$BENCH_RUN"
}

# bench_build PROFILE PACKAGE... — builds the packages and the launcher's (BUILD=0
# skips it) and sets BENCH_BIN.
bench_build() {
    local profile=$1
    shift
    local pkgs=(-p switchboard-faults -p switchboard-gateway -p switchboard-demo-backend
                -p switchboard-loadtest)
    for p in "$@"; do pkgs+=(-p "$p"); done
    if [ "${BUILD:-1}" != 0 ]; then
        if [ "$profile" = release ]; then
            cargo build --release --locked -q "${pkgs[@]}"
        else
            cargo build --locked -q "${pkgs[@]}"
        fi
    fi
    BENCH_BIN=target/$profile
}

# bench_cluster [sb-cluster up flags ...] — NATS and Redis without persistence, the
# gateways (`--gateways N`, set up for load: no per-address connect limit, no
# per-user connection limit, warnings only; `--gateway-env SB_X=v` on top), the
# workers (`--workers N`), the STUB mock-llm (`--stub-args "..."`), HAProxy and the
# team backend; returns once all serve, with $BENCH_RUN/cluster.env loaded: SECRET,
# API_KEY, LLM_PORT, PORT_GW<n>, ADMIN_GW<n>, ADMIN_WORKER<n>, PID_<NAME> (PID_GW1,
# PID_WORKER1, PID_NATS, PID_REDIS, PID_LLM, ...).
bench_cluster() {
    if ! "$BENCH_BIN/sb-cluster" --run "$BENCH_RUN" up --detach --free-ports --no-prometheus \
        --llm stub --bin-dir "$BENCH_BIN" \
        --gateway-env SB_CONNECT_RATE_PER_IP=1000000 --gateway-env SB_CONNECT_BURST_PER_IP=1000000 \
        --gateway-env SB_MAX_CONNECTIONS_PER_USER=0 --gateway-env SB_LOG=warn \
        --worker-env SB_LOG=warn "$@" >"$BENCH_RUN/up.log" 2>&1; then
        cat "$BENCH_RUN/up.log" >&2
        return 1
    fi
    # shellcheck disable=SC1091
    source "$BENCH_RUN/cluster.env"
}
