"""Segmenting videos: decode -> preprocess -> model -> encode, overlapped in threads.

    import hyperseg
    model = hyperseg.load("hyperseg-m.safetensors")
    result = hyperseg.predict_video(model, "clip.mp4", "seg/")
    # seg/clip_color.mp4, seg/clip_overlay.mp4 (H.264), seg/clip_labels.mkv (lossless class ids)

Videos are read and written with PyAV (the ``av`` package, which bundles FFmpeg), an optional
dependency: ``pip install "hyperseg[video]"``. It is imported only when a video is segmented.

Four stages run at once: a thread decodes frames, a thread turns them into network inputs
(resized, normalised, on the model's device), the calling thread runs the model on batches of
them, and a thread colours, blends and encodes the results. The stages pass frames through
bounded queues, and a frame holds one of ``max_in_flight`` slots from the moment it is decoded
until it is encoded, so memory does not grow with the length of the video. A video that cannot
be decoded to its end (corrupt or truncated) stops with ``VideoResult.error`` set; the frames
segmented before it are written, and the output files are complete, playable videos.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, List, Optional, Sequence

import numpy as np
import torch

from .options import DEFAULT_TTA_SCALES, pyav_problem
from .palettes import colorize, overlay
from .predict import (ImageError, Size, TTA, _model_of, label_batch, model_palette, network_size,
                      prepare_batch)

VIDEO_CODEC = "libx264"         # colour and overlay videos: H.264 in MP4
VIDEO_OPTIONS = {"preset": "veryfast", "crf": "18"}
LABELS_CODEC = "ffv1"           # the class-id video: lossless FFV1 in Matroska
DEFAULT_MAX_IN_FLIGHT = 16      # frames decoded and not yet encoded, at most
_POLL_S = 0.05                  # how often a blocked stage looks whether the run was stopped
_END = object()                 # the last item a stage passes on


class VideoError(ValueError):
    """A video that cannot be opened, read or written."""


@dataclass
class VideoResult:
    """What ``predict_video`` did."""
    source: str
    frames: int = 0                        # frames segmented and written to every output
    seconds: float = 0.0                   # wall time, from opening the video to closing outputs
    paths: List[str] = field(default_factory=list)   # the videos written (none when no frame was)
    error: Optional[str] = None            # why the video stopped early
    peak_in_flight: int = 0                # most frames held at once (decoded, not yet encoded)
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def import_av():
    """The ``av`` module, or ``VideoError`` saying how to install it."""
    problem = pyav_problem()
    if problem:
        raise VideoError(problem)
    import av
    return av


def label_pixel_format(num_classes: int) -> str:
    """The pixel format of the class-id video: 8-bit grey up to 256 classes, else 16-bit."""
    return "gray" if num_classes <= 256 else "gray16le"


def output_paths(out_dir: str, stem: str) -> List[str]:
    """The colour, overlay and class-id videos ``predict_video`` writes for ``stem``."""
    return [os.path.join(out_dir, f"{stem}_{kind}") for kind in
            ("color.mp4", "overlay.mp4", "labels.mkv")]


class _VideoWriter:
    """One output video, frames numbered 0, 1, ... at a constant ``rate``."""

    def __init__(self, av, path: str, codec: str, rate: Fraction, width: int, height: int,
                 pix_fmt: str, source_format: str, options: Optional[dict] = None):
        self.av, self.source_format, self.count = av, source_format, 0
        self.container = av.open(path, "w")
        try:
            self.stream = self.container.add_stream(codec, rate=rate, options=options or {})
            self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, pix_fmt
        except Exception:
            self.container.close()
            raise

    def write(self, array: np.ndarray) -> None:
        frame = self.av.VideoFrame.from_ndarray(array, format=self.source_format)
        frame.pts = self.count
        self.container.mux(self.stream.encode(frame))
        self.count += 1

    def close(self) -> None:
        try:
            self.container.mux(self.stream.encode(None))      # flush the encoder
        finally:
            self.container.close()


def open_writers(av, out_dir: str, stem: str, rate: Fraction, width: int, height: int,
                 num_classes: int) -> List[_VideoWriter]:
    """The colour, overlay (H.264: 4:2:0, or 4:4:4 for odd sizes) and class-id writers."""
    try:
        av.codec.Codec(VIDEO_CODEC, "w")
    except Exception:
        raise VideoError(f"this PyAV build cannot encode H.264 ({VIDEO_CODEC}); install the PyAV "
                         f"wheel from PyPI, which bundles it") from None
    os.makedirs(out_dir, exist_ok=True)
    chroma = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
    color, over, labels = output_paths(out_dir, stem)
    specs = [(color, VIDEO_CODEC, chroma, "rgb24", VIDEO_OPTIONS),
             (over, VIDEO_CODEC, chroma, "rgb24", VIDEO_OPTIONS),
             (labels, LABELS_CODEC, label_pixel_format(num_classes),
              label_pixel_format(num_classes), None)]
    writers: List[_VideoWriter] = []
    try:
        for path, codec, pix_fmt, source_format, options in specs:
            writers.append(_VideoWriter(av, path, codec, rate, width, height, pix_fmt,
                                        source_format, options))
    except Exception:
        for writer in writers:
            writer.close()
        raise
    return writers


class _Pipeline:
    """The shared state of one video's stages: the frame slots, the stop flag, the first error."""

    def __init__(self, max_in_flight: int):
        self.slots = threading.Semaphore(max_in_flight)
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.in_flight = self.peak_in_flight = 0
        self.error: Optional[str] = None

    def fail(self, message: str, stop: bool = False) -> None:
        with self.lock:
            self.error = self.error or message
        if stop:
            self.stopped.set()

    def take_slot(self) -> bool:
        """Wait for a free frame slot; False when the run was stopped meanwhile."""
        while not self.slots.acquire(timeout=_POLL_S):
            if self.stopped.is_set():
                return False
        with self.lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        return True

    def free_slot(self) -> None:
        with self.lock:
            self.in_flight -= 1
        self.slots.release()

    def put(self, channel: queue.Queue, item) -> bool:
        """Put ``item`` into ``channel``; False when the run was stopped while it was full."""
        while True:
            try:
                channel.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                if self.stopped.is_set():
                    return False

    def get(self, channel: queue.Queue):
        """The next item of ``channel``, or ``_END`` when the run was stopped."""
        while True:
            try:
                return channel.get(timeout=_POLL_S)
            except queue.Empty:
                if self.stopped.is_set():
                    return _END


