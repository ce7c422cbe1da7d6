//! Dataset formats and masks through the real tokenize path, on the tiny tokenizer.

mod common;
use common::*;
use kiln::config::{DataFormat, ExcessLength, TrainOnEos};
use kiln::data::format::{format_record, FormatCtx};
use kiln::data::read::Record;
use kiln::data::tokenize::{tokenize_records, TokenizeOpts};
use kiln::text::template::ChatTemplate;
use kiln::text::TextTokenizer;
use serde_json::json;

fn tok() -> (tempfile::TempDir, TextTokenizer) {
    let d = tempfile::tempdir().unwrap();
    write_model_dir(d.path(), Some(CHATML));
    let t = TextTokenizer::load_dir(d.path()).unwrap();
    (d, t)
}

fn chat_format(roles_to_train: &[&str], eos: TrainOnEos, sharegpt: bool) -> DataFormat {
    DataFormat::ChatTemplate {
        field_messages: if sharegpt {
            "conversations"
        } else {
            "messages"
        }
        .into(),
        role_field: if sharegpt { "from" } else { "role" }.into(),
        content_field: if sharegpt { "value" } else { "content" }.into(),
        roles: vec![
            ("human".into(), "user".into()),
            ("gpt".into(), "assistant".into()),
            ("user".into(), "user".into()),
            ("assistant".into(), "assistant".into()),
            ("system".into(), "system".into()),
        ],
        roles_to_train: roles_to_train.iter().map(|s| s.to_string()).collect(),
        train_on_eos: eos,
        drop_system_message: false,
        template: None,
    }
}

fn opts(seq: usize, excess: ExcessLength, train_on_inputs: bool) -> TokenizeOpts<'static> {
    TokenizeOpts {
        dataset_index: 0,
        dataset_name: "datasets[0]",
        dataset_path: "x.jsonl",
        sequence_len: seq,
        excess,
        min_sample_len: 2,
        train_on_inputs,
    }
}

/// The trained text of a sample: decode exactly the tokens whose mask is 1.
fn trained_text(t: &TextTokenizer, ids: &[u32], mask: &[u8]) -> String {
    let kept: Vec<u32> = ids
        .iter()
        .zip(mask)
        .filter(|(_, m)| **m == 1)
        .map(|(i, _)| *i)
        .collect();
    t.tokenizer.decode(&kept, false).unwrap()
}

fn recs(v: Vec<serde_json::Value>) -> Vec<Record> {
    v.into_iter()
        .enumerate()
        .map(|(i, value)| Record { value, line: i + 1 })
        .collect()
}

#[test]
fn alpaca_trains_only_the_response_and_eos() {
    let (_d, t) = tok();
    let fmt = DataFormat::Alpaca {
        field_instruction: "instruction".into(),
        field_input: "input".into(),
        field_output: "output".into(),
        field_system: "system".into(),
    };
    let ctx = FormatCtx {
        template: None,
        eos_token: Some("<|im_end|>"),
        eot_tokens: &[],
        default_system_message: None,
    };
    let r = recs(vec![
        json!({"instruction": "Name a color", "input": "", "output": "blue"}),
        json!({"instruction": "Echo", "input": "hi there", "output": "hi there"}),
    ]);
    let (set, stats) =
        tokenize_records(&t, &fmt, &r, &ctx, &opts(4096, ExcessLength::Drop, false)).unwrap();
    assert_eq!(stats.samples, 2);
    let (ids, mask) = set.sample(0);
    assert_eq!(trained_text(&t, ids, mask), "blue<|im_end|>");
    let full = t.tokenizer.decode(ids, false).unwrap();
    assert!(full.contains("### Instruction:\nName a color\n\n### Response:\nblue"));
    assert!(!full.contains("### Input:"), "no-input variant");
    let (ids, mask) = set.sample(1);
    assert!(t
        .tokenizer
        .decode(ids, false)
        .unwrap()
        .contains("### Input:\nhi there"));
    assert_eq!(trained_text(&t, ids, mask), "hi there<|im_end|>");
    // train_on_inputs: every token carries loss.
    let (set, _) =
        tokenize_records(&t, &fmt, &r, &ctx, &opts(4096, ExcessLength::Drop, true)).unwrap();
    assert!(set.trained.iter().all(|&m| m == 1));
}

