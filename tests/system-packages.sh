#!/usr/bin/env bash
# Debian packages the test suite needs, installed only when missing (needs root, as CI has):
# openssl makes the throwaway TLS certificate for the STARTTLS / implicit TLS tests, and
# chromium is the browser the preview tests drive (Playwright cannot download its own here).
set -euo pipefail
need=()
command -v openssl >/dev/null || need+=(openssl)
command -v chromium >/dev/null || need+=(chromium fonts-dejavu-core)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
