#!/bin/sh
# As the official image does: flags alone are envoy's flags.
if [ "${1#-}" != "$1" ]; then
    set -- envoy "$@"
fi
exec "$@"
