//! `--backends-file PATH`: the backend list kept in a file that can change while Ringway runs.
//!
//! Format: one backend a line in the `--backend` syntax, `HOST:PORT[,weight=N][,backup]`.
//! `#` starts a comment, on its own line or after a backend; blank lines and surrounding
//! whitespace are ignored.
//!
//! ```text
//! # web tier
//! 10.0.0.11:80
//! 10.0.0.12:80,weight=2   # the bigger machine
//! [fd00::13]:80,backup
//! ```
//!
//! API, for the control thread:
//!
//! - [`load`]`(path)` reads and parses the file: `Ok(backends)` or a one-line error naming the
//!   path and, for a syntax problem, the line. A bad file is rejected as a whole, never applied
//!   in part; so is a file with no backends.
//! - [`parse_backends_file`]`(text)` is the pure parser behind `load`.
//! - [`FileWatch`]`::new(path)`, then [`FileWatch::changed`] on a timer (e.g. every second):
//!   `true` when the file's content differs from the last look. On `true`, call `load`; on
//!   `Err`, log it and keep the backends in use.
//!
//! Why polling rather than inotify: it needs no dependency and no watch bookkeeping, and it sees
//! every way a file gets replaced. Editors and config tools write a new file and rename it over
//! the old one (an inotify watch on the old inode then sees nothing), and a Kubernetes ConfigMap
//! volume swaps a `..data` symlink to a new directory (the path's target changes, the file
//! never "changes"). A `stat` of the path a second is negligible work.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::config::{parse_backend, BackendSpec};

/// Parses the text of a backends file. The error is one line, starting with `line N:` when it
/// concerns one line.
pub fn parse_backends_file(text: &str) -> Result<Vec<BackendSpec>, String> {
    // A byte-order mark from a Windows editor is not part of the first backend.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut backends = Vec::new();
    let mut line_of_name: HashMap<String, usize> = HashMap::new();
    for (index, raw_line) in text.lines().enumerate() {
        let line_number = index + 1;
        let line = strip_comment(raw_line).trim();
        if line.is_empty() {
            continue;
        }
        let backend = parse_backend(line).map_err(|e| format!("line {line_number}: {e}"))?;
        if let Some(first) = line_of_name.get(&backend.name) {
            return Err(format!(
                "line {line_number}: '{}' is already given on line {first} \
                 (use weight=N to give it more traffic)",
                backend.name
            ));
        }
        line_of_name.insert(backend.name.clone(), line_number);
        backends.push(backend);
    }
    if backends.is_empty() {
        return Err(
            "no backends (every line is blank or a comment); refusing to apply an empty \
                    list, which would take the service down"
                .to_string(),
        );
    }
    // The same rule as for --backend flags: a list where nobody may take traffic is a mistake.
    if backends.iter().all(|b| b.weight == 0) {
        return Err("every backend has weight 0".to_string());
    }
    Ok(backends)
}

fn strip_comment(line: &str) -> &str {
    line.split_once('#').map_or(line, |(before, _)| before)
}

/// Reads and parses the backends file at `path`; the error names the path.
pub fn load(path: &Path) -> Result<Vec<BackendSpec>, String> {
    let text =
        fs::read_to_string(path).map_err(|e| format!("backends file {}: {e}", path.display()))?;
    parse_backends_file(&text).map_err(|e| format!("backends file {}: {e}", path.display()))
}

