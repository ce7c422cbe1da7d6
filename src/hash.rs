//! Canonical hashing for stage keys and content digests.
//!
//! Owns the one byte encoding that keys are computed from ([`canonical`]: tagged,
//! length-prefixed, struct fields and map entries in sorted order). Never hash `Debug` output or
//! hash-map iteration order.

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

    /// Feeds a value's canonical encoding ([`canonical`]).
    pub fn canonical<T: serde::Serialize + ?Sized>(
        &mut self,
        v: &T,
    ) -> Result<&mut Self, CanonError> {
        let b = canonical(v)?;
        self.bytes(&b);
        Ok(self)
    }

    pub fn finish(&self) -> Digest {
        self.inner.finalize().to_hex().to_string()
    }
}

/// The canonical byte encoding of any `Serialize` value — what stage keys are computed from, so a
/// key is derived from the one typed value a stage reads, never from a second hand-written list.
///
/// Tagged and length-prefixed (self-delimiting); struct fields and map entries are sorted by
/// their encoded key, so declaration or insertion order never changes the bytes; every integer
/// type encodes alike (a `u32` 3 equals a `u64` 3), floats by their bit pattern (`2e-4` and
/// `0.0002` are the same value), `None` and unit as null. Enums encode as serde_json shows them
/// (a unit variant as its name, others as a one-entry map), so a key and the JSON record
/// `kiln plan --json` shows describe the same thing.
pub fn canonical<T: serde::Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, CanonError> {
    let mut out = Vec::new();
    v.serialize(Canon { out: &mut out })?;
    Ok(out)
}

/// A value that cannot be encoded canonically (a custom `Serialize` that failed, a map with two
/// equal keys).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode a stage key: {0}")]
pub struct CanonError(String);

impl serde::ser::Error for CanonError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        CanonError(msg.to_string())
    }
}

struct Canon<'a> {
    out: &'a mut Vec<u8>,
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u64).to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.push(b's');
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn put_int(out: &mut Vec<u8>, v: i128) {
    out.push(b'i');
    out.extend_from_slice(&v.to_le_bytes());
}

/// A sequence being encoded: items buffered, then count + items.
struct CanonSeq<'a> {
    out: &'a mut Vec<u8>,
    items: Vec<u8>,
    n: usize,
    /// `Some(name)` for a tuple variant: the sequence is wrapped as `{name: [...]}`.
    variant: Option<&'static str>,
}

/// A map or struct being encoded: entries as (encoded key, encoded value), sorted at the end.
struct CanonMap<'a> {
    out: &'a mut Vec<u8>,
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    pending_key: Option<Vec<u8>>,
    variant: Option<&'static str>,
}

fn finish_seq(out: &mut Vec<u8>, n: usize, items: &[u8], variant: Option<&str>) {
    let mut body = vec![b'['];
    put_len(&mut body, n);
    body.extend_from_slice(items);
    wrap_variant(out, variant, body);
}

fn wrap_variant(out: &mut Vec<u8>, variant: Option<&str>, body: Vec<u8>) {
    match variant {
        None => out.extend_from_slice(&body),
        Some(name) => {
            out.push(b'{');
            put_len(out, 1);
            put_str(out, name);
            out.extend_from_slice(&body);
        }
    }
}

fn finish_map(
    out: &mut Vec<u8>,
    mut entries: Vec<(Vec<u8>, Vec<u8>)>,
    variant: Option<&str>,
) -> Result<(), CanonError> {
    entries.sort();
    if entries.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(CanonError("a map has two equal keys".into()));
    }
    let mut body = vec![b'{'];
    put_len(&mut body, entries.len());
    for (k, v) in entries {
        body.extend_from_slice(&k);
        body.extend_from_slice(&v);
    }
    wrap_variant(out, variant, body);
    Ok(())
}

impl<'a> serde::Serializer for Canon<'a> {
    type Ok = ();
    type Error = CanonError;
    type SerializeSeq = CanonSeq<'a>;
    type SerializeTuple = CanonSeq<'a>;
    type SerializeTupleStruct = CanonSeq<'a>;
    type SerializeTupleVariant = CanonSeq<'a>;
    type SerializeMap = CanonMap<'a>;
    type SerializeStruct = CanonMap<'a>;
    type SerializeStructVariant = CanonMap<'a>;

