"""The fragmented MP4 writer: frames and speech appended block by block, playable at every moment.

Each `write` call becomes its own fragment of a fragmented MP4 (H.264 yuv420p + AAC), flushed before
it returns, so a crash or kill loses at most the chunk being written: the partial file left behind
plays up to the last finished chunk. Files are handled by `liveavatar.io.output.OutputFile`: nothing
exists on disk before the first chunk, the partial file is created exclusively (a previous run's is
never touched), and the finished file is published without replacing anything that is not ours to
replace. Each chunk is muxed by a short-lived muxer (the encoders live for the whole file), because
FFmpeg's MP4 muxer only emits a fragment when the next one starts.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from liveavatar.errors import UserError
from liveavatar.io.media import SAMPLE_RATE
from liveavatar.io.output import OutputFile, is_disk_full

_MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"
# Per-chunk muxer: fragment at keyframes (each chunk starts with one), an empty moov (the init segment
# comes first), data offsets relative to each moof (fragments can be appended anywhere), and absolute
# decode times: `frag_discont` with no edit list and no shift to zero makes tfdt = the first dts.
_FRAGMENT_OPTIONS = {
    "movflags": _MOVFLAGS + "+frag_discont", "use_editlist": "0", "avoid_negative_ts": "disabled",
}
_AAC_FRAME = 1024  # samples per AAC packet
# A restarted AAC encoder is fed this many samples before its first kept packet, so that packet's
# MDCT window (which reaches 1024 samples back) sees the real signal and overlap-adds cleanly with
# the file's last packet; the packets made from them are dropped.
_AAC_LEAD_IN = 2 * _AAC_FRAME


def _sps_profile(extradata: bytes) -> bytes | None:
    """profile_idc, constraint flags and level_idc of the H.264 SPS in `extradata` (avcC or Annex B)."""
    if len(extradata) >= 4 and extradata[0] == 1:  # avcC
        return extradata[1:4]
    i = extradata.find(b"\x00\x00\x01")
    while i >= 0 and i + 6 <= len(extradata):
        if extradata[i + 3] & 0x1F == 7:  # a sequence parameter set
            return extradata[i + 4:i + 7]
        i = extradata.find(b"\x00\x00\x01", i + 3)
    return None


def read_comment(path: str | os.PathLike) -> str | None:
    """The `comment` tag of an MP4 file (None when it has none or cannot be read)."""
    try:
        with av.open(str(path)) as c:
            return c.metadata.get("comment")
    except (av.FFmpegError, OSError):
        return None


def _top_level_boxes(data: bytes):
    """Yield (type, bytes) of the top-level ISO-BMFF boxes in `data`."""
    i = 0
    while i + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[i:i + 8])
        if size == 1:
            size = struct.unpack(">Q", data[i + 8:i + 16])[0]
        elif size == 0:
            size = len(data) - i
        yield kind.decode("latin-1"), data[i:i + size]
        i += size


class MP4Writer:
    """Streams RGB frames (and the matching span of a mono speech track) into a fragmented MP4.

    `write(frames, audio)` encodes a [T, H, W, 3] uint8 chunk (its first frame forced to an IDR
    keyframe) and the audio that plays with it, and appends both to the partial file
    (`<stem>.partial.mp4`, or the next free `<stem>.partial-N.mp4`) as one self-contained fragment,
    flushed before returning. The audio is either the whole track given to
    the constructor (`audio=array`: each chunk muxes samples [n0·sr/fps, (n0+T)·sr/fps)) or arrives
    chunk by chunk (`audio=True`, `write(frames, samples)`: memory stays flat for any length; the AAC
    encoder's look-ahead makes each fragment's audio end up to 2048 samples before its video, and
    `close()` appends the rest). `close()` publishes the partial file as `path` (or, when another file took
    that name meanwhile, the next free `<stem>-N.mp4`; see `OutputFile`); `abort()`, or leaving a
    `with` block by an exception, keeps the partial file, which plays up to the last finished chunk. A
    full disk or a removed output folder raises UserError and leaves the partial file as it was
    after its last complete chunk. The audio track is cut with the video (at AAC-packet
    granularity: it ends < 1024 samples after the last frame); it may be shorter than the video.
    H.264 yuv420p (libx264, `tune=zerolatency` so that every frame leaves the encoder at once) and AAC.
    Every chunk costs a keyframe, so very short chunks inflate the file; write several blocks at a
    time if that matters.
    """

    def __init__(self, path: str | os.PathLike | OutputFile, *, width: int, height: int, fps: int = 25,
                 audio: np.ndarray | bool | None = None, sample_rate: int = SAMPLE_RATE, crf: int = 18,
                 preset: str = "veryfast", audio_bitrate: int = 64000, comment: str | None = None,
                 resume: dict | None = None):
        """`path`: the output file name (an existing file is replaced when done), an `OutputFile`
        carrying the run's naming rules, or a callable that receives each fragment's bytes as it is
        made (a live stream: the first call carries the init segment; nothing is written to disk).
        `comment`: a text tag stored in the init segment (read back by `read_comment`). `resume`: a
        `checkpoint()` of an earlier writer of the same file: writing continues after its last
        fragment, in the partial file that `path` (an `OutputFile`) has taken over with `resume()`."""
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"MP4Writer needs positive even width and height, got {width}x{height}")
        self._incremental = audio is True
        if audio is True or audio is False:
            audio = np.zeros(0, np.float32) if audio else None
        if audio is not None:
            audio = np.asarray(audio, dtype=np.float32)  # no copy for float32 input; clipped per block
            if audio.ndim != 1:
                raise ValueError(f"MP4Writer audio must be mono [N], got shape {audio.shape}")
        self._sink = path if callable(path) else None
        self.out = None if self._sink else (path if isinstance(path, OutputFile) else
                                            OutputFile(path, what="output video", overwrite=True))
        self.path = self.out.path if self.out is not None else None
        self.width, self.height, self.fps, self.sample_rate = width, height, fps, sample_rate
        self._audio = audio  # the track (whole), or the samples not yet encoded (incremental)
        self._audio_base = 0  # absolute index of _audio[0]
        self._file = None  # the partial file, from the first chunk on

        # The encoders live in a container that is never written to: the per-chunk muxers copy their
        # codec parameters (SPS/PPS, AudioSpecificConfig) from its streams.
        try:
            self._codecs = av.open(io.BytesIO(), "w", format="mp4", options={"movflags": _MOVFLAGS})
            self._video = self._codecs.add_stream(
                "libx264", rate=fps, options={"crf": str(crf), "preset": preset, "tune": "zerolatency"})
            self._video.width, self._video.height, self._video.pix_fmt = width, height, "yuv420p"
            self._audio_stream = None
            if audio is not None:
                self._audio_stream = self._codecs.add_stream("aac", rate=sample_rate, layout="mono")
                self._audio_stream.bit_rate = audio_bitrate
            self._codecs.start_encoding()  # opens the encoders, fills the streams' codec parameters
        except av.FFmpegError as e:
            raise UserError(f"the video encoder could not be opened for {width}x{height} ({e})") from None

        self.comment = comment
        self.frames_written = 0
        self._chunks = 0
        self._audio_fed = 0  # samples given to the AAC encoder
        self._audio_drained = False
        self._audio_out_end = 0  # end (in samples) of the last AAC packet out of the encoder
        self._audio_muxed_end = 0  # end (in samples) of the last AAC packet in the file
        self._audio_min_pts = 0  # packets before this are dropped (the priming packet of a restarted encoder)
        self._audio_pending: list[av.Packet] = []
        self._sha = hashlib.sha256()  # of the bytes in the partial file
        self._state = "open"
        if resume is not None:
            self._continue(resume)

    # -- audio --------------------------------------------------------------------------------------

    def _audio_packets_until(self, end: int, final: bool) -> list[av.Packet]:
        """Encode audio until every packet starting before sample `end` is out, as far as the samples
        at hand allow (all of them and the encoder's tail when `final`); return those packets."""
        while self._audio_out_end < end and not self._audio_drained:
            have = self._audio_base + len(self._audio) - self._audio_fed
            if have >= _AAC_FRAME or (final and have > 0):
                i = self._audio_fed - self._audio_base
                block = np.clip(self._audio[i:i + _AAC_FRAME], -1.0, 1.0)
                frame = av.AudioFrame.from_ndarray(block[None], format="flt", layout="mono")
                frame.sample_rate, frame.pts = self.sample_rate, self._audio_fed
                frame.time_base = Fraction(1, self.sample_rate)
                self._audio_fed += len(block)
                packets = self._audio_stream.encode(frame)
            elif final:
                packets = self._audio_stream.encode(None)
                self._audio_drained = True
            else:
                break
            for p in packets:
                self._audio_out_end = max(self._audio_out_end, p.pts + (p.duration or _AAC_FRAME))
                # Drop the encoder-priming packet (pts < 0): with it the muxer would shift every track,
                # since fragmented files carry no edit list. The first 64 ms decode with a short fade-in.
                # A restarted encoder's priming packet overlaps the file's last packet: dropped too.
                if p.pts >= self._audio_min_pts:
                    self._audio_pending.append(p)
        out = [p for p in self._audio_pending if p.pts < end]
        del self._audio_pending[:len(out)]
        for p in out:
            self._audio_muxed_end = max(self._audio_muxed_end, p.pts + (p.duration or _AAC_FRAME))
        if self._incremental:  # drop the samples no restarted encoder would need again
            keep = max(self._audio_base, min(self._audio_fed, self._audio_muxed_end - _AAC_LEAD_IN))
            self._audio = self._audio[keep - self._audio_base:]
            self._audio_base = keep
        return out

    # -- public API ---------------------------------------------------------------------------------

    def write(self, frames: np.ndarray, audio: np.ndarray | None = None) -> None:
        """Append frames [T, H, W, 3] uint8 (RGB) and their audio as one flushed fragment (`audio`: the
        samples that play with these frames, when the writer was made with `audio=True`)."""
        if self._state != "open":
            raise RuntimeError(f"MP4Writer.write after {self._state}")
        if (audio is not None) != self._incremental:
            raise ValueError("pass the chunk's audio to write() exactly when the writer was made with audio=True")
        if audio is not None:
            audio = np.asarray(audio, dtype=np.float32)
            if audio.ndim != 1:
                raise ValueError(f"MP4Writer audio must be mono [N], got shape {audio.shape}")
            self._audio = np.concatenate([self._audio, audio])
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"expected uint8 frames [T, {self.height}, {self.width}, 3], "
                             f"got {frames.dtype} {tuple(frames.shape)}")
        if len(frames) == 0:
            return
        n0 = self.frames_written
        try:
            packets, n1 = self._encode(frames, n0)
        except av.FFmpegError as e:
            raise UserError(f"the encoder failed on frame {n0} ({e}); {self._kept()}") from None
        self._write_fragment(packets)
        self.frames_written = n1

    def _encode(self, frames: np.ndarray, n0: int) -> tuple[list[av.Packet], int]:
        """Encode frames n0.. and the audio that plays with them -> (packets, frame count after them)."""
        packets = []
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts, frame.time_base = n0 + i, Fraction(1, self.fps)
            if i == 0:
                frame.pict_type = av.video.frame.PictureType.I  # an IDR: the chunk decodes on its own
            for p in self._video.encode(frame):
                p.duration = 1  # one frame in the codec time base 1/fps; the last sample needs it
                packets.append(p)
        n1 = n0 + len(frames)
        if self._audio is not None:
            packets += self._audio_packets_until(n1 * self.sample_rate // self.fps, final=not self._incremental)
        return packets, n1

    def _kept(self) -> str:
        if self.partial_path is None:
            return "nothing was written"
        return f"{str(self.partial_path)!r} keeps the {self.frames_written} frames written so far and plays"

    def _write_fragment(self, packets: list[av.Packet]) -> None:
        """Mux `packets` with a fresh muxer and append its boxes (the init segment only once)."""
        buf = io.BytesIO()
        options = {**_FRAGMENT_OPTIONS, "fragment_index": str(self._chunks + 1)}  # mfhd sequence number
        mux = av.open(buf, "w", format="mp4", options=options)
        if self.comment is not None and not self._chunks:
            mux.metadata["comment"] = self.comment
        streams = {self._video.index: mux.add_stream_from_template(self._video)}
        if self._audio_stream is not None:
            streams[self._audio_stream.index] = mux.add_stream_from_template(self._audio_stream)
        for p in sorted(packets, key=lambda p: p.dts * p.time_base):
            p.stream = streams[p.stream_index]
            mux.mux(p)
        mux.close()
        keep = ("moof", "mdat") if self._chunks else ("ftyp", "moov", "moof", "mdat")
        data = b"".join(box for kind, box in _top_level_boxes(buf.getvalue()) if kind in keep)
        if self._sink is not None:
            self._sink(data)
        elif self._file is None:
            self._file = self.out.begin(data)  # the partial file appears holding its first fragment
            self._sha.update(data)
        else:
            self.out.check_alive()
            end = self._file.tell()
            try:
                self._file.write(data)
                self._file.flush()
            except OSError as e:
                try:  # back to the last complete fragment: the file stays playable
                    self._file.truncate(end)
                    self._file.seek(end)
                except OSError:
                    pass
                why = "the disk is full" if is_disk_full(e) else (e.strerror or str(e))
                raise UserError(f"writing {str(self.out.partial_path)!r} failed ({why}); it keeps the "
                                f"{self.frames_written} frames written so far and plays") from None
            self._sha.update(data)
        self._chunks += 1

    # -- checkpoints --------------------------------------------------------------------------------

    def checkpoint(self) -> dict:
        """Where this file stands after its last complete fragment, made durable first (fsync): what a
        writer in another process needs to continue it (`MP4Writer(..., resume=...)`). Between writes
        only; the partial file must exist (after the first `write`).

        The video encoder restarts on an IDR frame (every chunk starts with one), so nothing of it is
        kept. The AAC encoder restarts at the end S of the last audio packet in the file: the samples
        from S − 2048 on are part of the checkpoint, the new encoder is fed from there, and its packets
        before S (priming and lead-in) are dropped, so the first new packet overlap-adds with the old
        last one as in an uninterrupted encode (the bits differ: encoder noise)."""
        if self._state != "open" or self._file is None or not self._incremental and self._audio is not None:
            raise RuntimeError("MP4Writer.checkpoint needs an open partial file with chunk-by-chunk audio")
        self._file.flush()
        os.fsync(self._file.fileno())
        audio, lead = None, 0
        if self._audio is not None:
            lead = min(_AAC_LEAD_IN, self._audio_muxed_end - self._audio_base)
            audio = np.array(self._audio[self._audio_muxed_end - lead - self._audio_base:], dtype=np.float32)
        return {"partial": self.partial_path.name, "bytes": self._file.tell(), "sha256": self._sha.hexdigest(),
                "frames": self.frames_written, "fragments": self._chunks, "audio_start": self._audio_muxed_end,
                "audio_lead": lead, "audio": audio, "codecs": self._codec_config()}

    def _codec_config(self) -> list[str]:
        """The encoders' configuration records (SPS/PPS, AudioSpecificConfig) that the init segment holds."""
        streams = [self._video] + ([self._audio_stream] if self._audio_stream is not None else [])
        return [bytes(s.codec_context.extradata or b"").hex() for s in streams]

    def _continue(self, cp: dict) -> None:
        """Continue the file of checkpoint `cp` (see `checkpoint`)."""
        if self.out is None or self.out.file is None:
            raise RuntimeError("MP4Writer(resume=...) needs an OutputFile that took over the partial file")
        if list(cp["codecs"]) != self._codec_config():
            raise UserError(f"the encoders of this installation configure the video differently from the ones that "
                            f"started {str(self.out.partial_path)!r}; it cannot be continued: start anew")
        if (cp["audio"] is not None) != self._incremental:
            raise ValueError("the checkpoint's audio mode differs from this writer's")
        self._file, self._sha = self.out.file, self.out.sha
        self.frames_written, self._chunks = int(cp["frames"]), int(cp["fragments"])
        if self._incremental:
            start, lead = int(cp["audio_start"]), int(cp["audio_lead"])
            self._audio = np.asarray(cp["audio"], dtype=np.float32)
            self._audio_base = self._audio_fed = self._audio_out_end = start - lead
            self._audio_muxed_end = self._audio_min_pts = start

    @property
    def duration(self) -> float:
        """Seconds of video written so far."""
        return self.frames_written / self.fps

    @property
    def partial_path(self) -> Path | None:
        """The file being written (None before the first chunk, or when streaming to a callable)."""
        return self.out.partial_path if self.out is not None else None

    @property
    def mime(self) -> str:
        """The MIME type with codecs, as MediaSource wants it (e.g. `video/mp4; codecs="avc1.64000c,mp4a.40.2"`)."""
        sps = _sps_profile(bytes(self._video.codec_context.extradata or b""))
        video = f"avc1.{sps.hex()}" if sps else "avc1.640028"
        return f'video/mp4; codecs="{video}' + (',mp4a.40.2"' if self._audio_stream is not None else '"')

    def close(self) -> Path:
        """Finish the file and publish it (atomically, in the same folder); returns its name."""
        if self._state != "open":
            raise RuntimeError(f"MP4Writer.close after {self._state}")
        if self.frames_written == 0:
            self.abort()
            raise ValueError("MP4Writer.close with no frames written; nothing to save")
        if self._incremental:  # the encoder's tail: the audio of the last chunk
            tail = self._audio_packets_until(self.frames_written * self.sample_rate // self.fps, final=True)
            if tail:
                self._write_fragment(tail)
        self._release()
        self.path = self.out.finish() if self.out is not None else None
        self._state = "closed"
        return self.path

    def abort(self) -> None:
        """Stop without publishing: keeps the partial file (playable up to the last chunk); when no chunk
        was written nothing was created."""
        if self._state != "open":
            return
        self._release()
        if self.out is not None:
            self.out.keep()
        self._state = "aborted"

    def _release(self) -> None:
        try:
            self._codecs.close()
        except av.FFmpegError:
            pass

    def __enter__(self) -> MP4Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._state != "open":  # closed or aborted inside the block
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self):
        if getattr(self, "_state", None) == "open":
            self.abort()
