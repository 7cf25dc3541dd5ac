"""Short videos that the tests write themselves with PyAV, and reading videos back."""
from fractions import Fraction

import numpy as np

LEFT, RIGHT = (200, 40, 40), (30, 60, 210)      # the two flat colours of ``two_colour_frames``


def two_colour_frames(count, height, width):
    """``count`` frames whose left half is one flat colour and right half another: codecs keep
    flat areas nearly exact, so class maps computed from the decoded frames are stable."""
    frame = np.empty((height, width, 3), np.uint8)
    frame[:, : width // 2] = LEFT
    frame[:, width // 2:] = RIGHT
    return [frame.copy() for _ in range(count)]


def noise_frames(count, height, width, seed=0):
    """Random frames: large packets, so that a file cut part-way loses whole frames."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def write_video(path, frames, rate=Fraction(25, 2), codec="libx264", pix_fmt="yuv420p",
                options=None):
    """Encode (H, W, 3) uint8 RGB ``frames`` into ``path`` at ``rate`` frames per second."""
    import av

    height, width = frames[0].shape[:2]
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def read_video(path, pixel_format="rgb24"):
    """(frames as arrays, average frame rate, (height, width), codec name) of ``path``."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format=pixel_format) for frame in container.decode(stream)]
        return (frames, stream.average_rate, (stream.height, stream.width),
                stream.codec_context.name)


def packet_offsets(path):
    """The file offset of every video packet of ``path``, in file order."""
    import av

    with av.open(str(path)) as container:
        return sorted(packet.pos for packet in container.demux(container.streams.video[0])
                      if packet.size)
