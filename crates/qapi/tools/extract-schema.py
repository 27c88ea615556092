#!/usr/bin/env python3
"""Generate data/qmp-schema.json from a captured qemu-storage-daemon QMP transcript.

Usage: tools/extract-schema.py REFERENCE.json [OUTPUT]

REFERENCE.json is a JSON object holding at least the key "query-qmp-schema" with the
daemon's answer ({"return": [...]}). The storage daemon's schema is small (about 500
entities), so every entity is kept; the library restricts it to the commands and events
qsd implements at run time. Output is a JSON array with one entity per line, in the
daemon's order, so diffs against a newer qemu stay readable.
"""
import json
import sys


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    with open(sys.argv[1], encoding="utf-8") as f:
        doc = json.load(f)
    entities = doc["query-qmp-schema"]["return"]
    names = [e["name"] for e in entities]
    if len(names) != len(set(names)):
        sys.exit("duplicate entity names in the schema")
    lines = [json.dumps(e, separators=(",", ":"), ensure_ascii=False) for e in entities]
    text = "[\n" + ",\n".join(lines) + "\n]\n"
    out = sys.argv[2] if len(sys.argv) == 3 else "data/qmp-schema.json"
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {len(entities)} entities to {out}")


if __name__ == "__main__":
    main()
