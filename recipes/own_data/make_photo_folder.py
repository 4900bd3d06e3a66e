"""Make a folder of ~200 captioned photographs from the sample images shipped inside scikit-image.

    python recipes/own_data/make_photo_folder.py OUT [--per-photo 20] [--corrupt 2]

Each of the 10 photographs (a cat, a cup of coffee, an astronaut, a rocket, ...) is augmented into
``--per-photo`` images (a random crop of 50-100 % of its side, a horizontal flip, brightness and colour
jitter, JPEG/PNG/greyscale/RGBA variants, some rotated in the file with an EXIF orientation tag), each
captioned by a template naming the subject. Captions go to ``metadata.jsonl`` (the imagefolder layout), and
``--corrupt`` unreadable files are added so that the skip-and-count path is exercised too. Needs
scikit-image (installed with the test extra).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance
from skimage import data

SUBJECTS = {
    "chelsea": "a cat",
    "coffee": "a cup of coffee",
    "astronaut": "an astronaut",
    "rocket": "a rocket on its launch pad",
    "hubble_deep_field": "galaxies in deep space",
    "immunohistochemistry": "a stained tissue sample under a microscope",
    "colorwheel": "a colour wheel",
    "retina": "a photograph of a retina",
    "moon": "the surface of the moon",
    "coins": "old coins on a table",
}
TEMPLATES = ["a photo of {}", "{}", "a picture showing {}", "a close-up of {}", "a cropped photo of {}"]


def _photo(name: str) -> Image.Image:
    try:
        array = getattr(data, name)()
    except Exception:  # an image this scikit-image release does not bundle: use the cat instead
        array = data.chelsea()
    return Image.fromarray(np.asarray(array))


def _augment(image: Image.Image, rng: random.Random) -> Image.Image:
    width, height = image.size
    side = int(min(width, height) * rng.uniform(0.5, 1.0))
    left, top = rng.randint(0, width - side), rng.randint(0, height - side)
    out = image.crop((left, top, left + side, top + side))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.8, 1.2))
    if out.mode == "RGB":
        out = ImageEnhance.Color(out).enhance(rng.uniform(0.7, 1.3))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--per-photo", type=int, default=20)
    parser.add_argument("--corrupt", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out, rng = Path(args.out), random.Random(args.seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, subject in SUBJECTS.items():
        photo = _photo(name)
        for i in range(args.per_photo):
            image = _augment(photo, rng)
            file_name = f"{name}_{i:03d}"
            kind = rng.random()
            if kind < 0.6:
                file_name += ".jpg"
                image.convert("RGB").save(out / file_name, quality=rng.randint(70, 95))
            elif kind < 0.8:
                file_name += ".png"
                image.convert("RGBA" if rng.random() < 0.5 else "RGB").save(out / file_name)
            else:  # stored rotated with an EXIF tag that turns it back upright (orientation 6: 90° clockwise)
                file_name += ".jpg"
                exif = Image.Exif()
                exif[0x0112] = 6
                image.convert("RGB").rotate(90, expand=True).save(out / file_name, exif=exif, quality=90)
            rows.append({"file_name": file_name, "caption": rng.choice(TEMPLATES).format(subject)})
    for i in range(args.corrupt):
        (out / f"broken_{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * (i + 1))
        rows.append({"file_name": f"broken_{i}.jpg", "caption": "an unreadable file"})
    with open(out / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"{len(rows)} captioned files ({args.corrupt} corrupt) in {out}")


if __name__ == "__main__":
    main()
