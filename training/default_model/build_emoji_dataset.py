"""Build the 64x64 emoji image/caption dataset (HF `imagefolder`) for the default model.

Art comes from emoji-datasource (Noto and Twemoji PNGs) and captions from emojibase-data's
English CLDR labels/tags, because the Unicode names shipped in emoji-datasource are often
misleading (e.g. "heavy black heart" for the red heart). All packages are fetched with
`npm pack` at pinned versions so the build is reproducible.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

from PIL import Image

PACKAGES = {
    "google": "emoji-datasource-google@16.0.0",
    "twitter": "emoji-datasource-twitter@16.0.0",
    "emojibase": "emojibase-data@17.0.0",
}
IMAGE_SIZE = 64
TEST_PERCENT = 5

NOTICE = """\
Emoji dataset for the ldm-app default model (64x64 PNGs, captions from CLDR).

Artwork:
- Noto Emoji, Copyright Google Inc., Apache License 2.0
  (https://www.apache.org/licenses/LICENSE-2.0), via emoji-datasource-google@16.0.0.
- Twemoji, Copyright Twitter, Inc. / X Corp. and other contributors, CC-BY-4.0
  (https://creativecommons.org/licenses/by/4.0/), via emoji-datasource-twitter@16.0.0.
  Images were resized/composited onto white.

Metadata:
- emoji-datasource by Cal Henderson (iamcal), MIT License (image lookup tables).
- emojibase-data@17.0.0 by Miles Johnson, MIT License (English CLDR labels and tags;
  CLDR data Copyright Unicode, Inc., Unicode License).
"""


def npm_tarball(spec: str, cache: Path) -> Path:
    """Download one npm package tarball into `cache` (once) and return its path."""
    name, version = spec.rsplit("@", 1)
    path = cache / f"{name}-{version}.tgz"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", spec, "--silent"], cwd=cache, check=True,
                       stdout=subprocess.DEVNULL)
    return path


def read_json(tar: tarfile.TarFile, member: str) -> list | dict:
    return json.load(tar.extractfile(member))


def norm_hex(hexcode: str) -> str:
    """Codepoint key without variation selectors, so both packages agree."""
    return "-".join(p for p in hexcode.upper().split("-") if p != "FE0F")


def is_test(codepoints: str) -> bool:
    """Deterministic ~5 % hold-out by codepoint, so every style of an emoji lands together."""
    digest = hashlib.sha256(codepoints.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < TEST_PERCENT


def to_rgb_on_white(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png)).convert("RGBA")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image).convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=Path("~/ldm-runs/data/emoji64"))
    parser.add_argument("--cache", type=Path, default=Path("~/ldm-runs/npm-cache"))
    args = parser.parse_args()
    out, cache = args.output.expanduser(), args.cache.expanduser()
    if (out / "test" / "metadata.jsonl").exists():
        print(f"{out} already built; delete it to rebuild")
        return

    # --- fetch pinned packages ---
    tarballs = {key: npm_tarball(spec, cache) for key, spec in PACKAGES.items()}

    # --- CLDR captions keyed by codepoints ---
    with tarfile.open(tarballs["emojibase"]) as tar:
        cldr = {norm_hex(e["hexcode"]): e for e in read_json(tar, "package/en/data.json")}

    # --- images per style (base emoji only: skin variations are nested and skipped) ---
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    for split in rows:
        (out / split).mkdir(parents=True, exist_ok=True)
    for source in ("google", "twitter"):
        with tarfile.open(tarballs[source]) as tar:
            for entry in read_json(tar, "package/emoji.json"):
                info = cldr.get(norm_hex(entry["unified"]))
                if not entry[f"has_img_{source}"] or info is None:
                    continue
                member = f"package/img/{source}/{IMAGE_SIZE}/{entry['image']}"
                image = to_rgb_on_white(tar.extractfile(member).read())
                split = "test" if is_test(entry["unified"]) else "train"
                file_name = f"{source}_{entry['unified'].lower()}.png"
                image.save(out / split / file_name, optimize=True)
                rows[split].append({
                    "file_name": file_name,
                    "text": info["label"],
                    "tags": info.get("tags", []),
                    "source": source,
                    "codepoints": entry["unified"],
                    "category": entry["category"],
                })

    # --- metadata + notice ---
    for split, items in rows.items():
        with open(out / split / "metadata.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in items)
        print(split, len(items), dict(Counter(r["source"] for r in items)))
    (out / "NOTICE").write_text(NOTICE)
    (Path(__file__).parent / "NOTICE").write_text(NOTICE)


if __name__ == "__main__":
    main()
