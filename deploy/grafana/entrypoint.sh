#!/bin/sh
# Grafana's entrypoint in docker-compose.yml: no default admin password.
#
# GRAFANA_ADMIN_PASSWORD set (shell or .env): Grafana's admin gets it. Unset: a random password is generated once,
# on the first start, into the data volume (admin-password, readable by the grafana user only) and Grafana reads
# it from there; the log says where to find it. Grafana applies an admin password only when it creates its
# database (the first start): to change it later, use Grafana's UI or `grafana cli admin reset-admin-password`.
# Then runs the command it is given (the image's /run.sh).
set -eu
file="${GF_PATHS_DATA:-/var/lib/grafana}/admin-password"
if [ -n "${GRAFANA_ADMIN_PASSWORD:-}" ]; then
  GF_SECURITY_ADMIN_PASSWORD="$GRAFANA_ADMIN_PASSWORD"
  export GF_SECURITY_ADMIN_PASSWORD
  echo "grafana: the admin password is GRAFANA_ADMIN_PASSWORD (applied when Grafana creates its database)"
else
  if [ ! -s "$file" ]; then
    umask 077
    password="$(LC_ALL=C tr -dc 'A-Za-z0-9' < /dev/urandom | head -c 32)"
    [ "${#password}" -eq 32 ] || { echo "grafana: could not generate a password" >&2; exit 1; }
    printf '%s\n' "$password" > "$file.tmp"
    mv "$file.tmp" "$file"
    echo "grafana: generated a random admin password into $file (the grafana-data volume)"
  fi
  echo "grafana: log in as admin with: docker compose exec grafana cat $file"
  GF_SECURITY_ADMIN_PASSWORD__FILE="$file"
  export GF_SECURITY_ADMIN_PASSWORD__FILE
fi
unset GRAFANA_ADMIN_PASSWORD
exec "$@"
