#!/usr/bin/env bash
# Container entry point: `NAME args...` runs launch/NAME.py (train, evaluate, prepare_data, ...);
# anything else (torchrun, mlflow, bash, python) runs as given.
set -euo pipefail
cd /app
if [ "$#" -gt 0 ] && [ -f "launch/$1.py" ]; then
    script="launch/$1.py"
    shift
    exec python "$script" "$@"
fi
exec "$@"
