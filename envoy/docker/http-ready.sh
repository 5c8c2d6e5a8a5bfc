#!/bin/bash
# http-ready HOST PORT PATH — exits 0 when `GET PATH` on HOST:PORT answers 200, else 1.
#
# The compose health checks use it: the runtime images (debian:bookworm-slim, the Ubuntu-based
# envoyproxy/envoy) carry bash but neither curl nor wget, and installing them only for a probe
# would widen every image. Speaks just enough HTTP/1.1 (Envoy's admin refuses HTTP/1.0).
set -u
if [ "$#" -ne 3 ]; then
  echo "usage: http-ready HOST PORT PATH" >&2
  exit 2
fi
host="$1" port="$2" path="$3"
exec 3<>"/dev/tcp/${host}/${port}" || exit 1
printf 'GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$host" >&3 || exit 1
IFS=' ' read -r -t 5 _version status _reason <&3 || exit 1
[ "$status" = "200" ]
