#!/usr/bin/env python3
"""The software bill of materials of the appliance's Rust binaries (ops/image/build).

Prints a CycloneDX 1.5 JSON document: every crate linked into smartsignd and smartsign-ctl
(normal dependencies for x86_64 Linux, from `cargo metadata`), with its version, licence, the
package URL and the SHA-256 that Cargo.lock pins for it, and the dependency graph. Deterministic:
the time is SOURCE_DATE_EPOCH and the serial number is derived from the commit.
"""

import argparse
import datetime
import json
import subprocess
import tomllib
import uuid

ROOTS = ("smartsignd", "smartsign-ops")
TARGET = "x86_64-unknown-linux-gnu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-date-epoch", type=int, required=True)
    parser.add_argument("--commit", required=True)
    args = parser.parse_args()

    metadata = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", TARGET],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    with open(metadata["workspace_root"] + "/Cargo.lock", "rb") as lock:
        checksums = {
            (p["name"], p["version"]): p.get("checksum")
            for p in tomllib.load(lock)["package"]
        }
    packages = {p["id"]: p for p in metadata["packages"]}
    nodes = {n["id"]: n for n in metadata["resolve"]["nodes"]}

    def linked(node_id: str) -> list[str]:
        """The node's dependencies that end up in the binary (no dev or build ones)."""
        return sorted(
            dep["pkg"]
            for dep in nodes[node_id]["deps"]
            if any(kind["kind"] is None for kind in dep["dep_kinds"])
        )

    roots = [pid for pid, p in packages.items() if p["name"] in ROOTS and pid in nodes]
    seen: set[str] = set()
    pending = list(roots)
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        pending.extend(linked(current))

    def ref(pid: str) -> str:
        p = packages[pid]
        return f"pkg:cargo/{p['name']}@{p['version']}"

    components = []
    for pid in sorted(seen, key=ref):
        p = packages[pid]
        component = {
            "type": "application" if p["name"] in ROOTS else "library",
            "bom-ref": ref(pid),
            "name": p["name"],
            "version": p["version"],
            "purl": ref(pid),
        }
        if p.get("license"):
            component["licenses"] = [{"expression": p["license"]}]
        checksum = checksums.get((p["name"], p["version"]))
        if checksum:
            component["hashes"] = [{"alg": "SHA-256", "content": checksum}]
        if p.get("repository"):
            component["externalReferences"] = [{"type": "vcs", "url": p["repository"]}]
        components.append(component)

    time = datetime.datetime.fromtimestamp(args.source_date_epoch, datetime.timezone.utc)
    document = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, "smartsign:" + args.commit)),
        "version": 1,
        "metadata": {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "component": {
                "type": "operating-system",
                "bom-ref": "smartsign-appliance",
                "name": "smartsign appliance image",
                "version": args.commit,
            },
        },
        "components": components,
        "dependencies": [
            {"ref": ref(pid), "dependsOn": [ref(dep) for dep in linked(pid)]}
            for pid in sorted(seen, key=ref)
        ],
    }
    print(json.dumps(document, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
