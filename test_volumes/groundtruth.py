"""Read ``ground_truth.json`` written by ``test_volumes/generate.py``.

    gt = GroundTruth.load(root)
    gt.series_dir("p1_cbct_b")               # Path of the case folder
    gt.case("p1_cbct_b")                      # dict: uids, modality, frame, geometry, files, ...
    gt.frame_uid("p1_cbct_b")                 # Frame of Reference UID
    gt.transform("p1_cbct_b", "p1_cbct_a")    # 4x4: a point in p1_cbct_b (LPS mm) -> p1_cbct_a
    gt.landmarks("p1_scan_upper")             # (N, 3) landmark coordinates in that frame
    gt.landmark_names, gt.landmark_kinds      # "UR6_cusp", ... / "cusp" or "apex"
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "dentfuse-groundtruth/1"


class GroundTruthError(Exception):
    """The ground truth file is missing or does not hold what was asked for."""


@dataclass(frozen=True)
class GroundTruth:
    root: Path
    data: dict

    @classmethod
    def load(cls, root: Path | str) -> "GroundTruth":
        root = Path(root)
        path = root / "ground_truth.json" if root.is_dir() else root
        if not path.is_file():
            raise GroundTruthError(f"{path} not found; run python test_volumes/generate.py --out {root}")
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise GroundTruthError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}; regenerate the set")
        return cls(root=path.parent, data=data)

    # -- cases ------------------------------------------------------------------------
    @property
    def cases(self) -> list[str]:
        return list(self.data["cases"])

    def case(self, case: str) -> dict:
        try:
            return self.data["cases"][case]
        except KeyError:
            raise GroundTruthError(f"no case {case!r} in {self.root}; cases: {self.cases}") from None

    def series_dir(self, case: str) -> Path:
        return self.root / self.case(case)["folder"]

    # -- frames and transforms ------------------------------------------------------------
    @property
    def frames(self) -> list[str]:
        return list(self.data["frames"])

    def _frame(self, frame: str) -> dict:
        try:
            return self.data["frames"][frame]
        except KeyError:
            raise GroundTruthError(f"no frame {frame!r} in {self.root}; frames: {self.frames}") from None

    def frame_uid(self, frame: str) -> str:
        return self._frame(frame)["frame_of_reference_uid"]

    def transform(self, from_frame: str, to_frame: str) -> np.ndarray:
        """4x4 matrix mapping a point in from_frame (LPS mm) to to_frame (LPS mm)."""
        a, b = self._frame(from_frame), self._frame(to_frame)
        if from_frame == to_frame:
            return np.eye(4)
        if a["patient"] != b["patient"]:
            raise GroundTruthError(f"frames {from_frame!r} and {to_frame!r} belong to different patients")
        for t in self.data["transforms"]:
            if t["from"] == from_frame and t["to"] == to_frame:
                return np.array(t["matrix"], dtype=float)
        raise GroundTruthError(f"no transform {from_frame!r} -> {to_frame!r} in {self.root}")

    def map_points(self, points: np.ndarray, from_frame: str, to_frame: str) -> np.ndarray:
        m = self.transform(from_frame, to_frame)
        pts = np.asarray(points, dtype=float).reshape(-1, 3)
        return pts @ m[:3, :3].T + m[:3, 3]

    # -- landmarks ----------------------------------------------------------------------
    @property
    def landmark_names(self) -> list[str]:
        return list(self.data["landmarks"]["names"])

    @property
    def landmark_kinds(self) -> list[str]:
        return list(self.data["landmarks"]["kinds"])

    @property
    def landmark_teeth(self) -> list[str]:
        return list(self.data["landmarks"]["teeth"])

    def landmarks(self, frame: str) -> np.ndarray:
        """(N, 3) landmark coordinates (LPS mm) in frame, in the order of landmark_names."""
        self._frame(frame)
        return np.array(self.data["landmarks"]["frames"][frame], dtype=float)