/// Tells the control thread when the backends file has changed, by polling.
///
/// Each look is a `stat` of the path (following symlinks); the file is read and hashed only when
/// the metadata (mtime, length, inode, device) differs from last time, or when the file was
/// modified so recently that the metadata cannot prove it unchanged: a rewrite of the same
/// length in place within one mtime tick leaves the metadata equal ("racy" timestamps, the same
/// problem git's index has). The content hash then also keeps a mere `touch`, or a rewrite with
/// the same bytes, from counting as a change.
///
/// A file that disappears counts as a change (so the reload reports the missing file), and so
/// does its coming back.
pub struct FileWatch {
    path: PathBuf,
    seen: Option<Fingerprint>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Metadata {
    mtime: Option<SystemTime>,
    len: u64,
    inode: u64,
    device: u64,
}

#[derive(Clone, Copy, Debug)]
struct Fingerprint {
    metadata: Metadata,
    content_hash: u64,
}

/// A file modified less than this long ago is hashed again even when its metadata is unchanged.
/// Generous against coarse filesystem timestamps (some have 1 s or 2 s granularity).
const RACY_WINDOW: Duration = Duration::from_secs(3);

impl FileWatch {
    /// Starts watching `path`, taking its current state as the baseline: the first `changed`
    /// is `false` unless the file changes after this call.
    pub fn new(path: impl Into<PathBuf>) -> FileWatch {
        let path = path.into();
        let seen = fingerprint(&path, None);
        FileWatch { path, seen }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `true` when the file's content (or its existence) differs from the last look.
    pub fn changed(&mut self) -> bool {
        let now = fingerprint(&self.path, self.seen.as_ref());
        let changed = match (&self.seen, &now) {
            (None, None) => false,
            (Some(before), Some(after)) => before.content_hash != after.content_hash,
            _ => true,
        };
        self.seen = now;
        changed
    }
}

/// The file's state now; `previous` lets an unchanged, not recently modified file skip the read.
fn fingerprint(path: &Path, previous: Option<&Fingerprint>) -> Option<Fingerprint> {
    let metadata = read_metadata(path)?;
    if let Some(previous) = previous {
        if previous.metadata == metadata && !recently_modified(metadata.mtime) {
            return Some(*previous);
        }
    }
    // Read errors (a file removed between stat and read) count as "not there".
    let content = fs::read(path).ok()?;
    Some(Fingerprint {
        metadata,
        content_hash: xxhash_rust::xxh3::xxh3_64(&content),
    })
}

fn read_metadata(path: &Path) -> Option<Metadata> {
    let m = fs::metadata(path).ok()?;
    Some(Metadata {
        mtime: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
        device: m.dev(),
    })
}

fn recently_modified(mtime: Option<SystemTime>) -> bool {
    match mtime.map(|t| t.elapsed()) {
        Some(Ok(age)) => age < RACY_WINDOW,
        // No mtime, or one in the future (clock steps): metadata proves nothing.
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn names(backends: &[BackendSpec]) -> Vec<&str> {
        backends.iter().map(|b| b.name.as_str()).collect()
    }

    #[test]
    fn every_backend_form() {
        let text = "10.0.0.11:80\n10.0.0.12:80,weight=2\n[fd00::13]:80,backup\ndb-1.example.com:5432,weight=3,backup\n";
        let b = parse_backends_file(text).unwrap();
        assert_eq!(
            names(&b),
            [
                "10.0.0.11:80",
                "10.0.0.12:80",
                "[fd00::13]:80",
                "db-1.example.com:5432"
            ]
        );
        assert_eq!(
            (b[0].host.as_str(), b[0].port, b[0].weight, b[0].backup),
            ("10.0.0.11", 80, 1, false)
        );
        assert_eq!((b[1].weight, b[1].backup), (2, false));
        assert_eq!((b[2].host.as_str(), b[2].backup), ("fd00::13", true));
        assert_eq!((b[3].weight, b[3].backup), (3, true));
    }

    #[test]
    fn comments_blank_lines_and_whitespace() {
        let text = "\u{feff}# web tier\n\n   \n  10.0.0.11:80  \n\t10.0.0.12:80 , weight=2 # bigger box\n#10.0.0.99:80\n10.0.0.13:80# no space\r\n";
        let b = parse_backends_file(text).unwrap();
        assert_eq!(names(&b), ["10.0.0.11:80", "10.0.0.12:80", "10.0.0.13:80"]);
        assert_eq!(b[1].weight, 2);
    }

    #[test]
    fn a_bad_line_is_named_by_number() {
        let cases = [
            (
                "10.0.0.1:80\n\n10.0.0.1\n",
                "line 3: '10.0.0.1' is not HOST:PORT",
            ),
            ("# c\n10.0.0.1:0\n", "line 2: '10.0.0.1:0' is not HOST:PORT"),
            (
                "10.0.0.1:80,weight=x\n",
                "line 1: '10.0.0.1:80,weight=x': weight must be",
            ),
            (
                "10.0.0.1:80,color=red\n",
                "line 1: '10.0.0.1:80,color=red': unknown option",
            ),
            ("::1:80\n", "line 1: '::1:80' is not HOST:PORT"),
            ("a b:80\n", "line 1: 'a b:80' is not HOST:PORT"),
        ];
        for (text, expected) in cases {
            let error = parse_backends_file(text).unwrap_err();
            assert!(error.starts_with(expected), "{text:?} gave {error:?}");
            assert!(!error.contains('\n'), "one line: {error:?}");
        }
    }

    #[test]
    fn duplicates_name_both_lines() {
        let text = "10.0.0.1:80\n10.0.0.2:80\n\n10.0.0.1:80,weight=5\n";
        let error = parse_backends_file(text).unwrap_err();
        assert_eq!(
            error,
            "line 4: '10.0.0.1:80' is already given on line 1 (use weight=N to give it more traffic)"
        );
    }

    #[test]
    fn an_empty_file_is_an_error() {
        for text in [
            "",
            "\n\n",
            "# all commented out\n# 10.0.0.1:80\n",
            "   \t\n",
        ] {
            let error = parse_backends_file(text).unwrap_err();
            assert!(error.contains("no backends"), "{error}");
            assert!(error.contains("take the service down"), "{error}");
        }
    }

    #[test]
    fn all_zero_weights_is_an_error() {
        let error = parse_backends_file("10.0.0.1:80,weight=0\n10.0.0.2:80,weight=0\n");
        assert_eq!(error.unwrap_err(), "every backend has weight 0");
        assert!(parse_backends_file("10.0.0.1:80,weight=0\n10.0.0.2:80\n").is_ok());
    }

    /// Deterministic pseudo-random numbers (xorshift64), so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[self.below(items.len())]
        }
    }

