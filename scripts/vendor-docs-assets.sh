#!/usr/bin/env bash
# Refresh service/docs_assets/: the Swagger UI and ReDoc files /docs and /redoc load (service/docs.py), taken from
# their npm packages with the npm client, so the pages work offline and with no CDN.
#
#   scripts/vendor-docs-assets.sh [SWAGGER_UI_DIST_VERSION] [REDOC_VERSION]
#
# Keeps only what the pages load, plus the licences; writes the versions and the tarballs' integrity to
# service/docs_assets/README.md. ReDoc stays on 2.x: FastAPI's get_redoc_html writes the markup of ReDoc 2.
set -euo pipefail
swagger=${1:-5.35.0}
redoc=${2:-2.5.4}
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/service/docs_assets
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent --json "swagger-ui-dist@$swagger" "redoc@$redoc" > packed.json
mkdir swagger redoc
tar -xzf "swagger-ui-dist-$swagger.tgz" -C swagger
tar -xzf "redoc-$redoc.tgz" -C redoc
rm -rf "$out/swagger-ui" "$out/redoc"
mkdir -p "$out/swagger-ui" "$out/redoc"
cp swagger/package/{swagger-ui-bundle.js,swagger-ui-bundle.js.LICENSE.txt,swagger-ui.css,favicon-32x32.png,LICENSE,NOTICE} \
  "$out/swagger-ui/"
cp redoc/package/bundles/{redoc.standalone.js,redoc.standalone.js.LICENSE.txt} redoc/package/LICENSE "$out/redoc/"
# The bundles name source maps that are not shipped; browsers only ask for them with developer tools open.
integrity() { python3 -c "import json, sys; print(next(p['integrity'] for p in json.load(open('packed.json')) if p['name'] == sys.argv[1]))" "$1"; }
cat > "$out/README.md" <<MD
# Swagger UI and ReDoc, served by the service itself

/docs and /redoc (service/docs.py) load these files from /docs-assets/ instead of a CDN, so they work offline.
Refreshed by \`scripts/vendor-docs-assets.sh\` from the npm packages; only the files the pages load are kept,
with their licences. Unchanged from the packages.

| folder | npm package | version | licence | tarball integrity |
|---|---|---|---|---|
| \`swagger-ui/\` | \`swagger-ui-dist\` | $swagger | Apache-2.0 (\`LICENSE\`, \`NOTICE\`; bundled third-party notices in \`swagger-ui-bundle.js.LICENSE.txt\`) | \`$(integrity swagger-ui-dist)\` |
| \`redoc/\` | \`redoc\` | $redoc | MIT (\`LICENSE\`; bundled third-party notices in \`redoc.standalone.js.LICENSE.txt\`) | \`$(integrity redoc)\` |
MD
echo "service/docs_assets: swagger-ui-dist $swagger, redoc $redoc"