#[test]
fn chat_template_masks_assistant_turns_with_their_eot() {
    let (_d, t) = tok();
    let tmpl = ChatTemplate::new(CHATML, None, Some("<|im_end|>")).unwrap();
    let eot = vec!["<|im_end|>".to_string()];
    let ctx = FormatCtx {
        template: Some(&tmpl),
        eos_token: Some("<|im_end|>"),
        eot_tokens: &eot,
        default_system_message: None,
    };
    let rec = json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Italy?"},
        {"role": "assistant", "content": "Rome."}
    ]});
    let f = format_record(
        &chat_format(&["assistant"], TrainOnEos::Turn, false),
        &rec,
        &ctx,
    )
    .unwrap();
    let spans: Vec<&str> = f.trained.iter().map(|&(a, b)| &f.text[a..b]).collect();
    assert_eq!(spans, vec!["Paris.<|im_end|>", "Rome.<|im_end|>"]);
    let f = format_record(
        &chat_format(&["assistant"], TrainOnEos::Last, false),
        &rec,
        &ctx,
    )
    .unwrap();
    let spans: Vec<&str> = f.trained.iter().map(|&(a, b)| &f.text[a..b]).collect();
    assert_eq!(spans, vec!["Paris.", "Rome.<|im_end|>"]);
    let f = format_record(
        &chat_format(&["assistant", "user"], TrainOnEos::None, false),
        &rec,
        &ctx,
    )
    .unwrap();
    let spans: Vec<&str> = f.trained.iter().map(|&(a, b)| &f.text[a..b]).collect();
    assert_eq!(
        spans,
        vec!["Capital of France?", "Paris.", "And Italy?", "Rome."]
    );
    // Through the tokenizer: the trained tokens decode to exactly the assistant turns.
    let r = recs(vec![rec]);
    let (set, _) = tokenize_records(
        &t,
        &chat_format(&["assistant"], TrainOnEos::Turn, false),
        &r,
        &ctx,
        &opts(4096, ExcessLength::Drop, false),
    )
    .unwrap();
    let (ids, mask) = set.sample(0);
    assert_eq!(
        trained_text(&t, ids, mask),
        "Paris.<|im_end|>Rome.<|im_end|>"
    );
}

#[test]
fn sharegpt_conversations_map_roles() {
    let (_d, t) = tok();
    let tmpl = ChatTemplate::new(CHATML, None, Some("<|im_end|>")).unwrap();
    let ctx = FormatCtx {
        template: Some(&tmpl),
        eos_token: Some("<|im_end|>"),
        eot_tokens: &[],
        default_system_message: Some("You are kiln."),
    };
    let rec = json!({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]});
    let f = format_record(
        &chat_format(&["assistant"], TrainOnEos::Turn, true),
        &rec,
        &ctx,
    )
    .unwrap();
    assert_eq!(f.text, "<|im_start|>system\nYou are kiln.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n");
    let spans: Vec<&str> = f.trained.iter().map(|&(a, b)| &f.text[a..b]).collect();
    assert_eq!(spans, vec!["hello<|im_end|>"]);
    let bad = json!({"conversations": [{"from": "robot", "value": "beep"}]});
    let e = format_record(
        &chat_format(&["assistant"], TrainOnEos::Turn, true),
        &bad,
        &ctx,
    )
    .unwrap_err();
    assert!(e.contains("unknown role `robot`"), "{e}");
    drop(t);
}

#[test]
fn completion_and_input_output() {
    let (_d, t) = tok();
    let ctx = FormatCtx {
        template: None,
        eos_token: Some("<|im_end|>"),
        eot_tokens: &[],
        default_system_message: None,
    };
    let r = recs(vec![json!({"text": "the cat sat on the mat"})]);
    let (set, _) = tokenize_records(
        &t,
        &DataFormat::Completion {
            field: "text".into(),
        },
        &r,
        &ctx,
        &opts(4096, ExcessLength::Drop, false),
    )
    .unwrap();
    let (ids, mask) = set.sample(0);
    assert!(mask.iter().all(|&m| m == 1));
    assert_eq!(
        t.tokenizer.decode(ids, false).unwrap(),
        "the cat sat on the mat<|im_end|>"
    );

    let r = recs(vec![
        json!({"segments": [{"text": "Q: 2+2?\n", "label": false}, {"text": "A: 4", "label": true}, {"text": "<|im_end|>", "label": true}]}),
    ]);
    let (set, _) = tokenize_records(
        &t,
        &DataFormat::InputOutput {
            field: "segments".into(),
        },
        &r,
        &ctx,
        &opts(4096, ExcessLength::Drop, false),
    )
    .unwrap();
    let (ids, mask) = set.sample(0);
    assert_eq!(trained_text(&t, ids, mask), "A: 4<|im_end|>");
    assert_eq!(
        t.tokenizer.decode(ids, false).unwrap(),
        "Q: 2+2?\nA: 4<|im_end|>"
    );
}

