//! `data/fetch.py`'s fallback to an archive committed in the repository: taken, checked against
//! its sha256 and unpacked when the pinned package cannot be downloaded; refused when the hash
//! does not match. Runs the script with a manifest of one source whose package does not exist.

use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

use super::cache::repo;

/// SHA-256 of the committed BIG-bench archive (as `data/sources.toml` pins it).
const ARCHIVE_SHA256: &str = "d58c83095a08c91cb3dc3e962d4036261a123beac97b3dfb8546a8bdd4f36cc6";
/// SHA-256 of one task file as the bigbench 1.0.0 package holds it.
const INTENT_SHA256: &str = "04ca74852de19abfc64c807b096f0094bacbb82131c793d8c413cad3dfdeb5ae";

/// A manifest with one source: a Debian package that does not exist (the download fails at
/// once, without the network), whose committed copy has `sha256`.
fn manifest(dir: &Path, sha256: &str) -> std::path::PathBuf {
    let path = dir.join("sources.toml");
    let text = format!(
        r#"[[source]]
dest = "bigbench"
kind = "deb"
spec = "knots-no-such-package"
file = "knots-no-such-package.deb"
sha256 = "{ARCHIVE_SHA256}"
keep = ["*"]
committed_copy = {{ file = "vendor/bigbench-1.0.0-tasks.tar.xz", sha256 = "{sha256}", keep = ["bigbench/intent_recognition/task.json"], strip = "bigbench/" }}
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn fetch(manifest: &Path, cache: &Path) -> std::process::Output {
    Command::new("python3")
        .arg(repo("data/fetch.py"))
        .env("KNOTS_DATA_SOURCES", manifest)
        .env("KNOTS_DATA_CACHE", cache)
        .output()
        .expect("python3 runs")
}

#[test]
fn a_failed_download_falls_back_to_the_committed_copy() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let out = fetch(&manifest(dir.path(), ARCHIVE_SHA256), &cache);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("using the committed copy"), "{stderr}");
    let task = std::fs::read(cache.join("bigbench/intent_recognition/task.json")).unwrap();
    assert_eq!(format!("{:x}", Sha256::digest(&task)), INTENT_SHA256);
    // Only the kept file is written, and the committed archive is left in place.
    assert!(!cache.join("bigbench/mnist_ascii").exists());
    assert!(repo("data/vendor/bigbench-1.0.0-tasks.tar.xz").is_file());
    // A second run finds the stamp and does nothing.
    let again = fetch(&manifest(dir.path(), ARCHIVE_SHA256), &cache);
    assert!(String::from_utf8_lossy(&again.stdout).contains("present"));
}

#[test]
fn a_committed_copy_with_another_hash_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let out = fetch(&manifest(dir.path(), &"0".repeat(64)), &cache);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("does not match"), "{stderr}");
    assert!(!cache.join("bigbench").exists());
}
