#!/usr/bin/env bash
# Regenerate sandtree/_pb/ from ../../proto (see gen.py); run after any change to the proto.
set -euo pipefail
cd "$(dirname "$0")"
exec "${PYTHON:-python3}" gen.py "$@"
