//! Fixtures the tests build themselves: a tiny byte-level BPE tokenizer with a ChatML template,
//! small datasets in every format, and a helper to run pipelines and collect events.
#![allow(dead_code)]

use kiln::events::Event;
use kiln::scheduler::{RunOptions, RunSummary, StageStatus};
use kiln::workspace::Workspace;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// GPT-2's byte-to-unicode map: the alphabet of byte-level BPE.
fn byte_alphabet() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut pairs: Vec<(u32, u32)> = bs.into_iter().zip(cs).collect();
    pairs.sort();
    pairs
        .into_iter()
        .map(|(_, c)| char::from_u32(c).unwrap())
        .collect()
}

/// A tiny byte-level BPE: specials 0..3, the 256 byte symbols, and a few merges.
pub fn tiny_tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), json!(i));
    }
    let alpha = byte_alphabet();
    for c in &alpha {
        let id = vocab.len();
        vocab.insert(c.to_string(), json!(id));
    }
    let merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s"];
    for m in merges {
        let tok = m.replace(' ', "");
        let id = vocab.len();
        vocab.entry(tok).or_insert(json!(id));
    }
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    })
}

pub fn write_model_dir(dir: &Path, template: Option<&str>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_vec_pretty(&tiny_tokenizer_json()).unwrap(),
    )
    .unwrap();
    let mut cfg =
        json!({"bos_token": null, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"});
    if let Some(t) = template {
        cfg["chat_template"] = json!(t);
    }
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_vec_pretty(&cfg).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("config.json"), br#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":16,"num_hidden_layers":2,"vocab_size":270}"#).unwrap();
}

pub fn alpaca_rows(n: usize) -> String {
    (0..n)
        .map(|i| {
            let input = if i % 2 == 0 { String::new() } else { format!("the number {i}") };
            json!({"instruction": format!("Say the word number {i} twice."), "input": input, "output": format!("word{i} word{i}")}).to_string() + "\n"
        })
        .collect()
}

pub fn chat_rows(n: usize) -> String {
    (0..n)
        .map(|i| {
            json!({"messages": [
                {"role": "user", "content": format!("What is {i} plus one?")},
                {"role": "assistant", "content": format!("It is {}.", i + 1)}
            ]})
            .to_string()
                + "\n"
        })
        .collect()
}

/// A project directory with a model, two datasets and a config.
pub struct Project {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Project {
    pub fn new(extra_yaml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        write_model_dir(&dir.path().join("model"), Some(CHATML));
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("data/alpaca.jsonl"), alpaca_rows(40)).unwrap();
        std::fs::write(dir.path().join("data/chat.jsonl"), chat_rows(30)).unwrap();
        let config = dir.path().join("kiln.yml");
        let yaml = format!(
            "base_model: ./model\ndatasets:\n  - path: data/alpaca.jsonl\n    type: alpaca\n  - path: data/chat.jsonl\n    type: chat_template\nsequence_len: 512\nsample_packing: true\nval_set_size: 0.1\nlearning_rate: 2e-4\nmicro_batch_size: 2\ncache_dir: cache\n{extra_yaml}"
        );
        std::fs::write(&config, yaml).unwrap();
        Project { dir, config }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn ws(&self, sets: &[&str]) -> Workspace {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Workspace::open(&self.config, &sets).unwrap()
    }

    pub fn plan(&self, sets: &[&str]) -> Vec<StageStatus> {
        self.ws(sets).scheduler().assess().unwrap()
    }

    pub fn run(&self, sets: &[&str]) -> (RunSummary, Vec<Event>) {
        self.run_opts(sets, RunOptions::default())
    }

    /// Runs the kiln binary in the project directory (one compute thread, the config's cache):
    /// (exit code, stdout, stderr).
    pub fn kiln(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out = self.kiln_command(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    /// The kiln binary as [`Project::kiln`] runs it, to add environment or spawn.
    pub fn kiln_command(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.args(args)
            .current_dir(self.dir.path())
            .env("KILN_NUM_THREADS", "1")
            .env_remove("KILN_CACHE");
        c
    }

    pub fn run_opts(&self, sets: &[&str], mut opts: RunOptions) -> (RunSummary, Vec<Event>) {
        // A tokenizer-only model (no weights) builds the data stages; a config without an
        // adapter would otherwise fully fine-tune it.
        if opts.targets.is_empty() && !self.path("model/model.safetensors").exists() {
            opts.targets = vec!["pack".into()];
        }
        let ws = self.ws(sets);
        let mut events = Vec::new();
        let s = ws.scheduler().run(&opts, &mut |e| events.push(e)).unwrap();
        (s, events)
    }
}

pub fn status<'a>(plan: &'a [StageStatus], name: &str) -> &'a StageStatus {
    plan.iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no stage {name}"))
}

pub fn stale_names(plan: &[StageStatus]) -> Vec<String> {
    plan.iter()
        .filter(|s| s.state == kiln::scheduler::State::Stale)
        .map(|s| s.name.clone())
        .collect()
}

/// Stale data stages only (fetch, tokenize, pack): for fixtures whose model is a tokenizer
/// without weights, where the train stage can never be built.
pub fn stale_data_names(plan: &[StageStatus]) -> Vec<String> {
    plan.iter()
        .filter(|s| s.state == kiln::scheduler::State::Stale)
        .filter(|s| ["fetch", "tokenize", "pack"].contains(&s.kind.as_str()))
        .map(|s| s.name.clone())
        .collect()
}

/// Pin compute to one thread: candle's and rayon's pools spin-wait when cores are contended.
pub fn one_thread() {
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global();
}

use candle_core::{Device as CDevice, Tensor};
use kiln::model::{Llama, LlamaConfig};
use kiln::rng::SplitMix64;
use std::collections::HashMap;

pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        architecture: "llama".into(),
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        max_position_embeddings: 128,
        tie_word_embeddings: true,
        attention_bias: false,
        sliding_window: None,
    }
}

