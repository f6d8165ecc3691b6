#!/usr/bin/env bash
# Rewrites constraints.txt: the environment pip resolves from pyproject.toml (every extra), frozen.
# Run from the repository root after changing a pin in pyproject.toml; commit both files together.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q -e '.[test,tracking,t5]'
{
    sed -n '1,3p' constraints.txt
    "$tmp/venv/bin/pip" freeze --exclude-editable
} > "$tmp/constraints.txt"
mv "$tmp/constraints.txt" constraints.txt
echo "constraints.txt: $(grep -c '==' constraints.txt) packages pinned"
