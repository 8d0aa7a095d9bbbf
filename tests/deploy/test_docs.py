"""The README's deployment section stays in step with the service and the manifests: every setting in its
table, and the commands it gives point at files that exist.

    pytest tests/deploy/test_docs.py
"""

from __future__ import annotations

import re

from deploy_helpers import DOCS, setting_names


def test_settings_table_lists_every_setting_and_nothing_else() -> None:
    rows = re.findall(r"^\| `(MNIST_SERVE_[A-Z0-9_]+)` \|", DOCS.read_text(), re.MULTILINE)
    assert sorted(rows) == sorted(setting_names())


def test_names_the_commands_people_run() -> None:
    text = DOCS.read_text()
    for command in ("docker compose up -d --build", "docker compose --profile grafana up -d", "kubectl kustomize k8s",
                    "kubectl apply -k k8s", "make test-containers", "../shared/container/setup"):  # fmt: skip
        assert command in text, command
    assert re.search(r"\*\*Size: \d+ MB\*\*", text), "the measured image size"
