//! Build script: the git commit the binary is built from, for `--version` and
//! `iamproxy_build_info{commit}` (`IAMPROXY_GIT_COMMIT` at compile time).
//!
//! `IAMPROXY_GIT_COMMIT` in the build's environment wins (a build from a tarball, or a
//! packager who knows better); else `git rev-parse --short HEAD`; else `unknown`. The script
//! reruns only when HEAD or the branch it names moves, so an edit does not rerun it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=IAMPROXY_GIT_COMMIT");
    let commit = std::env::var("IAMPROXY_GIT_COMMIT")
        .ok()
        .filter(|commit| !commit.trim().is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=IAMPROXY_GIT_COMMIT={}", commit.trim());
}

/// The short hash of HEAD, watching the files that move it.
fn git_commit() -> Option<String> {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    let commit = git(&dir, &["rev-parse", "--short", "HEAD"])?;
    // HEAD (a checkout), the branch it points at (a commit), and packed-refs (where the
    // branch lives after a `git gc`). Worktrees keep HEAD apart from the branches, so ask
    // git where each is. Only files that exist: a missing one would rerun every build.
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(branch) = git(&dir, &["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        if let Some(path) = git(&dir, &["rev-parse", "--git-path", &name]) {
            let path = dir.join(path);
            if Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    Some(commit)
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    (output.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}
