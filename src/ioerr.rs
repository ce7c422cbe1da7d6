//! I/O errors in words, shared by every module's error type: a full disk (or quota) — which
//! only a write can hit — is always said as "cannot write …: no space left …" with what to do,
//! whatever the caller was doing when it happened.

use std::path::Path;

/// What to do about a full disk: finished stages are never lost, so a rerun continues.
pub const NO_SPACE: &str = "no space left on the device; free some (`kiln cache gc` removes entries no config uses) or point KILN_CACHE at a larger disk, then rerun: finished stages are kept";

/// True for a full disk or an exhausted quota.
pub fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// `e` on `path`, as `"{verb} {path}: {e}"` (`"{path}: {e}"` with no verb); a full disk as
/// `"cannot write {path}: {NO_SPACE}"`.
pub fn describe(verb: &str, path: &Path, e: &std::io::Error) -> String {
    if is_no_space(e) {
        return format!("cannot write {}: {NO_SPACE}", path.display());
    }
    if verb.is_empty() {
        format!("{}: {e}", path.display())
    } else {
        format!("{verb} {}: {e}", path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_a_failed_write_whatever_the_caller_said() {
        let p = Path::new("out/model.safetensors");
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let m = describe("cannot read", p, &full);
        assert!(
            m.starts_with("cannot write out/model.safetensors: no space left"),
            "{m}"
        );
        let gone = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(
            describe("cannot read", p, &gone),
            "cannot read out/model.safetensors: No such file or directory (os error 2)"
        );
        assert!(describe("", p, &gone).starts_with("out/model.safetensors: No such"));
    }
}
