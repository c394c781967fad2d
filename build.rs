//! Build script: records the git commit the binary is built from, for `ringway --version`.
//!
//! `RINGWAY_GIT_COMMIT` (set at compile time) is, in order of preference:
//! 1. `RINGWAY_BUILD_COMMIT` from the build environment, for builds from a source tarball whose
//!    commit the packager knows;
//! 2. `git rev-parse --short=12 HEAD` when building inside a git checkout;
//! 3. `unknown` otherwise (a tarball, or git not installed).
//!
//! The script reruns when HEAD moves (a commit, a checkout), not on every edit: it watches only
//! the files git updates then, so ordinary rebuilds do not pay for it.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=RINGWAY_BUILD_COMMIT");
    let commit = match std::env::var("RINGWAY_BUILD_COMMIT") {
        Ok(commit) if !commit.trim().is_empty() => commit.trim().to_string(),
        _ => {
            watch_git_head();
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=RINGWAY_GIT_COMMIT={commit}");
}

/// Output of a git command run in the crate's directory, trimmed; `None` if git is missing, this
/// is not a checkout, or the command failed.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env_dir())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn env_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into())
}

/// Asks cargo to rerun this script when HEAD or the branch it points to changes. Only existing
/// paths are named: cargo reruns a script on every build while a watched path is missing.
fn watch_git_head() {
    let mut paths = Vec::new();
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        paths.push(head);
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(path) = git(&["rev-parse", "--git-path", &branch]) {
            paths.push(path);
        }
    }
    if let Some(packed) = git(&["rev-parse", "--git-path", "packed-refs"]) {
        paths.push(packed);
    }
    let dir = env_dir();
    for path in paths {
        let path = Path::new(&dir).join(path);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    // Without any rerun-if-changed line cargo would rerun the script on every change to any
    // file of the package; this one exists whatever git says.
    println!("cargo:rerun-if-changed=build.rs");
}
