#!/usr/bin/env python3
"""Times GeomLoss 0.3.1's `ImagesBarycenter` (its defaults: blur one pixel, p = 2, scaling_N 10)
on the 4 images of barycenter_inputs.py, weights 1/4 each, float32 on the CPU (PyTorch, 2
threads), inputs not requiring gradients. Prints one JSON line {"case", "seconds", "mass"}.

    $PY scripts/geomloss-bench/geomloss_barycenter.py /tmp/barybench
"""
import json
import sys
import time

import numpy as np
import torch
from geomloss import ImagesBarycenter

torch.set_num_threads(2)
imgs = np.load(f"{sys.argv[1]}/images.npy").astype(np.float64)
imgs /= imgs.sum(axis=(1, 2), keepdims=True)
measures = torch.from_numpy(imgs.astype(np.float32))[None]  # (1, 4, 256, 256)
weights = torch.full((1, 4), 0.25)
ImagesBarycenter(measures[..., :32, :32] / measures[..., :32, :32].sum((2, 3), keepdim=True), weights)
t0 = time.perf_counter()
bar = ImagesBarycenter(measures, weights)
dt = time.perf_counter() - t0
print(json.dumps({"case": "geomloss_images_barycenter_256", "seconds": dt,
                  "mass": float(bar.sum()), "torch_threads": torch.get_num_threads()}))
