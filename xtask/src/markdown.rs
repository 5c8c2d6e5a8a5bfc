//! The one reading of the READMEs' structure that the tour and the command checks share: each
//! line with the fenced block it stands in (its info string: `sh`, `console`, …), if any.

/// A line of a markdown text that is not a fence marker.
pub struct Line<'a> {
    /// 1-based, for messages.
    pub number: usize,
    /// The info string of the fenced block around it (`""` for a bare fence); `None` in prose.
    pub fence: Option<&'a str>,
    pub text: &'a str,
}

/// Every line but the fence markers (which may be indented, as in lists); `Err` with the line
/// of the opening marker when a block is not closed.
pub fn lines(markdown: &str) -> Result<Vec<Line<'_>>, usize> {
    let mut out = Vec::new();
    let mut open: Option<(&str, usize)> = None;
    for (i, text) in markdown.lines().enumerate() {
        if let Some(info) = text.trim().strip_prefix("```") {
            open = match open {
                Some(_) => None,
                None => Some((info.trim(), i + 1)),
            };
            continue;
        }
        out.push(Line {
            number: i + 1,
            fence: open.map(|(info, _)| info),
            text,
        });
    }
    match open {
        Some((_, start)) => Err(start),
        None => Ok(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_know_their_block_and_markers_are_dropped() {
        let md = "intro\n```sh\nls\n```\n  ```console\n  $ x\n  ```\n```\nbare\n```\n";
        let got: Vec<(usize, Option<&str>, &str)> = lines(md)
            .unwrap()
            .iter()
            .map(|l| (l.number, l.fence, l.text))
            .collect();
        assert_eq!(
            got,
            [
                (1, None, "intro"),
                (3, Some("sh"), "ls"),
                (6, Some("console"), "  $ x"),
                (9, Some(""), "bare")
            ]
        );
    }

    #[test]
    fn an_unclosed_block_names_its_opening_line() {
        assert_eq!(lines("a\n```sh\nls\n").err(), Some(2));
    }
}