    /// What the fuzz target fuzz/fuzz_targets/backends_file.rs checks: no panic; an `Ok` list is
    /// non-empty, has unique names and not every weight 0; an error is one line.
    fn check_invariants(text: &str) -> bool {
        match parse_backends_file(text) {
            Ok(backends) => {
                assert!(!backends.is_empty(), "Ok with no backends for {text:?}");
                let mut seen = std::collections::HashSet::new();
                for b in &backends {
                    assert!(seen.insert(b.name.as_str()), "{} twice in {text:?}", b.name);
                }
                assert!(
                    backends.iter().any(|b| b.weight > 0),
                    "all weight 0: {text:?}"
                );
                true
            }
            Err(error) => {
                assert!(!error.contains('\n'), "not one line: {error:?}");
                false
            }
        }
    }

    #[test]
    fn parse_backends_file_invariants_hold_for_generated_text() {
        // Lines mostly built from pieces of the syntax (so that many files parse, and hit the
        // duplicate and weight rules), some with random characters or pieces in random order.
        // Odd hosts and ports, among many good ones drawn from a small space (so that some
        // names repeat).
        const BAD_HOSTS: &[&str] = &["::1", "", "[", "a b", "[fd00::1", "10.0.0.256"];
        const BAD_PORTS: &[&str] = &[":0", ":65536", ":8x", ":", ""];
        const OPTIONS: &[&str] = &[
            ",weight=0",
            ",weight=0",
            ",weight=2",
            ",backup",
            ",backup",
            ",check-port=9",
            " , backup ",
            ",weight=4294967296",
            ",weight=",
            ",check-port=0",
            ",",
            ",color=red",
        ];
        const NOISE: &[&str] = &[
            "#", " ", "\t", "\r", "\r\n", "\u{feff}", "\u{85}", "é", "[", "]", ":", "\0",
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut parsed = 0;
        for _ in 0..4000 {
            let mut text = String::new();
            if rng.below(4) == 0 {
                text.push('\u{feff}');
            }
            for _ in 0..rng.below(6) {
                match rng.below(20) {
                    0 => {
                        for _ in 0..rng.below(12) {
                            match rng.below(3) {
                                0 => text.push(char::from(rng.below(128) as u8)),
                                1 => text.push_str(rng.pick(NOISE)),
                                _ => text.push_str(rng.pick(OPTIONS)),
                            }
                        }
                    }
                    1 => text.push_str("# a comment"),
                    _ => {
                        match rng.below(12) {
                            0 => text.push_str(rng.pick(BAD_HOSTS)),
                            1..=4 => text.push_str(&format!("[fd00::{:x}]", rng.below(16))),
                            _ => text.push_str(&format!("10.0.0.{}", rng.below(16))),
                        }
                        match rng.below(12) {
                            0 => text.push_str(rng.pick(BAD_PORTS)),
                            _ => text.push_str(&format!(":{}", 80 + rng.below(4))),
                        }
                        for _ in 0..rng.below(4).saturating_sub(1) {
                            text.push_str(rng.pick(OPTIONS));
                        }
                        if rng.below(10) == 0 {
                            text.push_str(rng.pick(NOISE));
                        }
                    }
                }
                text.push('\n');
            }
            parsed += usize::from(check_invariants(&text));
        }
        // The generator must reach both sides for the test to mean something.
        assert!((400..3600).contains(&parsed), "{parsed} of 4000 parsed");
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "ringway-backends-file-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn replace_by_rename(path: &Path, text: &str) {
        let temporary = path.with_extension("tmp");
        fs::write(&temporary, text).unwrap();
        fs::rename(&temporary, path).unwrap();
    }

    #[test]
    fn load_names_the_path() {
        let dir = TempDir::new();
        let path = dir.0.join("backends");
        let error = load(&path).unwrap_err();
        assert!(error.starts_with(&format!("backends file {}: ", path.display())));
        fs::write(&path, "10.0.0.1:80\nbad\n").unwrap();
        let error = load(&path).unwrap_err();
        // parse_backend's own wording follows, whatever options it lists.
        let expected = format!(
            "backends file {}: line 2: 'bad' is not HOST:PORT",
            path.display()
        );
        assert!(error.starts_with(&expected), "{error}");
        fs::write(&path, "10.0.0.1:80\n").unwrap();
        assert_eq!(names(&load(&path).unwrap()), ["10.0.0.1:80"]);
    }

    #[test]
    fn change_detection() {
        let dir = TempDir::new();
        let path = dir.0.join("backends");
        fs::write(&path, "10.0.0.1:80\n").unwrap();
        let mut watch = FileWatch::new(&path);
        assert_eq!(watch.path(), path);
        assert!(!watch.changed(), "nothing happened yet");

        // In place, same length: only the content (hash) tells this apart.
        fs::write(&path, "10.0.0.2:80\n").unwrap();
        assert!(watch.changed());
        assert!(!watch.changed(), "a change is reported once");

        // The way editors save: a new file renamed over the old one.
        replace_by_rename(&path, "10.0.0.2:80\n10.0.0.3:80\n");
        assert!(watch.changed());
        assert!(!watch.changed());

        // The same bytes again (new inode, new mtime) is not a change.
        replace_by_rename(&path, "10.0.0.2:80\n10.0.0.3:80\n");
        assert!(!watch.changed());

        // Gone, then back.
        fs::remove_file(&path).unwrap();
        assert!(watch.changed());
        assert!(!watch.changed());
        fs::write(&path, "10.0.0.4:80\n").unwrap();
        assert!(watch.changed());
        assert!(!watch.changed());
    }

    #[test]
    fn change_detection_through_a_swapped_symlink() {
        // A Kubernetes ConfigMap volume: backends -> ..data/backends, ..data -> version dir,
        // updated by pointing a new ..data symlink at a new version dir (rename over the old).
        let dir = TempDir::new();
        for (version, text) in [("v1", "10.0.0.1:80\n"), ("v2", "10.0.0.9:80\n")] {
            fs::create_dir(dir.0.join(version)).unwrap();
            fs::write(dir.0.join(version).join("backends"), text).unwrap();
        }
        std::os::unix::fs::symlink("v1", dir.0.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/backends", dir.0.join("backends")).unwrap();
        let path = dir.0.join("backends");
        let mut watch = FileWatch::new(&path);
        assert!(!watch.changed());
        assert_eq!(names(&load(&path).unwrap()), ["10.0.0.1:80"]);

        std::os::unix::fs::symlink("v2", dir.0.join("..data_tmp")).unwrap();
        fs::rename(dir.0.join("..data_tmp"), dir.0.join("..data")).unwrap();
        assert!(watch.changed());
        assert!(!watch.changed());
        assert_eq!(names(&load(&path).unwrap()), ["10.0.0.9:80"]);
    }
}