def _reason(err: BaseException) -> str:
    """FFmpeg's words for an error, without the errno and file name PyAV adds."""
    return getattr(err, "strerror", None) or str(err)


def _open_input(av, source: str):
    """The input container and its first video stream, or ``VideoError``."""
    try:
        container = av.open(source)
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise VideoError(f"cannot open the video: {_reason(err)}") from None
    if not container.streams.video:
        container.close()
        raise VideoError("the file holds no video stream")
    stream = container.streams.video[0]
    return container, stream


class _VideoRun:
    """One video through the four stages (see the module's docstring)."""

    def __init__(self, av, model, out_dir: str, stem: str, options: dict, result: VideoResult,
                 progress):
        self.av, self.model, self.out_dir, self.stem = av, model, out_dir, stem
        self.size, self.batch_size = options["size"], options["batch_size"]
        self.tta, self.tta_scales, self.alpha = options["tta"], options["tta_scales"], options["alpha"]
        self.config = _model_of(model).config
        self.colors = model_palette(model)
        self.result, self.progress = result, progress
        self.pipe = _Pipeline(result.max_in_flight)
        self.frame_hw = None          # every frame is decoded at the first frame's size
        self.target = None            # the network input size

    def frames(self, container, stream):
        """The decoded frames. A read or decode error ends them: the decoder is flushed first,
        so that the frames it holds (decoded from the packets before the bad one) still come,
        and then the error is raised."""
        errors = (self.av.error.FFmpegError, OSError, ValueError)
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
                frames = packet.decode()
            except StopIteration:
                return
            except errors:
                try:
                    yield from stream.codec_context.decode(None)
                except errors:
                    pass
                raise
            yield from frames

    def decode(self, container, stream, frames_out: queue.Queue) -> None:
        count = 0
        try:
            for frame in self.frames(container, stream):
                if not self.pipe.take_slot():
                    return
                self.frame_hw = self.frame_hw or (frame.height, frame.width)
                array = frame.to_ndarray(format="rgb24", height=self.frame_hw[0],
                                         width=self.frame_hw[1])
                count += 1
                if not self.pipe.put(frames_out, array):
                    return
            if stream.frames and count < stream.frames:
                self.pipe.fail(f"the video ended after {count} of the {stream.frames} frames its "
                               f"header announces (truncated?)")
        except (self.av.error.FFmpegError, OSError, ValueError) as err:
            self.pipe.fail(f"decoding failed after {count} frame(s): {_reason(err)} (a corrupt "
                           f"or truncated video?)")
        finally:
            container.close()
            self.pipe.put(frames_out, _END)

    def preprocess(self, frames_in: queue.Queue, inputs_out: queue.Queue) -> None:
        try:
            while (array := self.pipe.get(frames_in)) is not _END:
                image = torch.from_numpy(array).permute(2, 0, 1).float().div_(255)
                if self.target is None:
                    self.target = network_size(self.config, self.size, tuple(image.shape[-2:]))
                if not self.pipe.put(inputs_out, (array, prepare_batch(self.model, [image],
                                                                       self.target))):
                    return
        except (ImageError, RuntimeError, ValueError) as err:
            self.pipe.fail(str(err), stop=True)
        finally:
            self.pipe.put(inputs_out, _END)

    def segment(self, inputs_in: queue.Queue, results_out: queue.Queue) -> None:
        """The model stage, in the calling thread: batches of ``batch_size`` frames."""
        try:
            ended = False
            while not ended:
                batch = []
                while len(batch) < self.batch_size:
                    item = self.pipe.get(inputs_in)
                    if item is _END:
                        ended = True
                        break
                    batch.append(item)
                if not batch:
                    break
                labels = label_batch(self.model, torch.cat([inputs for _, inputs in batch]),
                                     [array.shape[:2] for array, _ in batch], self.tta,
                                     self.tta_scales)
                for (array, _), label in zip(batch, labels):
                    if not self.pipe.put(results_out, (array, label.numpy())):
                        return
        except (RuntimeError, ValueError) as err:
            self.pipe.fail(f"segmentation failed: {err}", stop=True)
        finally:
            self.pipe.put(results_out, _END)

    def encode(self, results_in: queue.Queue, rate: Fraction) -> None:
        writers: List[_VideoWriter] = []
        dtype = np.uint8 if label_pixel_format(len(self.colors)) == "gray" else np.uint16
        try:
            while (item := self.pipe.get(results_in)) is not _END:
                array, labels = item
                if not writers:
                    height, width = array.shape[:2]
                    writers = open_writers(self.av, self.out_dir, self.stem, rate, width, height,
                                           len(self.colors))
                    self.result.paths = output_paths(self.out_dir, self.stem)
                color = colorize(labels, self.colors)
                writers[0].write(color)
                writers[1].write(overlay(array, color, self.alpha))
                writers[2].write(labels.astype(dtype))
                self.result.frames += 1
                self.pipe.free_slot()
                if self.progress is not None:
                    self.progress.update(1)
        except (self.av.error.FFmpegError, OSError, ValueError) as err:
            self.pipe.fail(f"cannot write the segmented video into {self.out_dir!r}: "
                           f"{_reason(err)}", stop=True)
        finally:
            for writer in writers:
                try:
                    writer.close()
                except (self.av.error.FFmpegError, OSError, ValueError) as err:
                    self.pipe.fail(f"cannot finish {writer.container.name!r}: {_reason(err)}")


