//! A Dockerfile reader for the checks: instructions with their line numbers, stages, and the
//! arguments of FROM, COPY/ADD, RUN, ENV, ENTRYPOINT and CMD. It understands what our Dockerfiles
//! use (line continuations, comments, `--flag=value` options, JSON exec form) and reports
//! anything else it cannot read as an error rather than guessing.

use std::fmt;

/// One instruction: `COPY --from=build /out/x /usr/local/bin/x` at line 12.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instruction {
    /// 1-based line of the instruction's first line.
    pub line: usize,
    /// Upper-cased keyword.
    pub keyword: String,
    /// `--name=value` options before the arguments (`--from=build`, `--mount=type=cache,...`).
    pub flags: Vec<(String, String)>,
    /// The arguments after the options: JSON exec form decoded, else split on whitespace.
    pub args: Vec<String>,
    /// The text after the options, continuation lines joined (RUN's shell text).
    pub body: String,
}

impl Instruction {
    pub fn flag(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A build stage: `FROM image [AS name]` and the instructions after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub index: usize,
    pub name: Option<String>,
    pub image: String,
    pub from_line: usize,
    pub instructions: Vec<Instruction>,
}

impl Stage {
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => format!("#{}", self.index),
        }
    }

    /// Instructions with this keyword.
    pub fn all<'a>(&'a self, keyword: &'a str) -> impl Iterator<Item = &'a Instruction> + 'a {
        self.instructions
            .iter()
            .filter(move |i| i.keyword == keyword)
    }

    /// The last instruction with this keyword (Docker keeps the last ENTRYPOINT/CMD).
    pub fn last(&self, keyword: &str) -> Option<&Instruction> {
        self.instructions
            .iter()
            .rev()
            .find(|i| i.keyword == keyword)
    }

    /// `ENV NAME=value` in this stage.
    pub fn env(&self, name: &str) -> Option<String> {
        self.all("ENV").find_map(|i| {
            i.args.iter().find_map(|a| {
                let (k, v) = a.split_once('=')?;
                (k == name).then(|| v.trim_matches('"').to_string())
            })
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dockerfile {
    pub stages: Vec<Stage>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

const KEYWORDS: &[&str] = &[
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
];

impl Dockerfile {
    pub fn parse(text: &str) -> Result<Dockerfile, ParseError> {
        let mut stages: Vec<Stage> = Vec::new();
        for (line, logical) in logical_lines(text) {
            let (keyword, rest) = match logical.split_once(char::is_whitespace) {
                Some((k, r)) => (k.to_ascii_uppercase(), r.trim().to_string()),
                None => (logical.to_ascii_uppercase(), String::new()),
            };
            if !KEYWORDS.contains(&keyword.as_str()) {
                return Err(ParseError {
                    line,
                    message: format!("unknown instruction {keyword:?}"),
                });
            }
            if rest.contains("<<") && matches!(keyword.as_str(), "RUN" | "COPY") {
                return Err(ParseError {
                    line,
                    message: "heredocs are not supported by these checks".into(),
                });
            }
            let (flags, body) = split_flags(&rest);
            let args = if body.starts_with('[') {
                serde_json::from_str::<Vec<String>>(body).map_err(|e| ParseError {
                    line,
                    message: format!("{keyword}: exec form is not a JSON array of strings: {e}"),
                })?
            } else {
                body.split_whitespace().map(str::to_string).collect()
            };
            let instruction = Instruction {
                line,
                keyword: keyword.clone(),
                flags,
                args,
                body: body.to_string(),
            };
            if keyword == "FROM" {
                let (image, name) = match instruction.args.as_slice() {
                    [image] => (image.clone(), None),
                    [image, as_kw, name] if as_kw.eq_ignore_ascii_case("AS") => {
                        (image.clone(), Some(name.clone()))
                    }
                    _ => {
                        return Err(ParseError {
                            line,
                            message: format!("FROM {rest:?}: expected IMAGE [AS NAME]"),
                        })
                    }
                };
                stages.push(Stage {
                    index: stages.len(),
                    name,
                    image,
                    from_line: line,
                    instructions: Vec::new(),
                });
                continue;
            }
            match stages.last_mut() {
                Some(stage) => stage.instructions.push(instruction),
                None if keyword == "ARG" => {}
                None => {
                    return Err(ParseError {
                        line,
                        message: format!("{keyword} before the first FROM"),
                    })
                }
            }
        }
        if stages.is_empty() {
            return Err(ParseError {
                line: 1,
                message: "no FROM instruction".into(),
            });
        }
        Ok(Dockerfile { stages })
    }

    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages
            .iter()
            .find(|s| s.name.as_deref() == Some(name) || s.index.to_string() == name)
    }

    /// The stage `docker build` produces without `--target`.
    pub fn final_stage(&self) -> &Stage {
        // `parse` refuses a file without stages, so there is a last one.
        &self.stages[self.stages.len() - 1]
    }
}

/// Joins `\` continuations, drops comments and blank lines; yields (first line number, text).
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_none()) {
            continue;
        }
        let (start, mut acc) = current.take().unwrap_or((i + 1, String::new()));
        let continued = trimmed.ends_with('\\');
        let piece = trimmed.trim_end_matches('\\').trim_end();
        if !acc.is_empty() && !piece.is_empty() {
            acc.push(' ');
        }
        acc.push_str(piece);
        if continued {
            current = Some((start, acc));
        } else if !acc.is_empty() {
            out.push((start, acc));
        }
    }
    if let Some((start, acc)) = current {
        if !acc.is_empty() {
            out.push((start, acc));
        }
    }
    out
}

