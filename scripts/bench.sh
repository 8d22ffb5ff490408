# The benchmark cluster, shared by scripts/smoke and loadtest/scripts/*: fresh
# nats-server (JetStream) and redis-server, gateways, workers and the STUB mock-llm,
# each on free loopback ports, logs in one run directory, all stopped on exit
# (KEEP=<dir> keeps the logs). Sourced after scripts/lib.sh, not run. Binaries come
# from $BENCH_BIN (target/<profile>).

# bench_begin NAME — the run directory, the exit trap, and this run's HS256 secret
# and API key (BENCH_SECRET, BENCH_API_KEY).
bench_begin() {
    ensure_apt nats-server:nats-server redis-server:redis-server curl:curl
    BENCH_RUN=$(mktemp -d)
    BENCH_PIDS=()
    trap bench_end EXIT
    BENCH_SECRET="$1-secret-$(date +%s)-0123456789abcdef0123456789"
    BENCH_API_KEY="$1-api-key-$(date +%s)"
}

bench_end() {
    local p
    for p in "${BENCH_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp -r "$BENCH_RUN"/. "$KEEP"/; fi
    rm -rf "$BENCH_RUN"
}

# bench_build PROFILE PACKAGE... — builds the packages (BUILD=0 skips it) and sets
# BENCH_BIN.
bench_build() {
    local profile=$1
    shift
    local pkgs=()
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

# bench_state — NATS and Redis without persistence; sets BENCH_NATS_URL,
# BENCH_REDIS_URL, BENCH_NATS_PID, BENCH_REDIS_PID.
bench_state() {
    local nats_port redis_port
    nats_port=$(free_port) redis_port=$(free_port)
    mkdir -p "$BENCH_RUN/js"
    nats-server -a 127.0.0.1 -p "$nats_port" -js -sd "$BENCH_RUN/js" >"$BENCH_RUN/nats.log" 2>&1 &
    BENCH_NATS_PID=$!
    redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$BENCH_RUN" >"$BENCH_RUN/redis.log" 2>&1 &
    BENCH_REDIS_PID=$!
    BENCH_PIDS+=("$BENCH_NATS_PID" "$BENCH_REDIS_PID")
    wait_port "$nats_port"
    wait_port "$redis_port"
    BENCH_NATS_URL="nats://127.0.0.1:$nats_port"
    BENCH_REDIS_URL="redis://127.0.0.1:$redis_port"
}

# bench_gateway ID [SB_X=value ...] — a gateway set up for load (no per-address
# connect limit, no per-user connection limit), with the given settings on top;
# waits until ready. Sets GW_PORT, GW_ADMIN, GW_PID.
bench_gateway() {
    local id=$1
    shift
    GW_PORT=$(free_port) GW_ADMIN=$(free_port)
    env SB_JWT_SECRET="$BENCH_SECRET" SB_API_KEY="$BENCH_API_KEY" \
        SB_NATS_URL="$BENCH_NATS_URL" SB_REDIS_URL="$BENCH_REDIS_URL" \
        SB_LISTEN="127.0.0.1:$GW_PORT" SB_ADMIN_LISTEN="127.0.0.1:$GW_ADMIN" SB_NODE_ID="$id" \
        SB_CONNECT_RATE_PER_IP=1000000 SB_CONNECT_BURST_PER_IP=1000000 \
        SB_MAX_CONNECTIONS_PER_USER=0 SB_LOG_FORMAT=text SB_LOG=warn "$@" \
        "$BENCH_BIN/gateway" >"$BENCH_RUN/$id.log" 2>&1 &
    GW_PID=$!
    BENCH_PIDS+=("$GW_PID")
    wait_http "http://127.0.0.1:$GW_ADMIN/readyz"
}

# bench_llm_stub [mock-llm flags ...] — the STUB LLM; sets LLM_PORT, LLM_PID.
bench_llm_stub() {
    LLM_PORT=$(free_port)
    "$BENCH_BIN/mock-llm" --listen "127.0.0.1:$LLM_PORT" "$@" >"$BENCH_RUN/mock-llm.log" 2>&1 &
    LLM_PID=$!
    BENCH_PIDS+=("$LLM_PID")
    wait_port "$LLM_PORT"
}

# bench_worker ID [SB_X=value ...] — a worker on the stub LLM; waits until ready.
# Sets WORKER_ADMIN, WORKER_PID.
bench_worker() {
    local id=$1
    shift
    WORKER_ADMIN=$(free_port)
    env SB_NATS_URL="$BENCH_NATS_URL" SB_REDIS_URL="$BENCH_REDIS_URL" \
        SB_ADMIN_LISTEN="127.0.0.1:$WORKER_ADMIN" SB_NODE_ID="$id" \
        SB_LLM_BASE_URL="http://127.0.0.1:$LLM_PORT/v1" SB_LOG_FORMAT=text SB_LOG=warn "$@" \
        "$BENCH_BIN/worker" >"$BENCH_RUN/$id.log" 2>&1 &
    WORKER_PID=$!
    BENCH_PIDS+=("$WORKER_PID")
    wait_http "http://127.0.0.1:$WORKER_ADMIN/readyz"
}
