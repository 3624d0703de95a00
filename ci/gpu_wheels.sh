#!/usr/bin/env bash
# Download the Python 3.12 x86-64 wheels that ci/gpu.sh installs on the GPU machine, which has no
# network: the server's pure-Python stack, the engine-core process's compiled pieces that the
# machine's image lacks, the grammar library (structured outputs) and jsonschema (its tests), and py-spy (ci/profile_serve.sh). Run here, from the repository root; .whl/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl  # one version of each package: two stop the install
platforms=(--platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_26_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)
download() {
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "$@"
}
download pydantic  # with the pydantic-core it pins, and its other needs
for package in fastapi starlette uvicorn annotated-doc opentelemetry-api prometheus-client \
    orjson httptools pyzmq msgspec setproctitle py-spy llguidance \
    jsonschema jsonschema-specifications referencing rpds-py attrs; do
    download --no-deps "$package"
done
ls .whl
