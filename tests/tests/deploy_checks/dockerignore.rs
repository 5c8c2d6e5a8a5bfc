//! `.dockerignore` as Docker reads it: patterns anchored at the context root, `*` and `?` within
//! one path segment, `**` across segments, `!` re-includes; the last matching pattern wins, and a
//! pattern that matches a directory excludes everything below it.

pub struct DockerIgnore {
    /// (negated, segments) in file order.
    patterns: Vec<(bool, Vec<String>)>,
    originals: Vec<String>,
}

impl DockerIgnore {
    pub fn parse(text: &str) -> DockerIgnore {
        let mut patterns = Vec::new();
        let mut originals = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (negated, pattern) = match line.strip_prefix('!') {
                Some(p) => (true, p.trim()),
                None => (false, line),
            };
            let segments = segments(pattern);
            if segments.is_empty() {
                continue;
            }
            patterns.push((negated, segments));
            originals.push(line.to_string());
        }
        DockerIgnore {
            patterns,
            originals,
        }
    }

    /// The pattern that excludes `path` (relative to the context root), if it is excluded.
    pub fn excluding_pattern(&self, path: &str) -> Option<&str> {
        let path = segments(path);
        let mut verdict: Option<usize> = None;
        for (i, (negated, pattern)) in self.patterns.iter().enumerate() {
            // The path itself or one of its parent directories.
            let hit = (1..=path.len()).any(|n| matches(pattern, &path[..n]));
            if hit {
                verdict = if *negated { None } else { Some(i) };
            }
        }
        verdict.map(|i| self.originals[i].as_str())
    }
}

fn segments(path: &str) -> Vec<String> {
    path.trim_start_matches("./")
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .map(str::to_string)
        .collect()
}

fn matches(pattern: &[String], path: &[String]) -> bool {
    match (pattern.first(), path.first()) {
        (None, None) => true,
        (None, Some(_)) => false,
        (Some(p), _) if p == "**" => {
            // `**` takes zero or more segments.
            (0..=path.len()).any(|skip| matches(&pattern[1..], &path[skip..]))
        }
        (Some(_), None) => false,
        (Some(p), Some(s)) => {
            glob(p.as_bytes(), s.as_bytes()) && matches(&pattern[1..], &path[1..])
        }
    }
}

/// One segment: `*` any run of characters, `?` one character, everything else literal.
fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
        (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_anchored_and_cover_what_is_below_them() {
        let ignore = DockerIgnore::parse("# build output\n**/target\n.git\n*.md\n!README.md\n");
        assert_eq!(
            ignore.excluding_pattern("target/debug/x"),
            Some("**/target")
        );
        assert_eq!(
            ignore.excluding_pattern("tests/abi-guest/target"),
            Some("**/target")
        );
        assert_eq!(ignore.excluding_pattern(".git/config"), Some(".git"));
        assert_eq!(ignore.excluding_pattern("NOTES.md"), Some("*.md"));
        assert_eq!(ignore.excluding_pattern("README.md"), None);
        // `*.md` is anchored at the root: it does not reach into directories.
        assert_eq!(ignore.excluding_pattern("envoy/README.md"), None);
        assert_eq!(ignore.excluding_pattern("plugin/src/lib.rs"), None);
        assert_eq!(ignore.excluding_pattern("targets.rs"), None);
    }
}
