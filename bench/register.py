"""Benchmark: dentfuse volume registration vs elastix on a large synthetic case.

    python bench/register.py [--quick] [--motions N] [--pairs cbct,mr] [--data bench/data]

Generates (once, cached in ``bench/data/large_seed<S>``) the large synthetic set
(CBCT A at 0.25 mm, CBCT B at 0.3 mm, MR at 0.5/0.6 mm), then for each of N random rigid
motions (up to 15 deg / 20 mm about the moving volume's centre; every other one also crops
the moving field of view for a partial overlap) registers the moving volume to CBCT A with

* ours: :func:`fusion.register_volume.register_volumes` (in process, from the Volume in
  memory: float conversion, shrink, global search, refinement, consistency restarts; the
  CT-MR restart runs in a forked child, whose CPU time is counted);
* elastix (Debian package), rigid EulerTransform, AdvancedMattesMutualInformation,
  4 resolutions, once with the default smoothing pyramid and once with the recursive
  pyramid (parameter files written here; images handed over as .mha; the time includes
  elastix reading them). elastix is initialised by the geometric centres (its default
  method); measured here, "CenterOfGravity" failed 8/10 CBCT and 10/10 MR motions.

A motion is applied exactly, without resampling: the moving volume's affine is
pre-multiplied by the motion, i.e. the patient moved in the scanner. Ground truth follows:
moving' -> fixed = (moving -> fixed) @ inv(motion).

Prints wall time, CPU time (ours: process time of all threads and of the forked restart, and the median wall time of
each of our stages; elastix: the child's user +
system time: the fairer figure on a shared machine), peak RSS (sampled every 10 ms by a separate
process; see :class:`PeakRSS`) and landmark TRE (mean/max,
mm) of each method per motion (and our gate's verdict), then summary figures and the
ratios. A failure is a mean TRE above 1 mm (4 voxels of the 0.25 mm fixed grid). Each
method's summary TRE averages its own successful motions; the "like for like" lines compare
each elastix setting with ours over the motions neither failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import SimpleITK as sitk  # noqa: E402

from fusion.gates import VolumeGateThresholds  # noqa: E402
from fusion.register_volume import evaluate_gate, register_volumes  # noqa: E402
from fusion.volume import Volume, load_series, volume_to_sitk  # noqa: E402

FAIL_MM = 1.0

ELASTIX_PARAMS = """(FixedInternalImagePixelType "float")
(MovingInternalImagePixelType "float")
(FixedImageDimension 3)
(MovingImageDimension 3)
(UseDirectionCosines "true")
(Registration "MultiResolutionRegistration")
(Interpolator "BSplineInterpolator")
(ResampleInterpolator "FinalBSplineInterpolator")
(Resampler "DefaultResampler")
(FixedImagePyramid "{pyramid}")
(MovingImagePyramid "{moving_pyramid}")
(Optimizer "AdaptiveStochasticGradientDescent")
(Transform "EulerTransform")
(Metric "AdvancedMattesMutualInformation")
(AutomaticScalesEstimation "true")
(AutomaticTransformInitialization "true")
(AutomaticTransformInitializationMethod "GeometricalCenter")
(HowToCombineTransforms "Compose")
(NumberOfHistogramBins 32)
(ErodeMask "false")
(NumberOfResolutions 4)
(MaximumNumberOfIterations 250)
(NumberOfSpatialSamples 2048)
(NewSamplesEveryIteration "true")
(ImageSampler "RandomCoordinate")
(BSplineInterpolationOrder 1)
(FinalBSplineInterpolationOrder 3)
(DefaultPixelValue 0)
(WriteResultImage "false")
(WriteTransformParametersEachResolution "false")
(ResultImagePixelType "short")
(ResultImageFormat "mha")
"""
PYRAMIDS = {
    "elastix-smoothing": ("FixedSmoothingImagePyramid", "MovingSmoothingImagePyramid"),
    "elastix-recursive": ("FixedRecursiveImagePyramid", "MovingRecursiveImagePyramid"),
}


POLLER = r"""
import os, select, sys
pid, forked, me = int(sys.argv[1]), sys.argv[2] == "1", os.getpid()
page = os.sysconf("SC_PAGE_SIZE")

