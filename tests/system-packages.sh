#!/usr/bin/env bash
# Debian packages the test suite needs, installed only when missing (needs root, as CI has):
# openssl makes the throwaway TLS certificate for the STARTTLS / implicit TLS tests, and
# chromium is the browser the preview tests drive (Playwright cannot download its own here);
# postgresql brings initdb and pg_ctl, for the throwaway server the PostgreSQL store tests start.
set -euo pipefail
need=()
command -v openssl >/dev/null || need+=(openssl)
command -v chromium >/dev/null || need+=(chromium fonts-dejavu-core)
command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
