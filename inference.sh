#!/usr/bin/env bash
# Render a prompt with the reference Infinity-RoPE configuration.
#   bash inference.sh "a fox runs[5s] | the fox jumps[5s] | a city at night[10s#] ; run | jump | city"
#   bash inference.sh                       # every prompt of prompts/infinity_rope_prompts.txt
#   bash inference.sh "<prompt>" --config_path configs/tiny.yaml     # CPU, random weights
#   bash inference.sh --live                # steer the video from a local web page while it plays
#   bash inference.sh fps=8 --seed 3       # no prompt: the prompt file, with these flags and overrides
# Anything after the prompt goes to inference.py (flags and key=value config overrides, in any order).
# A first argument that starts with '-' or looks like an override (key=value, key.sub=value) is not a
# prompt: the prompt file is rendered with it (write --prompt "..." for a prompt of that shape).
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
# The prompt file and the reference config unless the arguments name a source of their own (a
# prompt, a prompt file, a replayed video or live control) or a config (--replay brings its own).
source=false
config=(--config_path configs/infinity_rope.yaml)
for arg in "$@"; do
    case "$arg" in
        --prompt | --prompt=* | --data_path | --data_path=* | --live) source=true ;;
        --replay | --replay=*) source=true; config=() ;;
    esac
    case "$arg" in --config_path | --config_path=*) config=() ;; esac
done
override='^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*='
if ! $source && [ $# -ge 1 ] && [ "${1#-}" = "$1" ] && ! [[ $1 =~ $override ]]; then
    prompt=$1
    shift
    exec python inference.py ${config[@]+"${config[@]}"} --prompt "$prompt" "$@"
fi
if $source; then
    exec python inference.py ${config[@]+"${config[@]}"} "$@"
fi
exec python inference.py ${config[@]+"${config[@]}"} --data_path prompts/infinity_rope_prompts.txt "$@"
