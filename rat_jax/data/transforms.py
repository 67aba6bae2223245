"""torchvision-equivalent image transforms on PIL images, driven by an explicit numpy RNG.

train: RandomResizedCrop(size, scale=(0.7, 1), ratio=(3/4, 4/3)) -> horizontal flip (p=0.5)
-> ColorJitter(0.3, 0.3, 0.3, 0.3) in random order -> RandomGrayscale(0.1) -> normalize.
eval: Resize((size, size)) bilinear -> normalize. Ops are the PIL calls torchvision 0.13 makes
on PIL images; only the random streams differ (numpy instead of torch).
"""
import math

import numpy as np
from PIL import Image, ImageEnhance, ImageFile

# DomainBed sets this at import (datasets.py): truncated JPEGs load instead of failing.
ImageFile.LOAD_TRUNCATED_IMAGES = True

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
SCALE = (0.7, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER = 0.3
GRAYSCALE_P = 0.1


def decode(path: str) -> Image.Image:
    """Open an image file as RGB (ImageFolder's pil_loader); errors name the file."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise ImageDecodeError(
            f"cannot read image {path!r} ({type(e).__name__}: {e}); replace or delete the "
            "file, or load the dataset with on_bad_image='skip'") from e


class ImageDecodeError(OSError):
    """An image file that PIL cannot decode."""


def crop_params(rng: np.random.Generator, width: int, height: int, scale=SCALE, ratio=RATIO):
    """(top, left, h, w) of torchvision RandomResizedCrop.get_params: 10 tries, then center crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    return fallback_crop(height, width, ratio)


def fallback_crop(height: int, width: int, ratio=RATIO):
    """(top, left, h, w) of RandomResizedCrop's fallback: the central crop clamped to `ratio`."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """torchvision F_pil.adjust_hue: shift the PIL HSV hue channel by hue_factor*255 (mod 256)."""
    h, s, v = img.convert("HSV").split()
    shift = int(hue_factor * 255) % 256  # == np.uint8(hue_factor*255) on x86, without the UB
    h = h.point([(i + shift) % 256 for i in range(256)])  # uint8 add with wrap-around
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def color_jitter(img: Image.Image, rng: np.random.Generator, strength: float = JITTER):
    """ColorJitter(b, c, s, h) with torchvision semantics: 4 factors, applied in random order."""
    order = rng.permutation(4)
    b, c, s = (rng.uniform(1 - strength, 1 + strength) for _ in range(3))
    h = rng.uniform(-strength, strength)
    for fn in order:
        if fn == 0:
            img = ImageEnhance.Brightness(img).enhance(b)
        elif fn == 1:
            img = ImageEnhance.Contrast(img).enhance(c)
        elif fn == 2:
            img = ImageEnhance.Color(img).enhance(s)
        else:
            img = adjust_hue(img, h)
    return img


def train_params(rng: np.random.Generator, width: int, height: int) -> dict:
    """Every random choice `train_transform_uint8` draws from `rng`, in its order: the crop
    window (top, left, height, width), flip, the jitter order and factors, grayscale."""
    top, left, h, w = crop_params(rng, width, height)
    flip = bool(rng.random() < 0.5)
    order = rng.permutation(4)
    b, c, s = (rng.uniform(1 - JITTER, 1 + JITTER) for _ in range(3))
    hue = rng.uniform(-JITTER, JITTER)
    gray = bool(rng.random() < GRAYSCALE_P)
    return {"top": top, "left": left, "height": h, "width": w, "flip": flip, "brightness": b,
            "contrast": c, "saturation": s, "hue": hue, "order": order, "grayscale": gray}


# The per-image parameters the member loader ships beside the crop windows with
# StreamSpec(augment_on="device") (rat_jax.data.augment.window_batch applies them on device).
WINDOW_PARAMS = ("height", "width", "flip", "brightness", "contrast", "saturation", "hue_shift",
                 "order", "grayscale")


def window_params(rng: np.random.Generator, width: int, height: int) -> dict:
    """`train_params` with the hue factor as its uint8 shift int(f * 255) mod 256 (computed in
    double precision, as adjust_hue does) and the blend factors as float32 (Pillow's blend
    casts its alpha to float)."""
    p = train_params(rng, width, height)
    p["hue_shift"] = int(p.pop("hue") * 255) % 256
    for k in ("brightness", "contrast", "saturation"):
        p[k] = np.float32(p[k])
    return p


def train_transform_uint8(img: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """Augmented [size, size, 3] uint8 from an RGB PIL image (normalize separately)."""
    top, left, h, w = crop_params(rng, img.width, img.height)
    # crop then resize, as torchvision (resize(box=...) would read pixels outside the crop)
    img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = color_jitter(img, rng)
    if rng.random() < GRAYSCALE_P:
        img = img.convert("L").convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def eval_transform_uint8(img: Image.Image, size: int) -> np.ndarray:
    """Resize((size, size)) bilinear, aspect ratio not kept (DomainBed eval)."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def normalize(images_uint8: np.ndarray) -> np.ndarray:
    """ToTensor + Normalize(ImageNet), channels last: uint8 [..., 3] -> float32."""
    x = images_uint8.astype(np.float32) * np.float32(1 / 255)
    x -= IMAGENET_MEAN
    x *= 1 / IMAGENET_STD
    return x
