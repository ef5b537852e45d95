#!/usr/bin/env bash
# Set up infinity-rope in ./.venv, then fetch the weights.
#
#   bash setup_env.sh             install the project, download the weights (python -m utils.hub)
#   bash setup_env.sh --dev       install the project and the test tools (+ Debian chromium for the browser test); no weights
#   bash setup_env.sh --all       also download the optional weights (see python -m utils.hub -h)
#
# Environment: PYTHON (interpreter for a new .venv, default python3), TORCH_VERSION (default 2.13.0).
# An existing .venv is reused, so a second run only re-checks the packages and the weights.
set -euo pipefail
cd "$(dirname "$0")"

DEV=0
HUB_ARGS=()
for arg in "$@"; do
    case "$arg" in
        --dev) DEV=1 ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) HUB_ARGS+=("$arg") ;;  # handed to python -m utils.hub
    esac
done
if [ "$DEV" = 1 ] && [ "${#HUB_ARGS[@]}" -gt 0 ]; then
    echo "setup_env.sh: --dev downloads no weights; drop ${HUB_ARGS[*]}" >&2
    exit 2
fi

if [ -x .venv/bin/python ]; then
    echo "==> reusing .venv"
else
    echo "==> creating .venv with ${PYTHON:-python3}"
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

echo "==> upgrading pip"
python -m pip install --quiet --upgrade pip

# torch first, pinned: on this project's CPU machines the pin resolves to the local CPU wheel; on
# GPU machines PyPI's CUDA build of the same version. Set TORCH_VERSION, or preinstall torch into
# .venv, to use another build (torch >= 2.8: the tests pass with 2.8.0, 2.9.1, 2.11.0 and 2.13.0).
if [ -z "${TORCH_VERSION:-}" ] && python -c "import torch" 2>/dev/null; then
    echo "==> keeping the installed torch $(python -c 'import torch; print(torch.__version__)')"
else
    echo "==> installing torch==${TORCH_VERSION:-2.13.0}"
    python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
fi

if [ "$DEV" = 1 ]; then
    echo "==> installing infinity-rope with test tools (pip install -e .[dev])"
    python -m pip install --quiet -e ".[dev]"
    # the live page's browser test drives a real headless Chromium (Debian's packages)
    if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
        echo "==> chromium and chromedriver found"
    elif command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then
        echo "==> installing chromium and chromium-driver (apt-get) for the live page's browser test"
        SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "==> no chromium/chromedriver and no apt-get as root: tests/test_live_browser.py will be skipped" \
             "(install your system's chromium and its chromedriver to run it)"
    fi
    echo "==> done (no weights downloaded); run the tests with: .venv/bin/python -m pytest -q -n 2 --dist loadfile"
    exit 0
fi

echo "==> installing infinity-rope (pip install -e .)"
python -m pip install --quiet -e .

echo "==> downloading weights: python -m utils.hub${HUB_ARGS[*]:+ ${HUB_ARGS[*]}}"
python -m utils.hub ${HUB_ARGS[@]+"${HUB_ARGS[@]}"}
echo "==> done; activate with: . .venv/bin/activate"
