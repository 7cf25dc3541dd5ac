"""The work of ``hyperseg predict``: files and folders in, label / colour / overlay files out.

``plan_jobs`` expands the inputs (image files, folders searched for images, video files) into
jobs with collision-free output names; ``segment_jobs`` runs them with a progress bar (images
``batch_size`` at a time through ``hyperseg.predict``, videos one after the other through
``hyperseg.video``), reports every failed input on stderr and returns the exit status.

Planning imports no torch (it runs before the model is loaded); segmenting imports it.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import List, Sequence, Set, Tuple

from .options import (DEFAULT_TTA_SCALES, VIDEO_EXTENSIONS, image_path_problem, is_image_file,
                      is_video_file, video_path_problem)

ERROR_PREFIX = "hyperseg predict: error: "


@dataclass
class Job:
    source: str           # the image or video file
    out_dir: str          # where its outputs go
    stem: str             # output names: <stem>_labels.png, <stem>_color.png, <stem>_overlay.png
    video: bool = False   # a video: <stem>_color.mp4, <stem>_overlay.mp4, <stem>_labels.mkv


@dataclass
class PredictSettings:
    """How ``segment_jobs`` segments (the options of ``hyperseg predict``)."""

    size: object = None                     # None, "native" or (H, W): see predict.network_size
    batch_size: int = 1
    tta: object = None
    tta_scales: Sequence[float] = DEFAULT_TTA_SCALES
    alpha: float = 0.5
    quiet: bool = False


# ------------------------------------------------------------------------------------------------
# Planning
# ------------------------------------------------------------------------------------------------

class _Plan:
    """Jobs under construction, with the output names (per output folder) already taken."""

    def __init__(self, out: str):
        self.out = out
        self.jobs: List[Job] = []
        self.errors: List[str] = []
        self.taken: Set[Tuple[str, str]] = set()

    def add(self, source: str, rel_dir: str, name: str, video: bool = False) -> None:
        """A job for ``source`` written as ``name`` (less its extension) in ``rel_dir`` of out; a
        name already taken gets the source extension (``a_png``), then a counter (``a_png~2``)."""
        base, ext = os.path.splitext(name)
        stem = base or name
        candidates = [stem, f"{stem}_{ext.lstrip('.')}" if ext else stem]
        key = next((c for c in candidates if (rel_dir, c) not in self.taken), None)
        n = 2
        while key is None:
            if (rel_dir, f"{candidates[-1]}~{n}") not in self.taken:
                key = f"{candidates[-1]}~{n}"
            n += 1
        self.taken.add((rel_dir, key))
        self.jobs.append(Job(source, os.path.join(self.out, rel_dir) if rel_dir else self.out,
                             key, video))

    def add_folder(self, folder: str) -> None:
        """Every JPEG/PNG file under ``folder``, its sub-folders mirrored under out."""
        found = 0
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            for name in sorted(files):
                if is_image_file(name):
                    rel = os.path.relpath(root, folder)
                    self.add(os.path.join(root, name), "" if rel == "." else rel, name)
                    found += 1
        if not found:
            self.errors.append(f"{folder}: no JPEG/PNG images in this directory")

    def add_file(self, path: str) -> None:
        """A video or an image file, or the reason it cannot be one."""
        video = is_video_file(path)
        problem = video_path_problem(path) if video else image_path_problem(path)
        if problem and not video and problem.startswith("unsupported"):
            problem += f", or a video ({', '.join(VIDEO_EXTENSIONS)})"
        if problem:
            self.errors.append(f"{path}: {problem}")
        else:
            self.add(path, "", os.path.basename(os.path.normpath(path)), video=video)


def plan_jobs(inputs: Sequence[str], out: str) -> Tuple[List[Job], List[str]]:
    """One job per image or video: files as given (a missing file, one of another type, or a
    video without PyAV installed is that input's error), directories searched recursively for
    JPEG/PNG files, whose outputs mirror their sub-directories under ``out``. Output names that
    would collide get the source extension, then a counter. Returns the jobs and the errors of
    inputs that yield nothing to segment."""
    plan = _Plan(out)
    for item in inputs:
        if os.path.isdir(item):
            plan.add_folder(item)
        else:
            plan.add_file(item)
    return plan.jobs, plan.errors


# ------------------------------------------------------------------------------------------------
# Segmenting
# ------------------------------------------------------------------------------------------------

def report(message: str) -> None:
    """An error of ``hyperseg predict`` on stderr, outside a progress bar."""
    print(ERROR_PREFIX + message, file=sys.stderr, flush=True)


def report_in_progress(message: str) -> None:
    """An error of ``hyperseg predict`` on stderr, above a running progress bar."""
    from tqdm import tqdm

    tqdm.write(ERROR_PREFIX + message, file=sys.stderr)


def remove_empty_dirs(top: str) -> None:
    """Remove ``top`` and the folders under it, if they hold no file."""
    for root, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
        try:
            os.rmdir(root)
        except OSError:
            pass


def segment_jobs(model, jobs: List[Job], errors: List[str], out: str,
                 settings: PredictSettings) -> int:
    """Run the planned ``jobs`` (``errors``: the inputs that planning already rejected) into
    ``out``, print the summary line, and return the exit status: 0 when every input was
    segmented, else 1. When nothing was segmented, an ``out`` that did not exist before is
    removed again."""
    out_existed = os.path.exists(out)
    images = [job for job in jobs if not job.video]
    videos = [job for job in jobs if job.video]
    done = predict_images(model, images, settings) + predict_videos(model, videos, settings)
    failed = len(errors) + len(jobs) - done
    total = len(jobs) + len(errors)
    if not done:
        if not out_existed:
            remove_empty_dirs(out)
        what = "image or video was segmented to its end" if videos else "image was segmented"
        report(f"no {what} ({failed} of {total} input(s) failed; see above)")
        return 1
    print(f"segmented {done} of {total} {'input(s)' if videos else 'image(s)'} with "
          f"{model.config.name}; outputs in {out}")
    return 1 if failed else 0


def _segment_and_save(model, batch, colors, settings: PredictSettings) -> int:
    """Segment a batch of (job, uint8 image) pairs and write their outputs; returns how many
    were written (a failed forward pass fails the whole batch, a failed write its image)."""
    from .predict import save_prediction, segment

    try:
        labels = segment(model, [image for _, image in batch], size=settings.size,
                         batch_size=settings.batch_size, tta=settings.tta,
                         tta_scales=settings.tta_scales)
    except (RuntimeError, ValueError) as err:
        for job, _ in batch:
            report_in_progress(f"{job.source}: segmentation failed: {err}")
        return 0
    ok = 0
    for (job, image), label in zip(batch, labels):
        try:
            save_prediction(label, image, colors, job.out_dir, job.stem, settings.alpha)
            ok += 1
        except OSError as err:
            where = err.filename or job.out_dir
            report_in_progress(f"{job.source}: cannot write its outputs to {where!r}: "
                               f"{err.strerror or err}")
    return ok


def predict_images(model, jobs: List[Job], settings: PredictSettings) -> int:
    """Segment the image jobs, ``settings.batch_size`` at a time, with a progress bar of images;
    returns how many were written."""
    from tqdm import tqdm

    from .predict import ImageError, model_palette, network_size, read_image, to_uint8_tensor

    if not jobs:
        return 0
    colors = model_palette(model)
    done, batch = 0, []
    progress = tqdm(total=len(jobs), unit="image", file=sys.stderr,
                    disable=True if settings.quiet else None)
    with progress:
        for job in jobs:
            try:
                image = to_uint8_tensor(read_image(job.source))
                network_size(model.config, settings.size, tuple(image.shape[-2:]))
            except ImageError as err:
                report_in_progress(f"{job.source}: {err}")
                progress.update(1)
                continue
            batch.append((job, image))
            if len(batch) == settings.batch_size:
                done += _segment_and_save(model, batch, colors, settings)
                progress.update(len(batch))
                batch = []
        if batch:
            done += _segment_and_save(model, batch, colors, settings)
            progress.update(len(batch))
    return done


def predict_videos(model, jobs: List[Job], settings: PredictSettings) -> int:
    """Segment the video jobs one after the other, each streamed through
    ``hyperseg.video.predict_video`` with a progress bar of its frames; returns how many were
    segmented to their end."""
    from tqdm import tqdm

    from .video import DEFAULT_MAX_IN_FLIGHT, VideoError, predict_video

    done = 0
    for job in jobs:
        progress = tqdm(unit="frame", desc=os.path.basename(job.source), file=sys.stderr,
                        disable=True if settings.quiet else None)
        try:
            with progress:
                result = predict_video(
                    model, job.source, job.out_dir, job.stem, size=settings.size,
                    batch_size=settings.batch_size, tta=settings.tta,
                    tta_scales=settings.tta_scales, alpha=settings.alpha,
                    max_in_flight=max(DEFAULT_MAX_IN_FLIGHT, settings.batch_size),
                    progress=progress)
        except VideoError as err:
            report_in_progress(f"{job.source}: {err}")
            continue
        written = ", ".join(result.paths)
        if result.error:
            kept = (f"the {result.frames} frame(s) segmented before it are in {written}"
                    if result.frames else "no frame was written")
            report_in_progress(f"{job.source}: {result.error}; {kept}")
            continue
        print(f"{job.source}: {result.frames} frames in {result.seconds:.1f} s "
              f"({result.fps:.2f} frames/s) -> {written}")
        done += 1
    return done
