#!/usr/bin/env bash
# The chat page test drives a real headless Chromium. Installs Debian's chromium when missing
# (as root with apt), else says how.
set -euo pipefail
for b in chromium chromium-browser google-chrome; do
  command -v "$b" >/dev/null && exit 0
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
  exit 0
fi
echo "the tests need a headless Chromium: install the chromium package" >&2
exit 1
