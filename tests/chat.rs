//! Chat renders byte-for-byte against transformers' apply_chat_template (fixtures/chat_cases.json).

mod common;

use common::{fixtures, tiny_dir};
use phi4::text::chat::PHI4_CHAT_TEMPLATE;
use phi4::text::{ChatTemplate, Message};
use serde_json::Value;

fn cases() -> Vec<Value> {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("chat_cases.json")).unwrap())
        .unwrap()
}

fn check(t: &ChatTemplate) {
    let cases = cases();
    assert!(cases.len() >= 7);
    for c in cases {
        let msgs: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
        let tools: Option<Vec<Value>> = c.get("tools").map(|t| t.as_array().unwrap().clone());
        let got = t
            .render(
                &msgs,
                tools.as_deref(),
                c["add_generation_prompt"].as_bool().unwrap(),
            )
            .unwrap();
        assert_eq!(got, c["rendered"].as_str().unwrap(), "case {}", c["name"]);
    }
}

#[test]
fn checkpoint_template_renders_like_transformers() {
    // transformers 5 writes the template to chat_template.jinja.
    check(&ChatTemplate::from_model_dir(&tiny_dir()).unwrap());
}

#[test]
fn official_fallback_renders_like_transformers() {
    check(&ChatTemplate::new(PHI4_CHAT_TEMPLATE, "<|endoftext|>", "<|endoftext|>").unwrap());
}

#[test]
fn template_inside_tokenizer_config_is_used() {
    // The published Phi-4-mini files keep the template in tokenizer_config.json.
    let dir = tempdir();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({"chat_template": "{{ messages[0]['content'] | upper }}", "eos_token": "<|endoftext|>"}).to_string(),
    )
    .unwrap();
    let t = ChatTemplate::from_model_dir(&dir).unwrap();
    assert_eq!(
        t.render(&[Message::new("user", "hi")], None, true).unwrap(),
        "HI"
    );
}

#[test]
fn content_parts_and_bad_content() {
    let m: Message = serde_json::from_str(
        r#"{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}"#,
    )
    .unwrap();
    assert_eq!(m.content, "a\nb");
    // Image parts become the message's images, placed where they stand; whether the model
    // takes images is the engine's to say.
    let m: Message = serde_json::from_str(
        r#"{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"b"}]}"#,
    )
    .unwrap();
    assert_eq!(m.content, "a<|image_1|>b");
    assert_eq!(m.images, [phi4::text::ImageSource::Url("x".into())]);
    let e = serde_json::from_str::<Message>(
        r#"{"role":"user","content":[{"type":"video_url","video_url":{"url":"x"}}]}"#,
    )
    .unwrap_err();
    assert!(e.to_string().contains("video_url"));
    let e = serde_json::from_str::<Message>(
        r#"{"role":"user","content":[{"type":"image_url","image_url":{}}]}"#,
    )
    .unwrap_err();
    assert!(e.to_string().contains("image_url"), "{e}");
    let t = ChatTemplate::new(PHI4_CHAT_TEMPLATE, "<|endoftext|>", "<|endoftext|>").unwrap();
    assert!(t.render(&[], None, true).is_err());
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "phi4-chat-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn earlier_tool_calls_and_results_render_in_the_documented_format() {
    let msgs: Vec<Message> = serde_json::from_value(serde_json::json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
    ]))
    .unwrap();
    let t = ChatTemplate::new(PHI4_CHAT_TEMPLATE, "<|endoftext|>", "<|endoftext|>").unwrap();
    assert_eq!(
        t.render(&msgs, None, true).unwrap(),
        "<|user|>Weather in Paris?<|end|>\
         <|assistant|><|tool_call|>[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]<|/tool_call|><|end|>\
         <|tool_response|>{\"temp\": 21}<|end|><|assistant|>"
    );
}
