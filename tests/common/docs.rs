//! The shell blocks of a Markdown file (```sh fences), so that tests run the
//! docs' commands as written.

/// Every ```sh block of `md`, in order, each as one script.
pub fn sh_blocks(md: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in md.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(b), "```") => {
                blocks.push(std::mem::take(b));
                current = None;
            }
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// The first sh block of the repository file `rel` that contains `needle`.
pub fn sh_block_with(rel: &str, needle: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    let md = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{rel}: {e}"));
    sh_blocks(&md)
        .into_iter()
        .find(|b| b.contains(needle))
        .unwrap_or_else(|| panic!("{rel} has no sh block with {needle:?}"))
}

#[test]
fn sh_blocks_are_found_in_order() {
    let md = "text\n```sh\na\nb\n```\nmore\n```\nnot sh\n```\n```sh\nc\n```\n";
    assert_eq!(sh_blocks(md), ["a\nb\n", "c\n"]);
}