    fn serialize_bool(self, v: bool) -> Result<(), CanonError> {
        self.out.extend_from_slice(&[b'B', v as u8]);
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Result<(), CanonError> {
        self.serialize_i128(v as i128)
    }
    fn serialize_i16(self, v: i16) -> Result<(), CanonError> {
        self.serialize_i128(v as i128)
    }
    fn serialize_i32(self, v: i32) -> Result<(), CanonError> {
        self.serialize_i128(v as i128)
    }
    fn serialize_i64(self, v: i64) -> Result<(), CanonError> {
        self.serialize_i128(v as i128)
    }
    fn serialize_i128(self, v: i128) -> Result<(), CanonError> {
        put_int(self.out, v);
        Ok(())
    }
    fn serialize_u8(self, v: u8) -> Result<(), CanonError> {
        self.serialize_i128(v as i128)
    }
    fn serialize_u16(self, v: u16) -> Result<(), CanonError> {
        self.serialize_i128(v as i128)
    }
    fn serialize_u32(self, v: u32) -> Result<(), CanonError> {
        self.serialize_i128(v as i128)
    }
    fn serialize_u64(self, v: u64) -> Result<(), CanonError> {
        self.serialize_i128(v as i128)
    }
    fn serialize_u128(self, v: u128) -> Result<(), CanonError> {
        let v = i128::try_from(v).map_err(|_| CanonError("integer too large".into()))?;
        self.serialize_i128(v)
    }
    fn serialize_f32(self, v: f32) -> Result<(), CanonError> {
        self.serialize_f64(v as f64)
    }
    fn serialize_f64(self, v: f64) -> Result<(), CanonError> {
        self.out.push(b'f');
        self.out.extend_from_slice(&v.to_bits().to_le_bytes());
        Ok(())
    }
    fn serialize_char(self, v: char) -> Result<(), CanonError> {
        put_str(self.out, v.encode_utf8(&mut [0; 4]));
        Ok(())
    }
    fn serialize_str(self, v: &str) -> Result<(), CanonError> {
        put_str(self.out, v);
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), CanonError> {
        self.out.push(b'b');
        put_len(self.out, v.len());
        self.out.extend_from_slice(v);
        Ok(())
    }
    fn serialize_none(self) -> Result<(), CanonError> {
        self.out.push(b'n');
        Ok(())
    }
    fn serialize_some<T: serde::Serialize + ?Sized>(self, v: &T) -> Result<(), CanonError> {
        v.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), CanonError> {
        self.serialize_none()
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), CanonError> {
        self.serialize_none()
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<(), CanonError> {
        self.serialize_str(variant)
    }
    fn serialize_newtype_struct<T: serde::Serialize + ?Sized>(
        self,
        _: &'static str,
        v: &T,
    ) -> Result<(), CanonError> {
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: serde::Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        v: &T,
    ) -> Result<(), CanonError> {
        let body = canonical(v)?;
        wrap_variant(self.out, Some(variant), body);
        Ok(())
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<CanonSeq<'a>, CanonError> {
        Ok(CanonSeq {
            out: self.out,
            items: Vec::new(),
            n: 0,
            variant: None,
        })
    }
    fn serialize_tuple(self, len: usize) -> Result<CanonSeq<'a>, CanonError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        len: usize,
    ) -> Result<CanonSeq<'a>, CanonError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<CanonSeq<'a>, CanonError> {
        Ok(CanonSeq {
            out: self.out,
            items: Vec::new(),
            n: 0,
            variant: Some(variant),
        })
    }
    fn serialize_map(self, _: Option<usize>) -> Result<CanonMap<'a>, CanonError> {
        Ok(CanonMap {
            out: self.out,
            entries: Vec::new(),
            pending_key: None,
            variant: None,
        })
    }
    fn serialize_struct(self, _: &'static str, len: usize) -> Result<CanonMap<'a>, CanonError> {
        self.serialize_map(Some(len))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<CanonMap<'a>, CanonError> {
        Ok(CanonMap {
            out: self.out,
            entries: Vec::new(),
            pending_key: None,
            variant: Some(variant),
        })
    }
}

impl CanonSeq<'_> {
    fn push<T: serde::Serialize + ?Sized>(&mut self, v: &T) -> Result<(), CanonError> {
        v.serialize(Canon {
            out: &mut self.items,
        })?;
        self.n += 1;
        Ok(())
    }
    fn done(self) -> Result<(), CanonError> {
        finish_seq(self.out, self.n, &self.items, self.variant);
        Ok(())
    }
}

macro_rules! canon_seq_impl {
    ($($tr:ident :: $m:ident),*) => {$(
        impl serde::ser::$tr for CanonSeq<'_> {
            type Ok = ();
            type Error = CanonError;
            fn $m<T: serde::Serialize + ?Sized>(&mut self, v: &T) -> Result<(), CanonError> {
                self.push(v)
            }
            fn end(self) -> Result<(), CanonError> {
                self.done()
            }
        }
    )*};
}
canon_seq_impl!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

