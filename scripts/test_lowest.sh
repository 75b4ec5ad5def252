#!/usr/bin/env bash
# Prove pyproject.toml's lower bounds true: build a throwaway virtual environment holding exactly the
# lowest versions it allows (constraints-lowest.txt, extras included) and run the test suite there.
# Not part of `make test` / CI: PyPI has no CPU-only wheel of torch 2.6, so its CUDA build and the
# nvidia-* packages come along (~3 GB download, ~6 GB on disk; they run on CPU), and the suite takes
# 10-15 minutes. The project's own environment (.venv, scripts/setup_env.sh) is never touched.
#
#   PYTHON=python3     interpreter to test with (PYTHON=python3.10 for the oldest supported Python)
#   LOWEST_VENV=       where the throwaway environment lives (default: /tmp/alignment-lowest-pyXY)
#   arguments          go to pytest instead of `tests` (e.g. tests/test_client.py -x)
#
# The vLLM tests need vLLM's own environment (`make test-vllm`) and are not run here; neither is the
# [gpu] extra installed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
PYTHON=${PYTHON:-python3}
tag=$("$PYTHON" -c 'import sys; print("py%d%d" % sys.version_info[:2])')
VENV=$(realpath -m "${LOWEST_VENV:-${TMPDIR:-/tmp}/alignment-lowest-$tag}")
for own in .venv .venv-vllm; do
  if [[ $VENV == "$(realpath -m "$root/$own")" ]]; then
    echo "test_lowest: LOWEST_VENV must not be the project's $own" >&2
    exit 2
  fi
done
py=$VENV/bin/python

# Idempotent: a stamp records a hash of what decides the environment.
inputs=(constraints-lowest.txt pyproject.toml scripts/test_lowest.sh)
want="$tag-$(cat "${inputs[@]}" | sha256sum | cut -c1-16)"
stamp=$VENV/.alignment-lowest
if [[ ! -x $py || ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "test_lowest: preparing $VENV" >&2
  [[ -x $py ]] || "$PYTHON" -m venv "$VENV"
  # scripts/setup_env.sh's constraint (torch 2.13.0+cpu) must not leak in from the caller.
  unset PIP_CONSTRAINT
  pip=("$py" -m pip --disable-pip-version-check)
  quiet() { "$@" 2> >(grep -v 'is neither a file nor a directory' >&2); }
  quiet "${pip[@]}" install --quiet --upgrade pip
  quiet "${pip[@]}" install --quiet -c constraints-lowest.txt -e ".[wandb,notebook,dev]"
  quiet "${pip[@]}" check
  # Every pin that applies here must be what is installed: a package nothing asked for would be
  # silently skipped. Pins for requirements this Python or these extras leave out ([gpu]) are skipped.
  "$py" - constraints-lowest.txt <<'EOF'
import importlib.metadata as md
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

wanted = set()
for spec in md.requires("alignment") or []:
    req = Requirement(spec)
    if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", "wandb", "notebook", "dev")):
        wanted.add(canonicalize_name(req.name))
wrong = []
for raw in open(sys.argv[1], encoding="utf-8"):
    line = raw.split("#", 1)[0].strip()
    if not line:
        continue
    name, version = line.split("==")
    if canonicalize_name(name) not in wanted:
        continue
    try:
        got = md.version(name)
    except md.PackageNotFoundError:
        got = "not installed"
    if got.split("+")[0] != version:
        wrong.append(f"{name}: want {version}, have {got}")
if not wanted or wrong:
    sys.exit("test_lowest: installed versions differ from constraints-lowest.txt:\n  " + "\n  ".join(wrong))
EOF
  echo "$want" > "$stamp"
fi
"$py" -c 'import sys, torch, transformers, trl
print(f"test_lowest: Python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, trl {trl.__version__}", file=sys.stderr)'

# The same settings as `make test`; toy models are built by this environment's transformers, and
# the shell scripts under test (slurm/common.sh) run this interpreter instead of the project's .venv.
export PYTHONPATH=$root HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 RAY_AUTH_MODE=disabled
export ALIGNMENT_TEST_MODELS=$VENV/toy-test PYTHON=$py
(($#)) || set -- tests
exec "$py" -m pytest -p no:cacheprovider --ignore=tests/test_vllm_engine.py "$@"
