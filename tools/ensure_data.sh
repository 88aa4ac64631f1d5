#!/usr/bin/env bash
# Make sure Fashion-MNIST can be loaded offline; install Debian's package when it cannot.
set -euo pipefail
PY="${1:-python3}"
check() { "$PY" -c "import bnutils.data as d; d.load_dataset('fashion_mnist', download=False)" >/dev/null 2>&1; }
if check; then echo "Fashion-MNIST: found"; exit 0; fi
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "Fashion-MNIST: not found, installing Debian's dataset-fashion-mnist"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
if check; then echo "Fashion-MNIST: found"; exit 0; fi
# Last resort: the loader's own error, which lists every place searched and the fix.
"$PY" -c "import bnutils.data as d; d.load_dataset('fashion_mnist')"
