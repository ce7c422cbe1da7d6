//! A fast path for byte-level BPE tokenizers (GPT-2's pre-tokenizer, as SmolLM/SmolLM2 and
//! GPT-2 use it, optionally after splitting digits; and the Llama 3 / Qwen2 split patterns) on
//! ASCII text: the same ids, offsets and special-token mask as the `tokenizers` crate, several
//! times faster, because words are split by a hand-written scanner instead of a regex engine, and
//! each distinct word is merged once and then looked up.
//!
//! It is built only when the tokenizer's whole pipeline is one this module reproduces exactly
//! (see [`FastBpe::from_tokenizer`]); any other tokenizer, and any text with a non-ASCII byte,
//! goes through the `tokenizers` crate. Tests compare the two on real tokenizers and data.

use serde_json::Value;
use std::collections::HashMap;

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// How text is split into words before BPE (the regex of the tokenizer's pre-tokenizer).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Split {
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
    Gpt2,
    /// Llama 3's pattern (`\p{N}{1,3}`) or, with `max_digits: 1`, Qwen2's (`\p{N}`):
    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    Llama3 { max_digits: usize },
}

/// The Llama 3 split regex, as tokenizer.json files spell it.
pub const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The Qwen2 split regex, as tokenizer.json files spell it.
pub const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// One encoded text: what `tokenizers::Encoding` gives for ids, byte offsets and special mask.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Enc {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
    pub special: Vec<u32>,
}

/// A byte-level BPE tokenizer reproduced for ASCII text.
pub struct FastBpe {
    split: Split,
    digits: bool,
    byte_id: [Option<u32>; 256],
    /// (left id, right id) → (rank, merged id).
    merges: FastMap<(u32, u32), (u32, u32)>,
    /// With `ignore_merges`: whole words that are in the vocabulary.
    whole: Option<FastMap<Vec<u8>, u32>>,
    /// Byte length of each id's text (byte-level tokens: one byte per character).
    id_len: Vec<u32>,
    /// Added tokens, indexed by first byte, longest first.
    added: Vec<Vec<(Vec<u8>, u32)>>,
    /// The ByteLevel post-processor's offset trimming: per id, leading and trailing spaces.
    trim: Option<(Vec<(u16, u16)>, bool)>,
    /// The template post-processor's tokens before and after the text.
    template: (Vec<u32>, Vec<u32>),
}

/// GPT-2's byte → character table, inverted: character → byte.
fn unicode_to_byte() -> HashMap<char, u8> {
    let mut m = HashMap::new();
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
        let c = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
        m.insert(c, b);
    }
    m
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}
fn is_l(b: u8) -> bool {
    b.is_ascii_alphabetic()
}
fn is_n(b: u8) -> bool {
    b.is_ascii_digit()
}
/// `[^\s\p{L}\p{N}]` on ASCII.
fn is_p(b: u8) -> bool {
    !is_ws(b) && !is_l(b) && !is_n(b)
}

/// Length of the contraction (`'s`, `'re`, …) at `i`, if any; case-insensitive when `ci`.
fn contraction(t: &[u8], i: usize, ci: bool) -> usize {
    if t[i] != b'\'' || i + 1 >= t.len() {
        return 0;
    }
    let low = |b: u8| if ci { b.to_ascii_lowercase() } else { b };
    let a = low(t[i + 1]);
    if matches!(a, b's' | b't' | b'm' | b'd') {
        return 2;
    }
    if i + 2 < t.len() {
        let b = low(t[i + 2]);
        if (a, b) == (b'r', b'e') || (a, b) == (b'v', b'e') || (a, b) == (b'l', b'l') {
            return 3;
        }
    }
    0
}

/// `\s+(?!\S)|\s+` at `i` (t[i] is whitespace).
fn whitespace_run(t: &[u8], i: usize) -> usize {
    let mut j = i;
    while j < t.len() && is_ws(t[j]) {
        j += 1;
    }
    if j < t.len() && j - i > 1 {
        j - i - 1
    } else {
        j - i
    }
}

/// Length of the GPT-2 pattern's match at `i`.
fn gpt2_word(t: &[u8], i: usize) -> usize {
    let c = contraction(t, i, false);
    if c > 0 {
        return c;
    }
    let j = if t[i] == b' ' && i + 1 < t.len() && !is_ws(t[i + 1]) {
        i + 1
    } else {
        i
    };
    if !is_ws(t[j]) {
        let class: fn(u8) -> bool = if is_l(t[j]) {
            is_l
        } else if is_n(t[j]) {
            is_n
        } else {
            is_p
        };
        let mut k = j;
        while k < t.len() && class(t[k]) {
            k += 1;
        }
        return k - i;
    }
    whitespace_run(t, i)
}

