#!/bin/sh
# Self-check of the command provisioner examples (not run by CI): shell syntax and shellcheck
# for every script, as written and as rendered into template.json; every JSON file parses;
# template.json is up to date with its sources; the templates use only the fields
# `POST /api/v1/templates` accepts; the scripts' parameter fallbacks match the defaults.
#
#   ./check.sh            needs sh, jq and shellcheck (apt-get install shellcheck)
set -eu

cd "$(dirname "$0")"
for tool in jq shellcheck; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "check.sh: $tool is required (e.g. apt-get install $tool)" >&2
    exit 1
  }
done

failures=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "== shell scripts: sh -n, shellcheck"
for f in ./*.sh ./*/*.sh; do
  sh -n "$f" || fail "$f: syntax"
  shellcheck -x -s sh "$f" || fail "$f: shellcheck"
done

echo "== JSON files parse"
for f in ./*/*.json; do
  jq empty "$f" || fail "$f: not JSON"
done

echo "== template.json is rendered from the current sources"
./render.sh --check || fail "run ./render.sh"

for dir in kubernetes docker ssh; do
  t="$dir/template.json"
  echo "== $t"
  # The fields of CreateTemplate, TemplateParameter, ParamValidation and CommandProvisioner
  # (schema/src/api.rs; all deny unknown fields) and the rules params::check_spec applies.
  problems=$(jq -r '
    def only($allowed; $where): keys - $allowed | map("\($where): unknown field \(.)") | .[];
    only(["name", "description", "parameters", "provisioner"]; "template"),
    (if (.name | type) != "string" or .name == "" then "template: name missing" else empty end),
    (.provisioner | only(["type", "create", "start", "stop", "delete", "timeout_seconds"]; "provisioner")),
    (if .provisioner.type != "command" then "provisioner: type is not command" else empty end),
    (if (.provisioner.create | type) != "string" then "provisioner: create missing" else empty end),
    (.parameters | map(.name) | group_by(.) | map(select(length > 1) | "parameter \(.[0]): duplicate") | .[]),
    (.parameters[] | . as $p | "parameter \($p.name)" as $w |
      only(["name", "type", "description", "default", "required", "options", "validation"]; $w),
      (if ["string", "number", "bool", "enum"] | index($p.type) | not then "\($w): bad type" else empty end),
      (if $p.type == "enum" and (($p.options // []) | length) == 0 then "\($w): enum without options" else empty end),
      (if $p.type == "enum" and has("default") and (($p.options // []) | index($p.default) | not)
        then "\($w): default not among the options" else empty end),
      (if has("default") and ({"string": "string", "enum": "string", "number": "number",
            "bool": "boolean"}[$p.type]) != ($p.default | type)
        then "\($w): default has the wrong type" else empty end),
      (($p.validation // {}) | only(["pattern", "min", "max", "min_length", "max_length"]; $w)),
      (if ($p.validation.pattern // "^$") | test("^\\^.*\\$$") | not
        then "\($w): pattern not anchored with ^...$" else empty end),
      (if $p.type == "string" and has("default") and ($p.validation.pattern // null) != null
          and ($p.default | test($p.validation.pattern) | not)
        then "\($w): default does not match the pattern" else empty end),
      (if $p.type == "number" and has("default") and
          (($p.validation.min // -1e308) > $p.default or ($p.validation.max // 1e308) < $p.default)
        then "\($w): default out of range" else empty end))
  ' "$t") || fail "$t: jq"
  if [ -n "$problems" ]; then
    fail "$t:"
    printf '%s\n' "$problems" | sed 's/^/    /'
  fi
  # The fallbacks in lib.sh (used for runs by hand) match the template's defaults.
  jq -r '.parameters[] | select(has("default"))
    | "${AGENTPLANE_PARAM_\(.name | ascii_upcase | gsub("[^A-Z0-9]"; "_")):-\(.default)}"' "$t" |
    while IFS= read -r expected; do
      grep -qF "$expected" "$dir/lib.sh" || echo "FAIL: $dir/lib.sh does not fall back to $expected"
    done >"$tmp/fallbacks"
  if [ -s "$tmp/fallbacks" ]; then
    cat "$tmp/fallbacks"
    failures=$((failures + $(wc -l <"$tmp/fallbacks")))
  fi
  for action in create start stop delete; do
    jq -r --arg a "$action" '.provisioner[$a] // empty' "$t" >"$tmp/$dir-$action.sh"
    [ -s "$tmp/$dir-$action.sh" ] || continue
    sh -n "$tmp/$dir-$action.sh" || fail "$t: $action: syntax"
    shellcheck -s sh "$tmp/$dir-$action.sh" || fail "$t: $action: shellcheck"
  done
done

if [ "$failures" -gt 0 ]; then
  echo "check.sh: $failures problem(s)"
  exit 1
fi
echo "check.sh: all good"
