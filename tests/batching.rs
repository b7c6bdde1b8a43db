//! Batched forward passes, the continuous batcher and grammar-constrained decoding on the tiny
//! checkpoint.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tiny_dir;
use phi4::engine::{Batcher, BatcherConfig, Event, Grammar, Request, SubmitError};
use phi4::model::BatchItem;
use phi4::text::tool_calls::{ToolCallParser, ToolEvent};
use phi4::{Engine, FinishReason, SamplingParams};
use serde_json::{json, Value};

fn engine() -> Arc<Engine> {
    Arc::new(Engine::load(&tiny_dir()).unwrap())
}

/// Prompt ids of assorted lengths made from ordinary text.
fn prompts(e: &Engine, n: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            let words = [
                "the cat",
                " sat on",
                " a mat",
                " and then",
                " it ran",
                " far away",
            ];
            let text: String = (0..=(i % 9))
                .map(|k| words[(i + k) % words.len()])
                .collect();
            e.tokenizer.encode(&format!("{i}: {text}")).unwrap()
        })
        .collect()
}

/// Collects a request's events until its last step.
fn drain(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>) -> (Vec<u32>, String, FinishReason) {
    let (mut ids, mut text) = (Vec::new(), String::new());
    loop {
        match rx.blocking_recv().expect("batcher dropped a request") {
            Event::Started => {}
            Event::Step(s) => {
                ids.push(s.token);
                text.push_str(&s.text);
                if let Some(f) = s.finish {
                    return (ids, text, f);
                }
            }
            Event::Error(e) => panic!("request failed: {e}"),
        }
    }
}

/// Submits one request per prompt, all at once.
fn submit_all(
    b: &Batcher,
    ps: &[Vec<u32>],
    params: impl Fn(usize) -> SamplingParams,
) -> Vec<tokio::sync::mpsc::UnboundedReceiver<Event>> {
    ps.iter()
        .enumerate()
        .map(|(i, p)| {
            b.submit(Request {
                prompt: p.clone(),
                params: params(i),
                ..Default::default()
            })
            .unwrap()
        })
        .collect()
}

#[test]
fn batched_forward_equals_one_sequence_at_a_time() {
    let e = engine();
    let m = &e.model;
    let ps = prompts(&e, 5);
    let table = m.rope.table_for_len(40);
    // Prefill each alone, then decode one token for all five together and alone.
    let mut alone = Vec::new();
    let mut caches = Vec::new();
    for p in &ps {
        let mut c = m.new_cache();
        m.forward(p, &mut c, table, phi4::model::Logits::Last, None)
            .unwrap();
        let mut c2 = c.clone();
        alone.push(
            m.forward(&[17], &mut c2, table, phi4::model::Logits::Last, None)
                .unwrap(),
        );
        caches.push(c);
    }
    let tok = [17u32];
    let mut items: Vec<BatchItem> = caches
        .iter_mut()
        .map(|cache| BatchItem::new(&tok, cache, table))
        .collect();
    let batched = m.forward_batch(&mut items).unwrap();
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        // Rounding only: the kernels sum in a different order for one row than for five.
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = common::max_abs_diff(a, b);
        assert!(
            d <= 1e-5 * scale,
            "sequence {i}: batched logits differ by {d}"
        );
    }
    for (c, p) in caches.iter().zip(&ps) {
        assert_eq!(c.len, p.len() + 1);
    }
}

#[test]
fn thirty_two_concurrent_greedy_requests_equal_their_sequential_results() {
    let e = engine();
    let ps = prompts(&e, 32);
    // Some sequences cross the LongRoPE threshold (64 tokens) while others decode beside them.
    let max_tokens = |i: usize| 20 + (i * 7) % 40;
    let sequential: Vec<Vec<u32>> = ps
        .iter()
        .enumerate()
        .map(|(i, p)| {
            e.generate_ids(p, &SamplingParams::greedy(max_tokens(i)), &mut |_| true)
                .unwrap()
                .generated_ids
        })
        .collect();
    assert!(
        ps.iter()
            .zip(&sequential)
            .any(|(p, g)| p.len() < 64 && p.len() + g.len() > 65),
        "no request crosses the LongRoPE switch"
    );
    let b = Batcher::spawn(e.clone(), BatcherConfig::default());
    let mut rxs = submit_all(&b, &ps, |i| SamplingParams::greedy(max_tokens(i)));
    for (i, rx) in rxs.iter_mut().enumerate() {
        let (ids, _, _) = drain(rx);
        assert_eq!(ids, sequential[i], "request {i}");
    }
    assert!(
        b.stats
            .decode_steps
            .load(std::sync::atomic::Ordering::SeqCst)
            < 32 * 20,
        "decode steps were not shared"
    );
}

#[test]
fn sampled_requests_keep_their_own_seeds_in_a_batch() {
    let e = engine();
    let ps = prompts(&e, 6);
    let params = |i: usize| SamplingParams {
        max_tokens: 12,
        temperature: 0.8 + 0.1 * i as f32,
        top_p: 0.9,
        seed: Some(1000 + i as u64),
        ..Default::default()
    };
    let want: Vec<Vec<u32>> = ps
        .iter()
        .enumerate()
        .map(|(i, p)| {
            e.generate_ids(p, &params(i), &mut |_| true)
                .unwrap()
                .generated_ids
        })
        .collect();
    let b = Batcher::spawn(e.clone(), BatcherConfig::default());
    let mut rxs = submit_all(&b, &ps, params);
    for (i, rx) in rxs.iter_mut().enumerate() {
        assert_eq!(drain(rx).0, want[i], "request {i}");
    }
}

