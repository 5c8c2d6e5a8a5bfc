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

/// Checks one usage line against `command`'s parser. A concrete command must parse whole; a
/// synopsis (with `[…]`, `…` or placeholders in brackets) must name only flags the command has
/// (with `subcommands`, the flags of the subcommand its second word names).
pub fn check_usage(command: clap::Command, line: &str, subcommands: bool) -> Result<(), String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    if line.contains('[') || line.contains('…') {
        let command = if subcommands {
            command
                .find_subcommand(words.get(1).copied().unwrap_or(""))
                .cloned()
                .ok_or_else(|| format!("no subcommand {:?}", words.get(1)))?
        } else {
            command
        };
        for flag in words.iter().filter_map(|w| {
            w.trim_start_matches('[')
                .strip_prefix("--")
                .map(|f| f.trim_end_matches([']', '.']))
        }) {
            if !command.get_arguments().any(|a| a.get_long() == Some(flag)) {
                return Err(format!("`{}` has no flag --{flag}", command.get_name()));
            }
        }
        return Ok(());
    }
    command
        .try_get_matches_from(&words)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Checks every `<program> …` line of the READMEs under `root` against `command()`; panics
/// naming the first that does not match, and returns how many were checked.
pub fn check_readme_usage(
    root: &std::path::Path,
    program: &str,
    command: impl Fn() -> clap::Command,
    subcommands: bool,
) -> usize {
    let mut seen = 0;
    for (doc, text) in readmes(root) {
        for line in usage_lines(&text, program) {
            seen += 1;
            if let Err(e) = check_usage(command(), &line, subcommands) {
                panic!("{doc}: `{line}` does not match {program}'s arguments: {e}");
            }
        }
    }
    seen
}
