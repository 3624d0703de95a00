#!/usr/bin/env bash
# The README's test command: lint, then the whole test suite, in nox-managed virtualenvs.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m nox -s lint tests
