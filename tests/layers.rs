//! The layers of `src/`: a module may use only modules of lower layers, and
//! the root's own items (`crate::find_program` and the like). A `crate::` or
//! `super::` path that climbs fails this test with its file, line and edge,
//! so the order below stays true (issue #14). `cargo test --all-targets`
//! runs it, as CI does.

use std::collections::BTreeMap;
use std::path::Path;

/// Lowest first. Modules of one layer may not use each other either.
const LAYERS: &[&[&str]] = &[
    // Leaves: std and external crates only.
    &["clock", "codec", "names", "pem"],
    &["auth"],
    &["model"],
    &["restore"],
    // Raft and haproxy know the registry, not each other.
    &["consensus", "render"],
    &["failover"],
    &["bgp"],
    &["timeline"],
    &["views"],
    &["api"],
    &["client", "config"],
    &["agent", "daemon", "demo"],
    &["cli"],
];

#[test]
fn src_keeps_its_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    read_tree(&src, &src, &mut files);
    assert!(files.len() > 10, "found only {} files", files.len());
    let found = violations(LAYERS, &files);
    assert!(
        found.is_empty(),
        "imports that climb a layer (see LAYERS in tests/layers.rs):\n{}",
        found.join("\n")
    );
}

/// The check itself, on a small tree with wrong imports beside right ones.
#[test]
fn a_climbing_import_fails_the_check() {
    let layers: &[&[&str]] = &[&["clock"], &["model"], &["consensus", "render"], &["api"]];
    let file = |path: &str, text: &str| (path.to_string(), text.to_string());
    let files = [
        file(
            "lib.rs",
            "pub mod api;\npub mod clock;\npub mod consensus;\npub mod model;\npub mod render;\n\
             pub use api::Server;\npub fn find_program() {}\n",
        ),
        file("clock.rs", "pub fn now_ms() -> u64 { 0 }\n"),
        file(
            "model.rs",
            "use crate::clock::now_ms;\n\
             // crate::api in a comment does not count\n\
             const S: &str = \"crate::api::x { \";\n\
             const C: char = '{';\n\
             pub fn f() { crate::find_program() }\n\
             #[cfg(test)]\n\
             mod tests {\n    use super::*;\n    use super::super::api::Server;\n}\n",
        ),
        file(
            "consensus/mod.rs",
            "pub mod net;\nuse crate::{clock, api::now_ms};\n\
             pub fn t() -> u64 { crate::api::now_ms() }\n",
        ),
        file(
            "consensus/net.rs",
            "use super::t;\nuse crate::render::x;\nuse crate::Server;\n",
        ),
        file(
            "render/mod.rs",
            "use super::model::Registry;\nuse super::*;\n",
        ),
        file(
            "api/mod.rs",
            "use crate::consensus::t;\nuse crate::model;\n",
        ),
        file("stray.rs", "use crate::model;\n"),
    ];
    let found = violations(layers, &files);
    let expected = [
        "src/consensus/mod.rs:2: consensus (layer 2) uses api (layer 3)",
        "src/consensus/mod.rs:3: consensus (layer 2) uses api (layer 3)",
        "src/consensus/net.rs:2: consensus (layer 2) uses render (layer 2)",
        "src/consensus/net.rs:3: consensus uses crate::Server, neither a module \
         with a layer nor an item of lib.rs (a re-export hides its layer)",
        "src/model.rs:9: model (layer 1) uses api (layer 3)",
        "src/render/mod.rs:2: render uses a glob of the crate root",
        "src/stray.rs: module stray has no layer in LAYERS",
    ];
    assert_eq!(found, expected, "\n{}", found.join("\n"));
}

/// Every `.rs` file under `dir`, as (path relative to `src/`, text).
fn read_tree(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            read_tree(root, &path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            let rel = path.strip_prefix(root).expect("under src");
            let text = std::fs::read_to_string(&path).expect("source file");
            out.push((rel.to_string_lossy().into_owned(), text));
        }
    }
}

