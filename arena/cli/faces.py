"""``arena faces``: what the face stage finds in videos, and the crops it would feed the backbone."""

from __future__ import annotations

import click

from arena.cli._main import main
from arena.cli._options import device_option
from arena.limits import MAX_FRAMES, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE


@main.command("faces")
@click.argument("videos", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--frames", type=click.IntRange(1, MAX_FRAMES), default=24, show_default=True,
              help="Frames sampled per video (uniformly), as the model would see them.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list (one object per video).")
@click.option("--strip", "strip_dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Folder for one PNG per video of the crops fed to the backbone (a row block per face track; "
                   "green frame: box rests on detections, orange: carried over, grey: no face, letterboxed).")
@click.option("--detector", default="mtcnn", show_default=True, help="Face detector.")
@click.option("--margin", type=click.FloatRange(1.0, 4.0), default=1.3, show_default=True,
              help="Side of the square crop over the face's larger side.")
@click.option("--detect-size", type=click.IntRange(32, 4096), default=640, show_default=True,
              help="Long side (px) of the copy the detector sees (never upscaled).")
@click.option("--detect-frames", type=click.IntRange(1, MAX_FRAMES), default=16, show_default=True,
              help="Frames the detector runs on (uniform); the boxes of the others are interpolated.")
@click.option("--max-faces", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Face tracks kept per video, main (largest, most persistent) first.")
@click.option("--image-size", type=click.IntRange(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), default=299, show_default=True,
              help="Side of the square crops (the backbone input).")
@device_option
def faces_cmd(videos, frames, as_json, strip_dir, detector, margin, detect_size, detect_frames, max_faces,
              image_size, device):
    """Detect, track and crop faces in VIDEO...: sampled frames, frames on a detected face, tracks, box size, CPU time.

    Exit status 0 when every video was read (ok or partial), 3 when some could not be decoded (status error).
    """
    import json

    from arena.faces.report import face_report
    from arena.faces.stage import FaceCropConfig

    config = FaceCropConfig(detector=detector, margin=margin, detect_size=detect_size, detect_frames=detect_frames,
                            max_faces=max_faces)
    rows = face_report(videos, frames=frames, config=config, image_size=image_size, device=device,
                       strip_dir=strip_dir)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        _print_table(rows)
    if any(r["status"] == "error" for r in rows):
        raise SystemExit(3)  # every readable video is reported; the others are listed as errors


def _print_table(rows: list[dict]) -> None:
    cols = [("file", "file"), ("status", "status"), ("sampled", "sampled"), ("with_face", "with face"),
            ("detection", "detect"), ("tracks", "tracks"), ("box_px", "box px"), ("cpu_seconds", "cpu s")]
    table = []
    for r in rows:
        cells = {k: r.get(k) for k, _ in cols}
        if "detection_frames" in r:
            cells["detection"] = f"{r['detection_frames_with_face']}/{r['detection_frames']}"
        table.append([("-" if cells[k] is None else f"{cells[k]:g}" if isinstance(cells[k], float) else str(cells[k]))
                      for k, _ in cols])
    widths = [max(len(title), *(len(t[i]) for t in table)) for i, (_, title) in enumerate(cols)]
    click.echo("  ".join(title.ljust(w) for (_, title), w in zip(cols, widths, strict=True)))
    for r, t in zip(rows, table, strict=True):
        click.echo("  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)))
        if r.get("message"):
            click.echo(f"    {r['message']}")
