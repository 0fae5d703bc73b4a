#!/bin/sh
# As the official image does: redis-server without a config file listens on every address of
# the container, so its protected mode (which refuses other hosts) is turned off.
if [ "${1:-}" = redis-server ] && [ ! -f "${2:-}" ]; then
    shift
    set -- redis-server --protected-mode no "$@"
fi
exec "$@"
