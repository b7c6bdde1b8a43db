"""The official openai SDK sending images to `phi4 serve` on the tiny Phi-4-multimodal.

Run by tests/openai_sdk.rs with PHI4_BASE_URL, PHI4_API_KEY, PHI4_MODEL, PHI4_IMAGE (a PNG),
PHI4_EXPECT (the reference's greedy text) and PHI4_PROMPT_TOKENS set. The last line printed is
the plain 'N passed, 0 failed' summary.
"""

import base64
import os

import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["PHI4_BASE_URL"], api_key=os.environ["PHI4_API_KEY"], max_retries=0, timeout=120)
MODEL = os.environ["PHI4_MODEL"]
with open(os.environ["PHI4_IMAGE"], "rb") as f:
    DATA_URL = "data:image/png;base64," + base64.b64encode(f.read()).decode()


def messages(url):
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "Describe the image."},
    ]}]


def test_image_chat_matches_the_reference():
    r = client.chat.completions.create(model=MODEL, messages=messages(DATA_URL), temperature=0, max_tokens=6)
    assert r.choices[0].message.content == os.environ["PHI4_EXPECT"], r.choices[0].message.content
    assert r.usage.prompt_tokens == int(os.environ["PHI4_PROMPT_TOKENS"]), r.usage


def test_streamed_image_chat_agrees():
    stream = client.chat.completions.create(model=MODEL, messages=messages(DATA_URL), temperature=0,
                                            max_tokens=6, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == os.environ["PHI4_EXPECT"], text


def test_bad_images_are_400():
    for url in ("https://example.com/cat.png", "data:image/png;base64,AAAA"):
        try:
            client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=2)
        except openai.BadRequestError as e:
            assert e.status_code == 400
        else:
            raise AssertionError(f"{url[:30]} was accepted")


if __name__ == "__main__":
    import runner

    runner.run(globals(), "sdk images")
