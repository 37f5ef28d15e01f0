"""Write example photographs that ship inside scikit-image (no download) and a JSONL manifest.

Usage: python scripts/write_examples.py OUT_DIR   -> OUT_DIR/images/*.jpg, OUT_DIR/manifest.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NAMES = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field",
         "immunohistochemistry", "retina", "skin", "cat", "horse"]


def main(out: str) -> int:
    from PIL import Image
    from skimage import data

    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for name in NAMES:
        loader = getattr(data, name, None)
        if loader is None:
            continue
        try:
            arr = loader()
        except Exception as exc:  # some images need an optional download cache: skip them
            print(f"skip {name}: {exc}", file=sys.stderr)
            continue
        img = Image.fromarray(arr if arr.dtype.kind == "u" else (arr * 255).astype("uint8"))
        path = (root / "images" / f"{name}.jpg").resolve()
        img.convert("RGB").save(path, quality=90)
        rows.append({"image": str(path), "name": name})
    with (root / "manifest.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} images and {root / 'manifest.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "examples"))
