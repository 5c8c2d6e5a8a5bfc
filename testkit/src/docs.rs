//! Command lines the READMEs show, for the tests that check them against a binary's parser.

/// `<program> …` lines in `markdown`'s code blocks and inline code (spans may wrap lines).
pub fn usage_lines(markdown: &str, program: &str) -> Vec<String> {
    let prefix = format!("{program} ");
    let mut out = Vec::new();
    let mut prose = String::new();
    let mut in_block = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            if line.trim().starts_with(&prefix) {
                out.push(line.trim().to_string());
            }
        } else {
            prose.push_str(line);
            prose.push('\n');
        }
    }
    for span in prose.split('`').skip(1).step_by(2) {
        let span = span.split_whitespace().collect::<Vec<_>>().join(" ");
        if span.starts_with(&prefix) {
            out.push(span);
        }
    }
    out
}

/// The READMEs whose command lines are checked, with their text (relative to the workspace
/// root `root`).
pub fn readmes(root: &std::path::Path) -> Vec<(&'static str, String)> {
    ["README.md", "envoy/README.md"]
        .into_iter()
        .map(|doc| {
            let text = std::fs::read_to_string(root.join(doc))
                .unwrap_or_else(|e| panic!("read {doc}: {e}"));
            (doc, text)
        })
        .collect()
}
