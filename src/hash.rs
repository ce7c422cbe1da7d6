//! Canonical hashing for stage keys and content digests.
//!
//! Owns the one byte encoding that keys are computed from: tagged, length-prefixed, maps in
//! sorted order. Never hash `Debug` output or hash-map iteration order.

use serde_json::Value;

/// A blake3 digest rendered as 64 lowercase hex characters.
pub type Digest = String;

/// Feeds values into blake3 in a canonical, self-delimiting encoding.
pub struct KeyHasher {
    inner: blake3::Hasher,
}

impl Default for KeyHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyHasher {
    pub fn new() -> Self {
        Self {
            inner: blake3::Hasher::new(),
        }
    }

    fn tag(&mut self, t: u8) {
        self.inner.update(&[t]);
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.tag(b'b');
        self.inner.update(&(b.len() as u64).to_le_bytes());
        self.inner.update(b);
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.tag(b's');
        self.inner.update(&(s.len() as u64).to_le_bytes());
        self.inner.update(s.as_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.tag(b'u');
        self.inner.update(&v.to_le_bytes());
        self
    }

    /// Hashes a JSON value canonically: objects by sorted key, integers and floats with distinct
    /// tags, floats by their bit pattern (so `2e-4` and `0.0002` hash the same).
    pub fn json(&mut self, v: &Value) -> &mut Self {
        match v {
            Value::Null => self.tag(b'n'),
            Value::Bool(b) => {
                self.tag(b'B');
                self.inner.update(&[*b as u8]);
            }
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    self.tag(b'i');
                    self.inner.update(&i.to_le_bytes());
                } else if let Some(u) = n.as_u64() {
                    self.tag(b'I');
                    self.inner.update(&u.to_le_bytes());
                } else {
                    self.tag(b'f');
                    self.inner
                        .update(&n.as_f64().unwrap_or(f64::NAN).to_bits().to_le_bytes());
                }
            }
            Value::String(s) => {
                self.str(s);
            }
            Value::Array(a) => {
                self.tag(b'[');
                self.inner.update(&(a.len() as u64).to_le_bytes());
                for x in a {
                    self.json(x);
                }
            }
            Value::Object(m) => {
                self.tag(b'{');
                self.inner.update(&(m.len() as u64).to_le_bytes());
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                for k in keys {
                    self.str(k);
                    self.json(&m[k]);
                }
            }
        }
        self
    }

    pub fn finish(&self) -> Digest {
        self.inner.finalize().to_hex().to_string()
    }
}

/// blake3 of a file's bytes, streamed (memory-mapped by blake3 for large files).
pub fn hash_file(path: &std::path::Path) -> std::io::Result<Digest> {
    let mut h = blake3::Hasher::new();
    h.update_mmap(path)?;
    Ok(h.finalize().to_hex().to_string())
}

pub fn hash_bytes(b: &[u8]) -> Digest {
    blake3::hash(b).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn object_order_does_not_matter_but_values_do() {
        let a = KeyHasher::new().json(&json!({"a": 1, "b": 2.5})).finish();
        let b = KeyHasher::new().json(&json!({"b": 2.5, "a": 1})).finish();
        let c = KeyHasher::new().json(&json!({"b": 2.5, "a": 2})).finish();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn encoding_is_self_delimiting() {
        let a = KeyHasher::new().str("ab").str("c").finish();
        let b = KeyHasher::new().str("a").str("bc").finish();
        assert_ne!(a, b);
    }
}