/// Splits leading `--name=value` / `--name` options off an instruction's text.
fn split_flags(rest: &str) -> (Vec<(String, String)>, &str) {
    let mut flags = Vec::new();
    let mut body = rest.trim_start();
    while let Some(after) = body.strip_prefix("--") {
        let end = after.find(char::is_whitespace).unwrap_or(after.len());
        let flag = &after[..end];
        let (name, value) = flag.split_once('=').unwrap_or((flag, ""));
        flags.push((name.to_string(), value.to_string()));
        body = after[end..].trim_start();
    }
    (flags, body)
}

/// Splits shell text into commands (at `&&`, `||`, `;`, `|`) of words, honouring quotes and
/// backslash escapes. Enough to read `cargo build ... && install ...` lines; no expansion.
pub fn shell_commands(text: &str) -> Vec<Vec<String>> {
    let mut commands = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars().peekable();
    let mut quote: Option<char> = None;
    let end_word = |word: &mut String, in_word: &mut bool, words: &mut Vec<String>| {
        if *in_word {
            words.push(std::mem::take(word));
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => {
                if let Some(n) = chars.next() {
                    word.push(n);
                }
            }
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '\\') => {
                if let Some(n) = chars.next() {
                    word.push(n);
                    in_word = true;
                }
            }
            (None, ';' | '|' | '&') => {
                if c != ';' && chars.peek() == Some(&c) {
                    chars.next();
                }
                end_word(&mut word, &mut in_word, &mut words);
                if !words.is_empty() {
                    commands.push(std::mem::take(&mut words));
                }
            }
            (None, c) if c.is_whitespace() => end_word(&mut word, &mut in_word, &mut words),
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    end_word(&mut word, &mut in_word, &mut words);
    if !words.is_empty() {
        commands.push(words);
    }
    commands
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_flags_continuations_and_exec_form_are_read() {
        let df = Dockerfile::parse(
            "# comment\nFROM rust:1 AS build\nRUN --mount=type=cache,target=/x \\\n    cargo build -p a \\\n    && install x /out/x\n\nFROM debian:bookworm-slim\nCOPY --from=build /out/x /usr/local/bin/x\nENV A=1 B=\"2\"\nENTRYPOINT [\"x\", \"serve\"]\n",
        )
        .expect("parses");
        assert_eq!(df.stages.len(), 2);
        let build = df.stage("build").expect("build stage");
        let run = &build.instructions[0];
        assert_eq!(run.line, 3);
        assert_eq!(run.flag("mount"), Some("type=cache,target=/x"));
        assert_eq!(
            shell_commands(&run.body),
            vec![
                vec!["cargo", "build", "-p", "a"],
                vec!["install", "x", "/out/x"]
            ]
        );
        let last = df.final_stage();
        assert_eq!(last.image, "debian:bookworm-slim");
        assert_eq!(
            last.last("COPY").and_then(|c| c.flag("from")),
            Some("build")
        );
        assert_eq!(last.env("B").as_deref(), Some("2"));
        assert_eq!(
            last.last("ENTRYPOINT").map(|e| e.args.clone()),
            Some(vec!["x".to_string(), "serve".to_string()])
        );
    }

    #[test]
    fn unknown_instructions_and_missing_from_are_errors() {
        assert_eq!(Dockerfile::parse("COPY a b\n").map_err(|e| e.line), Err(1));
        let e = Dockerfile::parse("FROM x\nCOPPY a b\n").expect_err("typo");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("COPPY"), "{e}");
    }

    #[test]
    fn shell_words_keep_quoted_text_together() {
        assert_eq!(
            shell_commands("a 'b c' \"d\\\"e\"; f|g"),
            vec![vec!["a", "b c", "d\"e"], vec!["f"], vec!["g"]]
        );
    }
}