/// Length of the Llama 3 / Qwen2 pattern's match at `i`.
fn llama3_word(t: &[u8], i: usize, max_digits: usize) -> usize {
    let c = contraction(t, i, true);
    if c > 0 {
        return c;
    }
    let letters = |from: usize| {
        let mut k = from;
        while k < t.len() && is_l(t[k]) {
            k += 1;
        }
        k
    };
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if is_l(t[i]) {
        return letters(i) - i;
    }
    if !matches!(t[i], b'\r' | b'\n') && !is_n(t[i]) && i + 1 < t.len() && is_l(t[i + 1]) {
        return letters(i + 1) - i;
    }
    // \p{N}{1,N}
    if is_n(t[i]) {
        let mut k = i;
        while k < t.len() && is_n(t[k]) && k - i < max_digits {
            k += 1;
        }
        return k - i;
    }
    //  ?[^\s\p{L}\p{N}]+[\r\n]*
    let j = if t[i] == b' ' && i + 1 < t.len() && is_p(t[i + 1]) {
        i + 1
    } else {
        i
    };
    if is_p(t[j]) {
        let mut k = j;
        while k < t.len() && is_p(t[k]) {
            k += 1;
        }
        while k < t.len() && matches!(t[k], b'\r' | b'\n') {
            k += 1;
        }
        return k - i;
    }
    // \s*[\r\n]+ : the whitespace run up to its last \r or \n.
    let mut end = i;
    while end < t.len() && is_ws(t[end]) {
        end += 1;
    }
    if let Some(last) = (i..end).rev().find(|&k| matches!(t[k], b'\r' | b'\n')) {
        return last + 1 - i;
    }
    whitespace_run(t, i)
}

impl FastBpe {
    /// The fast path for `tok`, or None when its pipeline has a part this module does not
    /// reproduce exactly (then the `tokenizers` crate does all the work).
    pub fn from_tokenizer(tok: &tokenizers::Tokenizer) -> Option<Self> {
        if tok.get_truncation().is_some() || tok.get_padding().is_some() {
            return None;
        }
        // Unicode normalization is the identity on ASCII.
        if let Some(n) = tok.get_normalizer() {
            let n = serde_json::to_value(n).ok()?;
            if !matches!(n["type"].as_str(), Some("NFC" | "NFD" | "NFKC" | "NFKD")) {
                return None;
            }
        }
        let pre = serde_json::to_value(tok.get_pre_tokenizer()?).ok()?;
        let byte_level = |v: &Value, regex: bool| {
            v["type"] == "ByteLevel"
                && v["add_prefix_space"] == false
                && v["use_regex"].as_bool() == Some(regex)
        };
        let (split, digits) = if byte_level(&pre, true) {
            (Split::Gpt2, false)
        } else if pre["type"] == "Sequence" {
            let seq = pre["pretokenizers"].as_array()?;
            match seq.as_slice() {
                [d, b]
                    if d["type"] == "Digits"
                        && d["individual_digits"] == true
                        && byte_level(b, true) =>
                {
                    (Split::Gpt2, true)
                }
                [s, b]
                    if s["type"] == "Split"
                        && s["behavior"] == "Isolated"
                        && s["invert"] == false
                        && byte_level(b, false) =>
                {
                    match s["pattern"]["Regex"].as_str()? {
                        LLAMA3_SPLIT => (Split::Llama3 { max_digits: 3 }, false),
                        QWEN2_SPLIT => (Split::Llama3 { max_digits: 1 }, false),
                        _ => return None,
                    }
                }
                _ => return None,
            }
        } else {
            return None;
        };

        let model = serde_json::to_value(tok.get_model()).ok()?;
        // An empty prefix or suffix ("" in Qwen's files) changes nothing.
        let none_or_empty = |v: &Value| v.is_null() || v == "";
        if model["type"] != "BPE"
            || !model["dropout"].is_null()
            || !none_or_empty(&model["continuing_subword_prefix"])
            || !none_or_empty(&model["end_of_word_suffix"])
        {
            return None;
        }
        let to_byte = unicode_to_byte();
        let decode =
            |s: &str| -> Option<Vec<u8>> { s.chars().map(|c| to_byte.get(&c).copied()).collect() };
        let vocab = model["vocab"].as_object()?;
        let size = tok.get_vocab_size(true);
        let mut id_len = vec![0u32; size];
        let mut by_bytes: FastMap<Vec<u8>, u32> = FastMap::default();
        for (s, id) in vocab {
            let id = id.as_u64()? as u32;
            if let Some(b) = decode(s) {
                if let Some(l) = id_len.get_mut(id as usize) {
                    *l = b.len() as u32;
                }
                by_bytes.insert(b, id);
            }
        }
        // Vocabularies may lack a few byte tokens (SmolLM2: some control bytes); text with
        // such a byte goes to the `tokenizers` crate, which drops it without an unk token.
        let mut byte_id = [None; 256];
        for (b, slot) in byte_id.iter_mut().enumerate() {
            *slot = by_bytes.get(&vec![b as u8]).copied();
        }
        let mut merges = FastMap::default();
        for (rank, m) in model["merges"].as_array()?.iter().enumerate() {
            let (a, b) = match m {
                Value::String(s) => s.split_once(' ')?,
                Value::Array(p) if p.len() == 2 => (p[0].as_str()?, p[1].as_str()?),
                _ => return None,
            };
            // A merge of tokens that are not byte strings never applies to byte tokens.
            let (Some(a), Some(b)) = (decode(a), decode(b)) else {
                continue;
            };
            let joined: Vec<u8> = a.iter().chain(&b).copied().collect();
            let (Some(&ia), Some(&ib), Some(&ij)) =
                (by_bytes.get(&a), by_bytes.get(&b), by_bytes.get(&joined))
            else {
                continue;
            };
            // As the `tokenizers` crate builds its map: a repeated pair keeps its last rank.
            merges.insert((ia, ib), (rank as u32, ij));
        }
        let whole = (model["ignore_merges"] == true).then_some(by_bytes);

        let mut added: Vec<Vec<(Vec<u8>, u32)>> = vec![Vec::new(); 256];
        let mut token_text: Vec<Option<String>> = vec![None; size];
        for (id, t) in tok.get_added_tokens_decoder() {
            if t.single_word || t.lstrip || t.rstrip || t.content.is_empty() {
                return None;
            }
            let c = t.content.as_bytes();
            added[c[0] as usize].push((c.to_vec(), id));
            if let Some(slot) = token_text.get_mut(id as usize) {
                *slot = Some(t.content.clone());
            }
        }
        for v in &mut added {
            v.sort_by_key(|t| std::cmp::Reverse(t.0.len()));
        }

        // Post-processors: ByteLevel (offset trimming) and a template adding specials.
        let mut trim = None;
        let mut template = (Vec::new(), Vec::new());
        if let Some(pp) = tok.get_post_processor() {
            let pp = serde_json::to_value(pp).ok()?;
            let list = if pp["type"] == "Sequence" {
                pp["processors"].as_array()?.clone()
            } else {
                vec![pp]
            };
            for (k, p) in list.iter().enumerate() {
                match p["type"].as_str()? {
                    "ByteLevel" if template.0.is_empty() && template.1.is_empty() => {
                        if p["trim_offsets"] == true {
                            let mut counts = vec![(0u16, 0u16); size];
                            for (s, id) in vocab {
                                if let Some(c) = counts.get_mut(id.as_u64()? as usize) {
                                    *c = space_counts(s);
                                }
                            }
                            for (id, t) in token_text.iter().enumerate() {
                                if let Some(t) = t {
                                    counts[id] = space_counts(t);
                                }
                            }
                            trim = Some((counts, p["add_prefix_space"] == true));
                        }
                    }
                    "TemplateProcessing" if k + 1 == list.len() => {
                        template = template_tokens(p)?;
                    }
                    _ => return None,
                }
            }
        }
        Some(Self {
            split,
            digits,
            byte_id,
            merges,
            whole,
            id_len,
            added,
            trim,
            template,
        })
    }

