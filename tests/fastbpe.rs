//! The tokenizer fast path gives exactly what the `tokenizers` crate gives: ids, byte offsets and
//! special-token mask, on every pre-tokenizer pattern it claims, for text built to hit the
//! patterns' corners. The same comparison on SmolLM2's and Qwen3's real tokenizers and data is
//! in tests/thirdparty.rs.

mod common;
use common::*;
use kiln::text::{EncodeCache, TextTokenizer};

fn tiny_with(
    pre: serde_json::Value,
    post: serde_json::Value,
) -> (tempfile::TempDir, TextTokenizer) {
    let d = tempfile::tempdir().unwrap();
    write_model_dir(d.path(), Some(CHATML));
    let p = d.path().join("tokenizer.json");
    let mut j: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    j["pre_tokenizer"] = pre;
    j["post_processor"] = post;
    std::fs::write(&p, j.to_string()).unwrap();
    let t = TextTokenizer::load_dir(d.path()).unwrap();
    (d, t)
}

fn byte_level(regex: bool, trim: bool) -> serde_json::Value {
    serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": trim, "use_regex": regex})
}

#[test]
fn gpt2_pattern_matches_the_tokenizers_crate() {
    let (_d, t) = tiny_with(byte_level(true, true), byte_level(true, false));
    let n = assert_same(&t, &corner_texts(3000, 1));
    assert!(n > 2000, "{n}");
}

#[test]
fn gpt2_pattern_with_digit_splitting_and_offset_trimming() {
    let pre = serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": true}, byte_level(true, true)]});
    let (_d, t) = tiny_with(pre, byte_level(true, true));
    assert_same(&t, &corner_texts(3000, 2));
}

#[test]
fn llama3_and_qwen2_patterns_with_a_bos_template() {
    for pat in [
        kiln::text::fastbpe::LLAMA3_SPLIT,
        kiln::text::fastbpe::QWEN2_SPLIT,
    ] {
        let pre = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pat}, "behavior": "Isolated", "invert": false},
            byte_level(false, false)]});
        let post = serde_json::json!({"type": "Sequence", "processors": [
            byte_level(true, true),
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [t_id()], "tokens": ["<|im_start|>"]}}}
        ]});
        let (_d, t) = tiny_with(pre, post);
        assert_same(&t, &corner_texts(3000, 3));
        // The template's token is there only with add_special_tokens.
        let mut c = EncodeCache::default();
        let e = t.encode_offsets("hi", true, &mut c).unwrap();
        assert_eq!((e.ids[0], e.special[0], e.offsets[0]), (t_id(), 1, (0, 0)));
        assert_ne!(
            t.encode_offsets("hi", false, &mut c).unwrap().ids[0],
            t_id()
        );
    }
}

#[test]
fn other_pipelines_use_the_tokenizers_crate() {
    // A Metaspace (sentencepiece-style) pre-tokenizer is not byte-level BPE: no fast path.
    let pre = serde_json::json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true});
    let (_d, t) = tiny_with(pre, serde_json::Value::Null);
    assert!(t.fast.is_none());
    let (_d, t) = tiny_with(
        serde_json::json!({"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Isolated", "invert": false}),
        serde_json::Value::Null,
    );
    assert!(t.fast.is_none());
}

/// `<|im_start|>`'s id in the tiny tokenizer.
fn t_id() -> u32 {
    1
}
