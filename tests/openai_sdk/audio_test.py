"""The official openai SDK using `phi4 serve`'s audio endpoints and audio chat parts on the tiny
Phi-4-multimodal.

Run by tests/openai_sdk.rs with PHI4_BASE_URL, PHI4_API_KEY, PHI4_MODEL, PHI4_AUDIO (a 3 s WAV),
PHI4_EXPECT (the reference's greedy text for the transcription prompt), PHI4_EXPECT_IDS (its
token ids, comma-separated) and PHI4_PROMPT_TOKENS set. The last line printed is the plain
'N passed, 0 failed' summary.
"""

import base64
import os

import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["PHI4_BASE_URL"], api_key=os.environ["PHI4_API_KEY"], max_retries=0, timeout=300)
MODEL = os.environ["PHI4_MODEL"]
AUDIO = os.environ["PHI4_AUDIO"]
EXPECT_IDS = [int(t) for t in os.environ["PHI4_EXPECT_IDS"].split(",")]
with open(AUDIO, "rb") as f:
    WAV = f.read()


def test_verbose_json_transcription_has_the_reference_tokens_and_segment_times():
    with open(AUDIO, "rb") as f:
        r = client.audio.transcriptions.create(model=MODEL, file=f, response_format="verbose_json",
                                               temperature=0)
    assert r.duration == 3.0, r.duration
    seg = r.segments[0]
    assert (seg.start, seg.end) == (0.0, 3.0), seg
    assert seg.tokens[: len(EXPECT_IDS)] == EXPECT_IDS, seg.tokens[:8]
    assert r.text == seg.text


def test_every_response_format():
    j = client.audio.transcriptions.create(model=MODEL, file=("clip.wav", WAV))
    assert isinstance(j.text, str)
    t = client.audio.transcriptions.create(model=MODEL, file=("clip.wav", WAV), response_format="text")
    assert t.strip() == j.text, (t, j.text)
    srt = client.audio.transcriptions.create(model=MODEL, file=("clip.wav", WAV), response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:03,000\n"), srt[:60]
    vtt = client.audio.transcriptions.create(model=MODEL, file=("clip.wav", WAV), response_format="vtt")
    assert vtt.startswith("WEBVTT"), vtt[:60]


def test_translation():
    r = client.audio.translations.create(model=MODEL, file=("clip.wav", WAV))
    assert isinstance(r.text, str)


def test_input_audio_chat_matches_the_reference():
    r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=6, messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(WAV).decode(), "format": "wav"}},
        {"type": "text", "text": "Transcribe the audio clip into text."},
    ]}])
    assert r.choices[0].message.content == os.environ["PHI4_EXPECT"], r.choices[0].message.content
    assert r.usage.prompt_tokens == int(os.environ["PHI4_PROMPT_TOKENS"]), r.usage


def test_bad_audio_is_400():
    try:
        client.audio.transcriptions.create(model=MODEL, file=("notes.mp3", b"this is not audio"))
    except openai.BadRequestError as e:
        assert e.status_code == 400 and "not a supported audio file" in str(e), e
    else:
        raise AssertionError("junk audio was accepted")


if __name__ == "__main__":
    import runner

    runner.run(globals(), "sdk audio")
