#!/usr/bin/env bash
# The chat page test drives a real headless Chromium, and the PNG plot test draws text with a
# system font. Installs Debian's chromium and fonts-dejavu-core when missing (as root with apt),
# else says how.
set -euo pipefail
if ! ls /usr/share/fonts/truetype/*/*.ttf /usr/share/fonts/*/*.ttf >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends fonts-dejavu-core >/dev/null 2>&1 ||
      { apt-get update -qq && apt-get install -y -qq --no-install-recommends fonts-dejavu-core >/dev/null; }
  else
    echo "the PNG plot test needs a system font: install fonts-dejavu-core" >&2
    exit 1
  fi
fi
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