    /// Encodes `text` as `tokenizers::Tokenizer::encode(text, add_special)` would, or None when
    /// the text is not ASCII or has a byte without a token. `cache` maps words to their ids between calls.
    pub fn encode(
        &self,
        text: &str,
        add_special: bool,
        cache: &mut FastMap<Vec<u8>, Vec<u32>>,
    ) -> Option<Enc> {
        if !text
            .bytes()
            .all(|b| b < 128 && self.byte_id[b as usize].is_some())
        {
            return None;
        }
        let t = text.as_bytes();
        let mut e = Enc::default();
        let mut start = 0;
        let mut i = 0;
        while i < t.len() {
            let hit = self.added[t[i] as usize]
                .iter()
                .find(|(c, _)| t[i..].starts_with(c));
            if let Some((c, id)) = hit {
                self.plain(t, start, i, cache, &mut e);
                e.ids.push(*id);
                e.offsets.push((i, i + c.len()));
                e.special.push(0);
                i += c.len();
                start = i;
            } else {
                i += 1;
            }
        }
        self.plain(t, start, t.len(), cache, &mut e);
        if let Some((counts, add_prefix_space)) = &self.trim {
            for (k, (id, off)) in e.ids.iter().zip(e.offsets.iter_mut()).enumerate() {
                let (mut lead, trail) = counts
                    .get(*id as usize)
                    .map(|&(a, b)| (a as usize, b as usize))
                    .unwrap_or((0, 0));
                if lead > 0 && (k == 0 || off.0 == 0) && *add_prefix_space && lead == 1 {
                    lead = 0;
                }
                if lead > 0 {
                    off.0 = (off.0 + lead).min(off.1);
                }
                if trail > 0 && off.1 >= trail {
                    off.1 = (off.1 - trail).max(off.0);
                }
            }
        }
        if add_special && !(self.template.0.is_empty() && self.template.1.is_empty()) {
            let (pre, post) = &self.template;
            let n = e.ids.len();
            let mut ids = pre.clone();
            ids.append(&mut e.ids);
            ids.extend(post);
            let mut offsets = vec![(0, 0); pre.len()];
            offsets.append(&mut e.offsets);
            offsets.extend(std::iter::repeat_n((0, 0), post.len()));
            let mut special = vec![1; pre.len()];
            special.extend(std::iter::repeat_n(0, n));
            special.extend(std::iter::repeat_n(1, post.len()));
            e = Enc {
                ids,
                offsets,
                special,
            };
        }
        Some(e)
    }

