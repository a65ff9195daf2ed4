#!/usr/bin/env bash
# Fails when a layer includes a header from a layer above it. Layers, bottom to top, are the
# top-level libraries and the sub-libraries of broker/:
#   fdpass <- qmp <- broker/core <- broker/lifecycle <- broker/domain <- broker/xen <- broker/flows
#          <- broker/control <- broker/api <- broker/daemon
# A file belongs to the longest layer path that contains it, and so does an include's target.
# Relative includes are resolved before they are judged.
# Usage: check-layering.sh SOURCE_ROOT
set -euo pipefail
root=$(cd "${1:-.}" && pwd)
# "broker" holds files directly in broker/; each sub-library of broker/ must be listed.
layers=(fdpass qmp broker broker/core broker/lifecycle broker/domain broker/xen broker/flows broker/control
        broker/api broker/daemon)

# rank PATH: the index of the layer holding PATH (relative to the root), or -1 for none.
rank() {
  local best=-1 best_len=0 i
  for i in "${!layers[@]}"; do
    local l=${layers[$i]}
    if [[ $1 == "$l" || $1 == "$l"/* ]] && (( ${#l} > best_len )); then
      best=$i
      best_len=${#l}
    fi
  done
  echo "$best"
}

status=0
while IFS= read -r -d '' file; do
  rel=${file#"$root"/}
  mine=$(rank "$rel")
  (( mine >= 0 )) || continue
  if [[ ${layers[$mine]} == broker && $rel == broker/*/* ]]; then
    echo "layering: $rel: its folder is in no known layer; list it in scripts/check-layering.sh" >&2
    status=1
    continue
  fi
  while IFS=: read -r line inc; do
    target=$inc
    if [[ $inc == .* ]]; then
      # Resolve a relative include against the including file's directory.
      target=$(realpath -m --relative-to="$root" "$(dirname "$file")/$inc")
    fi
    theirs=$(rank "$target")
    if (( theirs > mine )); then
      echo "layering: $rel:$line includes \"$inc\": ${layers[$mine]} may not depend on ${layers[$theirs]}" >&2
      status=1
    fi
  done < <(grep -noE '^[[:space:]]*#[[:space:]]*include[[:space:]]*"[^"]+"' "$file" \
             | sed -E 's/^([0-9]+):.*"([^"]+)"/\1:\2/')
done < <(find "$root" \( -path "$root/fdpass/*" -o -path "$root/qmp/*" -o -path "$root/broker/*" \) \
           -type f \( -name '*.cpp' -o -name '*.hpp' \) -print0)
exit $status
