"""Extract the OpenAPI v3 schemas of KServe's CRDs into kserve-crd-schemas.json.gz, which the deployment tests
validate k8s/kserve/ against offline.

    python tests/deploy/kserve/extract_schemas.py <kserve checkout>/config/crd/full

Reads serving.kserve.io_inferenceservices.yaml and serving.kserve.io_servingruntimes.yaml and writes, for each
served version, `{"<group>/<version>/<Kind>": <spec.versions[].schema.openAPIV3Schema>}` as compact, gzipped
JSON (mtime 0, so the same input gives the same bytes). Record the commit in README.md beside it.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import yaml

CRDS = ("serving.kserve.io_inferenceservices.yaml", "serving.kserve.io_servingruntimes.yaml")
OUT = Path(__file__).with_name("kserve-crd-schemas.json.gz")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    schemas = {}
    for name in CRDS:
        crd = yaml.safe_load((Path(argv[0]) / name).read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schemas[f"{group}/{version['name']}/{kind}"] = version["schema"]["openAPIV3Schema"]
    payload = json.dumps(schemas, separators=(",", ":"), sort_keys=True).encode()
    OUT.write_bytes(gzip.compress(payload, compresslevel=9, mtime=0))
    print(f"{OUT.name}: {', '.join(schemas)} ({len(payload):,} bytes of JSON, {OUT.stat().st_size:,} gzipped)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
