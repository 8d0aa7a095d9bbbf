"""The deployment guide (docs/deployment.md) stays in step with the service and the manifests: every setting in
its table, and the commands people run.

    pytest tests/deploy/test_docs.py
"""

from __future__ import annotations

import re

from deploy_helpers import DOCS, default_of, ordered_setting_names

#: A row of the settings table: | `VARIABLE` | default | meaning |
ROW = re.compile(r"^\| `(MNIST_SERVE_[A-Z0-9_]+)` \| ([^|]+) \| (.+) \|$", re.MULTILINE)


def test_settings_table_lists_every_setting_and_nothing_else() -> None:
    rows = ROW.findall(DOCS.read_text())
    # Every setting once, in the order `mnist-serve --help` lists them.
    assert [name for name, _, _ in rows] == ordered_setting_names()
    for name, default, meaning in rows:
        # The service's own default, as --help shows it (a value the image sets may follow in brackets).
        shown = default_of(name)
        expected = "unset" if shown == "unset" else f"`{shown}`"
        assert default == expected or default.startswith(f"{expected} (image: "), (name, default, expected)
        assert len(meaning.strip()) > 10, name


def test_names_the_commands_people_run() -> None:
    text = DOCS.read_text()
    for command in ("docker compose up -d --build", "docker compose --profile grafana up -d", "kubectl kustomize k8s",
                    "kubectl apply -k k8s", "make test-containers", "podman-compose"):  # fmt: skip
        assert command in text, command
    assert re.search(r"\*\*Size: \d+ MB\*\*", text), "the measured image size"
