# Helpers shared by the project's scripts. Sourced, not run.

step() { printf '\n==> %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# ensure_apt cmd:package ... — installs the packages whose command is missing.
# apt never starts daemons here (policy-rc.d), and our scripts start their own.
ensure_apt() {
    local missing=() pair cmd pkg
    for pair in "$@"; do
        cmd=${pair%%:*} pkg=${pair#*:}
        if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ] && [ ! -x "/usr/bin/$cmd" ]; then
            missing+=("$pkg")
        fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        step "installing ${missing[*]} from apt"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
}

# kosoku runs the Autobahn test cases (tests/it/autobahn.rs finds it in .venv).
ensure_kosoku() {
    if [ ! -x .venv/bin/kosoku ]; then
        ensure_apt python3:python3
        python3 -m venv .venv 2>/dev/null || { ensure_apt python3:python3-venv; python3 -m venv .venv; }
        .venv/bin/pip install -q --disable-pip-version-check 'kosoku==0.1.0'
    fi
}

ensure_nextest() {
    if ! cargo nextest --version >/dev/null 2>&1; then
        step "installing cargo-nextest"
        cargo install --locked cargo-nextest
    fi
}

# A free TCP port on 127.0.0.1.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_port PORT [SECONDS] — until something accepts on 127.0.0.1:PORT.
wait_port() {
    local port=$1 deadline=$((SECONDS + ${2:-15}))
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || { echo "nothing listening on $port" >&2; return 1; }
        sleep 0.05
    done
}

# wait_http URL [SECONDS] — until URL answers 200.
wait_http() {
    local url=$1 deadline=$((SECONDS + ${2:-15}))
    # --max-time: a process that accepts but never answers must not stall the wait.
    until [ "$(curl -s --max-time 2 -o /dev/null -w '%{http_code}' "$url" 2>/dev/null)" = 200 ]; do
        [ $SECONDS -lt $deadline ] || { echo "$url never answered 200" >&2; return 1; }
        sleep 0.1
    done
}
