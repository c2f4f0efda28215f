#!/usr/bin/env python3
"""Scan-to-CBCT benchmark on a large generated case (scan >= 150k faces, CBCT <= 0.25 mm).

    python bench/surface.py                 # 20 random poses of the large upper scan
    python bench/surface.py --poses 5 --size small

The case is generated once (seeded) with ``test_volumes.generate.generate_set(size="large")``
and cached in ``bench/data/`` (git-ignored). Printed figures, all measured in this run:

* CBCT load, crown-surface extraction + target preparation (features, trees), scan load;
* per random starting pose (any rotation, translation up to 100 mm): registration wall and
  CPU time, verdict, inlier fraction, landmark TRE on the upper cusps (mean / max);
* the whole ``fuse_surface`` once (load + surface + registration + all outputs), wall time;
* peak resident memory (RSS, polled every 10 ms) of the registration phase and of the
  whole process.

Success = verdict "accepted" and every cusp landmark within 0.1 mm.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from scipy.spatial.transform import Rotation

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fusion.cbct_surface import extract_teeth_surface  # noqa: E402
from fusion.gates import SurfaceGateThresholds  # noqa: E402
from fusion.register_surface import evaluate_gate, prepare_target, register_surface  # noqa: E402
from fusion.surface import load_scan  # noqa: E402
from fusion.surface_fusion import fuse_surface  # noqa: E402
from fusion.volume import load_series  # noqa: E402
from test_volumes.generate import generate_set  # noqa: E402
from test_volumes.groundtruth import GroundTruth  # noqa: E402


class PeakRss:
    """Highest RSS of this process while the context is open (polled every 10 ms)."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRss":
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["small", "large"], default="large")
    ap.add_argument("--seed", type=int, default=7, help="generator seed")
    ap.add_argument("--poses", type=int, default=20)
    ap.add_argument("--case", default="p1_cbct_a", help="CBCT case (p1_cbct_a or p1_cbct_metal)")
    ap.add_argument("--data-dir", type=Path, default=REPO / "bench" / "data")
    args = ap.parse_args(argv)

    root = args.data_dir / f"surface_{args.size}_seed{args.seed}"
    if not (root / "ground_truth.json").is_file() or not (root / args.case).is_dir():
        t = time.perf_counter()
        print(f"generating {args.size} set ({args.case}, p1_scan) into {root} ...", flush=True)
        cases = sorted({args.case, "p1_scan"} | ({"p1_cbct_a"} if (root / "p1_cbct_a").is_dir() else set()))
        generate_set(root, size=args.size, seed=args.seed, cases=cases)
        print(f"  generated in {time.perf_counter() - t:.1f} s")
    gt = GroundTruth.load(root)
    gate = SurfaceGateThresholds()

    t = time.perf_counter()
    vol = load_series(gt.series_dir(args.case))
    t_load = time.perf_counter() - t
    nz, ny, nx = vol.voxels.shape
    print(f"CBCT {args.case}: {nx} x {ny} x {nz} voxels at {', '.join(f'{s:.3f}' for s in vol.spacing)} mm; "
          f"load {t_load:.2f} s")
    with PeakRss() as mem_surface:
        t = time.perf_counter()
        surface = extract_teeth_surface(vol.voxels, vol.affine, frame_of_reference_uid=vol.frame_of_reference_uid)
        t_surf = time.perf_counter() - t
        t = time.perf_counter()
        target = prepare_target(surface)
        t_prep = time.perf_counter() - t
    print(f"crown surface: {surface.n_vertices} vertices ({int(surface.near_metal.sum())} near metal), "
          f"extraction {t_surf:.2f} s, target preparation {t_prep:.2f} s, "
          f"peak RSS {mem_surface.peak / 1e6:.0f} MB")
    scan_path = root / "p1_scan" / "upper.stl"
    t = time.perf_counter()
    scan = load_scan(scan_path)
    t_scan = time.perf_counter() - t
    print(f"scan {scan_path.name}: {scan.n_faces} faces, {scan.n_vertices} vertices; load {t_scan:.2f} s")

    mask = np.array([k == "cusp" and n.startswith("U") for n, k in zip(gt.landmark_names, gt.landmark_kinds)])
    lm_scan = gt.landmarks("p1_scan_upper")[mask]
    lm_cbct = gt.landmarks(args.case)[mask]
    rng = np.random.default_rng(2024)
    walls, cpus, means, maxes, ok = [], [], [], [], 0
    with PeakRss() as mem_reg:
        for i in range(args.poses):
            pose = np.eye(4)
            pose[:3, :3] = Rotation.random(random_state=int(rng.integers(2**31))).as_matrix()
            pose[:3, 3] = rng.uniform(-100.0, 100.0, 3)
            v = scan.vertices @ pose[:3, :3].T + pose[:3, 3]
            c0, w0 = time.process_time(), time.perf_counter()
            reg = register_surface(v, scan.faces, target, gate=gate, seed=i)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            verdict = evaluate_gate(reg, gate)[0]
            est = (lm_scan @ pose[:3, :3].T + pose[:3, 3]) @ reg.matrix[:3, :3].T + reg.matrix[:3, 3]
            tre = np.linalg.norm(est - lm_cbct, axis=1)
            success = verdict == "accepted" and tre.max() < 0.1
            ok += success
            walls.append(wall)
            cpus.append(cpu)
            means.append(tre.mean())
            maxes.append(tre.max())
            print(f"  pose {i:2d}: {wall:5.2f} s wall, {cpu:5.2f} s CPU, {verdict:12s} inliers "
                  f"{reg.inlier_fraction:.3f} rms {reg.inlier_rms_mm:.3f} mm, TRE mean {tre.mean():.4f} "
                  f"max {tre.max():.4f} mm {'ok' if success else 'FAIL'}", flush=True)
    print(f"registration: {ok}/{args.poses} successful; TRE mean {np.mean(means):.4f} mm "
          f"(per-pose means {np.min(means):.4f}-{np.max(means):.4f}), max {np.max(maxes):.4f} mm; "
          f"wall median {statistics.median(walls):.2f} s (min {min(walls):.2f}, max {max(walls):.2f}), "
          f"CPU median {statistics.median(cpus):.2f} s; peak RSS during registration {mem_reg.peak / 1e6:.0f} MB")
    print(f"per case (surface extraction + preparation + median registration): "
          f"{t_surf + t_prep + statistics.median(walls):.2f} s")

    with tempfile.TemporaryDirectory() as tmp, PeakRss() as mem_fuse:
        t = time.perf_counter()
        res = fuse_surface([gt.series_dir(args.case)], scan_path, Path(tmp), seed=0)
        t_fuse = time.perf_counter() - t
    print(f"fuse_surface (load + surface + registration + outputs): {t_fuse:.2f} s, verdict {res.verdict}; "
          f"stages {', '.join(f'{k} {v:.2f}' for k, v in res.timings_s.items() if not k.startswith('register_'))}; "
          f"peak RSS {mem_fuse.peak / 1e6:.0f} MB")
    print(f"process peak RSS {psutil.Process().memory_info().rss / 1e6:.0f} MB now; machine load "
          f"{', '.join(f'{x:.1f}' for x in psutil.getloadavg())} on {psutil.cpu_count()} CPUs")
    return 0 if ok == args.poses else 1


if __name__ == "__main__":
    raise SystemExit(main())