#[test]
fn excess_length_drop_truncate_raise() {
    let (_d, t) = tok();
    let ctx = FormatCtx {
        template: None,
        eos_token: Some("<|im_end|>"),
        eot_tokens: &[],
        default_system_message: None,
    };
    let fmt = DataFormat::Completion {
        field: "text".into(),
    };
    let r = recs(vec![
        json!({"text": "short"}),
        json!({"text": "a much longer text that will not fit in twelve tokens"}),
    ]);
    let (set, st) =
        tokenize_records(&t, &fmt, &r, &ctx, &opts(12, ExcessLength::Drop, false)).unwrap();
    assert_eq!((set.len(), st.dropped_too_long, st.truncated), (1, 1, 0));
    let (set, st) =
        tokenize_records(&t, &fmt, &r, &ctx, &opts(12, ExcessLength::Truncate, false)).unwrap();
    assert_eq!((set.len(), st.dropped_too_long, st.truncated), (2, 0, 1));
    assert_eq!(set.sample_len(1), 12);
    let e = tokenize_records(&t, &fmt, &r, &ctx, &opts(12, ExcessLength::Raise, false))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("record 1") && e.contains("longer than sequence_len 12") && e.contains("line 2"),
        "{e}"
    );
}

#[test]
fn missing_field_names_record_and_field() {
    let (_d, t) = tok();
    let ctx = FormatCtx {
        template: None,
        eos_token: Some("<|im_end|>"),
        eot_tokens: &[],
        default_system_message: None,
    };
    let fmt = DataFormat::Alpaca {
        field_instruction: "instruction".into(),
        field_input: "input".into(),
        field_output: "output".into(),
        field_system: "system".into(),
    };
    let r = recs(vec![
        json!({"instruction": "a", "output": "b"}),
        json!({"instruction": "a", "answer": "b"}),
    ]);
    // A record the format cannot use is dropped and counted, named by its line.
    let (set, stats) =
        tokenize_records(&t, &fmt, &r, &ctx, &opts(4096, ExcessLength::Drop, false)).unwrap();
    assert_eq!(set.header().samples, 1);
    assert_eq!(stats.dropped_unusable, 1);
    assert!(
        stats.unusable[0].contains("missing field `output`")
            && stats.unusable[0].contains("answer"),
        "{:?}",
        stats.unusable
    );
    assert!(
        stats.unusable[0].starts_with("line 2: "),
        "{:?}",
        stats.unusable
    );
}

#[test]
fn packed_bins_respect_sequence_len_and_restart_positions() {
    one_thread();
    let p = Project::new("");
    p.run(&[]);
    let ws = p.ws(&[]);
    let dir = ws.entry_of("pack").unwrap();
    let train = kiln::data::pack::PackedSplit::read(&dir.join("train")).unwrap();
    let val = kiln::data::pack::PackedSplit::read(&dir.join("val")).unwrap();
    assert_eq!(train.header.samples + val.header.samples, 70);
    assert_eq!(val.header.samples, 7, "ceil(0.1 × 70)");
    for b in 0..train.header.bins as usize {
        let pos = train.position_ids(b);
        assert!(pos.len() <= 512);
        let starts = pos.iter().filter(|&&p| p == 0).count();
        assert_eq!(
            starts as u64,
            train.bins[b + 1] - train.bins[b],
            "one restart per sample"
        );
    }
    assert!(train.header.efficiency > 0.8, "{}", train.header.efficiency);
    // Without packing every sample is its own row.
    drop(ws);
    p.run(&["sample_packing=false"]);
    let ws = p.ws(&["sample_packing=false"]);
    let dir = ws.entry_of("pack").unwrap();
    let train = kiln::data::pack::PackedSplit::read(&dir.join("train")).unwrap();
    assert_eq!(train.header.bins, train.header.samples);
}

#[test]
fn masks_follow_bytes_in_non_ascii_text() {
    let (_d, t) = tok();
    let fmt = DataFormat::Alpaca {
        field_instruction: "instruction".into(),
        field_input: "input".into(),
        field_output: "output".into(),
        field_system: "system".into(),
    };
    let ctx = FormatCtx {
        template: None,
        eos_token: Some("<|im_end|>"),
        eot_tokens: &[],
        default_system_message: None,
    };
    let r = recs(vec![
        json!({"instruction": "Écris « café » en 日本語", "input": "ünïcödé", "output": "カフェ — naïve"}),
    ]);
    let (set, _) =
        tokenize_records(&t, &fmt, &r, &ctx, &opts(4096, ExcessLength::Drop, false)).unwrap();
    let (ids, mask) = set.sample(0);
    assert_eq!(trained_text(&t, ids, mask), "カフェ — naïve<|im_end|>");
}