    /// Tokenizes `t[from..to]`, which holds no added token.
    fn plain(
        &self,
        t: &[u8],
        from: usize,
        to: usize,
        cache: &mut FastMap<Vec<u8>, Vec<u32>>,
        e: &mut Enc,
    ) {
        if self.digits {
            // Digits(individual_digits): each digit is its own piece; words never cross one.
            let mut s = from;
            for k in from..to {
                if is_n(t[k]) {
                    self.words(&t[..k], s, cache, e);
                    self.words(&t[..k + 1], k, cache, e);
                    s = k + 1;
                }
            }
            self.words(&t[..to], s, cache, e);
        } else {
            self.words(&t[..to], from, cache, e);
        }
    }

    /// Splits `t[from..]` into words and appends their tokens.
    fn words(&self, t: &[u8], from: usize, cache: &mut FastMap<Vec<u8>, Vec<u32>>, e: &mut Enc) {
        let mut i = from;
        while i < t.len() {
            let n = match self.split {
                Split::Gpt2 => gpt2_word(t, i),
                Split::Llama3 { max_digits } => llama3_word(t, i, max_digits),
            }
            .max(1);
            let w = &t[i..i + n];
            let ids = match cache.get(w) {
                Some(ids) => ids,
                None => cache.entry(w.to_vec()).or_insert_with(|| self.bpe(w)),
            };
            let mut at = i;
            for &id in ids.iter() {
                let l = self.id_len.get(id as usize).copied().unwrap_or(1) as usize;
                e.ids.push(id);
                e.offsets.push((at, at + l));
                e.special.push(0);
                at += l;
            }
            i += n;
        }
    }

    /// Byte-pair merges of one word: the lowest-ranked adjacent pair first, leftmost on ties.
    fn bpe(&self, w: &[u8]) -> Vec<u32> {
        if let Some(id) = self.whole.as_ref().and_then(|m| m.get(w)) {
            return vec![*id];
        }
        // `encode` checked that every byte has a token.
        let mut ids: Vec<u32> = w
            .iter()
            .map(|&b| self.byte_id[b as usize].unwrap_or(0))
            .collect();
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for k in 0..ids.len().saturating_sub(1) {
                if let Some(&(rank, new)) = self.merges.get(&(ids[k], ids[k + 1])) {
                    if best.is_none_or(|b| rank < b.0) {
                        best = Some((rank, k, new));
                    }
                }
            }
            let Some((_, k, new)) = best else {
                return ids;
            };
            ids[k] = new;
            ids.remove(k + 1);
        }
    }
}

/// Leading and trailing spaces of a token's text as the ByteLevel post-processor counts them.
fn space_counts(s: &str) -> (u16, u16) {
    let sp = |c: &char| *c == '\u{120}' || c.is_whitespace();
    let lead = s.chars().take_while(sp).count();
    let trail = s.chars().rev().take_while(sp).count();
    (lead as u16, trail as u16)
}

/// The ids a TemplateProcessing post-processor puts before and after a single sequence, when
/// its `single` template is `[SpecialToken…, Sequence A, SpecialToken…]`.
fn template_tokens(p: &Value) -> Option<(Vec<u32>, Vec<u32>)> {
    let ids_of = |name: &str| -> Option<Vec<u32>> {
        p["special_tokens"][name]["ids"]
            .as_array()?
            .iter()
            .map(|i| i.as_u64().map(|i| i as u32))
            .collect()
    };
    let (mut pre, mut post, mut seen) = (Vec::new(), Vec::new(), false);
    for piece in p["single"].as_array()? {
        if let Some(s) = piece.get("SpecialToken") {
            let ids = ids_of(s["id"].as_str()?)?;
            if seen {
                post.extend(ids);
            } else {
                pre.extend(ids);
            }
        } else if piece.get("Sequence").is_some_and(|s| s["id"] == "A") && !seen {
            seen = true;
        } else {
            return None;
        }
    }
    seen.then_some((pre, post))
}