def children(p):
    kids = []
    try:
        tasks = os.listdir(f"/proc/{p}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            with open(f"/proc/{p}/task/{tid}/children") as fh:
                kids.extend(int(v) for v in fh.read().split())
        except OSError:
            pass
    return [k for k in kids if k != me]

def rss(p):
    with open(f"/proc/{p}/statm") as fh:
        return int(fh.read().split()[1]) * page

def uss(p):
    total = 0
    with open(f"/proc/{p}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total

peak = 0
while not select.select([sys.stdin], [], [], 0.01)[0]:
    try:
        total = rss(pid)
        for kid in children(pid):
            try:
                total += uss(kid) if forked else rss(kid)
            except (OSError, ValueError, IndexError):
                pass
        peak = max(peak, total)
    except (OSError, ValueError, IndexError):
        pass
print(peak, flush=True)
"""


class PeakRSS:
    """The peak RSS of a process and its children, sampled every 10 ms by a separate
    process (a sampling thread in ours took the GIL often enough to slow the numpy part of
    the registration it measured by ~0.15 s); ``peak_mib`` in MiB.

    A child forked by ourselves (our CT-MR restart) shares its parent's pages: it adds its
    own pages only (USS, from /proc/<pid>/smaps_rollup). A separate program (elastix)
    counts with its RSS."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> "PeakRSS":
        forked = "1" if self.pid == os.getpid() else "0"
        self._proc = subprocess.Popen([sys.executable, "-c", POLLER, str(self.pid), forked], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        time.sleep(0.05)  # let it start before the measured work
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        out, _ = self._proc.communicate("stop\n", timeout=30)
        self.peak = int(out.strip() or 0)

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


def rot(axis: np.ndarray, deg: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    a = math.radians(deg)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * K + (1 - math.cos(a)) * K @ K


def moved(vol: Volume, motion: np.ndarray, crop: tuple[int, float] | None) -> Volume:
    """``vol`` in a new frame: points map by ``motion``; optionally cropped along one axis
    (axis index in z,y,x order, fraction removed from the low end)."""
    vox = vol.voxels
    affine = vol.affine.copy()
    if crop is not None:
        axis, frac = crop
        n = vox.shape[axis]
        start = int(n * frac)
        sl = [slice(None)] * 3
        sl[axis] = slice(start, n)
        vox = vox[tuple(sl)]
        ijk_axis = 2 - axis  # array axis (z, y, x) -> index axis (i, j, k)
        affine[:3, 3] = affine[:3, 3] + affine[:3, ijk_axis] * start
    return dataclasses.replace(vol, voxels=np.ascontiguousarray(vox), affine=motion @ affine,
                               frame_of_reference_uid=vol.frame_of_reference_uid + ".9", content_sha256="")


def tre(matrix: np.ndarray, truth: np.ndarray, pts_moving: np.ndarray) -> tuple[float, float]:
    a = pts_moving @ matrix[:3, :3].T + matrix[:3, 3]
    b = pts_moving @ truth[:3, :3].T + truth[:3, 3]
    e = np.linalg.norm(a - b, axis=1)
    return float(e.mean()), float(e.max())


STAGES: list[dict[str, float]] = []  # our per-stage wall times (register_volumes' timings_s), one per run


def run_ours(fixed: Volume, moving: Volume, seed: int) -> tuple[np.ndarray, float, float, float, str]:
    with PeakRSS(os.getpid()) as mem:
        t = time.perf_counter()
        c = time.process_time()
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        reg = register_volumes(fixed, moving, seed=seed)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the CT-MR restart runs in a forked child
        cpu = time.process_time() - c + (after.ru_utime - kids.ru_utime) + (after.ru_stime - kids.ru_stime)
        dt = time.perf_counter() - t
    STAGES.append(dict(reg.timings_s))
    verdict = evaluate_gate(reg, VolumeGateThresholds())[0]
    return reg.matrix_moving_to_fixed, dt, cpu, mem.peak_mib, verdict


def elastix_matrix(tp_file: Path) -> np.ndarray:
    text = tp_file.read_text()

    def values(key: str) -> list[float]:
        m = re.search(rf"\({key} ([^)]*)\)", text)
        if not m:
            raise RuntimeError(f"{tp_file}: no {key}")
        return [float(v) for v in m.group(1).split()]

    p = values("TransformParameters")
    c = values("CenterOfRotationPoint")
    zyx = re.search(r'\(ComputeZYX "true"\)', text) is not None
    e = sitk.Euler3DTransform(c, p[0], p[1], p[2], p[3:6])
    if zyx:
        e.SetComputeZYX(True)
        e.SetRotation(p[0], p[1], p[2])
    m = np.eye(4)
    R = np.array(e.GetMatrix()).reshape(3, 3)
    m[:3, :3] = R
    m[:3, 3] = np.array(e.GetTranslation()) + np.array(c) - R @ np.array(c)
    return np.linalg.inv(m)  # elastix maps fixed -> moving; we report moving -> fixed


def run_elastix(exe: str, fixed_mha: Path, moving_mha: Path, work: Path, name: str) -> tuple[np.ndarray, float, float]:
    fp, mp = PYRAMIDS[name]
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    par = out / "rigid.txt"
    par.write_text(ELASTIX_PARAMS.format(pyramid=fp, moving_pyramid=mp))
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen([exe, "-f", str(fixed_mha), "-m", str(moving_mha), "-p", str(par), "-out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with PeakRSS(proc.pid) as mem:
        _, err = proc.communicate()
    dt = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"elastix failed ({proc.returncode}): {err.decode()[-500:]}")
    return elastix_matrix(out / "TransformParameters.0.txt"), dt, cpu, mem.peak_mib, "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "bench" / "data")
    ap.add_argument("--seed", type=int, default=7, help="seed of the generated set")
    ap.add_argument("--motions", type=int, default=10)
    ap.add_argument("--pairs", default="cbct,mr", help="comma list of cbct (A<-B) and mr (A<-MR)")
    ap.add_argument("--quick", action="store_true", help="3 motions, CBCT pair only, recursive-pyramid elastix only")
    ap.add_argument("--threads", type=int, default=0, help="ITK threads for ours (0: default)")
    args = ap.parse_args(argv)
    if args.quick:
        args.motions, args.pairs = 3, "cbct"
    exe = shutil.which("elastix")
    if exe is None:
        print("elastix is not installed (apt-get install elastix)", file=sys.stderr)
        return 2
    root = args.data / f"large_seed{args.seed}"
    if not (root / "ground_truth.json").is_file():
        from test_volumes.generate import generate_set

        print(f"generating the large set into {root} (once) ...", flush=True)
        t = time.perf_counter()
        generate_set(root, size="large", seed=args.seed, cases=["p1_cbct_a", "p1_cbct_b", "p1_mr"])
        print(f"  {time.perf_counter() - t:.0f} s", flush=True)
    from test_volumes.groundtruth import GroundTruth

    gt = GroundTruth.load(root)
    if args.threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    fixed = load_series(gt.series_dir("p1_cbct_a"))
    print(f"fixed p1_cbct_a: {fixed.shape_xyz} voxels at {fixed.spacing[0]:.3f} mm; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    methods = ["ours"] + (["elastix-recursive"] if args.quick else ["elastix-smoothing", "elastix-recursive"])
    rng = np.random.default_rng(12345)
    results: dict[str, list[tuple[float, float, float, float]]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory(prefix="dentfuse-bench-") as tmp:
        work = Path(tmp)
        fixed_mha = work / "fixed.mha"
        sitk.WriteImage(volume_to_sitk(fixed), str(fixed_mha))
        for pair in args.pairs.split(","):
            case = {"cbct": "p1_cbct_b", "mr": "p1_mr"}[pair]
            base = load_series(gt.series_dir(case))
            base_to_fixed = gt.transform(case, "p1_cbct_a")
            pts = gt.landmarks(case)
            print(f"\n== {pair}: p1_cbct_a <- {case} {base.shape_xyz} at {tuple(round(s, 3) for s in base.spacing)} mm",
                  flush=True)
            print(f"{'motion':>28} | " + " | ".join(f"{m:>48}" for m in methods))
            for k in range(args.motions):
                axis = rng.normal(size=3)
                deg = float(rng.uniform(0, 15))
                shift = rng.normal(size=3)
                shift = shift / np.linalg.norm(shift) * float(rng.uniform(0, 20))
                centre = base.index_to_lps((np.array(base.shape_xyz) - 1)[None] / 2)[0]
                motion = np.eye(4)
                motion[:3, :3] = rot(axis, deg)
                motion[:3, 3] = centre - motion[:3, :3] @ centre + shift
                crop = (int(rng.integers(0, 3)), float(rng.uniform(0.15, 0.3))) if k % 2 == 1 else None
                mov = moved(base, motion, crop)
                truth = base_to_fixed @ np.linalg.inv(motion)
                pts_m = pts @ motion[:3, :3].T + motion[:3, 3]
                moving_mha = work / "moving.mha"
                sitk.WriteImage(volume_to_sitk(mov), str(moving_mha))
                cells = []
                for m in methods:
                    try:
                        if m == "ours":
                            M, dt, cpu, mib, verdict = run_ours(fixed, mov, seed=0)
                        else:
                            M, dt, cpu, mib, verdict = run_elastix(exe, fixed_mha, moving_mha, work, m)
                        mean, mx = tre(M, truth, pts_m)
                    except Exception as exc:  # noqa: BLE001 - a crash is a failure, reported
                        print(f"   {m} failed: {exc}", flush=True)
                        dt, cpu, mib, mean, mx, verdict = (float("nan"),) * 3 + (float("inf"),) * 2 + ("error",)
                    results[m].append((dt, mib, mean, mx, cpu))
                    v = "" if verdict == "-" else f" {verdict[:6]}"
                    cells.append(f"{dt:5.1f}s cpu {cpu:5.1f}s {mib:5.0f}MiB {mean:.3f}/{mx:.3f}mm{v}")
                label = f"{deg:4.1f}deg {np.linalg.norm(shift):4.1f}mm{' crop' if crop else '     '}"
                print(f"{label:>28} | " + " | ".join(f"{c:>48}" for c in cells), flush=True)
            print(f"\nsummary {pair} ({args.motions} motions; failure = mean TRE > {FAIL_MM} mm)")
            summary = {}
            for m in methods:
                r = np.array(results[m][-args.motions:])
                ok = r[:, 2] <= FAIL_MM
                summary[m] = (np.nanmedian(r[:, 0]), np.nanmax(r[:, 1]), np.mean(r[ok, 2]) if ok.any() else float("inf"),
                              np.max(r[ok, 3]) if ok.any() else float("inf"), int((~ok).sum()), np.nanmedian(r[:, 4]))
                print(f"  {m:>18}: median wall {summary[m][0]:6.2f} s, median CPU {summary[m][5]:6.2f} s, peak RSS "
                      f"{summary[m][1]:6.0f} MiB, TRE mean {summary[m][2]:.4f} mm (max {summary[m][3]:.4f} mm), "
                      f"failures {summary[m][4]}")
            stages = STAGES[-args.motions:]
            if stages:
                names = [k for k in stages[0] if k != "total"]
                print("  ours, median wall per stage: " + ", ".join(
                    f"{k} {np.median([st.get(k, float('nan')) for st in stages]):.2f} s" for k in names))
            # like for like: each elastix setting's TRE over the motions it did not fail, and
            # ours over those same motions (the summary lines above average each method over
            # its own successes)
            ours_r = np.array(results["ours"][-args.motions:])
            like: dict[str, tuple[float, float]] = {}
            for m in methods:
                if m == "ours":
                    continue
                r = np.array(results[m][-args.motions:])
                both = (r[:, 2] <= FAIL_MM) & (ours_r[:, 2] <= FAIL_MM)
                if not both.any():
                    print(f"  like for like vs {m}: no motion that both registered")
                    continue
                like[m] = (float(np.mean(r[both, 2])), float(np.mean(ours_r[both, 2])))
                print(f"  like for like vs {m} ({int(both.sum())} motions neither failed): {m} TRE mean "
                      f"{like[m][0]:.4f} mm (max {np.max(r[both, 3]):.4f}), ours {like[m][1]:.4f} mm "
                      f"(max {np.max(ours_r[both, 3]):.4f}); ours / {m} = {like[m][1] / like[m][0]:.2f}")
            fastest = min((summary[m][0] for m in methods if m != "ours"))
            fastest_cpu = min((summary[m][5] for m in methods if m != "ours"))
            best_tre = min((summary[m][2] for m in methods if m != "ours"))
            print(f"  ratios: elastix fastest setting / ours: wall {fastest / summary['ours'][0]:.2f}x, "
                  f"CPU {fastest_cpu / summary['ours'][5]:.2f}x; ours / best elastix mean TRE = "
                  f"{summary['ours'][2] / best_tre:.2f} (like for like: "
                  + ", ".join(f"{m} {o / e:.2f}" for m, (e, o) in like.items()) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
