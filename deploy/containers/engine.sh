#!/usr/bin/env bash
# podman (else docker) with what this host needs (env.sh); `build` keeps the image's
# HEALTHCHECK, which podman's default OCI format drops.
#   deploy/containers/engine.sh build -t rnnserve .      deploy/containers/engine.sh ps
set -euo pipefail
. "$(dirname "$0")/env.sh"
if [ "$(basename "$ENGINE")" = podman ] && [ "${1:-}" = build ]; then
    shift
    set -- build --format docker "$@"
fi
exec "$ENGINE" "$@"
