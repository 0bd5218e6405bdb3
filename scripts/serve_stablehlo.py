"""Classify images with an exported StableHLO model, using jax alone (no resnet_jax code).

    python -m resnet_jax.export --workdir runs/resnet18 --format stablehlo --out exported/r18
    python scripts/serve_stablehlo.py exported/r18 photo.jpg more.png

Prints one JSON line per image: {"path": ..., "top5": [{"class": ..., "prob": ...}, ...]}.
Needs jax, numpy and pillow: copy this file and the export folder to the serving machine
(CPU, GPU or TPU; a jax release at most 6 months newer, or 3 weeks older, than the
exporter's, as `jax.export` guarantees).

The model takes uint8 RGB images [batch, H, W, 3] and normalises them itself; preparing
each image (decode, resize, crop) is the caller's job, done here as model.json describes.
"""

import argparse
import json
import pathlib
import sys

import jax
import numpy as np
from PIL import Image, ImageOps


def prepare(path: pathlib.Path, image_size: int, resize_size: int) -> np.ndarray:
    """The image as the model's input: RGB, resized (and centre-cropped) as model.json says."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        width, height = image.size
        if not resize_size:
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
        else:
            if min(width, height) != resize_size:
                # The shorter side becomes resize_size, the other keeps the aspect ratio.
                if width <= height:
                    size = (resize_size, int(resize_size * height / width))
                else:
                    size = (int(resize_size * width / height), resize_size)
                image = image.resize(size, Image.Resampling.BILINEAR)
                width, height = image.size
            left = int(round((width - image_size) / 2.0))
            top = int(round((height - image_size) / 2.0))
            image = image.crop((left, top, left + image_size, top + image_size))
        return np.asarray(image, dtype=np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "export_dir", type=pathlib.Path, help="Folder written by resnet_jax.export."
    )
    parser.add_argument("images", nargs="+", type=pathlib.Path, help="Image files.")
    args = parser.parse_args()

    files = [args.export_dir / "model.json", args.export_dir / "model.stablehlo"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        sys.exit(
            f"error: {args.export_dir} has no {' or '.join(missing)}: give the folder of "
            "python -m resnet_jax.export ... --format stablehlo (which writes both)."
        )
    meta = json.loads(files[0].read_text())
    model = jax.export.deserialize(bytearray(files[1].read_bytes()))
    size, resize = meta["input"]["image_size"], meta["input"]["resize_size"]
    batch = []
    for path in args.images:
        try:
            batch.append(prepare(path, size, resize))
        except OSError as e:  # Missing, unreadable or not an image (PIL's errors are OSErrors).
            sys.exit(f"error: cannot read {path} as an image ({e}).")
    batch = np.stack(batch)

    outputs = np.asarray(model.call(batch))
    if meta["output"]["name"] == "logits":
        outputs = np.asarray(jax.nn.softmax(outputs))
    names = meta["class_names"]
    for path, probs in zip(args.images, outputs, strict=True):
        best = np.argsort(-probs)[:5]
        top5 = [{"class": names[i], "prob": float(probs[i])} for i in best]
        print(json.dumps({"path": str(path), "top5": top5}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
