#!/usr/bin/env python3
"""Writes the small audio files the decoder tests read (tests/fixtures/audio/): one per container and
codec the engine decodes, at several rates and channel counts. Each holds 0.4 s of a 440 Hz tone
with left amplitude 0.6 and right amplitude 0.2 (stereo) or 0.4 (mono), so every file mixes down
to the same 0.4-amplitude tone; the tests check duration, the mixdown, and the tone's amplitude and
frequency after resampling to 16 kHz (lossy codecs within their error).

Encoded with PyAV (`pip install av==18.1.0`, which bundles FFmpeg's encoders). CI never runs this;
its outputs are committed (144 KB).

    .venv-fixtures/bin/python scripts/make_audio_fixtures.py
"""

import pathlib

import av
import numpy as np

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "audio"
SECONDS = 0.4
FREQ = 440.0

# (file name, container format, codec, sample format, rate, channels, bit rate)
CASES = [
    ("u8_8000_mono.wav", "wav", "pcm_u8", "u8", 8000, 1, None),
    ("s16_16000_mono.wav", "wav", "pcm_s16le", "s16", 16000, 1, None),
    ("s24_11025_stereo.wav", "wav", "pcm_s24le", "s32", 11025, 2, None),
    ("s32_8000_mono.wav", "wav", "pcm_s32le", "s32", 8000, 1, None),
    ("f32_22050_mono.wav", "wav", "pcm_f32le", "flt", 22050, 1, None),
    ("flac_44100_stereo.flac", "flac", "flac", "s16", 44100, 2, None),
    ("mp3_44100_stereo.mp3", "mp3", "libmp3lame", "fltp", 44100, 2, 64000),
    ("vorbis_48000_stereo.ogg", "ogg", "vorbis", "fltp", 48000, 2, 64000),
    ("aac_48000_mono.m4a", "ipod", "aac", "fltp", 48000, 1, 64000),
]


def tone(rate, channels):
    t = np.arange(int(SECONDS * rate)) / rate
    s = np.sin(2 * np.pi * FREQ * t)
    amps = [0.4] if channels == 1 else [0.6, 0.2]
    return np.stack([a * s for a in amps]).astype(np.float32)  # [channels, n]


def write(name, fmt, codec, sample_fmt, rate, channels, bit_rate):
    path = OUT / name
    data = tone(rate, channels)
    layout = "mono" if channels == 1 else "stereo"
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        if codec == "vorbis":
            stream.codec_context.options = {"strict": "experimental"}
        if bit_rate:
            stream.bit_rate = bit_rate
        frame_size = stream.codec_context.frame_size or 1024
        planar = av.AudioFrame.from_ndarray(data, format="fltp", layout=layout)
        planar.sample_rate = rate
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=rate,
                                      frame_size=frame_size)
        for frame in [*resampler.resample(planar), *resampler.resample(None)]:
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    print(f"{name}: {path.stat().st_size:,} B")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        write(*case)


if __name__ == "__main__":
    main()
