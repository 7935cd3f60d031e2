#!/usr/bin/env bash
# The test suite: the README's test command.
#
# Makes sure PostgreSQL and NATS answer on 127.0.0.1 (starting or installing
# them if needed, see scripts/services.sh), then runs every test of the
# workspace against them. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null; then
    echo "test: cargo is not installed; install Rust from https://rustup.rs first" >&2
    exit 1
fi

# shellcheck source=scripts/services.sh
source scripts/services.sh
ensure_openssl_dev
ensure_postgres
ensure_nats
ensure_python_websockets
echo "test: PostgreSQL at $RT_TEST_DATABASE_URL, NATS at $RT_TEST_NATS_URL"

cargo test --workspace --locked "$@"
