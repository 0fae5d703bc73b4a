# Sourced by the scripts here (bash): ENGINE (podman, else docker; or as given) and, for podman
# on a host whose hard open-files limit is below podman's default for containers (1048576),
# the settings of containers.conf beside this file.
ENGINE=${ENGINE:-$(command -v podman >/dev/null 2>&1 && echo podman || echo docker)}
if ! command -v "$ENGINE" >/dev/null 2>&1; then
    echo "$(basename "$0"): needs podman or docker (apt-get install podman)" >&2
    exit 1
fi
if [ "$(basename "$ENGINE")" = podman ] && [ -z "${CONTAINERS_CONF:-}" ]; then
    hard=$(ulimit -Hn)
    if [ "$hard" != unlimited ] && [ "$hard" -lt 1048576 ]; then
        CONTAINERS_CONF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/containers.conf
        export CONTAINERS_CONF
    fi
fi
export ENGINE
