#!/usr/bin/env bash
# Fails when a layer includes a header from a layer above it. Layers, bottom to top:
# fdpass <- qmp <- broker. Relative includes are resolved before they are judged.
# Usage: check-layering.sh SOURCE_ROOT
set -euo pipefail
root=$(cd "${1:-.}" && pwd)
layers=(fdpass qmp broker)
rank() { local i; for i in "${!layers[@]}"; do [[ ${layers[$i]} == "$1" ]] && { echo "$i"; return; }; done; echo -1; }

status=0
for layer in "${layers[@]}"; do
  mine=$(rank "$layer")
  [[ -d $root/$layer ]] || continue
  while IFS= read -r -d '' file; do
    while IFS=: read -r line inc; do
      target=$inc
      if [[ $inc == .* ]]; then
        # Resolve a relative include against the including file's directory.
        target=$(realpath -m --relative-to="$root" "$(dirname "$file")/$inc")
      fi
      top=${target%%/*}
      theirs=$(rank "$top")
      if (( theirs > mine )); then
        echo "layering: ${file#"$root"/}:$line includes \"$inc\": $layer may not depend on $top" >&2
        status=1
      fi
    done < <(grep -noE '^[[:space:]]*#[[:space:]]*include[[:space:]]*"[^"]+"' "$file" \
               | sed -E 's/^([0-9]+):.*"([^"]+)"/\1:\2/')
  done < <(find "$root/$layer" -type f \( -name '*.cpp' -o -name '*.hpp' \) -print0)
done
exit $status
