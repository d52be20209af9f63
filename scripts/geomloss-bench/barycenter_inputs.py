#!/usr/bin/env python3
"""Writes the deterministic inputs of the Wasserstein-barycenter side-by-side benchmark.

    PY=~/.cache/candle-ot-geomloss/bin/python
    $PY scripts/geomloss-bench/barycenter_inputs.py /tmp/barybench
    $PY scripts/geomloss-bench/pot_barycenter.py /tmp/barybench     # the POT peer

Writes into the directory argv[1] (created if missing), numpy only, in well under a second:

- `images.npy`: float32 (4, 256, 256), four densities, each summing to 1 (in float64, before
  the cast to float32), every pixel > 0. Index [k, i, j]: image k, row i, column j; in the
  GeomLoss convention pixel (i, j) sits at (i/n, j/n), n = 256. The shapes are centred on the
  image and span its middle 60 % (from 0.2 to 0.8 of the side):
    0 disk    radius 0.3;
    1 ring    annulus 0.2 <= radius <= 0.3;
    2 square  half side 0.3 (axis aligned);
    3 cross   union of the bars |x| <= 0.3, |y| <= 0.1 and |x| <= 0.1, |y| <= 0.3,
  where (x, y) is the offset of the pixel centre ((i + 0.5)/n, (j + 0.5)/n) from (0.5, 0.5).
  Each indicator is blurred by a separable Gaussian of sigma 1.5 pixels (kernel truncated at
  4 sigma, normalised to sum 1, zero padding: the shapes are far from the border), then
  1e-6 * (its maximum) is added to every pixel, then it is divided by its sum.
- `clouds.npy`: float32 (4, 10000, 3), `numpy.random.default_rng(0).random((4, 10000, 3))`:
  four clouds of 10k points uniform in the unit cube [0, 1)^3 (uniform weights implied).
- `support.npy`: float32 (5000, 3), `numpy.random.default_rng(1).random((5000, 3))`: the
  initial support of the free-support barycenter (uniform weights implied).
"""

import os
import sys

import numpy as np

N = 256  # image side
SIGMA = 1.5  # blur of the shapes, in pixels
FLOOR = 1e-6  # floor, relative to each image's peak
N_CLOUDS, N_POINTS, DIM = 4, 10_000, 3
N_SUPPORT = 5_000


def gaussian_blur(img, sigma):
    """Separable Gaussian blur (zero padding, kernel truncated at 4 sigma, sum 1)."""
    r = int(np.ceil(4 * sigma))
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-(t**2) / (2 * sigma**2))
    k /= k.sum()
    img = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 0, img)
    img = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 1, img)
    return img


def shapes(n=N):
    c = (np.arange(n, dtype=np.float64) + 0.5) / n - 0.5
    x, y = np.meshgrid(c, c, indexing="ij")  # x along rows (axis 0), y along columns
    r = np.hypot(x, y)
    ax, ay = np.abs(x), np.abs(y)
    disk = r <= 0.3
    ring = (r >= 0.2) & (r <= 0.3)
    square = np.maximum(ax, ay) <= 0.3
    cross = ((ax <= 0.3) & (ay <= 0.1)) | ((ax <= 0.1) & (ay <= 0.3))
    return [disk, ring, square, cross]


def densities(n=N):
    out = []
    for s in shapes(n):
        d = gaussian_blur(s.astype(np.float64), SIGMA)
        d = np.clip(d, 0.0, None)  # remove round-off negatives of the convolution
        d += FLOOR * d.max()
        d /= d.sum()
        out.append(d)
    return np.stack(out).astype(np.float32)


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)

    images = densities()
    clouds = np.random.default_rng(0).random((N_CLOUDS, N_POINTS, DIM)).astype(np.float32)
    support = np.random.default_rng(1).random((N_SUPPORT, DIM)).astype(np.float32)

    assert images.shape == (4, N, N) and (images > 0).all()
    np.save(os.path.join(out, "images.npy"), images)
    np.save(os.path.join(out, "clouds.npy"), clouds)
    np.save(os.path.join(out, "support.npy"), support)
    for k, name in enumerate(["disk", "ring", "square", "cross"]):
        im = images[k].astype(np.float64)
        print(f"images[{k}] {name}: sum {im.sum():.9f}, min {im.min():.3e}, max {im.max():.3e}")
    print(f"clouds {clouds.shape} {clouds.dtype}, support {support.shape} {support.dtype} -> {out}")


if __name__ == "__main__":
    main()