def predict_video(model, source, out_dir, stem: Optional[str] = None, *, size: Size = None,
                  batch_size: int = 1, tta: TTA = None,
                  tta_scales: Sequence[float] = DEFAULT_TTA_SCALES, alpha: float = 0.5,
                  max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, progress: Any = None
                  ) -> VideoResult:
    """Segment the video file ``source`` frame by frame and write, into ``out_dir`` (created when
    the first frame is written), ``<stem>_color.mp4`` (the palette colours), ``<stem>_overlay.mp4``
    (the frames blended with them, ``alpha``) and ``<stem>_labels.mkv`` (the class ids, lossless
    FFV1 grey), at the input's frame size and average frame rate. ``stem`` defaults to the
    source's name without extension; ``size``, ``batch_size`` (frames per forward pass), ``tta``
    and ``tta_scales`` are those of ``hyperseg.predict_batch``. At most ``max_in_flight`` frames
    are held at once. ``progress``: a tqdm bar (or None), advanced once per frame written, its
    total set to the frame count the header announces.

    Raises ``VideoError`` when the video cannot be opened (nothing is written). A video that
    fails part-way returns with ``error`` set; the frames before the failure are written.
    """
    av = import_av()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_in_flight < batch_size:
        raise ValueError(f"max_in_flight ({max_in_flight}) must be at least batch_size "
                         f"({batch_size}), or no batch could ever fill")
    source, out_dir = os.fspath(source), os.fspath(out_dir)
    stem = stem or os.path.splitext(os.path.basename(source))[0]
    started = time.perf_counter()
    container, stream = _open_input(av, source)
    result = VideoResult(source, max_in_flight=max_in_flight)
    if progress is not None:
        progress.total = stream.frames or None
        progress.refresh()
    options = dict(size=size, batch_size=batch_size, tta=tta, tta_scales=tta_scales, alpha=alpha)
    run = _VideoRun(av, model, out_dir, stem, options, result, progress)
    rate = stream.average_rate or stream.guessed_rate or Fraction(25)
    frames, inputs, results = (queue.Queue(maxsize=max_in_flight) for _ in range(3))
    threads = [threading.Thread(target=run.decode, args=(container, stream, frames), daemon=True),
               threading.Thread(target=run.preprocess, args=(frames, inputs), daemon=True),
               threading.Thread(target=run.encode, args=(results, rate), daemon=True)]
    for thread in threads:
        thread.start()
    try:
        run.segment(inputs, results)
    finally:
        threads[2].join()            # the encoder writes what was segmented and closes the outputs
        run.pipe.stopped.set()
        for thread in threads:
            thread.join()
    result.seconds = time.perf_counter() - started
    result.error, result.peak_in_flight = run.pipe.error, run.pipe.peak_in_flight
    return result