/// One line per import that climbs, sorted; `files` are relative to `src/`.
/// The binaries (`main.rs`, `bin/`) are crates of their own and skipped.
fn violations(layers: &[&[&str]], files: &[(String, String)]) -> Vec<String> {
    let rank: BTreeMap<&str, usize> = layers
        .iter()
        .enumerate()
        .flat_map(|(i, ms)| ms.iter().map(move |m| (*m, i)))
        .collect();
    let root = files
        .iter()
        .find(|(p, _)| p == "lib.rs")
        .map(|(_, text)| root_items(&code_only(text)))
        .unwrap_or_default();
    let mut out = Vec::new();
    for (path, text) in files {
        if path == "main.rs" || path.starts_with("bin/") {
            continue;
        }
        let module = module_path(path);
        // The root is checked as a leaf; its `pub use` re-exports are
        // written without `crate::` and so are not edges.
        let (own, own_rank) = match module.first() {
            None => ("lib.rs", 0),
            Some(m) => match rank.get(m.as_str()) {
                Some(&r) => (m.as_str(), r),
                None => {
                    out.push(format!("src/{path}: module {m} has no layer in LAYERS"));
                    continue;
                }
            },
        };
        for (line, target) in top_level_uses(&code_only(text), &module) {
            let what = match (target.as_str(), rank.get(target.as_str())) {
                (t, _) if t == own => continue,
                ("*", _) => format!("{own} uses a glob of the crate root"),
                (_, Some(&r)) if r < own_rank => continue,
                (t, Some(&r)) => format!("{own} (layer {own_rank}) uses {t} (layer {r})"),
                (t, None) if root.iter().any(|i| i == t) => continue,
                (t, None) => format!(
                    "{own} uses crate::{t}, neither a module with a layer nor an item of \
                     lib.rs (a re-export hides its layer)"
                ),
            };
            out.push(format!("src/{path}:{line}: {what}"));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// `consensus/mod.rs` → [consensus]; `api/ui/timeline.rs` → [api, ui, timeline].
fn module_path(path: &str) -> Vec<String> {
    let stem = path.strip_suffix(".rs").unwrap_or(path);
    let mut parts: Vec<String> = stem.split('/').map(str::to_string).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// Names the root defines itself (`fn find_program`, `const DEFAULT_LOG`).
fn root_items(code: &str) -> Vec<String> {
    let words: Vec<&str> = code
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .filter(|w| {
            matches!(
                w[0],
                "fn" | "const" | "static" | "struct" | "enum" | "type" | "trait"
            )
        })
        .map(|w| w[1].to_string())
        .collect()
}

/// `code` with comments, strings and char literals blanked (newlines kept),
/// so that neither paths nor braces in them count.
fn code_only(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        let prev_ident = i > 0 && is_ident(b[i - 1]);
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
        } else if let Some((hashes, quote)) = raw_string_at(&b, i).filter(|_| !prev_ident) {
            let mut j = quote + 1;
            while j < b.len() {
                if b[j] == '"' && b[j + 1..].iter().take_while(|&&h| h == '#').count() >= hashes {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            let end = j.min(b.len());
            out.extend(b[i..end].iter().map(|&x| blank(x)));
            i = end;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < b.len() {
                match b[i] {
                    '\\' => {
                        out.push(' ');
                        i += 1;
                        if i < b.len() {
                            out.push(blank(b[i]));
                            i += 1;
                        }
                    }
                    '"' => {
                        out.push(' ');
                        i += 1;
                        break;
                    }
                    x => {
                        out.push(blank(x));
                        i += 1;
                    }
                }
            }
        } else if c == '\'' && next == Some('\\') {
            // An escaped char literal: '\n', '\'', '\u{7f}'.
            let mut j = i + 3;
            while j < b.len() && b[j] != '\'' {
                j += 1;
            }
            let end = (j + 1).min(b.len());
            out.extend(b[i..end].iter().map(|&x| blank(x)));
            i = end;
        } else if c == '\'' && b.get(i + 2) == Some(&'\'') {
            out.push_str("   ");
            i += 3;
        } else {
            // Everything else, lifetimes ('a) included.
            out.push(c);
            i += 1;
        }
    }
    out
}

/// A raw string (`r"…"`, `r#"…"#`, `br"…"`) starting at `i`: its number
/// of `#` and where its opening quote is.
fn raw_string_at(b: &[char], i: usize) -> Option<(usize, usize)> {
    let start = match (b.get(i).copied(), b.get(i + 1).copied()) {
        (Some('r'), _) => i + 1,
        (Some('b'), Some('r')) => i + 2,
        _ => return None,
    };
    let hashes = b[start..].iter().take_while(|&&h| h == '#').count();
    (b.get(start + hashes) == Some(&'"')).then_some((hashes, start + hashes))
}

/// (line, top-level module or root item) for every `crate::` or `super::`
/// path in `code` that reaches the crate root; `module` is the file's own
/// path, which inline `mod name { … }` blocks extend.
fn top_level_uses(code: &str, module: &[String]) -> Vec<(usize, String)> {
    let b: Vec<char> = code.chars().collect();
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let word_at = |i: usize| -> String { b[i..].iter().take_while(|&&c| is_ident(c)).collect() };
    let skip_space = |mut i: usize| {
        while i < b.len() && b[i].is_whitespace() {
            i += 1;
        }
        i
    };
    let mut out = Vec::new();
    let mut line = 1;
    let mut depth = 0usize;
    // Inline modules: (name, depth inside their braces).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut pending_mod: Option<String> = None;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            '\n' => line += 1,
            '{' => {
                depth += 1;
                if let Some(name) = pending_mod.take() {
                    inline.push((name, depth));
                }
            }
            '}' => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            ';' => pending_mod = None,
            _ => {}
        }
        let starts_word = is_ident(c) && !(i > 0 && (is_ident(b[i - 1]) || b[i - 1] == '$'));
        if !starts_word {
            i += 1;
            continue;
        }
        let word = word_at(i);
        let after = i + word.chars().count();
        if word == "mod" {
            let j = skip_space(after);
            let name = word_at(j);
            if !name.is_empty() {
                pending_mod = Some(name);
            }
        } else if word == "crate" || word == "super" {
            let mut path: Vec<String> = module
                .iter()
                .cloned()
                .chain(inline.iter().map(|(n, _)| n.clone()))
                .collect();
            if word == "crate" {
                path.clear();
            } else {
                path.pop();
            }
            for target in reached(&b, after, path) {
                out.push((line, target));
            }
        }
        i = after;
    }
    out
}

/// Follows `::segment` from `i` with `path` as the module so far; returns
/// the top-level names used once the path is at the crate root.
fn reached(b: &[char], mut i: usize, mut path: Vec<String>) -> Vec<String> {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let skip_space = |mut i: usize| {
        while i < b.len() && b[i].is_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_space(i);
        if !(b.get(i) == Some(&':') && b.get(i + 1) == Some(&':')) {
            return Vec::new();
        }
        i = skip_space(i + 2);
        match b.get(i).copied() {
            Some('*') if path.is_empty() => return vec!["*".to_string()],
            Some('{') if path.is_empty() => return group_heads(b, i + 1),
            Some(c) if is_ident(c) => {
                let word: String = b[i..].iter().take_while(|&&c| is_ident(c)).collect();
                i += word.chars().count();
                if word == "super" {
                    path.pop();
                } else if path.is_empty() {
                    return vec![word];
                } else {
                    // Inside a module of our own: no longer a layer question.
                    return Vec::new();
                }
            }
            _ => return Vec::new(),
        }
    }
}

/// The first word of each item of the `{…}` group opening before `i`.
fn group_heads(b: &[char], mut i: usize) -> Vec<String> {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut heads = Vec::new();
    let mut nesting = 0usize;
    let mut expect_head = true;
    while i < b.len() {
        let c = b[i];
        match c {
            '{' => nesting += 1,
            '}' if nesting == 0 => break,
            '}' => nesting -= 1,
            ',' if nesting == 0 => expect_head = true,
            _ if expect_head && is_ident(c) => {
                let word: String = b[i..].iter().take_while(|&&c| is_ident(c)).collect();
                i += word.chars().count();
                if word != "self" {
                    heads.push(word);
                }
                expect_head = false;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    heads
}
