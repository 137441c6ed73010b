"""Validates rendered Kubernetes manifests strictly against the bundled OpenAPI schemas.

Usage: validate_manifests.py KUBERNETES_VERSION FILE...

Every document must match its schema with unknown fields rejected (`kubernetes-validate --strict`).
Unlike the kubernetes-validate CLI, a kind without a schema is an error here, not a warning, and so
is an empty rendering: "zero schema errors" must mean every manifest was actually checked.
"""

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml


def validate_file(path: Path, version: str) -> tuple[int, list[str]]:
    """Returns the number of documents checked and the errors found."""
    documents: list[Any] = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    errors: list[str] = []
    if not documents:
        errors.append(f"{path}: no manifests rendered")
    seen: Counter[tuple[str, str]] = Counter()
    for doc in documents:
        kind = doc.get("kind", "?")
        name = doc.get("metadata", {}).get("name", "?")
        seen[(kind, name)] += 1
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            errors.append(f"{path}: {kind}/{name}: {where}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(f"{path}: {kind}/{name}: {error.message}")
    errors.extend(f"{path}: {kind}/{name} rendered {count} times" for (kind, name), count in seen.items() if count > 1)
    return len(documents), errors


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    version, files = argv[0], [Path(name) for name in argv[1:]]
    total, failures = 0, []
    for path in files:
        count, errors = validate_file(path, version)
        total += count
        failures.extend(errors)
        print(f"{path.name}: {count} manifests, {len(errors)} errors")
    for line in failures:
        print(f"ERROR {line}", file=sys.stderr)
    print(f"kubernetes {version} (strict): {total} manifests in {len(files)} renderings, {len(failures)} errors")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