#[test]
fn a_dropped_receiver_cancels_its_sequence() {
    let e = engine();
    let b = Batcher::spawn(e.clone(), BatcherConfig::default());
    let p = prompts(&e, 1).remove(0);
    let long = SamplingParams {
        max_tokens: 400,
        ignore_eos: true,
        ..Default::default()
    };
    let mut rx = b
        .submit(Request {
            prompt: p.clone(),
            params: long,
            ..Default::default()
        })
        .unwrap();
    // Wait for the first token, then leave.
    while !matches!(rx.blocking_recv(), Some(Event::Step(_))) {}
    drop(rx);
    let t = Instant::now();
    while b.stats.running.load(std::sync::atomic::Ordering::SeqCst) != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "sequence still running"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let generated = b
        .stats
        .generated_tokens
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(generated < 400, "ran to the end ({generated} tokens)");
}

#[test]
fn a_full_queue_refuses_new_requests() {
    let e = engine();
    let b = Batcher::spawn(
        e.clone(),
        BatcherConfig {
            max_batch: 1,
            max_queue: 2,
        },
    );
    let p = prompts(&e, 1).remove(0);
    let req = || Request {
        prompt: p.clone(),
        params: SamplingParams {
            max_tokens: 300,
            ignore_eos: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut held = Vec::new();
    let mut refused = false;
    for _ in 0..10 {
        match b.submit(req()) {
            Ok(rx) => held.push(rx),
            Err(SubmitError::QueueFull) => {
                refused = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        refused,
        "10 requests fit in a queue of 2 behind a batch of 1"
    );
}

fn run(b: &Batcher, prompt: &str, grammar: Grammar, seed: u64) -> (String, FinishReason) {
    let ids = b.engine.tokenizer.encode(prompt).unwrap();
    let mut rx = b
        .submit(Request {
            prompt: ids,
            params: SamplingParams {
                max_tokens: 300,
                temperature: 1.0,
                seed: Some(seed),
                ..Default::default()
            },
            grammar: Some(grammar),
            ..Default::default()
        })
        .unwrap();
    let (_, text, finish) = drain(&mut rx);
    (text, finish)
}

#[test]
fn json_schema_output_parses_and_matches_with_random_weights() {
    let e = engine();
    let schema = json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 6},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "rain": {"type": "boolean"}
        },
        "required": ["city", "unit", "days", "rain"],
        "additionalProperties": false
    });
    let b = Batcher::spawn(e.clone(), BatcherConfig::default());
    for seed in 0..4 {
        let (text, finish) = run(
            &b,
            "Weather as JSON:",
            Grammar::JsonSchema(schema.clone()),
            seed,
        );
        assert_eq!(finish, FinishReason::Stop, "seed {seed}: {text:?}");
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|err| panic!("seed {seed}: {text:?} is not JSON: {err}"));
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 4, "{text}");
        assert!(o["city"].as_str().unwrap().chars().count() <= 6);
        assert!(["celsius", "fahrenheit"].contains(&o["unit"].as_str().unwrap()));
        assert!((1..=7).contains(&o["days"].as_i64().unwrap()));
        assert!(o["rain"].is_boolean());
    }
    // Unconstrained, the same random model does not produce JSON.
    let out = e
        .generate_ids(
            &e.tokenizer.encode("Weather as JSON:").unwrap(),
            &SamplingParams {
                max_tokens: 40,
                temperature: 1.0,
                seed: Some(0),
                ..Default::default()
            },
            &mut |_| true,
        )
        .unwrap();
    assert!(serde_json::from_str::<Value>(&out.text).is_err());
}

#[test]
fn forced_tool_call_is_a_valid_call_of_a_declared_tool() {
    let e = engine();
    let tools = vec![
        (
            "get_weather".to_string(),
            json!({"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 5},
                                  "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": false}),
        ),
        (
            "get_time".to_string(),
            json!({"type": "object", "properties": {"utc": {"type": "boolean"}},
                   "required": ["utc"], "additionalProperties": false}),
        ),
    ];
    let b = Batcher::spawn(e.clone(), BatcherConfig::default());
    for seed in 0..4 {
        let (text, finish) = run(
            &b,
            "Call a tool:",
            Grammar::ToolCalls {
                tools: tools.clone(),
                max_calls: 3,
            },
            seed,
        );
        assert_eq!(finish, FinishReason::Stop, "seed {seed}: {text:?}");
        let mut p = ToolCallParser::new();
        let mut events = p.push(&text);
        events.extend(p.finish());
        let calls: Vec<_> = events
            .into_iter()
            .filter_map(|ev| match ev {
                ToolEvent::Call(c) => Some(c),
                ToolEvent::Content(c) => {
                    assert!(c.trim().is_empty(), "seed {seed}: stray content {c:?}");
                    None
                }
            })
            .collect();
        assert!(
            (1..=3).contains(&calls.len()),
            "seed {seed}: {} calls in {text:?}",
            calls.len()
        );
        for c in calls {
            let args = &c.arguments;
            match c.name.as_str() {
                "get_weather" => {
                    assert!(["c", "f"].contains(&args["unit"].as_str().unwrap()));
                    assert!(args["city"].as_str().unwrap().chars().count() <= 5);
                }
                "get_time" => assert!(args["utc"].is_boolean()),
                other => panic!("undeclared tool {other}"),
            }
        }
    }
}

#[test]
fn an_invalid_schema_is_an_error_not_a_crash() {
    let e = engine();
    let f = e.constraint_factory().unwrap();
    let err = f
        .constraint(&Grammar::JsonSchema(json!({"type": "no-such-type"})))
        .err()
        .expect("bad schema accepted");
    assert!(format!("{err:#}").contains("no-such-type") || format!("{err:#}").contains("type"));
    assert!(f.constraint(&Grammar::JsonSchema(json!(3))).is_err());
}