/// Random weights for `cfg` from kiln's own PRNG (candle's CPU seeding is not usable).
pub fn tiny_weights(cfg: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
    let dev = CDevice::Cpu;
    let mut rng = SplitMix64::new(seed);
    let mut rand = |shape: &[usize], scale: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale)
            .collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    let (h, i, kv) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_key_value_heads * cfg.head_dim(),
    );
    let mut w = HashMap::new();
    w.insert(
        "model.embed_tokens.weight".to_string(),
        rand(&[cfg.vocab_size, h], 0.5),
    );
    w.insert(
        "model.norm.weight".to_string(),
        Tensor::ones(h, candle_core::DType::F32, &dev).unwrap(),
    );
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (n, shape) in [
            ("self_attn.q_proj", [h, h]),
            ("self_attn.k_proj", [kv, h]),
            ("self_attn.v_proj", [kv, h]),
            ("self_attn.o_proj", [h, h]),
            ("mlp.gate_proj", [i, h]),
            ("mlp.up_proj", [i, h]),
            ("mlp.down_proj", [h, i]),
        ] {
            w.insert(format!("{p}.{n}.weight"), rand(&shape, 0.3));
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            w.insert(
                format!("{p}.{n}.weight"),
                rand(&[h], 0.2).affine(1.0, 1.0).unwrap(),
            );
        }
    }
    w
}

/// A tiny random Llama (2 layers, hidden 32, GQA 4/2 heads, vocab 64).
pub fn tiny_model(seed: u64) -> Llama {
    let cfg = tiny_config();
    let w = tiny_weights(&cfg, seed);
    Llama::from_weights(cfg, w, &CDevice::Cpu).unwrap()
}

/// A complete tiny model directory: the tiny tokenizer, a matching config.json and random
/// weights in model.safetensors.
pub fn write_tiny_model_dir(dir: &Path, seed: u64) {
    write_model_dir(dir, Some(CHATML));
    let mut cfg = tiny_config();
    cfg.vocab_size = tiny_tokenizer_json()["model"]["vocab"]
        .as_object()
        .unwrap()
        .len();
    cfg.max_position_embeddings = 1024;
    let w = tiny_weights(&cfg, seed);
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_hf().to_string()).unwrap();
}

/// [`write_tiny_model_dir`] with an untied head: its own `lm_head.weight`.
pub fn write_untied_tiny_model_dir(dir: &Path, seed: u64) {
    write_model_dir(dir, Some(CHATML));
    let mut cfg = tiny_config();
    cfg.vocab_size = tiny_tokenizer_json()["model"]["vocab"]
        .as_object()
        .unwrap()
        .len();
    cfg.max_position_embeddings = 1024;
    cfg.tie_word_embeddings = false;
    let mut w = tiny_weights(&cfg, seed);
    let head = tiny_weights(&cfg, seed + 1)["model.embed_tokens.weight"].clone();
    w.insert("lm_head.weight".into(), head);
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_hf().to_string()).unwrap();
}