/// Writes an alpaca Parquet file (snappy) with the parquet crate's low-level writer.
fn write_parquet(path: &std::path::Path, rows: &[(&str, &str, &str)]) {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::sync::Arc;
    let schema = Arc::new(parse_message_type("message schema { REQUIRED BYTE_ARRAY instruction (UTF8); REQUIRED BYTE_ARRAY input (UTF8); REQUIRED BYTE_ARRAY output (UTF8); }").unwrap());
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let mut w =
        SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let mut c = 0;
    while let Some(mut col) = rg.next_column().unwrap() {
        let vals: Vec<ByteArray> = rows
            .iter()
            .map(|r| ByteArray::from([r.0, r.1, r.2][c]))
            .collect();
        col.typed::<ByteArrayType>()
            .write_batch(&vals, None, None)
            .unwrap();
        col.close().unwrap();
        c += 1;
    }
    rg.close().unwrap();
    w.close().unwrap();
}

#[test]
fn parquet_datasets_are_read() {
    one_thread();
    let p = Project::new("");
    write_parquet(
        &p.path("data/extra.parquet"),
        &[
            ("Name a color", "", "blue"),
            ("Echo", "hi", "hi"),
            ("Count", "1 2", "3"),
        ],
    );
    let cfg = std::fs::read_to_string(&p.config).unwrap().replace(
        "datasets:\n",
        "datasets:\n  - path: data/extra.parquet\n    type: alpaca\n",
    );
    std::fs::write(&p.config, cfg).unwrap();
    p.run(&[]);
    let st = p.ws(&[]).pack_stats().unwrap();
    assert_eq!(st.datasets[0].1.records, 3);
    assert_eq!(st.datasets[0].1.samples, 3);
    let ex = p.ws(&[]).debug_examples(1).unwrap();
    assert!(
        ex[0]
            .text
            .contains("### Instruction:\nName a color\n\n### Response:\nblue"),
        "{}",
        ex[0].text
    );
}

#[test]
fn special_tokens_override_the_appended_eos() {
    one_thread();
    let p = Project::new("");
    p.run(&[]);
    let set = ["special_tokens.eos_token=<|endoftext|>"];
    let plan = p.plan(&set);
    assert_eq!(
        status(&plan, "tokenize[0]").reason.as_deref(),
        Some("special_tokens.eos_token changed unset → <|endoftext|>")
    );
    p.run(&set);
    let ex = p.ws(&set).debug_examples(1).unwrap();
    assert!(ex[0].text.ends_with("<|endoftext|>"), "{}", ex[0].text);
    // A token the tokenizer does not have is a clear error, not a silent new id.
    let ws = p.ws(&["special_tokens.eos_token=<eos>"]);
    let err = ws
        .scheduler()
        .run(&Default::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("special_tokens.eos_token: `<eos>` is not in the tokenizer's vocabulary"),
        "{err}"
    );
}

/// Templates that refuse a partial conversation ("No user query found") or fold the system
/// message into the first user turn: masks come from the one render of the whole conversation.
#[test]
fn masks_come_from_the_whole_render_when_prefixes_cannot_be_rendered() {
    use kiln::text::template::ChatTemplate;
    let rec = json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Italy?"},
        {"role": "assistant", "content": "Rome."}
    ]});
    let refuses_partial = "{% if messages[-1]['role'] != 'assistant' %}{{ raise_exception('No user query found in messages.') }}{% endif %}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}";
    let folds_system = "{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}{% for m in messages if m['role'] != 'system' %}{% if m['role'] == 'user' %}[INST] {% if loop.first and sys %}{{ sys }}\n\n{% endif %}{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}";
    for (source, want) in [
        (refuses_partial, vec!["Paris.", "Rome."]),
        (folds_system, vec!["Paris.</s>", "Rome.</s>"]),
    ] {
        let t = ChatTemplate::new(source, None, Some("</s>")).unwrap();
        let ctx = FormatCtx {
            template: Some(&t),
            eos_token: Some("</s>"),
            eot_tokens: &[],
            default_system_message: None,
        };
        let f = format_record(
            &chat_format(&["assistant"], TrainOnEos::Turn, false),
            &rec,
            &ctx,
        )
        .unwrap();
        let spans: Vec<&str> = f.trained.iter().map(|&(a, b)| &f.text[a..b]).collect();
        assert_eq!(spans, want, "{source}");
    }
}
