#!/usr/bin/env bash
# Regenerate the README's TensorBoard screenshots: train the Lightning digits example, serve
# its run with TensorBoard on 127.0.0.1, and capture the Custom Scalars, Histograms and Text
# tabs with headless Chromium. Needs Debian's chromium (apt-get install chromium) and the
# project installed with the dev extra. Not run by CI.
#
# Usage: docs/make_screenshots.sh [python]   (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${1:-.venv/bin/python}"
tensorboard="$(dirname "$python")/tensorboard"

work="$(mktemp -d)"
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

"$python" examples/train_digits_lightning.py --epochs 5 --logdir "$work/runs"

# Ask the kernel for a free port on the loopback address.
port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$tensorboard" --logdir "$work/runs" --host 127.0.0.1 --port "$port" >"$work/tensorboard.log" 2>&1 &
server_pid=$!
ready=""
for _ in $(seq 60); do
    if "$python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/data/runs')" 2>/dev/null; then
        ready=1
        break
    fi
    sleep 1
done
if [[ -z "$ready" ]]; then
    echo "TensorBoard did not respond on 127.0.0.1:$port within 60 s; its log:" >&2
    cat "$work/tensorboard.log" >&2
    exit 1
fi

capture() {  # capture TAB FILE: screenshot one dashboard tab into docs/FILE
    rm -f "docs/$2"
    # --virtual-time-budget lets TensorBoard's single-page app fetch and draw its data
    # before the screenshot. Chromium's D-Bus and GPU complaints go to the log.
    chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$work/chromium" --hide-scrollbars --window-size=1400,900 \
        --virtual-time-budget=15000 --screenshot="docs/$2" "http://127.0.0.1:$port/#$1" \
        2>>"$work/chromium.log"
    if [[ ! -s "docs/$2" ]]; then
        echo "chromium wrote no docs/$2; its log:" >&2
        cat "$work/chromium.log" >&2
        exit 1
    fi
    echo "wrote docs/$2"
}
capture custom_scalars dashboard_custom_scalars.png
capture histograms dashboard_histograms.png
capture text dashboard_text.png