/// Random ASCII text from pieces that exercise the split patterns (contractions in both cases,
/// digit runs, whitespace runs ending in and before newlines, punctuation runs, added tokens).
pub fn corner_texts(n: usize, seed: u64) -> Vec<String> {
    const PIECES: &[&str] = &[
        "a",
        "the",
        "The",
        "cat",
        "Hello",
        " ",
        "  ",
        "   ",
        "\n",
        "\n\n",
        "\r\n",
        "\t",
        " \n",
        "\n ",
        "'s",
        "'S",
        "'re",
        "'RE",
        "'ve",
        "'ll",
        "'d",
        "'m",
        "'t",
        "'",
        "''",
        "don't",
        "I'M",
        "1",
        "12",
        "123",
        "2024",
        "3.14",
        ",",
        ".",
        "!",
        "?!",
        "...",
        "--",
        "(",
        ")",
        "{",
        "}",
        "#",
        "###",
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_",
        "|>",
        "\x0b",
        "\x0c",
        "\x01",
        "\x7f",
        "_",
        "x_y",
        "é",
        "—",
        "日本",
        "😀",
    ];
    let mut s = seed;
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as usize
    };
    (0..n)
        .map(|_| {
            let len = next() % 24;
            (0..len).map(|_| PIECES[next() % PIECES.len()]).collect()
        })
        .collect()
}

/// Compares the fast path with the `tokenizers` crate on `texts`; returns how many went through
/// the fast path.
pub fn assert_same(t: &kiln::text::TextTokenizer, texts: &[String]) -> usize {
    let fast = t
        .fast
        .as_ref()
        .expect("the fast path applies to this tokenizer");
    let mut cache = kiln::text::EncodeCache::default();
    let mut fast_hits = 0;
    for text in texts {
        for special in [false, true] {
            let want = t.tokenizer.encode(text.as_str(), special).unwrap();
            let Some(got) = fast.encode(text, special, &mut cache) else {
                assert!(
                    !text.is_ascii() || text.bytes().any(|b| t.token_id(&byte_char(b)).is_none()),
                    "ASCII text must take the fast path: {text:?}"
                );
                continue;
            };
            fast_hits += 1;
            assert_eq!(got.ids, want.get_ids(), "ids of {text:?}");
            assert_eq!(got.offsets, want.get_offsets(), "offsets of {text:?}");
            assert_eq!(
                got.special,
                want.get_special_tokens_mask(),
                "special mask of {text:?}"
            );
            let api = t.encode_offsets(text, special, &mut cache).unwrap();
            assert_eq!(api.ids, want.get_ids());
        }
    }
    fast_hits
}

/// GPT-2's byte-level character for byte `b`, as a one-character string.
pub fn byte_char(b: u8) -> String {
    byte_alphabet()[b as usize].to_string()
}

/// The values of every `Metric` event named `name`, in order.
pub fn metric_values(events: &[kiln::events::Event], name: &str) -> Vec<f64> {
    events
        .iter()
        .filter_map(|e| match e {
            kiln::events::Event::Metric { name: n, value, .. } if n == name => Some(*value),
            _ => None,
        })
        .collect()
}

/// A directory holding the tokenizer kiln builds from a GGUF's metadata, loaded.
pub fn gguf_tokenizer(gguf: &Path) -> (tempfile::TempDir, kiln::text::TextTokenizer) {
    let files = kiln::text::gguf::tokenizer_files(gguf).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tokenizer.json"),
        files.tokenizer_json.to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        files.tokenizer_config.to_string(),
    )
    .unwrap();
    let t = kiln::text::TextTokenizer::load_dir(dir.path()).unwrap();
    (dir, t)
}

/// Every file under `dir` (relative path -> (inode, mtime ns, ctime ns, bytes)).
pub fn tree_files(dir: &Path) -> std::collections::BTreeMap<String, (u64, i64, i64, Vec<u8>)> {
    use std::os::unix::fs::MetadataExt;
    fn walk(
        root: &Path,
        d: &Path,
        out: &mut std::collections::BTreeMap<String, (u64, i64, i64, Vec<u8>)>,
    ) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let md = std::fs::metadata(&p).unwrap();
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
                out.insert(
                    rel,
                    (
                        md.ino(),
                        md.mtime() * 1_000_000_000 + md.mtime_nsec(),
                        md.ctime() * 1_000_000_000 + md.ctime_nsec(),
                        std::fs::read(&p).unwrap(),
                    ),
                );
            }
        }
    }
    let mut out = Default::default();
    walk(dir, dir, &mut out);
    out
}
