#!/usr/bin/env bash
# Make the local base image the test images are built on: Debian bookworm with Python 3.11,
# from Debian's own packages (no image registry needed), imported into podman or docker.
#   deploy/containers/base.sh [IMAGE]     (default localhost/rnnserve-base:bookworm)
# It takes about half a minute; an image that exists already is kept (REBUILD=1 remakes it).
set -euo pipefail
cd "$(dirname "$0")/../.."

image=${1:-localhost/rnnserve-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
. deploy/containers/env.sh

if [ "${REBUILD:-0}" != 1 ] && "$ENGINE" image inspect "$image" >/dev/null 2>&1; then
    echo "base image $image: exists"
    exit 0
fi
command -v mmdebstrap >/dev/null 2>&1 || {
    echo "base.sh: needs mmdebstrap (apt-get install mmdebstrap)" >&2
    exit 1
}
mkdir -p build
# --variant=apt: Essential packages and apt; python3-venv makes the image's virtualenv;
# ca-certificates lets a user's build reach the package index over TLS.
mmdebstrap --quiet --variant=apt --include=python3,python3-venv,ca-certificates \
    bookworm build/base.tar "$mirror"
"$ENGINE" import build/base.tar "$image" >/dev/null
rm -f build/base.tar
echo "base image $image: built"
