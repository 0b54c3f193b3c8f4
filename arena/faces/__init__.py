"""Face-centred crops: detect faces on a downscaled copy of the sampled frames, track them, crop around them."""

from arena.faces.detect import DETECTORS, Detections, FaceDetector, detector_info, make_detector
from arena.faces.report import face_report, write_strip
from arena.faces.stage import FaceCropConfig, FaceCropper, FaceCrops

__all__ = ["DETECTORS", "Detections", "FaceDetector", "detector_info", "make_detector",
           "FaceCropConfig", "FaceCropper", "FaceCrops", "face_report", "write_strip"]
