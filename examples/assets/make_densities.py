"""Writes the two densities of the `image_transport` example, `density_a.png` (a crescent)
and `density_b.png` (two blobs of unequal sizes): 8-bit grayscale, 128x128, a dark shape on a
white background (the example inverts them), like GeomLoss's tutorial images.

Deterministic (no randomness), standard library only:

    python3 examples/assets/make_densities.py
"""

import math
import os
import struct
import zlib

N = 128  # pixels per side
SUB = 4  # supersampling per axis, for antialiased edges


def crescent(x, y):
    """A thick crescent opening to the upper right: a disk minus a shifted disk."""
    outer = math.hypot(x - 0.36, y - 0.46) < 0.27
    inner = math.hypot(x - 0.47, y - 0.57) < 0.22
    return 1.0 if outer and not inner else 0.0


def blobs(x, y):
    """Two blobs with a raised-cosine profile: a large one at the upper right, a smaller,
    denser one at the bottom."""
    v = 0.0
    for cx, cy, r, h in [(0.68, 0.66, 0.19, 0.8), (0.58, 0.22, 0.12, 1.0)]:
        d = math.hypot(x - cx, y - cy) / r
        if d < 1.0:
            v += h * (0.35 + 0.65 * 0.5 * (1.0 + math.cos(math.pi * d)))
    return min(v, 1.0)


def render(shape):
    """Rows top to bottom (PNG order); y points up in the unit square."""
    rows = []
    for r in range(N):
        row = bytearray()
        for c in range(N):
            s = 0.0
            for u in range(SUB):
                for v in range(SUB):
                    x = (c + (u + 0.5) / SUB) / N
                    y = 1.0 - (r + (v + 0.5) / SUB) / N
                    s += shape(x, y)
            d = s / SUB**2
            row.append(round(255 * (1.0 - 0.92 * d)))  # dark shape on white
        rows.append(bytes(row))
    return rows


def write_png(path, rows):
    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(b"\x00" + row for row in rows)  # filter 0 on every row
    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", N, N, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9))
    png += chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    for name, shape in [("density_a.png", crescent), ("density_b.png", blobs)]:
        write_png(os.path.join(here, name), render(shape))
        print("wrote", os.path.join(here, name))
