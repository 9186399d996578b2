//! Detection's small files in the state directory (offence counts, proven peers): read whole
//! or started over with a warning, written whole or not at all. Losing one costs no
//! protection: counts start over, peers prove themselves again.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
};

use serde::de::DeserializeOwned;

/// What `path` holds, if it is there, parses and is of `version` (`version_of` reads it);
/// anything else is logged, naming `what`, and is None.
pub(super) fn read<T: DeserializeOwned>(
    path: &Path,
    what: &str,
    version: u32,
    version_of: impl Fn(&T) -> u32,
) -> Option<T> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read detection's {what}; starting them over");
            return None;
        }
    };
    match serde_json::from_slice::<T>(&bytes) {
        Ok(saved) if version_of(&saved) == version => Some(saved),
        Ok(saved) => {
            tracing::warn!(path = %path.display(), version = version_of(&saved), "detection's {what} are of another version; starting them over");
            None
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "detection's {what} are unreadable; starting them over");
            None
        }
    }
}

/// Writes `bytes` to `path` whole or not at all: a temporary file (owner-only), synced,
/// renamed over the old one.
pub(super) fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let write = || -> io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    let written = write();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}