impl serde::ser::SerializeMap for CanonMap<'_> {
    type Ok = ();
    type Error = CanonError;
    fn serialize_key<T: serde::Serialize + ?Sized>(&mut self, k: &T) -> Result<(), CanonError> {
        self.pending_key = Some(canonical(k)?);
        Ok(())
    }
    fn serialize_value<T: serde::Serialize + ?Sized>(&mut self, v: &T) -> Result<(), CanonError> {
        let k = self
            .pending_key
            .take()
            .ok_or_else(|| CanonError("a map value came without its key".into()))?;
        self.entries.push((k, canonical(v)?));
        Ok(())
    }
    fn end(self) -> Result<(), CanonError> {
        finish_map(self.out, self.entries, self.variant)
    }
}

impl CanonMap<'_> {
    fn field<T: serde::Serialize + ?Sized>(
        &mut self,
        name: &'static str,
        v: &T,
    ) -> Result<(), CanonError> {
        let mut k = Vec::new();
        put_str(&mut k, name);
        self.entries.push((k, canonical(v)?));
        Ok(())
    }
}

macro_rules! canon_struct_impl {
    ($($tr:ident),*) => {$(
        impl serde::ser::$tr for CanonMap<'_> {
            type Ok = ();
            type Error = CanonError;
            fn serialize_field<T: serde::Serialize + ?Sized>(
                &mut self,
                name: &'static str,
                v: &T,
            ) -> Result<(), CanonError> {
                self.field(name, v)
            }
            fn end(self) -> Result<(), CanonError> {
                finish_map(self.out, self.entries, self.variant)
            }
        }
    )*};
}
canon_struct_impl!(SerializeStruct, SerializeStructVariant);

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
    use serde::ser::SerializeMap;

    /// A map that serializes its entries in the order given (serde_json's map would sort them
    /// before the encoder sees them, so it cannot test the encoder's own sorting).
    struct Ordered(Vec<(&'static str, u64)>);

    impl serde::Serialize for Ordered {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut m = s.serialize_map(Some(self.0.len()))?;
            for (k, v) in &self.0 {
                m.serialize_entry(k, v)?;
            }
            m.end()
        }
    }

    #[derive(serde::Serialize)]
    struct Ab {
        a: u64,
        b: f64,
    }

    #[derive(serde::Serialize)]
    struct Ba {
        b: f64,
        a: u64,
    }

    fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
        canonical(v).unwrap()
    }

    #[test]
    fn map_entry_order_does_not_matter_but_values_do() {
        let a = enc(&Ordered(vec![("a", 1), ("b", 2), ("c", 3)]));
        let b = enc(&Ordered(vec![("c", 3), ("a", 1), ("b", 2)]));
        let c = enc(&Ordered(vec![("c", 3), ("a", 2), ("b", 2)]));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn struct_field_order_does_not_matter_but_values_do() {
        assert_eq!(enc(&Ab { a: 1, b: 2.5 }), enc(&Ba { b: 2.5, a: 1 }));
        assert_ne!(enc(&Ab { a: 1, b: 2.5 }), enc(&Ab { a: 2, b: 2.5 }));
        // A struct and a map with the same entries describe the same thing.
        let m: std::collections::BTreeMap<&str, u64> = [("a", 1), ("b", 2)].into();
        assert_eq!(enc(&Ordered(vec![("b", 2), ("a", 1)])), enc(&m));
    }

    #[test]
    fn numbers_encode_by_value() {
        assert_eq!(enc(&2e-4f64), enc(&0.0002f64));
        assert_eq!(enc(&3u32), enc(&3u64));
        assert_eq!(enc(&3i64), enc(&3u8));
        assert_ne!(enc(&1u64), enc(&1.0f64));
        assert_ne!(enc(&0.1f64), enc(&0.1f32));
    }

    #[test]
    fn options_enums_and_sequences_are_distinct() {
        assert_eq!(enc(&None::<u64>), enc(&()));
        assert_eq!(enc(&Some(5u64)), enc(&5u64));
        assert_ne!(enc(&vec![1u64, 2]), enc(&vec![2u64, 1]));
        assert_ne!(
            enc(&vec![vec![1u64], vec![]]),
            enc(&vec![vec![], vec![1u64]])
        );
        #[derive(serde::Serialize)]
        enum E {
            A,
            B(u64),
        }
        assert_eq!(enc(&E::A), enc(&"A"));
        assert_ne!(enc(&E::B(1)), enc(&E::B(2)));
    }

    #[test]
    fn equal_map_keys_are_refused() {
        assert!(canonical(&Ordered(vec![("a", 1), ("a", 2)])).is_err());
    }

    #[test]
    fn encoding_is_self_delimiting() {
        let a = KeyHasher::new().str("ab").str("c").finish();
        let b = KeyHasher::new().str("a").str("bc").finish();
        assert_ne!(a, b);
        assert_ne!(enc(&("ab", "c")), enc(&("a", "bc")));
    }
}
