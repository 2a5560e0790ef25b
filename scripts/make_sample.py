"""Builds the bundled ClickMe-format sample (data/sample/val-0.tfrecords) used by `evaluate.py --sample`.

The images are public-domain / CC0 photographs shipped in the scikit-image wheel (skimage/data: astronaut
and rocket: public domain (NASA, SpaceX); chelsea and coffee: CC0). The human maps are SYNTHETIC: Gaussian
blobs placed by hand on the salient objects, not ClickMe data. Labels are the nearest ImageNet classes.

    pip download --no-deps scikit-image==0.26.0 -d /tmp/sk && unzip -o /tmp/sk/*.whl 'skimage/data/*' -d /tmp/sk
    python scripts/make_sample.py /tmp/sk/skimage/data
"""
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.tfrecord import encode_example, write_records  # noqa: E402

# file, ImageNet label, blob centres (x, y) in [0, 1] and their sigmas (fraction of the side)
IMAGES = [
    ("astronaut.png", 834, [((0.55, 0.25), 0.10), ((0.50, 0.60), 0.18)]),   # suit
    ("chelsea.png", 281, [((0.42, 0.35), 0.12), ((0.55, 0.60), 0.15)]),     # tabby
    ("coffee.png", 967, [((0.50, 0.45), 0.16)]),                            # espresso
    ("rocket.jpg", 657, [((0.47, 0.40), 0.08), ((0.47, 0.75), 0.10)]),      # missile
]


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def heatmap(blobs, size=256) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    h = sum(np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s**2)) for (cx, cy), s in blobs)
    return np.round(255 * h / h.max()).astype(np.uint8)


def main(src: str, out: str = "data/sample/val-0.tfrecords"):
    records = []
    for name, label, blobs in IMAGES:
        img = Image.open(Path(src) / name).convert("RGB").resize((256, 256), Image.BICUBIC)
        arr = np.asarray(img)
        hm = heatmap(blobs)
        for a, h in ((arr, hm), (arr[:, ::-1], hm[:, ::-1]), (arr[32:224, 32:224], hm[32:224, 32:224])):
            a = np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((256, 256), Image.BICUBIC))
            h = np.asarray(Image.fromarray(np.ascontiguousarray(h)).resize((256, 256), Image.BILINEAR))
            records.append(encode_example({"image": _jpeg(a), "heatmap": _jpeg(h), "label": label}))
    write_records(out, records)
    print(f"{out}: {len(records)} records, {Path(out).stat().st_size} bytes")


if __name__ == "__main__":
    main(*sys.argv[1:])
